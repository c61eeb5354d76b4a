"""Dense ONNX export of the boundary CNN into a model bundle.

:func:`export_boundary_cnn` rewrites the classifier densely (``networks.boundary.to_dense``), exports it to
ONNX (opset 17; input ``"input"`` float32 (N, 1, D, H, W) intensities in [0, 255], output ``"probability"``
(N, 1, D−s+1, H−s+1, W−s+1), D/H/W dynamic), checks torch-patch vs torch-dense vs ONNX Runtime on a random box
(max abs difference < 1e-4), and adds the ``boundary_cnn`` component to a bundle with
:func:`LiverTumorSegLib.bundle.extend_bundle`.
"""

from __future__ import annotations

import copy
import datetime
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from LiverTumorSegLib.bundle import Bundle, extend_bundle, load_bundle
from LiverTumorSegLib.preprocess import InputContract
from LiverTumorSegLib.refinement import BAND_VOXELS, COMPONENT, DEFAULT_THRESHOLD, PADDING

from ..networks.boundary import PatchClassifier, count_parameters, to_dense
from ..onnx_export import INPUT_NAME, OUTPUT_NAME, BranchWithSigmoid, check_onnx_matches_torch, export_onnx
from .train import BoundaryTrainResult, load_boundary_checkpoint

ONNX_FILE = "boundary_cnn.onnx"
ONNX_TOLERANCE = 1e-4


def export_dense_onnx(model: PatchClassifier, path, *, opset: int = 17) -> Path:
    """Dense rewrite of ``model``, with its sigmoid, → ONNX file at ``path`` (written atomically); the depth,
    height and width of the input are dynamic."""
    dense = to_dense(copy.deepcopy(model).to("cpu").eval())
    s = model.patch_size
    example = torch.rand(1, 1, s + 3, s + 4, s + 5) * 255.0
    return export_onnx(BranchWithSigmoid(dense), example, path, dynamic=(0, 2, 3, 4), opset=opset)


@torch.no_grad()
def patch_outputs(model: PatchClassifier, box: torch.Tensor, positions: Sequence[tuple]) -> torch.Tensor:
    """Logits of the patch classifier on the blocks of ``box`` (1, 1, D, H, W) starting at ``positions``."""
    s = model.patch_size
    blocks = torch.stack([box[0, :, z:z + s, y:y + s, x:x + s] for z, y, x in positions])
    return model(blocks)[:, 0]


def dense_differences(model: PatchClassifier, onnx_path=None, *, box_shape=None, samples: int = 64, seed: int = 0,
                      threads: int = 1) -> dict:
    """Max abs differences of probabilities: torch patch vs torch dense (at sampled voxels including the
    box corners) and, with ``onnx_path``, ONNX Runtime dense vs torch dense (everywhere)."""
    model = model.to("cpu").eval()
    s = model.patch_size
    box_shape = box_shape or (s + 5, s + 8, s + 6)
    g = torch.Generator().manual_seed(seed)
    box = torch.randint(0, 256, (1, 1, *box_shape), generator=g).float()
    dense = to_dense(model)
    with torch.no_grad():
        dense_prob = torch.sigmoid(dense(box))[0, 0]
    out_shape = dense_prob.shape
    corners = [(z, y, x) for z in (0, out_shape[0] - 1) for y in (0, out_shape[1] - 1) for x in (0, out_shape[2] - 1)]
    rng = np.random.default_rng(seed)
    positions = corners + [tuple(int(rng.integers(0, n)) for n in out_shape) for _ in range(samples)]
    patch_prob = torch.sigmoid(patch_outputs(model, box, positions))
    got = torch.stack([dense_prob[p] for p in positions])
    result = {"patch_vs_dense": float((patch_prob - got).abs().max())}
    if onnx_path is not None:
        result["onnx_vs_dense"] = check_onnx_matches_torch(dense, onnx_path, box, threads=threads)
    return result


def export_boundary_cnn(result_or_checkpoint, bundle_dir, *, threshold: float = DEFAULT_THRESHOLD,
                        band_voxels: float = BAND_VOXELS, metrics: Optional[dict] = None) -> Bundle:
    """Add the trained boundary CNN (a :class:`BoundaryTrainResult` or a ``boundary_cnn_best.pt``) to an
    existing bundle as the ``boundary_cnn`` component (dense ONNX), after checking it against torch."""
    if isinstance(result_or_checkpoint, BoundaryTrainResult):
        model, config = result_or_checkpoint.model, result_or_checkpoint.config
        split, history = result_or_checkpoint.split, result_or_checkpoint.history
        validation = {"accuracy": result_or_checkpoint.validation_accuracy, "loss": result_or_checkpoint.validation_loss,
                      "best_epoch": result_or_checkpoint.best_epoch}
        samples = result_or_checkpoint.samples
    else:
        model, state = load_boundary_checkpoint(result_or_checkpoint)
        config, split, history = state["config"], state.get("split"), state.get("history", [])
        record = state.get("validation", {})
        validation = {"accuracy": record.get("validation_accuracy"), "loss": record.get("validation_loss"),
                      "best_epoch": state.get("epoch")}
        samples = state.get("samples", {})
    bundle = load_bundle(bundle_dir)
    trained = InputContract.from_dict(config["contract"])
    if (trained.in_plane_spacing_mm, trained.hu_window) != (bundle.contract.in_plane_spacing_mm, bundle.contract.hu_window):
        raise ValueError(f"the boundary CNN was trained with spacing {trained.in_plane_spacing_mm} mm and HU window "
                         f"{trained.hu_window}, the bundle's contract differs ({bundle.contract.in_plane_spacing_mm} mm, "
                         f"{bundle.contract.hu_window})")
    with tempfile.TemporaryDirectory() as tmp:
        path = export_dense_onnx(model, Path(tmp) / ONNX_FILE)
        differences = dense_differences(model, path)
        worst = max(differences.values())
        if worst >= ONNX_TOLERANCE:
            raise RuntimeError(f"dense boundary CNN differs from the patch classifier by {worst:.2e} ({differences})")
        entry = {
            "file": ONNX_FILE, "kind": "onnx",
            "role": "boundary refinement: 3D patch CNN rewritten as a dense network; 8-bit intensities [0, 255] "
                    "→ tumour probability of the voxel at the centre of every s³ block",
            "input": INPUT_NAME, "output": OUTPUT_NAME, "patch_size": model.patch_size,
            "band_voxels": float(band_voxels), "band_units": "in-plane voxel spacing", "threshold": float(threshold),
            "padding": PADDING, "architecture": config["architecture"], "preset": config["preset"],
            "parameters": count_parameters(model), "validation_accuracy": validation.get("accuracy"),
        }
        updates = {
            "metrics": {COMPONENT: {**validation, **(metrics or {})}},
            "training": {COMPONENT: {"data": config.get("data"), "split": split, "samples": samples,
                                     "epochs_run": len(history),
                                     "config": {k: v for k, v in config.items() if k != "data"},
                                     "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}},
            "onnx_max_abs_difference": {COMPONENT: worst},
        }
        return extend_bundle(bundle_dir, {COMPONENT: entry}, {ONNX_FILE: path}, updates)
