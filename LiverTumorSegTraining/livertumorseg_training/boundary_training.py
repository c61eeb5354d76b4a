"""Boundary CNN (paper §3.3.3, §4.2, §4.4): band samples, training, dense ONNX export, and the studies.

Samples. Each case is read through the engine (``to_canonical`` → ``prepare_volume``) onto the processing
grid (1 mm in-plane, slice spacing kept, 8-bit HU window, body crop). The band ``|d| ≤ 6`` around the
ground-truth tumour mask is computed with the engine's own functions (``LiverTumorSegLib.refinement``:
signed Euclidean distance with the voxel spacing, in units of the in-plane spacing): band voxels inside the
tumour are positives, band voxels outside negatives. Each class gets the same number of samples
(``samples_per_class``; paper 50,000, lite 4,000), spread as evenly over the cases as their bands allow
and drawn without replacement (if all cases together hold fewer voxels of a class, both classes are cut to
that number). Each sample is the s×s×s block of 8-bit intensities centred on its voxel; beyond the volume
the edge voxel is repeated, as at inference. Only a crop around each case's tumours (band plus the largest
patch's half-width) is kept in memory, so sampling for several patch sizes reuses one reading.

Training (paper §4.2). Binary cross-entropy on the logit (sigmoid inside the loss). Adam (lr 1e-3) for up
to ``epochs_adam`` epochs (paper 30; lite 6), then SGD (lr 1e-4, momentum 0.9) fine-tuning for up to
``epochs_sgd`` epochs (the paper gives no number; paper preset 20, lite 4), starting from the best Adam
weights. Batch 32 (16 for patches above 15³). Early stopping with patience 10 on the validation loss
ends the current phase (an Adam phase that stops early hands over to SGD); the weights with the lowest
validation loss over both phases are kept. Each training batch is flipped / transposed and its patches'
intensities varied (:func:`augment_patches`; not in the paper: phantoms are few and real scans vary).
Deterministic for a seed on one device and thread count.

Band and threshold (not in the paper). :func:`tune_refinement` runs the engine up to the refinement on the
validation cases and picks the band half-width and probability threshold with the best tumour Dice;
``livertumorseg-train boundary-cnn`` writes them into the bundle (``--no-tune`` keeps the paper's 6 and 0.5);
``livertumorseg-train tune-refinement`` chooses them again on any other labelled cases (:func:`apply_tuning`).

Split. ``validation_cases`` default: ``max(1, round(n · 20 / 260))`` cases drawn with the seed from the
training pool (the paper's 20 validation cases per 260), at least one when there are two or more cases.

Export. :func:`export_boundary_cnn` rewrites the classifier densely (``networks.boundary.to_dense``),
exports it to ONNX (opset 17; input ``"input"`` float32 (N, 1, D, H, W) intensities in [0, 255], output
``"probability"`` (N, 1, D−s+1, H−s+1, W−s+1), D/H/W dynamic), checks torch-patch vs torch-dense vs ONNX
Runtime on a random box (max abs difference < 1e-4), and adds the ``boundary_cnn`` component to a bundle
with :func:`LiverTumorSegLib.bundle.extend_bundle`.
"""

from __future__ import annotations

import copy
import csv
import datetime
import io
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from LiverTumorSegLib.bundle import Bundle, extend_bundle, load_bundle
from LiverTumorSegLib.image_io import atomic_path, to_canonical
from LiverTumorSegLib.preprocess import InputContract, prepare_volume
from LiverTumorSegLib.refinement import (
    BAND_VOXELS,
    COMPONENT,
    DEFAULT_THRESHOLD,
    PADDING,
    band_margin_zyx,
    boundary_band,
    band_probabilities,
    crop_edge,
    refine_boundaries,
    relabel,
    signed_distance,
)

from .datasets import find_cases, load_case
from .networks.boundary import PatchClassifier, build_boundary_cnn, count_parameters, to_dense

ONNX_FILE = "boundary_cnn.onnx"
ONNX_TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "input", "probability"

#: Scale presets: samples per class and epochs (Adam, SGD).
SCALES = {
    "paper": {"samples_per_class": 50_000, "epochs_adam": 30, "epochs_sgd": 20},
    "lite": {"samples_per_class": 4_000, "epochs_adam": 6, "epochs_sgd": 4},
    "tiny": {"samples_per_class": 500, "epochs_adam": 2, "epochs_sgd": 1},
}

Log = Callable[[str], None]


# -------------------------------------------------------------------------------------------------- samples


@dataclass
class CaseBand:
    """The neighbourhood of one case's tumours on the processing grid.

    ``intensities`` covers ``region`` grown by ``context`` voxels on every side (edge-replicated beyond the
    volume); ``band``/``distance`` cover ``region`` (the tumours' bounding box grown by the band margin and
    clipped to the volume).
    """

    case_id: str
    intensities: np.ndarray  # uint8
    band: np.ndarray  # bool, band voxels
    distance: np.ndarray  # float32 signed distance (in-plane voxel units), negative inside
    context: int
    spacing_xyz: tuple
    region_start: tuple  # in the prepared volume (z, y, x)

    @property
    def positives(self) -> np.ndarray:
        return np.flatnonzero(self.band & (self.distance < 0))

    @property
    def negatives(self) -> np.ndarray:
        return np.flatnonzero(self.band & (self.distance > 0))


def case_band(case_id: str, intensities: np.ndarray, labels: np.ndarray, spacing_xyz, *, max_patch: int = 15,
              band: float = BAND_VOXELS) -> Optional[CaseBand]:
    """The band neighbourhood of a prepared case (uint8 intensities and 0/1/2 labels on the processing grid);
    ``None`` when the case has no tumour."""
    tumour = labels == 2
    if not tumour.any():
        return None
    margin = np.array(band_margin_zyx(spacing_xyz, band))
    where = np.nonzero(tumour)
    start = np.maximum(np.array([w.min() for w in where]) - margin, 0)
    stop = np.minimum(np.array([w.max() + 1 for w in where]) + margin, tumour.shape)
    region = tuple(slice(a, b) for a, b in zip(start, stop))
    in_band, distance = boundary_band(tumour[region], spacing_xyz, band)
    context = (int(max_patch) - 1) // 2
    crop = crop_edge(intensities, start - context, stop + context)
    return CaseBand(case_id, np.ascontiguousarray(crop), in_band, distance, context, tuple(spacing_xyz),
                    tuple(int(v) for v in start))


def load_case_bands(dataset_dir, case_ids: Sequence[str], *, contract: InputContract | None = None,
                    max_patch: int = 15, band: float = BAND_VOXELS, log: Log = print) -> list[CaseBand]:
    """Read the cases (ids from ``datasets.find_cases``), preprocess them like the engine and keep their
    band neighbourhoods. Cases without tumour are skipped (with a log line)."""
    contract = contract or InputContract()
    cases = {case.case_id: case for case in find_cases(dataset_dir)}
    missing = [c for c in case_ids if c not in cases]
    if missing:
        raise ValueError(f"unknown case ids {missing}; available: {', '.join(cases)}")
    bands = []
    for case_id in case_ids:
        image, labels = load_case(cases[case_id])
        canonical, _ = to_canonical(image)
        canonical_labels, _ = to_canonical(image.with_array(labels))
        prepared = prepare_volume(canonical, contract, labels=canonical_labels.array)
        found = case_band(case_id, prepared.intensities, prepared.labels, prepared.grid.spacing,
                          max_patch=max_patch, band=band)
        if found is None:
            log(f"{case_id}: no tumour, no boundary samples")
        else:
            bands.append(found)
    return bands


@dataclass
class BoundarySamples:
    patches: np.ndarray  # uint8 (N, s, s, s)
    labels: np.ndarray  # float32 (N,): 1 tumour (inside), 0 not tumour (outside)
    distance: np.ndarray  # float32 (N,) signed distance of the centre voxel
    case_index: np.ndarray  # int (N,) index into case_ids
    centres: np.ndarray  # int (N, 3) centre voxel (z, y, x) in the case's prepared volume
    case_ids: list
    patch_size: int

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict:
        return {"positive": int(self.labels.sum()), "negative": int(len(self.labels) - self.labels.sum())}


def _even_quota(available: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over cases as evenly as their ``available`` counts allow (water filling)."""
    quota = np.zeros(len(available), int)
    remaining, left = int(total), len(available)
    for i in np.argsort(available, kind="stable"):
        take = min(int(available[i]), remaining // left + (1 if remaining % left else 0))
        take = min(take, remaining)
        quota[i] = take
        remaining -= take
        left -= 1
    return quota


def sample_boundary_patches(bands: Sequence[CaseBand], patch: int, samples_per_class: int, seed: int = 0) -> BoundarySamples:
    """Balanced positive/negative band samples with their s³ patches (deterministic for a seed)."""
    if patch % 2 == 0 or patch < 1:
        raise ValueError(f"patch size must be odd, got {patch}")
    rng = np.random.default_rng(seed)
    half = (patch - 1) // 2
    pools = {1: [b.positives for b in bands], 0: [b.negatives for b in bands]}
    available = min(sum(len(p) for p in pools[1]), sum(len(p) for p in pools[0]))
    per_class = min(int(samples_per_class), available)
    out = {key: [] for key in ("patches", "labels", "distance", "case_index", "centres")}
    for label in (1, 0):
        quota = _even_quota(np.array([len(p) for p in pools[label]]), per_class)
        for index, (band, pool, n) in enumerate(zip(bands, pools[label], quota)):
            if n == 0:
                continue
            if band.context < half:
                raise ValueError(f"{band.case_id}: its crop holds context for patches up to {2 * band.context + 1}")
            chosen = np.sort(rng.choice(pool, size=n, replace=False))
            zyx = np.stack(np.unravel_index(chosen, band.band.shape), axis=1)
            windows = np.lib.stride_tricks.sliding_window_view(band.intensities, (patch,) * 3)
            first = zyx + (band.context - half)
            out["patches"].append(windows[first[:, 0], first[:, 1], first[:, 2]])
            out["labels"].append(np.full(n, label, np.float32))
            out["distance"].append(band.distance.ravel()[chosen])
            out["case_index"].append(np.full(n, index, int))
            out["centres"].append(zyx + np.array(band.region_start))
    if not out["labels"]:
        raise ValueError("no boundary samples: the cases have no tumour band voxels of both classes")
    return BoundarySamples(
        np.concatenate(out["patches"]).astype(np.uint8, copy=False), np.concatenate(out["labels"]),
        np.concatenate(out["distance"]).astype(np.float32), np.concatenate(out["case_index"]),
        np.concatenate(out["centres"]), [b.case_id for b in bands], int(patch),
    )


# ------------------------------------------------------------------------------------------------- training


@dataclass
class BoundaryTrainResult:
    model: PatchClassifier  # eval mode, best weights, on the CPU
    history: list
    validation_accuracy: float
    validation_loss: float
    best_epoch: int
    config: dict
    split: dict
    samples: dict = field(default_factory=dict)
    checkpoint: Optional[Path] = None
    seconds: float = 0.0


def _batches(n: int, batch: int, order: Optional[torch.Tensor] = None):
    index = order if order is not None else torch.arange(n)
    for start in range(0, n, batch):
        yield index[start:start + batch]


def _tensor(samples: BoundarySamples, index, device) -> tuple[torch.Tensor, torch.Tensor]:
    index = np.asarray(index)
    x = torch.from_numpy(samples.patches[index]).to(device=device, dtype=torch.float32).unsqueeze(1)
    y = torch.from_numpy(samples.labels[index]).to(device).unsqueeze(1)
    return x, y


@torch.no_grad()
def evaluate_samples(model: nn.Module, samples: BoundarySamples, device="cpu", batch: int = 256) -> dict:
    """Mean BCE loss and accuracy (probability ≥ 0.5 ↔ tumour) of a patch classifier on samples."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for index in _batches(len(samples), batch):
        x, y = _tensor(samples, index, device)
        logits = model(x)
        loss += float(F.binary_cross_entropy_with_logits(logits, y, reduction="sum"))
        correct += int(((logits >= 0).float() == y).sum())
    model.train(was_training)
    n = max(len(samples), 1)
    return {"loss": loss / n, "accuracy": correct / n}


def augment_patches(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Label-preserving variation of a batch of patches (N, 1, s, s, s) of 8-bit intensities.

    The class is that of the centre voxel, so flips of z, y and x and the in-plane transpose keep it (one of
    the 16 drawn per batch). Each patch also gets an intensity gain (0.9–1.1 about the window's middle)
    and offset (±10 levels ≈ ±20 HU), as contrast phase and scanner calibration vary between scans.
    """
    draw = torch.randint(0, 2, (4,), generator=generator).tolist()
    flips = [dim for dim, flip in zip((2, 3, 4), draw) if flip]
    if flips:
        x = torch.flip(x, flips)
    if draw[3]:
        x = x.transpose(3, 4)
    n = x.shape[0]
    gain = 0.9 + 0.2 * torch.rand((n, 1, 1, 1, 1), generator=generator)
    offset = 20.0 * torch.rand((n, 1, 1, 1, 1), generator=generator) - 10.0
    return ((x - 127.5) * gain.to(x.device) + 127.5 + offset.to(x.device)).clamp_(0.0, 255.0)


def fit_boundary_cnn(model: PatchClassifier, train: BoundarySamples, validation: Optional[BoundarySamples], *,
                     epochs_adam: int, epochs_sgd: int, batch_size: Optional[int] = None, patience: int = 10,
                     augment: bool = True,
                     lr_adam: float = 1e-3, lr_sgd: float = 1e-4, momentum: float = 0.9, seed: int = 0,
                     device="cpu", time_limit_minutes: Optional[float] = None, log: Log = print,
                     checkpoint: Optional[Callable[[dict, dict], None]] = None) -> dict:
    """The two-phase schedule on prepared samples (with :func:`augment_patches` on the training batches
    unless ``augment`` is false); the model ends with its best weights (eval mode).

    Returns ``{"history", "best_epoch", "validation_loss", "validation_accuracy", "seconds"}``.
    """
    device = torch.device(device)
    model.to(device)
    batch_size = batch_size or (32 if model.patch_size <= 15 else 16)
    generator = torch.Generator().manual_seed(seed)
    use_validation = validation is not None and len(validation) > 0
    history: list = []
    best = {"loss": math.inf, "accuracy": float("nan"), "epoch": 0, "state": copy.deepcopy(model.state_dict())}
    started = time.perf_counter()
    epoch = 0
    out_of_time = False
    for phase, epochs in (("adam", epochs_adam), ("sgd", epochs_sgd)):
        if epochs <= 0 or out_of_time:
            continue
        if phase == "adam":
            optimizer = torch.optim.Adam(model.parameters(), lr=lr_adam)
        else:
            if best["epoch"]:
                model.load_state_dict(best["state"])
            optimizer = torch.optim.SGD(model.parameters(), lr=lr_sgd, momentum=momentum)
        stale = 0
        for _ in range(epochs):
            epoch += 1
            model.train()
            tic = time.perf_counter()
            order = torch.randperm(len(train), generator=generator)
            total, correct = 0.0, 0
            for index in _batches(len(train), batch_size, order):
                if len(index) < 2 and len(train) > 1:
                    continue  # batch normalisation needs two samples
                x, y = _tensor(train, index, device)
                if augment:
                    x = augment_patches(x, generator)
                logits = model(x)
                loss = F.binary_cross_entropy_with_logits(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(index)
                correct += int(((logits.detach() >= 0).float() == y).sum())
            train_loss, train_accuracy = total / len(train), correct / len(train)
            val = evaluate_samples(model, validation, device) if use_validation else {"loss": train_loss, "accuracy": train_accuracy}
            record = {"epoch": epoch, "phase": phase, "train_loss": train_loss, "train_accuracy": train_accuracy,
                      "validation_loss": val["loss"], "validation_accuracy": val["accuracy"],
                      "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - tic, 2)}
            history.append(record)
            improved = val["loss"] < best["loss"]
            if improved:
                best = {"loss": val["loss"], "accuracy": val["accuracy"], "epoch": epoch,
                        "state": copy.deepcopy(model.state_dict())}
                stale = 0
                if checkpoint is not None:
                    checkpoint(best["state"], record)
            else:
                stale += 1
            log(f"boundary CNN epoch {epoch} ({phase}): train {train_loss:.4f} / {train_accuracy:.3f}, validation "
                f"{val['loss']:.4f} / {val['accuracy']:.3f} ({record['seconds']} s){' *' if improved else ''}")
            if time_limit_minutes and (time.perf_counter() - started) / 60 >= time_limit_minutes:
                log(f"time limit of {time_limit_minutes} min reached")
                out_of_time = True
                break
            if stale >= patience:
                log(f"early stopping of the {phase} phase: no improvement for {patience} epochs")
                break
    model.load_state_dict(best["state"])
    model.eval()
    return {"history": history, "best_epoch": best["epoch"], "validation_loss": best["loss"],
            "validation_accuracy": best["accuracy"], "seconds": round(time.perf_counter() - started, 2)}


def split_cases(case_ids: Sequence[str], validation_cases: Optional[Sequence[str]], seed: int) -> dict:
    """Training / validation case ids (see the module docstring)."""
    ids = list(case_ids)
    if validation_cases is not None:
        validation = [c for c in validation_cases]
        return {"train": [c for c in ids if c not in set(validation)], "validation": validation}
    if len(ids) < 2:
        return {"train": ids, "validation": []}
    count = max(1, int(round(len(ids) * 20 / 260)))
    order = np.random.default_rng(seed).permutation(len(ids))
    chosen = {ids[i] for i in order[:count]}
    return {"train": [c for c in ids if c not in chosen], "validation": [c for c in ids if c in chosen]}


def _scale(preset: str) -> dict:
    return SCALES["paper" if preset == "paper" else ("tiny" if preset == "tiny" else "lite")]


def _device(device: str) -> str:
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


def train_boundary_cnn(
    dataset_dir,
    out_dir,
    *,
    preset: str = "lite",
    patch: int = 11,
    architecture: str = "alexnet3d",
    samples_per_class: Optional[int] = None,
    validation_samples_per_class: Optional[int] = None,
    cases: Optional[Sequence[str]] = None,
    validation_cases: Optional[Sequence[str]] = None,
    seed: int = 0,
    epochs_adam: Optional[int] = None,
    epochs_sgd: Optional[int] = None,
    batch_size: Optional[int] = None,
    patience: int = 10,
    augment: bool = True,
    time_limit_minutes: Optional[float] = None,
    device: str = "auto",
    contract: InputContract | None = None,
    log: Log = print,
    _bands: Optional[tuple[list, list]] = None,
) -> BoundaryTrainResult:
    """Train the boundary CNN on a dataset folder (LiTS, MSD or 3D-IRCADb layout).

    ``cases``: training-pool case ids (default: all); ``validation_cases``: ids held out for early stopping
    (default: drawn from the pool, see :func:`split_cases`). Writes ``boundary_cnn_best.pt`` (best weights and
    configuration) and ``boundary_cnn_history.json`` to ``out_dir``. ``preset`` picks the network width and
    the sample/epoch scale (``paper``: 50,000 per class, 30 + 20 epochs; ``lite``: 4,000, 6 + 4).
    """
    scale = _scale(preset)
    samples_per_class = int(samples_per_class or scale["samples_per_class"])
    validation_samples_per_class = int(validation_samples_per_class or max(1, samples_per_class // 4))
    epochs_adam = scale["epochs_adam"] if epochs_adam is None else int(epochs_adam)
    epochs_sgd = scale["epochs_sgd"] if epochs_sgd is None else int(epochs_sgd)
    contract = contract or InputContract()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    np.random.seed(seed)
    device = _device(device)

    all_ids = [c.case_id for c in find_cases(dataset_dir)]
    split = split_cases(list(cases) if cases is not None else all_ids, validation_cases, seed)
    if _bands is None:
        train_bands = load_case_bands(dataset_dir, split["train"], contract=contract, max_patch=patch, log=log)
        val_bands = load_case_bands(dataset_dir, split["validation"], contract=contract, max_patch=patch, log=log)
    else:
        train_bands, val_bands = _bands
    if not train_bands:
        raise ValueError("none of the training cases has a tumour: the boundary CNN has nothing to learn from")
    train_samples = sample_boundary_patches(train_bands, patch, samples_per_class, seed)
    val_samples = sample_boundary_patches(val_bands, patch, validation_samples_per_class, seed + 1) if val_bands else None
    log(f"boundary CNN: {len(split['train'])} training / {len(split['validation'])} validation cases, "
        f"samples {train_samples.counts()} / {val_samples.counts() if val_samples else 'none'}, patch {patch}³, "
        f"{architecture} {preset}, device {device}")

    model = build_boundary_cnn(architecture, preset, patch)
    config = {"architecture": architecture, "preset": preset, "patch_size": patch, "samples_per_class": samples_per_class,
              "validation_samples_per_class": validation_samples_per_class, "epochs_adam": epochs_adam,
              "epochs_sgd": epochs_sgd, "batch_size": batch_size or (32 if patch <= 15 else 16), "patience": patience,
              "augment": augment, "seed": seed, "band_voxels": BAND_VOXELS, "padding": PADDING, "contract": contract.to_dict(),
              "data": Path(dataset_dir).name}
    checkpoint_path = out / "boundary_cnn_best.pt"

    def save(state: dict, record: dict) -> None:
        tmp = checkpoint_path.with_suffix(".pt.part")
        torch.save({"model": state, "config": config, "split": split, "epoch": record["epoch"], "validation": record}, tmp)
        os.replace(tmp, checkpoint_path)

    fitted = fit_boundary_cnn(model, train_samples, val_samples, epochs_adam=epochs_adam, epochs_sgd=epochs_sgd,
                              batch_size=batch_size, patience=patience, augment=augment, seed=seed, device=device,
                              time_limit_minutes=time_limit_minutes, log=log, checkpoint=save)
    model.to("cpu").eval()
    samples = {"train": train_samples.counts(), "validation": val_samples.counts() if val_samples else {}}
    (out / "boundary_cnn_history.json").write_text(json.dumps({"history": fitted["history"], "samples": samples,
                                                               "split": split, "config": config}, indent=1) + "\n")
    if checkpoint_path.exists():  # add the whole history to the best checkpoint
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        state.update(history=fitted["history"], samples=samples, seconds=fitted["seconds"])
        torch.save(state, checkpoint_path)
    return BoundaryTrainResult(model, fitted["history"], fitted["validation_accuracy"], fitted["validation_loss"],
                               fitted["best_epoch"], config, split, samples, checkpoint_path if checkpoint_path.exists() else None,
                               fitted["seconds"])


def load_boundary_checkpoint(path) -> tuple[PatchClassifier, dict]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    config = state["config"]
    model = build_boundary_cnn(config["architecture"], config["preset"], int(config["patch_size"]))
    model.load_state_dict(state["model"])
    return model.eval(), state


# --------------------------------------------------------------------------------------------------- export


class _DenseProbability(nn.Module):
    def __init__(self, dense: nn.Module):
        super().__init__()
        self.dense = dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.dense(x))


def export_dense_onnx(model: PatchClassifier, path, *, opset: int = 17) -> Path:
    """Dense rewrite of ``model`` → ONNX file at ``path`` (written atomically)."""
    path = Path(path)
    dense = to_dense(copy.deepcopy(model).to("cpu").eval())
    wrapper = _DenseProbability(dense).eval()
    s = model.patch_size
    example = torch.rand(1, 1, s + 3, s + 4, s + 5) * 255.0
    axes = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    with atomic_path(path, overwrite=True) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                torch.onnx.export(wrapper, (example,), str(tmp), dynamo=False, input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                                  opset_version=int(opset), do_constant_folding=True)
        import onnx

        onnx.checker.check_model(onnx.load(str(tmp)))
    return path


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
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        onnx_prob = session.run([OUTPUT_NAME], {INPUT_NAME: box.numpy()})[0]
        if onnx_prob.shape != (1, 1, *out_shape):
            raise AssertionError(f"ONNX output {onnx_prob.shape} != torch dense output {(1, 1, *out_shape)}")
        result["onnx_vs_dense"] = float(np.abs(onnx_prob[0, 0] - dense_prob.numpy()).max())
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


# ---------------------------------------------------------------------------------------------------- studies


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
            row = {"case": case_id, "perturbation": int(k), "dice_before": round(_dice(mask, truth), 4),
                   "dice_after": round(_dice(refined == 2, truth), 4), "added": info["added_voxels"],
                   "removed": info["removed_voxels"]}
            log(f"{case_id} perturbation {k:+d}: Dice {row['dice_before']} → {row['dice_after']}")
            rows.append(row)
    return rows


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
    cases = {case.case_id: case for case in find_cases(dataset_dir)}
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


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


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
