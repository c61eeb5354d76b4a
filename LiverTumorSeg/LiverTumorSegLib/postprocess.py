"""Post-process stage (paper §3.3.1): soft liver and tumour probabilities → one label map 0/1/2.

Input: the cascade's liver and tumour probability maps, float (z, y, x) in [0, 1], on the processing
grid (1 mm in-plane, original slice spacing, z = slice axis). Output: a uint8 label map (0 background,
1 liver, 2 tumour; tumour ⊂ liver) and a JSON-serialisable dict saying what each step did.

Steps, each switchable through :class:`PostprocessOptions` (the paper's ablation):

1. **Otsu threshold per volume and channel** on the probabilities linearly scaled to 8 bits
   (``round(p·255)``). :func:`skimage.filters.threshold_otsu` returns τ* of the paper's formula, where
   class 0 is ``k ≤ τ`` and class 1 is ``k ≥ τ + 1``, so the foreground is the **strict** inequality
   ``u8 > τ``. Where the maximum is not unique (empty grey levels between the modes, common for a
   confident network) we take the middle of the maximising range, not its lowest end. Two guards,
   both recorded in the returned dict:

   * *constant or nearly empty map* (one grey level only, or fewer than ``otsu_min_voxels`` voxels
     above the lower clamp bound): Otsu has nothing to separate, τ falls back to 128 (p ≈ 0.5).
   * *a map that is almost all background*: Otsu is computed over the whole histogram, exactly as in
     the paper, and then clamped into ``otsu_range`` (default p ∈ [0.25, 0.75], i.e. 64…191).
     Why a clamp rather than computing Otsu only above a probability floor: Otsu's optimum lies
     midway between the two class means, and the background mean is ≈ 0 however imbalanced the
     volume is, so with a real foreground peak near 1 the whole-histogram threshold stays sane
     (simulated spheres covering 15 %, 1 % and 0.03 % of the volume: τ = 120, 107, 70). Cutting the
     histogram at a floor moves the lower class mean up to that of the uncertain boundary voxels and
     biases τ upwards (155, 142, 102 for the same maps with a floor at p = 0.05; 185, 177, 144 with
     p = 0.25), which shaves lesion borders. What does break Otsu is a channel without any
     foreground, e.g. the tumour map of a tumour-free liver: it then splits the background noise
     (τ = 30, p ≈ 0.12, on a noise map whose maximum is 0.22) and would paint speckles everywhere.
     The clamp removes exactly that failure and leaves ordinary cases untouched.

   ``otsu=False`` uses the fixed threshold 128 instead (the "fixed 0.5" ablation).
2. **3×3 in-plane morphological cleaning**, per slice (structuring element 1×3×3, so slices do not
   influence each other). The paper calls it a *closing* but writes (B ⊖ S) ⊕ S, erosion then
   dilation, which is an **opening**; we implement the opening, because the stated purpose of the
   step is to remove isolated false-positive voxels and small speckles, which an opening does and a
   closing (dilation first) cannot. Outside the array counts as background.
3. **Three-slice consistency** on the tumour mask ``y`` after cleaning, with the raw probability ``p``:
   restore ``y[z] = 0`` when ``y[z-1] = y[z+1] = 1`` and ``(p[z-1] + p[z+1]) / 2 > restore_probability``
   (0.6; compared in the probability's own dtype so that a mean of exactly 0.6 is not restored);
   drop ``y[z] = 1`` when ``y[z-1] = y[z+1] = 0``. Both rules are evaluated at the same (y, x) and
   computed from the same input mask ``y`` (not one after the other), as the paper's definition of
   ỹ in terms of ``y`` reads; together they act as a median of three along z. The slices outside the
   volume count as background: a voxel on the first or last slice is kept only with support from its
   one neighbour, and can never be restored. Note the consequences of the simultaneous evaluation:
   a tumour that is present only in slices z-1 and z+1 becomes the single slice z (its two ends lose
   their support, the gap is restored), and a lesion that appears in one slice only is removed
   (with 1–3 mm slices that is below the paper's resolution; with thicker slices small lesions can be
   lost, which is the trade-off the paper accepts).
4. **Tumour confined to the liver**: the liver mask is the largest 3D connected component (6-connected,
   which does not join the liver to a neighbouring organ through a single diagonal voxel) of
   liver ∪ tumour — the tumour is part of the organ, and a lesion at the capsule that the liver
   channel missed still belongs to it — with holes filled slice by slice (axial): intrahepatic
   vessels and lesion cores enclosed in a slice become liver, as in the LiTS reference masks, while
   a 3D fill would miss the vessels that run out of the organ at the hilum. Tumour := tumour ∩ liver,
   so tumour in other organs (spleen, kidney) is removed.

``progress(stage, fraction)`` is called with stage ``"postprocess"``; ``cancel()`` returning True raises
:class:`~.errors.Cancelled` between steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from .errors import Cancelled
from .masks import bounding_box

STAGE = "postprocess"
#: Threshold on the 0..255 scale used when Otsu is off or has nothing to separate (u8 > 128, p ≈ 0.5).
FALLBACK_THRESHOLD = 128
#: 3×3 square in-plane structuring element, one slice thick (per-slice morphology in one vectorised call).
IN_PLANE_3X3 = np.ones((1, 3, 3), dtype=bool)
#: Face connectivity in 3D for the largest liver component.
CONNECTIVITY_6 = ndimage.generate_binary_structure(3, 1)
#: In-plane 4-connectivity for per-slice hole filling: the background outside the liver in a slice
#: reaches the slice border through 4-connected paths, the standard 2D choice for a foreground that is
#: 8-connected. One slice thick, so the fill never crosses slices.
IN_PLANE_CROSS = ndimage.generate_binary_structure(2, 1)[None]


@dataclass
class PostprocessOptions:
    """Switches and parameters of :func:`postprocess`; the defaults are the paper's pipeline."""

    morphology: bool = True
    slice_consistency: bool = True
    restore_probability: float = 0.6
    #: Otsu per volume and channel; False = fixed threshold 128 (p ≈ 0.5).
    otsu: bool = True
    #: Clamp for the Otsu threshold, as probabilities (see the module documentation for why).
    otsu_range: tuple[float, float] = (0.25, 0.75)
    #: Fewer voxels than this above the lower clamp bound → fall back to 128.
    otsu_min_voxels: int = 10
    #: Liver := largest 3D component of liver ∪ tumour, tumour := tumour ∩ liver.
    largest_component: bool = True
    #: Fill enclosed holes of the liver mask slice by slice.
    fill_liver_holes: bool = True


def postprocess(
    liver_prob: np.ndarray,
    tumour_prob: np.ndarray,
    options: Optional[PostprocessOptions] = None,
    progress: Optional[Callable[[str, float], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> tuple[np.ndarray, dict]:
    """Turn the two probability maps into a uint8 label map (0/1/2, tumour ⊂ liver) and a summary dict.

    ``options`` defaults to ``PostprocessOptions()``, the paper's pipeline.
    """
    options = options if options is not None else PostprocessOptions()
    liver_prob = _check_probability(liver_prob, "liver")
    tumour_prob = _check_probability(tumour_prob, "tumour")
    if liver_prob.shape != tumour_prob.shape:
        raise ValueError(f"liver and tumour probability maps differ in shape: {liver_prob.shape} vs {tumour_prob.shape}")
    low, high = options.otsu_range
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"otsu_range must satisfy 0 <= low <= high <= 1, got {options.otsu_range}")

    def step(fraction: float) -> None:
        if cancel is not None and cancel():
            raise Cancelled("Post-processing was cancelled; nothing was written.")
        if progress is not None:
            progress(STAGE, fraction)

    info: dict = {"options": _jsonable(asdict(options)), "steps": []}
    step(0.0)

    # 1. Threshold (foreground: strictly above τ on the 8-bit scale).
    thresholds = {}
    masks = {}
    for name, prob in (("liver", liver_prob), ("tumour", tumour_prob)):
        u8 = to_uint8(prob)
        thresholds[name] = choose_threshold(u8, options)
        masks[name] = u8 > thresholds[name]["value"]
        del u8
    liver, tumour = masks["liver"], masks["tumour"]
    info["thresholds"] = thresholds
    info["steps"].append("threshold")
    step(0.3)

    # 2. Per-slice 3×3 opening.
    if options.morphology:
        removed = {}
        for name in ("liver", "tumour"):
            before = int(np.count_nonzero(masks[name]))
            masks[name] = opening_per_slice(masks[name])
            removed[name] = before - int(np.count_nonzero(masks[name]))
        liver, tumour = masks["liver"], masks["tumour"]
        info["morphology"] = {"operation": "opening 3x3 per slice", "removed_voxels": removed}
        info["steps"].append("morphology")
    step(0.5)

    # 3. Three-slice consistency of the tumour mask.
    if options.slice_consistency:
        tumour, restored, dropped = three_slice_consistency(tumour, tumour_prob, options.restore_probability)
        info["slice_consistency"] = {"restored_voxels": restored, "dropped_voxels": dropped}
        info["steps"].append("slice_consistency")
    step(0.7)

    # 4. Liver = organ containing the tumour; tumour confined to it.
    liver = liver | tumour
    liver_info: dict = {}
    if options.largest_component:
        before = int(np.count_nonzero(liver))
        liver = largest_component(liver)
        liver_info["outside_largest_component_voxels"] = before - int(np.count_nonzero(liver))
        info["steps"].append("largest_component")
    step(0.85)
    if options.fill_liver_holes:
        before = int(np.count_nonzero(liver))
        liver = fill_holes_per_slice(liver)
        liver_info["holes_filled_voxels"] = int(np.count_nonzero(liver)) - before
        info["steps"].append("fill_liver_holes")
    before = int(np.count_nonzero(tumour))
    tumour &= liver
    liver_info["tumour_outside_liver_removed_voxels"] = before - int(np.count_nonzero(tumour))
    info["liver"] = liver_info

    labels = liver.astype(np.uint8)
    labels[tumour] = 2
    info["voxels"] = {"liver_including_tumour": int(np.count_nonzero(liver)), "tumour": int(np.count_nonzero(tumour))}
    step(1.0)
    return labels, info


# ------------------------------------------------------------------------------------------ building blocks


def to_uint8(prob: np.ndarray) -> np.ndarray:
    """Linear scaling of [0, 1] to the 8-bit range [0, 255] (rounded to nearest)."""
    scaled = np.multiply(prob, prob.dtype.type(255))  # one temporary, worked on in place
    np.clip(scaled, 0, 255, out=scaled)
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint8)


def choose_threshold(u8: np.ndarray, options: PostprocessOptions) -> dict:
    """Threshold τ on the 0..255 scale (foreground ``u8 > τ``), with how it was chosen.

    Returns ``{"value", "probability", "method", "otsu"}``; method is ``otsu``, ``otsu_clamped``,
    ``fallback`` (constant or nearly empty map) or ``fixed`` (Otsu switched off).
    """
    low = int(round(options.otsu_range[0] * 255.0))
    high = int(round(options.otsu_range[1] * 255.0))
    result: dict = {"otsu": None}
    if not options.otsu:
        value, method = FALLBACK_THRESHOLD, "fixed"
    else:
        counts = np.bincount(u8.ravel(), minlength=256).astype(np.float64)
        if np.count_nonzero(counts) < 2 or counts[low + 1:].sum() < options.otsu_min_voxels:
            value, method = FALLBACK_THRESHOLD, "fallback"
        else:
            levels = np.arange(256)
            # Between two modes separated by empty grey levels every split in the gap has the same
            # between-class variance, and argmax returns the lowest one (just above the background mode).
            # Running Otsu on the mirrored histogram gives the highest maximiser; the middle of the two is
            # the split with the widest margin on both sides (for a two-level map 5 / 242 it is 123).
            first = int(threshold_otsu(hist=(counts, levels)))
            last = 254 - int(threshold_otsu(hist=(counts[::-1], levels)))
            otsu = (first + max(first, last)) // 2
            result["otsu"] = otsu
            value = min(max(otsu, low), high)
            method = "otsu" if value == otsu else "otsu_clamped"
    result.update(value=int(value), probability=round(value / 255.0, 4), method=method)
    return result


def three_slice_consistency(
    mask: np.ndarray, prob: np.ndarray, restore_probability: float = 0.6
) -> tuple[np.ndarray, int, int]:
    """Paper's three-slice rule along axis 0 (z); both rules from the same input ``mask``.

    Returns the new mask and the numbers of restored and dropped voxels. Slices outside the volume count
    as background. Vectorised with shifted slices of the whole volume.
    """
    mask = np.asarray(mask, dtype=bool)
    below = np.zeros_like(mask)  # y[z-1]
    above = np.zeros_like(mask)  # y[z+1]
    below[1:] = mask[:-1]
    above[:-1] = mask[1:]

    drop = mask & ~below & ~above
    restore = ~mask & below & above  # never true on the first or last slice
    z, y, x = np.nonzero(restore)
    if z.size:
        # Mean of the raw probabilities, in their own dtype so that the comparison with the threshold is exact.
        threshold = prob.dtype.type(restore_probability)
        mean = (prob[z - 1, y, x] + prob[z + 1, y, x]) / prob.dtype.type(2)
        keep = mean > threshold
        restore[z[~keep], y[~keep], x[~keep]] = False
    out = (mask & ~drop) | restore
    return out, int(np.count_nonzero(restore)), int(np.count_nonzero(drop))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 6-connected 3D component of ``mask`` (computed inside its bounding box to save memory)."""
    box = bounding_box(mask)
    out = np.zeros_like(mask, dtype=bool)
    if box is None:
        return out
    labelled, count = ndimage.label(mask[box], structure=CONNECTIVITY_6)
    if count <= 1:
        out[box] = labelled > 0
        return out
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    out[box] = labelled == int(np.argmax(sizes))
    return out


def opening_per_slice(mask: np.ndarray) -> np.ndarray:
    """3×3 in-plane binary opening of every slice (outside the array counts as background)."""
    return _within_box(mask, lambda box: ndimage.binary_opening(box, structure=IN_PLANE_3X3))


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill holes of each axial slice (a structure one slice thick keeps the fill within each slice)."""
    return _within_box(mask, lambda box: ndimage.binary_fill_holes(box, structure=IN_PLANE_CROSS))


# ---------------------------------------------------------------------------------------------- internals


def _check_probability(prob: np.ndarray, name: str) -> np.ndarray:
    prob = np.asarray(prob)
    if prob.ndim != 3:
        raise ValueError(f"the {name} probability map must be 3D (z, y, x), got shape {prob.shape}")
    if not np.issubdtype(prob.dtype, np.floating):
        raise ValueError(f"the {name} probability map must be floating point in [0, 1], got {prob.dtype}")
    if prob.dtype != np.float32 and prob.dtype != np.float64:
        prob = prob.astype(np.float32)
    if not np.isfinite(prob).all():
        raise ValueError(f"the {name} probability map contains NaN or infinite values")
    low, high = (float(prob.min()), float(prob.max())) if prob.size else (0.0, 0.0)
    if low < -1e-3 or high > 1.0 + 1e-3:  # small excursions from float arithmetic are clipped
        raise ValueError(f"the {name} probability map must lie in [0, 1], found {low:.3g}…{high:.3g} "
                         "(logits or unnormalised scores?)")
    return prob


def _within_box(mask: np.ndarray, operation: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a binary operation inside the mask's bounding box only.

    Exact for the opening and the hole filling: everything outside the box is background, which is what
    both operations assume beyond the array's border, so cropping changes no voxel and saves the passes
    over the empty rest of the volume.
    """
    box = bounding_box(mask)
    out = np.zeros(mask.shape, dtype=bool)
    if box is not None:
        out[box] = operation(mask[box])
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
