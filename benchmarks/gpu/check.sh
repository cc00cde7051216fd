#!/usr/bin/env bash
# One command for a machine with a GPU (lent, offline): builds what it runs for this GPU only, runs
# the GPU tests, the kernel and overlap benchmarks, unshard-avatar --denoise --backend cuda on the
# vectors and the 14B-shaped block timing, and writes one report file with every step's status,
# time and numbers. Without a GPU it prints "no GPU" and exits 0 at once.
#
#   benchmarks/gpu/check.sh                 # report: benchmarks/results/gpu_check_<host>_<UTC date>.md
#
# Environment (all optional):
#   UNSHARD_GPU_CHECK_BUILD_DIR  build directory (default build-gpu-check: its own, never build-cuda)
#   UNSHARD_GPU_CHECK_REPORT     report path
#   UNSHARD_GPU_CHECK_ARCH       CUDA architecture (default: the GPU's compute capability, else 90)
#   UNSHARD_GPU_CHECK_BUDGET_S   the whole run's time budget in seconds (default 460: under 8 minutes)
#
# Every step runs under `timeout`, bounded by what is left of the budget; a failing step is recorded
# and the script goes on. Exit status: 0 when every step that ran passed, 1 otherwise (the report is
# written either way). Needs no network: cmake, a C++20 compiler, nvcc, doctest, nlohmann-json and
# OpenBLAS from the machine (what the CPU build needs), python3 for the report's tables (optional).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
root=$(pwd)

# --- a GPU? ----------------------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  echo "no GPU"
  exit 0
fi

start=$(date +%s)
budget=${UNSHARD_GPU_CHECK_BUDGET_S:-460}
deadline=$((start + budget))
host=$(hostname -s 2>/dev/null || hostname)
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
build=${UNSHARD_GPU_CHECK_BUILD_DIR:-build-gpu-check}
report=${UNSHARD_GPU_CHECK_REPORT:-benchmarks/results/gpu_check_${host}_${stamp}.md}
logs="$build/gpu-check-logs"
mkdir -p "$logs" "$(dirname "$report")"
jobs=$(nproc 2>/dev/null || echo 4)

if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi
gpu_line=$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -1)
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
arch=${UNSHARD_GPU_CHECK_ARCH:-${cap:-90}}
case "$arch" in ''|*[!0-9]*) arch=90 ;; esac

# --- steps -----------------------------------------------------------------------------------------
summary=()   # "| step | status | seconds | note |" rows
details=()   # markdown per step
failed=0

left() { echo $((deadline - $(date +%s))); }

# step NAME LIMIT_S NOTE -- CMD...: runs CMD under timeout min(LIMIT_S, what is left), logs to
# $logs/NAME.log; records ok / FAIL (rc) / TIMEOUT / SKIPPED (no time left).
step() {
  local name=$1 limit=$2 note=$3; shift 4
  local log="$logs/$name.log" remaining t0 rc status secs
  remaining=$(left)
  if [ "$remaining" -lt 10 ]; then
    summary+=("| $name | SKIPPED | 0 | out of time (budget ${budget} s) |")
    details+=("### $name"$'\n\n'"Skipped: the budget of ${budget} s was spent."$'\n')
    return 2
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  echo "== $name (limit ${limit} s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  secs=$(($(date +%s) - t0))
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT (${limit} s)"; failed=1 ;;
    *) status="FAIL (exit $rc)"; failed=1 ;;
  esac
  echo "   $status in ${secs} s"
  summary+=("| $name | $status | $secs | $note |")
  details+=("### $name"$'\n\n'"\`$*\` → $status in ${secs} s"$'\n\n```\n'"$(tail -n 60 "$log")"$'\n```\n')
  return $rc
}

# A step that could not run at all (its binary is missing): recorded, not a failure of the script
# unless `fatal` is given.
missing() {
  local name=$1 why=$2 fatal=${3:-}
  [ -n "$fatal" ] && failed=1
  summary+=("| $name | ${fatal:+FAIL: }NOT RUN | 0 | $why |")
  details+=("### $name"$'\n\n'"Not run: $why"$'\n')
  echo "== $name: not run ($why)"
}

# --- configure + build only what runs, for this GPU only ------------------------------------------
# The machine is offline: cuDNN frontend headers carried into shared/cudnn_frontend_include (or
# UNSHARD_CUDNN_FRONTEND_INCLUDE) give the bf16 attention cuDNN's SDPA; else configure looks for
# the PyPI package and says which attention it builds.
frontend=${UNSHARD_CUDNN_FRONTEND_INCLUDE:-}
[ -z "$frontend" ] && [ -f "$root/shared/cudnn_frontend_include/cudnn_frontend.h" ] && frontend=$root/shared/cudnn_frontend_include
step configure 90 "sm_$arch, Release, benchmarks on" -- \
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DUNSHARD_ENABLE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$arch" -DUNSHARD_BUILD_BENCHMARKS=ON ${frontend:+-DUNSHARD_CUDNN_FRONTEND_INCLUDE="$frontend"}

gpu_tests=()
for f in tests/gpu/test_*.cu; do gpu_tests+=("$(basename "$f" .cu)"); done
targets=("${gpu_tests[@]}" bench_gpu_kernels bench_gpu_overlap unshard-avatar)
# The 14B-shaped block timing: whichever of these tools exists in this checkout.
block_tool=""
for t in bench_gpu_s2v_block bench_gpu_block14b; do
  if [ -f "benchmarks/gpu/${t#bench_gpu_}.cu" ] || [ -f "benchmarks/gpu/bench_${t#bench_gpu_}.cu" ]; then
    block_tool=$t
    targets+=("$t")
    break
  fi
done
# Keep going: a target that does not compile (a tool being written) does not stop the others.
keep_going=(-k)
[ -f "$build/build.ninja" ] && keep_going=(-k 0)
step build 300 "${#targets[@]} targets, -j$jobs" -- cmake --build "$build" -j"$jobs" --target "${targets[@]}" -- "${keep_going[@]}"

# --- the GPU tests ---------------------------------------------------------------------------------
# -V: every test's output, so the report has each test's MESSAGE lines (which path it took: world
# size, NCCL or not, which GEMM epilogue path, measured reserve), not only the failures'.
step gpu_tests 200 "ctest -L gpu (multigpu ones skip on one GPU)" -- \
  ctest --test-dir "$build" -L gpu -V --timeout 150
test_lines=$(grep -E 'Test +#[0-9]+: ' "$logs/gpu_tests.log" 2>/dev/null || true)
test_messages=$(grep -E -A1 'MESSAGE: ' "$logs/gpu_tests.log" 2>/dev/null | grep -v '^--$' | sed -E 's/^[0-9]+: //' | head -n 200 || true)

# --- kernel benchmarks -----------------------------------------------------------------------------
kernels_csv="$build/gpu_kernels.csv"
if [ -x "$build/bin/bench_gpu_kernels" ]; then
  step bench_kernels 120 "GEMM / attention TFLOP/s, row kernels GB/s, fraction of peak" -- \
    "$build/bin/bench_gpu_kernels" "$kernels_csv"
else
  missing bench_kernels "bench_gpu_kernels did not build" fatal
fi

# --- overlap benchmark -----------------------------------------------------------------------------
overlap_csv="$build/gpu_overlap.csv"
if [ -x "$build/bin/bench_gpu_overlap" ]; then
  step bench_overlap 60 "prefetch hides transfers behind compute" -- \
    "$build/bin/bench_gpu_overlap" --out "$overlap_csv"
else
  missing bench_overlap "bench_gpu_overlap did not build" fatal
fi

# --- unshard-avatar --denoise --backend cuda on the denoising vectors ----------------------------------
# (the comparison with the references and the host is the gpu test gpu_s2v_avatar_cuda, run above;
# these record the tool's own lines: peaks per rank, time per tick, frames per second)
avatar="$build/bin/unshard-avatar"
if [ -x "$avatar" ]; then
  d=tests/data
  for compute in f32 bf16; do
    step "avatar_cuda_denoise_$compute" 90 "denoising loop on the GPU, --compute $compute" -- \
      "$avatar" --denoise --backend cuda --compute "$compute" --world-size 1 --all-steps \
      --config "$d/liveavatar_denoise_a.config.json" --weights "$d/liveavatar_denoise_a.safetensors" \
      --inputs "$d/liveavatar_denoise_a.safetensors" --out "$build/avatar_cuda_denoise_$compute.safetensors"
  done
else
  missing avatar_cuda "unshard-avatar did not build" fatal
fi

# --- one 14B-shaped block, timed forward -------------------------------------------------------------
# dim 5120, 40 heads, FFN 13824; 3,168 query tokens against 15,312 keys of cache + cond (704x384).
block_csv="$build/gpu_block_14b.csv"
if [ -n "$block_tool" ] && [ -x "$build/bin/$block_tool" ]; then
  step block_14b 90 "dim 5120, 40 heads, ffn 13824; 3168 queries x 15312 keys, bf16 compute" -- "$build/bin/$block_tool" \
    --compute bf16 --out "$block_csv"
  step block_14b_f32 120 "the same block, f32 compute (the checked path)" -- "$build/bin/$block_tool" \
    --compute f32 --reps 3 --out "$build/gpu_block_14b_f32.csv"
elif [ -n "$block_tool" ]; then
  missing block_14b "$block_tool did not build" fatal
else
  missing block_14b "no 14B block timing tool in this checkout yet (bench_gpu_block14b / bench_gpu_s2v_block)"
fi

# --- the report ------------------------------------------------------------------------------------
total=$(($(date +%s) - start))
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain 2>/dev/null | grep -c . || true)

csv_table() {  # CSV -> markdown table, plus the targets of issue 13 for the fraction column
  local csv=$1
  [ -f "$csv" ] || { echo "(no $csv)"; return; }
  if command -v python3 >/dev/null 2>&1; then
    python3 - "$csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
if not rows:
    print("(empty)"); sys.exit()
cols = list(rows[0].keys())
print("| " + " | ".join(cols) + " |")
print("|" + "---|" * len(cols))
for r in rows:
    print("| " + " | ".join(r[c] for c in cols) + " |")
# Targets on H100/H200 (issue 13): bf16 GEMMs >= 70 % of the dense bf16 peak, bf16 attention >= 50 %,
# row kernels >= 80 % of DRAM bandwidth.
def target(r):
    k, d = r.get("kernel", ""), r.get("dtype", "")
    if k.startswith("gemm") and d == "bf16": return 0.70
    if k.startswith("flash_attention") and d == "bf16": return 0.50
    if r.get("metric") == "GB/s": return 0.80
    return None
checked = [(r, target(r)) for r in rows if target(r) is not None and r.get("fraction_of_peak")]
if checked:
    print("\nAgainst the targets:\n")
    for r, t in checked:
        f = float(r["fraction_of_peak"])
        print(f"- {r['kernel']} {r['dtype']} {r['shape']}: {100*f:.1f} % of peak, target {100*t:.0f} %: "
              + ("met" if f >= t else "**missed**"))
PY
  else
    cat "$csv"
  fi
}

{
  echo "# GPU check: $host, $stamp"
  echo
  echo "- GPU: ${gpu_line:-unknown} (built for sm_$arch)"
  echo "- nvcc: $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' | head -1)"
  echo "- commit: $commit ($dirty files changed in the working tree)"
  echo "- total: ${total} s of a ${budget} s budget; exit status $failed"
  echo
  echo "| step | status | seconds | note |"
  echo "|---|---|---|---|"
  printf '%s\n' "${summary[@]}"
  echo
  echo "## GPU tests"
  echo
  echo '```'
  echo "${test_lines:-(none ran)}"
  echo '```'
  echo
  echo "What the tests say (their MESSAGE lines: paths taken, sizes, measured numbers):"
  echo
  echo '```'
  echo "${test_messages:-(none)}"
  echo '```'
  echo
  echo "## Kernels (bench_gpu_kernels)"
  echo
  csv_table "$kernels_csv"
  echo
  echo "## Overlap (bench_gpu_overlap)"
  echo
  csv_table "$overlap_csv"
  echo
  echo "## 14B-shaped block (${block_tool:-no tool})"
  echo
  csv_table "$block_csv"
  echo
  echo "## Steps in detail (last 60 lines of each log; full logs in $logs)"
  echo
  printf '%s\n' "${details[@]}"
} >"$report"

echo "gpu check: ${total} s, report: $report"
exit $failed
