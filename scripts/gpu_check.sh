#!/usr/bin/env bash
# The GPU check for a lent GPU machine with a short budget, each call under 10 minutes:
#   call 1 (default, <= 480 s): noise-stream self-check, real-size GPU correctness tests, the timing
#           of the first target shape, the regeneration rate, strip GEMMs vs one batched GEMM, memory;
#           one summary table at the end;
#   call 2 (--suite): the pytest-benchmark suite in full mode and its plots;
#   --dry-run (no GPU; before lending one): call 1's stages on CPU, the kernels in Triton's interpreter,
#           gpu_kernels.py at tiny shapes with stub timers (tests/test_gpu_script_dry_run.py), so a
#           Python error shows up here and not in device minutes. Its numbers mean nothing.
# Every stage is bounded by a timeout and logged; correctness must pass before anything is timed.
# Writes logs, JSON and markdown tables under $OUT (default out/gpu); copy the tables into
# benchmarks/RESULTS.md afterwards. Runs with the machine's own python3 (torch + triton preinstalled,
# no network): nothing is downloaded.
#
#     OUT=out/gpu bash scripts/gpu_check.sh [--suite | --dry-run]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
MODE=${1:-}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD
KERNELS=("$PY" benchmarks/gpu_kernels.py)
# The pytest stage's selection: every GPU-only real-size test, and the readiness tests
# (tests/test_gpu_script_dry_run.py checks that this collects each test skipped without CUDA).
GPU_TEST_FILES=(tests/test_gpu_readiness.py tests/test_triton_backend.py tests/test_ops.py)
GPU_TEST_SELECTION="test_gpu_ or on_cuda or readiness"
if [ "$MODE" = "--dry-run" ]; then
  export TRITON_INTERPRET=1  # read when triton is imported: the kernels run on CPU tensors
  KERNELS=("$PY" -m tests.test_gpu_script_dry_run)
fi

stage() {  # stage NAME SECONDS COMMAND...: run, log, and record the exit status; go on either way
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/stages.txt"
  return $rc
}

{ if [ "$MODE" = "--dry-run" ]; then echo "dry run on CPU (interpreter, tiny shapes, stub timers)"
  else nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ "$MODE" = "--suite" ]; then  # separate, optional call: the pytest-benchmark suite and its plots
  stage build 100 "$PY" setup.py build_ext --inplace
  stage bench_suite 450 "$PY" -m pytest -q -p no:cacheprovider benchmarks --full --benchmark-json="$OUT/bench_gpu.json"
  stage report 30 "$PY" benchmarks/report.py "$OUT/bench_gpu.json" --out "$OUT/report"
  cat "$OUT/report/summary.md" 2>/dev/null | head -n 80
  exit 0
fi

# Default call: stage limits sum to 480 s (40 + 145 + 140 + 60 + 25 + 70), leaving time for one rerun in a
# 15-minute device budget. The C++ extension is not built: the GPU paths do not use it.
summary() {
  echo; echo "## Summary ($(head -n 1 "$OUT/machine.txt"))"; echo
  echo "| stage | result |"; echo "|---|---|"
  sed -e 's/^\([a-z_]*\): \(.*\)$/| \1 | \2 |/' "$OUT/stages.txt"
  echo
  for f in selfcheck gpu_kernels regen strips memory; do
    [ -f "$OUT/$f.log" ] && grep -E '^(###|\|)' "$OUT/$f.log"
  done
  echo "Speed is unmeasured unless these tables came from this run on a lent GPU."
}
: >"$OUT/stages.txt"
# 1. The noise stream first: a few Philox integers and normals vs noise.py. A mismatch stops everything.
stage selfcheck 40 "${KERNELS[@]}" --selfcheck || { summary; exit 1; }
# 2. Real-size correctness: only the GPU-only tests, stop at the first failure. 39 tests; about 39
# distinct Triton specialisations (counted from the launchers' calls with the GPU tiles; ~0.6 s each
# for sm_90 on a 2-core AMD EPYC, ptxas included) and two Inductor compiles (a guess: 15-30 s each),
# so ~90-115 s expected. A timeout (rc 124) is not a failure: the next stage has its own correctness
# gate, and the slow compile tests come last; any other failure stops here.
stage gpu_tests 145 "$PY" -m pytest -q -x -p no:cacheprovider "${GPU_TEST_FILES[@]}" -k "$GPU_TEST_SELECTION"
rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then summary; tail -n 40 "$OUT/gpu_tests.log"; exit 1; fi
# 3. Timings: the first target shape with its correctness gate, then the regeneration rate.
stage gpu_kernels 140 "${KERNELS[@]}" --quick --json "$OUT/gpu_kernels.json"
stage regen 60 "${KERNELS[@]}" --regen
# The streamed backward's four strip GEMMs vs one batched GEMM (triton_tuning.BATCHED_STRIP_GEMM).
stage strips 25 "${KERNELS[@]}" --strips
# 4. Memory of a 16-layer stack against LoRA's.
stage memory 70 "${KERNELS[@]}" --memory
summary
