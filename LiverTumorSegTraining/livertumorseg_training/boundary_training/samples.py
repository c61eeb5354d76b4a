"""Band samples of the boundary CNN (paper §3.3.3).

Each case is read through the engine (``to_canonical`` → ``prepare_volume``) onto the processing grid (1 mm
in-plane, slice spacing kept, 8-bit HU window, body crop). The band ``|d| ≤ 6`` around the ground-truth tumour
mask is computed with the engine's own functions (``LiverTumorSegLib.refinement``: signed Euclidean distance
with the voxel spacing, in units of the in-plane spacing): band voxels inside the tumour are positives, band
voxels outside negatives. Each class gets the same number of samples (``samples_per_class``; paper 50,000,
lite 4,000), spread as evenly over the cases as their bands allow and drawn without replacement (if all cases
together hold fewer voxels of a class, both classes are cut to that number). Each sample is the s×s×s block of
8-bit intensities centred on its voxel; beyond the volume the edge voxel is repeated, as at inference. Only a
crop around each case's tumours (band plus the largest patch's half-width) is kept in memory, so sampling for
several patch sizes reuses one reading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from LiverTumorSegLib.image_io import to_canonical
from LiverTumorSegLib.masks import bounding_box, grow_box
from LiverTumorSegLib.preprocess import InputContract, prepare_volume
from LiverTumorSegLib.refinement import BAND_VOXELS, band_margin_zyx, boundary_band_voxels, crop_edge

from ..datasets import find_cases_in, load_case

Log = Callable[[str], None]


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
    region = grow_box(bounding_box(tumour), band_margin_zyx(spacing_xyz, band), tumour.shape)
    start, stop = np.array([s.start for s in region]), np.array([s.stop for s in region])
    in_band, distance = boundary_band_voxels(tumour[region], spacing_xyz, band)
    context = (int(max_patch) - 1) // 2
    crop = crop_edge(intensities, start - context, stop + context)
    return CaseBand(case_id, np.ascontiguousarray(crop), in_band, distance, context, tuple(spacing_xyz),
                    tuple(int(v) for v in start))


def load_case_bands(dataset_dir, case_ids: Sequence[str], *, contract: InputContract | None = None,
                    max_patch: int = 15, band: float = BAND_VOXELS, log: Log = print) -> list[CaseBand]:
    """Read the cases (ids from ``datasets.find_cases_in``: one folder, or several with FOLDER/ID ids), preprocess
    them like the engine and keep their band neighbourhoods. Cases without tumour are skipped (with a log line)."""
    contract = contract or InputContract()
    cases = find_cases_in(dataset_dir)
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
