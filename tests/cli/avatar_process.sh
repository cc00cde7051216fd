#!/usr/bin/env bash
# unshard-avatar's forward mode (the recorded sink and streamed calls) with one process per rank
# (unshard-launch, the process backend over loopback TCP) writes exactly the bytes of the world-size-1
# full run, and every rank prints its peak line once; only rank 0 writes the file.
set -euo pipefail
bin=$1 data=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
args=(--config "$data/liveavatar_tiny_a.config.json" --weights "$data/liveavatar_tiny_a.safetensors"
      --inputs "$data/liveavatar_tiny_a.safetensors" --gemm portable)
"$bin/unshard-avatar" "${args[@]}" --out "$tmp/single.safetensors" --world-size 1 --policy full >/dev/null 2>&1
for spec in "2 prefetch:1" "3 chunked:4KiB+offload+prefetch:1" "4 selective:subunit+kv:offload"; do
  set -- $spec
  rm -f "$tmp/procs.safetensors"
  "$bin/unshard-launch" --nproc "$1" -- "$bin/unshard-avatar" "${args[@]}" --out "$tmp/procs.safetensors" --backend process \
      --policy "$2" >"$tmp/log" 2>&1 || { cat "$tmp/log"; exit 1; }
  cmp -s "$tmp/single.safetensors" "$tmp/procs.safetensors" || { echo "FAIL $spec: outputs differ"; cat "$tmp/log"; exit 1; }
  for ((r=0; r<$1; r++)); do
    n=$(grep -c "^rank $r planned_peak_bytes=[0-9]* measured_peak_bytes=[0-9]* bytes_gathered=[0-9]* forwards=3" "$tmp/log" || true)
    [ "$n" = 1 ] || { echo "FAIL $spec: rank $r printed $n peak lines"; cat "$tmp/log"; exit 1; }
  done
  w=$(grep -c "wrote $tmp/procs.safetensors" "$tmp/log" || true)
  [ "$w" = 1 ] || { echo "FAIL $spec: $w processes wrote the output"; cat "$tmp/log"; exit 1; }
  echo "ok world $1 $2: bit-identical to world size 1 full"
done
# The backends the forward mode does not run are usage errors naming the option.
set +e
out=$("$bin/unshard-avatar" "${args[@]}" --out "$tmp/x.safetensors" --backend cuda 2>&1); rc=$?
set -e
[ $rc = 2 ] && grep -q -- "--backend cuda runs the denoising loop (--denoise)" <<<"$out" || { echo "FAIL --backend cuda: rc $rc: $out"; exit 1; }
set +e
out=$("$bin/unshard-avatar" --demo --backend process 2>&1); rc=$?
set -e
[ $rc = 2 ] && grep -q -- "--backend process applies to runs from files" <<<"$out" || { echo "FAIL --demo --backend process: rc $rc: $out"; exit 1; }
echo "ok errors"
