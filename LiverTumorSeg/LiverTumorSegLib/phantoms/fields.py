"""Shape primitives of the phantoms in patient millimetres: point grids, smooth random fields and signed
distances (ellipsoids, tapered capsules, tubes along polylines, smooth unions), all vectorised with numpy."""

from __future__ import annotations

import math

import numpy as np


class Points:
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


class RandomField:
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

    def __call__(self, P: Points) -> np.ndarray:
        wx, wy, wz = self._weights(P.x, 0), self._weights(P.y, 1), self._weights(P.z, 2)
        a = self.noise @ wx.T  # (nzn, nyn, nx)
        a = np.matmul(wy, a)  # (nzn, ny, nx)
        nzn = a.shape[0]
        return (wz @ a.reshape(nzn, -1)).reshape(P.shape)


def wrap_angle(angle):
    return (angle + np.pi) % (2 * np.pi) - np.pi


def smooth_min(a, b, k: float):
    """Smooth minimum (union of two signed distances with a fillet of size ``k``)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def smooth_max(a, b, k: float):
    return -smooth_min(-a, -b, k)


def rotation_matrix(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """Rotation matrix (radians, applied x then y then z)."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return (mz @ my @ mx).astype(np.float32)


def local_coordinates(X, Y, Z, centre, rot=None):
    """Coordinates relative to ``centre`` (x, y, z), expressed in the frame of ``rot`` (columns = axes)."""
    dx, dy, dz = X - centre[0], Y - centre[1], Z - centre[2]
    if rot is None:
        return dx, dy, dz
    r = rot
    return (r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz,
            r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz,
            r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz)


def ellipsoid_distance(dx, dy, dz, rx, ry, rz):
    """Approximate signed distance (mm, negative inside) to an ellipsoid with (possibly varying) radii."""
    qx, qy, qz = dx / rx, dy / ry, dz / rz
    rho = np.sqrt(qx * qx + qy * qy + qz * qz)
    g = np.sqrt((qx / rx) ** 2 + (qy / ry) ** 2 + (qz / rz) ** 2)
    rmin = np.minimum(np.minimum(rx, ry), rz)
    rmax = np.maximum(np.maximum(rx, ry), rz)
    scale = np.clip(rho / np.maximum(g, 1e-6), rmin, rmax)
    return (rho - 1.0) * scale


def capsule_distance(X, Y, Z, a, b, ra: float, rb: float):
    """Signed distance to a tapered capsule from point ``a`` (radius ra) to ``b`` (radius rb)."""
    ab = np.asarray(b, np.float32) - np.asarray(a, np.float32)
    l2 = float(ab @ ab) or 1e-6
    dx, dy, dz = X - a[0], Y - a[1], Z - a[2]
    t = np.clip((dx * ab[0] + dy * ab[1] + dz * ab[2]) / l2, 0.0, 1.0)
    ex, ey, ez = dx - t * ab[0], dy - t * ab[1], dz - t * ab[2]
    return np.sqrt(ex * ex + ey * ey + ez * ez) - (ra + (rb - ra) * t)


def chain_distance(X, Y, Z, points, radii, k: float = 0.0):
    """Union of tapered capsules along a polyline (a tube), evaluated at every point."""
    out = None
    for i in range(len(points) - 1):
        d = capsule_distance(X, Y, Z, points[i], points[i + 1], radii[i], radii[i + 1])
        out = d if out is None else (np.minimum(out, d) if k <= 0 else smooth_min(out, d, k))
    return out

FAR = np.float32(1000.0)


def tube_distance(P: "Points", points, radii, k: float = 0.0, margin: float = 8.0) -> np.ndarray:
    """Union of tapered capsules on the grid ``P``, each evaluated only inside its own bounding box.

    Points farther than ``margin`` mm from every capsule get a large positive value.
    """
    out = np.full(P.shape, FAR, np.float32)
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
        d = capsule_distance(P.X[..., ix], P.Y[:, iy, :], P.Z[iz], a, b, radii[i], radii[i + 1])
        if k > 0:
            sub[...] = smooth_min(sub, d, k)
        else:
            np.minimum(sub, d, out=sub)
    return out


def catmull_rom(points, per_segment: int = 6) -> np.ndarray:
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
