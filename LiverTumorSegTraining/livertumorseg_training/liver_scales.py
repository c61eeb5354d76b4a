"""The liver branch's inference zooms, chosen per bundle on labelled cases (multi-scale test-time averaging).

The engine can run the cascade's liver branch at several in-plane zooms of the CT and average the
probabilities (``inference.liver_scales`` in the bundle, see ``LiverTumorSegLib.cascade``). Which zooms help
depends on the trained networks, so :func:`tune_liver_scales` runs the whole engine with each candidate set on
labelled cases (by default the bundle's own validation cases, never its test or held-out scans) and
:func:`apply_liver_scales` writes the set with the best mean liver Dice into the bundle, with the scores.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from LiverTumorSegLib.bundle import Bundle, check_liver_scales, extend_bundle, load_bundle
from LiverTumorSegLib.metrics import dice

from .datasets import find_cases_in, load_case

#: Zoom sets tried by :func:`tune_liver_scales`, all within the networks' scale augmentation (0.8–1.25).
CANDIDATE_SCALES = ((1.0,), (1.12,), (1.25,), (1.0, 1.25), (1.12, 1.25), (1.0, 1.12, 1.25), (0.8, 1.0, 1.25))


def tune_liver_scales(data, bundle_dir, case_ids: Sequence[str], *,
                      candidates: Sequence[Sequence[float]] = CANDIDATE_SCALES, threads: int = 1,
                      log: Callable[[str], None] = print) -> dict:
    """Segment every case with each candidate zoom set; score: mean liver Dice (liver with its tumours).

    Returns ``{"cases", "rows": [{"liver_scales", "liver_dice", "tumour_dice", "per_case_liver"}], "best" and
    "scale_1_only" (None when (1,) is not a candidate): {"liver_scales", "liver_dice", "tumour_dice"}}``. Ties go
    to the set with fewer zooms (faster). The tumour Dice (global over the cases) is reported, not optimised.
    """
    from LiverTumorSegLib.pipeline import PipelineOptions, segment

    sets = [check_liver_scales(candidate) for candidate in candidates]
    bundle = load_bundle(bundle_dir)
    available = find_cases_in(data)
    missing = [case_id for case_id in case_ids if case_id not in available]
    if not case_ids or missing:
        raise ValueError(f"liver scale tuning needs labelled cases; not found: {missing or 'none given'}")
    liver = {scales: [] for scales in sets}
    tumour_counts = {scales: np.zeros(2, np.int64) for scales in sets}  # (2·|P∩T|, |P| + |T|)
    for case_id in case_ids:
        image, reference = load_case(available[case_id])
        for scales in sets:
            labels = segment(image, bundle, PipelineOptions(threads=threads, liver_scales=scales)).labels.array
            liver[scales].append(dice(labels > 0, reference > 0))
            predicted, truth = labels == 2, reference == 2
            tumour_counts[scales] += (2 * np.count_nonzero(predicted & truth),
                                      np.count_nonzero(predicted) + np.count_nonzero(truth))
        log(f"{case_id}: liver Dice " + ", ".join(f"{_name(s)} {liver[s][-1]:.4f}" for s in sets))
    rows = [{"liver_scales": list(scales), "liver_dice": round(float(np.mean(liver[scales])), 4),
             "tumour_dice": round(float(counts[0] / counts[1]), 4) if counts[1] else 1.0,
             "per_case_liver": [round(value, 4) for value in liver[scales]]}
            for scales, counts in tumour_counts.items()]
    best = max(rows, key=lambda row: (row["liver_dice"], -len(row["liver_scales"])))
    single = next((row for row in rows if row["liver_scales"] == [1.0]), None)
    return {"cases": list(case_ids), "rows": rows, "best": _summary(best),
            "scale_1_only": _summary(single) if single else None}


def apply_liver_scales(bundle_dir, tuning: dict) -> Bundle:
    """Write the best zoom set of a :func:`tune_liver_scales` result into the bundle (``inference.liver_scales``),
    with the tuning's cases and scores under ``metrics.liver_scales``."""
    record = {key: tuning.get(key) for key in ("cases", "data", "best", "scale_1_only")}
    return extend_bundle(bundle_dir, {}, {}, {"inference": {"liver_scales": tuning["best"]["liver_scales"]},
                                              "metrics": {"liver_scales": record}})  # added to the other metrics


def _summary(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "per_case_liver"}


def _name(scales: Sequence[float]) -> str:
    return "+".join(f"{scale:g}" for scale in scales)
