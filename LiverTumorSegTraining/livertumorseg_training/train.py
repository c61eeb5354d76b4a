"""Training loop of the cascade (paper §4.2): one process, or many under ``torchrun`` with DDP.

Adam (lr 3e-4) with the paper's decay of 5e-5 per step, applied as Keras' ``decay`` argument does
(the paper's implementation is Keras 2.2.5): lr_t = lr_0 / (1 + 5e-5 · t). Up to 160 epochs, early stopping
with patience 12 on the validation loss, the best checkpoint kept. Resumable from ``last.pt``.
Deterministic seeds. Mixed precision (float16 autocast + gradient scaling) on CUDA.

Real scans: ``real_data`` names a second folder (e.g. the 8-bit windowed real CTs) whose cases join the
training set only, with ``real_slices_per_volume`` slices each; the ids in ``real_holdout`` are never loaded.
Validation (the best checkpoint, early stopping) stays on ``data``'s validation cases, so the held-out real
scans remain an untouched measurement set. ``train_only_data`` names further folders whose cases are only trained
on (ids ``FOLDER/ID``): data added to a later fine-tuning stage leaves the validation split of ``data`` as it was.

Distributed: when ``torchrun`` sets ``WORLD_SIZE`` > 1, the process group is initialised (gloo on CPU,
nccl on GPU), the model is wrapped in DistributedDataParallel and the data in a DistributedSampler;
only rank 0 writes checkpoints, logs and plots.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from LiverTumorSegLib.errors import InputError
from LiverTumorSegLib.preprocess import InputContract

from .bundle_weights import calibration_batch, initialise_from_bundle, is_bundle
from .datasets import find_cases, find_cases_in, folder_list, kfold_split, load_case
from .losses import CascadeLoss
from .networks import build_model
from .slices import SliceSet, TileSampler, prepare_slices


@dataclass
class TrainConfig:
    data: str | list[str]  # one dataset folder or several
    out: str
    preset: str = "lite"
    dense_skips: bool = True
    subpixel: bool = True
    attention: bool = True
    epochs: int = 160
    patience: int = 12
    batch_size: int = 24
    lr: float = 3e-4
    lr_decay: float = 5e-5
    slices_per_volume: int = 25
    tile: int = 224
    augment: bool = False
    folds: int = 5
    fold: int = 0
    validation_cases: int = 20
    seed: int = 0
    workers: int = 0
    device: str = "auto"
    max_steps_per_epoch: int | None = None
    time_limit_minutes: float | None = None
    resume: bool = False
    real_data: str | None = None
    real_holdout: list[str] = field(default_factory=list)
    real_slices_per_volume: int = 80
    train_only_data: list[str] = field(default_factory=list)
    channels_last: bool = True
    liver_scale: int = 1
    init_from: str | None = None
    contract: dict = field(default_factory=lambda: InputContract().to_dict())

    def __post_init__(self):
        # A liver branch at liver_scale× the spacing pools its input by liver_scale before the network's own ×32.
        multiple = 32 * self.liver_scale
        if self.contract["spatial_multiple"] % multiple:
            self.contract = {**self.contract, "spatial_multiple": multiple}


@dataclass
class TrainResult:
    model: torch.nn.Module  # unwrapped, with the best weights on rank 0 (last weights on other ranks)
    history: list[dict]
    best_epoch: int
    best_validation_loss: float
    split: dict


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def load_slice_sets(config: TrainConfig, case_ids: list[str], cases_by_id: dict, slices_per_volume: int | None = None) -> list[SliceSet]:
    contract = InputContract.from_dict(config.contract)
    sets = []
    for number, case_id in enumerate(case_ids):
        case = cases_by_id[case_id]
        image, labels = load_case(case)
        sets.append(prepare_slices(case_id, image, labels, contract, slices_per_volume or config.slices_per_volume,
                                   seed=config.seed + number, grey_window=case.grey_window))
    return sets


def initialise_from(model: torch.nn.Module, checkpoint: str) -> None:
    """Start from another cascade checkpoint's weights (fine-tuning). A liver branch trained at another scale
    starts from the same weights: its network is the same, only the pooling and upsampling around it differ."""
    weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    coarse = model.liver_scale > 1

    def key(name: str) -> str:
        name = name.replace("liver.net.", "liver.", 1)
        return name.replace("liver.", "liver.net.", 1) if coarse else name

    model.load_state_dict({key(name): value for name, value in weights.items()})


def real_training_split(config: TrainConfig) -> tuple[dict, list[str]]:
    """The cases of ``config.real_data`` by id and the ids trained on (all but ``real_holdout``)."""
    if not config.real_data:
        return {}, []
    real = {case.case_id: case for case in find_cases(config.real_data)}
    unknown = sorted(set(config.real_holdout) - set(real))
    if unknown:
        raise InputError(f"--real-holdout names cases that are not in '{config.real_data}': {', '.join(unknown)}.")
    return real, sorted(set(real) - set(config.real_holdout))


def train_only_cases(config: TrainConfig) -> dict:
    """The cases of ``config.train_only_data`` by ``FOLDER/ID``; they join the training set only."""
    taken = {Path(folder).name for folder in [*folder_list(config.data), *filter(None, [config.real_data])]}
    cases = {}
    for folder in config.train_only_data:
        name = Path(folder).name
        if name in taken:
            raise InputError(f"--train-only-data '{folder}': a training folder named '{name}' is already given; "
                             "folders must have different names to tell their cases apart.")
        taken.add(name)
        cases.update({f"{name}/{case.case_id}": case for case in find_cases(folder)})
    return cases


def train(config: TrainConfig, log=print) -> TrainResult:
    rank, local_rank, world = _distributed()
    device = _device(config, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed_everything(config.seed)
    is_main = rank == 0
    out = Path(config.out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    cases = find_cases_in(config.data)
    split = kfold_split(sorted(cases), config.folds, config.fold, config.validation_cases, config.seed)
    contract = InputContract.from_dict(config.contract)
    real_cases, real_train = real_training_split(config)
    split.update(real_train=real_train, real_holdout=sorted(config.real_holdout))
    extra_cases = train_only_cases(config)
    split["train"] += list(extra_cases)
    cases.update(extra_cases)
    train_sets = load_slice_sets(config, split["train"], cases)
    train_sets += load_slice_sets(config, real_train, real_cases, config.real_slices_per_volume)
    train_sampler = TileSampler(train_sets, contract, tile=config.tile, train=True, augment=config.augment,
                                seed=config.seed, liver_scale=config.liver_scale)
    val_sampler = TileSampler(load_slice_sets(config, split["validation"], cases), contract, tile=config.tile,
                              train=False, seed=config.seed, liver_scale=config.liver_scale)
    if is_main:
        log(f"cases: {len(split['train'])} train (+{len(real_train)} real: {', '.join(real_train) or 'none'}; held out: "
            f"{', '.join(split['real_holdout']) or 'none'}), {len(split['validation'])} validation, {len(split['test'])} test; "
            f"{len(train_sampler)} training and {len(val_sampler)} validation slices; device {device}, world {world}")

    model = build_model("cascade", config.preset, dense_skips=config.dense_skips, subpixel=config.subpixel,
                        attention=config.attention, liver_scale=config.liver_scale).to(device)
    if config.init_from and not (config.resume and (out / "last.pt").exists()):
        if is_bundle(config.init_from):
            initialise_from_bundle(model, config.init_from, calibration_batch(train_sampler))
        else:
            initialise_from(model, config.init_from)
        if is_main:
            log(f"weights initialised from {config.init_from}")
    if config.channels_last:  # NHWC convolutions: faster on CPU (oneDNN) and on tensor-core GPUs
        model = model.to(memory_format=torch.channels_last)
    net = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else model
    criterion = CascadeLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + config.lr_decay * step))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")

    sampler = DistributedSampler(train_sampler, num_replicas=world, rank=rank, shuffle=True, seed=config.seed) if world > 1 else None
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(train_sampler, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=config.workers, drop_last=len(train_sampler) > config.batch_size * world,
                        generator=generator)
    val_loader = DataLoader(val_sampler, batch_size=config.batch_size, shuffle=False, num_workers=config.workers)

    history: list[dict] = []
    best_loss, best_epoch, start_epoch, stale = math.inf, -1, 0, 0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if config.resume and last_path.exists():
        state = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best_loss, best_epoch, stale = state["history"], state["best_loss"], state["best_epoch"], state["stale"]
        start_epoch = state["epoch"] + 1
        if is_main:
            log(f"resumed from {last_path} at epoch {start_epoch}")

    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        train_sampler.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        sums, batches = {}, 0
        epoch_start = time.perf_counter()
        for step, (stack, liver_t, tumour_t) in enumerate(_progress(loader, is_main, f"epoch {epoch + 1}")):
            if config.max_steps_per_epoch and step >= config.max_steps_per_epoch:
                break
            stack, liver_t, tumour_t = stack.to(device), liver_t.to(device), tumour_t.to(device)
            if config.channels_last:
                stack = stack.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                liver_logit, tumour_logit = net(stack)
            loss, parts = criterion(liver_logit.float(), tumour_logit.float(), liver_t, tumour_t)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            batches += 1
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        train_parts = _reduce({k: v / max(batches, 1) for k, v in sums.items()}, world, device)
        val = _reduce(evaluate(model, val_loader, criterion, device), world, device) if len(val_sampler) else {}
        val_loss = val.get("total", train_parts.get("total", math.inf))
        record = {"epoch": epoch + 1, "train_loss": train_parts.get("total"), "validation_loss": val_loss,
                  "validation_dice_liver": val.get("dice_liver"), "validation_dice_tumour": val.get("dice_tumour"),
                  "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - epoch_start, 1),
                  "train_parts": train_parts}
        history.append(record)
        improved = val_loss < best_loss
        if improved:
            best_loss, best_epoch, stale = val_loss, epoch + 1, 0
        else:
            stale += 1
        if is_main:
            log(f"epoch {epoch + 1}: train {record['train_loss']:.4f}, validation {val_loss:.4f}, Dice liver "
                f"{_fmt(record['validation_dice_liver'])} tumour {_fmt(record['validation_dice_tumour'])} "
                f"({record['seconds']} s){' *' if improved else ''}")
            with open(out / "history.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            checkpoint = {"model": model.state_dict(), "config": asdict(config), "epoch": epoch, "split": split}
            if improved:
                torch.save({**checkpoint, "validation": val}, best_path)
            torch.save({**checkpoint, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "history": history, "best_loss": best_loss, "best_epoch": best_epoch, "stale": stale}, last_path)
            plot_history(history, out / "loss_curve.png")
        if stale >= config.patience:
            if is_main:
                log(f"early stopping: no improvement for {config.patience} epochs")
            break
        if config.time_limit_minutes and (time.perf_counter() - started) / 60 >= config.time_limit_minutes:
            if is_main:
                log(f"stopping at the time limit of {config.time_limit_minutes} min")
            break
    if is_main and best_path.exists():
        model.load_state_dict(torch.load(best_path, map_location=device, weights_only=False)["model"])
    return TrainResult(model, history, best_epoch, best_loss, split)


@torch.no_grad()
def evaluate(model, loader, criterion, device) -> dict:
    """Mean validation loss and pooled 2D Dice (probability > 0.5) over the validation tiles."""
    model.eval()
    sums, batches = {}, 0
    overlap = {"liver": [0.0, 0.0], "tumour": [0.0, 0.0]}
    for stack, liver_t, tumour_t in loader:
        stack, liver_t, tumour_t = stack.to(device), liver_t.to(device), tumour_t.to(device)
        liver_logit, tumour_logit = model(stack)
        _, parts = criterion(liver_logit.float(), tumour_logit.float(), liver_t, tumour_t)
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        batches += 1
        for name, logit, target in (("liver", liver_logit, liver_t), ("tumour", tumour_logit, tumour_t)):
            pred = logit > 0
            overlap[name][0] += float((pred & (target > 0.5)).sum())
            overlap[name][1] += float(pred.sum() + (target > 0.5).sum())
    result = {k: v / max(batches, 1) for k, v in sums.items()}
    for name, (inter, total) in overlap.items():
        result[f"dice_{name}"] = 2 * inter / total if total else 1.0
    return result


def _reduce(values: dict, world: int, device) -> dict:
    if world == 1 or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {k: float(v) / world for k, v in zip(keys, tensor.tolist())}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _progress(iterable, enabled: bool, description: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True, disable=None)


def plot_history(history: list[dict], path: Path) -> None:
    """Training and validation loss per epoch, with validation Dice on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(epochs, [h["train_loss"] for h in history], label="training loss")
    ax.plot(epochs, [h["validation_loss"] for h in history], label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (1·liver + 2·tumour)")
    dice_axis = ax.twinx()
    for key, style in (("validation_dice_liver", "g--"), ("validation_dice_tumour", "r--")):
        if any(h.get(key) is not None for h in history):
            dice_axis.plot(epochs, [h.get(key) for h in history], style, label=key.replace("_", " "))
    dice_axis.set_ylim(0, 1)
    dice_axis.set_ylabel("Dice")
    lines = ax.get_legend_handles_labels()
    more = dice_axis.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
