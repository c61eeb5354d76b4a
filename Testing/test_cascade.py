"""The tumour branch's box: every voxel that post-processing could keep as liver gets a tumour probability."""

import numpy as np

from LiverTumorSegLib.cascade import (LIVER_BOX_MARGIN_PX, LIVER_BOX_MARGIN_SLICES, LIVER_BOX_PROBABILITY,
                                      liver_box)
from LiverTumorSegLib.postprocess import PostprocessOptions


def test_box_threshold_is_the_lowest_liver_threshold_of_post_processing():
    assert LIVER_BOX_PROBABILITY == PostprocessOptions().otsu_range[0] == 0.25


def test_box_covers_a_second_liver_part_between_the_thresholds_but_not_speckle():
    liver = np.zeros((40, 200, 200), np.float32)
    liver[10:30, 40:100, 40:100] = 0.9  # the main liver part
    liver[12:20, 120:140, 150:170] = 0.4  # a second part (3,200 voxels) below 0.5, above the lowest Otsu threshold
    liver[35, 190, 5] = 0.9  # speckle: a single voxel
    z, y, x = liver_box(liver > LIVER_BOX_PROBABILITY, multiple=32)
    assert (z.start, z.stop) == (10 - LIVER_BOX_MARGIN_SLICES, 30 + LIVER_BOX_MARGIN_SLICES)
    # in-plane: [40, 170) plus the margin, grown symmetrically to a multiple of 32
    assert y.start <= 40 - LIVER_BOX_MARGIN_PX and y.stop >= 140 + LIVER_BOX_MARGIN_PX
    assert x.start <= 40 - LIVER_BOX_MARGIN_PX and x.stop >= 170 + LIVER_BOX_MARGIN_PX
    assert (y.stop - y.start) % 32 == 0 and (x.stop - x.start) % 32 == 0
    assert x.start > 5 and y.stop <= 200 + 32  # the speckle at (190, 5) did not widen the box
    # the old rule (largest component at p > 0.5) would have missed the second part
    _, y_old, x_old = liver_box(liver > 0.5, multiple=32)
    assert x_old.stop < 150


def test_no_liver_gives_no_box():
    assert liver_box(np.zeros((5, 32, 32), bool), multiple=32) is None


def test_component_sizes_counted_in_slabs_equal_scipys():
    from scipy import ndimage

    from LiverTumorSegLib.cascade import _component_sizes

    mask = np.random.default_rng(0).random((37, 40, 50)) > 0.7  # thousands of components, 37 = 2 slabs + 5
    components, count = ndimage.label(mask)
    expected = ndimage.sum_labels(mask, components, index=np.arange(1, count + 1))
    np.testing.assert_array_equal(_component_sizes(components, count), expected)
