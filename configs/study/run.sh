#!/usr/bin/env bash
# The balancing study (`make study`): trains configs/study/base.yaml once per balancing variant,
# evaluates each checkpoint with `moe eval --json --svg`, and writes docs/study.md (table) and
# docs/study/<variant>.svg (heat-maps). Every number in docs/study.md comes from this script.
set -euo pipefail
cd "$(dirname "$0")/../.."
MOE=${MOE:-build/moe}
STEPS=${STEPS:-400}
OUT=runs/study
mkdir -p "$OUT" docs/study
[ -f data/synth/train_000.bin ] || "$MOE" data synth --out data/synth

# name | overrides (the variant's only change from the base)
variants=(
  "none|"
  "aux|--set balance.aux_loss=0.01"
  "aux+z|--set balance.aux_loss=0.01 --set balance.z_loss=0.001"
  "capacity 1.0|--set balance.aux_loss=0.01 --set router.capacity_factor=1.0 --set router.eval_capacity_factor=1.0"
  "capacity 1.25|--set balance.aux_loss=0.01 --set router.capacity_factor=1.25 --set router.eval_capacity_factor=1.25"
  "noisy top-k|--set router.noise=gaussian --set balance.importance_loss=0.1 --set balance.load_loss=0.1"
  "aux-free bias|--set balance.bias_rate=0.001"
  "expert choice|--set router.type=expert_choice --set router.expert_choice_capacity=2.0"
  "hash|--set router.type=hash --set model.moe.top_k=1 --set router.hash=balanced"
  "sequence aux|--set balance.aux_loss=0.01 --set balance.aux_scope=sequence"
  "global aux|--set balance.aux_loss=0.01 --set balance.aux_scope=global --set train.batch_size=4 --set train.grad_accum=2"
)

results=()
for v in "${variants[@]}"; do
  name=${v%%|*}; sets=${v#*|}
  slug=$(echo "$name" | tr ' +.' '___' | tr -cd 'a-z0-9_-')
  echo "== $name: moe train configs/study/base.yaml $sets"
  # shellcheck disable=SC2086
  "$MOE" train configs/study/base.yaml --set train.steps="$STEPS" --set train.out_dir="$OUT/$slug" $sets \
    | grep -E "^(step +[0-9]+/[0-9]+ \| loss|done)" | awk 'NR % 50 == 0 || /done/'
  "$MOE" eval --ckpt "$OUT/$slug" --json --svg "docs/study/$slug.svg" > "$OUT/$slug/eval.json"
  results+=("$name|$slug")
done

python3 - "$OUT" "$STEPS" "${results[@]}" > docs/study.md <<'PY'
import json, sys, datetime, platform, os
out, steps, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
print("# Balancing study\n")
print(f"Made by `make study` (configs/study/run.sh) on {datetime.date.today()}, {os.cpu_count()} CPU cores, "
      f"{steps} steps per run of configs/study/base.yaml (4 layers, 8 experts, top-2, batch 8 x 256) on the "
      "synthetic corpus; eval over 16 val batches (32,768 tokens). Each row changes one thing from the base.\n")
print("MaxVio, dead experts and specialisation are per MoE layer (mean, sum, mean over the 4 layers). Drop rate "
      "is measured at the eval capacity (the training capacity for the capacity runs, dropless otherwise). "
      "Specialisation is the mutual information between a token's domain and its expert, normalised to [0, 1]. "
      "Expert choice reads the whole batch, so its loss is not causal and not comparable.\n")
print("| variant | val loss | MaxVio | dead experts | drop rate | specialisation | heat-map |")
print("|---|---|---|---|---|---|---|")
for r in runs:
    name, slug = r.split("|")
    j = json.load(open(f"{out}/{slug}/eval.json"))
    L = j["layers"]
    mv = sum(l["maxvio"] for l in L) / len(L)
    dead = sum(l["dead"] for l in L)
    drop = sum(l["drop_rate"] for l in L) / len(L)
    spec = sum(l.get("specialisation", 0) for l in L) / len(L)
    flag = "" if j.get("causal", True) else " (not causal)"
    print(f"| {name}{flag} | {j['loss']:.4f} | {mv:.2f} | {dead} | {100*drop:.1f}% | {spec:.3f} | [svg](study/{slug}.svg) |")
PY
echo "wrote docs/study.md"
