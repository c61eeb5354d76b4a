"""Painting the labelled structures of a label-bank phantom: tissue classes with their inner parts, HU with
textures, intrahepatic vessel trees where the map has none, the map's real liver tumours and extra lesions.

Everything reuses the procedural phantoms' code: the tissue classes and HU levels per contrast phase
(:mod:`LiverTumorSegLib.phantoms.tissues`), textures, vessel trees, and the tumour kinds, placement and
rendering (:mod:`LiverTumorSegLib.phantoms.lesions`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from LiverTumorSegLib.masks import bounding_box, grow_box, label_lesions
from LiverTumorSegLib.phantoms import TISSUES, TUMOUR_TYPES, Tissue
from LiverTumorSegLib.phantoms.fields import Points, RandomField
from LiverTumorSegLib.phantoms.grid import Grid, allowed_lut, upsample_nearest
from LiverTumorSegLib.phantoms.lesions import TYPE_PROBABILITIES, draw_tumour_specs, render_tumour, tumour_levels
from LiverTumorSegLib.phantoms.textures import add_field_texture, add_white_texture
from LiverTumorSegLib.phantoms.vessels import ANATOMY_STEP_MM, VesselTreeGrower, paint_vessel_segments

from .label_bank import INTRAHEPATIC_CODE, LIVER_REGION_CODES, Structure
from .synth_body_paint import BOWEL_FLUID

URINE, ADRENAL, PELVIC_ORGAN, BILE_DUCT, OTHER_TUMOUR, LIVER_CYST = range(34, 40)

#: Tissue classes of label-bank phantoms: the procedural ones plus the structures only the label maps have.
SYNTH_TISSUES = {**TISSUES, URINE: "urine", ADRENAL: "adrenal gland", PELVIC_ORGAN: "prostate / uterus",
                 BILE_DUCT: "bile duct", OTHER_TUMOUR: "other tumour", LIVER_CYST: "liver cyst",
                 BOWEL_FLUID: "bowel fluid"}

S = Structure
#: Tissue class of each label (and intrahepatic code); 0 and the body label keep the painted trunk.
_TISSUE_OF = {S.LIVER: Tissue.LIVER, S.TUMOUR: Tissue.TUMOUR, S.SPLEEN: Tissue.SPLEEN, S.KIDNEY_R: Tissue.CORTEX,
              S.KIDNEY_L: Tissue.CORTEX, S.STOMACH: Tissue.STOMACH_WALL, S.PANCREAS: Tissue.PANCREAS,
              S.GALLBLADDER: Tissue.GB_WALL, S.AORTA: Tissue.AORTA, S.IVC: Tissue.IVC, S.PORTAL_VEIN: Tissue.VESSEL,
              S.HEPATIC_VEINS: Tissue.IVC, S.DUODENUM: Tissue.BOWEL, S.OESOPHAGUS: Tissue.MUSCLE, S.ADRENALS: ADRENAL,
              S.COLON: Tissue.BOWEL, S.SMALL_BOWEL: Tissue.BOWEL, S.RECTUM: Tissue.BOWEL, S.BLADDER: URINE,
              S.BONE: Tissue.CORTICAL, S.LUNGS: Tissue.LUNG, S.CYST: URINE, S.OTHER_TUMOUR: OTHER_TUMOUR,
              S.FEMORAL_HEADS: Tissue.CORTICAL, S.BILIARY: BILE_DUCT, S.PELVIC_ORGAN: PELVIC_ORGAN,
              INTRAHEPATIC_CODE[S.PORTAL_VEIN]: Tissue.VESSEL, INTRAHEPATIC_CODE[S.HEPATIC_VEINS]: Tissue.VESSEL,
              INTRAHEPATIC_CODE[S.CYST]: LIVER_CYST, INTRAHEPATIC_CODE[S.BILIARY]: BILE_DUCT}
TISSUE_LUT = np.zeros(256, np.uint8)
for _code, _tissue in _TISSUE_OF.items():
    TISSUE_LUT[_code] = _tissue
_PAINTED = allowed_lut(_TISSUE_OF)


def extra_levels(rng: np.random.Generator, levels: dict, phase: str) -> dict:
    """HU of the label-map-only tissues, drawn for one case (added to ``levels``)."""
    u = rng.uniform
    enhanced = phase != "unenhanced"
    urine = u(150, 600) if phase == "delayed" and u() < 0.5 else u(0, 20)  # excreted contrast in the bladder
    return {URINE: urine, ADRENAL: levels[Tissue.PANCREAS] + u(-15, 5),
            PELVIC_ORGAN: levels[Tissue.MUSCLE] + (u(10, 50) if enhanced else 0.0), BILE_DUCT: u(0, 25),
            OTHER_TUMOUR: u(20, 45) + (u(0, 30) if enhanced else 0.0), LIVER_CYST: u(-5, 20),
            BOWEL_FLUID: levels["bowel_fluid"]}


#: Tissue of the stomach's contents.
STOMACH_CONTENT = {"fluid": Tissue.STOMACH_FLUID, "food": Tissue.STOMACH_FLUID, "oral": Tissue.ORAL}


def paint_structures(tissue: np.ndarray, labels: np.ndarray, spacing, rng: np.random.Generator, stomach: str) -> None:
    """Tissue classes of the labelled structures over the trunk, with their inner parts: kidney cortex and
    medulla, stomach wall and contents (``stomach``: a key of :data:`STOMACH_CONTENT`) with an air-fluid
    level, gallbladder wall, bowel wall and lumen (stool and gas in the colon), cortical bone and marrow."""
    painted = _PAINTED[labels]
    tissue[painted] = TISSUE_LUT[labels][painted]
    u = rng.uniform
    for kidney in (S.KIDNEY_R, S.KIDNEY_L):
        _inner(tissue, labels == kidney, spacing, u(5, 8), Tissue.MEDULLA, rng, pattern=-0.35)
    lumen = _inner(tissue, labels == S.STOMACH, spacing, u(3, 6), STOMACH_CONTENT[stomach], rng)
    if lumen is not None:  # supine patient: gas in front of the fluid level
        box, inside = lumen
        ys = np.nonzero(inside.any(axis=(0, 2)))[0]
        level = ys[0] + u(0.05, 0.75) * (ys[-1] - ys[0])
        gas = inside & (np.arange(inside.shape[1]) < level)[None, :, None]
        tissue[box][gas] = Tissue.GAS
    _inner(tissue, labels == S.GALLBLADDER, spacing, u(1.5, 3.0), Tissue.GALLBLADDER, rng)
    for bowel, content in ((S.DUODENUM, BOWEL_FLUID), (S.SMALL_BOWEL, BOWEL_FLUID), (S.COLON, Tissue.STOOL),
                           (S.RECTUM, Tissue.STOOL)):
        _inner(tissue, labels == bowel, spacing, u(1.8, 3.0), content, rng, gas=1.2 if content == Tissue.STOOL else 1.8)
    for bone in (S.BONE, S.FEMORAL_HEADS):
        _inner(tissue, labels == bone, spacing, 1.2, Tissue.MARROW, rng)


def _inner(tissue, mask, spacing, wall_mm: float, inner: int, rng, pattern: float | None = None,
           gas: float | None = None):
    """Give the part of ``mask`` deeper than ``wall_mm`` the class ``inner``; ``pattern``: only where a random
    field exceeds it (renal pyramids); ``gas``: gas bubbles where the field exceeds it. Returns (box, deep
    part) or None."""
    box = bounding_box(mask)
    if box is None:
        return None
    box = grow_box(box, 1, mask.shape)
    sub = mask[box]
    depth = ndimage.distance_transform_edt(sub, sampling=spacing[::-1])
    deep = sub & (depth > max(wall_mm, 0.75 * min(spacing)))  # a wall at least one pixel thick
    view = tissue[box]
    if pattern is not None or gas is not None:
        field = RandomField(rng, (0, 0, 0), np.array(sub.shape[::-1]) * spacing, 6.0)
        values = field(Points(*(np.arange(n) * s for n, s in zip(sub.shape, spacing[::-1]))))
        if pattern is not None:
            deep &= values > pattern
    view[deep] = inner
    if gas is not None:
        view[deep & (values > gas)] = Tissue.GAS
    return box, deep


def add_textures(grid: Grid, hu: np.ndarray, tissue: np.ndarray, levels: dict, rng: np.random.Generator,
                 food: bool) -> None:
    """Textures: liver mottling and perfusion, spleen (arterial heterogeneity), pancreas lobulation, fat and
    muscle septa, trabecular marrow, lungs, stool and food."""
    everything = tuple(slice(0, n) for n in grid.shape)
    for tid, sigma, length, slow in ((Tissue.LIVER, levels["liver_texture"], 8.0, (3.0, 60.0)),
                                     (Tissue.SPLEEN, levels["spleen_texture"], 7.0, None),
                                     (Tissue.PANCREAS, 6.0, 4.0, None), (Tissue.FAT, levels["fat_texture"], 10.0, None),
                                     (Tissue.MUSCLE, levels["muscle_texture"], 10.0, None)):
        box = bounding_box(tissue == tid)
        add_field_texture(grid, hu, tissue, box, tid, sigma, length, rng, slow=slow)
    if food:
        add_field_texture(grid, hu, tissue, bounding_box(tissue == Tissue.STOMACH_FLUID), Tissue.STOMACH_FLUID, 30.0,
                          6.0, rng, extra=np.float32(25.0))
    add_field_texture(grid, hu, tissue, bounding_box(tissue == Tissue.STOOL), Tissue.STOOL, 60.0, 7.0, rng)
    for tid, sigma in ((Tissue.MARROW, levels["marrow_texture"]), (Tissue.LUNG, 15.0), (Tissue.STOOL, 35.0)):
        add_white_texture(hu, tissue, everything, tid, sigma, rng)
    lung = tissue == Tissue.LUNG
    if lung.any():  # dependent density of the lung bases (posterior)
        ys = np.nonzero(lung.any(axis=(0, 2)))[0]
        back = grid.py[ys[-1]]
        dep = np.clip((grid.py - (back - 70.0)) / 70.0, 0, 1).astype(np.float32) * np.float32(levels["lung_dependent"])
        hu += lung * dep[None, :, None]


def paint_real_lesions(grid: Grid, hu, tissue, labels, levels: dict, phase: str, contrast: float, rng) -> list[dict]:
    """The map's own liver tumours: each lesion gets a kind and its HU by phase (:func:`tumour_levels`): a rim,
    a necrotic core, calcifications by depth inside the lesion, and texture. Returns one entry per lesion."""
    lesions, _ = label_lesions(labels == S.TUMOUR)
    entries = []
    for i, box in enumerate(ndimage.find_objects(lesions), start=1):
        kind = str(rng.choice(TUMOUR_TYPES, p=TYPE_PROBABILITIES))
        lv = tumour_levels(rng, kind, phase, float(levels[Tissue.LIVER]), contrast)
        own = lesions[box] == i
        depth = ndimage.distance_transform_edt(np.pad(own, 1), sampling=grid.spacing[::-1])[1:-1, 1:-1, 1:-1]
        value = np.full(own.shape, lv["base"], np.float32)
        if kind == "rim_enhancing":
            value[depth < lv["rim_mm"]] = lv["rim"]
        elif kind == "necrotic":
            value[depth > (1 - lv["core_frac"]) * depth.max()] = lv["core"]
        elif kind == "calcified":
            value[depth > 0.5 * depth.max()] = lv["dense"] if depth.max() < 3 else lv["calc"]
        hu[box][own] = value[own]
        add_field_texture(grid, hu, tissue, box, Tissue.TUMOUR, lv["texture"], float(rng.uniform(2.5, 6.0)), rng)
        entries.append(dict(id=i, type=kind, source="label map", voxels=int(own.sum())))
    return entries


class LiverAtlas:
    """The liver region of the output grid on an isotropic 3 mm grid, with its depth: where vessel trees
    grow and extra lesions are placed (tumours and cysts are not free liver)."""

    def __init__(self, grid: Grid, labels: np.ndarray):
        region = allowed_lut(LIVER_REGION_CODES)[labels]
        self.box = bounding_box(region)
        if self.box is None:
            return
        zs, ys, xs = (axis[s] for axis, s in zip((grid.pz, grid.py, grid.px), self.box))
        st = ANATOMY_STEP_MM
        self.P = Points(np.arange(zs[0], zs[-1] + 1e-3, st), np.arange(ys[0], ys[-1] + 1e-3, st),
                        np.arange(xs[0], xs[-1] + 1e-3, st))
        free = region & ~allowed_lut((S.TUMOUR, INTRAHEPATIC_CODE[S.CYST]))[labels]
        inside = upsample_nearest(free[self.box].view(np.uint8), (zs, ys, xs), (self.P.z, self.P.y, self.P.x)) > 0
        self.depth = ndimage.distance_transform_edt(inside) * st
        self.region = region[self.box]

    def point(self, fx: float, fy: float, fz: float, min_depth: float) -> np.ndarray:
        """The liver point at least ``min_depth`` deep nearest to the fractions (fx, fy, fz) of its box."""
        P, ok = self.P, self.depth >= min_depth
        if not ok.any():
            ok = self.depth > 0
        idx = np.argwhere(ok)
        target = np.array([fz * (P.z.size - 1), fy * (P.y.size - 1), fx * (P.x.size - 1)])
        k, j, i = idx[np.argmin(((idx - target) ** 2).sum(1))]
        return np.array([P.x[i], P.y[j], P.z[k]], float)


def grow_vessels(atlas: LiverAtlas, grid: Grid, hu, tissue, levels: dict, rng, portal: bool, hepatic: bool) -> list:
    """Portal and/or hepatic venous trees inside the liver (where the map has none), painted with partial
    volume. Liver-box fractions: x from patient right, y from the front, z from the bottom."""
    if atlas.box is None or not (portal or hepatic):
        return []
    trees = VesselTreeGrower(atlas.P, atlas.depth, ANATOMY_STEP_MM, rng)
    u = rng.uniform
    at = atlas.point
    if portal:
        hilum, r = at(0.62, 0.55, 0.35, 8.0), u(5.5, 7.0)
        for target, scale in (((0.2, 0.7, 0.5), 0.75), ((0.25, 0.35, 0.6), 0.7), ((0.85, 0.35, 0.55), 0.7)):
            trees.grow(hilum, at(*target, 0.0), r * scale, u(30, 45), 7, "portal", free=True)
    if hepatic:
        confluence = at(0.55, 0.75, 0.9, 5.0)
        for target in ((0.1, 0.5, 0.55), (0.45, 0.25, 0.45), (0.8, 0.3, 0.7)):
            trees.grow(confluence, at(*target, 0.0), u(3.5, 6.0), u(30, 45), 6, "hepatic", free=True)
    levels_by_kind = {"portal": np.float32(levels[Tissue.VESSEL]), "hepatic": np.float32(levels["hepatic_veins"])}
    paint_vessel_segments(grid, hu, tissue, trees.segments, levels_by_kind)
    return trees.segments


#: Probabilities of 0..6 extra lesions per case.
EXTRA_COUNT_PROBABILITIES = (0.2, 0.25, 0.2, 0.15, 0.1, 0.06, 0.04)
MIN_LESION_MM = 5.0


def insert_lesions(atlas: LiverAtlas, grid: Grid, hu, tissue, segments, levels: dict, phase: str, contrast: float,
                   rng) -> tuple[list[dict], np.ndarray | None]:
    """Extra tumours of every kind, 5-80 mm, placed and rendered as in the procedural phantoms. Returns their
    entries and the tumour mask (real and inserted) on the liver box."""
    if atlas.box is None:
        return [], None
    count = int(rng.choice(len(EXTRA_COUNT_PROBABILITIES), p=EXTRA_COUNT_PROBABILITIES))
    dominant = str(rng.choice(TUMOUR_TYPES, p=TYPE_PROBABILITIES))
    cand = np.argwhere(atlas.depth >= 3.0)
    P = atlas.P
    pts = np.stack([P.x[cand[:, 2]], P.y[cand[:, 1]], P.z[cand[:, 0]]], 1).astype(float)
    deps = atlas.depth[cand[:, 0], cand[:, 1], cand[:, 2]]
    segs = [s for s in segments if s[2] >= 1.5]
    specs = draw_tumour_specs(rng, count, dominant, pts, deps, segs, ANATOMY_STEP_MM, phase, float(levels[Tissue.LIVER]),
                              contrast, min_diameter=MIN_LESION_MM) if cand.size else []
    tumour_mask = tissue[atlas.box] == Tissue.TUMOUR
    entries = [render_tumour(grid, hu, tissue, atlas.box, atlas.region, tumour_mask, i + 1, s) for i, s in enumerate(specs)]
    return entries, tumour_mask

