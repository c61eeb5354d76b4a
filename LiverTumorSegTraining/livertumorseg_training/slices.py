"""2.5D training samples: representative slices per volume (paper §4.1) and 224×224 tiles from them.

Volumes are prepared with the engine's :func:`LiverTumorSegLib.preprocess.prepare_volume` — the same
resampling, HU window and body crop as at inference — and stacked with the engine's ``slice_stacks``.

Slice choice ("25 representative slices per volume based on liver coverage and presence of tumour"):
about half of the liver slices chosen are tumour-bearing slices (evenly spread over them), the rest are
spread evenly over the cumulative liver area (more slices where the liver is large), and a fifth of
the budget goes to slices without liver, so that the liver branch, which runs on every slice at
inference, also learns where the liver is not (lung bases, pelvis).

Tiles: the paper crops 224×224 around the liver; we take the tile around the slice's liver centre with
a random offset (±¼ tile) for most samples and anywhere in the body crop for the rest (see the field-of-view
note in ``LiverTumorSegLib.preprocess``). Validation tiles are centred on the liver without offset.

8-bit windowed scans (real CT whose HU window is unknown) keep their grey values in the slice set; each
training tile maps them to HU through a window drawn around the estimate (lower edge −200…−140 HU, width
380…520 HU) and then into the contract's window. Grey 0 and 255 stay at the drawn window's edges: values
beyond them are unknown, so none are invented. Augmented tiles are also rescaled by 0.8–1.25 (the unknown
and varying pixel spacing), with bilinear interpolation for the image and nearest neighbour for the labels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from LiverTumorSegLib.image_io import Image, to_canonical
from LiverTumorSegLib.preprocess import InputContract, prepare_volume, slice_stacks, window_to_uint8

NON_LIVER_FRACTION = 0.2
#: Training draws of the HU window behind an 8-bit scan's grey values: lower edge and width (HU).
GREY_WINDOW_LOW, GREY_WINDOW_WIDTH = (-200.0, -140.0), (380.0, 520.0)
#: Scale augmentation range (tile content zoomed by this factor).
SCALE_RANGE = (0.8, 1.25)


@dataclass
class SliceSet:
    """The selected slices of one case, on the engine's body crop."""

    case_id: str
    stacks: np.ndarray  # uint8 (n, channels, H, W)
    labels: np.ndarray  # uint8 (n, H, W), 0/1/2
    centres: np.ndarray  # float (n, 2): (y, x) liver centre of the slice, or of the nearest liver slice
    grey_window: tuple[float, float] | None = None  # stacks hold 8-bit grey values of this estimated HU window


def select_slices(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``count`` representative slices (fewer if the volume has fewer), sorted."""
    area = (labels >= 1).reshape(labels.shape[0], -1).sum(axis=1)
    tumour = (labels == 2).reshape(labels.shape[0], -1).any(axis=1)
    liver_z, other_z = np.flatnonzero(area > 0), np.flatnonzero(area == 0)
    if count >= labels.shape[0]:
        return np.arange(labels.shape[0])
    n_other = min(len(other_z), int(round(NON_LIVER_FRACTION * count)) if len(liver_z) else count)
    n_liver = min(len(liver_z), count - n_other)
    chosen: set[int] = set()
    tumour_z = np.flatnonzero(tumour)
    if len(tumour_z):
        n_tumour = min(len(tumour_z), n_liver // 2)
        chosen.update(tumour_z[np.unique(np.linspace(0, len(tumour_z) - 1, n_tumour).round().astype(int))].tolist())
    remaining = np.array([z for z in liver_z if z not in chosen])
    need = n_liver - len(chosen)
    if need > 0 and len(remaining):
        cumulative = np.cumsum(area[remaining]).astype(float)
        targets = (np.arange(need) + 0.5) / need * cumulative[-1]
        picks = np.searchsorted(cumulative, targets)
        chosen.update(remaining[np.unique(np.clip(picks, 0, len(remaining) - 1))].tolist())
    if n_other:
        chosen.update(rng.choice(other_z, size=n_other, replace=False).tolist())
    return np.array(sorted(chosen), dtype=int)


def prepare_slices(case_id: str, image: Image, labels: np.ndarray, contract: InputContract, count: int, seed: int,
                   grey_window: tuple[float, float] | None = None) -> SliceSet:
    """Canonical orientation, engine preprocessing, slice selection and 2.5D stacks for one case.

    With ``grey_window`` (an 8-bit windowed scan, given in HU by that estimated window) the stacks keep the
    grey values of that window instead of the contract's, so that training can redraw the window per tile.
    """
    canonical, _ = to_canonical(image)
    canonical_labels, _ = to_canonical(image.with_array(labels))
    window_contract = replace(contract, hu_window=tuple(grey_window)) if grey_window else contract
    prepared = prepare_volume(canonical, window_contract, labels=canonical_labels.array)
    z = select_slices(prepared.labels, count, np.random.default_rng(seed))
    stacks = slice_stacks(prepared.intensities, z, contract.stack_offsets).astype(np.uint8)
    return SliceSet(case_id, stacks, prepared.labels[z], _liver_centres(prepared.labels, z), grey_window)


def _liver_centres(labels: np.ndarray, z: np.ndarray) -> np.ndarray:
    liver = labels >= 1
    has = liver.reshape(liver.shape[0], -1).any(axis=1)
    default = np.array(liver.shape[1:], float) / 2
    if not has.any():
        return np.tile(default, (len(z), 1))
    liver_z = np.flatnonzero(has)
    centres = []
    for k in z:
        nearest = liver_z[np.argmin(np.abs(liver_z - k))]
        centres.append(ndimage.center_of_mass(liver[nearest]))
    return np.asarray(centres, float)


class TileSampler:
    """Draws (stack, liver target, tumour target) tiles; deterministic in (seed, epoch, index).

    With ``liver_scale`` > 1 (a liver branch at that many times the grid's spacing) the stack and the liver target
    cover a window ``liver_scale`` times the tile's size, and the tumour target is the window's central tile.
    """

    def __init__(self, slice_sets: list[SliceSet], contract: InputContract, *, tile: int | None = None,
                 liver_centred: float = 0.8, train: bool = True, augment: bool = False, seed: int = 0,
                 liver_scale: int = 1):
        self.sets, self.contract = slice_sets, contract
        self.tile = (tile or contract.training_tile) * liver_scale
        self.liver_scale = liver_scale
        self.liver_centred, self.train, self.augment, self.seed = liver_centred, train, augment, seed
        self.index = [(s, k) for s, slice_set in enumerate(slice_sets) for k in range(len(slice_set.stacks))]
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, item: int):
        s, k = self.index[item]
        slice_set = self.sets[s]
        rng = np.random.default_rng((self.seed, self.epoch, item))
        height, width = slice_set.labels.shape[1:]
        half = self.tile // 2
        if not self.train:
            cy, cx = slice_set.centres[k]
        elif rng.random() < self.liver_centred:
            jitter = self.tile / self.liver_scale / 4  # the tumour tile stays around the liver
            cy, cx = slice_set.centres[k] + rng.uniform(-jitter, jitter, size=2)
        else:
            cy, cx = rng.uniform(half, max(half, height - half)), rng.uniform(half, max(half, width - half))
        scale = float(np.exp(rng.uniform(*np.log(SCALE_RANGE)))) if self.augment else 1.0
        size = int(round(self.tile * scale))
        y0, x0 = int(round(cy)) - size // 2, int(round(cx)) - size // 2
        stack = _window(slice_set.stacks[k], y0, x0, size)
        labels = _window(slice_set.labels[k][None], y0, x0, size)[0]
        if size != self.tile:
            zoom = self.tile / size
            stack = ndimage.zoom(stack.astype(np.float32), (1, zoom, zoom), order=1, grid_mode=True, mode="grid-constant")
            labels = ndimage.zoom(labels, zoom, order=0, grid_mode=True, mode="grid-constant")
        stack = self._intensities(stack.astype(np.float32), slice_set.grey_window, rng)
        inner = self.tile // self.liver_scale
        centre = slice((self.tile - inner) // 2, (self.tile - inner) // 2 + inner)
        return stack, (labels >= 1).astype(np.float32)[None], (labels[centre, centre] == 2).astype(np.float32)[None]

    def _intensities(self, stack: np.ndarray, grey_window, rng: np.random.Generator) -> np.ndarray:
        """The tile in the contract's [0, 255] window: an 8-bit scan through its (redrawn) window; a HU-derived
        tile with scanner and contrast variation when augmenting (gain ±10 %, offset ±15 HU, noise ≤ 10 HU)."""
        if grey_window is not None:
            if self.train and self.augment:
                low = rng.uniform(*GREY_WINDOW_LOW)
                high = low + rng.uniform(*GREY_WINDOW_WIDTH)
            else:
                low, high = grey_window
            return window_to_uint8(low + stack * np.float32((high - low) / 255.0), self.contract.hu_window).astype(np.float32)
        if not self.augment:
            return stack
        low, high = self.contract.hu_window
        per_level = (high - low) / 255.0
        hu = jitter_hu(stack * per_level + low, rng)
        return np.clip(np.rint((hu - low) / per_level), 0, 255).astype(np.float32)


def jitter_hu(hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scanner and contrast variation of a float HU array: gain ±10 %, offset ±15 HU, Gaussian noise σ ≤ 10 HU."""
    return hu * rng.uniform(0.9, 1.1) + rng.uniform(-15, 15) + rng.normal(0, rng.uniform(0, 10), size=hu.shape)


def _window(array: np.ndarray, y0: int, x0: int, size: int) -> np.ndarray:
    """``array[:, y0:y0+size, x0:x0+size]`` with zero padding where the window leaves the array."""
    out = np.zeros((array.shape[0], size, size), array.dtype)
    ys, xs = slice(max(y0, 0), min(y0 + size, array.shape[1])), slice(max(x0, 0), min(x0 + size, array.shape[2]))
    out[:, ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = array[:, ys, xs]
    return out
