"""Held-out effect of the radiomics filter: run the pipeline with it on or off on the first N cases of a dataset.

    .venv/bin/python scripts/compare_radiomics_filter.py on|off N --data runs/phantoms-test --bundle BUNDLE

Writes runs/cmp-radiomics-<on|off>.json (per-case metrics from LiverTumorSegLib.metrics.case_metrics) and
prints tumour Dice and lesion precision/recall pooled over the cases.
"""

import argparse
import json

import numpy as np

from LiverTumorSegLib.bundle import load_bundle
from LiverTumorSegLib.metrics import case_metrics
from LiverTumorSegLib.pipeline import PipelineOptions, segment
from livertumorseg_training.datasets import find_cases, load_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("on", "off"))
    parser.add_argument("count", type=int)
    parser.add_argument("--data", default="runs/phantoms-test")
    parser.add_argument("--bundle", default=None, help="a bundle with a lesion_classifier component")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    rows = []
    for case in find_cases(args.data)[: args.count]:
        image, reference = load_case(case)
        result = segment(image, bundle, PipelineOptions(threads=1, radiomics=args.mode == "on"))
        rows.append({"case": case.case_id, **case_metrics(result.labels.array, reference, image.geometry.spacing),
                     "timings": result.details["timings_s"]})
    with open(f"runs/cmp-radiomics-{args.mode}.json", "w", encoding="utf-8") as handle:
        json.dump(rows, handle, default=float)
    total = lambda key: sum(r[key] for r in rows)
    print(f"{args.mode}: tumour Dice {np.nanmean([r['tumour_dice'] for r in rows]):.3f}, liver Dice "
          f"{np.nanmean([r['liver_dice'] for r in rows]):.3f}, lesion precision "
          f"{total('lesions_predicted_matched') / max(1, total('lesions_predicted')):.3f}, recall "
          f"{total('lesions_reference_detected') / max(1, total('lesions_reference')):.3f}")


if __name__ == "__main__":
    main()
