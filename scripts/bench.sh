#!/usr/bin/env bash
# `make bench`: our trainer and the PyTorch reference model (tests/reference) on the same configs,
# batch and thread count, full training steps, in one run; prints the ratio. PyTorch is timed with
# 1 thread and with all threads and its best is used. Then expert scaling at fixed active compute.
set -euo pipefail
cd "$(dirname "$0")/.."
MOE=${MOE:-build/moe}
PY=${PYTHON:-/usr/bin/python3}
STEPS=${STEPS:-10}
NT=$(nproc)
field() { "$PY" -c "import json,sys; print(json.loads(sys.argv[1])['$2'])" "$1"; }

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $NT cores | torch $("$PY" -c 'import torch; print(torch.__version__, torch.__config__.parallel_info().splitlines()[0])' 2>/dev/null)"
printf "%-28s %12s %12s %12s %8s %10s %10s\n" config "ours tok/s" "torch 1T" "torch ${NT}T" ratio "ours MB" "torch MB"
for cfg in configs/quickstart.yaml configs/bench/cpu_large.yaml; do
  ours=$("$MOE" bench "$cfg" --steps "$STEPS" --threads "$NT" --json)
  t1=$("$PY" tests/reference/bench.py "$cfg" --steps "$STEPS" --threads 1)
  tn=$("$PY" tests/reference/bench.py "$cfg" --steps "$STEPS" --threads "$NT")
  o=$(field "$ours" tokens_per_s); a=$(field "$t1" tokens_per_s); b=$(field "$tn" tokens_per_s)
  best=$("$PY" -c "print(max($a, $b))"); bestmb=$("$PY" -c "print($(field "$t1" peak_mb) if $a >= $b else $(field "$tn" peak_mb))")
  printf "%-28s %12.0f %12.0f %12.0f %7.2fx %10.0f %10.0f\n" "$cfg" "$o" "$a" "$b" "$("$PY" -c "print($o / $best)")" \
    "$(field "$ours" peak_mb)" "$bestmb"
done

echo
echo "expert scaling (quickstart model, top_k 2 x expert_ff 256 fixed, ours, $NT threads):"
base=""
for E in 8 16 32 64; do
  r=$("$MOE" bench configs/quickstart.yaml --steps "$STEPS" --threads "$NT" --json --set model.moe.experts=$E)
  tps=$(field "$r" tokens_per_s)
  [ -z "$base" ] && base=$tps
  printf "  %3d experts: %8.0f tok/s  (%.2f of 8 experts)\n" "$E" "$tps" "$("$PY" -c "print($tps / $base)")"
done
