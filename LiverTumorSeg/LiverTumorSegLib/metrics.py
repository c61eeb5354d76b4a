"""Segmentation metrics (LiTS conventions)."""

from __future__ import annotations

import numpy as np


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (LiTS convention)."""
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    total = int(prediction.sum()) + int(reference.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, reference).sum()) / total
