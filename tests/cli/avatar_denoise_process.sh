#!/usr/bin/env bash
# unshard-avatar --denoise with one process per rank (unshard-launch, the process backend over
# loopback TCP; the latents move between ranks by point-to-point transfers) writes exactly the bytes
# of the sequential loop on one rank, and every rank prints its peak line once.
set -euo pipefail
bin=$1 data=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
args=(--denoise --all-steps --config "$data/liveavatar_denoise_a.config.json" --weights "$data/liveavatar_denoise_a.safetensors"
      --inputs "$data/liveavatar_denoise_a.safetensors" --gemm portable)
"$bin/unshard-avatar" "${args[@]}" --out "$tmp/sequential.safetensors" --world-size 1 --schedule replicated >/dev/null 2>&1
for spec in "3 prefetch:1" "5 chunked:4KiB+offload+prefetch:1"; do
  set -- $spec
  "$bin/unshard-launch" --nproc "$1" -- "$bin/unshard-avatar" "${args[@]}" --out "$tmp/procs.safetensors" --backend process \
      --policy "$2" >"$tmp/log" 2>&1 || { cat "$tmp/log"; exit 1; }
  python3 - "$tmp/sequential.safetensors" "$tmp/procs.safetensors" <<'PY' || { echo "FAIL $spec: outputs differ"; exit 1; }
import json,struct,sys
def load(p):
    f=open(p,"rb"); k=struct.unpack("<Q",f.read(8))[0]; h=json.loads(f.read(k)); d=f.read()
    return {n:d[v["data_offsets"][0]:v["data_offsets"][1]] for n,v in h.items() if n!="__metadata__"}
a,b=load(sys.argv[1]),load(sys.argv[2])
sys.exit(0 if a.keys()==b.keys() and all(a[n]==b[n] for n in a) else 1)
PY
  for ((r=0; r<$1; r++)); do
    n=$(grep -c "^rank $r planned_peak_bytes=[0-9]* measured_peak_bytes=[0-9]* bytes_gathered=[0-9]* forwards=" "$tmp/log" || true)
    [ "$n" = 1 ] || { echo "FAIL $spec: rank $r printed $n peak lines"; cat "$tmp/log"; exit 1; }
  done
  echo "ok world $1 $2: bit-identical to the sequential loop"
done
