#!/usr/bin/env bash
# Runs the doctest binary and ends with the plain summary line CI reads: "test: N passed, N failed".
set -uo pipefail
bin="$1"; shift
out=$(mktemp)
"$bin" "$@" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
line=$(grep -E '^\[doctest\] test cases:' "$out" | tail -1)
passed=$(echo "$line" | sed -E 's/.*\| *([0-9]+) passed.*/\1/')
failed=$(echo "$line" | sed -E 's/.*\| *([0-9]+) failed.*/\1/')
rm -f "$out"
if [ -z "$line" ]; then echo "test: 0 passed, 1 failed"; exit 1; fi
echo "test: ${passed} passed, ${failed} failed"
exit $rc
