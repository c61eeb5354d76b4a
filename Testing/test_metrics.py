"""Segmentation metrics on hand-made masks whose answers are worked out by hand."""

import json
import math

import numpy as np
import pytest

from LiverTumorSegLib import metrics
from LiverTumorSegLib.metrics import (
    GlobalDice, assd, burden_rmse, case_metrics, detection_scores, dice, equivalent_diameter_mm, evaluate_case, hd95,
    lesion_detection, mean_std, ppv, reference_lesion_scores, sensitivity, size_stratum, surface_distances,
    surface_voxels, tumour_burden,
)


def _box(shape, *slices):
    mask = np.zeros(shape, bool)
    mask[slices] = True
    return mask


# ------------------------------------------------------------------------------------------ overlap


def test_dice_sensitivity_ppv_known_values():
    reference = _box((1, 10, 10), slice(None), slice(0, 4), slice(0, 5))  # 20 voxels
    prediction = _box((1, 10, 10), slice(None), slice(2, 6), slice(0, 5))  # 20 voxels, 10 shared
    prediction[0, 9, 9] = True  # 21 predicted
    assert dice(prediction, reference) == pytest.approx(2 * 10 / 41)
    assert sensitivity(prediction, reference) == pytest.approx(10 / 20)
    assert ppv(prediction, reference) == pytest.approx(10 / 21)


def test_empty_conventions_for_overlap():
    empty, some = np.zeros((3, 4, 4), bool), _box((3, 4, 4), slice(1, 2), slice(1, 3), slice(1, 3))
    assert dice(empty, empty) == sensitivity(empty, empty) == ppv(empty, empty) == 1.0  # LiTS: both empty → 1
    assert dice(some, empty) == 0.0 and ppv(some, empty) == 0.0 and math.isnan(sensitivity(some, empty))
    assert dice(empty, some) == 0.0 and sensitivity(empty, some) == 0.0 and math.isnan(ppv(empty, some))


def test_global_dice_pools_voxels_not_cases():
    accumulator = GlobalDice()
    big = _box((1, 10, 10), slice(None), slice(0, 10), slice(0, 10))  # 100 voxels, perfect
    accumulator.add(big, big)
    small_ref = _box((1, 10, 10), slice(None), slice(0, 1), slice(0, 2))  # 2 voxels, missed
    accumulator.add(np.zeros_like(small_ref), small_ref)
    assert accumulator.value == pytest.approx(200 / 202)  # per-case mean would be 0.5
    assert accumulator.cases == 2
    accumulator.add_counts(0, 0, 0)
    assert accumulator.value == pytest.approx(200 / 202)
    assert GlobalDice().value == 1.0
    with pytest.raises(ValueError, match="inconsistent"):
        GlobalDice().add_counts(5, 3, 10)


# --------------------------------------------------------------------------------- surface distances


def test_surface_voxels_of_a_cube_and_at_the_volume_edge():
    cube = _box((5, 5, 5), slice(1, 4), slice(1, 4), slice(1, 4))
    assert surface_voxels(cube).sum() == 26 and not surface_voxels(cube)[2, 2, 2]
    full = np.ones((3, 3, 3), bool)  # touches every edge: outside the array counts as outside
    assert surface_voxels(full).sum() == 26


def test_assd_hd95_of_offset_cubes_with_anisotropic_spacing():
    """Two 3×3×3 cubes, the second shifted by one slice; spacing x 2 mm, y 1 mm, z 3 mm.

    Surfaces: 26 voxels each (all but the centre). From A to B: A's 9 voxels of its first slice (not in B)
    are one slice (3 mm) from B's first slice, which is all surface; A's last-slice centre voxel is B's
    centre (not surface), its nearest B surface voxel is one row away (1 mm, the smallest spacing); the 16
    other voxels lie on B's surface (0). B to A is the mirror image. Pooled: 18 × 3 mm, 2 × 1 mm, 32 × 0.
    ASSD = (54 + 2) / 52; HD95 = the 95th percentile of 52 sorted values, position 0.95 · 51 = 48.45,
    between the 49th and 50th values, both 3 mm.
    """
    shape = (7, 5, 5)
    a = _box(shape, slice(1, 4), slice(1, 4), slice(1, 4))
    b = _box(shape, slice(2, 5), slice(1, 4), slice(1, 4))
    spacing_xyz = (2.0, 1.0, 3.0)
    to_b, to_a = surface_distances(a, b, spacing_xyz)
    assert sorted(to_b) == [0.0] * 16 + [1.0] + [3.0] * 9
    assert sorted(to_a) == sorted(to_b)
    assert assd(a, b, spacing_xyz) == pytest.approx(56 / 52)
    assert hd95(a, b, spacing_xyz) == pytest.approx(3.0)
    # Shifted along x instead (2 mm): 18 × 2 mm, 2 × 1 mm.
    c = _box(shape, slice(1, 4), slice(1, 4), slice(2, 5))
    assert assd(a, c, spacing_xyz) == pytest.approx(38 / 52)
    assert hd95(a, c, spacing_xyz) == pytest.approx(2.0)
    assert assd(a, a, spacing_xyz) == 0.0 and hd95(a, a, spacing_xyz) == 0.0


def test_hd95_is_the_95th_percentile_of_pooled_distances_brute_force(rng):
    spacing_xyz = (0.8, 1.3, 2.5)
    a = np.zeros((9, 12, 11), bool)
    b = np.zeros_like(a)
    a[2:7, 3:9, 2:8] = True
    a[6:8, 9:11, 8:10] = True
    b[3:8, 4:10, 3:9] = rng.random((5, 6, 6)) > 0.2
    sampling = np.array(spacing_xyz[::-1])
    sa = np.argwhere(surface_voxels(a)) * sampling
    sb = np.argwhere(surface_voxels(b)) * sampling
    pairwise = np.linalg.norm(sa[:, None] - sb[None], axis=2)
    pooled = np.concatenate([pairwise.min(axis=1), pairwise.min(axis=0)])
    assert assd(a, b, spacing_xyz) == pytest.approx(pooled.mean())
    assert hd95(a, b, spacing_xyz) == pytest.approx(np.percentile(pooled, 95))
    # The bounding-box crop gives the same distances as the full volume.
    big_a, big_b = (np.pad(m, ((5, 0), (0, 7), (3, 3))) for m in (a, b))
    assert assd(big_a, big_b, spacing_xyz) == pytest.approx(pooled.mean())


def test_surface_distance_empty_conventions():
    empty, cube = np.zeros((5, 5, 5), bool), _box((5, 5, 5), slice(1, 4), slice(1, 4), slice(1, 4))
    assert assd(empty, empty, (1, 1, 1)) == 0.0 and hd95(empty, empty, (1, 1, 1)) == 0.0
    assert math.isnan(assd(cube, empty, (1, 1, 1))) and math.isnan(hd95(empty, cube, (1, 1, 1)))
    with pytest.raises(ValueError, match="spacing"):
        assd(cube, cube, (1, 0, 1))


# ---------------------------------------------------------------------------------------- lesions


def _three_lesions():
    reference = np.zeros((10, 20, 20), bool)
    reference[1:3, 1:3, 1:3] = True  # lesion 1
    reference[5:7, 10:12, 10:12] = True  # lesion 2
    reference[1:3, 15:18, 15:18] = True  # lesion 3
    prediction = np.zeros_like(reference)
    prediction[2:4, 2:4, 2:4] = True  # overlaps lesion 1
    prediction[8:10, 1:3, 15:18] = True  # false positive
    return prediction, reference


def test_lesion_detection_precision_recall_f1():
    prediction, reference = _three_lesions()
    result = lesion_detection(prediction, reference)
    assert result["lesions_reference"] == 3 and result["lesions_predicted"] == 2
    assert result["lesions_reference_detected"] == 1 and result["lesions_predicted_matched"] == 1
    assert result["lesion_precision"] == pytest.approx(0.5)
    assert result["lesion_recall"] == pytest.approx(1 / 3)
    assert result["lesion_f1"] == pytest.approx(2 * 0.5 / 3 / (0.5 + 1 / 3))  # 0.4


def test_lesions_are_26_connected_and_matching_is_many_to_many():
    reference = np.zeros((4, 6, 6), bool)
    reference[1, 1, 1] = reference[2, 2, 2] = True  # diagonal neighbours: one lesion
    reference[1, 4, 4] = True  # a second lesion
    prediction = np.zeros_like(reference)
    prediction[1:3, 1:5, 1:5] = True  # one component covering both
    result = lesion_detection(prediction, reference)
    assert (result["lesions_reference"], result["lesions_predicted"]) == (2, 1)
    assert result["lesion_recall"] == 1.0 and result["lesion_precision"] == 1.0


def test_detection_empty_conventions():
    assert detection_scores(0, 0, 0, 0) == {"lesion_precision": 1.0, "lesion_recall": 1.0, "lesion_f1": 1.0}
    missed = detection_scores(0, 0, 0, 2)
    assert missed["lesion_recall"] == 0.0 and math.isnan(missed["lesion_precision"]) and missed["lesion_f1"] == 0.0
    spurious = detection_scores(0, 3, 0, 0)
    assert spurious["lesion_precision"] == 0.0 and math.isnan(spurious["lesion_recall"]) and spurious["lesion_f1"] == 0.0


def test_size_strata_by_equivalent_diameter():
    assert size_stratum(9.999) == "small"
    assert size_stratum(10.0) == size_stratum(30.0) == "medium"
    assert size_stratum(30.001) == "large"
    # A sphere of diameter d has volume π d³ / 6.
    assert equivalent_diameter_mm(1000, (1.0, 1.0, 1.0)) == pytest.approx((6000 / math.pi) ** (1 / 3))
    assert equivalent_diameter_mm(1, (2.0, 2.0, 2.0)) == pytest.approx((6 * 8 / math.pi) ** (1 / 3))


def test_reference_lesion_scores_strata_and_per_lesion_dice():
    reference = np.zeros((30, 40, 40), bool)
    reference[1:5, 1:5, 1:5] = True  # 64 voxels
    reference[8:28, 15:35, 15:35] = True  # 8000 voxels
    prediction = np.zeros_like(reference)
    prediction[1:5, 1:5, 3:7] = True  # 64 voxels, 32 of them in the small lesion
    prediction[25:30, 1:4, 1:4] = True  # a false positive elsewhere does not count against any lesion
    at_1mm = reference_lesion_scores(prediction, reference, (1.0, 1.0, 1.0))
    # Lesion ids as volumetry numbers them: largest first.
    assert [(r["lesion"], r["voxels"]) for r in at_1mm] == [(1, 8000), (2, 64)]
    assert [r["stratum"] for r in at_1mm] == ["medium", "small"]  # d = 24.8 mm and 4.96 mm
    assert at_1mm[1]["diameter_mm"] == pytest.approx((6 * 64 / math.pi) ** (1 / 3))
    assert at_1mm[1]["dice"] == pytest.approx(2 * 32 / (64 + 64)) and at_1mm[1]["detected"]
    assert at_1mm[0]["dice"] == 0.0 and not at_1mm[0]["detected"]  # missed
    at_3mm = reference_lesion_scores(prediction, reference, (3.0, 3.0, 3.0))  # 27× the volume, 3× the diameter
    assert [r["stratum"] for r in at_3mm] == ["large", "medium"]  # 74.4 mm and 14.9 mm
    assert at_3mm[0]["volume_mm3"] == pytest.approx(8000 * 27)
    assert reference_lesion_scores(prediction, np.zeros_like(reference), (1, 1, 1)) == []


# ---------------------------------------------------------------------------------------- burden


def test_tumour_burden_and_rmse():
    labels = np.zeros((2, 10, 10), np.uint8)
    labels[0] = 1
    labels[0, :2, :5] = 2  # 10 tumour voxels of 100 liver voxels (tumour is part of the liver)
    assert tumour_burden(labels) == pytest.approx(0.1)
    assert tumour_burden(np.zeros((3, 3, 3), np.uint8)) == 0.0
    assert burden_rmse([0.1, 0.2], [0.1, 0.5]) == pytest.approx(math.sqrt(0.09 / 2))
    assert math.isnan(burden_rmse([], []))


def test_mean_std_skips_undefined_values():
    mean, std, n = mean_std([1.0, float("nan"), 3.0, None])
    assert (mean, n) == (2.0, 2) and std == pytest.approx(math.sqrt(2))
    assert math.isnan(mean_std([float("nan")])[0]) and mean_std([0.5])[2] == 1


# ---------------------------------------------------------------------------------------- per case


def test_case_metrics_is_flat_consistent_and_json_friendly():
    prediction_t, reference_t = _three_lesions()
    reference = np.where(reference_t, 2, 0).astype(np.uint8)
    reference[:, :, :] = np.maximum(reference, 1)  # whole volume is liver
    prediction = np.ones_like(reference)
    prediction[prediction_t] = 2
    spacing = (0.7, 0.7, 2.0)
    result = case_metrics(prediction, reference, spacing)
    assert all(isinstance(v, (int, float)) and not isinstance(v, np.generic) for v in result.values())
    json.loads(json.dumps(result))
    assert result["liver_dice"] == 1.0 and result["liver_assd_mm"] == 0.0
    assert result["tumour_dice"] == pytest.approx(dice(prediction_t, reference_t))
    assert result["tumour_sensitivity"] == pytest.approx(sensitivity(prediction_t, reference_t))
    assert result["tumour_ppv"] == pytest.approx(ppv(prediction_t, reference_t))
    assert result["tumour_assd_mm"] == pytest.approx(assd(prediction_t, reference_t, spacing))
    assert result["tumour_hd95_mm"] == pytest.approx(hd95(prediction_t, reference_t, spacing))
    assert result["lesion_precision"] == 0.5 and result["lesion_recall"] == pytest.approx(1 / 3)
    assert result["tumour_burden_reference"] == pytest.approx(reference_t.sum() / reference.size)
    assert result["tumour_burden_error"] == pytest.approx(
        result["tumour_burden_predicted"] - result["tumour_burden_reference"])
    assert result["tumour_reference_ml"] == pytest.approx(reference_t.sum() * 0.7 * 0.7 * 2.0 / 1000)
    lesions = evaluate_case(prediction, reference, spacing).lesions
    assert result["lesions_small"] == len(lesions) == 3 and result["lesions_medium"] == result["lesions_large"] == 0
    assert result["lesion_dice_small"] == pytest.approx(np.mean([r["dice"] for r in lesions]))
    assert math.isnan(result["lesion_dice_large"])
    with pytest.raises(ValueError, match="differ in shape"):
        case_metrics(prediction, reference[:-1], spacing)


def test_case_metrics_of_a_tumour_free_case():
    reference = np.zeros((4, 8, 8), np.uint8)
    reference[1:3, 2:6, 2:6] = 1
    result = metrics.case_metrics(reference.copy(), reference, (1, 1, 1))
    assert result["tumour_dice"] == result["tumour_sensitivity"] == result["tumour_ppv"] == 1.0
    assert result["tumour_assd_mm"] == 0.0 and result["lesion_f1"] == 1.0 and result["lesions_reference"] == 0
