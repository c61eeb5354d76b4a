"""Network stage of the seed baselines: the input contracts other than the cascade's 2.5D stack.

A bundle's manifest says under ``input.kind`` how its networks read the CT:

- ``volume_resized`` — 3D U-Net (seed 002): the whole volume zoomed to one fixed grid, one liver logit per voxel;
  the probability map is zoomed back to the input grid and thresholded (liver only, as published);
- ``slab_2_5d`` — H-DenseUNet (seed 004): a coarse 2D liver network on every native slice gives the liver ROI;
  the hybrid network runs on 12-slice slabs of the ROI (stride 3, the outer slice of each side dropped,
  probabilities averaged); liver = P(liver) + P(tumour) > 0.5, tumour = P(tumour) > 0.9, largest liver
  component, holes filled, tumour kept inside the liver;
- ``slice_2d`` — E²Net (seed 003): stage 1 finds the liver on every native slice; stage 2 reads the liver box
  (+35 px) of each slice resized to 256 × 256; its probabilities are resized back and thresholded at 0.5.

Everything runs on the canonical grid of the input at its native resolution; the result is a 0/1/2 label map on
that grid. The intensity mapping of each contract is numeric in the manifest (``intensity``), so the trainer and
the engine share one definition (:func:`normalise`), as they share :func:`resize`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

from .errors import BundleError, Cancelled
from .masks import bounding_box, grow_box, label_lesions

KINDS = ("volume_resized", "slab_2_5d", "slice_2d")
#: Components each kind needs in the bundle.
COMPONENTS = {"volume_resized": ("unet3d",), "slab_2_5d": ("coarse_liver", "hdenseunet"), "slice_2d": ("stage1", "stage2")}
#: Contract keys each kind needs (besides ``kind``, ``hu_window`` and ``intensity``).
REQUIRED = {"volume_resized": ("shape_zyx", "thresholds"), "slab_2_5d": ("slices", "size_multiple_zyx", "tiling", "thresholds", "roi_margin"),
            "slice_2d": ("size_multiple_yx", "stage2_shape_yx", "box_margin_px", "thresholds")}

Progress = Callable[[str, float], None]


def check_contract(kind: str, contract: dict, components: dict) -> None:
    """:class:`BundleError` when a baseline bundle lacks a contract field or a component its kind needs."""
    if kind not in KINDS:
        raise BundleError(f"unknown input kind {kind!r}; this LiverTumorSeg runs 'cascade_2_5d', {', '.join(map(repr, KINDS))}.")
    missing = [key for key in ("hu_window", "intensity", *REQUIRED[kind]) if key not in contract]
    if missing:
        raise BundleError(f"the '{kind}' input contract lacks {', '.join(missing)}")
    lacking = [name for name in COMPONENTS[kind] if name not in components]
    if lacking:
        raise BundleError(f"a '{kind}' bundle needs the components {', '.join(COMPONENTS[kind])}; it lacks {', '.join(lacking)}")


def normalise(hu: np.ndarray, contract: dict) -> np.ndarray:
    """float32 network input: ``(clip(HU, window) + shift) · scale + offset`` (the contract's ``intensity``)."""
    low, high = contract["hu_window"]
    mapping = contract["intensity"]
    x = np.clip(hu, low, high, dtype=np.float32)
    x += np.float32(mapping["shift"])
    x *= np.float32(mapping["scale"])
    x += np.float32(mapping["offset"])
    return x


def window_floor(contract: dict) -> float:
    """The network input of the lowest HU of the window (the value outside the body, used for padding)."""
    return float(normalise(np.float32(contract["hu_window"][0]), contract))


def resize(array: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """``array`` zoomed independently along every axis to exactly ``shape`` (scipy.ndimage.zoom, corners aligned)."""
    factors = [t / s for t, s in zip(shape, array.shape)]
    out = ndimage.zoom(array, factors, order=order, mode="nearest", prefilter=order > 1)
    if out.shape != tuple(shape):  # zoom rounds the output shape; the factors above make it exact
        raise AssertionError(f"resize gave {out.shape}, expected {tuple(shape)}")
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a 3D mask, id 1 of :func:`.masks.label_lesions` (ties: the first in
    array order; empty stays empty)."""
    return label_lesions(mask)[0] == 1


def pad_to_multiple(array: np.ndarray, multiples: tuple[int, ...], value: float) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad the last axes at their end to multiples of ``multiples``; returns the array and the slices of the original."""
    lead = array.ndim - len(multiples)
    pads = [(0, 0)] * lead + [(0, (-size) % m) for size, m in zip(array.shape[lead:], multiples)]
    inside = tuple(slice(0, size) for size in array.shape)
    return np.pad(array, pads, constant_values=value), inside


def run_baseline(hu: np.ndarray, bundle, *, device: str = "cpu", threads: int | None = None,
                 progress: Progress | None = None, cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, dict]:
    """0/1/2 label map of a canonical CT volume ``hu`` (z, y, x) at its own resolution, and run details."""
    contract = bundle.manifest["input"]
    kind = contract["kind"]
    sessions = {name: bundle.session(name, device=device, threads=threads) for name in COMPONENTS[kind]}
    run = {"volume_resized": _volume_resized, "slab_2_5d": _slab_2_5d, "slice_2d": _slice_2d}[kind]
    return run(np.asarray(hu), contract, sessions, progress or (lambda stage, fraction: None), cancel or (lambda: False))


def _infer(session, x: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def _check(cancel) -> None:
    if cancel():
        raise Cancelled("Segmentation cancelled; nothing was written.")


# ------------------------------------------------------------------------------ 3D U-Net (seed 002)
def _volume_resized(hu, contract, sessions, progress, cancel):
    shape = tuple(int(s) for s in contract["shape_zyx"])
    progress("network", 0.0)
    small = resize(normalise(hu, contract), shape, order=1)
    probability = _infer(sessions["unet3d"], small[None, None])[0, 0]
    _check(cancel)
    liver = resize(probability, hu.shape, order=1) > float(contract["thresholds"]["liver"])
    progress("network", 1.0)
    return liver.astype(np.uint8), {"grid_zyx": list(shape)}


# --------------------------------------------------------------------------- H-DenseUNet (seed 004)
def stacks_of(volume: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """(len(indices), 3, H, W) stacks of slices z−1, z, z+1 (edge slices repeated at the volume's ends)."""
    last = volume.shape[0] - 1
    return np.stack([volume[np.clip(indices + offset, 0, last)] for offset in (-1, 0, 1)], axis=1)


def _slab_2_5d(hu, contract, sessions, progress, cancel, batch: int = 4):
    x = normalise(hu, contract)
    background = window_floor(contract)
    padded, inside = pad_to_multiple(x, (32, 32), background)
    coarse = np.zeros(hu.shape, bool)
    for start in range(0, hu.shape[0], batch):
        _check(cancel)
        indices = np.arange(start, min(start + batch, hu.shape[0]))
        p = _infer(sessions["coarse_liver"], stacks_of(padded, indices))
        coarse[indices] = (p[:, 1] + p[:, 2])[:, inside[1], inside[2]] > 0.5
        progress("coarse liver network", (start + len(indices)) / hu.shape[0])
    coarse = largest_component(coarse)
    if not coarse.any():
        return np.zeros(hu.shape, np.uint8), {"roi": None}
    below, above, in_plane = contract["roi_margin"]
    z, y, xx = bounding_box(coarse)
    z0, z1 = max(z.start - int(below), 0), min(z.stop + int(above), hu.shape[0])
    y0, y1 = max(y.start - int(in_plane), 0), min(y.stop + int(in_plane), hu.shape[1])
    x0, x1 = max(xx.start - int(in_plane), 0), min(xx.stop + int(in_plane), hu.shape[2])
    depth, stride, drop = (int(contract["tiling"][k]) for k in ("z_window", "z_stride", "z_drop"))
    roi, _ = pad_to_multiple(x[:, y0:y1, x0:x1], (32, 32), background)
    # Windows start `drop` slices before the ROI so that its first slice is a kept one; the volume's ends are
    # repeated where a window reaches past them.
    starts = list(range(z0 - drop, z1 - drop, stride))
    if starts[-1] + depth - drop < z1:
        starts.append(z1 - depth + drop)
    total = np.zeros((3, z1 - z0) + roi.shape[1:], np.float32)
    count = np.zeros(z1 - z0, np.float32)
    for number, start in enumerate(starts):
        _check(cancel)
        slab = roi[np.clip(np.arange(start, start + depth), 0, hu.shape[0] - 1)]
        p = _infer(sessions["hdenseunet"], slab[None, None])[0]
        for k in range(drop, depth - drop):
            zi = start + k
            if z0 <= zi < z1:
                total[:, zi - z0] += p[:, k]
                count[zi - z0] += 1
        progress("H-DenseUNet", (number + 1) / len(starts))
    p = total / np.maximum(count, 1)[None, :, None, None]
    p = p[:, :, : y1 - y0, : x1 - x0]
    thresholds = contract["thresholds"]
    liver = np.zeros(hu.shape, bool)
    tumour = np.zeros(hu.shape, bool)
    liver[z0:z1, y0:y1, x0:x1] = p[1] + p[2] > float(thresholds["liver"])
    tumour[z0:z1, y0:y1, x0:x1] = p[2] > float(thresholds["tumour"])
    liver = ndimage.binary_fill_holes(largest_component(liver))
    tumour = ndimage.binary_fill_holes(tumour) & liver
    labels = liver.astype(np.uint8)
    labels[tumour] = 2
    return labels, {"roi_zyx": [[z0, z1], [y0, y1], [x0, x1]], "slabs": len(starts)}


# -------------------------------------------------------------------------------- E²Net (seed 003)
def liver_box_2d(mask: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    """In-plane bounding box of a 2D mask plus ``margin`` pixels, clipped to the slice."""
    found = bounding_box(mask)
    return None if found is None else grow_box(found, margin, mask.shape)


def _slice_2d(hu, contract, sessions, progress, cancel, batch: int = 4):
    x = normalise(hu, contract)
    padded, inside = pad_to_multiple(x, (32, 32), window_floor(contract))
    thresholds = contract["thresholds"]
    liver = np.zeros(hu.shape, bool)
    for start in range(0, hu.shape[0], batch):
        _check(cancel)
        p = _infer(sessions["stage1"], padded[start : start + batch, None])
        liver[start : start + batch] = p[:, 0][:, inside[1], inside[2]] > float(thresholds["stage1_liver"])
        progress("E2Net liver stage", min(1.0, (start + batch) / hu.shape[0]))
    liver = largest_component(liver)
    labels = np.zeros(hu.shape, np.uint8)
    shape = tuple(int(s) for s in contract["stage2_shape_yx"])
    jobs = [(z, box) for z in range(hu.shape[0]) if (box := liver_box_2d(liver[z], int(contract["box_margin_px"])))]
    for start in range(0, len(jobs), batch):
        _check(cancel)
        group = jobs[start : start + batch]
        crops = np.stack([resize(x[z][box], shape, order=1) for z, box in group])[:, None]
        p = _infer(sessions["stage2"], crops)
        for (z, (ys, xs)), probabilities in zip(group, p):
            size = (ys.stop - ys.start, xs.stop - xs.start)
            box_liver = resize(probabilities[0], size, order=1) > float(thresholds["liver"])
            box_tumour = (resize(probabilities[1], size, order=1) > float(thresholds["tumour"])) & box_liver
            labels[z][ys, xs] = np.where(box_tumour, 2, box_liver.astype(np.uint8))
        progress("E2Net liver and tumour stage", (start + len(group)) / max(len(jobs), 1))
    return labels, {"slices_with_liver": len(jobs)}
