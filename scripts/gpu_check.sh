#!/usr/bin/env bash
# The GPU check for a lent GPU machine with a short budget, each call under 10 minutes:
#   call 1 (default): build, GPU correctness tests, then kernel timings (benchmarks/gpu_kernels.py);
#   call 2 (--suite): the pytest-benchmark suite in full mode and its plots.
# Every stage is bounded by a timeout and logged; correctness must pass before anything is timed.
# Writes logs, JSON and markdown tables under $OUT (default out/gpu); copy the tables into
# benchmarks/RESULTS.md afterwards. Runs with the machine's own python3 (torch + triton preinstalled,
# no network): nothing is downloaded.
#
#     OUT=out/gpu bash scripts/gpu_check.sh [--quick | --suite]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
MODE=${1:-}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD

stage() {  # stage NAME SECONDS COMMAND...: run, log, and record the exit status; go on either way
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/stages.txt"
  return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# The C++ extension (CPU fallback) is not needed for the GPU paths; build it if the compiler allows.
stage build 100 "$PY" setup.py build_ext --inplace
if [ "$MODE" = "--suite" ]; then
  stage bench_suite 450 "$PY" -m pytest -q -p no:cacheprovider benchmarks --full --benchmark-json="$OUT/bench_gpu.json"
  stage report 30 "$PY" benchmarks/report.py "$OUT/bench_gpu.json" --out "$OUT/report"
  cat "$OUT/report/summary.md" 2>/dev/null | head -n 80
  exit 0
fi
stage gpu_tests 180 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_triton_backend.py tests/test_ops.py tests/test_functional.py \
  tests/test_modules.py || { echo "GPU correctness failed: see $OUT/gpu_tests.log (no timings taken)"; tail -n 40 "$OUT/gpu_tests.log"; exit 1; }
stage gpu_kernels 270 "$PY" benchmarks/gpu_kernels.py $MODE --json "$OUT/gpu_kernels.json"
tail -n 60 "$OUT/gpu_kernels.log"
