#!/usr/bin/env bash
# unshard-dit on bad input: the exit status of docs/conventions.md (1 bad input, 2 usage) and a message
# naming the culprit; never a crash. Usage: dit_errors.sh BIN_DIR DATA_DIR
set -u
bin=$1/unshard-dit; data=$2; tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; fail=0
cfg=$data/wan_tiny_a.config.json; w=$data/wan_tiny_a.safetensors
. "$(dirname "$0")/expect.sh"
base=(--config "$cfg" --weights "$w" --inputs "$w" --out "$tmp/o.safetensors")
expect 2 "unknown option '--bogus'" -- "${base[@]}" --bogus
expect 2 "missing required option --config" -- --weights "$w" --inputs "$w" --out "$tmp/o"
expect 2 "unknown term 'warp'" -- "${base[@]}" --policy warp
expect 2 "--world-size: world size must be at least 1 (got 0)" -- "${base[@]}" --world-size 0
expect 2 "--world-size: world size 1025 is beyond the supported 1024" -- "${base[@]}" --world-size 1025
expect 2 "--dtype must be f32 or bf16" -- "${base[@]}" --dtype f64
expect 2 "--compute applies to --backend cuda only" -- "${base[@]}" --compute bf16
expect 2 "--compute must be f32 or bf16, got 'f16'" -- "${base[@]}" --backend cuda --compute f16
expect 2 "--budget 0B is 0 bytes; leave --budget out to run without a budget" -- "${base[@]}" --budget 0B
expect 1 "nope.safetensors" -- --config "$cfg" --weights "$tmp/nope.safetensors" --inputs "$w" --out "$tmp/o"
head -c 1000 "$w" > "$tmp/trunc.safetensors"
expect 1 "trunc.safetensors" -- --config "$cfg" --weights "$tmp/trunc.safetensors" --inputs "$w" --out "$tmp/o"
printf '{"dim": 128, "num_heads": 3}' > "$tmp/bad.json"
expect 1 "bad.json" -- --config "$tmp/bad.json" --weights "$w" --inputs "$w" --out "$tmp/o"
python3 - "$cfg" "$tmp/wide.json" <<'PY'
import json,sys; c=json.load(open(sys.argv[1])); c["ffn_dim"]=512; json.dump(c,open(sys.argv[2],"w"))
PY
expect 1 "blocks.0.ffn.0.weight' has shape" -- --config "$tmp/wide.json" --weights "$w" --inputs "$w" --out "$tmp/o"
python3 - "$cfg" "$tmp/deep.json" <<'PY'
import json,sys; c=json.load(open(sys.argv[1])); c["num_layers"]=3; json.dump(c,open(sys.argv[2],"w"))
PY
expect 1 "missing tensor 'blocks.2." -- --config "$tmp/deep.json" --weights "$w" --inputs "$w" --out "$tmp/o"
expect 1 "does not fit" -- "${base[@]}" --budget 1MiB
# --strict turns an unknown tensor into an error; without it, a warning.
python3 - "$cfg" "$tmp/shallow.json" <<'PY'
import json,sys; c=json.load(open(sys.argv[1])); c["num_layers"]=1; json.dump(c,open(sys.argv[2],"w"))
PY
expect 1 "unknown tensor 'blocks.1." -- --config "$tmp/shallow.json" --weights "$w" --inputs "$w" --out "$tmp/o" --strict
expect 0 "warning" -- --config "$tmp/shallow.json" --weights "$w" --inputs "$w" --out "$tmp/o"
# A NaN input or weight is refused, naming the tensor, the element and the byte offset.
python3 - "$w" "$tmp/nan.safetensors" <<'PY'
import json,struct,sys
b=bytearray(open(sys.argv[1],"rb").read()); n=struct.unpack("<Q",b[:8])[0]; h=json.loads(b[8:8+n])
for name,k in (("input.x",5),("blocks.1.ffn.2.weight",9)):
    at=8+n+h[name]["data_offsets"][0]+4*k; b[at:at+4]=struct.pack("<f",float("nan"))
open(sys.argv[2],"wb").write(b)
PY
expect 1 "input tensor 'input.x' has NaN at element 5 (byte offset" -- --config "$cfg" --weights "$w" --inputs "$tmp/nan.safetensors" --out "$tmp/o"
expect 1 "tensor 'blocks.1.ffn.2.weight' has NaN at element 9 (row 0, column 9), byte offset 36" -- --config "$cfg" --weights "$tmp/nan.safetensors" --inputs "$w" --out "$tmp/o" --world-size 2
expect 0 "wrote" -- "${base[@]}" --world-size 3 --policy offload+prefetch:2
grep -q "^rank 2 planned_peak_bytes=" "$tmp/out" || { echo "FAIL: no peak line for rank 2"; fail=1; }
[ $fail = 0 ] && echo "all unshard-dit error checks passed"
exit $fail
