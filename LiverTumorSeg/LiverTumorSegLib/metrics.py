"""Segmentation metrics (LiTS conventions), shared by the engine, the training package and the evaluation.

Label maps are (z, y, x) arrays with 0 background, 1 liver, 2 tumour. Structures: **liver** is
``labels >= 1`` (the whole organ, tumour included, as LiTS scores it), **tumour** is ``labels == 2``.
Spacings are given in (x, y, z) order, as :class:`~.image_io.Geometry` holds them.

Definitions (P = predicted voxels, T = reference voxels of one structure):

* **Dice** ``2|P∩T| / (|P| + |T|)``; **sensitivity** (recall) ``|P∩T| / |T|``; **PPV** (precision)
  ``|P∩T| / |P|``. Empty masks: both empty → 1.0 for all three (the LiTS convention for Dice, extended
  to the others so that a correctly tumour-free case scores as perfect everywhere). Only one empty:
  Dice 0; a ratio whose denominator is empty is undefined and is NaN (reference empty → sensitivity NaN,
  PPV 0; prediction empty → sensitivity 0, PPV NaN). Averages over cases skip NaN and report how many
  cases they cover (:func:`mean_std`).
* **Global Dice** (:class:`GlobalDice`): one Dice over all cases pooled, ``2Σ|P∩T| / (Σ|P| + Σ|T|)``.
* **Surface distances** (:func:`surface_distances`): the surface of a mask is its boundary voxels, the
  voxels with at least one of their 6 face neighbours outside the mask (voxels outside the array count
  as outside). For every surface voxel of P the Euclidean distance in mm, between voxel centres, to the
  nearest surface voxel of T, and the same from T to P (``scipy.ndimage.distance_transform_edt`` with
  the voxel spacing: exact, anisotropy included).

  - **ASSD** = mean of the pooled distances of both directions, ``(Σ d(P→T) + Σ d(T→P)) / (|S_P| + |S_T|)``
    (Heimann et al., IEEE TMI 2009; the LiTS definition). It is not the mean of the two directed means.
  - **HD95** = the 95th percentile of the same pooled set of distances (``numpy.percentile``, linear
    interpolation). Some tools (MedPy, MONAI) take instead the larger of the two directed 95th
    percentiles, which is ≥ this value; the pooled form is the symmetric counterpart of ASSD.
  - Both empty → 0.0 (identical, nothing to measure). Exactly one empty → **NaN**, not inf: the distance
    is undefined, and an inf would make every mean and standard deviation over cases infinite. Such a
    case is a detection failure and is counted there (Dice 0, sensitivity or PPV 0, lesion recall or
    precision); the tables report distance means over the cases where both masks exist, with that count.
* **Lesions** are the 26-connected components of the tumour mask, with the ids :mod:`.volumetry` gives
  them (:func:`.masks.label_lesions`: largest first).
  A predicted lesion and a reference lesion **match** when they share at least one voxel (many-to-many).
  Precision = matched predicted / predicted, recall = matched reference / reference,
  F1 = 2PR / (P + R). No lesions on either side → all 1.0; reference lesions but no prediction →
  recall 0, precision NaN, F1 0; predicted lesions but no reference → precision 0, recall NaN, F1 0.
  Over a data set the counts are summed first (:func:`detection_scores` of the sums).
* **Tumour burden** = tumour volume / liver volume (a fraction; the liver includes the tumour); 0 when
  there is no liver. :func:`burden_rmse` is the root mean square of (predicted − reference) over cases.
* **Size strata** by the reference lesion's equivalent-sphere diameter ``d = (6V/π)^(1/3)`` (V in mm³):
  small ``d < 10 mm``, medium ``10 ≤ d ≤ 30 mm``, large ``d > 30 mm``. **Per-lesion Dice** is the Dice
  between the reference lesion and the union of the predicted lesions (components) that overlap it, so
  predictions elsewhere in the liver do not count against it; a missed lesion scores 0. A predicted
  component that merges two reference lesions counts in full for each of them (it lowers both Dices),
  which is the honest reading of a merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from .masks import bounding_box, label_lesions

#: Face connectivity: a voxel is on the surface when one of these neighbours is outside the mask.
CONNECTIVITY_6 = ndimage.generate_binary_structure(3, 1)
#: Size strata (name, label) by equivalent-sphere diameter d: small d < 10 mm, medium 10 mm ≤ d ≤ 30 mm,
#: large d > 30 mm (see :func:`size_stratum`).
SIZE_STRATA = (("small", "< 10 mm"), ("medium", "10–30 mm"), ("large", "> 30 mm"))
SMALL_MAX_MM, MEDIUM_MAX_MM = 10.0, 30.0
STRUCTURES = ("liver", "tumour")
NAN = float("nan")


def structure_mask(labels: np.ndarray, structure: str) -> np.ndarray:
    """Boolean mask of ``"liver"`` (labels ≥ 1, tumour included) or ``"tumour"`` (labels == 2)."""
    labels = np.asarray(labels)
    if structure == "liver":
        return labels >= 1
    if structure == "tumour":
        return labels == 2
    raise ValueError(f"unknown structure {structure!r}; expected one of {STRUCTURES}")


# ------------------------------------------------------------------------------------------ overlap


def overlap_counts(prediction: np.ndarray, reference: np.ndarray) -> tuple[int, int, int]:
    """(|P∩T|, |P|, |T|) of two boolean masks."""
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} differ in shape")
    return int(np.count_nonzero(prediction & reference)), int(np.count_nonzero(prediction)), int(np.count_nonzero(reference))


def dice_from_counts(intersection: int, predicted: int, reference: int) -> float:
    total = predicted + reference
    return 1.0 if total == 0 else 2.0 * intersection / total


def sensitivity_from_counts(intersection: int, predicted: int, reference: int) -> float:
    if reference == 0:
        return 1.0 if predicted == 0 else NAN
    return intersection / reference


def ppv_from_counts(intersection: int, predicted: int, reference: int) -> float:
    if predicted == 0:
        return 1.0 if reference == 0 else NAN
    return intersection / predicted


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (LiTS convention)."""
    return dice_from_counts(*overlap_counts(prediction, reference))


def sensitivity(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Recall |P∩T| / |T|; 1.0 when both are empty, NaN when only the reference is empty."""
    return sensitivity_from_counts(*overlap_counts(prediction, reference))


def ppv(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Precision |P∩T| / |P|; 1.0 when both are empty, NaN when only the prediction is empty."""
    return ppv_from_counts(*overlap_counts(prediction, reference))


@dataclass
class GlobalDice:
    """Dice over many cases pooled together (LiTS "Dice global"): add cases or their counts, read ``value``."""

    intersection: int = 0
    total: int = 0
    cases: int = 0

    def add(self, prediction: np.ndarray, reference: np.ndarray) -> "GlobalDice":
        return self.add_counts(*overlap_counts(prediction, reference))

    def add_counts(self, intersection: int, predicted: int, reference: int) -> "GlobalDice":
        if not 0 <= intersection <= min(predicted, reference):
            raise ValueError(f"inconsistent counts: intersection {intersection}, predicted {predicted}, reference {reference}")
        self.intersection += int(intersection)
        self.total += int(predicted) + int(reference)
        self.cases += 1
        return self

    @property
    def value(self) -> float:
        """1.0 when every case was empty on both sides (the per-case convention, pooled)."""
        return 1.0 if self.total == 0 else 2.0 * self.intersection / self.total


# --------------------------------------------------------------------------------- surface distances


def _spacing_zyx(spacing_xyz: Sequence[float]) -> tuple[float, float, float]:
    if len(spacing_xyz) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing_xyz):
        raise ValueError(f"spacing must be three positive numbers (x, y, z) in mm, got {tuple(spacing_xyz)}")
    return tuple(float(s) for s in spacing_xyz[::-1])


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a mask: in the mask, with a face neighbour outside it (outside the array counts)."""
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, structure=CONNECTIVITY_6, border_value=0)


def surface_distances(prediction: np.ndarray, reference: np.ndarray, spacing_xyz: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm (float64) from each surface voxel of P to T's surface, and from T's to P's.

    Both arrays are empty when a mask is empty. The work is confined to the joint bounding box of both
    masks (grown by one voxel), which gives the same distances as the whole volume.
    """
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} differ in shape")
    sampling = _spacing_zyx(spacing_xyz)
    if not prediction.any() or not reference.any():
        return np.zeros(0), np.zeros(0)
    box = bounding_box(prediction | reference)
    # Pad with background so that a mask touching the volume's edge has its surface there.
    pred = np.pad(prediction[box], 1)
    ref = np.pad(reference[box], 1)
    pred_surface, ref_surface = surface_voxels(pred), surface_voxels(ref)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=sampling)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[ref_surface]
    return to_ref, to_pred


def surface_metrics(prediction: np.ndarray, reference: np.ndarray, spacing_xyz: Sequence[float]) -> dict[str, float]:
    """{"assd_mm", "hd95_mm"}: both 0 when both masks are empty, NaN when exactly one is (see module doc)."""
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    has_pred, has_ref = bool(prediction.any()), bool(reference.any())
    if not has_pred and not has_ref:
        _spacing_zyx(spacing_xyz)
        return {"assd_mm": 0.0, "hd95_mm": 0.0}
    if has_pred != has_ref:
        _spacing_zyx(spacing_xyz)
        return {"assd_mm": NAN, "hd95_mm": NAN}
    to_ref, to_pred = surface_distances(prediction, reference, spacing_xyz)
    pooled = np.concatenate([to_ref, to_pred])
    return {"assd_mm": float(pooled.mean()), "hd95_mm": float(np.percentile(pooled, 95))}


def assd(prediction: np.ndarray, reference: np.ndarray, spacing_xyz: Sequence[float]) -> float:
    """Average symmetric surface distance in mm (pooled over both directions)."""
    return surface_metrics(prediction, reference, spacing_xyz)["assd_mm"]


def hd95(prediction: np.ndarray, reference: np.ndarray, spacing_xyz: Sequence[float]) -> float:
    """95th percentile of the pooled symmetric surface distances, in mm."""
    return surface_metrics(prediction, reference, spacing_xyz)["hd95_mm"]


# ---------------------------------------------------------------------------------------- lesions


def detection_scores(matched_predicted: int, predicted: int, matched_reference: int, reference: int) -> dict[str, float]:
    """Lesion precision, recall and F1 from counts (per case or summed over cases); see the module doc."""
    if predicted == 0 and reference == 0:
        return {"lesion_precision": 1.0, "lesion_recall": 1.0, "lesion_f1": 1.0}
    precision = matched_predicted / predicted if predicted else NAN
    recall = matched_reference / reference if reference else NAN
    if predicted == 0 or reference == 0 or precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2.0 * precision * recall / (precision + recall)
    return {"lesion_precision": precision, "lesion_recall": recall, "lesion_f1": f1}


def _lesion_overlaps(pred_components, pred_count, ref_components, ref_count) -> np.ndarray:
    """(k, 2) array of the distinct (reference id, predicted id) pairs that share voxels."""
    both = (pred_components > 0) & (ref_components > 0)
    codes = ref_components[both].astype(np.int64) * (pred_count + 1) + pred_components[both]
    codes = np.unique(codes)
    return np.stack([codes // (pred_count + 1), codes % (pred_count + 1)], axis=1)


def lesion_detection(pred_tumour: np.ndarray, ref_tumour: np.ndarray) -> dict[str, float]:
    """Lesion counts (26-connected components), matches (≥ 1 shared voxel), precision, recall, F1."""
    pred_components, pred_count = label_lesions(pred_tumour)
    ref_components, ref_count = label_lesions(ref_tumour)
    pairs = _lesion_overlaps(pred_components, pred_count, ref_components, ref_count)
    matched_ref, matched_pred = len(np.unique(pairs[:, 0])), len(np.unique(pairs[:, 1]))
    return {
        "lesions_reference": ref_count, "lesions_predicted": pred_count,
        "lesions_reference_detected": matched_ref, "lesions_predicted_matched": matched_pred,
        **detection_scores(matched_pred, pred_count, matched_ref, ref_count),
    }


def equivalent_diameter_mm(voxels: int, spacing_xyz: Sequence[float]) -> float:
    """Diameter of the sphere with the volume of ``voxels`` voxels of this spacing."""
    volume = voxels * float(np.prod(_spacing_zyx(spacing_xyz)))
    return (6.0 * volume / math.pi) ** (1.0 / 3.0)


def size_stratum(diameter_mm: float) -> str:
    """"small" (< 10 mm), "medium" (10–30 mm inclusive) or "large" (> 30 mm)."""
    if diameter_mm < SMALL_MAX_MM:
        return "small"
    if diameter_mm <= MEDIUM_MAX_MM:
        return "medium"
    return "large"


def reference_lesion_scores(pred_tumour: np.ndarray, ref_tumour: np.ndarray, spacing_xyz: Sequence[float]) -> list[dict]:
    """One record per reference lesion, in the order of its id (:func:`.masks.label_lesions`, largest first):
    ``lesion`` (1..n), ``voxels``, ``volume_mm3``, ``diameter_mm``, ``stratum``, ``detected`` and ``dice``
    (reference lesion vs the union of the predicted components overlapping it)."""
    pred_tumour, ref_tumour = np.asarray(pred_tumour, bool), np.asarray(ref_tumour, bool)
    voxel_mm3 = float(np.prod(_spacing_zyx(spacing_xyz)))
    ref_components, ref_count = label_lesions(ref_tumour)
    if ref_count == 0:
        return []
    pred_components, pred_count = label_lesions(pred_tumour)
    ref_sizes = np.bincount(ref_components.ravel(), minlength=ref_count + 1)
    pred_sizes = np.bincount(pred_components.ravel(), minlength=pred_count + 1)
    # Every predicted voxel inside a reference lesion belongs to a component that overlaps it.
    inside = np.bincount(ref_components[pred_tumour], minlength=ref_count + 1)
    matched_size = np.zeros(ref_count + 1, np.int64)
    for ref_id, pred_id in _lesion_overlaps(pred_components, pred_count, ref_components, ref_count):
        matched_size[ref_id] += pred_sizes[pred_id]
    records = []
    for lesion in range(1, ref_count + 1):
        voxels = int(ref_sizes[lesion])
        diameter = equivalent_diameter_mm(voxels, spacing_xyz)
        records.append({
            "lesion": lesion, "voxels": voxels, "volume_mm3": voxels * voxel_mm3, "diameter_mm": diameter,
            "stratum": size_stratum(diameter), "detected": bool(inside[lesion] > 0),
            "dice": dice_from_counts(int(inside[lesion]), int(matched_size[lesion]), voxels),
        })
    return records


# ---------------------------------------------------------------------------------------- burden


def tumour_burden(labels: np.ndarray) -> float:
    """Tumour volume / liver volume (liver = labels ≥ 1); 0 when there is no liver."""
    labels = np.asarray(labels)
    liver = int(np.count_nonzero(labels >= 1))
    return 0.0 if liver == 0 else int(np.count_nonzero(labels == 2)) / liver


def burden_rmse(predicted: Iterable[float], reference: Iterable[float]) -> float:
    """Root mean square error of the tumour burden over cases (NaN for no cases)."""
    predicted, reference = np.asarray(list(predicted), float), np.asarray(list(reference), float)
    if predicted.shape != reference.shape:
        raise ValueError("predicted and reference burdens must have one value per case each")
    if predicted.size == 0:
        return NAN
    return float(np.sqrt(np.mean((predicted - reference) ** 2)))


# ---------------------------------------------------------------------------------------- per case


@dataclass
class CaseEvaluation:
    metrics: dict  # flat, JSON-friendly (int / float / NaN), see case_metrics
    lesions: list[dict] = field(default_factory=list)  # reference_lesion_scores of the tumour


def evaluate_case(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing_xyz: Sequence[float]) -> CaseEvaluation:
    """All per-case numbers (see :func:`case_metrics`) plus the per-reference-lesion records."""
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction {pred_labels.shape} and reference {ref_labels.shape} label maps differ in shape")
    voxel_ml = float(np.prod(_spacing_zyx(spacing_xyz))) / 1000.0
    metrics: dict = {}
    for structure in STRUCTURES:
        pred, ref = structure_mask(pred_labels, structure), structure_mask(ref_labels, structure)
        counts = overlap_counts(pred, ref)
        intersection, predicted, reference = counts
        metrics.update({
            f"{structure}_dice": dice_from_counts(*counts),
            f"{structure}_sensitivity": sensitivity_from_counts(*counts),
            f"{structure}_ppv": ppv_from_counts(*counts),
            **{f"{structure}_{k}": v for k, v in surface_metrics(pred, ref, spacing_xyz).items()},
            f"{structure}_intersection_voxels": intersection,
            f"{structure}_predicted_voxels": predicted,
            f"{structure}_reference_voxels": reference,
            f"{structure}_predicted_ml": predicted * voxel_ml,
            f"{structure}_reference_ml": reference * voxel_ml,
        })
    pred_tumour, ref_tumour = pred_labels == 2, ref_labels == 2
    metrics["tumour_burden_predicted"] = tumour_burden(pred_labels)
    metrics["tumour_burden_reference"] = tumour_burden(ref_labels)
    metrics["tumour_burden_error"] = metrics["tumour_burden_predicted"] - metrics["tumour_burden_reference"]
    metrics.update(lesion_detection(pred_tumour, ref_tumour))
    lesions = reference_lesion_scores(pred_tumour, ref_tumour, spacing_xyz)
    for stratum, _ in SIZE_STRATA:
        scores = [lesion["dice"] for lesion in lesions if lesion["stratum"] == stratum]
        metrics[f"lesions_{stratum}"] = len(scores)
        metrics[f"lesion_dice_{stratum}"] = float(np.mean(scores)) if scores else NAN
    return CaseEvaluation({k: _plain(v) for k, v in metrics.items()}, lesions)


def case_metrics(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing_xyz: Sequence[float]) -> dict:
    """Every per-case number, flat and JSON-friendly (ints, floats; NaN where undefined):

    ``{liver,tumour}_{dice,sensitivity,ppv,assd_mm,hd95_mm}``, their voxel counts
    (``_intersection_voxels``, ``_predicted_voxels``, ``_reference_voxels``) and volumes (``_predicted_ml``,
    ``_reference_ml``), ``tumour_burden_{predicted,reference,error}``, lesion detection
    (``lesions_reference``, ``lesions_predicted``, ``lesions_reference_detected``,
    ``lesions_predicted_matched``, ``lesion_precision``, ``lesion_recall``, ``lesion_f1``) and per size
    stratum the count of reference lesions and their mean per-lesion Dice (``lesions_small``,
    ``lesion_dice_small``, … ``_medium``, ``_large``).
    """
    return evaluate_case(pred_labels, ref_labels, spacing_xyz).metrics


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (ddof = 1), n) over the finite values; NaN where undefined."""
    array = np.asarray([v for v in values if v is not None], float)
    array = array[np.isfinite(array)]
    n = int(array.size)
    if n == 0:
        return NAN, NAN, 0
    return float(array.mean()), (float(array.std(ddof=1)) if n > 1 else NAN), n


def _plain(value):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    return float(value)
