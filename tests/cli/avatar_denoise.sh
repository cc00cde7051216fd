#!/usr/bin/env bash
# unshard-avatar --denoise: bad input gets the exit status of docs/conventions.md (1 bad input, 2 usage)
# and a message naming the culprit; then one run per schedule whose outputs are checked: the names
# and shapes of the refs, every rank's peak line with bytes_gathered= and forwards=, and the steps
# schedule's latents bit-identical to the replicated run's (portable GEMM).
# Usage: avatar_denoise.sh BIN_DIR DATA_DIR [cuda]
set -u
bin=$1/unshard-avatar; data=$2; tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; fail=0
cfg=$data/liveavatar_denoise_a.config.json; w=$data/liveavatar_denoise_a.safetensors
. "$(dirname "$0")/expect.sh"
base=(--denoise --config "$cfg" --weights "$w" --inputs "$w" --out "$tmp/o.safetensors")
expect 2 "unknown schedule 'pipeline'" -- "${base[@]}" --schedule pipeline
expect 2 "--steps must be at least 1" -- "${base[@]}" --steps 0
expect 2 "--clips must be at least 1" -- "${base[@]}" --clips 0
python3 - "$w" "$tmp/nan.safetensors" <<'PY'
import json,struct,sys
b=bytearray(open(sys.argv[1],"rb").read()); n=struct.unpack("<Q",b[:8])[0]; h=json.loads(b[8:8+n])
at=8+n+h["input.clip0.block1.noise"]["data_offsets"][0]+4*3; b[at:at+4]=struct.pack("<f",float("inf"))
open(sys.argv[2],"wb").write(b)
PY
expect 1 "input tensor 'input.clip0.block1.noise' has +Inf at element 3 (byte offset" -- --denoise --config "$cfg" --weights "$w" --inputs "$tmp/nan.safetensors" --out "$tmp/o"
expect 2 "--world-size: world size must be at least 1 (got 0)" -- "${base[@]}" --world-size 0
expect 2 "--world-size: world size 1025 is beyond the supported 1024" -- "${base[@]}" --world-size 1025
expect 2 "--schedule applies to --denoise only" -- --config "$cfg" --weights "$w" --inputs "$w" --out "$tmp/o" --schedule steps
expect 2 "--size must be WxH" -- "${base[@]}" --size 720
expect 2 "--compute applies to --backend cuda only" -- "${base[@]}" --compute bf16
expect 2 "--compute must be f32 or bf16" -- "${base[@]}" --backend cuda --compute f16
# $3 = cuda when the build has the CUDA backend.
[ "${3:-}" = cuda ] || expect 2 "this unshard-avatar was built without CUDA" -- "${base[@]}" --backend cuda
python3 -c "import json,sys; c=json.load(open('$cfg')); c['streaming']['kv_cache']['k/v']=[1,50,4,16]; json.dump(c,open('$tmp/small.json','w'))"
expect 1 "noisy cache of 50 tokens is not a positive multiple of the block's 96 tokens" -- "${base[@]/$cfg/$tmp/small.json}"
python3 -c "import json,sys; c=json.load(open('$cfg')); c['scheduler']['shift']=-1; json.dump(c,open('$tmp/shift.json','w'))"
expect 1 "'shift' must be a positive number" -- "${base[@]/$cfg/$tmp/shift.json}"
expect 0 "schedule steps, 3 steps, world size 2" -- "${base[@]}" --steps 3 --world-size 2 --shift 5
expect 1 "missing input tensor 'input.clip1.block0.noise'" -- "${base[@]}" --clips 2
expect 1 "missing input tensor 'input.clip0.block0.noise'" -- "${base[@]/$w/$data/liveavatar_tiny_a.safetensors}"
expect 0 "frames per second" -- "${base[@]}" --out "$tmp/rep.safetensors" --schedule replicated --gemm portable --all-steps
expect 0 "frames per second" -- "${base[@]}" --out "$tmp/steps.safetensors" --world-size 3 --policy chunked:4KiB+prefetch:1 --gemm portable --all-steps
grep -q "^rank 2 planned_peak_bytes=.* bytes_gathered=[0-9]* forwards=3$" "$tmp/out" || { echo "FAIL: rank 2's peak line: $(grep "^rank 2" "$tmp/out")"; fail=1; }
python3 - "$tmp" "$w" <<'PY' || fail=1
import json,struct,sys
def header(p):
    f=open(p,"rb"); k=struct.unpack("<Q",f.read(8))[0]; return json.loads(f.read(k)), 8+k
def tensor(p, n):
    h,o=header(p); b,e=h[n]["data_offsets"]; f=open(p,"rb"); f.seek(o+b); return f.read(e-b)
t,ref=sys.argv[1],sys.argv[2]
rh,_=header(ref); sh,_=header(t+"/steps.safetensors")
refs={k[4:]:v for k,v in rh.items() if k.startswith("ref.clip")}
bad=[n for n,v in refs.items() if n not in sh or sh[n]["shape"]!=v["shape"] or sh[n]["dtype"]!="F32"]
if bad: print("FAIL outputs missing or misshapen:", bad[:3]); sys.exit(1)
diff=[n for n in refs if tensor(t+"/steps.safetensors",n)!=tensor(t+"/rep.safetensors",n)]
if diff: print("FAIL steps differs from replicated in", diff[:3]); sys.exit(1)
print("ok   --denoise: %d outputs with the refs' names and shapes; steps (3 ranks, chunked) == replicated bit for bit" % len(refs))
PY
[ $fail = 0 ] && echo "all unshard-avatar --denoise checks passed"
exit $fail
