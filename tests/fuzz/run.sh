#!/usr/bin/env bash
# Runs libFuzzer targets built by `make fuzz` (see docs/hardening.md "Fuzzing"):
#   FUZZ_BUILD=build-fuzz FUZZ_SECONDS=60 bash tests/fuzz/run.sh safetensors shard config set llmc
# Each target starts from its committed seeds (tests/fuzz/corpus/<target>/, read only) plus what
# earlier runs found (build-fuzz/corpus/<target>/, where new inputs go), under the limits of the
# invariant: no crash, no leak, no input slower than 10 s, no allocation over 1 GB, RSS under 2 GB.
# A failing input lands in build-fuzz/crashes/<target>-crash-<sha1>; reproduce with
#   build-fuzz/fuzz_<target> build-fuzz/crashes/<target>-crash-<sha1>
# Prints one line per target ("fuzz: <target>: N runs in S s, ...") and exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
build=${FUZZ_BUILD:-build-fuzz}
secs=${FUZZ_SECONDS:-60}
mkdir -p "$build/crashes" "$build/logs"
summary=()
status=0
for t in "$@"; do
  bin="$build/fuzz_$t"
  [ -x "$bin" ] || { echo "fuzz: $t: $bin is not built (make fuzz builds it)"; status=1; continue; }
  mkdir -p "$build/corpus/$t"
  dict=()
  case "$t" in
    safetensors|llmc) dict=(-dict=tests/fuzz/safetensors.dict) ;;
    config|set) dict=(-dict=tests/fuzz/config.dict) ;;
  esac
  log="$build/logs/$t.log"
  "$bin" "$build/corpus/$t" "tests/fuzz/corpus/$t" "${dict[@]}" \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 -max_len=16384 \
    -print_final_stats=1 -artifact_prefix="$build/crashes/$t-" >"$log" 2>&1
  rc=$?
  runs=$(grep -oE 'stat::number_of_executed_units: [0-9]+' "$log" | awk '{print $2}' | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | awk '{print $2}')
  corpus=$(ls "$build/corpus/$t" | wc -l)
  if [ $rc -eq 0 ]; then
    line="fuzz: $t: ${runs:-?} runs in ${secs} s, ${cov:-?} coverage edges, ${corpus} inputs in $build/corpus/$t, no crash"
  else
    status=1
    crash=$(grep -oE "Test unit written to [^ ]+" "$log" | tail -1 | sed 's/Test unit written to //')
    line="fuzz: $t: FAILED after ${runs:-?} runs (exit $rc): ${crash:-see $log}"
    echo "---- $log (last 60 lines)"
    tail -60 "$log"
  fi
  echo "$line"
  summary+=("$line")
done
echo "---- fuzz summary"
printf '%s\n' "${summary[@]}" | tee "$build/summary.txt"
exit $status
