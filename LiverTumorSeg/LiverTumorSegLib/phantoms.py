"""Synthetic contrast-enhanced abdominal CT phantoms with liver and liver-tumour labels.

The project trains and tests on these until real data is available, and models are judged on real CT, so
the phantoms aim at the variety of a real cohort rather than at an easy task:

* **Anatomy** (patient specific, seeded): body outline with skin, subcutaneous and visceral fat, abdominal
  wall and paraspinal muscles, patient table; lung bases, heart and diaphragm domes; a liver built from
  warped lobes (large right lobe, left lobe across the midline, caudate lobe, hilum, fissure) moulded by the
  abdominal wall and the right hemidiaphragm, with branching portal and hepatic veins; spleen, kidneys
  (cortex, medulla, sinus), stomach with an air-fluid level, gallbladder, pancreas, duodenum, colon, small
  bowel, mesenteric and pulmonary vessels, aorta and IVC with their branches, vertebrae, ribs with costal
  cartilage, sternum. Optional steatosis, cirrhotic surface, ascites, vascular calcification.
* **Tumours**: 0-8 per case, 3-80 mm, small ones frequent; hypodense, hyperdense, rim-enhancing,
  necrotic-centred, cystic and calcified; round, lobulated or irregular; sharp or blurred margins; some
  touching the capsule or a vessel. Each is listed in :attr:`Phantom.tumours`.
* **HU levels** by contrast phase (portal-venous about 75 %, late-arterial, unenhanced) with a contrast
  scale of +/-15 %: portal-venous liver about 90-130 HU, portal/hepatic veins about 150-200 HU, lesions
  mostly 20-60 HU below the liver (see ``_levels`` and ``_tumour_levels``).
* **Acquisition**: 0.6-0.9 mm pixels (512x512) and 1-5 mm slices, field of view fitted to the patient
  (sometimes cutting the body edge, sometimes with a circular reconstruction mask), off-centre patients,
  partial-volume edges, a reconstruction-kernel blur and correlated scanner noise with a CT-like
  (band-pass) noise power spectrum.

Label maps follow LiTS: 0 background, 1 liver (with the vessels inside it), 2 tumour (inside the liver).
Arrays are in the engine's canonical orientation: (z, y, x) running inferior->superior,
anterior->posterior and patient right->left, identity direction (LPS).

Generation is deterministic per seed. The anatomy, tumours and acquisition parameters are drawn from
separate random streams, so ``size="small"`` renders the same patient as ``size="full"`` on a coarse grid
(for fast tests). Shapes are evaluated on coarse grids inside their bounding boxes and interpolated
linearly to the image grid, which keeps a full-size case within a few seconds on two CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy import ndimage

from .errors import OutputError
from .image_io import Geometry, Image, write_image

__all__ = [
    "TISSUES",
    "PHASES",
    "SIZES",
    "Phantom",
    "generate_phantom",
    "write_phantom_dataset",
    "tissue_hu_table",
    "case_seed",
]

PHANTOM_VERSION = 1

#: Internal tissue classes of the phantoms (id -> name). ``tissues`` maps use these ids.
TISSUES: dict[int, str] = {
    0: "air",
    1: "fat",
    2: "muscle",
    3: "liver",
    4: "tumour",
    5: "hepatic/portal vessels",
    6: "spleen",
    7: "kidney cortex",
    8: "kidney medulla",
    9: "stomach wall",
    10: "stomach fluid",
    11: "gas",
    12: "aorta",
    13: "ivc",
    14: "bone cortical",
    15: "bone marrow",
    16: "lung",
    17: "heart",
    18: "gallbladder",
    19: "skin",
    20: "bowel",
    21: "pancreas",
    22: "oral contrast",
    23: "table",
    24: "myocardium",
    25: "spinal canal",
    26: "intervertebral disc",
    27: "stool",
    28: "pulmonary vessels",
    29: "mesenteric vessels",
    30: "cartilage",
    31: "ascites",
    32: "calcification",
    33: "gallbladder wall",
}


class _T:
    """Tissue ids by name (see :data:`TISSUES`)."""

    AIR, FAT, MUSCLE, LIVER, TUMOUR, VESSEL, SPLEEN, CORTEX, MEDULLA = range(9)
    STOMACH_WALL, STOMACH_FLUID, GAS, AORTA, IVC, CORTICAL, MARROW, LUNG, HEART = range(9, 18)
    GALLBLADDER, SKIN, BOWEL, PANCREAS, ORAL, TABLE, MYOCARDIUM, CANAL, DISC = range(18, 27)
    STOOL, PULM_VESSEL, MES_VESSEL, CARTILAGE, ASCITES, CALCIFICATION, GB_WALL = range(27, 34)


PHASES = ("portal_venous", "late_arterial", "unenhanced")
_PHASE_P = (0.75, 0.15, 0.10)

#: Output grid of each size: in-plane pixels. Slice spacing and coverage are drawn per case.
SIZES = {"full": 512, "small": 128}

TUMOUR_TYPES = ("hypodense", "hyperdense", "rim_enhancing", "necrotic", "cystic", "calcified")
_TYPE_P = (0.36, 0.12, 0.15, 0.12, 0.17, 0.08)
TUMOUR_SHAPES = ("round", "lobulated", "irregular")
_SHAPE_P = (0.5, 0.25, 0.25)
MIN_DIAMETER_MM, MAX_DIAMETER_MM = 3.0, 80.0
_COUNT_P = (0.15, 0.25, 0.15, 0.12, 0.10, 0.08, 0.06, 0.05, 0.04)  # P(0..8 tumours)

_STREAM_ANATOMY, _STREAM_TUMOURS, _STREAM_SCAN, _STREAM_NOISE, _STREAM_TEXTURE, _STREAM_SHAPES, _STREAM_LEVELS = range(7)


@dataclass
class Phantom:
    """One synthetic CT case.

    ``image`` holds int16 HU in the canonical orientation; ``label`` (uint8: 0/1/2) and ``tissues`` (uint8
    ids of :data:`TISSUES`) are on the same grid. ``tumours`` has one entry per generated tumour (centre in
    LPS millimetres and as a (z, y, x) voxel index, nominal diameter, kind, what it touches, and its voxel
    count in the label). ``meta`` records the seed, size, grid and acquisition parameters.
    """

    image: Image
    label: np.ndarray
    tissues: np.ndarray
    tumours: list[dict]
    meta: dict = field(default_factory=dict)


# ============================================================================================ utilities


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a dataset generated with ``seed`` (deterministic, well mixed)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)
    return int(state[0] & 0x7FFFFFFF)


def _stream(seed: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), 7919, stream, *extra])


class _Pts:
    """An axis-aligned grid of points in patient millimetres: 1D axes plus broadcastable 3D views."""

    __slots__ = ("z", "y", "x", "Z", "Y", "X")

    def __init__(self, z, y, x):
        self.z = np.asarray(z, np.float32).ravel()
        self.y = np.asarray(y, np.float32).ravel()
        self.x = np.asarray(x, np.float32).ravel()
        self.Z = self.z[:, None, None]
        self.Y = self.y[None, :, None]
        self.X = self.x[None, None, :]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z.size, self.y.size, self.x.size)


class _Field:
    """Unit-variance Gaussian random field (correlation length ``length`` mm) over a box of patient space.

    White noise on a lattice convolved with a Gaussian; evaluated separably (three small matrix products)
    on any axis-aligned grid, so the same field can be sampled at any resolution.
    """

    def __init__(self, rng: np.random.Generator, lo, hi, length: float):
        self.sigma = float(length) / 2.0
        step = self.sigma
        self.lo = np.asarray(lo, np.float64)
        self.hi = np.asarray(hi, np.float64)
        self.nodes = [np.arange(l - 3 * self.sigma, u + 3 * self.sigma + step, step) for l, u in zip(lo, hi)]
        nx, ny, nz = (len(n) for n in self.nodes)
        self.noise = rng.standard_normal((nz, ny, nx), dtype=np.float32)

    def _weights(self, coords, axis: int) -> np.ndarray:
        c = np.clip(np.asarray(coords, np.float64), self.lo[axis], self.hi[axis])
        d = (c[:, None] - self.nodes[axis][None, :]) / self.sigma
        w = np.exp(-0.5 * d * d)
        w /= np.sqrt((w * w).sum(axis=1, keepdims=True)) + 1e-12
        return w.astype(np.float32)

    def __call__(self, P: _Pts) -> np.ndarray:
        wx, wy, wz = self._weights(P.x, 0), self._weights(P.y, 1), self._weights(P.z, 2)
        a = self.noise @ wx.T  # (nzn, nyn, nx)
        a = np.matmul(wy, a)  # (nzn, ny, nx)
        nzn = a.shape[0]
        return (wz @ a.reshape(nzn, -1)).reshape(P.shape)


def _wrap(angle):
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _smin(a, b, k: float):
    """Smooth minimum (union of two signed distances with a fillet of size ``k``)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _smax(a, b, k: float):
    return -_smin(-a, -b, k)


def _rotation(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """Rotation matrix (radians, applied x then y then z)."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return (mz @ my @ mx).astype(np.float32)


def _local(X, Y, Z, centre, rot=None):
    """Coordinates relative to ``centre`` (x, y, z), expressed in the frame of ``rot`` (columns = axes)."""
    dx, dy, dz = X - centre[0], Y - centre[1], Z - centre[2]
    if rot is None:
        return dx, dy, dz
    r = rot
    return (r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz,
            r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz,
            r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz)


def _ellipsoid(dx, dy, dz, rx, ry, rz):
    """Approximate signed distance (mm, negative inside) to an ellipsoid with (possibly varying) radii."""
    qx, qy, qz = dx / rx, dy / ry, dz / rz
    rho = np.sqrt(qx * qx + qy * qy + qz * qz)
    g = np.sqrt((qx / rx) ** 2 + (qy / ry) ** 2 + (qz / rz) ** 2)
    rmin = np.minimum(np.minimum(rx, ry), rz)
    rmax = np.maximum(np.maximum(rx, ry), rz)
    scale = np.clip(rho / np.maximum(g, 1e-6), rmin, rmax)
    return (rho - 1.0) * scale


def _capsule(X, Y, Z, a, b, ra: float, rb: float):
    """Signed distance to a tapered capsule from point ``a`` (radius ra) to ``b`` (radius rb)."""
    ab = np.asarray(b, np.float32) - np.asarray(a, np.float32)
    l2 = float(ab @ ab) or 1e-6
    dx, dy, dz = X - a[0], Y - a[1], Z - a[2]
    t = np.clip((dx * ab[0] + dy * ab[1] + dz * ab[2]) / l2, 0.0, 1.0)
    ex, ey, ez = dx - t * ab[0], dy - t * ab[1], dz - t * ab[2]
    return np.sqrt(ex * ex + ey * ey + ez * ez) - (ra + (rb - ra) * t)


def _chain(X, Y, Z, points, radii, k: float = 0.0):
    """Union of tapered capsules along a polyline (a tube), evaluated at every point."""
    out = None
    for i in range(len(points) - 1):
        d = _capsule(X, Y, Z, points[i], points[i + 1], radii[i], radii[i + 1])
        out = d if out is None else (np.minimum(out, d) if k <= 0 else _smin(out, d, k))
    return out


_FAR = np.float32(1000.0)


def _tube(P: "_Pts", points, radii, k: float = 0.0, margin: float = 8.0) -> np.ndarray:
    """Union of tapered capsules on the grid ``P``, each evaluated only inside its own bounding box.

    Points farther than ``margin`` mm from every capsule get a large positive value.
    """
    out = np.full(P.shape, _FAR, np.float32)
    pts = np.asarray(points, np.float32)
    for i in range(len(pts) - 1):
        a, b = pts[i], pts[i + 1]
        r = max(radii[i], radii[i + 1]) + k + margin
        lo, hi = np.minimum(a, b) - r, np.maximum(a, b) + r
        iz = slice(np.searchsorted(P.z, lo[2]), np.searchsorted(P.z, hi[2], "right"))
        iy = slice(np.searchsorted(P.y, lo[1]), np.searchsorted(P.y, hi[1], "right"))
        ix = slice(np.searchsorted(P.x, lo[0]), np.searchsorted(P.x, hi[0], "right"))
        if iz.stop <= iz.start or iy.stop <= iy.start or ix.stop <= ix.start:
            continue
        sub = out[iz, iy, ix]
        d = _capsule(P.X[..., ix], P.Y[:, iy, :], P.Z[iz], a, b, radii[i], radii[i + 1])
        if k > 0:
            sub[...] = _smin(sub, d, k)
        else:
            np.minimum(sub, d, out=sub)
    return out


def _spline(points, per_segment: int = 6) -> np.ndarray:
    """Catmull-Rom spline through ``points`` (n, 3), ``per_segment`` samples per interval."""
    p = np.asarray(points, float)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = []
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1], ext[i], ext[i + 1], ext[i + 2]
        for t in np.linspace(0, 1, per_segment, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t3))
    out.append(p[-1])
    return np.array(out)


def _lerp_index(src: np.ndarray, dst: np.ndarray):
    pos = np.interp(dst, src, np.arange(src.size, dtype=np.float64))
    i0 = np.clip(np.floor(pos).astype(np.intp), 0, max(src.size - 2, 0))
    t = (pos - i0).astype(np.float32)
    return i0, t


def _upsample(a: np.ndarray, src: Sequence[np.ndarray], dst: Sequence[np.ndarray]) -> np.ndarray:
    """Linear interpolation of ``a`` sampled on axes ``src`` (z, y, x) onto axes ``dst``.

    x is interpolated first on the coarse rows; then, one output slice at a time, z and y (whole-row
    copies), so that no large temporary arrays are made.
    """
    same = [s.size == d.size and (s.size == 0 or np.allclose(s, d)) for s, d in zip(src, dst)]
    if all(same):
        return np.require(a, np.float32, ["C", "W"])
    if not same[2]:
        ix, tx = _lerp_index(src[2], dst[2])
        lo = np.take(a, ix, axis=2)
        lo += tx * (np.take(a, ix + 1, axis=2) - lo)
        a = lo
    nz, ny, nx = dst[0].size, dst[1].size, dst[2].size
    ncy = a.shape[1]
    if same[0]:
        iz, tz = np.arange(nz), np.zeros(nz, np.float32)
    elif src[0].size == 1:
        iz, tz = np.zeros(nz, np.intp), np.zeros(nz, np.float32)
    else:
        iz, tz = _lerp_index(src[0], dst[0])
    if same[1]:
        iy = ty = None
    else:
        iy, ty = _lerp_index(src[1], dst[1])
        ty = ty[:, None]
    out = np.empty((nz, ny, nx), np.float32)

    def rows(k0, k1):
        plane = np.empty((ncy, nx), np.float32)
        tmp = np.empty((ny, nx), np.float32)
        for k in range(k0, k1):
            i, t = iz[k], tz[k]
            if t == 0.0:
                plane[...] = a[i]
            else:
                np.subtract(a[i + 1], a[i], out=plane)
                plane *= t
                plane += a[i]
            o = out[k]
            if iy is None:
                o[...] = plane
                continue
            np.take(plane, iy, axis=0, out=o)
            np.take(plane, iy + 1, axis=0, out=tmp)
            tmp -= o
            tmp *= ty
            o += tmp

    _parallel_slices(rows, nz, ny * nx)
    return out


_POOL = None


def _parallel_slices(fn, n: int, slice_size: int) -> None:
    """Run ``fn(k0, k1)`` over slice ranges, on two threads for large volumes (numpy releases the GIL)."""
    global _POOL
    if n * slice_size < 4_000_000 or n < 4:
        fn(0, n)
        return
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="phantom")
    half = n // 2
    future = _POOL.submit(fn, half, n)
    fn(0, half)
    future.result()


def _upsample_nearest(a: np.ndarray, src: Sequence[np.ndarray], dst: Sequence[np.ndarray]) -> np.ndarray:
    """Nearest-neighbour resampling of a categorical array (uint8) from axes ``src`` to ``dst``."""
    for axis in (2, 0, 1):
        if src[axis].size == dst[axis].size and np.allclose(src[axis], dst[axis]):
            continue
        pos = np.interp(dst[axis], src[axis], np.arange(src[axis].size, dtype=np.float64))
        a = np.take(a, np.rint(pos).astype(np.intp), axis=axis)
    return np.ascontiguousarray(a)


_ALLOWED_CACHE: dict[frozenset, np.ndarray] = {}


def _allowed(ids: Iterable[int]) -> np.ndarray:
    key = frozenset(ids)
    lut = _ALLOWED_CACHE.get(key)
    if lut is None:
        lut = np.zeros(256, bool)
        lut[list(key)] = True
        _ALLOWED_CACHE[key] = lut
    return lut


# ================================================================================================ grid


@dataclass
class _Grid:
    """The image grid: shape (z, y, x), spacing (x, y, z) mm, LPS origin, and patient-frame axes."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    offset: tuple[float, float, float]  # LPS position of the patient-frame origin

    def __post_init__(self):
        nz, ny, nx = self.shape
        sx, sy, sz = self.spacing
        self.px = (self.origin[0] + np.arange(nx) * sx - self.offset[0]).astype(np.float32)
        self.py = (self.origin[1] + np.arange(ny) * sy - self.offset[1]).astype(np.float32)
        self.pz = (self.origin[2] + np.arange(nz) * sz - self.offset[2]).astype(np.float32)

    def index_range(self, axis_coords: np.ndarray, lo: float, hi: float, spacing: float) -> slice:
        i0 = int(math.ceil((lo - float(axis_coords[0])) / spacing - 1e-6))
        i1 = int(math.floor((hi - float(axis_coords[0])) / spacing + 1e-6)) + 1
        return slice(max(i0, 0), min(i1, axis_coords.size))

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Index slices (z, y, x) of the voxels whose centres lie in the patient-frame box [lo, hi] (x, y, z)."""
        sx, sy, sz = self.spacing
        sl = (self.index_range(self.pz, lo[2], hi[2], sz),
              self.index_range(self.py, lo[1], hi[1], sy),
              self.index_range(self.px, lo[0], hi[0], sx))
        if any(s.stop - s.start <= 0 for s in sl):
            return None
        return sl

    def points(self, sl) -> _Pts:
        return _Pts(self.pz[sl[0]], self.py[sl[1]], self.px[sl[2]])

    def to_lps(self, p) -> np.ndarray:
        return np.asarray(p, float) + np.asarray(self.offset, float)

    def to_index(self, p) -> np.ndarray:
        """Patient-frame point (x, y, z) -> continuous (z, y, x) index."""
        lps = self.to_lps(p)
        ijk = (lps - np.asarray(self.origin)) / np.asarray(self.spacing)
        return ijk[::-1]


def _coarse_axis(fine: np.ndarray, step: float) -> np.ndarray:
    if fine.size <= 2:
        return fine
    spacing = float(fine[1] - fine[0])
    if spacing >= 0.75 * step:
        return fine
    n = int(math.ceil((float(fine[-1]) - float(fine[0])) / step)) + 1
    return np.linspace(float(fine[0]), float(fine[-1]), max(n, 2)).astype(np.float32)


def _sample(grid: _Grid, sl, fn: Callable[[_Pts], object], step_xy: float, step_z: float, categorical=()):
    """Evaluate ``fn`` on a coarse grid covering the box ``sl`` and interpolate it to the image grid.

    ``fn`` may return one array or a tuple of arrays; the result has the same structure. Outputs whose
    positions are listed in ``categorical`` are class codes (uint8), resampled by nearest neighbour.
    """
    fine = grid.points(sl)
    cz, cy, cx = _coarse_axis(fine.z, step_z), _coarse_axis(fine.y, step_xy), _coarse_axis(fine.x, step_xy)
    coarse = _Pts(cz, cy, cx)
    values = fn(coarse)
    single = not isinstance(values, tuple)
    out = []
    for i, v in enumerate((values,) if single else values):
        if i in categorical:
            v = np.broadcast_to(np.asarray(v, np.uint8), coarse.shape)
            out.append(_upsample_nearest(v, (cz, cy, cx), (fine.z, fine.y, fine.x)))
            continue
        v = np.asarray(v, np.float32)
        if v.shape != coarse.shape:
            v = np.broadcast_to(v, coarse.shape).copy()
        out.append(_upsample(v, (cz, cy, cx), (fine.z, fine.y, fine.x)))
    return out[0] if single else tuple(out)


def _for_slices(grid: _Grid, sl, fn: Callable[[_Pts], tuple], step_xy: float, step_z: float, consumer) -> None:
    """Like :func:`_sample`, but hands the interpolated fields to ``consumer(k, planes)`` one image slice
    at a time (``k`` relative to ``sl``) instead of building full 3D arrays: cheaper for whole-volume fields.
    ``consumer`` must only touch slice ``k`` (slices are processed on two threads)."""
    fine = grid.points(sl)
    cz, cy, cx = _coarse_axis(fine.z, step_z), _coarse_axis(fine.y, step_xy), _coarse_axis(fine.x, step_xy)
    coarse = _Pts(cz, cy, cx)
    fields = []
    for v in fn(coarse):
        v = np.broadcast_to(np.asarray(v, np.float32), coarse.shape)
        if not (cx.size == fine.x.size and np.allclose(cx, fine.x)):
            ix, tx = _lerp_index(cx, fine.x)
            lo = np.take(v, ix, axis=2)
            lo += tx * (np.take(v, ix + 1, axis=2) - lo)
            v = lo
        fields.append(np.ascontiguousarray(v))
    nz, ny, nx = fine.shape
    same_z = cz.size == fine.z.size and np.allclose(cz, fine.z)
    iz, tz = (np.arange(nz), np.zeros(nz, np.float32)) if same_z else _lerp_index(cz, fine.z)
    same_y = cy.size == fine.y.size and np.allclose(cy, fine.y)
    iy, ty = (None, None) if same_y else _lerp_index(cy, fine.y)

    def rows(k0, k1):
        plane = np.empty((cy.size, nx), np.float32)
        tmp = np.empty((ny, nx), np.float32)
        outs = [np.empty((ny, nx), np.float32) for _ in fields]
        for k in range(k0, k1):
            i, t = iz[k], tz[k]
            for f, o in zip(fields, outs):
                if t == 0.0:
                    plane[...] = f[i]
                else:
                    np.subtract(f[i + 1], f[i], out=plane)
                    plane *= t
                    plane += f[i]
                if iy is None:
                    o[...] = plane
                    continue
                np.take(plane, iy, axis=0, out=o)
                np.take(plane, iy + 1, axis=0, out=tmp)
                tmp -= o
                tmp *= ty[:, None]
                o += tmp
            consumer(k, outs)

    _parallel_slices(rows, nz, ny * nx)


def _paint(tissue: np.ndarray, sl, mask: np.ndarray, tid: int, over: Iterable[int] | None = None) -> None:
    view = tissue[sl] if sl is not None else tissue
    if over is not None:
        mask = mask & _allowed(over)[view]
    np.copyto(view, np.uint8(tid), where=mask)


# ============================================================================================= anatomy


_SOFT = (_T.FAT,)  # what organs may displace when painted into the abdominal cavity


class _Anatomy:
    """One patient's geometry in a patient frame (mm): x to the patient's left, y posterior, z superior.

    The body axis is at x = y = 0 and z = 0 is the top of the liver dome (under the right hemidiaphragm).
    Everything here is drawn from the anatomy random stream only, so it does not depend on the image grid.
    """

    def __init__(self, rng: np.random.Generator):
        u, nrm = rng.uniform, rng.normal
        self.rng = rng
        # ---------------------------------------------------------------- habitus and body wall
        self.n_se = u(2.0, 2.7)
        self.fourier = [(k, nrm(0, 0.012), u(0, 2 * np.pi)) for k in (2, 3, 4, 5)]
        self.groove = u(0.01, 0.03)
        self.zwaves = [(nrm(0, 0.022), u(180, 420), u(0, 2 * np.pi)) for _ in range(2)]
        self.t_skin = u(1.5, 2.5)
        self.t_sc0 = float(np.clip(rng.lognormal(np.log(15.0), 0.5), 4.0, 45.0))
        self.belly = u(0.0, 0.10) * min(1.0, self.t_sc0 / 25.0)
        self.sc_fourier = [(k, nrm(0, 0.2), u(0, 2 * np.pi)) for k in (1, 2, 3)]
        self.sc_wave = (nrm(0, 0.12), u(150, 350), u(0, 2 * np.pi))
        self.t_m0 = u(8, 14) if u() > 0.15 else u(5, 8)
        self.d_ps = u(40, 60)
        self.ql = u(6, 18)
        self.w_la = u(3, 14)
        self.t_d = u(3.0, 5.0)  # diaphragm thickness
        # outline from the abdominal cavity size plus the wall layers (obese patients are larger)
        self.A_in = u(105, 145)
        wall = self.t_skin + self.t_sc0 + self.t_m0
        self.a0 = self.A_in + wall
        self.b_ant = self.A_in * u(0.62, 0.78) + wall
        self.b_post = self.A_in * u(0.52, 0.66) + self.t_skin + 0.6 * self.t_sc0 + self.d_ps * 0.75
        self.age_factor = u(0, 1)  # 0 young .. 1 old: bone density, calcifications
        # flags
        self.cirrhosis = u() < 0.07
        self.steatosis = u() < 0.08
        self.ascites = u() < (0.5 if self.cirrhosis else 0.04)
        self.H = u(140, 205) * (0.85 if self.cirrhosis else 1.0)
        # table (body is flattened on it)
        zz = np.linspace(-450, 150, 41).astype(np.float32)
        back = min(float(self.radius(np.float32(np.pi / 2 + d), zz).min()) for d in (-0.2, 0.0, 0.2))
        self.y_tab = back * u(0.95, 0.99)  # the back rests on (and is flattened by) the table
        self.tab_curve = u(0.0, 1.0 / 2500)
        self.tab_thick = u(10, 22)

        # ---------------------------------------------------------------- spine
        self._make_spine(rng)
        z_ref = -0.45 * self.H
        self.y_vb_ref = float(self.y_vb(np.float32(z_ref)))
        self.r_vby_ref = self.vert_radii(z_ref)[1]

        # ---------------------------------------------------------------- cavity reference profile
        self._cavity_reference()
        A_R, A_L, B, ym, yf, yb = self.A_R, self.A_L, self.B, self.y_mid, self.y_front, self.y_back
        H = self.H

        # ---------------------------------------------------------------- diaphragm domes
        self.dome_R = (u(-0.55, -0.35), u(-0.1, 0.15), self.t_d)  # (u, v, apex height)
        self.dome_L = (u(0.35, 0.55), u(-0.05, 0.2), self.t_d - u(8, 25))
        self.dome_w = (u(0.65, 0.85), u(0.8, 1.0))
        self.dome_p = u(1.9, 2.5)
        self.drop = (u(35, 60), u(60, 90), u(95, 135))  # anterior, lateral, posterior
        self.hL = self.dome_L[2]
        xs = np.arange(-A_R, A_L, 4.0, dtype=np.float32)[None, :]
        ys = np.arange(yf, yb + 40, 4.0, dtype=np.float32)[:, None]
        self.dome_min = float(self.dome(xs, ys).min())  # lowest point of the costophrenic recesses

        # ---------------------------------------------------------------- kidneys
        zkR = -u(95, 135)
        self.kidneys = []
        for side, zc in ((-1, zkR), (1, zkR + u(8, 25))):
            rx, ry, rz = u(24, 30), u(21, 27), u(48, 60)
            vx, vy = self.vert_radii(zc)
            c = (side * (vx + u(38, 52)), float(self.y_vb(np.float32(zc))) + u(0, 15), zc)
            rot = _rotation(math.radians(u(10, 25)), side * math.radians(u(8, 18)),
                            -side * math.radians(u(20, 40)))
            self.kidneys.append(dict(side=side, c=c, r=(rx, ry, rz), rot=rot, t_cx=u(5, 8),
                                     n_pyr=int(rng.integers(4, 7)), pyr_phase=u(0, 2 * np.pi)))

        # ---------------------------------------------------------------- liver
        self._q = dict(sL=u(0.7, 1.3), ry=u(-0.05, 0.1), rx=u(0.58, 0.7), rz=u(0.56, 0.64), taper=u(0.35, 0.55),
                       shx=u(0.05, 0.2), shy=u(-0.2, 0.0), lx=u(0.0, 0.2), ly=u(0.3, 0.42), lz=u(0.24, 0.32),
                       lrx=u(0.45, 0.75), lry=u(0.32, 0.42), lrz=u(0.2, 0.26), cy=u(0.25, 0.4), crx=u(0.14, 0.2),
                       hil=(u(15, 22), u(12, 17), u(14, 20)), clx=u(-0.05, 0.15), clw=u(2, 5), cly=u(12, 30),
                       clz=u(0.2, 0.35))
        lo = (-A_R - 15, yf - 15, -1.4 * H - 40)
        hi = (A_L, yb + 15, 40)
        amp2, len2 = (u(3.5, 5.0), 12.0) if self.cirrhosis else (u(1.5, 3.5), 25.0)
        self.liver_warp = [(u(6, 12), [_Field(rng, lo, hi, 70.0) for _ in range(3)]),
                           (amp2, [_Field(rng, lo, hi, len2) for _ in range(3)])]
        target = float(np.clip(rng.lognormal(np.log(1500.0), 0.2), 950, 2400)) * (0.75 if self.cirrhosis else 1.0)
        scale = 1.0
        step = 6.0
        grid = _Pts(np.arange(-1.7 * H - 40, 40, step), np.arange(yf - 15, yb + 15, step), np.arange(-A_R - 15, A_L, step))
        cache: dict = {}
        for _ in range(4):
            self._build_liver(H * scale, scale)
            vol = float(np.count_nonzero(self.liver(grid, cache=cache) < 0)) * step ** 3 / 1000.0
            ratio = target / max(vol, 1.0)
            if abs(ratio - 1) < 0.04:
                break
            scale *= float(np.clip(ratio, 0.4, 2.5)) ** (1 / 3)
        self.liver_target_ml = target
        self.H = H = H * scale

        # ---------------------------------------------------------------- great vessels
        self.r_ao = u(9, 12.5) * (1 + 0.15 * self.age_factor)
        self.r_ivc = u(9, 12)
        self.ivc_x = -u(18, 28)
        self.ao_x = u(8, 18)
        self.ivc_shift = u(10, 25)
        self.aorta_calc = int(rng.integers(0, 8) * self.age_factor) if u() < 0.6 else 0
        self.calc_seed = int(rng.integers(1 << 30))

        # ---------------------------------------------------------------- pancreas and portal system
        zp = -u(0.66, 0.78) * H  # pancreatic head below the porta hepatis, medial to the right lobe
        self.z_panc = zp
        y_pan_max = self.y_vb_ref - self.r_vby_ref - 2 * self.r_ao - 8
        self.pancreas = dict(pts=[(-0.12 * A_R, min(ym + 0.1 * B, y_pan_max), zp - 40),
                                  (-0.22 * A_R, min(ym + 0.05 * B, y_pan_max), zp - 15),
                                  (-0.04 * A_R, min(ym - 0.15 * B, y_pan_max - 10), zp),
                                  (0.25 * A_L, min(ym + 0.0 * B, y_pan_max), zp + 10),
                                  (0.5 * A_L, ym + 0.35 * B, zp + 22)],
                             r=[u(10, 14), u(14, 19), u(9, 12), u(9, 12), u(7, 10)])
        # ---------------------------------------------------------------- gallbladder
        self.gb = None
        if u() < 0.88:
            contracted = u() < 0.1
            s = 0.55 if contracted else u(0.85, 1.15)
            self.gb = dict(c=(u(-0.38, -0.15) * A_R, yf + u(0.3, 0.55) * B, -u(0.62, 0.8) * H),
                           r=(u(13, 20) * s, u(13, 20) * s, u(30, 45) * s),
                           rot=_rotation(-math.radians(u(25, 50)), 0.0, math.radians(u(-20, 20))),
                           wall=u(3, 5) if contracted else u(1.5, 2.5), sludge=u() < 0.06)

        # ---------------------------------------------------------------- spleen
        size = u(0.8, 1.2) * (1.5 if (self.cirrhosis or u() < 0.06) else 1.0)
        self.spleen = dict(c=(0.6 * A_L, ym + u(0.35, 0.5) * B, self.hL - u(50, 75)),
                           r=(u(25, 33) * size, u(45, 60) * size, u(45, 58) * size),
                           rot=_rotation(0.0, 0.0, math.radians(u(30, 55))))

        # ---------------------------------------------------------------- stomach, duodenum
        dist = u(0.6, 1.2)
        rf = u(28, 40) * dist
        hL = self.hL
        self.stomach = dict(
            pts=[(0.33 * A_L, ym + 0.25 * B, hL - self.t_d - rf - 2),
                 (0.45 * A_L, ym - 0.15 * B, hL - 55),
                 (0.3 * A_L, yf + 0.55 * B, hL - 95),
                 (0.02 * A_L, yf + 0.45 * B, hL - 105),
                 (-0.18 * A_R, yf + 0.6 * B, hL - 100)],
            r=[rf, 0.95 * rf, 0.8 * rf, 0.55 * rf, max(0.35 * rf, 9.0)],
            wall=u(3, 6), fill=u(0.05, 0.75),
            content=rng.choice(["fluid", "food", "oral"], p=[0.6, 0.2, 0.2]))
        p = self.stomach["pts"][-1]
        self.duodenum = dict(pts=[p, (-0.32 * A_R, ym + 0.05 * B, p[2] - 15), (-0.36 * A_R, ym + 0.2 * B, p[2] - 75),
                                  (-0.05 * A_R, ym + 0.25 * B, p[2] - 95)], r=u(10, 14))

        conf = (-0.04 * A_R, min(ym - 0.05 * B, y_pan_max + 4), zp + 2)
        self.confluence = conf
        r_pv = u(5.5, 7.0)
        self.r_pv = r_pv
        self.portal_trunk = dict(pts=[conf, self.porta], r=[r_pv, r_pv * 0.95])
        self.splenic_vein = dict(pts=[(0.5 * A_L, ym + 0.42 * B, zp + 26), (0.25 * A_L, min(ym + 0.1 * B, y_pan_max + 6), zp + 12), conf],
                                 r=[u(3.5, 5), u(3.5, 5), u(4, 5.5)])
        self.smv = dict(pts=[conf, (0.0, conf[1] - 20, zp - 60), (0.02 * A_L, conf[1] - 30, zp - 140)], r=[u(4.5, 6), 4.5, 3.5])

        # ---------------------------------------------------------------- heart, oesophagus
        self.heart = dict(c=(u(10, 40), yf + u(50, 70)), r=(u(55, 70), u(42, 55), u(45, 60)),
                          rot=_rotation(0.0, 0.0, -math.radians(u(25, 45))), peri=u(2, 6), myo=u(7, 11))

        # ---------------------------------------------------------------- colon, small bowel
        rc = u(16, 25)
        sp = self.spleen["c"]
        self.colon = dict(
            pts=[(-0.62 * A_R, ym + 0.05 * B, -H - 130),
                 (-0.66 * A_R, ym + 0.15 * B, -H - 40),
                 (-0.7 * A_R, ym + 0.1 * B, -0.95 * H),
                 (-0.5 * A_R, yf + 0.4 * B, -0.82 * H),
                 (-0.15 * A_R, yf + 0.3 * B, -0.9 * H - u(0, 40)),
                 (0.3 * A_L, yf + 0.3 * B, -0.85 * H - u(0, 40)),
                 (0.66 * A_L, ym - 0.1 * B, sp[2] - self.spleen["r"][2] - 10),
                 (0.74 * A_L, ym + 0.2 * B, -0.95 * H),
                 (0.7 * A_L, ym + 0.15 * B, -H - 60),
                 (0.55 * A_L, ym + 0.0 * B, -H - 140)],
            r=rc, haustra=u(22, 38), wall=u(1.8, 3.0), gas_profile=np.clip(rng.normal(u(0.1, 0.5), 0.3, 6), 0, 1))
        self.bowel_top = -u(0.7, 0.85) * H
        self.oral = self.stomach["content"] == "oral" or u() < 0.2

    def _build_liver(self, H: float, s: float) -> None:
        """Liver lobes for a cranio-caudal extent ``H`` and in-plane scale ``s`` (from the drawn shape factors)."""
        q, A_R, A_L, B, yf, ym, yb = self._q, self.A_R, self.A_L, self.B, self.y_front, self.y_mid, self.y_back
        rx = q["rx"] * A_R * s
        self.liver_R = dict(c=(-1.12 * A_R + rx, ym + q["ry"] * B, -0.42 * H), r=(rx, 1.1 * B * min(s, 1.0), q["rz"] * H),
                            taper=q["taper"], shx=q["shx"] * A_R, shy=q["shy"] * B)
        self.liver_L = dict(c=(q["lx"] * A_L, yf + q["ly"] * B * s, -q["lz"] * H),
                            r=(q["lrx"] * A_L * q["sL"] * s, q["lry"] * B * s, q["lrz"] * H))
        self.liver_C = dict(c=(-0.12 * A_R, ym + q["cy"] * B, -0.4 * H),
                            r=(q["crx"] * A_R * s * (1.5 if self.cirrhosis else 1.0), 0.2 * B * s, 0.2 * H))
        if self.cirrhosis:
            self.liver_R["r"] = (self.liver_R["r"][0] * 0.85, self.liver_R["r"][1], self.liver_R["r"][2])
        self.hilum = dict(c=(-0.14 * A_R, ym + 0.05 * B, -0.6 * H), r=q["hil"])
        self.porta = (-0.14 * A_R, ym + 0.02 * B, -0.56 * H)
        self.cleft = dict(x=q["clx"] * A_L, w=q["clw"], y=yf + q["cly"], z=-q["clz"] * H)
        lo = (-A_R - 15, yf - 15, -1.3 * H - 30)
        hi = (self.liver_L["c"][0] + self.liver_L["r"][0] + 25, yb + 15, 40)
        self.liver_box = (lo, hi)

    def liver_volume_ml(self, step: float = 5.0) -> float:
        lo, hi = self.liver_box
        P = _Pts(np.arange(lo[2], hi[2], step), np.arange(lo[1], hi[1], step), np.arange(lo[0], hi[0], step))
        return float(np.count_nonzero(self.liver(P) < 0)) * step ** 3 / 1000.0

    # ------------------------------------------------------------------------------ body wall functions

    def _wz(self, z):
        out = 1.0
        for amp, lam, ph in self.zwaves:
            out = out + amp * np.sin(2 * np.pi * z / lam + ph)
        return out

    def radius(self, th, z):
        """Body outline radius (mm) at polar angle ``th`` (0 = patient left, pi/2 = posterior) and height z."""
        c, s = np.cos(th), np.sin(th)
        w = self._wz(z)
        a = self.a0 * w
        bant = self.b_ant * w * (1 + self.belly * np.clip((-90.0 - z) / 150.0, 0, 1))
        b = np.where(s < 0, bant, self.b_post)
        n = self.n_se
        r = (np.abs(c / a) ** n + np.abs(s / b) ** n) ** (-1.0 / n)
        mod = 1.0
        for k, ck, ph in self.fourier:
            mod = mod + ck * np.cos(k * th + ph)
        mod = mod - self.groove * np.exp(-(_wrap(th - np.pi / 2) / 0.12) ** 2)
        return r * mod

    def t_sc(self, th, z):
        g = 0.0
        for k, dk, ph in self.sc_fourier:
            g = g + dk * np.cos(k * th + ph)
        amp, lam, ph = self.sc_wave
        t = self.t_sc0 * np.exp(g) * (1 - 0.45 * np.exp(-(_wrap(th - np.pi / 2) / 0.3) ** 2))
        t = t * (1 + amp * np.sin(2 * np.pi * z / lam + ph))
        t = t + self.t_sc0 * 3 * self.belly * np.clip((-90.0 - z) / 150.0, 0, 1) * np.maximum(0, -np.sin(th))
        return np.clip(t, 2.5, 90.0)

    def t_m(self, th, z, R=None):
        """Muscle wall thickness (mm): thin lateral/anterior abdominal muscles with the linea alba, and a
        posterior wall (paraspinal muscles, quadratus lumborum) whose front runs just behind the transverse
        processes, so that kidneys and lung recesses sit in the paravertebral gutters."""
        dp = _wrap(th - np.pi / 2)
        la = np.exp(-(_wrap(th + np.pi / 2) / (self.w_la / 220.0)) ** 4)
        base = self.t_m0 * (1 - 0.85 * la) + self.ql * np.exp(-((np.abs(dp) - 1.15) / 0.22) ** 2)
        s = np.sin(th)
        if R is None:
            R = self.radius(th, z)
        R = np.minimum(R, self.y_tab / np.maximum(s, 0.05))
        lateral = np.clip((np.abs(np.cos(th)) / np.maximum(s, 0.05) * 60.0 - 25.0) / 30.0, 0, 1)
        deep = 18.0 * np.clip((z + 60.0) / 60.0, 0, 1) * lateral
        yw = self.y_canal(z) + 6.0 + deep
        t_post = R - self.t_skin - self.t_sc(th, z) - yw / np.maximum(s, 0.2)
        w = np.exp(-(dp / 0.8) ** 6)
        return np.maximum(base, w * t_post)

    def table_top(self, X):
        return self.y_tab - self.tab_curve * X * X

    def body_fields(self, P: _Pts):
        """(outer surface, fat/muscle interface, inner cavity) signed distances in mm (negative inside)."""
        X, Y, Z = P.X, P.Y, P.Z
        th = np.arctan2(Y, X)
        r = np.sqrt(X * X + Y * Y)
        R = self.radius(th, Z)
        dR = (self.radius(th + 0.01, Z) - self.radius(th - 0.01, Z)) / 0.02
        f_out = (r - R) * R / np.sqrt(R * R + dR * dR)
        f_out = np.maximum(f_out, Y - self.table_top(X) + 0 * Z)
        f_fm = f_out + self.t_skin + self.t_sc(th, Z)
        f_cav = f_fm + self.t_m(th, Z, R)
        return f_out.astype(np.float32), f_fm.astype(np.float32), f_cav.astype(np.float32)

    def cavity(self, P: _Pts):
        return self.body_fields(P)[2]

    def wall_point(self, th, z, depth=0.0):
        """Point(s) on the inner surface of the abdominal wall at angle ``th`` and height ``z``, moved
        ``depth`` mm outwards (scalars or arrays); returns (x, y, z) or an (n, 3) array."""
        th_a = np.atleast_1d(np.asarray(th, np.float32))
        z_a = np.atleast_1d(np.asarray(z, np.float32)) + 0 * th_a
        R = self.radius(th_a, z_a)
        sn = np.sin(th_a)
        R = np.where(sn > 0.2, np.minimum(R, self.y_tab / np.maximum(sn, 1e-3)), R)
        tm = self.t_m(th_a, z_a)
        d = np.asarray(depth(tm) if callable(depth) else depth, np.float32)
        rin = R - self.t_skin - self.t_sc(th_a, z_a) - tm + d
        out = np.stack([rin * np.cos(th_a), rin * sn, z_a], 1).astype(float)
        return out if np.ndim(th) else tuple(out[0])

    def _cavity_reference(self):
        z_ref = -0.45 * self.H
        xs = np.arange(-self.a0 * 1.2, self.a0 * 1.2, 2.0)
        ys = np.arange(-self.b_ant * 1.3, self.b_post * 1.3, 2.0)
        cav = self.cavity(_Pts([z_ref], ys, xs))[0] < 0
        cols = np.where(cav.any(axis=0))[0]
        self.A_R, self.A_L = float(-xs[cols[0]]), float(xs[cols[-1]])
        mid = cav[:, np.abs(xs) < 10].any(axis=1)
        self.y_front = float(ys[np.where(mid)[0][0]])
        back = []
        for xc in (-0.5 * self.A_R, 0.5 * self.A_L):
            col = cav[:, np.argmin(np.abs(xs - xc))]
            back.append(float(ys[np.where(col)[0][-1]]))
        self.y_back = float(np.mean(back))
        self.y_mid = 0.5 * (self.y_front + self.y_back)
        self.B = 0.5 * (self.y_back - self.y_front)

    # ------------------------------------------------------------------------------ diaphragm

    def dome(self, X, Y):
        """Height (mm) of the upper surface of the diaphragm above (x, y)."""
        u = np.where(X < 0, X / self.A_R, X / self.A_L)
        v = (Y - self.y_mid) / self.B
        d_ant, d_lat, d_post = self.drop
        drop = d_lat + np.clip(v, 0, None) * (d_post - d_lat) + np.clip(-v, 0, None) * (d_ant - d_lat)
        wx, wy = self.dome_w
        out = None
        for (uc, vc, h) in (self.dome_R, self.dome_L):
            rho2 = ((u - uc) / wx) ** 2 + ((v - vc) / wy) ** 2
            d = h - drop * rho2 ** (self.dome_p / 2)
            out = d if out is None else _smax(out, d, 12.0)
        return out

    def thorax(self, P: _Pts):
        """Signed distance-like function of the thoracic side of the diaphragm (negative above it)."""
        X, Y = P.X[0], P.Y[0]  # (1, nx), (ny, 1)
        zd = self.dome(X, Y)
        gx = (self.dome(X + 1.0, Y) - self.dome(X - 1.0, Y)) / 2.0
        gy = (self.dome(X, Y + 1.0) - self.dome(X, Y - 1.0)) / 2.0
        norm = np.sqrt(1 + gx * gx + gy * gy)
        return ((zd[None] - P.Z) / norm[None]).astype(np.float32)

    # ------------------------------------------------------------------------------ spine

    def _make_spine(self, rng):
        u = rng.uniform
        scale = (self.A_in / 125.0) ** 0.5 * u(0.92, 1.08)
        names = [f"T{k}" for k in range(4, 13)] + [f"L{k}" for k in range(1, 6)] + ["S1"]
        heights = {**{f"T{k}": 19 + 1.1 * (k - 4) for k in range(4, 13)},
                   "L1": 29, "L2": 30, "L3": 31, "L4": 31, "L5": 30, "S1": 40}
        discs = {n: (5.0 if n.startswith("T") else 9.0) for n in names}
        width = {**{f"T{k}": 15 + 0.7 * (k - 4) for k in range(4, 13)},
                 "L1": 22, "L2": 23, "L3": 24, "L4": 25, "L5": 25, "S1": 26}
        centre_t10 = u(-25, 15)
        verts = []
        # stack from T10 downwards and upwards
        idx10 = names.index("T10")
        z = centre_t10 + heights["T10"] * scale / 2
        tops = {}
        for n in names[idx10:]:
            tops[n] = z
            z = z - heights[n] * scale - discs[n] * scale
        z = centre_t10 + heights["T10"] * scale / 2
        for n in reversed(names[:idx10]):
            z = z + discs[n] * scale + heights[n] * scale
            tops[n] = z
        for n in names:
            h = heights[n] * scale
            rx = width[n] * scale
            verts.append(dict(name=n, top=tops[n], bot=tops[n] - h, rx=rx, ry=rx * u(0.72, 0.8),
                              lumbar=not n.startswith("T")))
        self.verts = verts
        self.r_canal = (u(8, 10), u(6.5, 8.0))
        self.spine_curve = (u(-1, 1) * 1e-4, u(-4, 4))  # lordosis curvature, lateral tilt mm/100mm
        self.spinous_len = self.d_ps - u(4, 12)

    def vert_radii(self, z):
        zs = np.array([0.5 * (v["top"] + v["bot"]) for v in self.verts])
        rx = np.interp(-z, -zs, [v["rx"] for v in self.verts])
        ry = np.interp(-z, -zs, [v["ry"] for v in self.verts])
        return float(rx), float(ry)

    def y_lamina(self, z):
        """y (mm) of the posterior surface of the neural arch at height z (follows the back)."""
        z = np.asarray(z, np.float32)
        th = np.full_like(z, np.pi / 2)
        R = np.minimum(self.radius(th, z), self.y_tab)
        return R - self.t_skin - self.t_sc(th, z) - self.d_ps + self.spine_curve[0] * (z + 150) ** 2

    def x_spine(self, z):
        return np.asarray(z, np.float32) * self.spine_curve[1] / 100.0

    def y_canal(self, z):
        return self.y_lamina(z) - 5.0 - self.r_canal[1]

    def y_vb(self, z):
        zs = np.atleast_1d(np.asarray(z, np.float32))
        ry = np.array([self.vert_radii(float(v))[1] for v in zs], np.float32)
        out = self.y_canal(zs) - self.r_canal[1] - 3.0 - ry
        return out.reshape(np.shape(z)) if np.ndim(z) else out[0]

    # ------------------------------------------------------------------------------ organs

    def _warped(self, P: _Pts, warp):
        X, Y, Z = P.X, P.Y, P.Z
        dx = dy = dz = 0.0
        for amp, (fx, fy, fz) in warp:
            dx = dx + amp * fx(P)
            dy = dy + amp * fy(P)
            dz = dz + amp * fz(P)
        return X + dx, Y + dy, Z + dz

    def liver(self, P: _Pts, constrained: bool = True, cache: dict | None = None):
        """Liver signed distance (mm). ``cache`` keeps the parts that do not depend on the lobe sizes
        (warped coordinates, constraints) between calls on the same points."""
        if cache is not None and "xyz" in cache:
            X, Y, Z = cache["xyz"]
        else:
            X, Y, Z = self._warped(P, self.liver_warp)
            if cache is not None:
                cache["xyz"] = (X, Y, Z)
        H = self.H
        R_ = self.liver_R
        (cx, cy, cz), (rx, ry, rz) = R_["c"], R_["r"]
        s = np.clip((cz - Z) / rz, 0, 1)
        taper = 1 - R_["taper"] * s ** 1.5
        fR = _ellipsoid(X - (cx - R_["shx"] * s), Y - (cy + R_["shy"] * s), Z - cz, rx * taper, ry * taper, rz)
        L_ = self.liver_L
        (cx, cy, cz), (rx, ry, rz) = L_["c"], L_["r"]
        q = np.clip((X - cx) / rx, 0, 1)
        tl = 1 - 0.6 * q
        fL = _ellipsoid(X - cx, Y - cy, Z - cz, rx, ry * tl, rz * tl)
        C = self.liver_C
        fC = _ellipsoid(X - C["c"][0], Y - C["c"][1], Z - C["c"][2], *C["r"])
        f = _smin(fR, fL, 18.0)
        f = _smin(f, fC, 8.0)
        hl = self.hilum
        f = np.maximum(f, -_ellipsoid(X - hl["c"][0], Y - hl["c"][1], Z - hl["c"][2], *hl["r"]))
        cl = self.cleft
        cleft = np.maximum(np.maximum(np.abs(X - cl["x"]) - cl["w"] / 2, Y - cl["y"]), Z - cl["z"])
        f = np.maximum(f, -cleft)
        if constrained:
            if cache is not None and "cons" in cache:
                cav, thor, retro = cache["cons"]
            else:
                cav, thor, retro = self.cavity(P) + 0.5, self.t_d - self.thorax(P), -self.retro(P)
                if cache is not None:
                    cache["cons"] = (cav, thor, retro)
            f = _smax(f, cav, 6.0)
            f = _smax(f, thor, 4.0)
            f = _smax(f, retro, 10.0)
        return f.astype(np.float32)

    def retro(self, P: _Pts):
        """Region the liver does not enter: around and behind the spine (crura, aorta) and behind the kidneys."""
        vx = self.vert_radii(-0.3 * self.H)[0]
        xs = float(self.x_spine(np.float32(-0.3 * self.H)))
        out = np.sqrt((P.X - xs) ** 2 + np.maximum(self.y_vb_ref - 8.0 - P.Y, 0.0) ** 2) - (vx + 14.0) + 0 * P.Z
        for k in self.kidneys:
            c, (rx, ry, rz) = k["c"], k["r"]
            dy = np.minimum(P.Y - c[1], 0.0)
            out = np.minimum(out, _ellipsoid(P.X - c[0], dy, P.Z - c[2], rx + 4, ry + 4, rz + 4))
        pancreas = getattr(self, "pancreas", None)  # (defined after the liver's size is settled)
        if pancreas is not None:  # a smooth impression instead of the liver wrapping around it
            out = np.minimum(out, _tube(P, pancreas["pts"], [r + 5.0 for r in pancreas["r"]], k=8.0))
        return out

    def gallbladder(self, P: _Pts):
        g = self.gb
        dx, dy, dz = _local(P.X, P.Y, P.Z, g["c"], g["rot"])
        # pear shape: wider fundus (negative local z), narrow neck
        s = np.clip(dz / g["r"][2], -1, 1)
        w = 1.0 - 0.35 * np.clip(s, 0, 1)
        return _ellipsoid(dx, dy, dz, g["r"][0] * w, g["r"][1] * w, g["r"][2]).astype(np.float32)

    def kidney(self, P: _Pts, k: dict):
        dx, dy, dz = _local(P.X, P.Y, P.Z, k["c"], k["rot"])
        rx, ry, rz = k["r"]
        f = _ellipsoid(dx, dy, dz, rx, ry, rz)
        # renal sinus opening medially (local -x towards the spine for both sides after mirroring)
        m = -k["side"]
        sinus = _ellipsoid(dx - m * 0.72 * rx, dy + 0.1 * ry, dz, 0.5 * rx, 0.32 * ry, 0.5 * rz)
        return f.astype(np.float32), sinus.astype(np.float32), dx, dy, dz

    def spleen_f(self, P: _Pts):
        s = self.spleen
        dx, dy, dz = _local(P.X, P.Y, P.Z, s["c"], s["rot"])
        rx, ry, rz = s["r"]
        f = _ellipsoid(dx, dy, dz, rx, ry, rz)
        hollow = _ellipsoid(dx + 1.25 * rx, dy, dz, 1.1 * rx, 0.9 * ry, 0.9 * rz)
        f = np.maximum(f, -hollow)
        f = np.maximum(f, self.cavity(P) + 0.5)
        f = np.maximum(f, self.t_d - self.thorax(P))
        return f.astype(np.float32)

    def aorta_path(self, z0: float, z1: float):
        zs = np.arange(z1 + 40, z0 - 40, -30.0)
        pts = []
        for z in zs:
            vx, vy = self.vert_radii(z)
            yv = float(self.y_vb(np.float32(z)))
            thor = np.clip((z - self.hL) / 60.0, 0, 1)
            x = self.ao_x + float(self.x_spine(z)) + thor * (vx + 4 - self.ao_x)
            y = (yv - vy - self.r_ao - 3) * (1 - thor) + (yv - 0.2 * vy) * thor
            pts.append((x, y, float(z)))
        return pts

    def ivc_path(self, z0: float, z1: float):
        zs = np.arange(min(z1 + 40, 60), z0 - 40, -25.0)
        pts = []
        for z in zs:
            vx, vy = self.vert_radii(z)
            yv = float(self.y_vb(np.float32(z)))
            hep = np.clip((z + 0.4 * self.H) / (0.25 * self.H), 0, 1)
            x = self.ivc_x + float(self.x_spine(z)) - 4 * hep
            y = yv - vy - self.r_ivc - 4 - self.ivc_shift * hep
            pts.append((x, y, float(z)))
        return pts


# ========================================================================================= HU levels


def _levels(rng: np.random.Generator, phase: str, c: float, anat: _Anatomy) -> dict:
    """Mean HU of every tissue for this case (contrast phase ``phase``, contrast scale ``c``)."""
    u = rng.uniform
    pv, la = phase == "portal_venous", phase == "late_arterial"

    def enh(pv_range, la_range):
        v_pv, v_la = u(*pv_range), u(*la_range)
        return c * (v_pv if pv else v_la if la else 0.0)

    blood = u(36, 46)
    liver0 = u(52, 66) - (u(15, 35) if anat.steatosis else 0.0)
    L = {}
    L[_T.AIR] = -1000.0
    L[_T.FAT] = u(-112, -88)
    L[_T.MUSCLE] = u(42, 58) + enh((5, 15), (3, 10))
    L[_T.LIVER] = liver0 + enh((38, 62), (12, 30))
    portal = blood + enh((110, 150), (60, 110))
    L[_T.VESSEL] = portal
    L["hepatic_veins"] = blood + enh((100, 145), (0, 25))
    L[_T.SPLEEN] = u(42, 52) + enh((55, 85), (60, 100))
    cortex0 = u(28, 38)
    L[_T.CORTEX] = cortex0 + enh((120, 165), (140, 220))
    L[_T.MEDULLA] = cortex0 + enh((85, 130), (20, 60))
    L[_T.STOMACH_WALL] = u(35, 45) + enh((35, 65), (45, 80))
    L[_T.GB_WALL] = u(35, 45) + enh((25, 55), (30, 60))
    L[_T.STOMACH_FLUID] = u(0, 20)
    L[_T.GAS] = u(-1000, -975)
    L[_T.AORTA] = blood + enh((105, 150), (190, 300))
    L[_T.IVC] = blood + enh((80, 130), (15, 50))
    L[_T.CORTICAL] = u(750, 1200) - 150 * anat.age_factor
    L[_T.MARROW] = u(210, 300) - 60 * anat.age_factor
    L[_T.LUNG] = u(-900, -840)
    L[_T.HEART] = blood + enh((100, 150), (180, 300))
    L[_T.GALLBLADDER] = u(25, 40) if (anat.gb and anat.gb["sludge"]) else u(0, 22)
    L[_T.SKIN] = u(15, 40) + enh((5, 15), (5, 15))
    L[_T.BOWEL] = u(30, 42) + enh((35, 65), (35, 70))
    L[_T.PANCREAS] = u(38, 50) + enh((45, 70), (65, 100))
    L[_T.ORAL] = u(150, 450)
    L[_T.TABLE] = u(200, 450)
    L[_T.MYOCARDIUM] = u(42, 55) + enh((50, 80), (60, 100))
    L[_T.CANAL] = u(15, 35)
    L[_T.DISC] = u(70, 110)
    L[_T.STOOL] = u(-40, 30)
    L[_T.PULM_VESSEL] = blood + enh((60, 120), (60, 160))
    L[_T.MES_VESSEL] = blood + enh((90, 140), (50, 150))
    L[_T.CARTILAGE] = u(90, 180)
    L[_T.ASCITES] = u(0, 18)
    L[_T.CALCIFICATION] = u(300, 900)
    L["bowel_fluid"] = u(5, 25)
    L["lung_dependent"] = u(40, 140)
    L["liver_texture"] = u(2.5, 5.0) if pv else u(5.0, 9.0) if la else u(2.0, 4.0)
    L["spleen_texture"] = u(20, 35) if la else u(2, 5)
    L["marrow_texture"] = u(20, 40)
    L["fat_texture"] = u(4, 10)
    L["muscle_texture"] = u(3, 8)
    return L


# ============================================================================================ tumours


def _tumour_levels(rng: np.random.Generator, kind: str, phase: str, liver: float, c: float) -> dict:
    """HU of the parts of one tumour of ``kind`` (relative to the liver parenchyma ``liver``)."""
    u = rng.uniform
    pv, la = phase == "portal_venous", phase == "late_arterial"

    def rel(pv_range, la_range, un_range):
        r = u(*pv_range) if pv else u(*la_range) if la else u(*un_range)
        return r * (c if r > 0 and (pv or la) else 1.0)

    t = dict(texture=u(4, 12))
    if kind == "hypodense":
        t["base"] = liver + rel((-60, -20), (-50, -15), (-25, -5))
    elif kind == "hyperdense":
        t["base"] = liver + rel((15, 50), (25, 80), (3, 12))
    elif kind == "rim_enhancing":
        t["base"] = liver + rel((-60, -30), (-50, -20), (-25, -10))
        t["rim"] = liver + rel((0, 30), (20, 60), (-8, 0))
        t["rim_mm"] = u(1.5, 4.0)
    elif kind == "necrotic":
        t["base"] = liver + rel((-35, -10), (-30, 5), (-20, -5))
        t["core"] = u(5, 25)
        t["core_frac"] = u(0.35, 0.65)
    elif kind == "cystic":
        t["base"] = u(0, 20)
        t["texture"] = u(1, 3)
    elif kind == "calcified":
        t["base"] = liver + rel((-40, -15), (-35, -10), (-20, -5))
        t["calc"] = u(300, 900)
        t["dense"] = u(200, 600)
    return t


@dataclass
class _TumourSpec:
    kind: str
    shape: str
    margin: str
    radius: float
    centre: np.ndarray  # patient frame (x, y, z)
    touches: list
    levels: dict
    blur_mm: float
    ellipse: tuple
    rot: np.ndarray
    lobes: list
    field_seed: int
    calcs: list


# ============================================================================================ renderer


class _Case:
    """Draws one case's parameters and renders it onto its grid."""

    def __init__(self, seed: int, size: str):
        if size not in SIZES:
            raise ValueError(f"unknown phantom size {size!r}; use one of {sorted(SIZES)}")
        if int(seed) < 0:
            raise ValueError("seed must be a non-negative integer")
        self.seed, self.size = int(seed), size
        self.anat = _Anatomy(_stream(seed, _STREAM_ANATOMY))
        self._scan_parameters(_stream(seed, _STREAM_SCAN))
        self.levels = _levels(_stream(seed, _STREAM_LEVELS), self.phase, self.contrast, self.anat)
        self.rng_tum = _stream(seed, _STREAM_TUMOURS)
        self.rng_tex = _stream(seed, _STREAM_TEXTURE)
        self.rng_shape = _stream(seed, _STREAM_SHAPES)  # anatomy-defined fields (grid independent)
        self.rng_noise = _stream(seed, _STREAM_NOISE, list(SIZES).index(size))

    # ------------------------------------------------------------------------------ acquisition

    def _scan_parameters(self, rng):
        u = rng.uniform
        a = self.anat
        self.phase = str(rng.choice(PHASES, p=_PHASE_P))
        self.contrast = u(0.85, 1.15)
        # in-plane field of view fitted to the patient (sometimes too small: the body edge is cut)
        width = 2 * a.a0 * 1.05
        margin = u(0, 120) if u() < 0.85 else u(-50, -10)
        fov = float(np.clip(width + margin, 0.6 * 512, 0.9 * 512))
        self.fov = fov
        self.pixel_full = round(fov / 512, 4)
        self.circular = u() < 0.35
        self.body_offset = (rng.normal(0, 12), rng.normal(0, 12) - 0.15 * (a.b_post - a.b_ant))
        # slices
        if u() < 0.2:
            sz = u(1.0, 5.0)
        else:
            sz = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0],
                                  p=[0.12, 0.10, 0.10, 0.12, 0.16, 0.10, 0.08, 0.22]))
        self.slice_full = round(sz, 3)
        self.slice_small = self.slice_full if self.slice_full >= 3.0 else round(u(3.0, 5.0), 3)
        coverage = u(200, 320)
        self.z_top = u(15, 70)
        self.coverage = coverage
        self.z_centre_lps = u(-450, 50)
        # image formation
        self.noise_sigma = u(8, 20)
        self.nps_fc = u(0.25, 0.45)  # cycles/mm
        self.kernel_a = u(0.10, 0.22)
        self.kernel_az = u(0.04, 0.16)

    def make_grid(self) -> _Grid:
        n = SIZES[self.size]
        s = self.pixel_full * 512 / n
        sz = self.slice_full if self.size == "full" else self.slice_small
        nz = int(min(320, max(3, round(self.coverage / sz))))
        if self.size == "full":
            nz = min(nz, 320)
        z_lo_p = self.z_top - (nz - 1) * sz
        origin_xy = -(n - 1) / 2 * s
        origin_z = self.z_centre_lps - (nz - 1) / 2 * sz
        offset = (self.body_offset[0], self.body_offset[1], origin_z - z_lo_p)
        return _Grid((nz, n, n), (s, s, sz), (origin_xy, origin_xy, origin_z), offset)

    # ------------------------------------------------------------------------------ rendering

    def render(self) -> Phantom:
        a = self.anat
        g = self.grid = self.make_grid()
        nz, ny, nx = g.shape
        tissue = np.zeros(g.shape, np.uint8)
        self.tissue = tissue
        self._paint_table()
        self._paint_body()
        self._paint_thorax()
        self._paint_spine()
        self._paint_ribs()
        self._paint_retroperitoneum()
        self._paint_gi()
        self._paint_liver()
        self._paint_after_liver()
        # HU from tissue classes, then textures and soft (partial-volume) structures
        lut = np.zeros(256, np.float32)
        for k, v in self.levels.items():
            if isinstance(k, int):
                lut[k] = v
        hu = lut[tissue]
        self.hu = hu
        self._textures()
        self._liver_vessels()
        tumours = self._tumours()
        label = np.zeros(g.shape, np.uint8)
        if self.liver_sl is not None:
            view = label[self.liver_sl]
            view[self.liver_mask] = 1
            view[self.tumour_mask] = 2
        self._image_formation()
        np.clip(hu, -1024, 3071, out=hu)
        np.rint(hu, out=hu)
        image = hu.astype(np.int16)
        del self.hu, hu
        if self.circular:  # reconstruction circle: outside it the scanner writes padding
            outside = self._outside_circle()
            for k in range(g.shape[0]):
                image[k][outside] = -1024
                tissue[k][outside] = _T.AIR
                label[k][outside] = 0
        for t in tumours:  # what each tumour's own label voxels contain in the final image
            own = t.pop("_own")
            if own is None:
                t["voxels"], t["mean_hu"] = 0, None
            else:
                sl, mask = own
                mask = mask & (label[sl] == 2)
                t["voxels"] = int(np.count_nonzero(mask))
                t["mean_hu"] = round(float(image[sl][mask].mean()), 1) if t["voxels"] else None
            t["volume_ml"] = round(t["voxels"] * float(np.prod(g.spacing)) / 1000.0, 4)
        geometry = Geometry(tuple(float(s) for s in g.spacing), tuple(float(o) for o in g.origin),
                            (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        liver_ml = float(np.count_nonzero(label)) * float(np.prod(g.spacing)) / 1000.0
        meta = dict(
            generator="LiverTumorSegLib.phantoms", version=PHANTOM_VERSION, seed=self.seed, size=self.size,
            spacing=[float(s) for s in g.spacing], shape=[int(s) for s in g.shape],
            origin=[float(o) for o in g.origin],
            phase=self.phase, contrast_scale=round(self.contrast, 4), noise_sigma_hu=round(self.noise_sigma, 3),
            liver_hu=round(float(self.levels[_T.LIVER]), 2), portal_vein_hu=round(float(self.levels[_T.VESSEL]), 2),
            hepatic_vein_hu=round(float(self.levels["hepatic_veins"]), 2),
            spleen_hu=round(float(self.levels[_T.SPLEEN]), 2),
            fov_mm=round(self.fov, 2), circular_fov=bool(self.circular),
            body_offset_mm=[round(float(v), 2) for v in self.body_offset],
            kernel_blur=round(self.kernel_a, 4), steatosis=bool(a.steatosis), cirrhosis=bool(a.cirrhosis),
            ascites=bool(a.ascites), gallbladder=a.gb is not None, oral_contrast=bool(a.oral),
            liver_volume_ml=round(liver_ml, 2), tumour_count=len(tumours),
            hu_levels={TISSUES[k]: round(float(v), 1) for k, v in self.levels.items() if isinstance(k, int)},
        )
        return Phantom(Image(image, geometry), label, tissue, tumours, meta)

    # ---------------------------------------------------------------------------------- painting

    def _paint_fn(self, lo, hi, fn, step_xy=2.0, step_z=2.5, categorical=()):
        sl = self.grid.box(lo, hi)
        if sl is None:
            return None, None
        return sl, _sample(self.grid, sl, fn, step_xy, step_z, categorical)

    def _paint_table(self):
        a, g = self.anat, self.grid
        X, Y = g.px[None, :], g.py[:, None]
        top = a.table_top(X) + 1.0
        inside = (np.abs(X) < 230) & (Y >= top) & (Y < top + a.tab_thick)
        t = max(2.0, 1.05 * g.spacing[1])
        shell = inside & ((Y < top + t) | (Y >= top + a.tab_thick - t))
        self.tissue[:, shell] = _T.TABLE

    def _paint_body(self):
        a, g, tissue = self.anat, self.grid, self.tissue
        sl = (slice(0, g.shape[0]), slice(0, g.shape[1]), slice(0, g.shape[2]))
        lo = (-a.a0 * 1.3, -a.b_ant * 1.4, -a.H - 450.0)
        hi = (a.a0 * 1.3, a.b_post * 1.3, 250.0)
        tex = _Field(self.rng_shape, lo, hi, 10.0)

        def body(P):
            return a.body_fields(P) + (tex(P),)

        self.cav_depth = np.empty(g.shape, np.int8)  # depth inside the abdominal cavity (mm, clipped)
        self.body_texture = np.empty(g.shape, np.int8)  # unit-variance texture x 40, for fat and muscle
        t_skin = np.float32(a.t_skin)

        def layers(k, planes):
            f_out, f_fm, f_cav, t = planes
            view = tissue[k]
            np.copyto(view, np.uint8(_T.SKIN), where=f_out < 0)
            np.copyto(view, np.uint8(_T.FAT), where=f_out < -t_skin)
            np.copyto(view, np.uint8(_T.MUSCLE), where=f_fm < 0)
            np.copyto(view, np.uint8(_T.FAT), where=f_cav < 0)
            np.negative(f_cav, out=f_cav)
            np.clip(f_cav, -127, 127, out=f_cav)
            self.cav_depth[k] = f_cav
            t *= 40.0
            np.clip(t, -127, 127, out=t)
            self.body_texture[k] = t

        _for_slices(g, sl, body, 4.0, 6.0, layers)

    def _paint_thorax(self):
        a, g, tissue = self.anat, self.grid, self.tissue
        zmax = float(g.pz[-1])
        if zmax < a.dome_min - 5:
            return
        lo = (-a.A_R - 20, a.y_front - 30, a.dome_min - 5)
        hi = (a.A_L + 20, a.y_back + 40, zmax + 1)
        sl = g.box(lo, hi)
        if sl is None:
            return
        thor = _sample(g, sl, a.thorax, 2.0, 2.5)
        cav = self.cav_depth[sl] > 0
        view = tissue[sl]
        lung = cav & (thor < 0)
        view[lung] = _T.LUNG
        view[cav & (thor >= 0) & (thor < a.t_d)] = _T.MUSCLE
        self.thorax_sl, self.thorax_f = sl, thor
        # heart with pericardial fat
        h = a.heart
        hx, hy = h["c"]
        hz = float(a.dome(np.float32(hx), np.float32(hy))) + 0.75 * h["r"][2]
        centre = (hx, hy, hz)

        def heart(P):
            dx, dy, dz = _local(P.X, P.Y, P.Z, centre, h["rot"])
            return _ellipsoid(dx, dy, dz, *h["r"])

        lo_h = (hx - 90, hy - 80, hz - 90)
        hi_h = (hx + 90, hy + 80, hz + 90)
        shl, fh = self._paint_fn(lo_h, hi_h, heart)
        if shl is not None:
            # layers follow the heart clipped by the diaphragm: the inferior wall lies on the diaphragm
            fc = np.maximum(fh, self._thorax_at(shl) + 1.0)
            _paint(tissue, shl, fc < h["peri"], _T.FAT, over=(_T.LUNG,))
            _paint(tissue, shl, fc < 0, _T.MYOCARDIUM, over=(_T.LUNG, _T.FAT))
            _paint(tissue, shl, fc < -h["myo"], _T.HEART)
        # mediastinal fat around oesophagus and aorta, then the oesophagus
        zc = np.float32(a.hL)
        yv = float(a.y_vb(zc))
        vx, vy = a.vert_radii(float(zc))
        med_c = (float(a.x_spine(zc)) + 5, yv - vy - 10)

        def mediast(P):
            return np.sqrt(((P.X - med_c[0]) / 1.3) ** 2 + (P.Y - med_c[1]) ** 2) - 22.0 + 0 * P.Z

        shm, fm = self._paint_fn((med_c[0] - 45, med_c[1] - 40, a.hL - 150), (med_c[0] + 45, med_c[1] + 40, zmax + 1), mediast)
        if shm is not None:
            above = self._thorax_at(shm) < 0
            _paint(tissue, shm, above & (fm < 0), _T.FAT, over=(_T.LUNG,))
        self._lung_vessels()

    def _thorax_at(self, sl):
        """Thorax function on the sub-box ``sl`` of the image (evaluated on demand)."""
        return _sample(self.grid, sl, self.anat.thorax, 2.0, 2.5)

    def _tube(self, pts, radii, tid, over=None, shell=None, inner_tid=None, k=0.0):
        """Hard-paint a tube (chain of capsules); optional inner lumen ``shell`` mm inside with ``inner_tid``."""
        pts = [tuple(map(float, p)) for p in pts]
        arr = np.array(pts)
        rmax = max(radii)
        lo = arr.min(0) - rmax - 2
        hi = arr.max(0) + rmax + 2
        sl = self.grid.box(lo, hi)
        if sl is None:
            return None, None
        P = self.grid.points(sl)
        f = _tube(P, pts, radii, k)
        _paint(self.tissue, sl, f < 0, tid, over)
        if shell is not None and inner_tid is not None:
            _paint(self.tissue, sl, f < -shell, inner_tid, over=(tid,))
        return sl, f

    def _paint_spine(self):
        """Vertebrae slice by slice: body (cortical shell, marrow, endplates), discs, neural arch around the
        canal, spinous and transverse processes (thoracic spinous processes slope down to the next level)."""
        a, g, tissue = self.anat, self.grid, self.tissue
        rcx, rcy = a.r_canal
        xs, ys = g.px, g.py

        def seg2(X, Y, p, q, r0, r1):
            ab = (q[0] - p[0], q[1] - p[1])
            l2 = ab[0] ** 2 + ab[1] ** 2
            t = np.clip(((X - p[0]) * ab[0] + (Y - p[1]) * ab[1]) / l2, 0, 1)
            return np.sqrt((X - p[0] - t * ab[0]) ** 2 + (Y - p[1] - t * ab[1]) ** 2) - (r0 + (r1 - r0) * t)

        for k, z in enumerate(g.pz):
            z = float(z)
            v = next((v for v in a.verts if v["bot"] <= z <= v["top"]), None)
            if v is None:  # disc level: dimensions of the vertebra above
                v = next((v for v in reversed(a.verts) if v["bot"] > z), None)
                if v is None or v["bot"] - z > 12:
                    continue
            xc = float(a.x_spine(np.float32(z)))
            yl = float(a.y_lamina(np.float32(z)))
            yc = yl - 5.0 - rcy
            rx, ry = v["rx"], v["ry"]
            yb = yc - rcy - 3.0 - ry
            span = rx + (45 if v["lumbar"] else 32)
            x0, x1 = np.searchsorted(xs, xc - span), np.searchsorted(xs, xc + span)
            y0, y1 = np.searchsorted(ys, yb - ry - 6), np.searchsorted(ys, yl + a.spinous_len + 6)
            if x1 <= x0 or y1 <= y0:
                continue
            X = xs[None, x0:x1] - xc
            Y = ys[y0:y1, None]
            view = tissue[k, y0:y1, x0:x1]
            in_body = v["bot"] <= z <= v["top"]
            rho = np.sqrt((X / rx) ** 2 + ((Y - yb) / ry) ** 2)
            d_body = (rho - 1.0) * min(rx, ry)
            canal = np.sqrt((X / rcx) ** 2 + ((Y - yc) / rcy) ** 2) < 1.0
            if in_body:
                endplate = min(z - v["bot"], v["top"] - z) < 1.2
                view[d_body < 0] = _T.CORTICAL
                if not endplate:
                    view[d_body < -1.3] = _T.MARROW
                rel = (z - v["bot"]) / (v["top"] - v["bot"])
                parts = None
                if 0.1 < rel < 0.9:  # pedicles and laminae: a ring around the canal
                    ring = np.sqrt((X / (rcx + 5.5)) ** 2 + ((Y - yc) / (rcy + 5.0)) ** 2)
                    parts = np.where(Y > yb, (ring - 1.0) * 5.0, 10.0)
                srel = rel + (0.0 if v["lumbar"] else 0.45)
                if 0.2 < srel < 1.05:
                    tip = yl + a.spinous_len * (0.75 if v["lumbar"] else 0.6)
                    sp = seg2(X, Y, (0.0, yc + rcy), (0.0, tip), 3.2 if v["lumbar"] else 2.6, 4.5 if v["lumbar"] else 3.0)
                    parts = sp if parts is None else np.minimum(parts, sp)
                if 0.3 < rel < 0.8:
                    tl = (rx + 10) if v["lumbar"] else (rx - 6)
                    back = 0.2 if v["lumbar"] else 0.6
                    for side in (-1, 1):
                        p0 = (side * (rcx + 3.0), yc)
                        p1 = (side * (rcx + tl), yc + back * tl)
                        tp = seg2(X, Y, p0, p1, 4.0, 2.5 if v["lumbar"] else 3.5)
                        parts = tp if parts is None else np.minimum(parts, tp)
                if parts is not None:
                    sel = (parts < 0) & ~canal
                    view[sel & (d_body >= -1.3)] = _T.CORTICAL
                    view[sel & (parts < -1.3) & (d_body >= -1.3)] = _T.MARROW
            else:
                view[d_body < 0] = _T.DISC
            view[canal] = _T.CANAL

    def _rib_paths(self):
        a = self.anat
        ribs = []
        ext = {5: 2.8, 6: 2.75, 7: 2.65, 8: 2.55, 9: 2.45, 10: 2.3, 11: 1.6, 12: 0.95}
        cart = {5: 0.82, 6: 0.78, 7: 0.74, 8: 0.72, 9: 0.72, 10: 0.74, 11: 1.0, 12: 1.0}
        rng = np.random.default_rng(a.calc_seed)
        for v in a.verts:
            if not v["name"].startswith("T"):
                continue
            n = int(v["name"][1:])
            if n < 5:
                continue
            zc = v["bot"] + 0.6 * (v["top"] - v["bot"])
            drop = rng.uniform(55, 90) if n < 11 else rng.uniform(20, 40)
            rise = rng.uniform(15, 40) if 6 <= n <= 10 else 0.0
            r_rib = rng.uniform(3.2, 4.3)
            for side in (-1, 1):
                yv = float(a.y_vb(np.float32(zc)))
                xs = float(a.x_spine(np.float32(zc)))
                pts = [(xs + side * (v["rx"] + 2), yv + 0.5 * v["ry"], zc)]
                n_arc = 11
                sv = np.arange(n_arc + 1) / n_arc
                th = np.pi / 2 - side * (0.55 + sv * ext[n])
                sc = cart[n]
                zs = np.where(sv <= sc, zc - drop * (1 - np.cos(np.pi * np.minimum(sv, sc) / (2 * sc))),
                              zc - drop + rise * (sv - sc) / max(1 - sc, 1e-6))
                depth = lambda tm, r=r_rib: np.where(tm > 2 * r + 2, r + 0.8, tm / 2)  # noqa: E731
                pts += [tuple(p) for p in a.wall_point(th, zs, depth)]
                ribs.append(dict(pts=pts, r=r_rib, cart=cart[n], n=n))
        return ribs

    def _paint_ribs(self):
        a, g = self.anat, self.grid
        wall = (_T.MUSCLE, _T.FAT, _T.LUNG)
        for rib in self._rib_paths():
            pts = rib["pts"]
            n_bone = int(round(1 + (len(pts) - 2) * rib["cart"]))
            r = rib["r"]
            radii = [r * 0.9] + [r] * (len(pts) - 1)
            self._tube(pts[: n_bone + 1], radii[: n_bone + 1], _T.CORTICAL, over=wall, shell=1.2, inner_tid=_T.MARROW)
            if n_bone + 1 < len(pts):
                self._tube(pts[n_bone:], [r * 0.9] * (len(pts) - n_bone), _T.CARTILAGE, over=wall)
        # sternum / xiphoid (anterior midline, upper slices)
        z_x = a.verts[[v["name"] for v in a.verts].index("T10")]["top"] - 5
        top = float(g.pz[-1]) + 5
        if top > z_x - 40:
            pts, radii = [], []
            for z in np.arange(z_x - 45, max(top, z_x - 40) + 10, 10.0):
                p = a.wall_point(-np.pi / 2, float(z), 4.0)
                pts.append(p)
                radii.append(7.0 if z > z_x else 4.0)
            self._tube(pts, radii, _T.CORTICAL, over=wall, shell=1.2, inner_tid=_T.MARROW)

    def _paint_retroperitoneum(self):
        a, g, tissue = self.anat, self.grid, self.tissue
        z0, z1 = float(g.pz[0]), float(g.pz[-1])
        # psoas muscles
        for side in (-1, 1):
            pts, radii = [], []
            for z in np.arange(-0.55 * a.H, z0 - 60, -30.0):
                vx, vy = a.vert_radii(z)
                grow = np.clip((-0.55 * a.H - z) / 130.0, 0, 1)
                r = 5 + grow * 15 * (a.A_in / 125)
                yv = float(a.y_vb(np.float32(z)))
                pts.append((float(a.x_spine(np.float32(z))) + side * (vx + r * 0.8), yv + 0.2 * vy, float(z)))
                radii.append(r)
            if len(pts) > 1:
                self._tube(pts, radii, _T.MUSCLE, over=(_T.FAT,))
        # aorta (calcified plaques in older patients) and IVC
        ao = a.aorta_path(z0, z1)
        self._tube(ao, [a.r_ao] * len(ao), _T.AORTA, over=(_T.FAT, _T.LUNG, _T.MUSCLE))
        self.aorta_pts = ao
        if a.aorta_calc:
            rng = np.random.default_rng(a.calc_seed + 1)
            for _ in range(a.aorta_calc):
                i = int(rng.integers(0, len(ao) - 1))
                t = rng.uniform()
                p = np.array(ao[i]) * (1 - t) + np.array(ao[i + 1]) * t
                ang = rng.uniform(0, 2 * np.pi)
                c = p + np.array([math.cos(ang), math.sin(ang), 0.0]) * (a.r_ao - 0.5)
                r = rng.uniform(0.8, 2.0)
                self._tube([c - [0, 0, r], c + [0, 0, r * 2]], [r, r], _T.CALCIFICATION,
                           over=(_T.AORTA, _T.FAT, _T.MUSCLE))
        # renal vessels to the kidneys
        for k in a.kidneys:
            c = np.array(k["c"])
            hilum = c + np.array([-k["side"] * 0.7 * k["r"][0], -0.2 * k["r"][1], 0.0])
            zk = c[2]
            ao_pt = np.array([a.ao_x, float(a.y_vb(np.float32(zk))) - a.vert_radii(zk)[1] - a.r_ao - 3, zk + 10])
            ivc_pt = np.array([a.ivc_x, float(a.y_vb(np.float32(zk))) - a.vert_radii(zk)[1] - a.r_ivc - 4, zk + 5])
            self._tube([ao_pt, hilum + [0, 4, 0]], [2.8, 2.4], _T.AORTA, over=(_T.FAT,))
            if k["side"] > 0:  # left renal vein crosses in front of the aorta
                mid = np.array([a.ao_x, ao_pt[1] - a.r_ao - 5, zk + 8])
                self._tube([hilum - [0, 3, 0], mid, ivc_pt], [4.5, 4.0, 4.5], _T.IVC, over=(_T.FAT, _T.AORTA))
            else:
                self._tube([hilum - [0, 3, 0], ivc_pt], [4.5, 4.5], _T.IVC, over=(_T.FAT,))
        # SMA and coeliac trunk
        zp = a.z_panc
        yv = float(a.y_vb(np.float32(zp))) - a.vert_radii(zp)[1] - 2 * a.r_ao - 2
        self._tube([(a.ao_x, yv + 3, zp + 5), (a.ao_x - 2, yv - 12, zp - 10), (a.ao_x - 6, yv - 25, zp - 90)],
                   [3.5, 3.3, 2.5], _T.AORTA, over=(_T.FAT,))
        self._tube([(a.ao_x, yv + 3, zp + 30), (a.ao_x - 3, yv - 15, zp + 35)], [3.2, 3.0], _T.AORTA, over=(_T.FAT,))

    def _paint_gi(self):
        a, g, tissue = self.anat, self.grid, self.tissue
        soft = (_T.FAT,)
        # spleen
        s = a.spleen
        rmax = max(s["r"]) + 10
        c = s["c"]
        shl, f = self._paint_fn((c[0] - rmax, c[1] - rmax, c[2] - rmax), (c[0] + rmax, c[1] + rmax, c[2] + rmax), a.spleen_f)
        if shl is not None:
            _paint(tissue, shl, f < 0, _T.SPLEEN, over=soft)
            self.spleen_sl = shl
        # stomach: wall, then contents split by an air-fluid level (patient supine: gas anterior)
        st = a.stomach
        pts, radii = st["pts"], st["r"]
        arr = np.array(pts)
        lo = arr.min(0) - max(radii) - 5
        hi = arr.max(0) + max(radii) + 5

        def stomach(P):
            return _tube(P, pts, radii, k=15.0)

        shl, f = self._paint_fn(lo, hi, stomach)
        if shl is not None:
            P = g.points(shl)
            _paint(tissue, shl, f < 0, _T.STOMACH_WALL, over=soft)
            lumen = f < -st["wall"]
            y_front = float((arr[:, 1] - np.array(radii)).min())
            y_back = float((arr[:, 1] + np.array(radii)).max())
            level = y_front + st["fill"] * (y_back - y_front)
            gas = lumen & (P.Y < level)
            content = {"fluid": _T.STOMACH_FLUID, "food": _T.STOMACH_FLUID, "oral": _T.ORAL}[st["content"]]
            _paint(tissue, shl, lumen & ~gas, content, over=(_T.STOMACH_WALL,))
            _paint(tissue, shl, gas, _T.GAS, over=(_T.STOMACH_WALL,))
            self.stomach_sl = shl
        # oesophagus through the hiatus into the cardia
        zmax = float(g.pz[-1])
        st, rf = np.array(a.stomach["pts"][0]), a.stomach["r"][0]
        zc = np.float32(a.hL)
        yv, vy = float(a.y_vb(zc)), a.vert_radii(float(zc))[1]
        hiatus = np.array([0.5 * st[0], 0.5 * (st[1] + yv - vy - 14), a.hL - 12])
        cardia = st + (hiatus - st) / (np.linalg.norm(hiatus - st) + 1e-6) * 0.8 * rf
        oes = [(float(a.x_spine(np.float32(z))) + 8, float(a.y_vb(np.float32(z))) - a.vert_radii(z)[1] - 12, z)
               for z in (zmax + 30.0, a.hL + 20.0)] + [tuple(hiatus), tuple(cardia)]
        self._tube(oes, [8.0, 8.0, 8.0, 8.0], _T.MUSCLE, over=(_T.LUNG, _T.FAT, _T.MUSCLE))
        # duodenum
        d = a.duodenum
        self._tube(d["pts"], [d["r"]] * len(d["pts"]), _T.BOWEL, over=soft, shell=2.5,
                   inner_tid=_T.ORAL if a.oral else _T.BOWEL)
        # pancreas, splenic vein, portal trunk, SMV
        pn = a.pancreas
        arr = np.array(pn["pts"])
        lo = arr.min(0) - 25
        hi = arr.max(0) + 25
        warp = [(2.5, [_Field(self.rng_shape, lo, hi, 10.0) for _ in range(3)])]

        def pancreas(P):
            X, Y, Z = a._warped(P, warp)
            return _chain(X, Y, Z, pn["pts"], pn["r"], k=8.0)

        shl, f = self._paint_fn(lo, hi, pancreas, 1.5, 2.0)
        if shl is not None:
            _paint(tissue, shl, f < 0, _T.PANCREAS, over=soft)
        for v in (a.splenic_vein, a.portal_trunk, a.smv):
            self._tube(v["pts"], v["r"], _T.VESSEL, over=soft + (_T.PANCREAS,))
        # colon with haustra, stool and gas
        col = a.colon
        fine = _spline(col["pts"], 5)
        arc = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(fine, axis=0), axis=1))])
        cr = col["r"] * (1 + 0.12 * np.cos(2 * np.pi * arc / col["haustra"]))
        gas = np.interp(arc, np.linspace(0, arc[-1], len(col["gas_profile"])), col["gas_profile"])
        shifted = fine + np.stack([np.zeros_like(arc), 2 * cr * gas, np.zeros_like(arc)], 1)
        lo = fine.min(0) - col["r"] * 1.2 - 3
        hi = fine.max(0) + col["r"] * 1.2 + 3
        sfield = _Field(self.rng_shape, lo, hi, 7.0)

        def colon(P):
            return _tube(P, fine, list(cr), k=6.0), _tube(P, shifted, list(cr), k=6.0), sfield(P)

        shl, res = self._paint_fn(lo, hi, colon)
        if shl is not None:
            f, fs, sf = res
            _paint(tissue, shl, f < 0, _T.BOWEL, over=soft)
            lumen = (f < -col["wall"]) & (tissue[shl] == _T.BOWEL)
            _paint(tissue, shl, lumen, _T.STOOL)
            # gas: bubbles in the stool and a gas cap in the non-dependent (anterior) lumen
            _paint(tissue, shl, lumen & ((sf > 1.3) | (fs > -col["wall"])), _T.GAS, over=(_T.STOOL,))
            self.colon_sl, self.colon_field = shl, sf
        # small bowel loops: bands of a random field below the liver, in the visceral fat
        self._small_bowel()

    def _small_bowel(self):
        """Small-bowel loops (bands of a random field) with fluid, gas or oral contrast, and mesenteric
        vessels (a thin tube network) in the visceral fat below the liver."""
        a, g, tissue = self.anat, self.grid, self.tissue
        lo = (-a.A_R, a.y_front, -a.H - 320.0)
        hi = (a.A_L, a.y_back - 10, a.bowel_top + 40)
        rng = self.rng_shape
        f1 = _Field(rng, lo, hi, 38.0)
        f2 = _Field(rng, lo, hi, 60.0)
        f3 = _Field(rng, lo, hi, 45.0)
        v1 = _Field(rng, lo, hi, 30.0)
        v2 = _Field(rng, lo, hi, 30.0)
        top, oral = a.bowel_top, a.oral

        def loops(P):
            fade = np.clip((top + 40 - P.Z) / 50.0, 0, 1)
            band = np.abs(f1(P)) - 0.55 * fade
            net = np.maximum(np.abs(v1(P)), np.abs(v2(P)))
            content = np.where(f2(P) > 1.5, 1, 0).astype(np.uint8)  # 1: gas
            if oral:
                content[(f3(P) > 0.3) & (content == 0)] = 2  # 2: oral contrast
            return band, net, content

        shl, res = self._paint_fn(lo, hi, loops, 2.0, 3.0, categorical=(2,))
        if shl is None:
            return
        band, net, content = res
        cav = self.cav_depth[shl] > 3
        _paint(tissue, shl, cav & (band < 0), _T.BOWEL, over=(_T.FAT,))
        lumen = cav & (band < -0.14) & (tissue[shl] == _T.BOWEL)
        _paint(tissue, shl, lumen & (content == 2), _T.ORAL)
        _paint(tissue, shl, lumen & (content == 1), _T.GAS)
        self.bowel_sl, self.bowel_lumen = shl, lumen & (content == 0)
        _paint(tissue, shl, (net < 0.07) & (self.cav_depth[shl] > 2), _T.MES_VESSEL, over=(_T.FAT,))

    def _paint_liver(self):
        a, g, tissue = self.anat, self.grid, self.tissue
        lo, hi = a.liver_box
        sl, f = self._paint_fn(lo, hi, a.liver, 2.0, 2.5)
        self.liver_sl = sl
        if sl is None:
            self.liver_f = None
            return
        over = (_T.FAT, _T.BOWEL, _T.STOOL, _T.GAS, _T.STOMACH_WALL, _T.STOMACH_FLUID, _T.ORAL,
                _T.SPLEEN, _T.VESSEL, _T.MES_VESSEL)
        if a.ascites:
            asc = (f >= 0) & (f < 14.0) & (self.cav_depth[sl] > 1) & (self._thorax_at(sl) > a.t_d)
            _paint(tissue, sl, asc, _T.ASCITES, over=(_T.FAT, _T.MES_VESSEL))
        _paint(tissue, sl, f < 0, _T.LIVER, over=over)
        self.liver_f = f

    def _paint_after_liver(self):
        a, g, tissue = self.anat, self.grid, self.tissue
        carve = (_T.FAT, _T.LIVER, _T.BOWEL, _T.STOOL, _T.MES_VESSEL, _T.ASCITES, _T.GAS)
        # gallbladder
        if a.gb is not None:
            gb = a.gb
            r = max(gb["r"]) + 5
            c = gb["c"]
            shl, f = self._paint_fn((c[0] - r, c[1] - r, c[2] - r), (c[0] + r, c[1] + r, c[2] + r), a.gallbladder, 1.5, 2.0)
            if shl is not None:
                _paint(tissue, shl, f < 0, _T.GB_WALL, over=carve)
                _paint(tissue, shl, f < -gb["wall"], _T.GALLBLADDER, over=(_T.GB_WALL,))
                self.gb_sl, self.gb_f = shl, f
        # kidneys: cortex, pyramids (medulla), sinus fat
        for k in a.kidneys:
            r = max(k["r"]) + 6
            c = k["c"]
            lo, hi = (c[0] - r, c[1] - r, c[2] - r), (c[0] + r, c[1] + r, c[2] + r)

            def kid(P, k=k):
                f, sinus, dx, dy, dz = a.kidney(P, k)
                ang = np.arctan2(dz / k["r"][2], dy / k["r"][1])
                pyr = np.cos(k["n_pyr"] * ang + k["pyr_phase"])
                return f, sinus, pyr

            shl, res = self._paint_fn(lo, hi, kid, 1.5, 2.0)
            if shl is None:
                continue
            f, sinus, pyr = res
            _paint(tissue, shl, (f < 0) & (sinus > 0), _T.CORTEX, over=carve + (_T.MUSCLE,))
            med = (f < -k["t_cx"]) & (sinus > 2.5) & (pyr > -0.35)
            _paint(tissue, shl, med, _T.MEDULLA, over=(_T.CORTEX,))
            _paint(tissue, shl, (f < 0) & (sinus <= 0), _T.FAT, over=(_T.CORTEX, _T.LIVER))
        # IVC (carves the liver's bare area) and hepatic segment
        z0, z1 = float(g.pz[0]), float(g.pz[-1])
        ivc = a.ivc_path(z0, z1)
        self._tube(ivc, [a.r_ivc] * len(ivc), _T.IVC, over=(_T.FAT, _T.LIVER, _T.MUSCLE, _T.LUNG, _T.MES_VESSEL))
        self.ivc_pts = ivc

    # ------------------------------------------------------------------------------ textures

    def _texture(self, sl, tid, sigma, length, extra=None, slow=None):
        if sl is None or sigma <= 0:
            return
        view = self.tissue[sl]
        mask = view == tid
        if not mask.any():
            return
        P = self.grid.points(sl)
        lo = (float(P.x[0]), float(P.y[0]), float(P.z[0]))
        hi = (float(P.x[-1]), float(P.y[-1]), float(P.z[-1]))
        fld = _Field(self.rng_tex, lo, hi, length)
        if slow is None:
            fn = fld
        else:  # add a slowly varying component (e.g. perfusion differences across the liver)
            fld2 = _Field(self.rng_tex, lo, hi, slow[1])
            ratio = np.float32(slow[0] / max(sigma, 1e-3))
            fn = lambda P: fld(P) + ratio * fld2(P)  # noqa: E731
        t = _sample(self.grid, sl, fn, length / 3.0, length / 3.0)
        t *= sigma
        if extra is not None:
            t += extra
        t *= mask
        self.hu[sl] += t

    def _white(self, sl, tid, sigma):
        """Uncorrelated texture inside ``tid`` (correlated later by the reconstruction blur)."""
        if sl is None:
            return
        view = self.tissue[sl]
        mask = view == tid
        n = int(np.count_nonzero(mask))
        if n:
            hv = self.hu[sl]
            hv[mask] += self.rng_tex.standard_normal(n, dtype=np.float32) * np.float32(sigma)

    def _textures(self):
        L, a, g = self.levels, self.anat, self.grid
        # liver parenchyma: fine mottling plus a slow perfusion gradient
        if self.liver_sl is not None:
            self._texture(self.liver_sl, _T.LIVER, L["liver_texture"], 8.0, slow=(3.0, 60.0))
        if getattr(self, "spleen_sl", None) is not None:
            self._texture(self.spleen_sl, _T.SPLEEN, L["spleen_texture"], 7.0)
        # lungs: dependent density gradient (posterior bases), pulmonary vessels
        if getattr(self, "thorax_sl", None) is not None:
            sl = self.thorax_sl
            P = g.points(sl)
            dep = (np.clip((P.Y - (a.y_back - 70.0)) / 70.0, 0, 1) * L["lung_dependent"]).astype(np.float32)
            view = self.tissue[sl]
            hv = self.hu[sl]
            for k in range(view.shape[0]):
                m = view[k] == _T.LUNG
                hv[k][m] += np.broadcast_to(dep[0], m.shape)[m]
            self._white(sl, _T.LUNG, 15.0)
        # bone marrow (trabecular), stool, stomach food
        self._white((slice(None), slice(None), slice(None)), _T.MARROW, L["marrow_texture"])
        if getattr(self, "colon_sl", None) is not None:
            hv = self.hu[self.colon_sl]
            m = self.tissue[self.colon_sl] == _T.STOOL
            hv[m] += 60.0 * self.colon_field[m]
            self._white(self.colon_sl, _T.STOOL, 35.0)
        if a.stomach["content"] == "food":
            self._texture(getattr(self, "stomach_sl", None), _T.STOMACH_FLUID, 30.0, 6.0, extra=np.float32(25.0))
        # fat and muscle: faint texture (septa, fatty streaks), slice by slice
        sf, sm = np.float32(L["fat_texture"] / 40.0), np.float32(L["muscle_texture"] / 40.0)
        scale = np.zeros(256, np.float32)
        scale[_T.FAT], scale[_T.MUSCLE] = sf, sm
        for k in range(g.shape[0]):
            self.hu[k] += self.body_texture[k] * scale[self.tissue[k]]
        del self.body_texture
        # bowel lumen fluid darker than the enhancing wall
        if getattr(self, "bowel_sl", None) is not None:
            hv = self.hu[self.bowel_sl]
            hv[self.bowel_lumen & (self.tissue[self.bowel_sl] == _T.BOWEL)] = L["bowel_fluid"]

    def _lung_vessels(self):
        a, g = self.anat, self.grid
        if getattr(self, "thorax_sl", None) is None:
            return
        sl = self.thorax_sl
        lo = (-a.a0 - 10, a.y_front - 20, a.hL - max(a.drop) - 40)
        hi = (a.a0 + 10, a.y_back + 40, 200.0)
        f1 = _Field(self.rng_shape, lo, hi, 16.0)
        f2 = _Field(self.rng_shape, lo, hi, 16.0)

        def net(Q):
            return np.maximum(np.abs(f1(Q)), np.abs(f2(Q)))

        f = _sample(g, sl, net, 1.5, 2.0)
        _paint(self.tissue, sl, f < 0.09, _T.PULM_VESSEL, over=(_T.LUNG,))

    # ------------------------------------------------------------------------------ soft structures

    _ANAT_STEP = 3.0

    def _anatomy_liver_grid(self, step: float = _ANAT_STEP):
        """Liver (with the organs that carve it) on an isotropic grid independent of the image grid."""
        a = self.anat
        lo, hi = a.liver_box
        P = _Pts(np.arange(lo[2], hi[2], step), np.arange(lo[1], hi[1], step), np.arange(lo[0], hi[0], step))
        inside = a.liver(P) < 0
        if a.gb is not None:
            inside &= a.gallbladder(P) > 1.0
        for k in a.kidneys:
            inside &= a.kidney(P, k)[0] > 1.0
        ivc = a.ivc_path(float(lo[2]) - 50, float(hi[2]) + 50)
        inside &= _tube(P, ivc, [a.r_ivc + 1] * len(ivc)) > 0
        return P, inside

    def _liver_vessels(self):
        """Portal and hepatic venous trees inside the liver, painted with partial-volume occupancy."""
        a, g = self.anat, self.grid
        P, inside = self._anatomy_liver_grid()
        self.anat_P, self.anat_inside = P, inside
        st = self._ANAT_STEP
        depth = ndimage.distance_transform_edt(inside) * st
        self.anat_depth = depth
        rng = np.random.default_rng(self.anat.calc_seed + 17)  # vessel trees: anatomy, grid independent
        H, A_R, A_L, B, yf, ym = a.H, a.A_R, a.A_L, a.B, a.y_front, a.y_mid

        def depth_at(p):
            iz = int(round((p[2] - P.z[0]) / st))
            iy = int(round((p[1] - P.y[0]) / st))
            ix = int(round((p[0] - P.x[0]) / st))
            if 0 <= iz < depth.shape[0] and 0 <= iy < depth.shape[1] and 0 <= ix < depth.shape[2]:
                return float(depth[iz, iy, ix])
            return 0.0

        segments = []

        def grow(p0, target, r0, length, levels, kind, free=False):
            d0 = np.asarray(target, float) - p0
            d0 /= np.linalg.norm(d0) + 1e-9
            stack = [(np.asarray(p0, float), d0, r0, length, levels, free)]
            while stack:
                p, d, r, L, lev, fr = stack.pop()
                ok = False
                for attempt in range(8):
                    jit = 0.15 + 0.12 * attempt
                    dd = d + rng.normal(0, jit, 3)
                    dd /= np.linalg.norm(dd)
                    Lt = L * (0.85 ** (attempt // 2))
                    q = p + dd * Lt
                    mid = p + dd * Lt / 2
                    if fr or (depth_at(q) > r + 1.5 and depth_at(mid) > r + 0.5):
                        ok = True
                        break
                if not ok:
                    continue
                r1 = r * rng.uniform(0.92, 0.98)
                segments.append((p, q, r, r1, kind))
                if lev == 0 or r1 < 0.7:
                    continue
                n_child = 3 if rng.uniform() < 0.15 else 2
                axis = np.cross(dd, rng.normal(size=3))
                axis /= np.linalg.norm(axis) + 1e-9
                for ci in range(n_child):
                    ang = math.radians(rng.uniform(20, 50)) * (1 if ci % 2 == 0 else -1)
                    ax = axis if ci < 2 else np.cross(dd, axis)
                    # Rodrigues rotation of dd about ax
                    cd = dd * math.cos(ang) + np.cross(ax, dd) * math.sin(ang) + ax * (ax @ dd) * (1 - math.cos(ang))
                    rc = r1 * (rng.uniform(0.8, 0.92) if ci == 0 else rng.uniform(0.6, 0.8))
                    lc = max(L * rng.uniform(0.7, 0.9), 4 * rc)
                    stack.append((q, cd, rc, lc, lev - 1, False))

        pv = np.array(a.porta, float)
        grow(pv, (-0.6 * A_R, ym + 0.25 * B, -0.5 * H), a.r_pv * 0.75, rng.uniform(30, 42), 7, "portal", free=True)
        grow(pv, (-0.5 * A_R, yf + 0.4 * B, -0.3 * H), a.r_pv * 0.7, rng.uniform(30, 42), 7, "portal", free=True)
        grow(pv, (0.1 * A_L, yf + 0.35 * B, -0.35 * H), a.r_pv * 0.7, rng.uniform(35, 48), 7, "portal", free=True)
        z_hv = -rng.uniform(0.06, 0.12) * H
        ivc = np.array(a.ivc_path(z_hv - 30, z_hv + 30))
        ivc_p = ivc[np.argmin(np.abs(ivc[:, 2] - z_hv))]
        for target, r in (((-0.8 * A_R, ym + 0.15 * B, -0.35 * H), rng.uniform(4.5, 6.0)),
                          ((-0.3 * A_R, yf + 0.3 * B, -0.45 * H), rng.uniform(4.0, 5.5)),
                          ((0.15 * A_L, yf + 0.3 * B, -0.25 * H), rng.uniform(3.5, 5.0))):
            d = np.asarray(target) - ivc_p
            d /= np.linalg.norm(d)
            start = ivc_p + d * (a.r_ivc - 2)
            grow(start, target, r, rng.uniform(30, 45), 6, "hepatic", free=True)
        self.segments = segments
        if self.liver_sl is None:
            self.liver_mask = None
            return
        sl = self.liver_sl
        view = self.tissue[sl]
        self.liver_mask = view == _T.LIVER
        self.tumour_mask = np.zeros_like(self.liver_mask)
        P = g.points(sl)
        sp = np.array(g.spacing, np.float32)
        min_r = 0.25 * min(g.spacing)
        levels = {"portal": np.float32(self.levels[_T.VESSEL]), "hepatic": np.float32(self.levels["hepatic_veins"])}
        allowed = _allowed((_T.LIVER, _T.VESSEL, _T.FAT))
        for p, q, r0, r1, kind in segments:
            if max(r0, r1) < min_r:
                continue
            rmax = max(r0, r1) + 2 * float(sp.max())
            bs = g.box(np.minimum(p, q) - rmax, np.maximum(p, q) + rmax)
            if bs is None:
                continue
            Q = g.points(bs)
            ab = (q - p).astype(np.float32)
            l2 = float(ab @ ab) or 1e-6
            dx, dy, dz = Q.X - np.float32(p[0]), Q.Y - np.float32(p[1]), Q.Z - np.float32(p[2])
            t = np.clip((dx * ab[0] + dy * ab[1] + dz * ab[2]) / l2, 0, 1)
            ex, ey, ez = dx - t * ab[0], dy - t * ab[1], dz - t * ab[2]
            n = np.sqrt(ex * ex + ey * ey + ez * ez) + 1e-6
            dist = n - (r0 + (r1 - r0) * t)
            w = np.sqrt((ex / n * sp[0]) ** 2 + (ey / n * sp[1]) ** 2 + (ez / n * sp[2]) ** 2)
            tv = self.tissue[bs]
            o = np.clip(0.5 - dist / np.maximum(w, 1e-3), 0, 1) * allowed[tv]
            hv = self.hu[bs]
            hv += o * (levels[kind] - hv)
            tv[o > 0.5] = _T.VESSEL

    def _tumours(self) -> list[dict]:
        a, g = self.anat, self.grid
        rng = self.rng_tum
        count = int(rng.choice(len(_COUNT_P), p=_COUNT_P))
        dominant = str(rng.choice(TUMOUR_TYPES, p=_TYPE_P))
        if self.liver_sl is None or getattr(self, "liver_mask", None) is None:
            return []
        P, inside, depth = self.anat_P, self.anat_inside, self.anat_depth
        # which anatomy-grid points the scan sees (z range, field of view, circular mask)
        fov_ok = self._fov_mask(P)
        cand_all = np.argwhere(inside & fov_ok & (depth >= 3.0))
        if cand_all.size == 0:
            return []
        pts_all = np.stack([P.x[cand_all[:, 2]], P.y[cand_all[:, 1]], P.z[cand_all[:, 0]]], 1).astype(float)
        dep_all = depth[cand_all[:, 0], cand_all[:, 1], cand_all[:, 2]]
        segs = [s for s in self.segments if s[2] >= 1.5]
        specs: list[_TumourSpec] = []
        for i in range(count):
            kind = dominant if rng.uniform() < 0.65 else str(rng.choice(TUMOUR_TYPES, p=_TYPE_P))
            d = float(np.exp(rng.uniform(np.log(MIN_DIAMETER_MM), np.log(MAX_DIAMETER_MM))))
            if kind == "necrotic" and d < 20:
                d = float(rng.uniform(20, 60))
            if kind == "rim_enhancing" and d < 8:
                d = float(rng.uniform(8, 30))
            mode = str(rng.choice(["interior", "capsule", "vessel"], p=[0.5, 0.25, 0.25]))
            shape = "round" if kind == "cystic" else str(rng.choice(TUMOUR_SHAPES, p=_SHAPE_P))
            margin = "sharp" if kind == "cystic" or rng.uniform() < 0.6 else "blurred"
            draws = rng.uniform(size=8)
            spec = None
            for attempt in range(8):
                R = d / 2
                if mode == "capsule":
                    ok = (dep_all >= max(0.55 * R, 4.0)) & (dep_all <= max(0.95 * R, 5.0))
                elif mode == "vessel":
                    ok = dep_all >= max(0.9 * R + 1.0, 4.0)
                else:
                    ok = dep_all >= R + 1.5
                idx = np.where(ok)[0]
                if idx.size and specs:
                    cen = np.array([s.centre for s in specs])
                    rad = np.array([s.radius for s in specs])
                    dd = np.linalg.norm(pts_all[idx, None, :] - cen[None], axis=2)
                    idx = idx[(dd >= 0.9 * (R + rad[None])).all(axis=1)]
                if idx.size and mode == "vessel" and segs:
                    sub = idx if idx.size <= 3000 else idx[np.linspace(0, idx.size - 1, 3000).astype(int)]
                    dv = self._vessel_distance(pts_all[sub], segs)
                    near = sub[(dv >= R - 0.5) & (dv <= R + 1.0)]
                    idx = near if near.size else idx
                if idx.size:
                    j = idx[int(draws[attempt] * idx.size) % idx.size]
                    centre = pts_all[j] + rng.uniform(-0.5, 0.5, 3) * self._ANAT_STEP
                    spec = self._tumour_spec(rng, kind, shape, margin, R, centre, float(dep_all[j]), segs)
                    break
                d = max(MIN_DIAMETER_MM, d * 0.78)
            if spec is not None:
                specs.append(spec)
        out = []
        for i, s in enumerate(specs):
            out.append(self._render_tumour(i + 1, s))
        return out

    def _fov_mask(self, P: _Pts) -> np.ndarray:
        g = self.grid
        z_ok = (P.z >= g.pz[0] + 1) & (P.z <= g.pz[-1] - 1)
        half = (g.shape[2] - 1) / 2 * g.spacing[0]
        lx = P.x + g.offset[0]
        ly = P.y + g.offset[1]
        xy = (np.abs(lx)[None, :] < half - 2) & (np.abs(ly)[:, None] < half - 2)
        if self.circular:
            xy &= (lx[None, :] ** 2 + ly[:, None] ** 2) < (half - 2) ** 2
        return z_ok[:, None, None] & xy[None]

    def _outside_circle(self) -> np.ndarray:
        g = self.grid
        half = g.shape[2] / 2 * g.spacing[0]
        lx = g.px + g.offset[0]
        ly = g.py + g.offset[1]
        return (lx[None, :] ** 2 + ly[:, None] ** 2) > half ** 2

    @staticmethod
    def _vessel_distance(pts: np.ndarray, segs) -> np.ndarray:
        A = np.array([s[0] for s in segs])
        Bq = np.array([s[1] for s in segs])
        r = np.array([0.5 * (s[2] + s[3]) for s in segs])
        ab = Bq - A
        l2 = np.maximum((ab * ab).sum(1), 1e-6)
        d = pts[:, None, :] - A[None]
        t = np.clip((d * ab[None]).sum(2) / l2[None], 0, 1)
        e = d - t[..., None] * ab[None]
        return (np.sqrt((e * e).sum(2)) - r[None]).min(axis=1)

    def _tumour_spec(self, rng, kind, shape, margin, R, centre, depth, segs) -> _TumourSpec:
        levels = _tumour_levels(rng, kind, self.phase, float(self.levels[_T.LIVER]), self.contrast)
        e = rng.uniform(0.8, 1.2, 3)
        e = e / np.prod(e) ** (1 / 3)
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        lobes = []
        if shape == "lobulated":
            for _ in range(int(rng.integers(2, 5))):
                v = rng.normal(size=3)
                v /= np.linalg.norm(v)
                lobes.append((v * rng.uniform(0.45, 0.7) * R, rng.uniform(0.35, 0.6) * R))
        calcs = []
        if kind == "calcified" and R >= 6:
            for _ in range(int(rng.integers(1, 5))):
                v = rng.normal(size=3)
                v /= np.linalg.norm(v)
                calcs.append((v * rng.uniform(0, 0.6) * R, rng.uniform(0.7, 2.5)))
        blur = float(rng.uniform(1.0, 3.0)) if margin == "blurred" else 0.0
        touches = []
        if depth - R <= 1.5:
            touches.append("capsule")
        if segs:
            dv = float(self._vessel_distance(np.asarray(centre, float)[None], segs)[0])
            if dv - R <= 1.5:
                touches.append("vessel")
        return _TumourSpec(kind, shape, margin, float(R), np.asarray(centre, float), touches, levels, blur,
                           tuple(e), q.astype(np.float32), lobes, int(rng.integers(1 << 30)), calcs)

    def _render_tumour(self, tid: int, s: _TumourSpec) -> dict:
        g = self.grid
        c = s.centre.copy()
        # small lesions: keep the centre near a voxel centre along coarse axes so that they appear on a slice
        idx = g.to_index(c)
        for ax_xyz, ax_zyx in ((0, 2), (1, 1), (2, 0)):
            sp = g.spacing[ax_xyz]
            if 2 * s.radius < 2 * sp:
                snapped = round(idx[ax_zyx]) + (c[ax_xyz] * 0)  # nearest voxel centre
                jitter = ((s.field_seed >> (3 * ax_xyz)) % 7 - 3) / 12.0  # within +/- 0.25 voxel
                c[ax_xyz] += (snapped + jitter - idx[ax_zyx]) * sp
        R = s.radius
        ext = R * (1.3 if s.shape == "round" else 1.75) + s.blur_mm + 2 * max(g.spacing)
        sl = g.box(c - ext, c + ext)
        lps = g.to_lps(c)
        vox = [int(round(v)) for v in g.to_index(c)]
        entry = dict(id=tid, type=s.kind, shape=s.shape, margin=s.margin, diameter_mm=round(2 * R, 2),
                     centre_mm=[round(float(v), 3) for v in lps], centre_voxel=vox, touches=list(s.touches),
                     _own=None)
        if sl is None or self.liver_sl is None:
            return entry
        # restrict to the liver box
        ls = self.liver_sl
        sl = tuple(slice(max(b.start, l.start), min(b.stop, l.stop)) for b, l in zip(sl, ls))
        if any(b.stop <= b.start for b in sl):
            return entry
        P = g.points(sl)
        frng = np.random.default_rng(s.field_seed)
        lo = s.centre - (R * 1.75 + s.blur_mm + 6.0)  # field boxes independent of the image grid
        hi = s.centre + (R * 1.75 + s.blur_mm + 6.0)
        dx, dy, dz = _local(P.X, P.Y, P.Z, c, s.rot)
        if s.shape == "irregular":
            fld = _Field(frng, lo, hi, max(0.8 * R, 3.0))
            fine = _Field(frng, lo, hi, max(0.3 * R, 1.5))
            rad = R * (1 + 0.22 * fld(P) + 0.06 * fine(P))
            f = np.sqrt(dx * dx + dy * dy + dz * dz) - rad
        else:
            e = s.ellipse
            f = _ellipsoid(dx, dy, dz, R * e[0], R * e[1], R * e[2])
            if s.shape == "lobulated":
                f = f + 0.25 * R  # main body 0.75 R
                for off, rl in s.lobes:
                    fl = np.sqrt((dx - off[0]) ** 2 + (dy - off[1]) ** 2 + (dz - off[2]) ** 2) - rl
                    f = _smin(f, fl, 0.2 * R)
        f = np.broadcast_to(f, P.shape).astype(np.float32)
        # partial-volume width: the voxel extent along the (radial) surface normal
        rr = np.sqrt((P.X - c[0]) ** 2 + (P.Y - c[1]) ** 2 + (P.Z - c[2]) ** 2) + 1e-3
        sx_, sy_, sz_ = (np.float32(v) for v in g.spacing)
        wv = np.sqrt(((P.X - c[0]) * sx_) ** 2 + ((P.Y - c[1]) * sy_) ** 2 + ((P.Z - c[2]) * sz_) ** 2) / rr
        o = np.clip(0.5 - f / (wv + s.blur_mm + 1e-3), 0, 1)
        if s.blur_mm > 0:
            o = o * o * (3 - 2 * o)
        # HU inside the tumour
        lv = s.levels
        tex = _Field(frng, lo, hi, float(frng.uniform(2.5, 6.0)))(P) * np.float32(lv["texture"])
        v = np.float32(lv["base"]) + tex
        if s.kind == "rim_enhancing":
            inner = np.clip((-f - lv["rim_mm"]) / 1.5 + 0.5, 0, 1)
            v = v * inner + (np.float32(lv["rim"]) + 0.5 * tex) * (1 - inner)
        elif s.kind == "necrotic":
            nf = _Field(frng, lo, hi, max(0.5 * R, 3.0))(P)
            rn = R * lv["core_frac"] * (1 + 0.3 * nf)
            core = np.clip((rn - np.sqrt(dx * dx + dy * dy + dz * dz)) / 2.0 + 0.5, 0, 1)
            v = v * (1 - core) + (np.float32(lv["core"]) + 0.3 * tex) * core
        elif s.kind == "calcified":
            if R < 6:
                v = np.float32(lv["dense"]) + tex
            for off, rc in s.calcs:
                dcal = np.sqrt((dx - off[0]) ** 2 + (dy - off[1]) ** 2 + (dz - off[2]) ** 2) - rc
                ocal = np.clip(0.5 - dcal / (wv + 1e-3), 0, 1)
                v = v * (1 - ocal) + np.float32(lv["calc"]) * ocal
        local = tuple(slice(b.start - l.start, b.stop - l.start) for b, l in zip(sl, ls))
        in_liver = self.liver_mask[local] | self.tumour_mask[local]
        o = o * in_liver
        hv = self.hu[sl]
        hv += o * (v - hv)
        own = o > 0.5
        self.tissue[sl][own] = _T.TUMOUR
        self.tumour_mask[local] |= own
        entry["_own"] = (sl, own)
        return entry

    # ------------------------------------------------------------------------------ image formation

    def _image_formation(self):
        g, hu = self.grid, self.hu
        nz, ny, nx = g.shape
        a = np.float32(self.kernel_a)
        b = np.float32(1 - 2 * self.kernel_a)
        t = np.empty((ny, nx), np.float32)
        for k in range(nz):
            s = hu[k]
            np.multiply(s, b, out=t)
            t[:, 1:] += a * s[:, :-1]
            t[:, :-1] += a * s[:, 1:]
            t[:, 0] += a * s[:, 0]
            t[:, -1] += a * s[:, -1]
            np.multiply(t, b, out=s)
            s[1:] += a * t[:-1]
            s[:-1] += a * t[1:]
            s[0] += a * t[0]
            s[-1] += a * t[-1]
        az = np.float32(self.kernel_az)
        if nz > 2 and az > 0:
            prev = hu[0].copy()
            cur = np.empty_like(prev)
            for k in range(1, nz - 1):
                cur[...] = hu[k]
                hu[k] *= 1 - 2 * az
                hu[k] += az * (prev + hu[k + 1])
                prev, cur = cur, prev
        # scanner noise: CT-like noise power spectrum, stronger in the body centre
        rng = self.rng_noise
        bank = self._noise_bank(rng, ny, nx)
        X, Y = g.px[None, :], g.py[:, None]
        a_ = self.anat
        smap = np.float32(self.noise_sigma) * (0.75 + 0.35 * np.exp(-1.5 * ((X / a_.a0) ** 2 + (Y / a_.b_ant) ** 2)))
        smap = smap.astype(np.float32)
        pad = bank.shape[1] - ny
        nb = bank.shape[0]
        choice = rng.integers(0, nb, nz)
        offs = rng.integers(0, pad + 1, (nz, 2))
        flips = rng.integers(0, 4, nz)
        zscale = (1 + 0.06 * rng.standard_normal(nz)).astype(np.float32)
        for k in range(nz):
            n = bank[choice[k], offs[k, 0]:offs[k, 0] + ny, offs[k, 1]:offs[k, 1] + nx]
            if flips[k] & 1:
                n = n[::-1]
            if flips[k] & 2:
                n = n[:, ::-1]
            np.multiply(n, smap, out=t)
            t *= zscale[k]
            hu[k] += t

    def _noise_bank(self, rng, ny, nx, count: int = 12, pad: int = 32) -> np.ndarray:
        h, w = ny + pad, nx + pad
        s = self.grid.spacing[0]
        fy = np.fft.fftfreq(h)[:, None]
        fx = np.fft.rfftfreq(w)[None, :]
        f = np.sqrt(fy * fy + fx * fx) / s  # cycles / mm
        fc = self.nps_fc
        nps = f * np.exp(-((f / fc) ** 2)) + 0.04 * fc
        amp = np.sqrt(nps).astype(np.float32)
        bank = np.empty((count, h, w), np.float32)
        for i in range(count):
            white = rng.standard_normal((h, w), dtype=np.float32)
            n = np.fft.irfft2(np.fft.rfft2(white) * amp, s=(h, w)).astype(np.float32)
            n /= n.std() + 1e-6
            bank[i] = n
        return bank


# ============================================================================================ public API


def generate_phantom(seed: int, size: str = "small") -> Phantom:
    """Generate one synthetic CT case (deterministic in ``seed``).

    ``size="full"``: 512x512 pixels of 0.6-0.9 mm and 1-5 mm slices (40-320 slices).
    ``size="small"``: the same patient on a 128x128 grid (2.4-3.6 mm pixels, 3-5 mm slices), for tests.
    """
    return _Case(seed, size).render()


def tissue_hu_table(phantoms: Sequence[Phantom]) -> list[dict]:
    """Per-tissue HU statistics over ``phantoms``: rows {"id", "tissue", "mean_hu", "std_hu", "voxels"}."""
    n = np.zeros(256, np.float64)
    s1 = np.zeros(256, np.float64)
    s2 = np.zeros(256, np.float64)
    for p in phantoms:
        t = p.tissues.ravel()
        v = p.image.array.ravel().astype(np.float64)
        n += np.bincount(t, minlength=256)
        s1 += np.bincount(t, weights=v, minlength=256)
        s2 += np.bincount(t, weights=v * v, minlength=256)
    rows = []
    for tid, name in TISSUES.items():
        if n[tid] == 0:
            continue
        mean = s1[tid] / n[tid]
        var = max(s2[tid] / n[tid] - mean * mean, 0.0)
        rows.append(dict(id=tid, tissue=name, mean_hu=round(float(mean), 2), std_hu=round(float(math.sqrt(var)), 2),
                         voxels=int(n[tid])))
    return rows


def _sidecar(ph: Phantom, index: int) -> dict:
    return dict(case=index, tumours=ph.tumours, meta=ph.meta,
                labels={"0": "background", "1": "liver", "2": "tumour"}, tissues={str(k): v for k, v in TISSUES.items()})


def write_phantom_dataset(out_dir, count: int, size: str = "small", seed: int = 0, overwrite: bool = False) -> list[Path]:
    """Write ``count`` phantoms in LiTS layout: ``volume-N.nii.gz``, ``segmentation-N.nii.gz`` and a
    ``volume-N.json`` sidecar (tumours and acquisition metadata) for N = 0..count-1.

    Case N uses :func:`case_seed` (seed, N). Each case is written completely or not at all (temporary files
    renamed into place). Existing files are refused with :class:`OutputError` unless ``overwrite``; the check
    covers all cases before anything is written. Returns the paths of the volumes, in order.
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    if size not in SIZES:
        raise ValueError(f"unknown phantom size {size!r}; use one of {sorted(SIZES)}")
    out = Path(out_dir)
    names = [(f"volume-{i}.nii.gz", f"segmentation-{i}.nii.gz", f"volume-{i}.json") for i in range(count)]
    if not overwrite:
        existing = [str(out / n) for trio in names for n in trio if (out / n).exists()]
        if existing:
            more = f" (and {len(existing) - 3} more)" if len(existing) > 3 else ""
            raise OutputError(
                f"The phantom dataset would overwrite existing files: {', '.join(existing[:3])}{more}. "
                "Choose an empty output folder, or pass overwrite=True (--overwrite) to replace them.")
    if out.exists() and not out.is_dir():
        raise OutputError(f"'{out}' exists and is not a folder. Choose a folder for the phantom dataset.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"Cannot create '{out}' ({error.strerror}). Choose a writable output location.") from None
    written = []
    for i, (vol, seg, side) in enumerate(names):
        ph = generate_phantom(case_seed(seed, i), size)
        ph.meta["dataset_seed"] = int(seed)
        ph.meta["case"] = i
        tmp = Path(tempfile.mkdtemp(prefix=f".volume-{i}.", suffix=".partial", dir=out))
        try:
            write_image(ph.image, tmp / vol)
            write_image(ph.image.with_array(ph.label), tmp / seg)
            (tmp / side).write_text(json.dumps(_sidecar(ph, i), indent=1))
            for n in (vol, seg, side):
                os.replace(tmp / n, out / n)
        except OSError as error:
            raise OutputError(f"Writing phantom case {i} to '{out}' failed ({error.strerror}).") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        written.append(out / vol)
    return written
