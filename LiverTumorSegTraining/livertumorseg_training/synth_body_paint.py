"""Painting the unlabelled body of a label-bank phantom onto its output grid (tissue classes of
:class:`LiverTumorSegLib.phantoms.Tissue`), from the coarse :class:`.synth_body.BodyModel`:

skin, subcutaneous fat, muscle wall and visceral fat from the outline fields; the diaphragm, and above it
the lungs (where the map has none), the heart with its pericardial fat and the mediastinal fat; a spine
(vertebral bodies with marrow and discs, canal, neural arch, spinous and transverse processes), psoas and
ribs where the map labels no bone; an optional patient table; and small-bowel loops with fluid, gas or oral
contrast and mesenteric vessels in the cavity where the map labels no bowel, plus pulmonary vessels. The
labelled organs are painted over all of this afterwards (:mod:`.synth_ct`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from LiverTumorSegLib.phantoms import Tissue
from LiverTumorSegLib.phantoms.fields import Points, RandomField, local_coordinates, rotation_matrix, wrap_angle
from LiverTumorSegLib.phantoms.grid import Grid, for_each_slice, upsample

from .synth_body import BodyModel

#: Tissue class of the fluid in bowel loops (beyond the procedural classes; see :data:`.synth_ct.SYNTH_TISSUES`).
BOWEL_FLUID = 40


@dataclass
class TrunkDetails:
    """Drawn details of the unlabelled trunk: heart, spine rhythm, ribs, table, bowel."""

    heart: dict
    spine: dict
    ribs: dict
    table: dict | None
    bowel: dict

    @classmethod
    def draw(cls, rng: np.random.Generator, oral: bool) -> "TrunkDetails":
        u = rng.uniform
        heart = dict(dx=u(10, 40), front=u(0.05, 0.3), r=(u(55, 70), u(42, 55), u(45, 60)),
                     rot=rotation_matrix(0.0, 0.0, -np.radians(u(25, 45))), peri=u(2, 6), myo=u(7, 11))
        spine = dict(period=u(30, 38), disc=u(6, 10), phase=u(0, 40), canal=(u(8, 10), u(6.5, 8.0)),
                     spinous=u(28, 42), transverse=u(24, 36), psoas=u(12, 20))
        ribs = dict(pitch=u(24, 34), height=u(9, 12), slope=u(0.25, 0.55), phase=u(0, 34), front=u(2.3, 2.7))
        table = dict(gap=u(0.5, 3.0), thick=u(10, 22)) if u() < 0.6 else None
        bowel = dict(present=u() < 0.9, width=u(0.45, 0.65), gas=u(1.2, 1.8), oral=oral)
        return cls(heart, spine, ribs, table, bowel)


def paint_trunk(grid: Grid, tissue: np.ndarray, body: BodyModel, details: TrunkDetails, rng: np.random.Generator, *,
                lungs_labelled: bool, bone_labelled: bool, bowel_labelled: bool, rib_floor: float,
                psoas_top: float) -> None:
    """Paint the unlabelled body into ``tissue`` (AIR before); ``rib_floor``/``psoas_top`` (LPS z, mm):
    the lowest ribs and the top of the psoas muscles."""
    X, Y = np.meshgrid(grid.px, grid.py)
    axes_c = (body.y, body.x)
    dome = upsample(body.dome[None], (body.z[:1], *axes_c), (body.z[:1], grid.py, grid.px))[0]
    t_d, shape = body.shape.t_diaphragm, body.shape
    abdomen = np.zeros(tissue.shape, bool)  # visceral cavity below the diaphragm: where bowel loops may lie
    heart = _heart_centre(details.heart, body, dome, grid)
    for k, z in enumerate(grid.pz):
        f_out, f_fat, f_cav = (upsample(f[k:k + 1], (body.z[k:k + 1], *axes_c), (grid.pz[k:k + 1], grid.py, grid.px))[0]
                               for f in (body.f_out, body.f_fat, body.f_cav))
        t = tissue[k]
        t[f_out < 0] = Tissue.SKIN
        t[f_out < -shape.t_skin] = Tissue.FAT
        t[f_fat < 0] = Tissue.MUSCLE
        cavity = f_cav < 0
        t[cavity] = Tissue.FAT
        thorax = cavity & (z > dome)
        t[cavity & ~thorax & (z > dome - t_d)] = Tissue.MUSCLE
        abdomen[k] = cavity & (z <= dome - t_d)
        if not lungs_labelled:
            t[thorax] = Tissue.LUNG
        _paint_heart(t, thorax, X, Y, z, heart, details.heart)
        if body.spine is not None:
            xc, yc = body.spine[k]
            if not lungs_labelled:  # mediastinal fat around the aorta and oesophagus in front of the spine
                t[thorax & ((X - xc) ** 2 + (Y - yc + shape.vertebra[1] + 18) ** 2 < 22.0 ** 2)] = Tissue.FAT
            _paint_vertebra(t, X, Y, z, xc, yc, shape.vertebra, details.spine, f_out)
            if z < psoas_top:
                _paint_psoas(t, X, Y, xc, yc, shape.vertebra, details.spine["psoas"] * min((psoas_top - z) / 130, 1))
        if not bone_labelled and z > rib_floor:
            _paint_ribs(t, X, Y, z, f_fat, f_cav, body, details.ribs)
        if details.table is not None:
            top, thick, plate = body.table_y + details.table["gap"], details.table["thick"], max(2.0, 1.05 * grid.spacing[1])
            rows = (grid.py >= top) & (grid.py < top + thick)
            shell = rows & ((grid.py < top + plate) | (grid.py >= top + thick - plate))
            t[shell[:, None] & (np.abs(grid.px - body.centre[0]) < 230)[None, :] & (t == Tissue.AIR)] = Tissue.TABLE
    _paint_fields(grid, tissue, abdomen, details.bowel, rng, bowel_labelled)


def _heart_centre(h: dict, body: BodyModel, dome: np.ndarray, grid: Grid) -> tuple:
    """Heart centre (x, y, z): left of the midline, in the front half, its lower wall on the diaphragm."""
    hx = body.centre[0] + h["dx"]
    hy = body.centre[1] - h["front"] * body.half_axes[1]
    ix = int(np.clip(np.searchsorted(grid.px, hx), 0, grid.px.size - 1))
    iy = int(np.clip(np.searchsorted(grid.py, hy), 0, grid.py.size - 1))
    return hx, hy, float(dome[iy, ix]) + 0.75 * h["r"][2]


def _paint_heart(t, thorax, X, Y, z, centre, h) -> None:
    if not np.isfinite(centre[2]) or abs(z - centre[2]) > max(h["r"]) + h["peri"]:
        return
    dx, dy, dz = local_coordinates(X, Y, np.float32(z), centre, h["rot"])
    rx, ry, rz = h["r"]
    rho = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2 + (dz / rz) ** 2)
    d = (rho - 1.0) * min(rx, ry, rz)  # approximate distance to the heart's surface (mm)
    t[thorax & (d < h["peri"])] = Tissue.FAT
    t[thorax & (d < 0)] = Tissue.MYOCARDIUM
    t[thorax & (d < -h["myo"])] = Tissue.HEART


def _segment(X, Y, p, q, r) -> np.ndarray:
    """Pixels within ``r`` mm of the segment p-q."""
    ab = np.subtract(q, p)
    s = np.clip(((X - p[0]) * ab[0] + (Y - p[1]) * ab[1]) / max(float(ab @ ab), 1e-6), 0, 1)
    return (X - p[0] - s * ab[0]) ** 2 + (Y - p[1] - s * ab[1]) ** 2 < r * r


def _paint_vertebra(t, X, Y, z, xc, yc, radii, s, f_out) -> None:
    """One axial section of the spine: vertebral body (cortex, marrow) or disc, canal, neural arch, processes."""
    rx, ry = radii
    level = (z - s["phase"]) % s["period"]
    rho = np.sqrt(((X - xc) / rx) ** 2 + ((Y - yc) / ry) ** 2)
    d_body = (rho - 1.0) * min(rx, ry)
    rcx, rcy = s["canal"]
    yk = yc + ry + 3.0 + rcy
    canal = ((X - xc) / rcx) ** 2 + ((Y - yk) / rcy) ** 2 < 1
    if level < s["disc"]:
        t[d_body < 0] = Tissue.DISC
    else:
        t[d_body < 0] = Tissue.CORTICAL
        t[d_body < -1.3] = Tissue.MARROW
        rel = (level - s["disc"]) / (s["period"] - s["disc"])
        arch = (((X - xc) / (rcx + 5.5)) ** 2 + ((Y - yk) / (rcy + 5.0)) ** 2 < 1) & (Y > yc + ry)
        arch |= _segment(X, Y, (xc, yk + rcy), (xc, yk + rcy + s["spinous"]), 3.0)
        if 0.3 < rel < 0.8:
            for side in (-1, 1):
                arch |= _segment(X, Y, (xc + side * (rcx + 3), yk), (xc + side * (rcx + s["transverse"]), yk + 5), 3.5)
        t[arch & (f_out < -6) & ~canal & (d_body >= 0)] = Tissue.CORTICAL
    t[canal] = Tissue.CANAL


def _paint_psoas(t, X, Y, xc, yc, radii, r) -> None:
    if r < 3:
        return
    for side in (-1, 1):
        inside = (X - xc - side * (radii[0] + 0.8 * r)) ** 2 + (Y - yc - 0.2 * radii[1]) ** 2 < r * r
        t[inside & (t == Tissue.FAT)] = Tissue.MUSCLE


def _paint_ribs(t, X, Y, z, f_fat, f_cav, body: BodyModel, r: dict) -> None:
    """Rib sections in the muscle wall just outside the cavity: oblique bands that descend towards the front
    (bone behind and at the sides, costal cartilage in front)."""
    band = (f_cav > 1.5) & (f_cav < 10.5) & (f_fat < -1.0)
    if not band.any():
        return
    s = np.abs(wrap_angle(np.arctan2(Y - body.centre[1], X - body.centre[0]) - np.pi / 2))  # 0 back .. pi front
    arc = s * 0.5 * (body.half_axes[0] + body.half_axes[1])
    phase = ((z + r["slope"] * arc - r["phase"]) % r["pitch"]) / r["height"]
    rib = band & (phase < 1.0) & (s > 0.25) & (s < r["front"] + 0.4)
    cartilage = rib & (s > r["front"])
    t[rib] = Tissue.CORTICAL
    t[rib & ~cartilage & (phase > 0.25) & (phase < 0.75) & (f_cav > 3.0) & (f_cav < 9.0)] = Tissue.MARROW
    t[cartilage] = Tissue.CARTILAGE


def _paint_fields(grid: Grid, tissue, abdomen, bowel: dict, rng, bowel_labelled: bool) -> None:
    """Small-bowel loops (bands of a random field) with fluid, gas or oral contrast, mesenteric vessels in
    the visceral fat, and pulmonary vessels in the lungs, slice by slice."""
    lo = (float(grid.px[0]), float(grid.py[0]), float(grid.pz[0]))
    hi = (float(grid.px[-1]), float(grid.py[-1]), float(grid.pz[-1]))
    loops, content, oral = RandomField(rng, lo, hi, 38.0), RandomField(rng, lo, hi, 60.0), RandomField(rng, lo, hi, 45.0)
    mes = (RandomField(rng, lo, hi, 30.0), RandomField(rng, lo, hi, 30.0))
    pulm = (RandomField(rng, lo, hi, 16.0), RandomField(rng, lo, hi, 16.0))
    with_bowel = bowel["present"] and not bowel_labelled

    def fields(P: Points):
        return (loops(P), content(P), oral(P), np.maximum(np.abs(mes[0](P)), np.abs(mes[1](P))),
                np.maximum(np.abs(pulm[0](P)), np.abs(pulm[1](P))))

    def consumer(k, planes):
        band, gas, contrast, net, lung_net = planes
        t, free = tissue[k], abdomen[k] & (tissue[k] == Tissue.FAT)
        if with_bowel:
            wall = free & (np.abs(band) < bowel["width"])
            lumen = wall & (np.abs(band) < bowel["width"] - 0.14)
            t[wall] = Tissue.BOWEL
            t[lumen] = BOWEL_FLUID
            if bowel["oral"]:
                t[lumen & (contrast > 0.3)] = Tissue.ORAL
            t[lumen & (gas > bowel["gas"])] = Tissue.GAS
        t[free & (t == Tissue.FAT) & (net < 0.07)] = Tissue.MES_VESSEL
        t[(t == Tissue.LUNG) & (lung_net < 0.09)] = Tissue.PULM_VESSEL

    everything = tuple(slice(0, n) for n in grid.shape)
    for_each_slice(grid, everything, fields, 3.0, 3.0, consumer)
