#!/usr/bin/env bash
# unshard-dit with one process per rank (unshard-launch, the process backend over loopback TCP) writes
# exactly the bytes the threaded run writes, and every rank prints its peak line once.
set -euo pipefail
bin=$1 data=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
args=(--config "$data/wan_tiny_a.config.json" --weights "$data/wan_tiny_a.safetensors"
      --inputs "$data/wan_tiny_a.safetensors" --gemm portable)
for policy in prefetch:1 chunked:4KiB+prefetch:1+offload; do
  "$bin/unshard-dit" "${args[@]}" --out "$tmp/threads.safetensors" --world-size 3 --policy "$policy" >/dev/null 2>&1
  "$bin/unshard-launch" --nproc 3 -- "$bin/unshard-dit" "${args[@]}" --out "$tmp/procs.safetensors" --backend process \
      --policy "$policy" >"$tmp/log" 2>&1 || { cat "$tmp/log"; exit 1; }
  cmp "$tmp/threads.safetensors" "$tmp/procs.safetensors" || { echo "FAIL $policy: outputs differ"; exit 1; }
  for r in 0 1 2; do
    n=$(grep -c "^rank $r planned_peak_bytes=[0-9]* measured_peak_bytes=[0-9]*" "$tmp/log" || true)
    [ "$n" = 1 ] || { echo "FAIL $policy: rank $r printed $n peak lines"; cat "$tmp/log"; exit 1; }
  done
  echo "ok $policy"
done
