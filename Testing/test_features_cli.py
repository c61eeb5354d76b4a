"""`livertumorseg features IMAGE MASK`: the radiomics filter's features of a region as JSON.

A synthetic CT (an intensity ramp) holds two voxelised spheres, labels 1 and 2, written with SimpleITK;
the values whose exact answer is known are checked: the voxel volume, the first-order statistics of the
ramp inside the region, and the catalogue's names and order.
"""

import json

import numpy as np
import pytest

from LiverTumorSegLib.cli import main
from LiverTumorSegLib.image_io import Geometry, Image, write_image
from LiverTumorSegLib.radiomics_catalogue import FEATURE_NAMES

SPACING = (0.75, 0.625, 1.5)  # x, y, z in mm; exact in the float32 of a NIfTI header


def _sphere(shape, centre_zyx, radius_mm):
    z, y, x = np.indices(shape)
    dz, dy, dx = ((z - centre_zyx[0]) * SPACING[2], (y - centre_zyx[1]) * SPACING[1], (x - centre_zyx[2]) * SPACING[0])
    return dz**2 + dy**2 + dx**2 <= radius_mm**2


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    shape = (24, 40, 40)
    geometry = Geometry(SPACING, (-10.0, 20.0, 30.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    z, y, x = np.indices(shape)
    ct = (3 * z + 2 * y + x - 40).astype(np.int16)  # a ramp in HU: every voxel value is known
    labels = np.zeros(shape, np.uint8)
    labels[_sphere(shape, (12, 14, 14), 7.0)] = 1
    labels[_sphere(shape, (12, 28, 28), 4.0)] = 2
    image, mask = folder / "ct.nii.gz", folder / "labels.nii.gz"
    write_image(Image(ct, geometry), image)
    write_image(Image(labels, geometry), mask)
    return image, mask, ct, labels


def _features(capsys, *args):
    code = main([str(a) for a in ("features", *args)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured


def test_named_features_have_their_exact_values(case, capsys):
    image, mask, ct, labels = case
    names = ["original_shape_VoxelVolume", "original_firstorder_Mean", "original_firstorder_Minimum",
             "original_firstorder_Maximum", "original_firstorder_Range"]
    code, captured = _features(capsys, image, mask, "--label", 2, "--only", ",".join(names))
    assert code == 0, captured.err
    result = json.loads(captured.out)
    region = labels == 2
    assert result["label"] == 2 and result["voxels"] == int(region.sum())
    assert list(result["features"]) == names
    values = ct[region].astype(float)
    assert result["features"]["original_shape_VoxelVolume"] == pytest.approx(region.sum() * np.prod(SPACING), rel=1e-9)
    assert result["features"]["original_firstorder_Mean"] == pytest.approx(values.mean(), rel=1e-9)
    assert result["features"]["original_firstorder_Minimum"] == values.min()
    assert result["features"]["original_firstorder_Maximum"] == values.max()
    assert result["features"]["original_firstorder_Range"] == values.max() - values.min()
    assert result["extraction_time_s"] >= 0


def test_without_label_the_region_is_every_nonzero_voxel(case, capsys):
    image, mask, _, labels = case
    code, captured = _features(capsys, image, mask, "--only", "original_shape_VoxelVolume")
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["voxels"] == int((labels > 0).sum())
    assert result["features"]["original_shape_VoxelVolume"] == pytest.approx((labels > 0).sum() * np.prod(SPACING), rel=1e-9)


def test_whole_catalogue_in_its_order(case, capsys):
    image, mask, _, labels = case
    code, captured = _features(capsys, image, mask, "--label", 1)
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert list(result["features"]) == FEATURE_NAMES and len(FEATURE_NAMES) == 728
    assert result["features"]["original_shape_VoxelVolume"] == pytest.approx((labels == 1).sum() * np.prod(SPACING), rel=1e-9)


def test_list_prints_the_catalogue(capsys):
    code, captured = _features(capsys, "--list")
    assert code == 0 and captured.out.split() == FEATURE_NAMES


def test_unknown_feature_names_are_a_usage_error_that_says_how_to_see_the_names(case, capsys):
    image, mask, _, _ = case
    code, captured = _features(capsys, image, mask, "--only", "original_shape_VoxelVolume,Volume")
    assert code == 64
    assert "Unknown feature name(s): Volume" in captured.err and "livertumorseg features --list" in captured.err
    assert captured.out == ""


def test_bad_masks_are_refused_as_bad_input(case, tmp_path, capsys):
    image, mask, ct, labels = case
    code, captured = _features(capsys, image, mask, "--label", 3)
    assert code == 2 and "no voxel with label 3" in captured.err
    shifted = write_image(Image(labels, Geometry(SPACING, (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))),
                          tmp_path / "shifted.nii.gz")
    code, captured = _features(capsys, image, shifted)
    assert code == 2 and "does not lie on the grid" in captured.err
    code, captured = _features(capsys, image)
    assert code == 64 and "needs IMAGE and MASK" in captured.err
