#!/usr/bin/env bash
# `make bench-gpu` (docs/gpu-testing.md): on one GPU, full training steps (forward, backward, AdamW)
# of the GPU benchmark configs with `moe bench --device cuda`, fp32 and bf16, beside the PyTorch
# reference model (tests/reference/bench.py --device cuda) in eager mode and under torch.compile:
# tokens/s, MFU (model FLOPs per token from `moe bench`, the same model on both sides, over the
# GPU's peak dense TFLOPS for the dtype) and the ratios; then the kernel micro-benchmark
# (build/bench_kernels: grouped expert GEMM vs cuBLAS, dispatch/combine vs cudaMemcpy). Prints
# markdown, ending with the date, GPU, commit and command; BENCH_OUT=FILE appends it there too.
# Without a GPU: one line "bench-gpu: skipped (...)", exit 0. Without a PyTorch that has CUDA:
# one line saying so, and our side still runs.
#
# Environment: STEPS (20), WARMUP (3), CONFIGS (the two configs/bench/gpu_*.yaml), DTYPES
# ("fp32 bf16"), PYTHON (tried first for torch, then /usr/bin/python3 and python3), TIMEOUT
# (seconds per run, 1800), PEAK_FP32_TFLOPS / PEAK_BF16_TFLOPS (default: what `moe bench`
# reports from src/plan.cpp's GPU table), KERNEL_ITERS (20).
set -uo pipefail
cd "$(dirname "$0")/.."
MOE=${MOE:-build/moe}
BK=${BENCH_KERNELS:-build/bench_kernels}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-3}
CONFIGS=${CONFIGS:-"configs/bench/gpu_gpt2s_8e.yaml configs/bench/gpu_fine_64e.yaml"}
DTYPES=${DTYPES:-"fp32 bf16"}
TIMEOUT=${TIMEOUT:-1800}
KERNEL_ITERS=${KERNEL_ITERS:-20}
CMDLINE="make bench-gpu STEPS=$STEPS WARMUP=$WARMUP"

gpu=$("$BK" --probe 2>&1)
rc=$?
if [ $rc -eq 3 ]; then echo "bench-gpu: skipped ($gpu)"; exit 0; fi
if [ $rc -ne 0 ]; then echo "bench-gpu: $BK --probe failed (exit $rc): $gpu"; exit 1; fi

# A Python for JSON (any), and one whose torch has CUDA (or none).
JPY=""
for p in ${PYTHON:-} /usr/bin/python3 python3; do
  if command -v "$p" >/dev/null 2>&1; then JPY=$p; break; fi
done
[ -n "$JPY" ] || { echo "bench-gpu: no python3 found (needed to read JSON)"; exit 1; }
TPY=""
tried=""
for p in ${PYTHON:-} /usr/bin/python3 python3; do
  command -v "$p" >/dev/null 2>&1 || continue
  tried="$tried $p"
  if "$p" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then TPY=$p; break; fi
done
if [ -n "$TPY" ]; then
  torch_line="torch $("$TPY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)') ($TPY)"
else
  torch_line="torch: no PyTorch with CUDA importable (tried:$tried); the PyTorch columns are n/a, our side runs"
fi

# peak dense TFLOPS per dtype: what `moe bench` reports (src/plan.cpp's GPU table), unless set here
pf=${PEAK_FP32_TFLOPS:-}
pb=${PEAK_BF16_TFLOPS:-}

# field JSON KEY: a key of the JSON object on the last line of a command's output ("" if none)
field() { "$JPY" -c 'import json,sys
try:
    print(json.loads(sys.argv[1].strip().splitlines()[-1])[sys.argv[2]])
except Exception:
    print("")' "$1" "$2"; }
# calc EXPR FORMAT SUFFIX: the value formatted, or n/a when an operand is missing
calc() { "$JPY" -c 'import sys
try:
    print(format(eval(sys.argv[1]), sys.argv[2]) + sys.argv[3])
except Exception:
    print("n/a")' "$1" "$2" "${3:-}"; }

out=$(mktemp)
emit() { echo "$@" | tee -a "$out"; }

emit "## bench-gpu"
emit ""
emit "GPU: $gpu | $torch_line"
emit ""
emit "Full training steps (forward, backward, AdamW), median of $STEPS after $WARMUP warm-up; tok/s and MFU (model FLOPs / peak of the dtype)."
emit ""
emit "| config | dtype | ours tok/s | ours MFU | torch eager tok/s | eager MFU | torch.compile tok/s | compile MFU | ours / eager | ours / compile | ours GPU MB | torch GPU MB |"
emit "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
notes=()
peaks=()
for cfg in $CONFIGS; do
  for dt in $DTYPES; do
    peak=$pf; [ "$dt" = bf16 ] && peak=$pb
    o=$(timeout "$TIMEOUT" "$MOE" bench "$cfg" --device cuda --dtype "$dt" --steps "$STEPS" --warmup "$WARMUP" --json 2>&1)
    if [ $? -ne 0 ]; then notes+=("ours, $cfg $dt: $(echo "$o" | tail -1)"); o=""; fi
    tps=$(field "$o" tokens_per_s); fpt=$(field "$o" flops_per_token); gmb=$(field "$o" gpu_mb)
    [ -z "$peak" ] && peak=$(field "$o" peak_tflops)
    [ "$peak" = "0" ] || [ "$peak" = "0.0" ] && peak=""
    [ -n "$peak" ] && peaks+=("$dt $peak")
    e_tps=""; c_tps=""; e_mb=""
    if [ -n "$TPY" ]; then
      bf=""; [ "$dt" = bf16 ] && bf="--bf16"
      e=$(timeout "$TIMEOUT" "$TPY" tests/reference/bench.py "$cfg" --device cuda $bf --steps "$STEPS" --warmup "$WARMUP" 2>&1)
      if [ $? -eq 0 ]; then e_tps=$(field "$e" tokens_per_s); e_mb=$(field "$e" gpu_peak_mb)
      else notes+=("torch eager, $cfg $dt: $(echo "$e" | tail -1)"); fi
      # compile time goes into the warm-up steps
      c=$(timeout "$TIMEOUT" "$TPY" tests/reference/bench.py "$cfg" --device cuda $bf --compile --steps "$STEPS" --warmup $((WARMUP + 3)) 2>&1)
      if [ $? -eq 0 ]; then c_tps=$(field "$c" tokens_per_s)
      else notes+=("torch.compile, $cfg $dt: $(echo "$c" | tail -1)"); fi
    fi
    mfu() { calc "$1 * $fpt / 1e12 / $peak * 100" .1f %; }
    num() { calc "$1" .0f; }
    ratio() { calc "$1 / $2" .2f x; }
    emit "| $(basename "$cfg" .yaml) | $dt | $(num "$tps") | $(mfu "$tps") | $(num "$e_tps") | $(mfu "$e_tps") | $(num "$c_tps") | $(mfu "$c_tps") | $(ratio "$tps" "$e_tps") | $(ratio "$tps" "$c_tps") | $(num "$gmb") | $(num "$e_mb") |"
  done
done
emit ""
emit "Peak dense TFLOPS used for MFU: $(printf '%s\n' "${peaks[@]:-none known (set PEAK_FP32_TFLOPS / PEAK_BF16_TFLOPS)}" | sort -u | tr '\n' ';' | sed 's/;$//; s/;/; /g')"
if [ ${#notes[@]} -gt 0 ]; then
  emit ""
  for n in "${notes[@]}"; do emit "- failed: $n"; done
fi

for dt in $DTYPES; do
  emit ""
  k=$("$BK" --dtype "$dt" --iters "$KERNEL_ITERS" 2>&1)
  echo "$k" | tee -a "$out"
done

emit ""
emit "_$(date -u '+%Y-%m-%d %H:%M UTC') | $gpu | commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown) | \`$CMDLINE\`_"
if [ -n "${BENCH_OUT:-}" ]; then cat "$out" >> "$BENCH_OUT"; echo "appended to $BENCH_OUT"; fi
rm -f "$out"
