#!/usr/bin/env bash
# The GPU check for a lent GPU machine: one call that cannot be wasted, then room for a second.
#   default (stage limits sum to 300 s): in this order, each stage whatever the one before gave,
#     1. selfcheck      the noise stream vs noise.py: Philox integers bit-exact, normals within the ulp
#                       bound, a 4096x4096 block's accuracy, forward vs backward chunk eps bit-equal;
#     2. timing         its own correctness gate, then fused vs LoRA vs naive fwd+bwd at the three
#                       target shapes (do_bench, a PASS/FAIL line each), normals/s, a profiler kernel
#                       table, the same under do_bench_cudagraph, the tuning flags both ways;
#     3. gpu_tests      the GPU-only pytest tests (no -x; per-test timeouts if pytest-timeout is there);
#     4. compile_tests  the torch.compile / opcheck / autocast ones, last (Inductor compiles are slow);
#     5. memory         16-layer peak memory vs LoRA and naive.
#   --suite: the pytest-benchmark suite in full mode (a separate call).
#   --dry-run (no GPU; before lending one): the default call's stages on CPU, the kernels in Triton's
#     interpreter, gpu_kernels.py at tiny shapes with stub timers (tests/test_gpu_script_dry_run.py),
#     so a Python error shows up here and not in device minutes. Its numbers mean nothing.
# Every stage runs unbuffered and is stopped at its limit by SIGINT (what it finished stays written),
# SIGKILL 10 s later. $OUT (default out/gpu) gets three files, each written as the stages go:
# report.md (tables, PASS/FAIL lines, one line per stage; printed at the end), results.jsonl (every
# number, one JSON object a line) and log.txt (every stage's full output). Runs with the machine's own
# python3 (torch + triton preinstalled, no network): nothing is downloaded or built.
#
#     OUT=out/gpu bash scripts/gpu_check.sh [--suite | --dry-run]
#     LIMIT_TIMING=200 bash scripts/gpu_check.sh     # any stage's limit, in seconds, for one call
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
MODE=${1:-}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT"
REPORT=$OUT/report.md
RESULTS=$OUT/results.jsonl
LOG=$OUT/log.txt
: >"$REPORT"
: >"$RESULTS"
: >"$LOG"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Stage limits in seconds (tests/test_gpu_script_dry_run.py checks they sum to <= 300). Estimates, none
# measured yet: the timing stage ~10 s of CUDA start and Triton compiles, three gated shapes, ~25
# timed closures of 0.3-0.5 s each, one profile, nine CUDA-graph captures, one flag pair (~60 s on an
# H100); the GPU tests ~35 tests, the real-size ones drawing up to 250 M normals on the CPU for their
# inputs (a few s each); the compile tests two Inductor compiles (10-20 s each on 16 cores).
LIMIT_SELFCHECK=${LIMIT_SELFCHECK:-25}
LIMIT_TIMING=${LIMIT_TIMING:-105}
LIMIT_GPU_TESTS=${LIMIT_GPU_TESTS:-85}
LIMIT_COMPILE_TESTS=${LIMIT_COMPILE_TESTS:-50}
LIMIT_MEMORY=${LIMIT_MEMORY:-35}
KILL_AFTER=10

KERNELS=("$PY" -u benchmarks/gpu_kernels.py --report "$REPORT" --jsonl "$RESULTS")
# The pytest stages' selection: every GPU-only real-size test, and the readiness tests
# (tests/test_gpu_script_dry_run.py checks that the two stages together collect each test skipped
# without CUDA, once); GPU_TEST_LAST picks the compile/opcheck/autocast tests for the last stage.
GPU_TEST_FILES=(tests/test_gpu_readiness.py tests/test_triton_backend.py tests/test_ops.py)
GPU_TEST_SELECTION="test_gpu_ or on_cuda or readiness"
GPU_TEST_LAST="compile or opcheck or autocast"
# pytest with Python's SIGINT handler set explicitly (so the limit's SIGINT ends it with its summary,
# however the process was started); per-test timeouts where pytest-timeout is installed.
PYTEST=("$PY" -u -c 'import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(pytest.main(sys.argv[1:]))'
        -q -rfE --tb=short -p no:cacheprovider)
TEST_TIMEOUT=() COMPILE_TEST_TIMEOUT=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then TEST_TIMEOUT=(--timeout=30) COMPILE_TEST_TIMEOUT=(--timeout=45); fi
if [ "$MODE" = "--dry-run" ]; then
  export TRITON_INTERPRET=1  # read when triton is imported: the kernels run on CPU tensors
  KERNELS=("$PY" -u -m tests.test_gpu_script_dry_run --report "$REPORT" --jsonl "$RESULTS")
fi

stage() {  # stage NAME LIMIT COMMAND...: run it under its limit, log it, record it; never stops the script
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== stage $name (limit $limit s): $*" >>"$LOG"
  timeout -s INT -k "$KILL_AFTER" "$limit" "$@" 2>&1 | tee "$WORK/$name.log" >>"$LOG"
  local rc=${PIPESTATUS[0]}
  local seconds=$((SECONDS - start)) how="rc=$rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && how="rc=$rc, stopped at its limit"
  if [ "${name%_tests}" != "$name" ]; then  # pytest: its failures and its count line
    grep -E '^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped|deselected|errors?)|no tests ran' "$WORK/$name.log" \
      | cut -c1-400 | sed 's/^/    /' >>"$REPORT"
  fi
  echo "- stage **$name**: $how in $seconds s (limit $limit s)" | tee -a "$REPORT"
  printf '{"stage": "%s", "rc": %d, "seconds": %d, "limit_s": %d}\n' "$name" "$rc" "$seconds" "$limit" >>"$RESULTS"
  return 0
}

{ if [ "$MODE" = "--dry-run" ]; then echo "# GPU check: dry run on CPU (interpreter, tiny shapes, stub timers; no number means anything)"
  else echo "# GPU check: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)"; fi
  echo
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" 2>&1
  echo
} | tee -a "$REPORT"

if [ "$MODE" = "--suite" ]; then  # separate, optional call: the pytest-benchmark suite (JSON; plots later with report.py)
  rm -f "$RESULTS"
  RESULTS=$WORK/stages.jsonl  # $OUT: report.md, log.txt and the suite's bench.json (benchmarks/report.py reads it)
  stage bench_suite 500 "$PY" -u -m pytest -q -p no:cacheprovider benchmarks --full --benchmark-json="$OUT/bench.json"
  stage report 30 "$PY" -u benchmarks/report.py "$OUT/bench.json" --out "$WORK/report"
  cat "$WORK/report/summary.md" >>"$REPORT" 2>/dev/null
  cat "$REPORT"
  exit 0
fi

stage selfcheck "$LIMIT_SELFCHECK" "${KERNELS[@]}" --selfcheck
stage timing "$LIMIT_TIMING" "${KERNELS[@]}" --timing
stage gpu_tests "$LIMIT_GPU_TESTS" "${PYTEST[@]}" "${TEST_TIMEOUT[@]}" "${GPU_TEST_FILES[@]}" \
  -k "($GPU_TEST_SELECTION) and not ($GPU_TEST_LAST)"
stage compile_tests "$LIMIT_COMPILE_TESTS" "${PYTEST[@]}" "${COMPILE_TEST_TIMEOUT[@]}" "${GPU_TEST_FILES[@]}" \
  -k "($GPU_TEST_SELECTION) and ($GPU_TEST_LAST)"
stage memory "$LIMIT_MEMORY" "${KERNELS[@]}" --memory
echo "Speed is unmeasured unless these tables came from this run on a lent GPU." >>"$REPORT"
echo
cat "$REPORT"
