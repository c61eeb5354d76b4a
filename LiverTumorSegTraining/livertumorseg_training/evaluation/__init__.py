"""``livertumorseg-train evaluate``: the paper's evaluation tables from one command.

Runs the **engine** (:func:`LiverTumorSegLib.pipeline.segment`, ONNX Runtime, one thread per case) on every
case of a labelled data set, in parallel over cases, and scores every result with
:mod:`LiverTumorSegLib.metrics` (the definitions and empty-mask conventions are documented there). It writes,
into one output folder that appears complete or not at all:

* ``RESULTS.md`` — the command, the data set and case ids, the bundles (name, version, network flags,
  components, manifest checksum), then the tables below and the figures;
* ``per_case.csv`` (one row per case and run, every number of :func:`~LiverTumorSegLib.metrics.case_metrics`),
  ``per_lesion.csv`` (one row per reference lesion of each compared method), one CSV per table;
* ``figures/``: Dice box plots per bundle, size-stratified bars, robustness bars, and overlays of the
  best, median and worst case by tumour Dice.

Tables
------
* **Method comparison (Table 4)**: each ``--bundle`` with every stage it has switched on. Sensitivity, PPV
  and Dice per case (mean ± sample standard deviation over cases) and global Dice for tumour and liver;
  lesion precision, recall and F1 pooled over cases (lesion counts summed first); ASSD and HD95 (means over
  the cases where both masks exist); tumour-burden RMSE. A paired Wilcoxon signed-rank test
  (:func:`scipy.stats.wilcoxon`, two-sided, pairs with an undefined value dropped) of the per-case tumour
  Dice and tumour sensitivity between the first bundle (the full pipeline) and each other bundle.
* **Ablation (Table 5)**: tumour Dice per row and its change from the row above. The network rows come from
  bundles trained with the ablation presets (``--ablation-baseline``: ``--no-dense-skips --no-subpixel
  --no-attention``; ``--ablation-dense``: ``--no-attention``; the attention row is the full bundle). The
  network rows run the **base post-processing** only — Otsu thresholding, 3×3 morphological cleaning and
  the liver confinement — with the three-slice rule, the radiomics filter and boundary refinement off, so
  that they measure the networks. The stage rows then switch the stages on one by one on the full bundle.
  A row whose bundle is not given (or whose folder does not exist) says "not trained", and a stage the full
  bundle lacks says "not available": no number is ever filled in.
* **Size-stratified Dice (Table 6)**: per-lesion Dice by the reference lesion's equivalent-sphere diameter
  (< 10, 10–30, > 30 mm), mean ± standard deviation over the lesions of all cases, per bundle.
* **Robustness (§4.8)**: the full bundle on perturbed copies of each CT, tumour and liver Dice and their
  mean paired change from the unperturbed run. Gaussian noise: ``HU' = HU + N(0, σ²)`` independently per
  voxel on the stored grid (before the engine resamples it), σ ∈ {5, 10} HU, seeded from ``--seed`` and the
  case id. Global intensity scaling: ``HU' = s·HU`` with s ∈ {0.9, 1.1}, i.e. about 0 HU (water), so water
  stays at 0, air moves to ∓100 HU of −1000 and enhanced liver (≈ 110 HU) by ∓11 HU — a contrast/
  calibration gain, not an offset. The paper draws the scale at random within ±10 %; the two extremes are
  used here so that the result is deterministic and bounds the random case.

Everything is deterministic given the inputs (bundles, data, case list, seed): the cases are processed in
any order but reported in data-set order, and nothing time-dependent is written.

Modules: :mod:`.plan` (configuration, runs, case selection), :mod:`.runs` (segmenting and scoring the cases,
writing the folder), :mod:`.tables` (the numbers and CSVs), :mod:`.figures`, :mod:`.markdown` (RESULTS.md),
:mod:`.command` (the command line).
"""

from .command import add_evaluate_arguments, main, run_evaluate
from .plan import ABLATION_ROWS, PERTURBATIONS, EvaluationConfig, Run
from .runs import evaluate, perturb

__all__ = [
    "ABLATION_ROWS",
    "PERTURBATIONS",
    "EvaluationConfig",
    "Run",
    "add_evaluate_arguments",
    "evaluate",
    "main",
    "perturb",
    "run_evaluate",
]
