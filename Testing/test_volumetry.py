"""Volumetry on hand-made label maps with known volumes, diameters, HU and positions."""

import csv
import json
import math

import numpy as np
import pytest

from LiverTumorSegLib.errors import OutputError
from LiverTumorSegLib.image_io import Geometry
from LiverTumorSegLib.volumetry import CSV_COLUMNS, axial_plane, longest_axial_diameter, measure, write_volumetry

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def grid_mm(shape, spacing_xyz):
    """Physical coordinates (mm) of the voxel centres along z, y, x, relative to the array centre."""
    sx, sy, sz = spacing_xyz
    z, y, x = np.indices(shape, dtype=float)
    return ((z - (shape[0] - 1) / 2) * sz, (y - (shape[1] - 1) / 2) * sy, (x - (shape[2] - 1) / 2) * sx)


def sphere_case(radius=10.0, spacing=(0.8, 0.8, 1.5), shape=(24, 40, 40)):
    z, y, x = grid_mm(shape, spacing)
    labels = np.ones(shape, np.uint8)  # the whole array is liver
    labels[z ** 2 + y ** 2 + x ** 2 <= radius ** 2] = 2
    return labels, Geometry(spacing, (0.0, 0.0, 0.0), IDENTITY)


def test_sphere_volume_diameters_and_burden():
    labels, geometry = sphere_case()
    hu = np.zeros(labels.shape, np.int16)
    result = measure(labels, hu, geometry)
    truth_ml = 4.0 / 3.0 * math.pi * 10.0 ** 3 / 1000.0
    voxel_ml = 0.8 * 0.8 * 1.5 / 1000.0
    assert result["lesion_count"] == 1
    lesion = result["lesions"][0]
    assert lesion["id"] == 1
    assert lesion["volume_ml"] == pytest.approx(truth_ml, rel=0.03)
    assert lesion["equivalent_diameter_mm"] == pytest.approx(20.0, rel=0.01)
    # A digital disc reaches half a pixel beyond the true circle; along a diagonal half a pixel diagonal.
    assert 0.0 <= lesion["longest_axial_diameter_mm"] - 20.0 <= 0.8 * math.sqrt(2)
    assert result["liver_volume_ml"] == pytest.approx(labels.size * voxel_ml)  # liver includes the tumour
    assert result["tumour_volume_ml"] == pytest.approx(lesion["volume_ml"])
    assert result["tumour_burden_percent"] == pytest.approx(100.0 * lesion["volume_ml"] / result["liver_volume_ml"])
    assert lesion["probability"] is None
    json.dumps(result, allow_nan=False)


@pytest.mark.parametrize("spacing_yx, semi_axes_mm, truth_mm", [
    ((0.5, 1.5), (20.0, 12.0), 40.0),  # long axis along the finely sampled rows
    ((0.5, 1.5), (9.0, 21.0), 42.0),   # long axis along the coarse columns
])
def test_longest_axial_diameter_of_ellipse_with_anisotropic_pixels(spacing_yx, semi_axes_mm, truth_mm):
    sy, sx = spacing_yx
    ay, ax = semi_axes_mm
    y, x = np.indices((120, 60), dtype=float)
    ellipse = ((y - 59.5) * sy / ay) ** 2 + ((x - 29.5) * sx / ax) ** 2 <= 1.0
    smaller = ((y - 59.5) * sy / (0.6 * ay)) ** 2 + ((x - 29.5) * sx / (0.6 * ax)) ** 2 <= 1.0
    mask = np.stack([np.zeros_like(ellipse), smaller, ellipse, smaller])  # the widest slice decides
    assert abs(longest_axial_diameter(mask, spacing_yx) - truth_mm) <= max(sy, sx)


def test_longest_axial_diameter_of_rectangle_exact_to_a_pixel():
    mask = np.zeros((1, 30, 30), bool)
    mask[0, 5:25, 3:13] = True  # 20 rows x 10 columns
    spacing = (0.7, 2.0)
    truth = math.hypot(20 * 0.7, 10 * 2.0)  # edge-to-edge diagonal
    assert abs(longest_axial_diameter(mask, spacing) - truth) <= 2.0


def two_lesions():
    shape = (10, 30, 30)
    labels = np.zeros(shape, np.uint8)
    labels[1:9, 2:28, 2:28] = 1
    labels[2:4, 5:8, 5:8] = 2  # small: 2 x 3 x 3 = 18 voxels, slices 2-3
    labels[4:8, 15:20, 15:20] = 2  # large: 4 x 5 x 5 = 100 voxels, slices 4-7
    hu = np.full(shape, 100, np.int16)
    hu[4:8, 15:20, 15:20] = np.where(np.indices((4, 5, 5)).sum(axis=0) % 2 == 0, 30, 50)
    hu[2:4, 5:8, 5:8] = -10
    return labels, hu


def test_two_lesions_counted_sorted_with_hu_and_probability():
    labels, hu = two_lesions()
    geometry = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), IDENTITY)
    probability = np.zeros(labels.shape, np.float32)
    probability[labels == 2] = np.where(hu[labels == 2] == -10, 0.61, 0.93)  # each lesion's classifier value
    result = measure(labels, hu, geometry, probability_map=probability)
    assert result["lesion_count"] == 2
    large, small = result["lesions"]
    assert (large["id"], small["id"]) == (1, 2)
    assert large["volume_ml"] == pytest.approx(100 * 2.0 / 1000)
    assert small["volume_ml"] == pytest.approx(18 * 2.0 / 1000)
    assert large["slice_range"] == [4, 7] and small["slice_range"] == [2, 3]
    values = hu[4:8, 15:20, 15:20].astype(float)
    assert large["mean_hu"] == pytest.approx(values.mean()) and large["std_hu"] == pytest.approx(values.std())
    assert large["std_hu"] == pytest.approx(10.0)  # 50 voxels of 30 HU and 50 of 50 HU: population std
    assert small["mean_hu"] == pytest.approx(-10.0) and small["std_hu"] == pytest.approx(0.0)
    assert large["centroid_voxel_zyx"] == pytest.approx([5.5, 17.0, 17.0])
    assert (large["probability"], small["probability"]) == pytest.approx((0.93, 0.61))
    liver_voxels = 8 * 26 * 26
    assert result["liver_volume_ml"] == pytest.approx(liver_voxels * 2.0 / 1000)
    assert result["tumour_burden_percent"] == pytest.approx(100.0 * 118 / liver_voxels)


def test_diagonal_touch_is_one_lesion():
    labels = np.zeros((4, 6, 6), np.uint8)
    labels[1, 1, 1] = labels[2, 2, 2] = 2  # corner-to-corner across slices: 26-connected
    result = measure(labels, np.zeros(labels.shape), Geometry((1.0, 1.0, 1.0), (0, 0, 0), IDENTITY))
    assert result["lesion_count"] == 1


def test_centroid_with_flipped_direction():
    labels, hu = two_lesions()
    spacing, origin = (0.7, 0.8, 2.5), (100.0, 50.0, -20.0)
    flipped = Geometry(spacing, origin, (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    lesion = measure(labels, hu, flipped)["lesions"][0]
    z, y, x = 5.5, 17.0, 17.0
    assert lesion["centroid_lps_mm"] == pytest.approx([100.0 - x * 0.7, 50.0 - y * 0.8, -20.0 + z * 2.5])


def test_axial_plane_of_a_coronal_acquisition():
    # Voxel axes: i -> L, j -> S, k -> P: the array's axis 1 (y) is the cranio-caudal one.
    coronal = Geometry((0.6, 3.0, 0.9), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0))
    assert axial_plane(coronal) == (1, (0, 2), (0.9, 0.6))
    labels = np.zeros((40, 5, 40), np.uint8)
    labels[5:35, 1:4, 10:20] = 2  # 30 x 10 voxels in the axial (z, x) plane
    lesion = measure(labels, np.zeros(labels.shape), coronal)["lesions"][0]
    assert abs(lesion["longest_axial_diameter_mm"] - math.hypot(30 * 0.9, 10 * 0.6)) <= 0.9


def test_empty_and_invalid_label_maps():
    geometry = Geometry((1.0, 1.0, 1.0), (0, 0, 0), IDENTITY)
    empty = measure(np.zeros((3, 4, 4), np.uint8), np.zeros((3, 4, 4)), geometry)
    assert empty == {"liver_volume_ml": 0.0, "tumour_volume_ml": 0.0, "tumour_burden_percent": 0.0,
                     "lesion_count": 0, "lesions": []}
    with pytest.raises(ValueError, match="0 \\(background\\)"):
        measure(np.full((3, 4, 4), 3, np.uint8), np.zeros((3, 4, 4)), geometry)
    with pytest.raises(ValueError, match="same shape"):
        measure(np.zeros((3, 4, 4), np.uint8), np.zeros((3, 4, 5)), geometry)


def test_write_volumetry_json_csv_and_refuse_overwrite(tmp_path):
    labels, hu = two_lesions()
    probability = np.zeros(labels.shape, np.float32)
    probability[4:8, 15:20, 15:20] = 0.9  # the larger lesion only; the other has no classifier value
    result = measure(labels, hu, Geometry((1.0, 1.0, 2.0), (0, 0, 0), IDENTITY), probability_map=probability)
    json_path, csv_path = tmp_path / "out" / "volumetry.json", tmp_path / "out" / "volumetry.csv"
    assert write_volumetry(result, json_path, csv_path, overwrite=False) == [json_path, csv_path]
    assert json.loads(json_path.read_text(encoding="utf-8")) == result
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert [r["structure"] for r in rows] == ["liver", "tumour", "lesion", "lesion"]
    assert float(rows[0]["volume_ml"]) == pytest.approx(result["liver_volume_ml"])
    assert float(rows[0]["percent_of_liver"]) == pytest.approx(100.0)
    assert float(rows[1]["percent_of_liver"]) == pytest.approx(result["tumour_burden_percent"])
    assert rows[2]["id"] == "1" and float(rows[2]["volume_ml"]) == pytest.approx(result["lesions"][0]["volume_ml"])
    assert float(rows[2]["probability"]) == pytest.approx(0.9) and rows[3]["probability"] == ""
    assert int(rows[3]["first_slice"]) == 2 and int(rows[3]["last_slice"]) == 3

    before = (json_path.read_text(encoding="utf-8"), csv_path.read_text(encoding="utf-8"))
    with pytest.raises(OutputError, match="already exist"):
        write_volumetry({**result, "lesion_count": 99}, json_path, tmp_path / "out" / "other.csv", overwrite=False)
    assert not (tmp_path / "out" / "other.csv").exists()
    assert (json_path.read_text(encoding="utf-8"), csv_path.read_text(encoding="utf-8")) == before
    write_volumetry({**result, "lesions": []}, json_path, csv_path, overwrite=True)
    assert json.loads(json_path.read_text(encoding="utf-8"))["lesions"] == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["volumetry.csv", "volumetry.json"]
