"""Bounding boxes and the one lesion numbering: the ids of volumetry, the per-lesion segments of the
``.seg.nrrd`` (written by the engine, read back with SimpleITK) and surgical planning agree voxel by voxel."""

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.image_io import Geometry, Image
from LiverTumorSegLib.masks import bounding_box, grow_box, label_lesions
from LiverTumorSegLib.resection import number_tumours
from LiverTumorSegLib.volumetry import measure

GEOMETRY = Geometry(spacing=(0.8, 0.7, 2.5), origin=(12.5, -40.0, 101.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


def _labels() -> tuple[np.ndarray, np.ndarray]:
    """A liver with four lesions whose array order differs from their size order; and the expected ids."""
    labels = np.ones((8, 16, 16), np.uint8)
    expected = np.zeros(labels.shape, np.uint8)
    lesions = {
        4: [(0, 0, 0)],  # first voxel of the array, but the smallest lesion
        2: [(1, 2, 2), (2, 3, 3)],  # two voxels touching only at a corner: one lesion; earlier of the two ties
        3: [(1, 10, 10), (1, 10, 11)],  # two voxels, later in array order
        1: [(z, y, x) for z in range(4, 7) for y in range(5, 8) for x in range(5, 8)],  # 27 voxels, last in order
    }
    for lesion, voxels in lesions.items():
        for voxel in voxels:
            labels[voxel] = 2
            expected[voxel] = lesion
    return labels, expected


def test_bounding_box_and_grown_box():
    mask = np.zeros((5, 6, 7), bool)
    assert bounding_box(mask) is None
    mask[1, 2, 3] = mask[3, 4, 3] = True
    box = bounding_box(mask)
    assert box == (slice(1, 4), slice(2, 5), slice(3, 4))
    assert grow_box(box, 2, mask.shape) == (slice(0, 5), slice(0, 6), slice(1, 6))
    assert grow_box(box, (0, 1, 5), mask.shape) == (slice(1, 4), slice(1, 6), slice(0, 7))


def test_lesion_ids_by_size_then_array_order():
    labels, expected = _labels()
    lesions, count = label_lesions(labels == 2)
    assert count == 4 and lesions.dtype == np.uint8
    np.testing.assert_array_equal(lesions, expected)
    empty, none = label_lesions(np.zeros((3, 3, 3), bool))
    assert none == 0 and not empty.any()


def test_volumetry_and_resection_number_lesions_alike():
    labels, expected = _labels()
    volumetry = measure(labels, np.zeros(labels.shape, np.int16), GEOMETRY)
    voxel_ml = GEOMETRY.voxel_volume_mm3 / 1000.0
    assert [lesion["id"] for lesion in volumetry["lesions"]] == [1, 2, 3, 4]
    for lesion in volumetry["lesions"]:
        voxels = np.argwhere(expected == lesion["id"])
        assert lesion["volume_ml"] == pytest.approx(len(voxels) * voxel_ml)
        assert lesion["centroid_voxel_zyx"] == pytest.approx(voxels.mean(axis=0).tolist())
    index, ids = number_tumours(labels)
    numbered = np.zeros(labels.shape, np.uint8)
    numbered[index] = ids
    np.testing.assert_array_equal(numbered, expected)


def test_per_lesion_segments_carry_the_volumetry_ids(tmp_path):
    from LiverTumorSegLib.seg_nrrd import write_segmentation

    labels, expected = _labels()
    path = write_segmentation(Image(labels, GEOMETRY), tmp_path / "lesions.seg.nrrd", per_lesion=True)
    image = sitk.ReadImage(str(path))
    voxels = sitk.GetArrayFromImage(image)
    names = {}
    for key in image.GetMetaDataKeys():
        if key.startswith("Segment") and key.endswith("_Name"):
            segment = key[: -len("_Name")]
            names[image.GetMetaData(key)] = int(image.GetMetaData(f"{segment}_LabelValue"))
    assert sorted(names) == ["Liver", "Liver tumor 1", "Liver tumor 2", "Liver tumor 3", "Liver tumor 4"]
    for lesion in range(1, 5):
        np.testing.assert_array_equal(voxels == names[f"Liver tumor {lesion}"], expected == lesion)
