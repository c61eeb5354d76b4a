"""Boundary refinement stage (engine, no torch): band geometry, dense tiles, relabelling rules, progress, cancel.

The network here is a real ONNX model built by hand: a valid s³ convolution whose only non-zero weight is
the centre voxel, then a sigmoid — a dense classifier "bright centre voxel = tumour" with the bundle's
dense contract (output = input − s + 1 per axis).
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from LiverTumorSegLib.bundle import load_bundle, write_bundle
from LiverTumorSegLib.errors import BundleError, Cancelled, InputError
from LiverTumorSegLib.preprocess import InputContract
from LiverTumorSegLib.refinement import (
    band_margin_zyx,
    boundary_band_voxels,
    crop_edge,
    drop_new_fragments,
    refine_boundaries,
    signed_distance,
    tumour_boxes,
)

SPACING = (1.0, 1.0, 2.5)  # x, y, z in mm: the processing grid with 2.5 mm slices


def _centre_threshold_onnx(path, size: int, threshold: float = 150.0, gain: float = 0.2):
    weight = np.zeros((1, 1, size, size, size), np.float32)
    weight[0, 0, size // 2, size // 2, size // 2] = gain
    bias = np.array([-gain * threshold], np.float32)
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["logit"]), helper.make_node("Sigmoid", ["logit"], ["probability"])]
    graph = helper.make_graph(
        nodes, "centre_threshold",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, "D", "H", "W"])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1, "d", "h", "w"])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _bundle(tmp_path, size=5, manifest_size=None, name="bundle"):
    onnx_path = _centre_threshold_onnx(tmp_path / f"net{size}.onnx", size)
    manifest = {
        "name": "refinement-test", "version": "1", "input": InputContract().to_dict(),
        "components": {"boundary_cnn": {"file": "boundary_cnn.onnx", "kind": "onnx", "patch_size": manifest_size or size,
                                        "band_voxels": 6, "threshold": 0.5}},
    }
    return write_bundle(tmp_path / name, manifest, {"boundary_cnn.onnx": onnx_path})


def _ellipsoid(shape, centre_zyx, radius_mm, spacing=SPACING):
    z, y, x = np.indices(shape).astype(float)
    cz, cy, cx = centre_zyx
    return ((z - cz) * spacing[2]) ** 2 + ((y - cy) * spacing[1]) ** 2 + ((x - cx) * spacing[0]) ** 2 <= radius_mm ** 2


def _scene(shape=(24, 64, 72)):
    """Liver block (100) with a bright true tumour (200) that crosses the liver's edge; labels hold an
    eroded tumour (radius 4 mm smaller)."""
    intensities = np.full(shape, 20, np.uint8)
    liver = np.zeros(shape, bool)
    liver[2:22, 8:56, 6:50] = True
    intensities[liver] = 100
    centre = (12, 32, 44)
    truth = _ellipsoid(shape, centre, 12.0)
    intensities[truth] = 200  # also outside the liver (x ≥ 50): bright but never tumour
    labels = liver.astype(np.uint8)
    labels[_ellipsoid(shape, centre, 8.0) & liver] = 2
    return intensities, labels, liver, truth


def test_signed_distance_and_band_match_brute_force(rng):
    mask = np.zeros((9, 20, 22), bool)
    mask[3:6, 6:13, 5:15] = True
    mask[4, 13, 7] = True
    d = signed_distance(mask, SPACING)
    zyx_in, zyx_out = np.argwhere(mask), np.argwhere(~mask)
    scale = np.array([2.5, 1.0, 1.0])  # z in units of the 1 mm in-plane spacing
    for _ in range(40):
        v = np.array([rng.integers(0, n) for n in mask.shape])
        other = zyx_out if mask[tuple(v)] else zyx_in
        expected = np.sqrt((((other - v) * scale) ** 2).sum(axis=1)).min()
        assert d[tuple(v)] == pytest.approx(-expected if mask[tuple(v)] else expected, abs=1e-5)
    band, d2 = boundary_band_voxels(mask, SPACING, 6)
    assert np.array_equal(band, np.abs(d) <= 6) and np.array_equal(d, d2)
    # 6 in-plane voxels reach 2 slices (5 mm) but not 3 (7.5 mm) away in z
    assert band[1, 9, 9] and not band[0, 9, 9]
    assert band_margin_zyx(SPACING, 6) == (4, 7, 7)


def test_crop_edge_repeats_the_edge_voxels():
    volume = np.arange(4 * 5 * 6, dtype=np.int32).reshape(4, 5, 6)
    crop = crop_edge(volume, (-2, 1, 3), (3, 7, 9))
    assert crop.shape == (5, 6, 6)
    assert np.array_equal(crop[2:, :4, :3], volume[0:3, 1:5, 3:6])
    assert np.all(crop[0] == crop[2]) and np.all(crop[:, 4:] == crop[:, 3:4]) and np.all(crop[..., 3:] == crop[..., 2:3])


def test_boxes_of_nearby_tumours_are_merged():
    tumour = np.zeros((20, 60, 60), bool)
    tumour[8:11, 10:16, 10:16] = True
    tumour[8:11, 10:16, 22:28] = True  # 6 voxels apart: bands overlap
    tumour[8:11, 45:50, 45:50] = True  # far away
    boxes, count = tumour_boxes(tumour, SPACING, 6)
    assert count == 3 and len(boxes) == 2
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            (a0, a1), (b0, b1) = boxes[a], boxes[b]
            assert not all(x0 < y1 and y0 < x1 for x0, x1, y0, y1 in zip(a0, a1, b0, b1))


def test_refinement_grows_the_eroded_tumour_to_the_bright_one_inside_the_liver(tmp_path):
    bundle = _bundle(tmp_path)
    intensities, labels, liver, truth = _scene()
    calls = []
    refined, info = refine_boundaries(intensities, labels, SPACING, bundle, threads=1,
                                      progress=lambda stage, f: calls.append((stage, f)))
    band, _ = boundary_band_voxels(labels == 2, SPACING, 6)
    expected = labels.copy()
    expected[band & liver] = np.where(truth[band & liver], 2, 1)
    assert np.array_equal(refined, expected)
    assert np.array_equal(refined == 2, truth & liver)  # erosion by 4 mm ≤ band: fully recovered
    assert not np.any((refined == 2) & ~liver) and np.array_equal(refined > 0, labels > 0)
    assert np.array_equal(labels, _scene()[1]), "the input labels are not modified"
    assert info["components"] == 1 and info["added_voxels"] == int((expected == 2).sum() - (labels == 2).sum())
    assert info["removed_voxels"] == 0 and info["changed_voxels"] == info["added_voxels"] > 0
    assert info["band_voxels"] == int(band.sum()) and info["candidate_voxels"] == int((band & liver).sum())
    fractions = [f for stage, f in calls]
    assert {stage for stage, _ in calls} == {"boundary refinement"}
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_tiles_and_patch_sizes_do_not_change_the_result(tmp_path):
    intensities, labels, _, _ = _scene()
    labels[3:6, 12:16, 10:14] = 2  # a second, small tumour
    reference, info = refine_boundaries(intensities, labels, SPACING, _bundle(tmp_path, 5), threads=1)
    tiled, tiled_info = refine_boundaries(intensities, labels, SPACING, _bundle(tmp_path, 5, name="b2"), threads=1,
                                          tile=(3, 7, 11))
    assert np.array_equal(reference, tiled) and tiled_info["tiles"] > info["tiles"]
    # a wider patch (edge-padded near the volume's first slices) gives the same centre-voxel decisions
    wide, _ = refine_boundaries(intensities, labels, SPACING, _bundle(tmp_path, 9, name="b3"), threads=1)
    assert np.array_equal(reference, wide)


def test_shrinks_a_tumour_that_leaks_into_dark_liver(tmp_path):
    intensities, _, liver, truth = _scene()
    labels = liver.astype(np.uint8)
    grown = _ellipsoid(labels.shape, (12, 32, 44), 15.0) & liver
    labels[grown] = 2
    refined, info = refine_boundaries(intensities, labels, SPACING, _bundle(tmp_path), threads=1)
    assert np.array_equal(refined == 2, truth & liver)
    assert np.all(refined[grown & ~truth] == 1)  # voxels leaving the tumour stay liver
    assert info["removed_voxels"] > 0 and info["added_voxels"] == 0


def test_refinement_moves_boundaries_but_adds_no_lesion(tmp_path):
    """A bright spot in the band but apart from the tumour is called tumour by the network; it must not
    become a new lesion, while the tumour itself still grows."""
    intensities, labels, liver, truth = _scene()
    spot = np.zeros_like(truth)
    spot[12, 32, 30] = True  # 14 mm from the centre: 6 from the eroded tumour (in the band), 2 from the true one
    assert not np.any(spot & truth)
    intensities[spot] = 200
    refined, info = refine_boundaries(intensities, labels, SPACING, _bundle(tmp_path), threads=1)
    assert np.all(refined[spot] == 1) and info["dropped_fragment_voxels"] == int(spot.sum())
    assert np.array_equal(refined == 2, truth & liver)
    assert info["added_voxels"] == int((truth & liver).sum() - (labels == 2).sum())

    grid = np.ones((3, 12, 12), np.uint8)
    grid[1, 2:5, 2:5] = 2  # kept: overlaps the tumour before
    grid[1, 8:10, 8:10] = 2  # new: turned back to liver
    before = np.zeros(grid.shape, bool)
    before[1, 3, 3] = True
    assert drop_new_fragments(grid, before) == 4
    assert (grid == 2).sum() == 9 and np.all(grid[1, 8:10, 8:10] == 1)


def test_no_tumour_cancel_and_bad_inputs(tmp_path):
    bundle = _bundle(tmp_path)
    intensities, labels, liver, _ = _scene()
    empty = liver.astype(np.uint8)
    out, info = refine_boundaries(intensities, empty, SPACING, bundle)
    assert np.array_equal(out, empty) and info["band_voxels"] == 0 and info["tiles"] == 0
    with pytest.raises(Cancelled):
        refine_boundaries(intensities, labels, SPACING, bundle, cancel=lambda: True)
    ticks = iter(range(100))
    with pytest.raises(Cancelled):  # cancelled between tiles
        refine_boundaries(intensities, labels, SPACING, bundle, tile=(4, 8, 8), cancel=lambda: next(ticks) > 3)
    with pytest.raises(InputError, match="8-bit"):
        refine_boundaries(intensities.astype(np.float32), labels, SPACING, bundle)
    with pytest.raises(InputError, match="same 3D grid"):
        refine_boundaries(intensities[:-1], labels, SPACING, bundle)
    wrong = _bundle(tmp_path, 5, manifest_size=7, name="wrong")
    with pytest.raises(BundleError, match="must return"):
        refine_boundaries(intensities, labels, SPACING, load_bundle(wrong.path), threads=1)
