"""Preprocessing: in-plane resampling against analytic images and against SimpleITK's 3D resampling.

The networks' input used to be resampled with SimpleITK's 3D B-spline; the in-plane resampling must give
the same values. Tolerances (float32 arithmetic, and weights below 1e-7 dropped from the B-spline matrix):
B-spline 0.01 HU and linear 0.001 HU on CT values of up to ±1000 HU (a few float32 steps), nearest
neighbour exact.
"""

import numpy as np
import pytest

from LiverTumorSegLib.image_io import Geometry, Image
from LiverTumorSegLib.preprocess import (InputContract, body_crop, crop_padded, labels_to_grid, prepare_volume,
                                         processing_grid, resample, resample_in_plane, window_to_uint8)

BSPLINE_TOLERANCE_HU = 0.01
LINEAR_TOLERANCE = 1e-3
#: An in-plane rotation of 20° about z: the grids share an oblique direction, not the identity.
ANGLE = np.deg2rad(20.0)
OBLIQUE = (np.cos(ANGLE), -np.sin(ANGLE), 0.0, np.sin(ANGLE), np.cos(ANGLE), 0.0, 0.0, 0.0, 1.0)


def _ct(rng, shape=(6, 70, 90), spacing=(0.78, 0.74, 2.5), direction=OBLIQUE) -> Image:
    """A smooth body-like ellipse (40 HU) in air (−1000 HU) with noise, up to the image's edges."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((y - shape[1] / 2) / (0.4 * shape[1])) ** 2 + ((x - shape[2] / 2) / (0.45 * shape[2])) ** 2 < 1
    ct = np.where(body, 40.0, -1000.0) + 30.0 * np.sin(x / 3.0 + y / 5.0 + z) + rng.normal(0, 20, shape)
    return Image(ct.astype(np.int16), Geometry(spacing, (-30.0, 12.5, 100.0), direction))


def test_bspline_matches_simpleitk_3d(rng):
    image = _ct(rng)
    grid, shape = processing_grid(image.geometry, image.array.shape, 1.0)
    today = resample(image.with_array(image.array.astype(np.float32)), grid, shape, order=3, fill=-1000.0).array
    in_plane = resample_in_plane(image.array, image.geometry, grid, shape, order=3, fill=-1000.0)
    assert in_plane.shape == shape == (6, 52, 70)
    assert np.abs(in_plane - today).max() < BSPLINE_TOLERANCE_HU


@pytest.mark.parametrize("spacing", [0.6, 1.7], ids=["down", "up"])
def test_linear_and_nearest_match_simpleitk_3d(rng, spacing):
    """Both directions (finer → 1 mm and coarser → 1 mm), samples past the source's edge filled."""
    image = _ct(rng, spacing=(spacing, spacing, 3.0))
    grid, shape = processing_grid(image.geometry, image.array.shape, 1.0)
    grid = Geometry(grid.spacing, tuple(np.asarray(grid.origin) + np.array([3.0, -2.0, 0.0])), grid.direction)
    values = image.array.astype(np.float32)
    linear = resample_in_plane(values, image.geometry, grid, shape, order=1, fill=-7.0)
    today = resample(image.with_array(values), grid, shape, order=1, fill=-7.0).array
    assert np.abs(linear - today).max() < LINEAR_TOLERANCE
    assert (linear == -7.0).any()  # the shifted grid reaches past the source
    labels = (image.array > 0).astype(np.uint8) + (image.array > 60)
    nearest = resample_in_plane(labels, image.geometry, grid, shape, order=0, fill=0)
    assert nearest.dtype == np.uint8
    assert np.array_equal(nearest, resample(image.with_array(labels), grid, shape, order=0, fill=0).array)


def test_a_linear_ramp_is_resampled_exactly():
    """Linear interpolation reproduces a linear function; the cubic B-spline too, away from the mirrored edges."""
    geometry = Geometry((0.7, 0.8, 2.0), (5.0, -3.0, 0.0), OBLIQUE)
    shape = (3, 80, 100)
    grid, grid_shape = processing_grid(geometry, shape, 1.0)
    zyx = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    ramp = lambda points: 2.0 * points[..., 0] - 3.0 * points[..., 1] + 0.5 * points[..., 2]  # noqa: E731
    values = ramp(geometry.index_to_physical(zyx)).astype(np.float32)
    target_zyx = np.stack(np.meshgrid(*(np.arange(n) for n in grid_shape), indexing="ij"), axis=-1)
    expected = ramp(grid.index_to_physical(target_zyx))
    # Where each target sample falls in the source, to leave out the half-voxel border (edge repeated).
    source_index = (grid.index_to_physical(target_zyx) - geometry.origin) @ geometry.direction_matrix / geometry.spacing
    within = np.all((source_index[..., :2] >= 0) & (source_index[..., :2] <= np.array(shape[:0:-1]) - 1), axis=-1)
    linear = resample_in_plane(values, geometry, grid, grid_shape, order=1, fill=0.0)
    assert within.mean() > 0.9 and np.abs(linear - expected)[within].max() < 1e-3
    interior = np.all((source_index[..., :2] >= 15) & (source_index[..., :2] <= np.array(shape[:0:-1]) - 16), axis=-1)
    bspline = resample_in_plane(values, geometry, grid, grid_shape, order=3, fill=0.0)
    assert interior.sum() > 1000 and np.abs(bspline - expected)[interior].max() < 1e-3


def test_same_grid_is_the_identity(rng):
    image = _ct(rng)
    shape = image.array.shape
    for order in (0, 1):
        same = resample_in_plane(image.array, image.geometry, image.geometry, shape, order=order, fill=0)
        assert np.array_equal(same, image.array)
    bspline = resample_in_plane(image.array, image.geometry, image.geometry, shape, order=3, fill=0)
    assert np.abs(bspline - image.array).max() < BSPLINE_TOLERANCE_HU


def test_a_label_box_keeps_its_physical_extent():
    """A box on the 1 mm grid comes back as the input voxels whose centres lie inside the box's edges, except at
    its corners, where the bilinear fraction (product of the fractions along x and y) falls below 0.5."""
    geometry = Geometry((0.7, 0.9, 1.5), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    shape = (10, 200, 220)
    grid, grid_shape = processing_grid(geometry, shape, 1.0)
    labels = np.zeros(grid_shape, np.uint8)
    labels[2:7, 40:120, 30:151] = 1  # liver: y 40…119, x 30…150 on the 1 mm grid
    labels[3:5, 60:70, 50:61] = 2
    on_input = labels_to_grid(labels, grid, geometry, shape)

    def fraction(first, last, axis):
        """Linear interpolation of the box's 1D profile (1 on pixels first…last) at the input's voxel centres."""
        centres = geometry.origin[axis] + np.arange(shape[2 - axis]) * geometry.spacing[axis]
        position = (centres - grid.origin[axis]) / grid.spacing[axis]  # in 1 mm pixels
        return np.clip(np.minimum(position - (first - 1), last + 1 - position), 0.0, 1.0)

    def box(z, y, x):
        mask = np.zeros(shape, bool)
        mask[z] = fraction(*y, axis=1)[:, None] * fraction(*x, axis=0)[None, :] >= 0.5
        return mask

    tumour = box(slice(3, 5), (60, 69), (50, 60))
    assert np.array_equal(on_input >= 1, box(slice(2, 7), (40, 119), (30, 150)))
    assert np.array_equal(on_input == 2, tumour)
    # The 1 mm grid starts 0.05 mm (y) and 0.15 mm (x) further in (same centre, coarser pixels): the tumour's
    # edges lie at y 59.55…69.55 mm, 11 rows of 0.9 mm (60.3…69.3), and x 49.65…60.65 mm, 16 columns of 0.7 mm
    # (49.7…60.2). Of the corners only (69.3, 49.7) falls below 0.5: fractions 0.75 × 0.55.
    assert np.count_nonzero(tumour) == 2 * (11 * 16 - 1)


def test_labels_cross_grids_that_do_not_share_slices_only_through_resample():
    geometry = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    shifted = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.5), geometry.direction)
    with pytest.raises(ValueError, match="same direction and the same slices"):
        labels_to_grid(np.zeros((4, 8, 8), np.uint8), geometry, shifted, (4, 8, 8))


def test_prepare_volume_matches_the_3d_bspline_preprocessing(rng):
    """Today's preprocessing (3D B-spline, then rounding to HU) and the in-plane one agree: same crop, HU
    within 1 (a value within float noise of x.5 may round either way), 8-bit values within 1 level."""
    image = _ct(rng, shape=(8, 120, 130), spacing=(0.8, 0.8, 2.0))
    contract = InputContract()
    prepared = prepare_volume(image, contract)
    hu_3d = resample(image.with_array(image.array.astype(np.float32)), prepared.grid, prepared.grid_shape, order=3,
                     fill=-1000.0).array
    assert prepared.crop == body_crop((hu_3d > -500).any(axis=0), 1.0, contract.spatial_multiple)
    today = crop_padded(np.clip(np.rint(hu_3d), -32768, 32767).astype(np.int16), prepared.crop, fill=-1000)
    difference = np.abs(prepared.hu.astype(int) - today)
    assert prepared.hu.dtype == np.int16 and difference.max() <= 1 and np.count_nonzero(difference) < 1e-3 * today.size
    assert np.abs(prepared.intensities.astype(int) - window_to_uint8(today, contract.hu_window)).max() <= 1
