#!/usr/bin/env bash
# Train and export every model that scripts/make_results.sh evaluates, at one equal budget (lite presets, CPU):
#
#   runs/ablation-baseline/bundle  cascade without dense skips, sub-pixel upsampling, attention   4 epochs
#   runs/ablation-dense/bundle     cascade without attention gates                                4 epochs
#   runs/full/bundle               the proposed cascade (4 epochs) + radiomics lesion classifier + boundary CNN
#   runs/unet3d|e2net|hdenseunet/bundle  the seed baselines, their published recipes, 10 minutes each
#
# Four epochs of the lite cascade take about 10 minutes on 2 cores, so every network gets about the same CPU
# time. All train on runs/phantoms-train with the same case split (8 validation cases, seed 0); the held-out
# phantoms runs/phantoms-test are never seen. About 90 minutes on 2 cores. Run from the repository root after
# the README's test set-up and scripts/build_demo_bundle.sh (which makes the phantoms). Steps whose bundle
# already exists are skipped, so an interrupted run can be continued.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RUNS=${RUNS:-runs}
DATA="$RUNS/phantoms-train"
CASCADE="--data $DATA --preset lite --folds 1 --validation-cases 8 --augment --batch-size 8 --seed 0 --epochs 4"

cascade() {  # name, flags...
  local name=$1; shift
  [ -f "$RUNS/$name/bundle/manifest.json" ] && return
  "$BIN/livertumorseg-train" train $CASCADE --out "$RUNS/$name" --resume "$@"
  "$BIN/livertumorseg-train" export --checkpoint "$RUNS/$name/best.pt" --out "$RUNS/$name/bundle" --overwrite --name "$name"
}
cascade ablation-baseline --no-dense-skips --no-subpixel --no-attention
cascade ablation-dense --no-attention
cascade full

if ! grep -q lesion_classifier "$RUNS/full/bundle/manifest.json"; then
  # twelve training cases (two of them for choosing τ); negatives include this cascade's false positives
  "$BIN/livertumorseg-train" lesion-classifier --data "$DATA" --bundle "$RUNS/full/bundle" --out "$RUNS/full/lesion-classifier" \
    --cases lits-0 lits-1 lits-2 lits-3 lits-6 lits-7 lits-8 lits-9 lits-11 lits-13 lits-14 lits-15 --threads 2
fi
if ! grep -q boundary_cnn "$RUNS/full/bundle/manifest.json"; then
  "$BIN/livertumorseg-train" boundary-cnn --data "$DATA" --bundle "$RUNS/full/bundle" --out "$RUNS/full/boundary-cnn"
fi

for model in unet3d e2net hdenseunet; do
  [ -f "$RUNS/$model/bundle/manifest.json" ] && continue
  "$BIN/livertumorseg-train" train --model "$model" --data "$DATA" --out "$RUNS/$model" --preset lite --folds 1 \
    --validation-cases 8 --augment --time-limit-minutes 10 --seed 0
  "$BIN/livertumorseg-train" export --checkpoint "$RUNS/$model/best.pt" --out "$RUNS/$model/bundle" --overwrite --name "$model-lite"
done
