"""Boundary refinement stage (paper §3.3.3): a 3D patch CNN relabels the voxels of a narrow band around
each tumour, evaluated densely.

Band. For the tumour mask ``T`` on the processing grid, the signed distance ``d`` of a voxel is its
Euclidean distance to the nearest voxel of the other class (tumour → nearest non-tumour, non-tumour →
nearest tumour), negative inside the tumour, measured with the voxel spacing and expressed **in units of
the in-plane voxel spacing** (the paper's "6 pixels"; on the 1 mm in-plane processing grid that is 6 mm in
every direction, i.e. about 2.4 slices at 2.5 mm slice spacing). The band is ``Γ = {|d| ≤ 6}``. Inside the
band, tumour voxels are the classifier's positive class and non-tumour voxels its negative class (training,
``livertumorseg_training.boundary_training``, uses these same functions).

Dense evaluation. The bundle's ``boundary_cnn`` component is the patch classifier rewritten as a fully
convolutional network (unpadded convolutions, receptive field = patch size ``s``): on an input box of
shape (D, H, W) it returns the probability for every voxel of the inner box (D−s+1, H−s+1, W−s+1), each
being the classifier applied to the s³ block centred there. Boxes are taken around the tumours, padded
by (s−1)/2 voxels on every side **with edge replication** (voxels beyond the array repeat the nearest edge
voxel; training extracts its patches the same way), and evaluated tile by tile (at most
``tile`` output voxels per axis, default 16×48×48) so that memory stays bounded; each tile is shrunk to the
bounding box of the band voxels in it that could change, and tiles without any are skipped, so the interior
of a large tumour and the corners of a box cost (almost) nothing.

Boxes. Each lesion (26-connected tumour component, :func:`.masks.label_lesions`) gets the box of its voxels
grown by the band width (in voxels of each axis) plus one. Boxes that overlap are merged into their common
bounding box until none overlap, so no voxel is evaluated twice, and any voxel within the band of a tumour
lies in that tumour's merged box, which holds every tumour voxel that can influence its distance: the band
computed per box equals the band of the whole mask.

Relabelling. Only band voxels inside the liver (label 1 or 2) can change: probability ≥ threshold (0.5,
from the manifest) → tumour (2), otherwise liver (1). Voxels outside the liver never become tumour, and a
voxel leaving the tumour stays liver, so tumour ⊂ liver is kept. Tumour components that the relabelling
creates apart from every existing lesion are turned back to liver (:func:`drop_new_fragments`): the stage
moves boundaries, it does not add lesions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from scipy import ndimage

from .errors import BundleError, Cancelled, InputError
from .masks import bounding_box, grow_box, label_lesions

STAGE = "boundary refinement"
COMPONENT = "boundary_cnn"
#: Half-width of the band, in in-plane voxels (paper: 6 pixels).
BAND_VOXELS = 6.0
#: How input boxes are extended beyond the array (shared with training's patch extraction).
PADDING = "edge"
DEFAULT_THRESHOLD = 0.5
#: Largest output tile (z, y, x) evaluated in one ONNX Runtime call.
DEFAULT_TILE = (16, 48, 48)

Progress = Callable[[str, float], None]
Cancel = Callable[[], bool]


# ------------------------------------------------------------------------------------------ band geometry


def in_plane_unit(spacing_xyz) -> float:
    """The distance unit of the band: the in-plane voxel spacing (mean of x and y) in mm."""
    return 0.5 * (float(spacing_xyz[0]) + float(spacing_xyz[1]))


def sampling_zyx(spacing_xyz) -> tuple[float, float, float]:
    """Voxel spacing along (z, y, x) in units of the in-plane spacing."""
    unit = in_plane_unit(spacing_xyz)
    return float(spacing_xyz[2]) / unit, float(spacing_xyz[1]) / unit, float(spacing_xyz[0]) / unit


def signed_distance(mask: np.ndarray, spacing_xyz) -> np.ndarray:
    """Signed Euclidean distance (float32, in in-plane voxel units): inside the mask minus the distance to
    the nearest voxel outside it, outside the distance to the nearest mask voxel. Voxels at the array's
    border are not treated as next to a boundary (the array's edge is not the mask's edge)."""
    mask = np.asarray(mask, dtype=bool)
    sampling = sampling_zyx(spacing_xyz)
    out = np.empty(mask.shape, np.float32)
    if mask.all():
        out[:] = -np.inf
        return out
    if not mask.any():
        out[:] = np.inf
        return out
    inside = ndimage.distance_transform_edt(mask, sampling=sampling)
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
    np.subtract(outside, inside, out=out, casting="same_kind")
    return out


def boundary_band_voxels(mask: np.ndarray, spacing_xyz, band: float = BAND_VOXELS) -> tuple[np.ndarray, np.ndarray]:
    """(band mask ``|d| ≤ band``, signed distance ``d``) of a binary mask; ``band`` and ``d`` in in-plane
    voxel units (:func:`signed_distance`)."""
    d = signed_distance(mask, spacing_xyz)
    return np.abs(d) <= band, d


def band_margin_zyx(spacing_xyz, band: float = BAND_VOXELS) -> tuple[int, int, int]:
    """Voxels per axis (z, y, x) that hold every band voxel of a mask around its bounding box, plus one."""
    return tuple(int(math.ceil(band / step - 1e-9)) + 1 for step in sampling_zyx(spacing_xyz))


def crop_edge(volume: np.ndarray, start, stop) -> np.ndarray:
    """``volume[start:stop]`` on each axis, where the range may pass the array's edges; outside, the nearest
    edge voxel is repeated (edge replication)."""
    index = [np.clip(np.arange(a, b), 0, n - 1) for a, b, n in zip(start, stop, volume.shape)]
    return volume[np.ix_(*index)]


def tumour_boxes(tumour: np.ndarray, spacing_xyz, band: float = BAND_VOXELS) -> tuple[list[tuple], int]:
    """Merged, non-overlapping boxes (start, stop) around the lesions and their bands, clipped to the array;
    and the number of lesions."""
    lesions, count = label_lesions(tumour)
    margin = band_margin_zyx(spacing_xyz, band)
    boxes = []
    for found in ndimage.find_objects(lesions):
        grown = grow_box(found, margin, tumour.shape)
        boxes.append((tuple(s.start for s in grown), tuple(s.stop for s in grown)))
    changed = True
    while changed:  # passes of greedy merging until no two boxes overlap
        changed = False
        merged: list = []
        for start, stop in boxes:
            for k, (other_start, other_stop) in enumerate(merged):
                if all(a < d and c < b for a, b, c, d in zip(start, stop, other_start, other_stop)):
                    merged[k] = (tuple(map(min, start, other_start)), tuple(map(max, stop, other_stop)))
                    changed = True
                    break
            else:
                merged.append((start, stop))
        boxes = merged
    return [(tuple(int(v) for v in a), tuple(int(v) for v in b)) for a, b in boxes], count


# --------------------------------------------------------------------------------------------- the stage


@dataclass
class BandBox:
    """One merged box: its slices in the processing grid, its candidate voxels (band voxels inside the liver),
    the tumour's signed distance there and the network's tumour probability (float32, 0 outside the
    candidates)."""

    region: tuple
    candidates: np.ndarray
    distance: np.ndarray
    probability: np.ndarray


def band_probabilities(
    intensities: np.ndarray,
    labels: np.ndarray,
    spacing_xyz: tuple,
    bundle,
    *,
    band: Optional[float] = None,
    device: str = "cpu",
    threads: Optional[int] = None,
    progress: Optional[Progress] = None,
    cancel: Optional[Cancel] = None,
    tile: tuple[int, int, int] = DEFAULT_TILE,
) -> tuple[list[BandBox], dict]:
    """The dense boundary CNN's tumour probability for every band voxel inside the liver, box by box.

    ``intensities``: uint8 (z, y, x) on the processing grid (the preprocessed CT); ``labels``: 0/1/2 on the
    same grid; ``spacing_xyz``: its voxel spacing in mm; ``band``: the band half-width (default: the
    manifest's). Returns the boxes and a dict with the numbers of components, boxes, tiles, band and
    candidate voxels, and the time spent inside ONNX Runtime.
    """
    if intensities.shape != labels.shape or intensities.ndim != 3:
        raise InputError(f"boundary refinement: intensities {intensities.shape} and labels {labels.shape} must be "
                         "the same 3D grid")
    if intensities.dtype != np.uint8:
        raise InputError(f"boundary refinement expects the 8-bit preprocessed intensities, got {intensities.dtype}")
    entry = bundle.component(COMPONENT)
    try:
        patch = int(entry["patch_size"])
    except (KeyError, TypeError, ValueError):
        raise BundleError(f"Bundle '{bundle.path}': the {COMPONENT} component has no patch_size. Export it again.") from None
    if patch < 1 or patch % 2 == 0:
        raise BundleError(f"Bundle '{bundle.path}': {COMPONENT} patch_size {patch} must be odd.")
    band = float(entry.get("band_voxels", BAND_VOXELS) if band is None else band)
    half = (patch - 1) // 2

    def check_cancel():
        if cancel is not None and cancel():
            raise Cancelled("Segmentation cancelled; nothing was written.")

    check_cancel()
    tumour = labels == 2
    info = {"components": 0, "boxes": 0, "tiles": 0, "band_voxels": 0, "candidate_voxels": 0, "patch_size": patch,
            "band_width": band, "network_seconds": 0.0}
    if not tumour.any():
        return [], info

    boxes, info["components"] = tumour_boxes(tumour, spacing_xyz, band)
    info["boxes"] = len(boxes)
    work = []  # (box start, box slices, candidate voxels, signed distance, tiles holding candidates)
    for start, stop in boxes:
        region = tuple(slice(a, b) for a, b in zip(start, stop))
        in_band, distance = boundary_band_voxels(tumour[region], spacing_xyz, band)
        candidates = in_band & (labels[region] > 0)
        info["band_voxels"] += int(in_band.sum())
        info["candidate_voxels"] += int(candidates.sum())
        tiles = []
        shape = candidates.shape
        steps = [max(1, min(int(t), n)) for t, n in zip(tile, shape)]
        for z in range(0, shape[0], steps[0]):
            for y in range(0, shape[1], steps[1]):
                for x in range(0, shape[2], steps[2]):
                    t0 = (z, y, x)
                    t1 = tuple(min(a + s, n) for a, s, n in zip(t0, steps, shape))
                    found = bounding_box(candidates[t0[0]:t1[0], t0[1]:t1[1], t0[2]:t1[2]])
                    if found is not None:  # evaluate the candidates' bounding box within the tile only
                        tiles.append((tuple(a + f.start for a, f in zip(t0, found)),
                                      tuple(a + f.stop for a, f in zip(t0, found))))
        work.append((start, region, candidates, distance, tiles))
        check_cancel()
    total = sum(len(w[4]) for w in work)
    info["tiles"] = total
    network_seconds = 0.0
    if progress is not None:
        progress(STAGE, 0.0)
    out = []
    if total:
        session = bundle.session(COMPONENT, device=device, threads=threads)
        input_name = session.get_inputs()[0].name
    done = 0
    for start, region, candidates, distance, tiles in work:
        probability = np.zeros(candidates.shape, np.float32)
        for t0, t1 in tiles:
            check_cancel()
            lo = [s + a - half for s, a in zip(start, t0)]
            hi = [s + b + half for s, b in zip(start, t1)]
            block = crop_edge(intensities, lo, hi).astype(np.float32)[None, None]
            tic = time.perf_counter()
            prob = session.run(None, {input_name: block})[0]
            network_seconds += time.perf_counter() - tic
            expected = tuple(b - a for a, b in zip(t0, t1))
            if prob.shape[-3:] != expected:
                raise BundleError(
                    f"Bundle '{bundle.path}': the {COMPONENT} network returned {prob.shape[-3:]} for an input of "
                    f"{block.shape[-3:]}; with patch_size {patch} it must return {expected}. Export it again."
                )
            sub = tuple(slice(a, b) for a, b in zip(t0, t1))
            probability[sub] = np.where(candidates[sub], prob[0, 0], probability[sub])
            done += 1
            if progress is not None:
                progress(STAGE, done / total)
        out.append(BandBox(region, candidates, distance, probability))
    info["network_seconds"] = round(network_seconds, 3)
    return out, info


def refine_boundaries(
    intensities: np.ndarray,
    labels: np.ndarray,
    spacing_xyz: tuple,
    bundle,
    *,
    device: str = "cpu",
    threads: Optional[int] = None,
    progress: Optional[Progress] = None,
    cancel: Optional[Cancel] = None,
    tile: tuple[int, int, int] = DEFAULT_TILE,
) -> tuple[np.ndarray, dict]:
    """Relabel the band voxels of every tumour with the bundle's dense boundary CNN.

    Arguments as :func:`band_probabilities`. Returns the new label map (a copy) and a dict with the numbers
    of components, boxes, tiles, band voxels, changed (added / removed) voxels, and the time taken in total
    and inside ONNX Runtime.
    """
    started = time.perf_counter()
    boxes, info = band_probabilities(intensities, labels, spacing_xyz, bundle, device=device, threads=threads,
                                     progress=progress, cancel=cancel, tile=tile)
    threshold = float(bundle.component(COMPONENT).get("threshold", DEFAULT_THRESHOLD))
    out, counts = relabel(labels, boxes, threshold)
    info.update(threshold=threshold, **counts)
    if progress is not None:
        progress(STAGE, 1.0)
    info["seconds"] = round(time.perf_counter() - started, 3)
    return out, info


def relabel(labels: np.ndarray, boxes: list[BandBox], threshold: float, band: Optional[float] = None) -> tuple[np.ndarray, dict]:
    """The refined label map (a copy): each candidate voxel (within ``band`` of the tumour's boundary when
    given, else all) becomes tumour at probability ≥ ``threshold`` and liver below it; then
    :func:`drop_new_fragments`. Also returns the added, removed, changed and dropped-fragment voxel counts."""
    out = labels.copy()
    added = removed = 0
    for box in boxes:
        chosen = box.candidates if band is None else box.candidates & (np.abs(box.distance) <= band)
        old = out[box.region]  # a view: written in place
        new = np.where(box.probability >= threshold, np.uint8(2), np.uint8(1))
        changed = chosen & (new != old)
        added += int((changed & (new == 2)).sum())
        removed += int((changed & (new == 1)).sum())
        old[chosen] = new[chosen]
    dropped = drop_new_fragments(out, labels == 2)
    return out, {"added_voxels": added - dropped, "removed_voxels": removed, "changed_voxels": added - dropped + removed,
                 "dropped_fragment_voxels": dropped}


def drop_new_fragments(labels: np.ndarray, tumour_before: np.ndarray) -> int:
    """Turn back to liver, in place, every tumour component of ``labels`` that shares no voxel with the
    tumour before refinement; return how many voxels that was.

    Refinement moves lesion boundaries; which lesions exist is decided by the cascade and the radiomics
    filter. Band voxels that a patch classifier calls tumour away from any lesion would otherwise become
    new, unfiltered lesions (:func:`.masks.label_lesions`, as for the candidates).
    """
    tumour = labels == 2
    lesions, count = label_lesions(tumour)
    if count == 0:
        return 0
    keep = np.zeros(count + 1, bool)
    keep[np.unique(lesions[tumour & tumour_before])] = True
    keep[0] = True
    new = ~keep[lesions]
    labels[new] = 1
    return int(new.sum())
