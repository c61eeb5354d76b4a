"""Training of the seed baselines — 3D U-Net (002), H-DenseUNet (004), E²Net (003) — on the cascade's data and split.

Each model trains with its published recipe (SEED_SPECS), in phases run one after another; a phase ends at its
epoch limit, at early stopping on its validation loss, or at its share of ``time_limit_minutes``, and leaves the
weights of its best validation epoch in the model. Choices where the papers are silent or do not fit here:

- Data: the same case-level split as the cascade (:func:`datasets.kfold_split` with the same arguments). Volumes
  are put into the engine's canonical orientation and fed exactly as the engine feeds them at inference
  (``LiverTumorSegLib.baseline_networks.normalise`` / ``resize``), so training and inference share one definition.
- Augmentation (``augment``, on by default): the cascade's HU jitter (gain ±10 %, offset ±15 HU, noise σ ≤ 10 HU)
  on top of what each paper publishes (H-DenseUNet: mirroring and scaling 0.8–1.2; the others: none). The
  phantoms are the only training data, and the models are meant for real CT.
- 3D U-Net: Adam 1e-4, constant; batch 1 resized volume; AdvancedComboLoss on the liver (tumour merged).
- H-DenseUNet: SGD (momentum 0.9, Nesterov), poly decay ``lr·(1 − t)^0.9`` over each phase's budget; phases
  ``2d-warmup`` (2D branch without UNet connections, lr 0.01), ``2d`` (with them, lr 0.01), ``3d`` (2D branch
  frozen, lr 0.01) and ``joint`` (everything, λ = 0.5, lr 1e-3 as the official fine-tune scripts). 2D batches:
  8 stacks of 224²; slab batches: one 12 × 224 × 224 slab. Crop centres: half liver and half tumour voxels (liver
  when the case has none), inside the liver box ±3 voxels — and, for the 2D phases only, one crop in three
  anywhere in the volume: the 2D branch as it is after its phase is kept (frozen) as the **coarse liver network**
  that gives the ROI at inference (the paper's separate coarse ResNet; SEED_SPECS 3.8.7 allows any 2D liver net).
- E²Net: SGD (momentum 0.9, weight decay 1e-4), lr 0.01 divided by 10 when the validation loss has not improved
  for 3 epochs, phase ends after the second decrease; stage 1 on random 448² crops of whole slices (two in three
  from slices holding liver), batch 4; stage 2 on the ground-truth liver box plus a random 10–60 px margin
  resized to 256², batch 8, edge-distance targets. ImageNet weights are not used (no network access; random
  initialisation as the official Res2Net code).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from LiverTumorSegLib.baseline_networks import normalise, resize
from LiverTumorSegLib.image_io import Image, to_canonical
from LiverTumorSegLib.masks import bounding_box

from .baseline_losses import AdvancedComboLoss, E2NetStage1Loss, E2NetStage2Loss, HDenseUNetLoss, e2net_targets
from .datasets import find_cases_in, kfold_split, load_case
from .networks import build_model
from .slices import jitter_hu
from .train import _device, _progress, plot_history, seed_everything

BASELINE_MODELS = ("unet3d", "hdenseunet", "e2net")


@dataclass
class BaselineConfig:
    model: str
    data: str | list[str]  # one dataset folder or several
    out: str
    preset: str = "lite"
    folds: int = 1
    fold: int = 0
    validation_cases: int = 8
    seed: int = 0
    epochs: int = 200  # over all phases, shared out like the time limit
    steps_per_epoch: int = 40
    patience: int = 10
    time_limit_minutes: float | None = None
    augment: bool = True
    device: str = "auto"
    validation_batches: int = 8


@dataclass
class Phase:
    """One training phase: what to sample, how to score it, how to optimise it."""

    name: str
    share: float  # of the epochs and of the time limit
    sample: Callable[[np.random.Generator, bool], tuple]  # (rng, train) -> batch of tensors
    loss: Callable[[torch.nn.Module, tuple], tuple]  # (model, batch) -> (loss, parts)
    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
    schedule: str = "constant"  # "constant", "poly" or "plateau"
    prepare: Callable[[torch.nn.Module], None] = lambda model: None
    finish: Callable[[torch.nn.Module, dict], None] = lambda model, extra: None


#: Crop centres are drawn from at most this many liver and tumour voxels per case (drawn once, seeded).
CENTRE_POOL = 20_000


@dataclass
class Volume:
    """A training case in the canonical orientation: HU (int16) and labels (uint8), (z, y, x)."""

    case_id: str
    hu: np.ndarray
    labels: np.ndarray
    liver_box: tuple[slice, slice, slice] | None = None
    centres: dict = field(default_factory=dict)  # "liver" / "tumour" → (n, 3) voxel indices


def load_volumes(case_ids: list[str], cases: dict, seed: int = 0) -> list[Volume]:
    rng = np.random.default_rng(seed)
    volumes = []
    for case_id in case_ids:
        image, labels = load_case(cases[case_id])
        canonical = to_canonical(image)[0]
        labels = to_canonical(Image(labels, image.geometry))[0].array.astype(np.uint8)
        hu = np.clip(np.rint(canonical.array), -1024, 3071).astype(np.int16)
        centres = {}
        for name, mask in (("liver", labels >= 1), ("tumour", labels == 2)):
            voxels = np.argwhere(mask)
            if len(voxels):
                centres[name] = voxels[rng.choice(len(voxels), min(len(voxels), CENTRE_POOL), replace=False)]
        volumes.append(Volume(case_id, hu, labels, bounding_box(labels >= 1), centres))
    return volumes


def _jitter(hu: np.ndarray, rng: np.random.Generator, augment: bool) -> np.ndarray:
    return jitter_hu(hu.astype(np.float32), rng) if augment else hu.astype(np.float32)


def _sgd(lr: float, nesterov: bool = False, weight_decay: float = 0.0):
    def make(model):
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                               nesterov=nesterov, weight_decay=weight_decay)
    return make


def _adam(lr: float):
    return lambda model: torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)


# ------------------------------------------------------------------------------------------ 3D U-Net
def unet3d_phases(model, contract: dict, train: list[Volume], validation: list[Volume], config: BaselineConfig, device) -> list[Phase]:
    shape = tuple(contract["shape_zyx"])
    low, high = contract["hu_window"]

    def small(volumes):  # clip, then zoom: the engine's resize(normalise(HU)) up to the affine map
        return [(resize(np.clip(v.hu, low, high).astype(np.float32), shape, 1),
                 resize((v.labels >= 1).astype(np.uint8), shape, 0)) for v in volumes]

    train_set, val_set = small(train), small(validation)
    criterion = AdvancedComboLoss()

    def sample(rng, is_train):
        hu, liver = train_set[rng.integers(len(train_set))] if is_train else val_set[rng.integers(len(val_set))]
        x = normalise(_jitter(hu, rng, config.augment and is_train), contract)
        return torch.from_numpy(x[None, None]).to(device), torch.from_numpy(liver[None, None].astype(np.float32)).to(device)

    return [Phase("3d", 1.0, sample, lambda m, b: criterion(m(b[0]), b[1]), _adam(1e-4))]


# --------------------------------------------------------------------------------------- H-DenseUNet
def _crop_centre(volume: Volume, rng: np.random.Generator, anywhere: bool) -> tuple[int, int, int]:
    if anywhere or "liver" not in volume.centres:
        return tuple(int(rng.integers(s)) for s in volume.hu.shape)
    pool = volume.centres["tumour" if "tumour" in volume.centres and rng.random() < 0.5 else "liver"]
    return tuple(int(v) for v in pool[rng.integers(len(pool))])


def _window(array: np.ndarray, z0: int, y0: int, x0: int, depth: int, size: int, fill) -> np.ndarray:
    """``array[z0:z0+depth, y0:y0+size, x0:x0+size]``; slices past the ends repeat, pixels past the edges are ``fill``."""
    zi = np.clip(np.arange(z0, z0 + depth), 0, array.shape[0] - 1)
    out = np.full((depth, size, size), fill, array.dtype)
    ys = slice(max(y0, 0), min(y0 + size, array.shape[1]))
    xs = slice(max(x0, 0), min(x0 + size, array.shape[2]))
    out[:, ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = array[zi][:, ys, xs]
    return out


def hdenseunet_crop(volume: Volume, rng: np.random.Generator, depth: int, size: int, *, anywhere: bool,
                    augment: bool, contract: dict) -> tuple[np.ndarray, np.ndarray]:
    """A (depth, size, size) network-input crop and its labels: scaled 0.8–1.2, mirrored (seed 004), HU jitter."""
    cz, cy, cx = _crop_centre(volume, rng, anywhere)
    scale = rng.uniform(0.8, 1.2) if augment else 1.0
    extent = max(32, int(round(size * scale)))
    if not anywhere and volume.liver_box is not None:  # keep the crop centre inside the liver box ± 3 voxels
        box = volume.liver_box
        cy = int(np.clip(cy, box[1].start - 3, box[1].stop + 3))
        cx = int(np.clip(cx, box[2].start - 3, box[2].stop + 3))
    z0, y0, x0 = cz - depth // 2, cy - extent // 2, cx - extent // 2
    hu = _window(volume.hu, z0, y0, x0, depth, extent, -1024)
    labels = _window(volume.labels, z0, y0, x0, depth, extent, 0)
    if extent != size:
        hu = resize(hu.astype(np.float32), (depth, size, size), 3)
        labels = resize(labels, (depth, size, size), 0)
    if augment and rng.random() < 0.5:
        hu, labels = hu[:, :, ::-1], labels[:, :, ::-1]
    return normalise(_jitter(hu, rng, augment), contract), np.ascontiguousarray(labels)


def hdenseunet_phases(model, contract: dict, train: list[Volume], validation: list[Volume], config: BaselineConfig, device) -> list[Phase]:
    depth, size = int(contract["slices"]), 224

    def stack_batch(rng, is_train, count=8):
        volumes = train if is_train else validation
        stacks, labels = [], []
        for _ in range(count):
            anywhere = rng.random() < 1 / 3
            x, y = hdenseunet_crop(volumes[rng.integers(len(volumes))], rng, 3, size, anywhere=anywhere,
                                   augment=config.augment and is_train, contract=contract)
            stacks.append(x)
            labels.append(y[1])
        return torch.from_numpy(np.stack(stacks)).to(device), torch.from_numpy(np.stack(labels).astype(np.int64)).to(device)

    def slab_batch(rng, is_train):
        volumes = train if is_train else validation
        x, y = hdenseunet_crop(volumes[rng.integers(len(volumes))], rng, depth, size, anywhere=False,
                               augment=config.augment and is_train, contract=contract)
        return torch.from_numpy(x[None, None].copy()).to(device), torch.from_numpy(y[None].astype(np.int64)).to(device)

    loss_2d, loss_3d, loss_joint = HDenseUNetLoss("2d"), HDenseUNetLoss("3d"), HDenseUNetLoss("joint")

    def set_phase(phase, connections=True):
        def prepare(m):
            m.set_phase(phase)
            m.dense2d.set_unet_connections(connections)
        return prepare

    def keep_coarse(m, extra):
        extra["coarse_liver"] = copy.deepcopy(m.dense2d.state_dict())

    return [
        Phase("2d-warmup", 0.05, stack_batch, lambda m, b: loss_2d(m.forward_2d(b[0]), b[1]), _sgd(0.01, True), "poly",
              set_phase("2d", False)),
        Phase("2d", 0.40, stack_batch, lambda m, b: loss_2d(m.forward_2d(b[0]), b[1]), _sgd(0.01, True), "poly",
              set_phase("2d"), keep_coarse),
        Phase("3d", 0.20, slab_batch, lambda m, b: loss_3d(m(b[0]), b[1]), _sgd(0.01, True), "poly", set_phase("3d")),
        Phase("joint", 0.35, slab_batch, lambda m, b: loss_joint(m(b[0]), b[1]), _sgd(1e-3, True), "poly", set_phase("joint")),
    ]


# --------------------------------------------------------------------------------------------- E²Net
def e2net_stage2_crop(volume: Volume, z: int, rng: np.random.Generator, contract: dict, augment: bool,
                      margin: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth liver box of slice ``z`` plus a random 10–60 px margin, resized to the stage-2 shape."""
    from LiverTumorSegLib.baseline_networks import liver_box_2d

    shape = tuple(contract["stage2_shape_yx"])
    ys, xs = liver_box_2d(volume.labels[z] >= 1, int(rng.integers(10, 61)) if margin is None else margin)
    hu = resize(volume.hu[z][ys, xs].astype(np.float32), shape, 1)
    labels = resize(volume.labels[z][ys, xs], shape, 0)
    return normalise(_jitter(hu, rng, augment), contract), labels


def e2net_phases(model, contract: dict, train: list[Volume], validation: list[Volume], config: BaselineConfig, device) -> list[Phase]:
    def liver_slices(volumes):
        return [(v, z) for v in volumes for z in np.nonzero((v.labels >= 1).any(axis=(1, 2)))[0]]

    train_liver, val_liver = liver_slices(train), liver_slices(validation)

    def stage1_batch(rng, is_train, count=4, crop=448):
        volumes, liver = (train, train_liver) if is_train else (validation, val_liver)
        images, targets = [], []
        for _ in range(count):
            if rng.random() < 2 / 3:
                volume, z = liver[rng.integers(len(liver))]
            else:
                volume = volumes[rng.integers(len(volumes))]
                z = int(rng.integers(volume.hu.shape[0]))
            y0 = int(rng.integers(max(volume.hu.shape[1] - crop, 0) + 1))
            x0 = int(rng.integers(max(volume.hu.shape[2] - crop, 0) + 1))
            hu = _window(volume.hu[z : z + 1], 0, y0, x0, 1, crop, -1024)[0]
            images.append(normalise(_jitter(hu, rng, config.augment and is_train), contract))
            targets.append(_window(volume.labels[z : z + 1], 0, y0, x0, 1, crop, 0)[0] >= 1)
        return (torch.from_numpy(np.stack(images)[:, None]).to(device),
                torch.from_numpy(np.stack(targets)[:, None].astype(np.float32)).to(device))

    def stage2_batch(rng, is_train, count=8):
        liver = train_liver if is_train else val_liver
        images, labels = [], []
        for _ in range(count):
            volume, z = liver[rng.integers(len(liver))]
            x, y = e2net_stage2_crop(volume, z, rng, contract, config.augment and is_train)
            images.append(x)
            labels.append(y)
        masks, edges = e2net_targets(np.stack(labels))
        return (torch.from_numpy(np.stack(images)[:, None]).to(device), torch.from_numpy(masks).to(device),
                torch.from_numpy(edges).to(device))

    stage1_loss, stage2_loss = E2NetStage1Loss(), E2NetStage2Loss()
    return [
        Phase("stage1", 0.4, stage1_batch, lambda m, b: stage1_loss(m(b[0], stage=1), b[1]),
              _sgd(0.01, weight_decay=1e-4), "plateau"),
        Phase("stage2", 0.6, stage2_batch, lambda m, b: stage2_loss(m(b[0], stage=2), b[1], b[2]),
              _sgd(0.01, weight_decay=1e-4), "plateau"),
    ]


PHASES = {"unet3d": unet3d_phases, "hdenseunet": hdenseunet_phases, "e2net": e2net_phases}


# --------------------------------------------------------------------------------------- the loop
def train_baseline(config: BaselineConfig, log=print) -> Path:
    """Train one baseline; writes ``best.pt`` (weights after the last phase), ``history.jsonl``, ``loss_curve.png``."""
    if config.model not in PHASES:
        raise ValueError(f"unknown baseline {config.model!r}; one of {', '.join(BASELINE_MODELS)}")
    seed_everything(config.seed)
    device = _device(config, 0)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = find_cases_in(config.data)
    split = kfold_split(sorted(cases), config.folds, config.fold, config.validation_cases, config.seed)
    started = time.perf_counter()
    train = load_volumes(split["train"], cases, config.seed)
    validation = load_volumes(split["validation"], cases, config.seed + 1)
    log(f"{config.model} ({config.preset}): {len(train)} training and {len(validation)} validation cases loaded "
        f"in {time.perf_counter() - started:.0f} s; device {device}")
    model = build_model(config.model, config.preset).to(device)
    contract = model.input_contract
    phases = PHASES[config.model](model, contract, train, validation, config, device)
    rng = np.random.default_rng(config.seed)
    history, extra = [], {}
    (out / "history.jsonl").write_text("", encoding="utf-8")
    for phase in phases:
        phase.prepare(model)
        best = _run_phase(model, phase, config, rng, history, out, log)
        model.load_state_dict(best)
        phase.finish(model, extra)
    checkpoint = {"model": model.state_dict(), "model_name": config.model, "preset": config.preset,
                  "config": asdict(config), "split": split, "history": history, "extra": extra,
                  "epochs_run": len(history), "validation": {p.name: min(h["validation_loss"] for h in history if h["phase"] == p.name) for p in phases}}
    torch.save(checkpoint, out / "best.pt")
    log(f"done in {(time.perf_counter() - started) / 60:.1f} min; checkpoint {out / 'best.pt'}")
    return out / "best.pt"


def _run_phase(model, phase: Phase, config: BaselineConfig, rng, history: list, out: Path, log) -> dict:
    optimizer = phase.optimizer(model)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    budget = config.time_limit_minutes * 60 * phase.share if config.time_limit_minutes else None
    max_epochs = max(1, math.ceil(config.epochs * phase.share))
    val_rng = np.random.default_rng(config.seed + 1)
    validation = [phase.sample(val_rng, False) for _ in range(config.validation_batches)]
    best_loss, best_state, stale, plateau_stale, decreases = math.inf, copy.deepcopy(model.state_dict()), 0, 0, 0
    started = time.perf_counter()
    for epoch in range(max_epochs):
        model.train()
        sums, epoch_start = {}, time.perf_counter()
        for _ in _progress(range(config.steps_per_epoch), True, f"{phase.name} epoch {epoch + 1}"):
            if phase.schedule == "poly":
                done = (time.perf_counter() - started) / budget if budget else epoch / max_epochs
                for group, lr in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = lr * max(1.0 - done, 0.0) ** 0.9
            loss, parts = phase.loss(model, phase.sample(rng, True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        model.eval()
        with torch.no_grad():
            val_loss = float(np.mean([float(phase.loss(model, batch)[0]) for batch in validation]))
        record = {"phase": phase.name, "epoch": len(history) + 1, "train_loss": sums.get("total", 0.0) / config.steps_per_epoch,
                  "validation_loss": val_loss, "lr": optimizer.param_groups[0]["lr"],
                  "seconds": round(time.perf_counter() - epoch_start, 1)}
        history.append(record)
        with open(out / "history.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        improved = val_loss < best_loss
        if improved:
            best_loss, best_state, stale, plateau_stale = val_loss, copy.deepcopy(model.state_dict()), 0, 0
        else:
            stale += 1
            plateau_stale += 1
        log(f"{phase.name} epoch {epoch + 1}: train {record['train_loss']:.4f}, validation {val_loss:.4f}, "
            f"lr {record['lr']:.2e} ({record['seconds']} s){' *' if improved else ''}")
        plot_history([{**h, "validation_dice_liver": None, "validation_dice_tumour": None} for h in history], out / "loss_curve.png")
        if phase.schedule == "plateau" and plateau_stale >= 3:
            decreases += 1
            if decreases > 2:
                log(f"{phase.name}: second learning-rate decrease reached a plateau; phase ends")
                break
            for group in optimizer.param_groups:
                group["lr"] /= 10
            plateau_stale = 0
        if stale >= config.patience:
            log(f"{phase.name}: early stopping, no improvement for {config.patience} epochs")
            break
        if budget and time.perf_counter() - started >= budget:
            log(f"{phase.name}: time budget of {budget / 60:.1f} min reached")
            break
    return best_state
