"""Volumetry stage: liver volume, lesions and tumour burden from a label map on the input (original) grid.

Conventions (what a surgical planner reads):

* **Liver volume** is the whole organ, liver parenchyma *plus* tumour (labels 1 and 2), as clinicians
  report it for resection planning and as the LiTS tumour-burden definition uses it.
* **Tumour burden** = tumour volume / liver volume × 100 (0 when there is no liver).
* **Lesions** are the 26-connected components of label 2 (a lesion touching itself only diagonally,
  e.g. across thick slices, stays one lesion), sorted by decreasing volume (ties: first voxel in
  array order first), ids 1..n: :func:`.masks.label_lesions`, the numbering every stage uses.
* Volumes count voxels × voxel volume (mL = cm³). The equivalent diameter is that of the sphere with
  the lesion's volume.
* **Longest axial diameter**: the largest in-plane Feret (caliper) diameter over the lesion's axial
  slices, in mm, as RECIST measures it. The axial plane is the voxel plane nearest to the patient's
  axial plane (the voxel axis closest to superior–inferior is the slice axis), so sagittal or coronal
  acquisitions are measured in the right plane without resampling. Each slice's diameter is
  :attr:`skimage.measure.regionprops` ``feret_diameter_max`` with the in-plane ``spacing``
  (anisotropic pixels handled by scaling the convex-hull contour to millimetres); it measures between
  the half-level contour points, i.e. about edge to edge of the pixels (a 1-pixel lesion is 1 pixel
  wide). All parts of the lesion in a slice are measured together.
* **Mean and standard deviation of HU** over the lesion voxels; the standard deviation is the
  population one (ddof = 0), as pyradiomics' first-order features compute it.
* **Centroid**: the mean voxel index (``centroid_voxel_zyx``, continuous) mapped to LPS millimetres by
  the image geometry (oblique directions included). ``slice_range`` is ``[first, last]`` along array
  axis 0 (z), both inclusive.

Labelling and statistics run inside the bounding box of the tumour and of each lesion
(:func:`scipy.ndimage.find_objects`), so a 512×512×600 CT with a few lesions costs little more than a
few passes over the label map.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from skimage.measure import regionprops

from .errors import OutputError
from .image_io import Geometry, atomic_path
from .masks import bounding_box, label_lesions

LIVER, TUMOUR = 1, 2

#: Columns of the CSV table, in order.
CSV_COLUMNS = (
    "structure", "id", "volume_ml", "percent_of_liver", "equivalent_diameter_mm", "longest_axial_diameter_mm",
    "mean_hu", "std_hu", "centroid_x_lps_mm", "centroid_y_lps_mm", "centroid_z_lps_mm", "first_slice",
    "last_slice", "probability",
)


def measure(
    labels: np.ndarray,
    image_hu: np.ndarray,
    geometry: Geometry,
    probability_map: Optional[np.ndarray] = None,
) -> dict:
    """Volumetry of a 0/1/2 label map (z, y, x) with its CT in HU on the same grid; see the module notes.

    ``probability_map`` (same grid, optional) holds the lesion classifier's probability on each kept
    candidate's voxels; a lesion's probability is the largest value inside it (``None`` where it is 0).
    """
    labels = np.asarray(labels)
    image_hu = np.asarray(image_hu)
    if labels.ndim != 3 or labels.shape != image_hu.shape:
        raise ValueError(f"labels {labels.shape} and image {image_hu.shape} must be 3D arrays of the same shape")
    if labels.size and (labels.min() < 0 or labels.max() > TUMOUR):
        raise ValueError(f"labels must be 0 (background), 1 (liver) or 2 (tumour); found {np.unique(labels)}")
    voxel_ml = geometry.voxel_volume_mm3 / 1000.0

    liver_voxels = int(np.count_nonzero(labels))  # liver including tumour: the whole organ
    tumour = labels == TUMOUR
    tumour_voxels = int(np.count_nonzero(tumour))
    liver_ml = liver_voxels * voxel_ml
    tumour_ml = tumour_voxels * voxel_ml
    result = {
        "liver_volume_ml": liver_ml,
        "tumour_volume_ml": tumour_ml,
        "tumour_burden_percent": 100.0 * tumour_ml / liver_ml if liver_ml > 0 else 0.0,
        "lesion_count": 0,
        "lesions": [],
    }
    box = bounding_box(tumour)
    if box is None:
        return result

    offset = np.array([s.start for s in box], dtype=float)
    lesion_labels, count = label_lesions(tumour[box])
    del tumour
    # Per-lesion sums over the lesion voxels only (np.bincount by lesion id): sizes, two-pass mean and
    # variance, and mean index. ndimage.mean & co. would also average the (empty) background label of
    # a box filled by one lesion and warn about 0/0.
    zyx = np.nonzero(lesion_labels)
    ids = lesion_labels[zyx]
    hu = image_hu[box][zyx].astype(np.float64)
    sizes = np.bincount(ids, minlength=count + 1)[1:]
    means = np.bincount(ids, weights=hu, minlength=count + 1)[1:] / sizes
    stds = np.sqrt(np.bincount(ids, weights=(hu - means[ids - 1]) ** 2, minlength=count + 1)[1:] / sizes)
    centroids = np.stack([np.bincount(ids, weights=axis, minlength=count + 1)[1:] / sizes for axis in zyx], axis=1)
    centroids += offset
    centroids_lps = geometry.index_to_physical(centroids)
    del zyx, ids, hu
    objects = ndimage.find_objects(lesion_labels)

    axial_axis, in_plane_axes, in_plane_spacing = axial_plane(geometry)
    lesions = []
    for i, sub in enumerate(objects):  # ids are already by decreasing volume
        mask = lesion_labels[sub] == i + 1
        volume_ml = int(sizes[i]) * voxel_ml
        lesions.append({
            "id": i + 1,
            "volume_ml": volume_ml,
            "equivalent_diameter_mm": (6.0 * volume_ml * 1000.0 / math.pi) ** (1.0 / 3.0),
            "longest_axial_diameter_mm": longest_axial_diameter(
                np.transpose(mask, (axial_axis, *in_plane_axes)), in_plane_spacing),
            "mean_hu": float(means[i]),
            "std_hu": float(stds[i]),
            "centroid_lps_mm": [float(v) for v in centroids_lps[i]],
            "centroid_voxel_zyx": [float(v) for v in centroids[i]],
            "slice_range": [int(sub[0].start + offset[0]), int(sub[0].stop - 1 + offset[0])],
            "probability": _lesion_probability(probability_map, box, sub, mask),
        })
    result["lesion_count"] = count
    result["lesions"] = lesions
    return result


def axial_plane(geometry: Geometry) -> tuple[int, tuple[int, int], tuple[float, float]]:
    """(slice axis, in-plane array axes, their spacings in mm) for the voxel plane nearest to axial.

    Uses the same nearest-axis rule as SimpleITK's DICOM orientation code, so it agrees with the
    canonical reorientation in :mod:`.image_io`.
    """
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(geometry.direction)
    voxel_axis = next(i for i, letter in enumerate(code) if letter in "SI")  # 0 = x, 1 = y, 2 = z
    axial = 2 - voxel_axis  # array axes are (z, y, x)
    in_plane = tuple(a for a in range(3) if a != axial)
    spacing = tuple(float(geometry.spacing[2 - a]) for a in in_plane)
    return axial, in_plane, spacing


def longest_axial_diameter(mask: np.ndarray, spacing: tuple[float, float]) -> float:
    """Largest in-plane Feret diameter (mm) over the slices (axis 0) of a boolean mask.

    A slice's Feret diameter cannot exceed the diagonal of its bounding box (edge to edge), so slices are
    visited from the widest box down and the search stops when no remaining slice can beat the best.
    """
    mask = np.asarray(mask, dtype=bool)
    rows = mask.any(axis=2)  # (slice, row)
    cols = mask.any(axis=1)  # (slice, column)
    present = rows.any(axis=1)
    extent_rows = _extent(rows) * spacing[0]
    extent_cols = _extent(cols) * spacing[1]
    bound = np.where(present, np.hypot(extent_rows, extent_cols), -1.0)
    best = 0.0
    for k in np.argsort(-bound, kind="stable"):
        if bound[k] <= best:
            break
        region = regionprops(mask[k].astype(np.uint8), spacing=spacing)[0]
        best = max(best, float(region.feret_diameter_max))
    return best


def write_volumetry(
    volumetry: dict,
    json_path: str | os.PathLike,
    csv_path: str | os.PathLike,
    overwrite: bool = False,
) -> list[Path]:
    """Write the volumetry as JSON (the dict as is) and CSV; atomic, nothing written if either exists.

    CSV: one row per structure. ``structure`` is ``liver`` (the whole organ incl. tumour; volume and
    percent_of_liver = 100), ``tumour`` (all lesions together; its percent_of_liver is the tumour burden)
    and ``lesion`` (one row per lesion with its id). Columns: :data:`CSV_COLUMNS`; centroids in LPS mm;
    empty cells where a value does not apply. Numbers are written with full precision.
    """
    json_path, csv_path = Path(json_path), Path(csv_path)
    if not overwrite:
        existing = [str(p) for p in (json_path, csv_path) if p.exists()]
        if existing:
            raise OutputError(f"{', '.join(repr(p) for p in existing)} already exist(s). Choose another output, "
                              "or pass --overwrite to replace.")
    json_text = json.dumps(volumetry, indent=2, allow_nan=False) + "\n"
    csv_text = volumetry_csv(volumetry)
    with atomic_path(json_path, overwrite=overwrite) as tmp_json, atomic_path(csv_path, overwrite=overwrite) as tmp_csv:
        tmp_json.write_text(json_text, encoding="utf-8")
        tmp_csv.write_text(csv_text, encoding="utf-8", newline="")
    return [json_path, csv_path]


def volumetry_csv(volumetry: dict) -> str:
    """The CSV text of :func:`write_volumetry`."""
    liver_ml = volumetry["liver_volume_ml"]
    percent = (lambda ml: 100.0 * ml / liver_ml if liver_ml > 0 else 0.0)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerow({"structure": "liver", "volume_ml": liver_ml, "percent_of_liver": percent(liver_ml)})
    writer.writerow({"structure": "tumour", "volume_ml": volumetry["tumour_volume_ml"],
                     "percent_of_liver": volumetry["tumour_burden_percent"]})
    for lesion in volumetry["lesions"]:
        x, y, z = lesion["centroid_lps_mm"]
        writer.writerow({
            "structure": "lesion", "id": lesion["id"], "volume_ml": lesion["volume_ml"],
            "percent_of_liver": percent(lesion["volume_ml"]),
            "equivalent_diameter_mm": lesion["equivalent_diameter_mm"],
            "longest_axial_diameter_mm": lesion["longest_axial_diameter_mm"],
            "mean_hu": lesion["mean_hu"], "std_hu": lesion["std_hu"],
            "centroid_x_lps_mm": x, "centroid_y_lps_mm": y, "centroid_z_lps_mm": z,
            "first_slice": lesion["slice_range"][0], "last_slice": lesion["slice_range"][1],
            "probability": "" if lesion["probability"] is None else lesion["probability"],
        })
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- internals


def _extent(any_along: np.ndarray) -> np.ndarray:
    """Number of pixels from the first to the last True of each row (0 where none)."""
    n = any_along.shape[1]
    first = np.argmax(any_along, axis=1)
    last = n - 1 - np.argmax(any_along[:, ::-1], axis=1)
    return np.where(any_along.any(axis=1), last - first + 1, 0).astype(float)


def _lesion_probability(probability_map, box, sub, mask) -> Optional[float]:
    if probability_map is None:
        return None
    values = probability_map[box][sub][mask]
    best = float(values.max()) if values.size else 0.0
    return best if best > 0 else None
