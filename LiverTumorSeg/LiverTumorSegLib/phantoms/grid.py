"""The image grid of a phantom and how shapes reach it: a shape is evaluated on a coarse grid inside its
bounding box and interpolated (linearly, or by nearest neighbour for class codes) onto the image voxels,
which keeps a full-size case within seconds; :func:`paint` writes a tissue class into a box."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from .fields import Points


def lerp_index(src: np.ndarray, dst: np.ndarray):
    pos = np.interp(dst, src, np.arange(src.size, dtype=np.float64))
    i0 = np.clip(np.floor(pos).astype(np.intp), 0, max(src.size - 2, 0))
    t = (pos - i0).astype(np.float32)
    return i0, t


def upsample(a: np.ndarray, src: Sequence[np.ndarray], dst: Sequence[np.ndarray]) -> np.ndarray:
    """Linear interpolation of ``a`` sampled on axes ``src`` (z, y, x) onto axes ``dst``.

    x is interpolated first on the coarse rows; then, one output slice at a time, z and y (whole-row
    copies), so that no large temporary arrays are made.
    """
    same = [s.size == d.size and (s.size == 0 or np.allclose(s, d)) for s, d in zip(src, dst)]
    if all(same):
        return np.require(a, np.float32, ["C", "W"])
    if not same[2]:
        ix, tx = lerp_index(src[2], dst[2])
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
        iz, tz = lerp_index(src[0], dst[0])
    if same[1]:
        iy = ty = None
    else:
        iy, ty = lerp_index(src[1], dst[1])
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

    parallel_slices(rows, nz, ny * nx)
    return out

_POOL = None


def parallel_slices(fn, n: int, slice_size: int) -> None:
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


def upsample_nearest(a: np.ndarray, src: Sequence[np.ndarray], dst: Sequence[np.ndarray]) -> np.ndarray:
    """Nearest-neighbour resampling of a categorical array (uint8) from axes ``src`` to ``dst``."""
    for axis in (2, 0, 1):
        if src[axis].size == dst[axis].size and np.allclose(src[axis], dst[axis]):
            continue
        pos = np.interp(dst[axis], src[axis], np.arange(src[axis].size, dtype=np.float64))
        a = np.take(a, np.rint(pos).astype(np.intp), axis=axis)
    return np.ascontiguousarray(a)

_ALLOWED_CACHE: dict[frozenset, np.ndarray] = {}


def allowed_lut(ids: Iterable[int]) -> np.ndarray:
    key = frozenset(ids)
    lut = _ALLOWED_CACHE.get(key)
    if lut is None:
        lut = np.zeros(256, bool)
        lut[list(key)] = True
        _ALLOWED_CACHE[key] = lut
    return lut

# ================================================================================================ grid


@dataclass
class Grid:
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

    def points(self, sl) -> Points:
        return Points(self.pz[sl[0]], self.py[sl[1]], self.px[sl[2]])

    def to_lps(self, p) -> np.ndarray:
        return np.asarray(p, float) + np.asarray(self.offset, float)

    def to_index(self, p) -> np.ndarray:
        """Patient-frame point (x, y, z) -> continuous (z, y, x) index."""
        lps = self.to_lps(p)
        ijk = (lps - np.asarray(self.origin)) / np.asarray(self.spacing)
        return ijk[::-1]


def coarse_axis(fine: np.ndarray, step: float) -> np.ndarray:
    if fine.size <= 2:
        return fine
    spacing = float(fine[1] - fine[0])
    if spacing >= 0.75 * step:
        return fine
    n = int(math.ceil((float(fine[-1]) - float(fine[0])) / step)) + 1
    return np.linspace(float(fine[0]), float(fine[-1]), max(n, 2)).astype(np.float32)


def sample_box(grid: Grid, sl, fn: Callable[[Points], object], step_xy: float, step_z: float, categorical=()):
    """Evaluate ``fn`` on a coarse grid covering the box ``sl`` and interpolate it to the image grid.

    ``fn`` may return one array or a tuple of arrays; the result has the same structure. Outputs whose
    positions are listed in ``categorical`` are class codes (uint8), resampled by nearest neighbour.
    """
    fine = grid.points(sl)
    cz, cy, cx = coarse_axis(fine.z, step_z), coarse_axis(fine.y, step_xy), coarse_axis(fine.x, step_xy)
    coarse = Points(cz, cy, cx)
    values = fn(coarse)
    single = not isinstance(values, tuple)
    out = []
    for i, v in enumerate((values,) if single else values):
        if i in categorical:
            v = np.broadcast_to(np.asarray(v, np.uint8), coarse.shape)
            out.append(upsample_nearest(v, (cz, cy, cx), (fine.z, fine.y, fine.x)))
            continue
        v = np.asarray(v, np.float32)
        if v.shape != coarse.shape:
            v = np.broadcast_to(v, coarse.shape).copy()
        out.append(upsample(v, (cz, cy, cx), (fine.z, fine.y, fine.x)))
    return out[0] if single else tuple(out)


def for_each_slice(grid: Grid, sl, fn: Callable[[Points], tuple], step_xy: float, step_z: float, consumer) -> None:
    """Like :func:`sample_box`, but hands the interpolated fields to ``consumer(k, planes)`` one image slice
    at a time (``k`` relative to ``sl``) instead of building full 3D arrays: cheaper for whole-volume fields.
    ``consumer`` must only touch slice ``k`` (slices are processed on two threads)."""
    fine = grid.points(sl)
    cz, cy, cx = coarse_axis(fine.z, step_z), coarse_axis(fine.y, step_xy), coarse_axis(fine.x, step_xy)
    coarse = Points(cz, cy, cx)
    fields = []
    for v in fn(coarse):
        v = np.broadcast_to(np.asarray(v, np.float32), coarse.shape)
        if not (cx.size == fine.x.size and np.allclose(cx, fine.x)):
            ix, tx = lerp_index(cx, fine.x)
            lo = np.take(v, ix, axis=2)
            lo += tx * (np.take(v, ix + 1, axis=2) - lo)
            v = lo
        fields.append(np.ascontiguousarray(v))
    nz, ny, nx = fine.shape
    same_z = cz.size == fine.z.size and np.allclose(cz, fine.z)
    iz, tz = (np.arange(nz), np.zeros(nz, np.float32)) if same_z else lerp_index(cz, fine.z)
    same_y = cy.size == fine.y.size and np.allclose(cy, fine.y)
    iy, ty = (None, None) if same_y else lerp_index(cy, fine.y)

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

    parallel_slices(rows, nz, ny * nx)


def paint(tissue: np.ndarray, sl, mask: np.ndarray, tid: int, over: Iterable[int] | None = None) -> None:
    view = tissue[sl] if sl is not None else tissue
    if over is not None:
        mask = mask & allowed_lut(over)[view]
    np.copyto(view, np.uint8(tid), where=mask)
