"""Studies of the boundary CNN: patch size (Table 3 in kind), architecture (Table 2 in kind), and what
refinement does to tumour Dice on labelled cases; their tables as Markdown and CSV."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from LiverTumorSegLib.bundle import load_bundle
from LiverTumorSegLib.image_io import atomic_path, to_canonical
from LiverTumorSegLib.metrics import dice
from LiverTumorSegLib.preprocess import InputContract, prepare_volume
from LiverTumorSegLib.refinement import refine_boundaries, signed_distance

from ..datasets import find_cases, load_case
from ..networks.boundary import count_parameters
from .samples import Log, load_case_bands
from .train import BoundaryTrainResult, split_cases, train_boundary_cnn


def _study_bands(dataset_dir, cases, validation_cases, seed, max_patch, contract, log):
    all_ids = [c.case_id for c in find_cases(dataset_dir)]
    split = split_cases(list(cases) if cases is not None else all_ids, validation_cases, seed)
    train = load_case_bands(dataset_dir, split["train"], contract=contract, max_patch=max_patch, log=log)
    val = load_case_bands(dataset_dir, split["validation"], contract=contract, max_patch=max_patch, log=log)
    return split, (train, val)


def _row(result: BoundaryTrainResult, model_name: str) -> dict:
    epochs = len(result.history)
    return {"model": model_name, "patch": f"{result.config['patch_size']}³", "accuracy": round(result.validation_accuracy, 4),
            "validation_loss": round(result.validation_loss, 4), "parameters": count_parameters(result.model),
            "epochs": epochs, "seconds_per_epoch": round(result.seconds / max(epochs, 1), 1)}


def patch_size_study(dataset_dir, sizes: Sequence[int] = (9, 11, 13, 15), *, preset: str = "lite",
                     architecture: str = "alexnet3d", out_dir=None, cases=None, validation_cases=None, seed: int = 0,
                     contract: InputContract | None = None, log: Log = print, **train_options) -> list[dict]:
    """Table 3 in kind: validation accuracy of the boundary CNN for each patch size (one reading of the data)."""
    contract = contract or InputContract()
    split, bands = _study_bands(dataset_dir, cases, validation_cases, seed, max(sizes), contract, log)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="boundary-patch-study-"))
    rows = []
    for size in sizes:
        result = train_boundary_cnn(dataset_dir, out / f"patch{size}", preset=preset, patch=size, architecture=architecture,
                                    cases=split["train"] + split["validation"], validation_cases=split["validation"],
                                    seed=seed, contract=contract, log=log, _bands=bands, **train_options)
        rows.append(_row(result, architecture))
    return rows


def architecture_study(dataset_dir, architectures: Sequence[str] = ("alexnet3d", "resnet3d"), *, patch: int = 15,
                       preset: str = "lite", out_dir=None, cases=None, validation_cases=None, seed: int = 0,
                       contract: InputContract | None = None, log: Log = print, **train_options) -> list[dict]:
    """Table 2 in kind: validation accuracy and training speed of the AlexNet-style net vs a deeper 3D ResNet."""
    contract = contract or InputContract()
    split, bands = _study_bands(dataset_dir, cases, validation_cases, seed, patch, contract, log)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="boundary-architecture-study-"))
    rows = []
    for name in architectures:
        result = train_boundary_cnn(dataset_dir, out / name, preset=preset, patch=patch, architecture=name,
                                    cases=split["train"] + split["validation"], validation_cases=split["validation"],
                                    seed=seed, contract=contract, log=log, _bands=bands, **train_options)
        rows.append(_row(result, name))
    return rows


def refinement_effect(dataset_dir, bundle_dir, case_ids: Sequence[str], *, perturbations: Sequence[int] = (0, -2, 2),
                      contract: InputContract | None = None, threads: int = 1, log: Log = print) -> list[dict]:
    """What the bundle's boundary CNN does to tumour Dice on labelled (held-out) cases.

    For each case the ground-truth tumour mask on the processing grid is taken as is (0), eroded (−k) or
    dilated (+k, within the liver) by k in-plane voxels with the band's signed distance, refined with
    :func:`LiverTumorSegLib.refinement.refine_boundaries`, and compared with the ground truth. Refining the
    exact ground truth shows the harm of classifier errors; the perturbed masks show the repair. Rows:
    ``{"case", "perturbation", "dice_before", "dice_after", "added", "removed"}``.
    """
    contract = contract or InputContract()
    bundle = load_bundle(bundle_dir)
    cases = {case.case_id: case for case in find_cases(dataset_dir)}
    rows = []
    for case_id in case_ids:
        image, labels = load_case(cases[case_id])
        prepared = prepare_volume(to_canonical(image)[0], contract, labels=to_canonical(image.with_array(labels))[0].array)
        truth, liver = prepared.labels == 2, prepared.labels > 0
        if not truth.any():
            continue
        distance = signed_distance(truth, prepared.grid.spacing)
        for k in perturbations:
            mask = (distance <= k) & liver if k >= 0 else distance <= k
            start = np.where(liver, 1, 0).astype(np.uint8)
            start[mask] = 2
            refined, info = refine_boundaries(prepared.intensities, start, prepared.grid.spacing, bundle, threads=threads)
            row = {"case": case_id, "perturbation": int(k), "dice_before": round(dice(mask, truth), 4),
                   "dice_after": round(dice(refined == 2, truth), 4), "added": info["added_voxels"],
                   "removed": info["removed_voxels"]}
            log(f"{case_id} perturbation {k:+d}: Dice {row['dice_before']} → {row['dice_after']}")
            rows.append(row)
    return rows


def write_study_table(rows: Sequence[dict], path, *, title: Optional[str] = None) -> Path:
    """Write study rows as a Markdown table (and the same rows as CSV beside it, ``.csv``)."""
    path = Path(path)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [f"# {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path.with_suffix(".csv"), overwrite=True) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
