#!/usr/bin/env bash
# unshard-dit keeps every block's output (num_layers x tokens x dim f32: ~27 GB for Wan 14B at
# 480p) only with --block-outputs, or by default for a vectors file that holds the reference block
# outputs (ref.block.0.out); inputs without them (a real run) get `output` alone, and so does
# --no-block-outputs. `output` is the same either way.
# Usage: dit_block_outputs.sh BIN_DIR DATA_DIR [--backend cuda]
set -euo pipefail
bin=$1 data=$2; shift 2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
args=(--config "$data/wan_tiny_a.config.json" --weights "$data/wan_tiny_a.safetensors"
      --inputs "$data/wan_tiny_a.safetensors" --world-size 2 "$@")
# The names in a safetensors file's JSON header (its first bytes).
names() {
  python3 -c 'import json,struct,sys
f=open(sys.argv[1],"rb"); n=struct.unpack("<Q",f.read(8))[0]
print("\n".join(sorted(k for k in json.loads(f.read(n)) if k!="__metadata__")))' "$1"
}
# The inputs alone, without the reference tensors: what a real run gives the tool.
python3 - "$data/wan_tiny_a.safetensors" "$tmp/inputs.safetensors" <<'PY'
import json, struct, sys
src = open(sys.argv[1], "rb"); n = struct.unpack("<Q", src.read(8))[0]; h = json.loads(src.read(n)); base = 8 + n
out, data, off = {}, b"", 0
for k, v in h.items():
    if not k.startswith("input."): continue
    b, e = v["data_offsets"]; src.seek(base + b); blob = src.read(e - b)
    out[k] = dict(v, data_offsets=[off, off + len(blob)]); data += blob; off += len(blob)
hdr = json.dumps(out).encode(); hdr += b" " * (-len(hdr) % 8)
open(sys.argv[2], "wb").write(struct.pack("<Q", len(hdr)) + hdr + data)
PY
real=(--config "$data/wan_tiny_a.config.json" --weights "$data/wan_tiny_a.safetensors"
      --inputs "$tmp/inputs.safetensors" --world-size 2 "$@")
"$bin/unshard-dit" "${real[@]}" --out "$tmp/plain.safetensors" >/dev/null 2>&1
"$bin/unshard-dit" "${args[@]}" --out "$tmp/vectors.safetensors" >/dev/null 2>&1
"$bin/unshard-dit" "${args[@]}" --out "$tmp/off.safetensors" --no-block-outputs >/dev/null 2>&1
"$bin/unshard-dit" "${real[@]}" --out "$tmp/blocks.safetensors" --block-outputs >/dev/null 2>&1
plain=$(names "$tmp/plain.safetensors") blocks=$(names "$tmp/blocks.safetensors")
[ "$plain" = "output" ] || { echo "FAIL: inputs without refs, no flag: the file holds: $plain"; exit 1; }
[ "$(names "$tmp/off.safetensors")" = "output" ] || { echo "FAIL: --no-block-outputs wrote block outputs"; exit 1; }
vectors=$(names "$tmp/vectors.safetensors")
echo "$vectors" | grep -qx 'block\.0\.out' || { echo "FAIL: a vectors file got no block.0.out: $vectors"; exit 1; }
echo "$blocks" | grep -qx 'block\.0\.out' || { echo "FAIL: --block-outputs wrote no block.0.out: $blocks"; exit 1; }
echo "$blocks" | grep -qx 'output' || { echo "FAIL: --block-outputs lost output"; exit 1; }
"$bin/unshard-dit" --help 2>&1 | grep -q -- '--block-outputs' || { echo "FAIL: --help does not list --block-outputs"; exit 1; }
echo "ok: $(echo "$blocks" | grep -c '^block\.') block outputs only on request"
