"""Binary-mask helpers every stage shares: bounding boxes and the lesion numbering.

* **Bounding box** (:func:`bounding_box`): the smallest box of array slices that holds every voxel of a
  mask; :func:`grow_box` widens a box by a margin, clipped to the array.
* **Lesions** (:func:`label_lesions`): the 26-connected components of a tumour mask (a lesion touching
  itself only diagonally, e.g. across thick slices, stays one lesion), numbered 1..n by decreasing voxel
  count, ties broken by the array order of each component's first voxel. Volumetry, the per-lesion
  segments of the ``.seg.nrrd``, the radiomics filter's candidates, the metrics and surgical planning all
  number lesions with this one function, so a lesion has the same id everywhere.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
from scipy import ndimage

#: 26-connectivity of lesions (every voxel sharing a face, an edge or a corner is a neighbour).
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)

Box = tuple[slice, ...]


def bounding_box(mask: np.ndarray) -> Optional[Box]:
    """The bounding box of the non-zero voxels of ``mask`` as one slice per axis; None when it is empty."""
    objects = ndimage.find_objects(np.ascontiguousarray(mask, dtype=bool).view(np.uint8))
    return objects[0] if objects else None


def grow_box(box: Box, margin: Union[int, Sequence[int]], shape: Sequence[int]) -> Box:
    """``box`` grown by ``margin`` voxels on both sides of each axis (one number, or one per axis), clipped
    to an array of ``shape``."""
    margins = [int(margin)] * len(shape) if np.isscalar(margin) else [int(m) for m in margin]
    return tuple(slice(max(s.start - m, 0), min(s.stop + m, int(n))) for s, m, n in zip(box, margins, shape))


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Lesion ids of a tumour mask (see the module notes) and their number n.

    The id map has the mask's shape, 0 outside the lesions, in the smallest unsigned integer type that
    holds n. The components are labelled inside the mask's bounding box only; ids do not depend on the
    box (cropping keeps both the sizes and the array order of the components).
    """
    mask = np.asarray(mask, dtype=bool)
    box = bounding_box(mask)
    if box is None:
        return np.zeros(mask.shape, np.uint8), 0
    components, count = ndimage.label(mask[box], structure=CONNECTIVITY_26)
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")  # component (0-based, array order) by decreasing size
    dtype = np.uint8 if count < 2**8 else np.uint16 if count < 2**16 else np.uint32
    rank = np.zeros(count + 1, dtype=dtype)
    rank[order + 1] = np.arange(1, count + 1)
    lesions = np.zeros(mask.shape, dtype=dtype)
    lesions[box] = rank[components]
    return lesions, int(count)
