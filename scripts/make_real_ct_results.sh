#!/usr/bin/env bash
# The shipped model on real CT and on fresh phantoms, with one command:
#
#     scripts/make_real_ct_results.sh
#
# Real CT: the two real 8-bit scans held out of training (mahler06, mahler07: never trained on, never used to
# choose a checkpoint) and the one real HU CT with manual labels (3D-IRCADb-01 patient 1, never trained on).
# Fresh phantoms: six full-size phantoms from a seed no training run uses (9000).
# Writes docs/results-real/ and docs/results-phantoms/ (RESULTS.md, per-case and per-lesion CSVs, figures).
#
#   BUNDLE     the bundle to measure                          [LiverTumorSeg/LiverTumorSegLib/models/LiverTumorSeg-demo]
#   PREVIOUS   an earlier bundle for comparison (optional; a path that does not exist is "not trained")   []
#   SHARED     the project's shared data folder                [../shared]
#   BIN        folder with the livertumorseg commands          [.venv/bin]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SHARED=${SHARED:-../shared}
RUNS=${RUNS:-runs}
BUNDLE=${BUNDLE:-LiverTumorSeg/LiverTumorSegLib/models/LiverTumorSeg-demo}
PREVIOUS=${PREVIOUS:-}
COMPARE=()
[ -n "$PREVIOUS" ] && COMPARE=(--bundle "previous=$PREVIOUS")

"$BIN/livertumorseg-train" evaluate --bundle "shipped=$BUNDLE" "${COMPARE[@]}" \
  --data "$SHARED/data/real-train" "$SHARED/data/label-bank/ircad" --cases mahler06 mahler07 ircad01 \
  --out docs/results-real --no-ablation --no-robustness --workers 2 --overwrite --no-progress

if [ ! -f "$RUNS/phantoms-fresh/segmentation-5.nii.gz" ]; then
  "$BIN/livertumorseg" phantom --out "$RUNS/phantoms-fresh" --count 6 --size full --seed 9000 --overwrite
fi
"$BIN/livertumorseg-train" evaluate --bundle "shipped=$BUNDLE" "${COMPARE[@]}" \
  --data "$RUNS/phantoms-fresh" --out docs/results-phantoms --no-ablation --no-robustness --workers 2 \
  --overwrite --no-progress
