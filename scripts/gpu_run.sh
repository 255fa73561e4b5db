#!/usr/bin/env bash
# On a GPU machine, with gpu-bundle/ from scripts/gpu_bundle.sh beside the repository: what
# `make test-gpu` and `make bench-gpu` run, without building anything (docs/gpu-testing.md).
# Logs go to $OUT (default gpu-out/): gpu.txt (nvidia-smi), test_gpu.log, bench_gpu.md.
#   bash scripts/gpu_run.sh            # tests, then benchmarks
#   PARTS=test bash scripts/gpu_run.sh # only the tests (PARTS=bench: only the benchmarks)
# TEST_ARGS are doctest filters for the tests (e.g. -tc='gpu ops*'); TEST_TIMEOUT and
# BENCH_TIMEOUT (seconds, 360 and 400) bound each part so that a hang still leaves its log;
# STEPS, DTYPES, CONFIGS go to scripts/bench_gpu.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
PARTS=${PARTS:-"test bench"}
mkdir -p "$OUT"
[ -x gpu-bundle/moe ] || { echo "gpu_run: gpu-bundle/ is missing: run scripts/gpu_bundle.sh where the build dependencies are"; exit 1; }
{ date -u; git log -1 --format='commit %h %s' 2>/dev/null; nvidia-smi 2>&1 | head -20; } > "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
rc=0
if [[ " $PARTS " == *" test "* ]]; then
  why=$(gpu-bundle/test_gpu --probe); prc=$?
  echo "test-gpu: $why (probe exit $prc)"
  if [ $prc -eq 0 ]; then
    # shellcheck disable=SC2086
    MOE_BIN=gpu-bundle/moe timeout "${TEST_TIMEOUT:-360}" bash tests/run.sh gpu-bundle/test_gpu ${TEST_ARGS:-} 2>&1 |
      tee "$OUT/test_gpu.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  else
    rc=1
  fi
fi
if [[ " $PARTS " == *" bench "* ]]; then
  MOE=gpu-bundle/moe BENCH_KERNELS=gpu-bundle/bench_kernels timeout "${BENCH_TIMEOUT:-400}" bash scripts/bench_gpu.sh 2>&1 |
    tee "$OUT/bench_gpu.md"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
fi
exit $rc
