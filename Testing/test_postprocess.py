"""Post-process stage (paper §3.3.1) on small hand-made probability maps with known answers."""

import json

import numpy as np
import pytest
from skimage.filters import threshold_otsu

from LiverTumorSegLib.errors import Cancelled
from LiverTumorSegLib.postprocess import (
    PostprocessOptions,
    choose_threshold,
    postprocess,
    three_slice_consistency,
    to_uint8,
)

SHAPE = (9, 48, 48)
LIVER_BOX = (slice(0, 9), slice(4, 40), slice(4, 40))


def liver_map():
    """A liver block (p = 0.95) filling every slice, background p = 0.02."""
    liver = np.full(SHAPE, 0.02, np.float32)
    liver[LIVER_BOX] = 0.95
    return liver


def square(prob, z, y, x, value, size=5):
    prob[z, y:y + size, x:x + size] = value


def fixed(**kwargs):
    """Options with the fixed 0.5 threshold, so each test controls exactly which voxels are foreground."""
    return PostprocessOptions(otsu=False, **kwargs)


# ----------------------------------------------------------------------------------------------- threshold


def test_otsu_on_a_bimodal_map_separates_the_modes_strictly():
    rng = np.random.default_rng(1)
    prob = np.where(rng.random(SHAPE) < 0.3, rng.normal(0.85, 0.03, SHAPE), rng.normal(0.1, 0.03, SHAPE))
    prob = np.clip(prob, 0, 1).astype(np.float32)
    u8 = to_uint8(prob)
    chosen = choose_threshold(u8, PostprocessOptions())
    assert chosen["method"] == "otsu" and chosen["value"] == chosen["otsu"]
    # The modes do not touch: every split in the empty gap maximises the between-class variance.
    # skimage returns the lowest; the middle of the gap is taken.
    lower_top = int(u8[prob < 0.5].max())
    upper_bottom = int(u8[prob > 0.5].min())
    assert int(threshold_otsu(u8)) == lower_top
    assert abs(chosen["value"] - (lower_top + upper_bottom - 1) / 2) <= 0.5
    # Foreground is strictly above the threshold (the paper's class 1 is k >= tau + 1).
    at_threshold = np.full((3, 4, 4), chosen["value"], np.uint8)
    at_threshold[1, 1, 1] = 255
    labels_mask = at_threshold > chosen["value"]
    assert labels_mask.sum() == 1


def test_threshold_guards_constant_empty_and_background_only_maps():
    options = PostprocessOptions()
    assert choose_threshold(np.zeros(SHAPE, np.uint8), options)["method"] == "fallback"
    assert choose_threshold(np.full(SHAPE, 200, np.uint8), options) == {
        "otsu": None, "value": 128, "probability": round(128 / 255, 4), "method": "fallback"}
    # A tumour channel without tumour: mostly zero with low noise up to p = 0.4. Otsu alone would split the
    # noise at a silly low level; the clamp keeps the threshold at p = 0.25.
    rng = np.random.default_rng(2)
    noise = np.where(rng.random(SHAPE) < 0.05, rng.uniform(0, 0.4, SHAPE), 0).astype(np.float32)
    chosen = choose_threshold(to_uint8(noise), options)
    assert chosen["otsu"] < 64
    assert chosen["method"] == "otsu_clamped" and chosen["value"] == 64
    assert choose_threshold(to_uint8(noise), fixed())["method"] == "fixed"


def test_otsu_switch_off_uses_fixed_half():
    _, info = postprocess(liver_map(), np.zeros(SHAPE, np.float32), fixed())
    assert info["thresholds"]["liver"]["value"] == 128 and info["thresholds"]["liver"]["method"] == "fixed"
    _, info = postprocess(liver_map(), np.zeros(SHAPE, np.float32))
    assert info["thresholds"]["liver"]["method"] == "otsu"
    assert info["thresholds"]["tumour"]["method"] == "fallback"


# ---------------------------------------------------------------------------------------------- morphology


def test_opening_removes_isolated_voxel_and_keeps_5x5_blob():
    tumour = np.zeros(SHAPE, np.float32)
    tumour[2:7, 10, 10] = 0.9  # one-voxel column: isolated in every slice
    tumour[2:7, 20:25, 20:25] = 0.9  # 5x5 blob through five slices
    labels, info = postprocess(liver_map(), tumour, fixed())
    assert labels.dtype == np.uint8
    assert labels[4, 10, 10] == 1  # tumour removed, still liver
    assert (labels[2:7, 20:25, 20:25] == 2).all()
    assert (labels == 2).sum() == 5 * 25
    assert info["morphology"]["removed_voxels"]["tumour"] == 5

    labels, info = postprocess(liver_map(), tumour, fixed(morphology=False))
    assert (labels[2:7, 10, 10] == 2).all()
    assert "morphology" not in info["steps"]


# ------------------------------------------------------------------------------------- three-slice consistency


def gap_case(p_below, p_above):
    """5x5 tumour in slices 2-3 and 5-6, missing in slice 4 (p = 0.3 there)."""
    tumour = np.zeros(SHAPE, np.float32)
    for z in (2, 3, 5, 6):
        square(tumour, z, 20, 20, 0.9)
    square(tumour, 3, 20, 20, p_below)
    square(tumour, 5, 20, 20, p_above)
    square(tumour, 4, 20, 20, 0.3)
    return tumour


def test_three_slice_rule_restores_gap_when_neighbour_mean_above_threshold():
    labels, info = postprocess(liver_map(), gap_case(0.65, 0.75), fixed())
    assert (labels[4, 20:25, 20:25] == 2).all()
    assert info["slice_consistency"]["restored_voxels"] == 25


@pytest.mark.parametrize("p_below, p_above", [(0.6, 0.6), (0.55, 0.6)])
def test_three_slice_rule_keeps_gap_when_neighbour_mean_not_above_threshold(p_below, p_above):
    labels, info = postprocess(liver_map(), gap_case(p_below, p_above), fixed())
    assert (labels[4, 20:25, 20:25] == 1).all()
    assert (labels[[2, 3, 5, 6], 20:25, 20:25] == 2).all()
    assert info["slice_consistency"]["restored_voxels"] == 0


def test_three_slice_rule_drops_single_slice_tumour_and_switch_keeps_it():
    tumour = np.zeros(SHAPE, np.float32)
    square(tumour, 4, 20, 20, 0.9)
    labels, info = postprocess(liver_map(), tumour, fixed())
    assert not (labels == 2).any()
    assert info["slice_consistency"]["dropped_voxels"] == 25
    labels, _ = postprocess(liver_map(), tumour, fixed(slice_consistency=False))
    assert (labels == 2).sum() == 25


def test_three_slice_rule_edges_and_simultaneous_evaluation():
    prob = np.full((5, 1, 1), 0.9, np.float32)
    column = lambda *values: np.array(values, bool).reshape(-1, 1, 1)
    # First/last slice: outside counts as background, so an edge voxel needs its one neighbour.
    out, restored, dropped = three_slice_consistency(column(1, 1, 0, 0, 1), prob)
    assert out.ravel().tolist() == [True, True, False, False, False] and dropped == 1 and restored == 0
    # Both rules read the same input mask: the ends of a 1-0-1 pattern lose their support while the gap
    # is restored.
    out, restored, dropped = three_slice_consistency(column(0, 1, 0, 1, 0), prob)
    assert out.ravel().tolist() == [False, False, True, False, False] and restored == 1 and dropped == 2
    # Raw probability decides the restoration; 0.6 exactly is not enough.
    prob[1, 0, 0] = prob[3, 0, 0] = 0.6
    out, restored, _ = three_slice_consistency(column(1, 1, 0, 1, 1), prob)
    assert out.ravel().tolist() == [True, True, False, True, True] and restored == 0
    out, restored, _ = three_slice_consistency(column(1, 1, 0, 1, 1), prob, restore_probability=0.55)
    assert out.all() and restored == 1


# ------------------------------------------------------------------------------------------ liver confinement


def outside_case():
    tumour = np.zeros(SHAPE, np.float32)
    tumour[2:7, 42:47, 42:47] = 0.9  # a separate blob outside the liver block (another organ)
    tumour[2:7, 10:15, 36:43] = 0.9  # a capsule lesion: straddles the liver border at x = 40
    return tumour


def test_tumour_outside_liver_is_removed_capsule_lesion_kept():
    labels, info = postprocess(liver_map(), outside_case(), fixed())
    assert not (labels[:, 42:47, 42:47]).any()
    assert (labels[2:7, 10:15, 36:43] == 2).all()  # including its part beyond the liver channel
    assert info["liver"]["tumour_outside_liver_removed_voxels"] == 5 * 25
    assert set(np.unique(labels)) == {0, 1, 2}


def test_largest_component_switch_off_keeps_outside_tumour():
    labels, info = postprocess(liver_map(), outside_case(), fixed(largest_component=False))
    assert (labels[2:7, 42:47, 42:47] == 2).all()
    assert "largest_component" not in info["steps"]


def test_liver_holes_filled_per_slice_even_when_open_in_3d():
    liver = liver_map()
    liver[:, 20:24, 20:24] = 0.02  # a vessel running through the whole organ: a tunnel, not a 3D cavity
    labels, info = postprocess(liver, np.zeros(SHAPE, np.float32), fixed())
    assert (labels[:, 20:24, 20:24] == 1).all()
    assert info["liver"]["holes_filled_voxels"] == 9 * 16
    labels, _ = postprocess(liver, np.zeros(SHAPE, np.float32), fixed(fill_liver_holes=False))
    assert not labels[:, 20:24, 20:24].any()


def test_largest_liver_component_drops_other_organ():
    liver = liver_map()
    liver[:, 4:40, 30:32] = 0.02  # cut the block into two parts, the smaller one on the right
    labels, info = postprocess(liver, np.zeros(SHAPE, np.float32), fixed())
    assert (labels[:, 4:40, 4:30] == 1).all()
    assert not labels[:, :, 32:].any()
    assert info["liver"]["outside_largest_component_voxels"] == 9 * 36 * 8


# ---------------------------------------------------------------------------------------- progress & cancel


def test_progress_reported_and_cancel_raises():
    calls = []
    labels, info = postprocess(liver_map(), np.zeros(SHAPE, np.float32), progress=lambda s, f: calls.append((s, f)))
    assert calls[0] == ("postprocess", 0.0) and calls[-1] == ("postprocess", 1.0)
    assert [f for _, f in calls] == sorted(f for _, f in calls)
    json.dumps(info)  # the summary is JSON-serialisable

    count = iter(range(100))
    with pytest.raises(Cancelled):
        postprocess(liver_map(), np.zeros(SHAPE, np.float32), cancel=lambda: next(count) >= 2)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="differ in shape"):
        postprocess(liver_map(), np.zeros((9, 48, 47), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        postprocess(np.full(SHAPE, np.nan, np.float32), np.zeros(SHAPE, np.float32))
    with pytest.raises(ValueError, match="logits"):
        postprocess(liver_map() * 4 - 2, np.zeros(SHAPE, np.float32))


def test_bounding_box_shortcuts_match_whole_volume_operations():
    from scipy import ndimage

    from LiverTumorSegLib.postprocess import IN_PLANE_3X3, IN_PLANE_CROSS, fill_holes_per_slice, opening_per_slice

    rng = np.random.default_rng(3)
    mask = np.zeros((6, 40, 40), bool)
    mask[1:5, 8:30, 10:33] = rng.random((4, 22, 23)) < 0.7
    assert np.array_equal(opening_per_slice(mask), ndimage.binary_opening(mask, structure=IN_PLANE_3X3))
    assert np.array_equal(fill_holes_per_slice(mask), ndimage.binary_fill_holes(mask, structure=IN_PLANE_CROSS))
    # Per-slice filling: a hole in the first slice is filled although the slice lies on the array's border.
    ring = np.zeros((2, 7, 7), bool)
    ring[:, 1:6, 1:6] = True
    ring[:, 3, 3] = False
    assert fill_holes_per_slice(ring).all(axis=0)[1:6, 1:6].all()
