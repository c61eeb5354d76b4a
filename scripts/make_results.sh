#!/usr/bin/env bash
# Generate docs/RESULTS.md (all evaluation tables) and docs/results/ (per-case and per-table CSVs, figures)
# from the trained model bundles, with one command:
#
#     scripts/make_results.sh
#
# Run it after scripts/build_demo_bundle.sh (the phantoms) and scripts/train_comparison_models.sh (the models).
# By default it evaluates the ten held-out test phantoms (runs/phantoms-test, generated with another seed than
# the training phantoms, never seen in training). Paths can be changed through the environment:
#
#   DATA               labelled data set to evaluate                        [runs/phantoms-test]
#   FULL               the full pipeline bundle (first column of Table 4)   [runs/full/bundle]
#   ABLATION_BASELINE  trained with --no-dense-skips --no-subpixel --no-attention  [runs/ablation-baseline/bundle]
#   ABLATION_DENSE     trained with --no-attention                          [runs/ablation-dense/bundle]
#   HDENSEUNET, E2NET, UNET3D  comparison-method bundles                    [runs/hdenseunet/bundle, ...]
#   DEMO               the shipped demo bundle, one more row of Table 4     [LiverTumorSeg/LiverTumorSegLib/models/LiverTumorSeg-demo]
#   SPLIT              evaluate only this split of the full bundle's manifest (e.g. test, when DATA is the data
#                      set it was trained on with --folds > 1); empty: every case of DATA   []
#   WORKERS            worker processes, one case each                      [number of CPUs]
#   BIN                folder with the livertumorseg-train command          [.venv/bin]
#
# A bundle folder that does not exist is reported as "not trained" in the tables: no number is invented.
# The output is deterministic for given bundles, data and split.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
DATA=${DATA:-runs/phantoms-test}
FULL=${FULL:-runs/full/bundle}
ABLATION_BASELINE=${ABLATION_BASELINE:-runs/ablation-baseline/bundle}
ABLATION_DENSE=${ABLATION_DENSE:-runs/ablation-dense/bundle}
HDENSEUNET=${HDENSEUNET:-runs/hdenseunet/bundle}
E2NET=${E2NET:-runs/e2net/bundle}
UNET3D=${UNET3D:-runs/unet3d/bundle}
SPLIT=${SPLIT:-}
DEMO=${DEMO:-LiverTumorSeg/LiverTumorSegLib/models/LiverTumorSeg-demo}
WORKERS=${WORKERS:-$(nproc)}

if [ ! -f "$FULL/manifest.json" ]; then
  echo "error: no full pipeline bundle at '$FULL'. Train and export it first, or set FULL=path/to/bundle." >&2
  exit 4
fi
if [ ! -d "$DATA" ]; then
  echo "error: data set '$DATA' not found. Run scripts/build_demo_bundle.sh first, or set DATA." >&2
  exit 2
fi

"$BIN/livertumorseg-train" evaluate \
  --bundle "proposed=$FULL" \
  --bundle "H-DenseUNet=$HDENSEUNET" \
  --bundle "E2Net=$E2NET" \
  --bundle "3D-U-Net=$UNET3D" \
  --bundle "shipped-demo=$DEMO" \
  --ablation-baseline "$ABLATION_BASELINE" \
  --ablation-dense "$ABLATION_DENSE" \
  --data "$DATA" \
  ${SPLIT:+--split "$SPLIT"} \
  --out docs/results \
  --results-md docs/RESULTS.md \
  --workers "$WORKERS" \
  --seed 0 \
  --overwrite
