"""Training CT on real anatomy: label-bank maps painted into synthetic CT (SynthSeg-style).

Procedural phantoms have procedural shapes; the real failures are at real organ contacts. For one label
map (:mod:`.label_bank`) and a seed, :func:`synthesize`:

1. draws the case: contrast phase (portal-venous, late arterial, unenhanced, delayed) and contrast scale,
   the HU of every tissue for that phase (:func:`LiverTumorSegLib.phantoms.tissues.tissue_levels`), slice
   thickness (0.6-5 mm, no finer than half the map's own), noise and reconstruction kernel, and whether the
   field of view or the coverage cuts the liver;
2. deforms the map: a random affine (scale +/-10 %, rotation) and a smooth elastic field, one displacement
   field applied by SimpleITK with nearest-neighbour labels;
3. describes and paints the unlabelled body around the organs (:mod:`.synth_body`, :mod:`.synth_body_paint`);
4. paints the labelled structures, textures, vessel trees, the map's tumours and 0-6 extra lesions of every
   kind down to 5 mm (:mod:`.synth_paint`);
5. forms the image with the procedural phantoms' kernel blur and CT-like noise
   (:func:`LiverTumorSegLib.phantoms.scanner.reconstruct`).

The label follows LiTS: 1 is the liver region (:func:`.label_bank.liver_region`), 2 its tumours (the map's
and the inserted ones). Separate random streams per concern: switching extra lesions or the deformation
off leaves everything else of the case unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from threadpoolctl import threadpool_limits

from LiverTumorSegLib.image_io import MIN_SLICES, Geometry, Image
from LiverTumorSegLib.masks import bounding_box
from LiverTumorSegLib.phantoms import SIZES, Tissue
from LiverTumorSegLib.phantoms.case import random_stream
from LiverTumorSegLib.phantoms.fields import rotation_matrix
from LiverTumorSegLib.phantoms.grid import Grid, allowed_lut
from LiverTumorSegLib.phantoms.lesions import finish_tumour_entries
from LiverTumorSegLib.phantoms.scanner import noise_sigma_map, reconstruct
from LiverTumorSegLib.phantoms.tissues import ALL_PHASES, levels_lut, tissue_levels

from .label_bank import INTRAHEPATIC_CODE, LIVER_REGION_CODES, Structure, lits_labels, mark_intrahepatic
from .synth_body import COARSE_STEP_MM, BodyShape, build_body
from .synth_body_paint import TrunkDetails, paint_trunk
from .synth_paint import (STOMACH_CONTENT, SYNTH_TISSUES, LiverAtlas, add_textures, extra_levels, grow_vessels,
                          insert_lesions, paint_real_lesions, paint_structures)

SYNTH_VERSION = 1
PHASE_PROBABILITIES = (0.5, 0.2, 0.15, 0.15)  # of ALL_PHASES: portal-venous, late arterial, unenhanced, delayed
SLICE_CHOICES_MM = (0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
SLICE_CHOICE_PROBABILITIES = (0.06, 0.06, 0.12, 0.1, 0.1, 0.1, 0.14, 0.1, 0.08, 0.14)
SLICE_RANGE_MM = (0.6, 5.0)
#: Field of view (mm) of the 512 matrix: 0.55-0.98 mm pixels.
FOV_RANGE_MM = (0.55 * 512, 0.98 * 512)
MAX_SLICES = 240
BODY_MARGIN_MM = 100.0
STREAM_CASE, STREAM_DEFORMATION, STREAM_BODY, STREAM_TEXTURE, STREAM_LESIONS, STREAM_NOISE, STREAM_VESSELS = range(7)


@dataclass(frozen=True)
class SynthOptions:
    """``size``: output matrix (:data:`LiverTumorSegLib.phantoms.SIZES`); the switches are for tests."""

    size: str = "full"
    deform: bool = True
    cut_probability: float = 0.25  # field of view or coverage that cuts the liver
    extra_lesions: bool = True
    reconstruct: bool = True  # kernel blur and noise; off: the painted HU


@dataclass
class SynthPhantom:
    """One label-bank phantom: ``image`` (int16 HU, canonical LPS), ``label`` (0/1/2), ``tissues`` (ids of
    :data:`.synth_paint.SYNTH_TISSUES`), ``tumours`` (the map's and the inserted ones) and ``meta``."""

    image: Image
    label: np.ndarray
    tissues: np.ndarray
    tumours: list[dict]
    meta: dict = field(default_factory=dict)


@dataclass
class _Case:
    phase: str
    contrast: float
    levels: dict
    slice_mm: float
    cut: str | None  # None, "fov", "top" or "bottom"
    fov_margin: float
    noise_sigma: float
    nps_fc: float
    kernel_a: float
    kernel_az: float
    circular: bool
    stomach: str  # contents: fluid, food or oral contrast
    oral: bool  # oral contrast in the bowel


def _draw_case(rng: np.random.Generator, map_slice_mm: float, options: SynthOptions) -> _Case:
    u = rng.uniform
    phase = str(rng.choice(ALL_PHASES, p=PHASE_PROBABILITIES))
    contrast = u(0.85, 1.15)
    levels = tissue_levels(rng, phase, contrast, steatosis=u() < 0.08, sludge=u() < 0.06, age_factor=u(0, 1))
    levels.update(extra_levels(rng, levels, phase))
    sz = u(*SLICE_RANGE_MM) if u() < 0.2 else float(rng.choice(SLICE_CHOICES_MM, p=SLICE_CHOICE_PROBABILITIES))
    sz = float(min(max(sz, map_slice_mm / 2), SLICE_RANGE_MM[1]))  # nearest-neighbour labels: at most 2 slices per step
    cut = str(rng.choice(["fov", "top", "bottom"])) if u() < options.cut_probability else None
    margin = u(0, 120) if u() < 0.85 else u(-50, -10)
    stomach = str(rng.choice(list(STOMACH_CONTENT), p=[0.6, 0.2, 0.2]))
    return _Case(phase, contrast, levels, round(sz, 3), cut, margin, u(8, 20), u(0.25, 0.45), u(0.10, 0.22),
                 u(0.04, 0.16), u() < 0.35, stomach, stomach == "oral" or u() < 0.2)


def synthesize(label_map: Image, seed: int, options: SynthOptions = SynthOptions(), source: str = "") -> SynthPhantom:
    """One training CT from a canonical label map (:func:`.label_bank.read_label_map`); deterministic in ``seed``."""
    if options.size not in SIZES:
        raise ValueError(f"unknown size {options.size!r}; use one of {sorted(SIZES)}")
    # The random fields are small matrix products: BLAS threads gain nothing and, on a machine busy with
    # training, their spinning made one field evaluation 300 times slower (3.9 s instead of 0.013 s).
    with threadpool_limits(limits=1, user_api="blas"):
        return _synthesize(label_map, seed, options, source)


def _synthesize(label_map: Image, seed: int, options: SynthOptions, source: str) -> SynthPhantom:
    marked = label_map.with_array(mark_intrahepatic(label_map.array))
    present = np.bincount(marked.array.ravel(), minlength=32) > 0
    case = _draw_case(random_stream(seed, STREAM_CASE), float(label_map.geometry.spacing[2]), options)
    rng = random_stream(seed, STREAM_CASE, 1)
    lo, hi = _extent(label_map.geometry, tuple(slice(0, n) for n in label_map.array.shape))
    liver_lo, liver_hi = _extent(label_map.geometry, bounding_box(allowed_lut(LIVER_REGION_CODES)[marked.array]))
    transform, deformation = _deformation(random_stream(seed, STREAM_DEFORMATION), lo, hi, (liver_lo + liver_hi) / 2,
                                          options.deform)
    z = _z_window(rng, case, lo[2], hi[2], liver_lo[2], liver_hi[2])

    body_rng = random_stream(seed, STREAM_BODY)
    # the coarse grid reaches beyond the map so that the outline built around the organs closes
    cy, cx = (np.arange(lo[a] - BODY_MARGIN_MM, hi[a] + BODY_MARGIN_MM, COARSE_STEP_MM) for a in (1, 0))
    coarse = _resample(marked, transform, (cx[0], cy[0], z[0]), (COARSE_STEP_MM, COARSE_STEP_MM, case.slice_mm),
                       (z.size, cy.size, cx.size))
    bowel_labelled = bool(present[Structure.COLON] or present[Structure.SMALL_BOWEL])
    body = build_body(coarse, (z, cy, cx), BodyShape.draw(body_rng, bowel_labelled))
    grid = _output_grid(rng, case, body, coarse, cx, z, SIZES[options.size])
    labels = _resample(marked, transform, grid.origin, grid.spacing, grid.shape)

    tissue = np.zeros(grid.shape, np.uint8)
    rib_floor, psoas_top = _landmarks(coarse, z, body_rng)
    paint_trunk(grid, tissue, body, TrunkDetails.draw(body_rng, case.oral), body_rng,
                lungs_labelled=bool(present[Structure.LUNGS]), bone_labelled=bool(present[Structure.BONE]),
                bowel_labelled=bowel_labelled, rib_floor=rib_floor, psoas_top=psoas_top)
    paint_structures(tissue, labels, grid.spacing, body_rng, case.stomach)
    levels = case.levels
    hu = levels_lut(levels)[tissue]
    hu[labels == INTRAHEPATIC_CODE[Structure.HEPATIC_VEINS]] = levels["hepatic_veins"]
    add_textures(grid, hu, tissue, levels, random_stream(seed, STREAM_TEXTURE), case.stomach == "food")
    lesion_rng = random_stream(seed, STREAM_LESIONS)
    tumours = paint_real_lesions(grid, hu, tissue, labels, levels, case.phase, case.contrast, lesion_rng)
    atlas = LiverAtlas(grid, labels)
    portal, hepatic = (not present[INTRAHEPATIC_CODE[v]] for v in (Structure.PORTAL_VEIN, Structure.HEPATIC_VEINS))
    segments = grow_vessels(atlas, grid, hu, tissue, levels, random_stream(seed, STREAM_VESSELS), portal, hepatic)
    inserted, tumour_mask = ([], None)
    if options.extra_lesions:
        inserted, tumour_mask = insert_lesions(atlas, grid, hu, tissue, segments, levels, case.phase, case.contrast,
                                               lesion_rng)
    label = lits_labels(labels)
    if tumour_mask is not None:
        label[atlas.box][tumour_mask] = 2

    if options.reconstruct:
        smap = noise_sigma_map(grid.px[None, :] - body.centre[0], grid.py[:, None] - body.centre[1], case.noise_sigma,
                               *body.half_axes)
        reconstruct(hu, grid.spacing[0], case.kernel_a, case.kernel_az, smap, case.nps_fc,
                    random_stream(seed, STREAM_NOISE))
    np.clip(hu, -1024, 3071, out=hu)
    image = np.rint(hu).astype(np.int16)
    del hu
    if case.circular:  # reconstruction circle: outside it the scanner writes padding
        outside = (grid.px[None, :] - grid.px.mean()) ** 2 + (grid.py[:, None] - grid.py.mean()) ** 2 > (
            grid.shape[2] / 2 * grid.spacing[0]) ** 2
        image[:, outside], label[:, outside], tissue[:, outside] = -1024, 0, Tissue.AIR
    finish_tumour_entries(inserted, image, label, grid.spacing)
    for entry in inserted:
        entry["source"] = "inserted"
    geometry = Geometry(tuple(float(s) for s in grid.spacing), tuple(float(o) for o in grid.origin),
                        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    meta = dict(generator="livertumorseg_training.synth_ct", version=SYNTH_VERSION, seed=int(seed), label_map=source,
                size=options.size, spacing=list(geometry.spacing), shape=[int(n) for n in grid.shape],
                origin=list(geometry.origin), phase=case.phase, contrast_scale=round(case.contrast, 4),
                cut=case.cut, circular_fov=bool(case.circular), fov_mm=round(grid.shape[2] * grid.spacing[0], 2),
                deformation=deformation, noise_sigma_hu=round(case.noise_sigma, 3), kernel_blur=round(case.kernel_a, 4),
                liver_hu=round(float(levels[Tissue.LIVER]), 2), spleen_hu=round(float(levels[Tissue.SPLEEN]), 2),
                portal_vein_hu=round(float(levels[Tissue.VESSEL]), 2), vessel_trees_grown=sorted({s[4] for s in segments}),
                real_tumours=len(tumours), inserted_tumours=len(inserted),
                liver_volume_ml=round(float(np.count_nonzero(label)) * float(np.prod(grid.spacing)) / 1000.0, 2),
                hu_levels={SYNTH_TISSUES[k]: round(float(v), 1) for k, v in levels.items() if isinstance(k, int)})
    return SynthPhantom(Image(image, geometry), label, tissue, tumours + inserted, meta)


def _extent(geometry: Geometry, box) -> tuple[np.ndarray, np.ndarray]:
    """LPS bounding box (x, y, z) of the voxel centres of the index ``box`` (z, y, x slices)."""
    corners = np.array([[z, y, x] for z in (box[0].start, box[0].stop - 1) for y in (box[1].start, box[1].stop - 1)
                        for x in (box[2].start, box[2].stop - 1)], float)
    points = geometry.index_to_physical(corners)
    return points.min(axis=0), points.max(axis=0)


def _deformation(rng: np.random.Generator, lo, hi, centre, deform: bool):
    """Output-to-map transform: a random affine about the liver's centre plus a smooth elastic field (one
    displacement field on 30 mm nodes, reaching 100 mm beyond the map); identity when ``deform`` is off."""
    if not deform:
        return sitk.Transform(), None
    u = rng.uniform
    s_xy = u(0.9, 1.1)
    scale = np.array([s_xy * u(0.97, 1.03), s_xy * u(0.97, 1.03), u(0.92, 1.08)])
    angles = np.array([u(-3, 3), u(-3, 3), u(-6, 6)])
    matrix = rotation_matrix(*np.radians(angles)).astype(float) @ np.diag(scale)
    step, origin = 30.0, np.asarray(lo, float) - 100.0
    n = [int(math.ceil((h - l + 200.0) / step)) + 1 for l, h in zip(lo, hi)]
    zz, yy, xx = np.meshgrid(*(origin[a] + step * np.arange(n[a]) for a in (2, 1, 0)), indexing="ij")
    nodes = np.stack([xx, yy, zz], -1) - np.asarray(centre, float)
    elastic = np.stack([ndimage.gaussian_filter(rng.standard_normal(xx.shape), 1.0) for _ in range(3)], -1)
    amplitude = u(1.5, 5.0)
    elastic *= amplitude / max(float(elastic.std()), 1e-6)
    displacement = nodes @ matrix.T - nodes + elastic
    field_image = sitk.GetImageFromArray(displacement.astype(np.float64), isVector=True)
    field_image.SetOrigin(tuple(origin))
    field_image.SetSpacing((step, step, step))
    summary = dict(scale=[round(float(s), 4) for s in scale], rotation_deg=[round(float(a), 2) for a in angles],
                   elastic_mm=round(amplitude, 2))
    return sitk.DisplacementFieldTransform(field_image), summary


def _resample(image: Image, transform, origin, spacing, shape) -> np.ndarray:
    """Labels of ``image`` at the voxels of an axis-aligned grid, through ``transform`` (nearest neighbour;
    the engine's ``preprocess.resample`` has no transform)."""
    reference = sitk.Image([int(n) for n in shape[::-1]], sitk.sitkUInt8)
    reference.SetOrigin(tuple(float(o) for o in origin))
    reference.SetSpacing(tuple(float(s) for s in spacing))
    out = sitk.Resample(image.to_sitk(), reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out)


def _z_window(rng, case: _Case, z_lo: float, z_hi: float, liver_lo: float, liver_hi: float) -> np.ndarray:
    """Slice positions: the liver with margins, or (``case.cut``) part of it, inside the map's coverage."""
    u, height = rng.uniform, liver_hi - liver_lo
    lo, hi = liver_lo - u(0, 80), liver_hi + u(0, 60)
    if case.cut == "top":
        hi = liver_hi - u(0.2, 0.6) * height
    elif case.cut == "bottom":
        lo = liver_lo + u(0.2, 0.6) * height
    lo, hi = max(lo, z_lo), min(hi, z_hi)
    n = int((hi - lo) / case.slice_mm) + 1
    if n > MAX_SLICES:
        lo, n = 0.5 * (lo + hi) - 0.5 * (MAX_SLICES - 1) * case.slice_mm, MAX_SLICES
    n = max(n, MIN_SLICES)
    return (lo + case.slice_mm * np.arange(n)).astype(np.float32)


def _output_grid(rng, case: _Case, body, coarse: np.ndarray, cx: np.ndarray, z: np.ndarray, matrix: int) -> Grid:
    """Square field of view fitted to the trunk (sometimes cutting it), or (``case.cut == "fov"``) with its
    patient-right edge through the liver."""
    fov = float(np.clip(2 * body.half_axes[0] * 1.05 + case.fov_margin, *FOV_RANGE_MM))
    centre = np.array(body.centre) + rng.normal(0, 12, 2)
    liver_x = cx[allowed_lut(LIVER_REGION_CODES)[coarse].any(axis=(0, 1))]
    if case.cut == "fov" and liver_x.size:
        centre[0] = liver_x.min() + rng.uniform(0.1, 0.45) * (liver_x.max() - liver_x.min()) + fov / 2
    s = fov / matrix
    origin = (centre[0] - (matrix - 1) / 2 * s, centre[1] - (matrix - 1) / 2 * s, float(z[0]))
    return Grid((z.size, matrix, matrix), (s, s, case.slice_mm), origin, (0.0, 0.0, 0.0))


def _landmarks(coarse: np.ndarray, z: np.ndarray, rng) -> tuple[float, float]:
    """Lowest rib level (in the lower part of the liver) and top of the psoas (the kidneys' middle)."""
    liver_z = z[allowed_lut(LIVER_REGION_CODES)[coarse].any(axis=(1, 2))]
    kidney_z = z[allowed_lut((Structure.KIDNEY_R, Structure.KIDNEY_L))[coarse].any(axis=(1, 2))]
    low, high = (float(liver_z.min()), float(liver_z.max())) if liver_z.size else (float(z[0]), float(z[-1]))
    rib_floor = low + rng.uniform(0.2, 0.45) * (high - low)
    return rib_floor, float(kidney_z.mean()) if kidney_z.size else low - 30.0
