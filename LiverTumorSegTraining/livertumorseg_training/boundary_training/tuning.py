"""Band half-width and threshold of the boundary CNN, chosen on labelled cases (not in the paper).

:func:`tune_refinement` runs the engine up to the refinement on the validation cases and picks the band
half-width and probability threshold with the best tumour Dice; ``livertumorseg-train boundary-cnn`` writes
them into the bundle (``--no-tune`` keeps the paper's 6 and 0.5); ``livertumorseg-train tune-refinement``
chooses them again on any other labelled cases (:func:`apply_tuning`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from LiverTumorSegLib.bundle import Bundle, extend_bundle, load_bundle
from LiverTumorSegLib.image_io import to_canonical
from LiverTumorSegLib.preprocess import prepare_volume
from LiverTumorSegLib.refinement import COMPONENT, band_probabilities, relabel

from ..datasets import find_cases_in, load_case
from .samples import Log


#: The (band half-width, threshold) pairs tried by :func:`tune_refinement`; the paper's pair is (6, 0.5).
TUNING_BANDS = (1.0, 2.0, 3.0, 4.0, 6.0)
TUNING_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def tune_refinement(dataset_dir, bundle_dir, case_ids: Sequence[str], *, bands: Sequence[float] = TUNING_BANDS,
                    thresholds: Sequence[float] = TUNING_THRESHOLDS, threads: int = 1, log: Log = print) -> dict:
    """Choose the band half-width and the threshold of the bundle's boundary CNN on labelled cases.

    The paper relabels the whole |d| ≤ 6 band at probability 0.5; a patch classifier that is less accurate
    than the cascade far from the boundary then undoes correct voxels, so the pair is chosen on data. Each
    case runs through the engine up to the refinement (cascade, post-processing, and the radiomics filter
    when the bundle has one); its labels and the reference are taken onto the processing grid, the CNN is
    evaluated once over the widest band, and every pair relabels its own band. Score: mean tumour Dice over
    the cases with a reference tumour. Returns ``{"cases", "unrefined_dice", "unrefined_per_case", "rows":
    [{"band", "threshold", "dice", "per_case"}], "best": {"band", "threshold", "dice"}}``; the best pair may
    be worse than not refining, which the caller decides on.
    """
    from LiverTumorSegLib.metrics import dice
    from LiverTumorSegLib.pipeline import PipelineOptions, segment

    bundle = load_bundle(bundle_dir)
    cases = find_cases_in(dataset_dir)
    scores = {(float(b), float(t)): [] for b in bands for t in thresholds}
    unrefined, used = [], []
    for case_id in case_ids:
        image, reference = load_case(cases[case_id])
        if not (reference == 2).any():
            continue
        predicted = segment(image, bundle, PipelineOptions(threads=threads, refine=False)).labels.array
        canonical = to_canonical(image)[0]
        prepared = prepare_volume(canonical, bundle.contract, labels=to_canonical(image.with_array(predicted))[0].array)
        truth = prepared.crop_labels(canonical, to_canonical(image.with_array(reference))[0].array) == 2
        labels = prepared.labels
        boxes, _ = band_probabilities(prepared.intensities, labels, prepared.grid.spacing, bundle, band=max(bands),
                                      threads=threads)
        unrefined.append(dice(labels == 2, truth))
        for (band, threshold), values in scores.items():
            refined, _ = relabel(labels, boxes, threshold, band)
            values.append(dice(refined == 2, truth))
        used.append(case_id)
        log(f"{case_id}: tumour Dice {unrefined[-1]:.4f} unrefined, {max(v[-1] for v in scores.values()):.4f} best pair")
    if not used:
        raise ValueError("refinement tuning needs labelled cases with a tumour")
    rows = [{"band": b, "threshold": t, "dice": round(float(np.mean(v)), 4), "per_case": [round(x, 4) for x in v]}
            for (b, t), v in scores.items()]
    best = max(rows, key=lambda row: (row["dice"], -row["band"], row["threshold"]))
    return {"cases": used, "unrefined_dice": round(float(np.mean(unrefined)), 4),
            "unrefined_per_case": [round(x, 4) for x in unrefined], "rows": rows,
            "best": {k: v for k, v in best.items() if k != "per_case"}}


def apply_tuning(bundle_dir, tuning: dict) -> Bundle:
    """Write the best band and threshold of a :func:`tune_refinement` result into the bundle's
    ``boundary_cnn`` entry, with the tuning's cases and scores under ``metrics``."""
    bundle = load_bundle(bundle_dir)
    best = tuning["best"]
    entry = {**bundle.component(COMPONENT), "band_voxels": float(best["band"]), "threshold": float(best["threshold"])}
    record = {"cases": tuning["cases"], "data": tuning.get("data"), "unrefined_dice": tuning["unrefined_dice"], "best": best}
    return extend_bundle(bundle_dir, {COMPONENT: entry}, {}, {"metrics": {COMPONENT: {**bundle.manifest.get(
        "metrics", {}).get(COMPONENT, {}), "tuning": record}}})
