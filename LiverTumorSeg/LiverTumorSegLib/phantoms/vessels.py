"""Vessel trees inside an organ (the liver's portal and hepatic veins): grown segment by segment inside a
depth map of the organ, then painted onto the image grid with partial-volume occupancy."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .fields import Points, tube_distance
from .grid import Grid, allowed_lut
from .tissues import Tissue

#: Spacing (mm) of the isotropic grid on which organ depth maps and vessel trees are computed.
ANATOMY_STEP_MM = 3.0


class VesselTreeGrower:
    """Grows branching vessel trees inside an organ given by its depth map ``depth`` (mm, on the points
    ``P`` of an isotropic grid of ``step`` mm). Segments (start, end, radius at start, radius at end, kind)
    collect in :attr:`segments`."""

    def __init__(self, P: Points, depth: np.ndarray, step: float, rng: np.random.Generator):
        self.P, self.depth, self.step, self.rng = P, depth, step, rng
        self.segments: list[tuple] = []

    def depth_at(self, p) -> float:
        """Depth (mm) inside the organ at point ``p`` (x, y, z); 0 outside the grid."""
        P, depth, st = self.P, self.depth, self.step
        iz = int(round((p[2] - P.z[0]) / st))
        iy = int(round((p[1] - P.y[0]) / st))
        ix = int(round((p[0] - P.x[0]) / st))
        if 0 <= iz < depth.shape[0] and 0 <= iy < depth.shape[1] and 0 <= ix < depth.shape[2]:
            return float(depth[iz, iy, ix])
        return 0.0

    def grow(self, p0, target, r0: float, length: float, levels: int, kind: str, free: bool = False) -> None:
        """Grow one tree from ``p0`` towards ``target``: segments of radius ``r0`` and ``length`` mm that
        branch ``levels`` times (two or three children, 20-50 degrees, thinner and shorter) and stay at least
        their radius deep inside the organ (``free``: the first segment may leave it, e.g. from the hilum)."""
        rng, segments, depth_at = self.rng, self.segments, self.depth_at
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


def paint_vessel_segments(grid: Grid, hu: np.ndarray, tissue: np.ndarray, segments, levels: dict) -> None:
    """Paint ``segments`` (from :class:`VesselTreeGrower`) into ``hu`` with partial-volume occupancy, at the
    HU ``levels[kind]``, over liver, vessel and fat voxels; voxels more than half inside become
    :attr:`Tissue.VESSEL` in ``tissue``."""
    g = grid
    sp = np.array(g.spacing, np.float32)
    min_r = 0.25 * min(g.spacing)
    allowed = allowed_lut((Tissue.LIVER, Tissue.VESSEL, Tissue.FAT))
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
        tv = tissue[bs]
        o = np.clip(0.5 - dist / np.maximum(w, 1e-3), 0, 1) * allowed[tv]
        hv = hu[bs]
        hv += o * (levels[kind] - hv)
        tv[o > 0.5] = Tissue.VESSEL


class LiverVessels:
    """The liver's portal and hepatic venous trees in a procedural case (mixed into :class:`.case.Case`)."""

    def _anatomy_liver_grid(self, step: float = ANATOMY_STEP_MM):
        """Liver (with the organs that carve it) on an isotropic grid independent of the image grid."""
        a = self.anat
        lo, hi = a.liver_box
        P = Points(np.arange(lo[2], hi[2], step), np.arange(lo[1], hi[1], step), np.arange(lo[0], hi[0], step))
        inside = a.liver(P) < 0
        if a.gb is not None:
            inside &= a.gallbladder(P) > 1.0
        for k in a.kidneys:
            inside &= a.kidney(P, k)[0] > 1.0
        ivc = a.ivc_path(float(lo[2]) - 50, float(hi[2]) + 50)
        inside &= tube_distance(P, ivc, [a.r_ivc + 1] * len(ivc)) > 0
        return P, inside

    def _liver_vessels(self):
        """Portal and hepatic venous trees inside the liver, painted with partial-volume occupancy."""
        a = self.anat
        P, inside = self._anatomy_liver_grid()
        self.anat_P, self.anat_inside = P, inside
        st = ANATOMY_STEP_MM
        depth = ndimage.distance_transform_edt(inside) * st
        self.anat_depth = depth
        rng = np.random.default_rng(self.anat.calc_seed + 17)  # vessel trees: anatomy, grid independent
        H, A_R, A_L, B, yf, ym = a.H, a.A_R, a.A_L, a.B, a.y_front, a.y_mid
        trees = VesselTreeGrower(P, depth, st, rng)
        grow = trees.grow
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
        self.segments = segments = trees.segments
        if self.liver_sl is None:
            self.liver_mask = None
            return
        sl = self.liver_sl
        view = self.tissue[sl]
        self.liver_mask = view == Tissue.LIVER
        self.tumour_mask = np.zeros_like(self.liver_mask)
        levels = {"portal": np.float32(self.levels[Tissue.VESSEL]), "hepatic": np.float32(self.levels["hepatic_veins"])}
        paint_vessel_segments(self.grid, self.hu, self.tissue, segments, levels)
