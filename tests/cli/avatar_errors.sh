#!/usr/bin/env bash
# unshard-avatar on bad input: the exit status of docs/conventions.md (1 bad input, 2 usage) and a message
# naming the culprit; never a crash. Then one good run: the peak lines and the output tensors' names
# and shapes. Usage: avatar_errors.sh BIN_DIR DATA_DIR
set -u
bin=$1/unshard-avatar; data=$2; tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; fail=0
cfg=$data/liveavatar_tiny_a.config.json; w=$data/liveavatar_tiny_a.safetensors
. "$(dirname "$0")/expect.sh"
base=(--config "$cfg" --weights "$w" --inputs "$w" --out "$tmp/o.safetensors")
# A copy of the config with one change: edit KEY.PATH VALUE(JSON).
edit() { python3 - "$cfg" "$1" "$2" "$3" <<'PY'
import json,sys; c=json.load(open(sys.argv[1])); d=c
path=sys.argv[2].split("/")
for k in path[:-1]: d=d[int(k)] if isinstance(d,list) else d[k]
k=path[-1]
if sys.argv[3]=="DELETE": del d[k]
else: d[int(k) if isinstance(d,list) else k]=json.loads(sys.argv[3])
json.dump(c,open(sys.argv[4],"w"))
PY
}
expect 2 "unknown option '--bogus'" -- "${base[@]}" --bogus
expect 2 "missing required option --config" -- --weights "$w" --inputs "$w" --out "$tmp/o"
expect 2 "unknown term 'warp'" -- "${base[@]}" --policy warp
expect 2 "--world-size: world size must be at least 1 (got 0)" -- "${base[@]}" --world-size 0
expect 2 "--world-size: world size 1025 is beyond the supported 1024" -- "${base[@]}" --world-size 1025
expect 2 "--dtype must be f32 or bf16" -- "${base[@]}" --dtype f64
expect 2 "--lora-alpha needs --lora" -- "${base[@]}" --lora-alpha 64
expect 1 "nope.safetensors" -- --config "$cfg" --weights "$tmp/nope.safetensors" --inputs "$w" --out "$tmp/o"
head -c 1000 "$w" > "$tmp/trunc.safetensors"
expect 1 "trunc.safetensors" -- --config "$cfg" --weights "$tmp/trunc.safetensors" --inputs "$w" --out "$tmp/o"
edit model/num_heads 3 "$tmp/heads.json"
expect 1 "key 'num_heads'" -- --config "$tmp/heads.json" --weights "$w" --inputs "$w" --out "$tmp/o"
edit model/enable_motioner true "$tmp/motioner.json"
expect 1 "key 'enable_motioner'" -- --config "$tmp/motioner.json" --weights "$w" --inputs "$w" --out "$tmp/o"
edit streaming DELETE "$tmp/nocalls.json"
expect 1 "no streaming.calls" -- --config "$tmp/nocalls.json" --weights "$w" --inputs "$w" --out "$tmp/o"
edit streaming/calls/1/forward_kwargs/x '"[input.x_zz]"' "$tmp/noinput.json"
expect 1 "missing input tensor 'input.x_zz'" -- --config "$tmp/noinput.json" --weights "$w" --inputs "$w" --out "$tmp/o"
edit streaming/calls/2/forward_kwargs/x '"input.context"' "$tmp/badshape.json"
expect 1 "call 'b': liveavatar input 'x' has shape [7,48]" -- --config "$tmp/badshape.json" --weights "$w" --inputs "$w" --out "$tmp/o"
python3 - "$w" "$tmp/start.safetensors" <<'PY'
import json,struct,sys
b=bytearray(open(sys.argv[1],"rb").read()); n=struct.unpack("<Q",b[:8])[0]; h=json.loads(b[8:8+n])
t=h["input.current_start"]; assert t["dtype"]=="F32" and t["shape"]==[3], t
at=8+n+t["data_offsets"][0]+4*2; assert struct.unpack("<f",b[at:at+4])[0]==96; b[at:at+4]=struct.pack("<f",95.0)
open(sys.argv[2],"wb").write(b)
PY
expect 1 "start.safetensors: call 'b': current_start 95 is not a multiple of the block's 96 tokens" -- --config "$cfg" --weights "$w" --inputs "$tmp/start.safetensors" --out "$tmp/o"
grep -q "call 'b': call 'b'" "$tmp/out" && { echo "FAIL: the call is named twice"; fail=1; }
edit model/num_layers 5 "$tmp/deep.json"
expect 1 "missing tensor 'blocks.4." -- --config "$tmp/deep.json" --weights "$w" --inputs "$w" --out "$tmp/o"
edit model/ffn_dim 256 "$tmp/wide.json"
expect 1 "blocks.0.ffn.0.weight' has shape" -- --config "$tmp/wide.json" --weights "$w" --inputs "$w" --out "$tmp/o"
expect 1 "does not fit" -- "${base[@]}" --budget 1MiB
expect 1 "nolora.safetensors" -- "${base[@]}" --lora "$tmp/nolora.safetensors" --lora-alpha 64
edit streaming/calls/2/forward_kwargs/x '"[input.x_zz]"' "$tmp/noinput_b.json"
expect 1 "missing input tensor 'input.x_zz'" -- --config "$tmp/noinput_b.json" --weights "$w" --inputs "$w" --out "$tmp/o"
# One injector fewer: its tensors are unknown -- a warning, or with --strict an error naming them.
edit model/audio_inject_layers '[0, 2]' "$tmp/fewer.json"
expect 1 "unknown tensor 'audio_injector.injector.2." -- --config "$tmp/fewer.json" --weights "$w" --inputs "$w" --out "$tmp/o" --strict
expect 0 "warning" -- --config "$tmp/fewer.json" --weights "$w" --inputs "$w" --out "$tmp/o"
# A good run: one peak line per rank, outputs named and shaped as the ref.* tensors.
expect 0 "wrote" -- "${base[@]}" --world-size 3 --policy offload+prefetch:2 --dtype bf16
for r in 0 1 2; do grep -q "^rank $r planned_peak_bytes=[0-9]* measured_peak_bytes=[0-9]*.* kv_cache=[1-9]" "$tmp/out" \
  || { echo "FAIL: no peak line with a kv_cache term for rank $r"; fail=1; }; done
python3 - "$tmp/o.safetensors" "$w" <<'PY' || fail=1
import json,re,struct,sys
def hdr(p):
    f=open(p,"rb"); n=struct.unpack("<Q",f.read(8))[0]; return json.loads(f.read(n))
got,ref=hdr(sys.argv[1]),hdr(sys.argv[2])
strip=lambda s: s[1:] if len(s)>1 and s[0]==1 else s
names=[n for n in got if n!="__metadata__"]
want=[n[4:] for n in ref if re.fullmatch(r"ref\.\w+\.(output|block\.\d+\.out|kv\.\d+\.[kv])", n)]
missing=[n for n in want if n not in got]
bad=[n for n in names if "ref."+n in ref and strip(got[n]["shape"])!=strip(ref["ref."+n]["shape"])]
f32=[n for n in names if got[n]["dtype"]!="F32"]
if missing or bad or f32: print("FAIL outputs: missing",missing[:5],"shape",bad[:5],"dtype",f32[:5]); sys.exit(1)
print("ok   outputs: %d tensors, all ref.* counterparts present with their shapes, F32"%len(names))
PY
# --lora: a peft LoRA on blocks.0.self_attn.q merged while loading. B = 0 changes nothing (bit for
# bit); B != 0 changes block 0's output.
python3 - "$tmp" <<'PY'
import json,struct,sys,math
def write(path, tensors):
    hdr, blob = {}, b""
    for n,(shape,vals) in tensors.items():
        data = struct.pack("<%df" % len(vals), *vals)
        hdr[n] = {"dtype":"F32","shape":shape,"data_offsets":[len(blob), len(blob)+len(data)]}; blob += data
    h = json.dumps(hdr).encode(); h += b" " * (-len(h) % 8)
    open(path,"wb").write(struct.pack("<Q",len(h)) + h + blob)
r, d = 2, 64
A = [math.sin(0.1*i) for i in range(r*d)]
for name, B in (("zero", [0.0]*(d*r)), ("some", [0.05*math.cos(0.3*i) for i in range(d*r)])):
    write(f"{sys.argv[1]}/lora_{name}.safetensors", {
        "base_model.model.blocks.0.self_attn.q.lora_A.weight": ([r,d], A),
        "base_model.model.blocks.0.self_attn.q.lora_B.weight": ([d,r], B)})
PY
expect 0 "wrote" -- --config "$cfg" --weights "$w" --inputs "$w" --out "$tmp/base.safetensors" --gemm portable
expect 0 "wrote" -- --config "$cfg" --weights "$w" --inputs "$w" --out "$tmp/zero.safetensors" --gemm portable --world-size 2 --lora "$tmp/lora_zero.safetensors" --lora-alpha 4
expect 0 "wrote" -- --config "$cfg" --weights "$w" --inputs "$w" --out "$tmp/some.safetensors" --gemm portable --world-size 2 --lora "$tmp/lora_some.safetensors" --lora-alpha 4
python3 - "$tmp" <<'PY' || fail=1
import json,struct,sys
def tensor(p, n):
    f=open(p,"rb"); k=struct.unpack("<Q",f.read(8))[0]; h=json.loads(f.read(k)); b,e=h[n]["data_offsets"]; f.seek(8+k+b); return f.read(e-b)
t=sys.argv[1]; n="a.block.0.out"
same = tensor(t+"/base.safetensors", n) == tensor(t+"/zero.safetensors", n)
moved = tensor(t+"/base.safetensors", n) != tensor(t+"/some.safetensors", n)
if not (same and moved): print("FAIL --lora: zero LoRA identical:", same, "non-zero LoRA changes block 0:", moved); sys.exit(1)
print("ok   --lora: a zero LoRA leaves the outputs bit-identical, a non-zero one changes them")
PY
[ $fail = 0 ] && echo "all unshard-avatar error checks passed"
exit $fail
