#!/usr/bin/env bash
# NCCL smoke test of the GPU trainer (docs/nccl.md), for `make test-gpu`. Usage:
#   tests/gpu/nccl_smoke.sh [path/to/moe]        (default build/moe)
# 1. One rank: `mpirun -np 1 moe train ... --device cuda` with MOE_FORCE_EXCHANGE=1 makes the NCCL
#    communicators (world, EP, DP), sends the MoE rows through grouped ncclSend/ncclRecv (a
#    self-exchange) and sums the gradients with ncclAllReduce. A one-rank all-reduce and a
#    self-send change no value, so its losses must equal a plain one-process CUDA run's.
# 2. With 2 or more GPUs: 2 ranks x EP 2 against one process with grad_accum 2 (the same global
#    batch), within a relative 1e-4: NCCL's reduction order is not the one process's.
# Prints "nccl-smoke: skipped (why)" and exits 0 where it cannot run (no mpirun, a build without
# NCCL, no GPU); exits 1 on a failure, after printing the failing run's output.
set -uo pipefail
MOE=${1:-build/moe}
say() { echo "nccl-smoke: $*"; }

command -v mpirun >/dev/null || { say "skipped (mpirun not found)"; exit 0; }
[ -x "$MOE" ] || { say "FAILED: $MOE not built"; exit 1; }
ldd "$MOE" | grep -q libnccl || { say "skipped ($MOE is built without NCCL: no nccl.h at build time)"; exit 0; }
gpus=$("$MOE" --version | sed -nE 's/.*\| ([0-9]+) GPU\(s\) visible.*/\1/p')
[ "${gpus:-0}" -ge 1 ] || { say "skipped (no GPU visible)"; exit 0; }

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$MOE" data synth --out "$tmp/data" --tokens 200k >/dev/null || { say "FAILED: moe data synth"; exit 1; }
cat >"$tmp/c.yaml" <<EOF
model: {vocab_size: 256, seq_len: 32, n_layer: 2, n_head: 2, d_model: 32, d_ff: 64,
        moe: {experts: 4, top_k: 2, expert_ff: 32}}
train: {batch_size: 2, steps: 8, warmup: 2, eval_every: 0, eval_batches: 2, ckpt_every: 0, device: cuda}
data: {train: $tmp/data/train_*.bin, val: $tmp/data/val_*.bin}
EOF
mpirun_() { timeout 300 mpirun --oversubscribe -x MOE_FORCE_EXCHANGE "$@"; }
losses() { grep -oE 'step +[0-9]+/[0-9]+ \| loss [0-9.]+' "$1" | awk '{print $NF}'; }
run() {  # run NAME CMD...: output to $tmp/NAME.log, fails the script on a non-zero exit
    local name=$1; shift
    "$@" >"$tmp/$name.log" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then cat "$tmp/$name.log"; say "FAILED: $name exited $rc: $*"; exit 1; fi
}
# compare A B TOL: same number of losses, each within TOL relative
compare() {
    paste <(losses "$tmp/$1.log") <(losses "$tmp/$2.log") | awk -v tol="$3" -v n=8 '
        { c++; d = $1 - $2; if (d < 0) d = -d; if (d > tol * $2) { bad = 1; print "  step " c ": " $1 " vs " $2 } }
        END { if (c != n || bad) { if (c != n) print "  " c " loss lines, expected " n; exit 1 } }'
}

base=("$MOE" train "$tmp/c.yaml")
MOE_FORCE_EXCHANGE=0 run plain "${base[@]}" --set train.out_dir="$tmp/plain"
MOE_FORCE_EXCHANGE=1 run one mpirun_ -np 1 "${base[@]}" --set train.out_dir="$tmp/one"
grep -q '^nccl: NCCL' "$tmp/one.log" || { cat "$tmp/one.log"; say "FAILED: the one-rank run made no NCCL communicators"; exit 1; }
compare plain one 1e-6 || { say "FAILED: one rank over NCCL differs from one plain process"; exit 1; }
say "1 rank over NCCL (self-exchange + all-reduce) == one process: ok"

if [ "$gpus" -ge 2 ]; then
    MOE_FORCE_EXCHANGE=0 run accum "${base[@]}" --set train.grad_accum=2 --set train.out_dir="$tmp/accum"
    MOE_FORCE_EXCHANGE=0 run two mpirun_ -np 2 "${base[@]}" --set dist.expert_parallel=2 --set train.out_dir="$tmp/two"
    grep -q 'over NCCL' "$tmp/two.log" || { cat "$tmp/two.log"; say "FAILED: the 2-rank run is not over NCCL"; exit 1; }
    compare accum two 1e-4 || { say "FAILED: 2 ranks x EP 2 over NCCL differ from one process with grad_accum 2"; exit 1; }
    say "2 ranks x EP 2 over NCCL == one process with grad_accum 2 (rel 1e-4): ok"
else
    say "1 GPU: the 2-rank expert-parallel check needs 2 GPUs (not run)"
fi
say "passed"
