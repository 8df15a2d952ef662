#!/usr/bin/env bash
# The learned-policies table (docs/RESULTS.md), from nothing: the dim-192 Fashion-MNIST ViT, each learned
# policy fine-tuned from it in stages (distilling from the base), then one run of benchmarks/bench_learned.py
# over all of them.
#
#   scripts/learned_table.sh OUT              # every stage not yet done, in order, then the table
#   ONLY="dvA saA" scripts/learned_table.sh OUT   # just these stages (their inputs must be done)
#   TABLE=0 scripts/learned_table.sh OUT      # the stages only
#
# Resumable: a stage that finished has OUT/<stage>/.done and is skipped; one that stopped part-way
# (a run cut off part-way) continues from its last epoch's checkpoint (`tokenopt train --resume`). Each stage's
# output goes to OUT/<stage>.log (a line every 10% of an epoch: the mean losses so far), its time to
# OUT/times.txt.
# OUT=runs/c192 keeps the chain in the repository: what a finished stage leaves (model.pt, policy.pt,
# log.json, .done; about 11 MB) is committed, checkpoint.pt is not (.gitignore), so a later run on a fresh
# checkout goes on from the last finished stage (on this CPU the chain takes many hours, longer than a
# machine that keeps nothing outside git may be held).
#   DEVICE="--precision bf16 --device cpu"   (default; on a GPU: DEVICE="--device cuda")
#   PY=python
# Stages (epochs on the 60k training images; about 10 min an epoch for the base and 20-25 min for a
# fine-tune on the 2-core CPU alone, about 1.5x that with two one-thread stages side by side; seconds on
# a GPU):
#   base  3 epochs from scratch
#   dvA   DynamicViT rho 0.5 after blocks 2 and 3 (98 then 49 of the 196 patches), keep-ratio weight
#         20000, the CLS-attention ranking loss at 20000 (attention_weight), both kept out of the backbone
#         (detach_predictors), 1 epoch, lr 1e-4, predictors
#         at 10x                                                         (from base)
#   dvB   the same, 1 epoch, lr 5e-5                                     (from dvA, its predictors)
#         (the operating point: on this base, pruning by CLS attention at DynamicViT's counts and places,
#         untrained, costs 8.1 points at the default blocks (1, 2, 3) with rho 0.75, FLOPs 0.72, and 1.6
#         points after (2, 3) with rho 0.5, FLOPs 0.68: benchmarks/probe_operating_points.py;
#         docs/RESULTS.md, Learned policies)
#         (the ratio weight: at the authors' 2, and at 20, training kept 72/61% of the patches against
#         inference's 50/25%; the task's gradient on the predictors is 3e3 to 1e6 times the ratio loss's at
#         weight 1, almost all of it from 1% of the tokens: benchmarks/probe_dynamicvit_gradients.py;
#         docs/RESULTS.md, Learned policies; the ratio weight alone, 20000, kept 50/25% in training and
#         scored 78.92%: the predictors ranked worse than CLS attention does untrained, hence the ranking
#         loss; with it and detach_predictors dvA scored 82.55%)
#   saA   SaiT, one pruning point after block 2, sparse steps at densities drawn from (0.93, 0.995),
#         2 epochs, lr 1e-4                                             (from base)
#   avA   A-ViT, 2 epochs, lr 1.5e-4, ponder weight 3e-4                 (from base)
#   avB   A-ViT, 2 epochs, lr 7e-5, ponder weight 5e-4 (fewer tokens than avA's 149 a block)   (from avA)
#   adA   AdaViT, usage targets heads 0.9 / sub-layers 0.95 / tokens 0.8, 1 epoch, lr 1e-4, gates at 30x,
#         gates as trained (no calibration: adB starts from them)        (from dvB's backbone: one already
#         used to running without tokens: an AdaViT fine-tuned from the base itself lost 2.1 points with
#         no gating at all, so its loss was in the backbone)
#   adB   AdaViT, targets 0.85 / 0.95 / 0.75, gates as trained, 1 epoch, lr 5e-5   (from adA, its gates)
#   adC   AdaViT, targets 0.8 / 0.95 / 0.65, gates as trained, 1 epoch, lr 5e-5    (from adB, its gates: every
#         inference threshold that took adB to FLOPs 0.76 or less cost it 1 point or more;
#         docs/RESULTS.md, Learned policies)
# The settings are the ones earlier, longer chains of runs arrived at.
set -euo pipefail
OUT=${1:?usage: scripts/learned_table.sh OUT}
PY=${PY:-python}
DEVICE=${DEVICE:---precision bf16 --device cpu}
MODEL="--embed-dim 192 --heads 3 --mlp-ratio 4"
mkdir -p "$OUT"
T=$OUT/base/model.pt
FT="--distill --teacher $T --warmup-steps 30"
stages=(
  "base  --epochs 3"
  "dvA   --epochs 1 --init $T $FT --policy dynamicvit --set rho=0.5 --set blocks=(2,3) --set ratio_weight=20000 --set attention_weight=20000 --set detach_predictors=True --lr 1e-4 --policy-lr-scale 10"
  "dvB   --epochs 1 --init $OUT/dvA/model.pt --init-policy $OUT/dvA/policy.pt $FT --policy dynamicvit --set rho=0.5 --set blocks=(2,3) --set ratio_weight=20000 --set attention_weight=20000 --set detach_predictors=True --lr 5e-5 --policy-lr-scale 10"
  "saA   --epochs 2 --init $T $FT --policy sait --set density=0.97 --set train_density=(0.93,0.995) --set blocks=(2,) --lr 1e-4"
  "avA   --epochs 2 --init $T $FT --policy avit --set gamma=10 --set beta=1 --set prior_mean=2.5 --set ponder_weight=0.0003 --lr 1.5e-4"
  "avB   --epochs 2 --init $OUT/avA/model.pt $FT --policy avit --set gamma=10 --set beta=1 --set prior_mean=2.5 --set ponder_weight=0.0005 --lr 7e-5"
  "adA   --epochs 1 --init $OUT/dvB/model.pt $FT --policy adavit --set head_target=0.9 --set layer_target=0.95 --set token_target=0.8 --set calibrate=False --lr 1e-4 --policy-lr-scale 30"
  "adB   --epochs 1 --init $OUT/adA/model.pt --init-policy $OUT/adA/policy.pt $FT --policy adavit --set head_target=0.85 --set layer_target=0.95 --set token_target=0.75 --set calibrate=False --lr 5e-5 --policy-lr-scale 30"
  "adC   --epochs 1 --init $OUT/adB/model.pt --init-policy $OUT/adB/policy.pt $FT --policy adavit --set head_target=0.8 --set layer_target=0.95 --set token_target=0.65 --set calibrate=False --lr 5e-5 --policy-lr-scale 30"
)
for spec in "${stages[@]}"; do
  read -r name args <<< "$spec"
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
  if [ -e "$OUT/$name/.done" ]; then echo "== $name: done"; continue; fi
  resume=""
  if [ -e "$OUT/$name/checkpoint.pt" ]; then resume="--resume"; fi
  echo "== $name ${resume:+(resumed) }$(date +%H:%M:%S): $args"
  start=$(date +%s)
  # shellcheck disable=SC2086  # (the arguments are words)
  "$PY" -m tokenopt.train --out "$OUT/$name" $MODEL $DEVICE $resume $args >> "$OUT/$name.log" 2>&1 \
    || { tail -30 "$OUT/$name.log"; exit 1; }
  took=$(( $(date +%s) - start ))
  touch "$OUT/$name/.done"
  echo "$name ${resume:+(resumed) }$took s" >> "$OUT/times.txt"
  "$PY" - "$OUT/$name/log.json" "$took" <<'EOF'
import json, sys
log = json.load(open(sys.argv[1]))["epochs"]
print("   ", ", ".join(f"{e['test_accuracy']:.2%}" for e in log), f"test accuracy after each epoch; {sys.argv[2]} s")
EOF
done
if [ "${TABLE:-1}" = 1 ] && [ -z "${ONLY:-}" ]; then
  echo "== table $(date +%H:%M:%S)"
  "$PY" "$(dirname "$0")/../benchmarks/bench_learned.py" --base "$OUT/base" --avit "$OUT/avB" --adavit "$OUT/adC" \
    --sait "$OUT/saA" --sait-densities 0.97,0.9 --dynamicvit "$OUT/dvB" --rounds 21 --json "$OUT/table.json"
fi
