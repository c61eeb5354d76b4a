"""Training samples for the radiomics false-positive classifier (paper §3.3.2, "Sampling Strategy").

Positives are the annotated tumours: the 26-connected components of the reference tumour label, the
same connectivity the engine uses for candidate lesions. Negatives follow the paper's steps 1–8:

- radius r = 2, 4, …, 48 pixels (24 scales), each scale getting an equal share of the negative budget;
- 40 % of the seeds inside the liver parenchyma, 60 % near the liver boundary;
- each candidate is a 3D ball of radius r around a non-tumour liver seed; it is discarded when more than
  20 % of it lies outside the liver or more than 10 % of it is tumour; up to 100 tries per radius and case.

Everything is computed on the engine's processing grid (``LiverTumorSegLib.preprocess.prepare_volume``:
1 mm in-plane, the scan's slice spacing, body crop), where the filter runs at inference, and features come
from the engine's ``LiverTumorSegLib.radiomics_features.extract_features``.

Choices the paper leaves open:

- *Anisotropic voxels.* r is in pixels in-plane (= mm on the 1 mm grid); the ball is the set of voxels
  whose centre lies within r × in-plane spacing (mm) of the seed, so it spans r pixels in-plane and
  r × in-plane spacing / slice spacing slices along z (a physical ball). Voxels of the ball beyond the
  volume's edge count as outside the liver.
- *Parenchyma vs boundary seeds.* With d the seed's distance (mm) to the nearest non-liver voxel: a
  parenchyma seed has d > r (the ball lies in the liver), a boundary seed has d ≤ r (the ball reaches the
  liver surface, where organs touch it). Seeds are liver, non-tumour voxels (label 1).
- *Budget.* The number of negatives equals ``negative_ratio`` × the number of positives (the paper: ≈ 1,000
  negatives for ≈ 1,000–1,300 tumours; 1,000 / 24 ≈ 42 per scale). Datasets small enough that a case gets
  less than one negative per scale are handled by one global, deterministic queue of (radius, kind) jobs —
  the radii cycle in a seeded random order and every radius alternates parenchyma/boundary in a fixed 2-in-5
  pattern (staggered across radii), so each scale gets an equal share and 40 % / 60 % of it — from which each case takes as
  many jobs as its positives call for (``negative_ratio`` × its tumours, accumulated over the cases so far);
  jobs a case cannot fill (its liver too small for the ball) go back to the front of the queue for the next
  case.
- *Real false positives* (optional, not in the paper): components of a predicted label map (the engine's
  cascade and post-processing) that do not touch the reference tumour. They are what the filter must
  reject at inference; they come on top of the sampled negatives. A cascade makes fewer of them on the
  cases it was trained on than on new scans, so held-out cases give the more representative ones.
- Components smaller than ``MIN_VOXELS`` are skipped: post-processing (a 3 × 3 opening per slice) never
  leaves a candidate that small.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from LiverTumorSegLib.image_io import to_canonical
from LiverTumorSegLib.preprocess import InputContract, PreparedVolume, prepare_volume
from LiverTumorSegLib.masks import grow_box, label_lesions
from LiverTumorSegLib.radiomics_catalogue import FEATURE_NAMES, MARGIN_VOXELS
from LiverTumorSegLib.radiomics_features import extract_features

log = logging.getLogger("livertumorseg_training")

RADII = tuple(range(2, 49, 2))  # 24 scales, pixels in-plane
PARENCHYMA_FRACTION = 0.4
MAX_OUTSIDE_FRACTION = 0.2
MAX_TUMOUR_FRACTION = 0.1
TRIES_PER_RADIUS = 100
MIN_VOXELS = 3
KINDS = ("tumour", "parenchyma", "boundary", "false-positive")


@dataclass
class Region:
    """One candidate region on a case's processing grid, stored as its crop (bounding box + margin)."""

    case_id: str
    kind: str  # one of KINDS
    box: tuple[slice, slice, slice]
    mask: np.ndarray  # bool, shape of the box
    radius: int | None = None
    seed: tuple[int, int, int] | None = None

    @property
    def label(self) -> int:
        return int(self.kind == "tumour")

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())


# ------------------------------------------------------------------------------------------ regions


def component_regions(mask: np.ndarray, case_id: str, kind: str, *, min_voxels: int = MIN_VOXELS) -> list[Region]:
    """26-connected components of ``mask`` as regions, in the order of their lesion ids (:func:`masks.label_lesions`)."""
    components, count = label_lesions(mask)
    regions = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        crop = grow_box(box, MARGIN_VOXELS, mask.shape)
        region = components[crop] == index
        if region.sum() >= min_voxels:
            regions.append(Region(case_id, kind, crop, region))
    return regions


def tumour_regions(labels: np.ndarray, case_id: str = "") -> list[Region]:
    """Positives: the annotated tumours (26-connected components of label 2)."""
    return component_regions(labels == 2, case_id, "tumour")


def false_positive_regions(predicted: np.ndarray, reference: np.ndarray, case_id: str = "") -> list[Region]:
    """Real false positives: predicted tumour components that do not overlap the reference tumour."""
    components, _ = label_lesions(predicted == 2)
    hit = np.unique(components[(reference == 2) & (components > 0)])
    false_positive = (components > 0) & ~np.isin(components, hit)
    return component_regions(false_positive, case_id, "false-positive")


def ball_offsets(radius: int, spacing_xyz: Sequence[float]) -> np.ndarray:
    """(K, 3) integer (dz, dy, dx) offsets of the voxels within ``radius`` × in-plane spacing (mm) of a centre."""
    sx, sy, sz = (float(s) for s in spacing_xyz)
    radius_mm = radius * min(sx, sy)
    extent = [int(np.floor(radius_mm / s)) for s in (sz, sy, sx)]
    grids = np.meshgrid(*[np.arange(-e, e + 1) for e in extent], indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    distance2 = ((offsets * np.array([sz, sy, sx])) ** 2).sum(axis=1)
    return offsets[distance2 <= radius_mm**2 + 1e-9]


def ball_fractions(labels: np.ndarray, seed: Sequence[int], offsets: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(fraction outside the liver, fraction tumour, in-volume voxel coordinates) of a ball at ``seed``."""
    coords = offsets + np.asarray(seed)
    inside = np.all((coords >= 0) & (coords < np.asarray(labels.shape)), axis=1)
    coords = coords[inside]
    values = labels[tuple(coords.T)]
    total = len(offsets)
    outside = (total - len(coords)) + int(np.count_nonzero(values == 0))
    return outside / total, int(np.count_nonzero(values == 2)) / total, coords


def _region_from_coords(case_id: str, kind: str, coords: np.ndarray, shape, radius: int, seed) -> Region:
    lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
    crop = grow_box(tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), MARGIN_VOXELS, shape)
    mask = np.zeros(tuple(s.stop - s.start for s in crop), bool)
    mask[tuple((coords - np.array([s.start for s in crop])).T)] = True
    return Region(case_id, kind, crop, mask, radius, tuple(int(v) for v in seed))


def sample_negatives(
    labels: np.ndarray,
    spacing_xyz: Sequence[float],
    jobs: Sequence[tuple[int, str]],
    rng: np.random.Generator,
    *,
    case_id: str = "",
    tries_per_radius: int = TRIES_PER_RADIUS,
) -> tuple[list[Region], list[tuple[int, str]]]:
    """Sample negative balls for ``jobs`` = [(radius, "parenchyma" | "boundary"), ...] in one case.

    Returns the accepted regions and the jobs that could not be filled within ``tries_per_radius`` tries
    (shared by all jobs of one radius, as in the paper's step 6).
    """
    liver = labels >= 1
    sampling = tuple(float(s) for s in spacing_xyz)[::-1]
    depth = ndimage.distance_transform_edt(liver, sampling=sampling)  # mm to the nearest non-liver voxel
    seeds_ok = labels == 1
    in_plane = min(float(spacing_xyz[0]), float(spacing_xyz[1]))
    accepted: list[Region] = []
    unfilled: list[tuple[int, str]] = []
    by_radius: dict[int, list[str]] = {}
    for radius, kind in jobs:
        by_radius.setdefault(int(radius), []).append(kind)
    for radius in sorted(by_radius):
        kinds = by_radius[radius]
        offsets = ball_offsets(radius, spacing_xyz)
        radius_mm = radius * in_plane
        pools = {
            "parenchyma": np.flatnonzero((seeds_ok & (depth > radius_mm)).ravel()),
            "boundary": np.flatnonzero((seeds_ok & (depth <= radius_mm)).ravel()),
        }
        tries = 0
        for kind in kinds:
            pool = pools[kind]
            done = False
            while not done and tries < tries_per_radius and len(pool):
                tries += 1
                seed = np.unravel_index(pool[rng.integers(len(pool))], labels.shape)
                outside, tumour, coords = ball_fractions(labels, seed, offsets)
                if outside <= MAX_OUTSIDE_FRACTION and tumour <= MAX_TUMOUR_FRACTION:
                    accepted.append(_region_from_coords(case_id, kind, coords, labels.shape, radius, seed))
                    done = True
            if not done:
                unfilled.append((radius, kind))
    return accepted, unfilled


class NegativeQueue:
    """The global, deterministic sequence of (radius, kind) jobs that spreads negatives evenly over scales."""

    def __init__(self, rng: np.random.Generator, radii: Sequence[int] = RADII, parenchyma_fraction: float = PARENCHYMA_FRACTION):
        self.rng = rng
        self.radii = tuple(radii)
        self.fraction = parenchyma_fraction
        self.count = {r: 0 for r in self.radii}
        self.cycle: list[int] = []
        self.returned: list[tuple[int, str]] = []

    def _kind(self, radius: int) -> str:
        # The k-th job at a radius is parenchyma when floor(f·(k+φ+1)) > floor(f·(k+φ)): for f = 0.4 exactly 2
        # of every 5 consecutive jobs. The phase φ (the radius' position, mod 5) staggers the pattern across
        # radii, so that a budget of about one negative per scale is also split 40 % / 60 %.
        k = self.count[radius] + self.radii.index(radius) % 5
        self.count[radius] += 1
        return "parenchyma" if np.floor(self.fraction * (k + 1)) > np.floor(self.fraction * k) else "boundary"

    def take(self, n: int) -> list[tuple[int, str]]:
        jobs = self.returned[:n]
        self.returned = self.returned[n:]
        while len(jobs) < n:
            if not self.cycle:
                self.cycle = [int(r) for r in self.rng.permutation(self.radii)]
            radius = self.cycle.pop(0)
            jobs.append((radius, self._kind(radius)))
        return jobs

    def give_back(self, jobs: Sequence[tuple[int, str]]) -> None:
        self.returned = list(jobs) + self.returned


# ------------------------------------------------------------------------------------------ features


@dataclass
class SampleTable:
    """All 728 features of every training region, with what each region is."""

    X: np.ndarray  # (n, 728) float64, FEATURE_NAMES order
    y: np.ndarray  # (n,) int: 1 true tumour, 0 not
    kinds: list[str]
    case_ids: list[str]
    radii: list[int | None]
    voxels: list[int]
    names: list[str] = field(default_factory=lambda: list(FEATURE_NAMES))
    shortfall: int = 0  # negative jobs no case could fill

    def counts(self) -> dict:
        out = {kind: int(sum(k == kind for k in self.kinds)) for kind in KINDS}
        out.update(positives=int(self.y.sum()), negatives=int(len(self.y) - self.y.sum()), total=len(self.y),
                   cases=len(set(self.case_ids)), negative_shortfall=int(self.shortfall))
        return out

    def save(self, folder: str | Path) -> Path:
        """Write ``radiomics_samples.npz`` (features) and ``radiomics_samples.csv`` (one row per region)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / "radiomics_samples.npz", X=self.X, y=self.y, names=np.array(self.names))
        with open(folder / "radiomics_samples.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["case_id", "kind", "label", "radius", "voxels"])
            for row in zip(self.case_ids, self.kinds, self.y.tolist(), self.radii, self.voxels):
                writer.writerow(["" if v is None else v for v in row])
        (folder / "radiomics_samples.json").write_text(json.dumps(self.counts(), indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "SampleTable":
        """Read a table written by :meth:`save`."""
        folder = Path(folder)
        with np.load(folder / "radiomics_samples.npz", allow_pickle=False) as data:
            X, y, names = data["X"], data["y"], [str(n) for n in data["names"]]
        with open(folder / "radiomics_samples.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if len(rows) != len(y):
            raise ValueError(f"{folder}: radiomics_samples.csv has {len(rows)} rows for {len(y)} feature rows")
        counts = json.loads((folder / "radiomics_samples.json").read_text(encoding="utf-8"))
        return cls(X, y, [r["kind"] for r in rows], [r["case_id"] for r in rows],
                   [int(r["radius"]) if r["radius"] else None for r in rows], [int(r["voxels"]) for r in rows],
                   names, int(counts.get("negative_shortfall", 0)))

    @classmethod
    def concatenate(cls, tables: Sequence["SampleTable"]) -> "SampleTable":
        tables = [t for t in tables if len(t.y)]
        if not tables:
            return cls(np.zeros((0, len(FEATURE_NAMES))), np.zeros(0, int), [], [], [], [])
        return cls(
            np.concatenate([t.X for t in tables]), np.concatenate([t.y for t in tables]),
            sum((t.kinds for t in tables), []), sum((t.case_ids for t in tables), []),
            sum((t.radii for t in tables), []), sum((t.voxels for t in tables), []),
            shortfall=sum(t.shortfall for t in tables),
        )


def _features_task(args):
    hu, mask, spacing = args
    values = extract_features(hu, mask, spacing)
    return np.array([values[name] for name in FEATURE_NAMES], dtype=np.float64)


def region_features(hu: np.ndarray, regions: Sequence[Region], spacing_xyz, *, threads: int = 1) -> np.ndarray:
    """(n, 728) features of ``regions`` on the volume ``hu`` (worker processes when ``threads`` > 1)."""
    tasks = [(np.ascontiguousarray(hu[r.box]), r.mask, tuple(spacing_xyz)) for r in regions]
    if not tasks:
        return np.zeros((0, len(FEATURE_NAMES)))
    if threads > 1 and len(tasks) > 1:
        from concurrent.futures import ProcessPoolExecutor

        from LiverTumorSegLib.radiomics_filter import _mp_context

        with ProcessPoolExecutor(max_workers=min(threads, len(tasks)), mp_context=_mp_context()) as pool:
            rows = list(pool.map(_features_task, tasks))
    else:
        rows = [_features_task(task) for task in tasks]
    return np.stack(rows)


def table_from_regions(hu: np.ndarray, regions: Sequence[Region], spacing_xyz, *, threads: int = 1) -> SampleTable:
    X = region_features(hu, regions, spacing_xyz, threads=threads)
    return SampleTable(
        X, np.array([r.label for r in regions], dtype=int), [r.kind for r in regions],
        [r.case_id for r in regions], [r.radius for r in regions], [r.voxels for r in regions],
    )


# ------------------------------------------------------------------------------------------ datasets


def prepare_case(case, contract: InputContract | None = None) -> PreparedVolume:
    """A training case on the engine's processing grid, with its reference labels."""
    from .datasets import load_case

    image, labels = load_case(case)
    canonical, _ = to_canonical(image)
    canonical_labels, _ = to_canonical(image.with_array(labels))
    return prepare_volume(canonical, contract or InputContract(), labels=canonical_labels.array)


def predicted_labels(prepared: PreparedVolume, bundle, *, threads: int | None = None) -> np.ndarray:
    """The engine's cascade + post-processing on a prepared case: its label map on the same crop."""
    from LiverTumorSegLib.cascade import run_cascade
    from LiverTumorSegLib.postprocess import postprocess

    liver, tumour = run_cascade(prepared, bundle, threads=threads)
    labels, _ = postprocess(liver, tumour)
    return labels


def case_regions(
    prepared: PreparedVolume,
    case_id: str,
    queue: NegativeQueue,
    n_negatives: int,
    rng: np.random.Generator,
    *,
    predicted: np.ndarray | None = None,
) -> list[Region]:
    """Positives, ``n_negatives`` sampled negatives (from ``queue``) and optional real false positives."""
    labels = prepared.labels
    spacing = prepared.grid.spacing
    regions = tumour_regions(labels, case_id)
    jobs = queue.take(n_negatives)
    negatives, unfilled = sample_negatives(labels, spacing, jobs, rng, case_id=case_id)
    queue.give_back(unfilled)
    regions += negatives
    if predicted is not None:
        regions += false_positive_regions(predicted, labels, case_id)
    return regions


def collect_samples(
    dataset_dir: str | Path,
    *,
    cases: Sequence[str] | None = None,
    seed: int = 0,
    negative_ratio: float = 1.0,
    radii: Sequence[int] = RADII,
    bundle=None,
    use_cascade_false_positives: bool = False,
    threads: int = 1,
    progress: Callable[[str, float], None] | None = None,
) -> SampleTable:
    """Training regions and their 728 features for the cases of a dataset (LiTS, MSD or IRCADb layout).

    ``dataset_dir``: one folder, or several whose case ids are then prefixed with the folder's name
    (``real-train/mahler00``, :func:`datasets.find_cases_in`). ``cases``: case ids to use (default all).
    ``radii``: the ball radii (default the paper's 2–48 pixels; smaller sets suit small phantoms). ``bundle``: a
    loaded bundle, required for ``use_cascade_false_positives`` (its cascade and the engine's post-processing are run on each case);
    its input contract defines the processing grid. Deterministic for a given ``seed``.
    """
    from .datasets import find_cases_in

    if use_cascade_false_positives and bundle is None:
        raise ValueError("use_cascade_false_positives needs a model bundle with the cascade")
    found = find_cases_in(dataset_dir)
    if cases is not None:
        wanted = set(cases)
        if wanted - set(found):
            raise ValueError(f"cases not found in {dataset_dir}: {', '.join(sorted(wanted - set(found)))}")
        found = {case_id: case for case_id, case in found.items() if case_id in wanted}
    contract = bundle.contract if bundle is not None else InputContract()
    rng = np.random.default_rng(seed)
    queue = NegativeQueue(rng, radii)
    tables, positives_so_far, negatives_so_far = [], 0, 0
    for i, (case_id, case) in enumerate(found.items()):
        prepared = prepare_case(case, contract)
        positives = len(tumour_regions(prepared.labels))
        positives_so_far += positives
        n_negatives = int(round(negative_ratio * positives_so_far)) - negatives_so_far
        predicted = predicted_labels(prepared, bundle, threads=threads) if use_cascade_false_positives else None
        regions = case_regions(prepared, case_id, queue, n_negatives, rng, predicted=predicted)
        negatives_so_far += n_negatives
        tables.append(table_from_regions(prepared.hu, regions, prepared.grid.spacing, threads=threads))
        log.info("%s: %d regions (%s)", case_id, len(regions), tables[-1].counts())
        if progress:
            progress("radiomics samples", (i + 1) / len(found))
    table = SampleTable.concatenate(tables)
    table.shortfall = len(queue.returned)
    return table
