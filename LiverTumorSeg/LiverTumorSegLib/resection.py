"""Resection planning: resected and remnant liver volume, future liver remnant (FLR) and tumour margins.

Conventions (what the planner reads):

* **Input**: a 0/1/2 label map (z, y, x) with its :class:`.image_io.Geometry`. *Liver* is the whole organ,
  labels 1 and 2, as :mod:`.volumetry` counts it; *functional liver* is label 1 only (liver minus tumour).
* **Resection**: a plane (a point and a normal in LPS millimetres; the normal points into the part that
  is resected) or a resected mask on the label map's grid (nonzero = resected; mask voxels outside the
  liver are ignored).
* **Sides**: every liver voxel goes wholly to one side by its centre, mapped to LPS millimetres by the
  geometry (spacing, origin and direction, so oblique grids are exact): for a plane, a signed distance
  > 0 is resected and a centre exactly on the plane stays in the remnant; for a mask, the mask value.
  Volumes count voxels × voxel volume (mL); partial voxels are not estimated.
* **FLR %** = functional remnant volume / total functional volume × 100. The verdict is ``pass`` when
  the FLR reaches the threshold of the liver-state preset (:data:`FLR_THRESHOLDS_PERCENT`).
* **Tumours** are the 26-connected components of label 2, numbered as :mod:`.volumetry` numbers lesions
  (:func:`.masks.label_lesions`: by decreasing volume, ties in array order, ids 1..n). Each is resected
  ``fully``, ``partly`` or ``not`` (voxel centres on the resected side: all, some, none).
* **Margin**: the smallest distance (mm) from any tumour voxel centre to the resection surface; 0 when
  the tumour has voxels on both sides (flag ``crosses``). For a plane it is the absolute signed
  distance. For a mask the surface is the interface between resected and remnant *liver* voxels (the
  transection surface; where the mask ends at the liver capsule nothing is cut), measured to the faces
  of the nearest voxel across it (nearest by centre, from a Euclidean distance transform): exact for a
  surface along grid planes, within half a voxel diagonal otherwise. Flags: ``R1 risk`` below
  :data:`R1_MARGIN_MM`, ``close`` below :data:`CLOSE_MARGIN_MM`, otherwise none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage

from .errors import InputError
from .image_io import Geometry, Image
from .masks import bounding_box, label_lesions
from .volumetry import LIVER, TUMOUR

#: Minimum FLR (percent of the functional liver volume) per liver state.
FLR_THRESHOLDS_PERCENT = {"normal": 20.0, "chemotherapy": 30.0, "cirrhosis": 40.0}
CLOSE_MARGIN_MM, R1_MARGIN_MM = 10.0, 1.0


@dataclass(frozen=True)
class Plane:
    """A resection plane in LPS millimetres; ``normal`` has unit length and points into the resected part."""

    point: tuple[float, float, float]
    normal: tuple[float, float, float]

    @classmethod
    def from_values(cls, values) -> "Plane":
        """From six numbers PX, PY, PZ, NX, NY, NZ (any normal length but zero)."""
        values = np.asarray(values, dtype=float).ravel()
        if values.shape != (6,) or not np.isfinite(values).all():
            raise InputError("A resection plane needs six finite numbers PX,PY,PZ,NX,NY,NZ (LPS mm); "
                             f"got {values.tolist()}.")
        length = float(np.linalg.norm(values[3:]))
        if length < 1e-9:
            raise InputError("The plane's normal (NX,NY,NZ) is zero. Give a direction pointing into the part to resect, "
                             "e.g. 1,0,0 to resect the patient's left of the point.")
        return cls(tuple(float(v) for v in values[:3]), tuple(float(v) for v in values[3:] / length))

    @classmethod
    def parse(cls, text: str) -> "Plane":
        """From the text ``PX,PY,PZ,NX,NY,NZ``."""
        try:
            values = [float(part) for part in text.split(",")]
        except ValueError:
            raise InputError(f"'{text}' is not a plane: give six comma-separated numbers PX,PY,PZ,NX,NY,NZ "
                             "(point and normal in LPS mm).") from None
        return cls.from_values(values)


@dataclass
class ResectionPlan:
    """The plan's numbers (JSON-ready, see :func:`plan_resection`) and the resected liver voxels (z, y, x)."""

    result: dict
    resected_liver: np.ndarray


def plan_resection(
    labels: np.ndarray,
    geometry: Geometry,
    *,
    plane: Optional[Plane] = None,
    resected: Optional[np.ndarray] = None,
    liver_state: str = "normal",
) -> ResectionPlan:
    """Volumes, FLR with its verdict, and per-tumour side and margin of a plane or mask resection.

    Give exactly one of ``plane`` and ``resected``; see the module notes for every convention. Raises
    :class:`InputError` for a bad label map, an empty liver, a mask of another shape, a resection that
    leaves the whole liver on one side, or an unknown liver state.
    """
    if (plane is None) == (resected is None):
        raise ValueError("give exactly one of plane and resected")
    if liver_state not in FLR_THRESHOLDS_PERCENT:
        raise InputError(f"Unknown liver state '{liver_state}'; choose one of {', '.join(FLR_THRESHOLDS_PERCENT)}.")
    labels = check_labels(labels)
    liver = labels > 0
    liver_index = np.nonzero(liver)
    if plane is not None:
        side = signed_distance(liver_index, geometry, plane) > 0
        resection = {"type": "plane", "point_lps_mm": list(plane.point), "normal_lps": list(plane.normal)}
    else:
        resected = np.asarray(resected)
        if resected.shape != labels.shape:
            raise InputError(f"The resected mask has shape {resected.shape[::-1]} (x, y, z) but the label map "
                             f"{labels.shape[::-1]}. Give a mask on the label map's grid.")
        side = resected[liver_index] != 0
        resection = {"type": "mask"}
    resected_liver = np.zeros(labels.shape, dtype=bool)
    resected_liver[liver_index] = side

    voxel_ml = geometry.voxel_volume_mm3 / 1000.0
    functional = labels[liver_index] == LIVER
    liver_ml = side.size * voxel_ml
    resected_ml = int(np.count_nonzero(side)) * voxel_ml
    _check_cut(resected_ml, liver_ml, plane is not None)
    functional_ml = int(np.count_nonzero(functional)) * voxel_ml
    if functional_ml == 0:
        raise InputError("The label map has no functional liver (label 1): every liver voxel is tumour, so no FLR "
                         "can be computed. Check the segmentation.")
    functional_remnant_ml = int(np.count_nonzero(functional & ~side)) * voxel_ml
    flr = 100.0 * functional_remnant_ml / functional_ml
    threshold = FLR_THRESHOLDS_PERCENT[liver_state]
    tumours = _tumours(labels, geometry, resected_liver, plane, voxel_ml)
    result = {
        "resection": resection,
        "side_rule": "voxel centre: signed distance > 0 (plane) or mask nonzero (mask) is resected",
        "liver_volume_ml": liver_ml,
        "resected_volume_ml": resected_ml,
        "remnant_volume_ml": liver_ml - resected_ml,
        "functional_volume_ml": functional_ml,
        "functional_resected_volume_ml": functional_ml - functional_remnant_ml,
        "functional_remnant_volume_ml": functional_remnant_ml,
        "flr_percent": flr,
        "liver_state": liver_state,
        "threshold_percent": threshold,
        "thresholds_percent": dict(FLR_THRESHOLDS_PERCENT),
        "verdict": "pass" if flr >= threshold else "fail",
        "close_margin_mm": CLOSE_MARGIN_MM,
        "r1_margin_mm": R1_MARGIN_MM,
        "tumour_count": len(tumours),
        "tumours": tumours,
    }
    return ResectionPlan(result, resected_liver)


def check_labels(labels: np.ndarray) -> np.ndarray:
    """The label map as an array, or :class:`InputError` unless it is 3D, holds only 0/1/2 and has liver."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"The label map must be a 3D volume; it has shape {labels.shape}.")
    bad = (labels != 0) & (labels != LIVER) & (labels != TUMOUR)
    if bad.any():
        found = np.unique(labels[bad])
        raise InputError(f"The label map holds values other than 0 (background), 1 (liver) and 2 (tumour): "
                         f"{', '.join(f'{v:g}' for v in found[:8])}{' …' if found.size > 8 else ''}. Give the "
                         "segmentation.nii.gz that 'livertumorseg segment' writes, or relabel the map.")
    if not labels.any():
        raise InputError("The label map has no liver (no voxel labelled 1 or 2). Segment the liver first.")
    return labels


def check_same_grid(mask: Image, labels: Image) -> np.ndarray:
    """The mask's array if it lies on the label map's grid (shape and geometry), else :class:`InputError`."""
    if mask.array.shape != labels.array.shape:
        raise InputError(f"The resected mask has {mask.array.shape[::-1]} voxels (x, y, z) but the label map "
                         f"{labels.array.shape[::-1]}. Give a mask on the label map's grid.")
    a, b = mask.geometry, labels.geometry
    if not (np.allclose(a.spacing, b.spacing, rtol=1e-4, atol=1e-6) and np.allclose(a.origin, b.origin, atol=1e-3)
            and np.allclose(a.direction, b.direction, atol=1e-4)):
        raise InputError("The resected mask has the label map's size but another spacing, origin or direction. "
                         "Resample it onto the label map's grid (e.g. in 3D Slicer, as a labelmap of that volume).")
    return mask.array


def signed_distance(index_zyx, geometry: Geometry, plane: Plane) -> np.ndarray:
    """Signed distance (mm) of voxel centres (z, y, x index arrays) to the plane; > 0 on the resected side.

    The LPS position is affine in the index, so the distance is its value at index 0 plus one step per
    voxel along each array axis, both from :meth:`Geometry.index_to_physical`.
    """
    normal, point = np.asarray(plane.normal), np.asarray(plane.point)
    origin = geometry.index_to_physical(np.zeros(3))
    step = (geometry.index_to_physical(np.eye(3)) - origin) @ normal  # mm per voxel along z, y, x
    return (origin - point) @ normal + sum(s * np.asarray(i, dtype=float) for s, i in zip(step, index_zyx))


def number_tumours(labels: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Tumour voxel indices (z, y, x arrays) and their tumour ids, numbered as :func:`.volumetry.measure` does
    (:func:`.masks.label_lesions`, inside the tumour's bounding box)."""
    tumour = labels == TUMOUR
    box = bounding_box(tumour)
    if box is None:
        return (np.empty(0, int),) * 3, np.empty(0, int)
    lesions, _ = label_lesions(tumour[box])
    local = np.nonzero(lesions)
    return tuple(axis + s.start for axis, s in zip(local, box)), lesions[local].astype(int)


def margin_flag(margin_mm: float, crosses: bool) -> Optional[str]:
    """``crosses``, ``R1 risk`` (< 1 mm), ``close`` (< 10 mm) or None."""
    if crosses:
        return "crosses"
    if margin_mm < R1_MARGIN_MM:
        return "R1 risk"
    return "close" if margin_mm < CLOSE_MARGIN_MM else None


# ---------------------------------------------------------------------------------------------- internals


def _check_cut(resected_ml: float, liver_ml: float, is_plane: bool) -> None:
    """Refuse a resection that leaves the whole liver on one side."""
    if 0 < resected_ml < liver_ml:
        return
    if resected_ml == 0:
        where = "the remnant side (resected volume 0 mL)"
        fix = ("Move the point into the liver, or flip the normal: it must point into the part to resect."
               if is_plane else "Check that the mask marks the part to resect and lies on the label map's grid.")
    else:
        where = "the resected side (remnant volume 0 mL)"
        fix = ("Move the point into the liver, or flip the normal: it points into the part to resect, not the remnant."
               if is_plane else "The mask covers the whole liver; mark only the part to resect.")
    kind = "resection plane" if is_plane else "resected mask"
    raise InputError(f"The {kind} misses the liver: all {liver_ml:.1f} mL of liver lie on {where}. {fix}")


def _tumours(labels, geometry, resected_liver, plane, voxel_ml) -> list[dict]:
    index, ids = number_tumours(labels)
    if ids.size == 0:
        return []
    count = int(ids.max())
    on_resected = resected_liver[index]
    if plane is not None:
        distance = np.abs(signed_distance(index, geometry, plane))
    else:
        distance = _mask_surface_distance(resected_liver, labels > 0, geometry, index, on_resected)
    sizes = np.bincount(ids, minlength=count + 1)[1:]
    resected = np.bincount(ids, weights=on_resected, minlength=count + 1)[1:].astype(int)
    margins = ndimage.minimum(distance, labels=ids, index=np.arange(1, count + 1))
    centroids = np.stack([np.bincount(ids, weights=axis, minlength=count + 1)[1:] / sizes for axis in index], axis=1)
    centroids_lps = geometry.index_to_physical(centroids)
    rows = []
    for i in range(count):
        crosses = 0 < resected[i] < sizes[i]
        margin = 0.0 if crosses else float(margins[i])
        rows.append({
            "id": i + 1,
            "volume_ml": int(sizes[i]) * voxel_ml,
            "resected_volume_ml": int(resected[i]) * voxel_ml,
            "resected": "partly" if crosses else ("fully" if resected[i] else "not"),
            "margin_mm": margin,
            "margin_flag": margin_flag(margin, crosses),
            "centroid_lps_mm": [float(v) for v in centroids_lps[i]],
        })
    return rows


def _mask_surface_distance(resected_liver, liver, geometry, index, on_resected) -> np.ndarray:
    """Distance (mm) from tumour voxel centres to the interface between resected and remnant liver voxels.

    The Euclidean distance transform runs on the grid axes with ``sampling`` = the voxel spacing, inside
    the liver's bounding box (every liver voxel lies in it). Distances along the grid axes are physical
    distances only when the direction matrix is orthonormal (a rotation, possibly with a reflection), so
    a sheared grid is refused; a plane resection works in physical coordinates and has no such limit.
    """
    direction = geometry.direction_matrix
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputError("The label map's grid is sheared (its direction matrix is not orthonormal), so distances "
                         "to a mask cannot be measured on it. Resample it to an orthogonal grid, or give a plane.")
    box = bounding_box(liver)
    liver, resected = liver[box], resected_liver[box]
    spacing = np.asarray(geometry.spacing[::-1], dtype=float)[:, None]  # (z, y, x)
    local = np.stack([axis - s.start for axis, s in zip(index, box)])
    distance = np.empty(local.shape[1])
    for inside, across in ((True, liver & ~resected), (False, resected)):
        where = on_resected == inside
        if where.any():
            nearest = ndimage.distance_transform_edt(~across, sampling=spacing.ravel(), return_distances=False,
                                                     return_indices=True)
            points = local[:, where]
            step = np.abs(nearest[(slice(None), *points)] - points) * spacing
            distance[where] = np.linalg.norm(np.maximum(step - spacing / 2, 0.0), axis=0)
    return distance
