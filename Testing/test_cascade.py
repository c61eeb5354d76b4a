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


def _bundle_with_scales(tmp_path, scales=None):
    from test_bundle import _mean_sigmoid_onnx

    from LiverTumorSegLib.bundle import write_bundle
    from LiverTumorSegLib.preprocess import InputContract

    files = {"liver.onnx": _mean_sigmoid_onnx(tmp_path / "l.onnx", 3), "tumour.onnx": _mean_sigmoid_onnx(tmp_path / "t.onnx", 4)}
    manifest = {"name": "t", "version": "1", "input": InputContract().to_dict(),
                "components": {"liver": {"file": "liver.onnx"}, "tumour": {"file": "tumour.onnx"}}}
    if scales is not None:
        manifest["inference"] = {"liver_scales": scales}
    return write_bundle(tmp_path / "bundle", manifest, files)


def _edge_volume():
    """Intensities with a vertical edge at x = 70 (grey 0 left, 4 right): the tiny network's sigmoid(mean) is
    0.5 on the left and sigmoid(4) ≈ 0.982 on the right."""
    from LiverTumorSegLib.preprocess import PreparedVolume

    intensities = np.zeros((3, 128, 192), np.uint8)
    intensities[:, :, 70:] = 4
    return PreparedVolume(intensities, intensities.astype(np.int16), None, intensities.shape, (slice(0, 128), slice(0, 192)))


def test_zoomed_liver_runs_are_aligned_with_the_unzoomed_run(tmp_path):
    """Each zoom's probabilities come back onto the crop's grid without a shift: flat regions keep their value
    exactly, the edge stays within the pixel either side of it, and the mean over zooms is what is returned."""
    from LiverTumorSegLib.cascade import run_cascade

    bundle = _bundle_with_scales(tmp_path)
    prepared = _edge_volume()
    plain, _ = run_cascade(prepared, bundle, threads=1)
    assert bundle.liver_scales == (1.0,)
    high = 1 / (1 + np.exp(-4.0))
    for scales in ((1.25,), (0.8,), (1.0, 1.12, 1.25)):
        liver, _ = run_cascade(prepared, bundle, threads=1, liver_scales=scales)
        assert liver.shape == plain.shape == prepared.intensities.shape
        np.testing.assert_allclose(liver[:, :, :68], 0.5, atol=1e-6)
        np.testing.assert_allclose(liver[:, :, 72:], high, atol=1e-6)
        assert np.all(np.diff(liver, axis=2) >= -1e-6)  # rises once, at the edge
        row = liver[1, 64]
        crossing = np.interp((0.5 + high) / 2, row, np.arange(row.size))  # where the edge's half height is
        assert abs(crossing - 69.5) <= 0.5, (scales, crossing)  # unzoomed: between x = 69 and 70
    single = [run_cascade(prepared, bundle, threads=1, liver_scales=(scale,))[0] for scale in (1.0, 1.12, 1.25)]
    averaged, _ = run_cascade(prepared, bundle, threads=1, liver_scales=(1.0, 1.12, 1.25))
    np.testing.assert_allclose(averaged, np.mean(single, axis=0), atol=1e-6)
    weighted, _ = run_cascade(prepared, bundle, threads=1, liver_scales=(1.0, 1.0, 1.25))
    np.testing.assert_allclose(weighted, (2 * single[0] + single[2]) / 3, atol=1e-6)


def test_the_tumour_branch_gets_the_unzoomed_liver_probability(tmp_path):
    """The tiny tumour network is sigmoid(mean of the three slices and the liver channel): its output with
    zoomed liver runs is exactly the unzoomed one's, although the liver maps differ."""
    from LiverTumorSegLib.cascade import run_cascade

    bundle = _bundle_with_scales(tmp_path)
    prepared = _edge_volume()
    liver_plain, tumour_plain = run_cascade(prepared, bundle, threads=1, liver_scales=(1.0,))
    for scales in ((1.0, 1.25), (1.12, 1.25)):
        liver, tumour = run_cascade(prepared, bundle, threads=1, liver_scales=scales)
        assert not np.array_equal(liver, liver_plain)
        np.testing.assert_array_equal(tumour, tumour_plain)


def test_the_bundles_liver_scales_are_the_default_and_options_override_them(tmp_path):
    from LiverTumorSegLib.cascade import run_cascade

    bundle = _bundle_with_scales(tmp_path, [1.0, 1.25])
    assert bundle.liver_scales == (1.0, 1.25)
    prepared = _edge_volume()
    by_bundle, _ = run_cascade(prepared, bundle, threads=1)
    explicit, _ = run_cascade(prepared, bundle, threads=1, liver_scales=(1.0, 1.25))
    plain, _ = run_cascade(prepared, bundle, threads=1, liver_scales=(1.0,))
    np.testing.assert_array_equal(by_bundle, explicit)
    assert not np.array_equal(by_bundle, plain)
