"""The unlabelled body around real organs, for label-bank phantoms: outline, wall layers, diaphragm, spine.

A label map gives the organs; a CT also shows what nobody labelled: skin, subcutaneous fat, the muscle wall,
the spine, the diaphragm with the lungs and the heart above it. :func:`build_body` describes these per slice
on a coarse grid (2.5 mm in-plane) around the organs of one map:

* the **outline**: from the map's body label where it has one (3D-IRCADb), otherwise built procedurally
  around the organs: per slice the convex hull of the organs and the vertebral body, widened by a margin
  that is largest in front (bowel and fat that multi-organ maps do not label), is the abdominal cavity;
  muscle, subcutaneous fat and skin of drawn, angle-dependent thickness (thick paraspinal muscles behind)
  lie around it. Smoothed along z so that the outline changes slowly from slice to slice.
* the **spine** track where the map labels no bone: behind the aorta and IVC, or between the kidneys;
* the **diaphragm**: a height map over the axial plane, the upper surface of liver, spleen and stomach,
  extended smoothly to the columns without them and kept above every other abdominal organ.

The fields are signed distances in mm (negative inside), like the procedural anatomy's body fields, so they
interpolate smoothly onto any output grid; :mod:`.synth_body_paint` paints them there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.morphology import convex_hull_image

from LiverTumorSegLib.phantoms.fields import wrap_angle
from LiverTumorSegLib.phantoms.grid import allowed_lut

from .label_bank import LIVER_REGION_CODES, Structure

#: In-plane step (mm) of the coarse grid the body is described on.
COARSE_STEP_MM = 2.5

#: Structures whose tops form the diaphragm's dome, and those it must stay above.
_DOME = (*LIVER_REGION_CODES, Structure.SPLEEN, Structure.STOMACH)
_BELOW_DIAPHRAGM = (Structure.KIDNEY_R, Structure.KIDNEY_L, Structure.PANCREAS, Structure.GALLBLADDER,
                    Structure.DUODENUM, Structure.ADRENALS, Structure.COLON, Structure.SMALL_BOWEL, Structure.RECTUM,
                    Structure.BLADDER, Structure.FEMORAL_HEADS, Structure.PELVIC_ORGAN)


@dataclass
class BodyShape:
    """Drawn habitus of one case (mm): wall layer thicknesses and their variation with the angle."""

    t_skin: float
    t_sc: float  # subcutaneous fat (median)
    sc_fourier: list  # (k, amplitude, phase): angular variation of the fat layer
    belly: float  # extra anterior fat (fraction of t_sc)
    t_m: float  # abdominal wall muscle
    t_paraspinal: float
    t_quadratus: float
    margin_front: float  # cavity beyond the organs' hull: in front, at the sides, behind
    margin_side: float
    margin_back: float
    t_diaphragm: float
    vertebra: tuple  # (rx, ry) of the vertebral body
    flatten: float  # how far the table flattens the back (mm)

    @classmethod
    def draw(cls, rng: np.random.Generator, bowel_labelled: bool) -> "BodyShape":
        u = rng.uniform
        return cls(t_skin=u(1.5, 2.5), t_sc=float(np.clip(rng.lognormal(np.log(15.0), 0.5), 4.0, 45.0)),
                   sc_fourier=[(k, rng.normal(0, 0.2), u(0, 2 * np.pi)) for k in (1, 2, 3)], belly=u(0.0, 0.8),
                   t_m=u(8, 14) if u() > 0.15 else u(5, 8), t_paraspinal=u(40, 60), t_quadratus=u(6, 18),
                   margin_front=u(5, 25) if bowel_labelled else u(20, 60), margin_side=u(4, 25),
                   margin_back=u(0, 6), t_diaphragm=u(3.0, 5.0), vertebra=(u(17, 24), u(13, 18)), flatten=u(0, 15))

    def fat(self, th: np.ndarray) -> np.ndarray:
        """Subcutaneous fat thickness at angle ``th`` (0 = patient left, pi/2 = posterior)."""
        g = sum(a * np.cos(k * th + ph) for k, a, ph in self.sc_fourier)
        t = self.t_sc * np.exp(g) * (1 - 0.45 * np.exp(-(wrap_angle(th - np.pi / 2) / 0.3) ** 2))
        return t * (1 + self.belly * np.maximum(0.0, -np.sin(th)))

    def muscle(self, th: np.ndarray) -> np.ndarray:
        """Muscle wall thickness: thin in front (linea alba), quadratus lumborum, paraspinal muscles behind."""
        dp = wrap_angle(th - np.pi / 2)
        linea = np.exp(-(wrap_angle(th + np.pi / 2) / 0.04) ** 4)
        back = np.exp(-(dp / 0.45) ** 4)
        quadratus = np.exp(-((np.abs(dp) - 1.0) / 0.22) ** 2)
        return np.maximum(self.t_m * (1 - 0.85 * linea) + self.t_quadratus * quadratus, self.t_paraspinal * back)

    def margin(self, th: np.ndarray, front: np.ndarray) -> np.ndarray:
        """How far the abdominal cavity reaches beyond the organs' hull at angle ``th``; ``front`` (0-1, per
        slice) scales the margin in front, which holds bowel below the liver but not beside its dome."""
        s = np.sin(th)
        return self.margin_side + np.where(s < 0, (self.margin_front - self.margin_side) * front * s * s,
                                           (self.margin_back - self.margin_side) * s * s)


@dataclass
class BodyModel:
    """The body around the organs on a coarse grid (axes ``z``, ``y``, ``x`` in LPS mm).

    ``f_out``, ``f_fat``, ``f_cav`` are signed distances (mm, negative inside) of the skin surface, of the
    fat/muscle interface and of the abdominal cavity; ``dome`` (y, x) the height of the diaphragm's upper
    surface; ``spine`` (z, 2) the vertebral body centre (x, y) per slice, or None when the map labels bone.
    ``centre``/``half_axes`` describe the trunk's cross-section (for the noise map and the field of view);
    the back rests on a table whose top is at ``table_y``.
    """

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    f_out: np.ndarray
    f_fat: np.ndarray
    f_cav: np.ndarray
    dome: np.ndarray
    spine: np.ndarray | None
    shape: BodyShape
    centre: tuple[float, float]
    half_axes: tuple[float, float]
    table_y: float


def build_body(labels: np.ndarray, axes, shape: BodyShape) -> BodyModel:
    """Describe the body around the coarse (marked) ``labels`` on ``axes`` = (z, y, x) in LPS mm."""
    z, y, x = (np.asarray(a, np.float32) for a in axes)
    has_body = bool((labels == Structure.BODY).any())
    has_bone = bool((labels == Structure.BONE).any())
    X, Y = np.meshgrid(x, y)
    spine = None if has_bone else _spine_track(labels, X, Y, shape)
    organs = (labels > 0) & (labels != Structure.BODY)
    if has_body:
        f_out = _smooth_z(_signed_distance(labels > 0), z)
        th = _angles(f_out < 0, X, Y)
        f_fat = f_out + shape.t_skin + shape.fat(th)
        f_cav = f_fat + shape.muscle(th)
        table_y = float(Y[(f_out < 0).any(axis=0)].max())
    else:
        hull, widest = _hulls(organs, spine, X, Y, shape)
        sd = _smooth_z(_signed_distance(hull), z)
        th = _angles(sd < 0, X, Y)
        front = np.clip(1.0 - (z - z[widest]) / 40.0, 0.2, 1.0)[:, None, None]  # less in front above the widest slice
        f_cav = sd - shape.margin(th, front)
        f_fat = f_cav - shape.muscle(th)
        f_out = _signed_distance(_convex(f_fat - shape.fat(th) - shape.t_skin < 0))  # the trunk's outline is convex
        table_y = float(Y[(f_out < 0).any(axis=0)].max()) - shape.flatten  # the back lies flattened on the table
        f_out = np.maximum(f_out, Y - table_y)
        f_fat = np.maximum(f_fat, f_out + shape.t_skin + 2.0)  # layers stay nested where the table flattens them
        f_cav = np.maximum(f_cav, f_fat + 3.0)
    inside = (f_out < 0).any(axis=0)
    if not inside.any():
        inside[y.size // 2, x.size // 2] = True
    rows, cols = np.nonzero(inside)
    centre = (float(x[cols].mean()), float(y[rows].mean()))
    half = (max(float(x[cols].max() - x[cols].min()) / 2, 50.0), max(float(y[rows].max() - y[rows].min()) / 2, 40.0))
    return BodyModel(z, y, x, f_out.astype(np.float32), f_fat.astype(np.float32), f_cav.astype(np.float32),
                     _dome(labels, z, shape.t_diaphragm), spine, shape, centre, half, table_y)


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Per-slice signed distance (mm, negative inside) of a (z, y, x) mask on the coarse grid."""
    out = np.empty(mask.shape, np.float32)
    for k, plane in enumerate(mask):
        if not plane.any():
            out[k] = 1e3
            continue
        out[k] = (ndimage.distance_transform_edt(~plane) - ndimage.distance_transform_edt(plane)) * COARSE_STEP_MM
    return out


def _smooth_z(field: np.ndarray, z: np.ndarray, sigma_mm: float = 8.0) -> np.ndarray:
    """Smooth along z (slices without any inside copy their nearest neighbour first)."""
    empty = (field >= 1e3).all(axis=(1, 2))
    if empty.all():
        return field
    if empty.any():
        full = np.nonzero(~empty)[0]
        nearest = full[np.abs(np.arange(field.shape[0])[:, None] - full[None]).argmin(axis=1)]
        field = field[nearest]
    dz = float(np.median(np.diff(z))) if z.size > 1 else sigma_mm
    return ndimage.gaussian_filter1d(field, sigma_mm / max(dz, 1e-3), axis=0, mode="nearest")


def _angles(inside: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Polar angle of every pixel around its slice's centroid of ``inside`` (0 = patient left, pi/2 = back)."""
    th = np.empty(inside.shape, np.float32)
    for k, plane in enumerate(inside):
        cx, cy = (float(X[plane].mean()), float(Y[plane].mean())) if plane.any() else (float(X.mean()), float(Y.mean()))
        th[k] = np.arctan2(Y - cy, X - cx)
    return th


def _convex(mask: np.ndarray) -> np.ndarray:
    """Per slice: the convex hull of ``mask``."""
    out = np.zeros(mask.shape, bool)
    for k, plane in enumerate(mask):
        if plane.any():
            out[k] = convex_hull_image(plane)
    return out


def _hulls(organs: np.ndarray, spine, X, Y, shape: BodyShape) -> tuple[np.ndarray, int]:
    """Per slice: the convex hull of the organs and the vertebral body, never narrower than the slices
    between it and the widest one (the trunk does not shrink where fewer organs are labelled); and the
    index of the widest slice."""
    if spine is not None:
        rx, ry = shape.vertebra
        organs = organs | (((X[None] - spine[:, 0, None, None]) / rx) ** 2 + ((Y[None] - spine[:, 1, None, None]) / ry) ** 2 <= 1)
    hull = _convex(organs)
    widest = int(hull.sum(axis=(1, 2)).argmax())
    for k in range(widest + 1, hull.shape[0]):
        hull[k] |= hull[k - 1]
    for k in range(widest - 1, -1, -1):
        hull[k] |= hull[k + 1]
    return hull, widest


def _spine_track(labels: np.ndarray, X, Y, shape: BodyShape) -> np.ndarray:
    """Vertebral body centre (x, y) per slice: behind the aorta and IVC, else between the kidneys, else
    behind the organs' centroid; interpolated over slices without them and smoothed."""
    nz = labels.shape[0]
    track = np.full((nz, 2), np.nan)
    ry = shape.vertebra[1]
    for k, plane in enumerate(labels):
        vessels = [plane == v for v in (Structure.AORTA, Structure.IVC) if (plane == v).sum() >= 4]
        kidneys = [plane == v for v in (Structure.KIDNEY_R, Structure.KIDNEY_L) if (plane == v).any()]
        if vessels:
            back = max(float(Y[m].max()) for m in vessels)
            track[k] = (np.mean([X[m].mean() for m in vessels]) - (6.0 if len(vessels) == 1 else 0.0), back + 2 + ry)
        elif len(kidneys) == 2:
            track[k] = (np.mean([X[m].mean() for m in kidneys]), np.mean([Y[m].mean() for m in kidneys]) + 0.3 * ry)
    if np.isnan(track[:, 0]).all():
        organs = labels > 0
        track[:] = (float(X[organs.any(0)].mean()), float(Y[organs.any(0)].max()) - ry) if organs.any() else (0.0, 0.0)
    known = ~np.isnan(track[:, 0])
    for axis in range(2):
        track[:, axis] = np.interp(np.arange(nz), np.nonzero(known)[0], track[known, axis])
    track = ndimage.median_filter(track, size=(5, 1), mode="nearest")
    return ndimage.gaussian_filter1d(track, 2.0, axis=0, mode="nearest")


def _dome(labels: np.ndarray, z: np.ndarray, t_d: float) -> np.ndarray:
    """Height (mm) of the diaphragm's upper surface over every (y, x) of the coarse grid."""
    top_of = np.where(allowed_lut(_DOME)[labels], z[:, None, None], -np.inf).max(axis=0)
    floor = np.where(allowed_lut(_BELOW_DIAPHRAGM)[labels], z[:, None, None], -np.inf).max(axis=0)
    known = np.isfinite(top_of)
    if not known.any():
        return np.full(labels.shape[1:], np.inf, np.float32)  # no dome organ visible: no thorax
    sigma = 40.0 / COARSE_STEP_MM
    weight = ndimage.gaussian_filter(known.astype(np.float32), sigma)
    value = ndimage.gaussian_filter(np.where(known, top_of, 0.0).astype(np.float32), sigma)
    fill = np.where(weight > 1e-3, value / np.maximum(weight, 1e-6), np.nanmax(np.where(known, top_of, np.nan)))
    dome = np.where(known, top_of, fill)
    dome = np.maximum(dome, floor + t_d + 5.0)
    return ndimage.gaussian_filter(dome, 6.0 / COARSE_STEP_MM).astype(np.float32) + np.float32(t_d)
