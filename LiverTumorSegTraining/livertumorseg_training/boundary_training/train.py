"""Training of the boundary CNN (paper §4.2).

Binary cross-entropy on the logit (sigmoid inside the loss). Adam (lr 1e-3) for up to ``epochs_adam`` epochs
(paper 30; lite 6), then SGD (lr 1e-4, momentum 0.9) fine-tuning for up to ``epochs_sgd`` epochs (the paper
gives no number; paper preset 20, lite 4), starting from the best Adam weights. Batch 32 (16 for patches above
15³). Early stopping with patience 10 on the validation loss ends the current phase (an Adam phase that stops
early hands over to SGD); the weights with the lowest validation loss over both phases are kept. Each training
batch is flipped / transposed and its patches' intensities varied (:func:`augment_patches`; not in the paper:
phantoms are few and real scans vary). Deterministic for a seed on one device and thread count.

Split. ``validation_cases`` default: ``max(1, round(n · 20 / 260))`` cases drawn with the seed from the
training pool (the paper's 20 validation cases per 260), at least one when there are two or more cases.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from LiverTumorSegLib.preprocess import InputContract
from LiverTumorSegLib.refinement import BAND_VOXELS, PADDING

from ..datasets import find_cases_in, folder_list
from ..networks.boundary import PatchClassifier, build_boundary_cnn
from .samples import BoundarySamples, Log, load_case_bands, sample_boundary_patches

#: Scale presets: samples per class and epochs (Adam, SGD).
SCALES = {
    "paper": {"samples_per_class": 50_000, "epochs_adam": 30, "epochs_sgd": 20},
    "lite": {"samples_per_class": 4_000, "epochs_adam": 6, "epochs_sgd": 4},
    "tiny": {"samples_per_class": 500, "epochs_adam": 2, "epochs_sgd": 1},
}


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
    """Train the boundary CNN on a dataset folder (LiTS, MSD or 3D-IRCADb layout), or several (ids FOLDER/ID).

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

    all_ids = list(find_cases_in(dataset_dir))
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
              "data": ", ".join(Path(folder).name for folder in folder_list(dataset_dir))}
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
