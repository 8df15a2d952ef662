#!/usr/bin/env bash
# The learned-policy recipe (README, "Training learned policies"): a ViT trained from scratch on Fashion-MNIST, then
# A-ViT, SaiT, DynamicViT and AdaViT each fine-tuned from it with distillation, all with `tokenopt train`.
#
#   scripts/train_learned.sh OUT                 # writes OUT/base, OUT/avit, OUT/sait, OUT/dvit, OUT/adavit
#   python benchmarks/bench_learned.py --runs OUT   # then the table: accuracy, tokens, FLOPs, throughput
#
# The model and epochs come from the environment (defaults: the recipe measured in docs/RESULTS.md, Speed):
#   MODEL="--embed-dim 192 --heads 3 --mlp-ratio 4"   BASE_EPOCHS=12   FT_EPOCHS=8   ADAVIT_EPOCHS=4
#   PARALLEL=1   run the four fine-tunes at once (on a GPU, where one small run leaves it mostly idle);
#                default: one after another
#   EXTRA="..."  more `tokenopt train` arguments for every run (e.g. "--device cpu --train-images 512")
#   FT_EXTRA="..."  more arguments for the fine-tunes only (e.g. "--train-images 30000")
#   BASE=path/model.pt  fine-tune from this base model instead of training one (OUT/base is then not made)
#   PY=python    the interpreter
# On a 2-core CPU (no GPU; this took 38 min for the base + 50 min for the fine-tunes, far too short to hold
# accuracy: every fine-tune lost 3 points or more):
#   EXTRA="--precision bf16 --device cpu" BASE_EPOCHS=3 FT_EPOCHS=1 ADAVIT_EPOCHS=1 \
#     FT_EXTRA="--train-images 30000" scripts/train_learned.sh out/c192
set -euo pipefail
OUT=${1:?usage: scripts/train_learned.sh OUT}
PY=${PY:-python}
MODEL=${MODEL:---embed-dim 192 --heads 3 --mlp-ratio 4}
BASE_EPOCHS=${BASE_EPOCHS:-12}
FT_EPOCHS=${FT_EPOCHS:-8}
ADAVIT_EPOCHS=${ADAVIT_EPOCHS:-4}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
train() { "$PY" -m tokenopt.train $MODEL $EXTRA "$@"; }

start=$(date +%s)
if [ -z "${BASE:-}" ]; then
  echo "== base: $BASE_EPOCHS epochs from scratch"
  train --out "$OUT/base" --epochs "$BASE_EPOCHS" > "$OUT/base.log" 2>&1 || { tail -30 "$OUT/base.log"; exit 1; }
  tail -3 "$OUT/base.log"
  echo "== base done in $(( $(date +%s) - start )) s"
  BASE=$OUT/base/model.pt
fi

FT="--init $BASE --distill --lr 3e-4 --warmup-steps 50 ${FT_EXTRA:-}"
runs=(
  "avit   $FT_EPOCHS     --policy avit --set gamma=10.0 --set beta=1.0 --set ponder_weight=0.0003 --set prior_mean=2.5"
  "sait   $FT_EPOCHS     --policy sait --set density=0.65 --set train_density=0.65"
  "dvit   $FT_EPOCHS     --policy dynamicvit --policy-lr-scale 30"
  "adavit $ADAVIT_EPOCHS --policy adavit --policy-lr-scale 30"
)
pids=()
for spec in "${runs[@]}"; do
  read -r name epochs args <<< "$spec"
  echo "== $name: $epochs epochs ($args)"
  if [ "${PARALLEL:-0}" = 1 ]; then
    train --out "$OUT/$name" --epochs "$epochs" $FT $args > "$OUT/$name.log" 2>&1 &
    pids+=($!)
  else
    train --out "$OUT/$name" --epochs "$epochs" $FT $args > "$OUT/$name.log" 2>&1 || { tail -30 "$OUT/$name.log"; exit 1; }
  fi
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
for spec in "${runs[@]}"; do
  read -r name _ <<< "$spec"
  echo "-- $name:"; tail -2 "$OUT/$name.log"
done
echo "== all done in $(( $(date +%s) - start )) s"
exit $failed
