"""Cascaded 2.5D network stage: liver and tumour probability maps from ONNX Runtime.

The liver branch runs on every slice of the body crop (fully convolutional, batched over slices). Its
probability map locates the liver; the tumour branch then runs only on the slices and the in-plane box
that hold liver (plus a margin), with the liver probability as its fourth input channel (paper §3.1).

The box holds every voxel that post-processing could keep as liver: all liver-like components at the
lowest probability its Otsu threshold can take (``PostprocessOptions.otsu_range[0]``), not only the
largest one at p > 0.5, so that tumour in a second liver part or in liver between the two thresholds
gets a tumour probability.

Multi-scale liver inference: the liver branch can run at several in-plane zooms of the crop (the bundle's
``inference.liver_scales``, within the 0.8–1.25 scale augmentation the networks were trained with) and its
probabilities, taken back to the crop's grid, are averaged. A zoom > 1 shows the network the anatomy larger,
as if the pixels were finer. The scales are chosen per bundle on its validation cases
(``livertumorseg-train tune-liver-scales``); a bundle without the entry runs at scale 1 only. The average is
only the liver map of post-processing: the tumour branch gets its box and its fourth channel from the
unzoomed liver probability, exactly as without zooms, so zooms change the liver and never the tumour
probabilities. Fed the average, or boxed by it, the shipped cascade's tumour Dice on its validation phantoms
fell: its false-positive blobs change with the box's position by a few pixels (after five poolings the tumour
network is not shift-invariant).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from .bundle import Bundle, check_liver_scales
from .errors import Cancelled
from .postprocess import PostprocessOptions
from .preprocess import PreparedVolume, crop_padded, grow_to_multiple, slice_stacks

#: Margin around the located liver, in processing-grid pixels (mm at 1 mm) and slices.
LIVER_BOX_MARGIN_PX = 16
LIVER_BOX_MARGIN_SLICES = 2
#: Liver probability above which a voxel may end up as liver: the lowest threshold post-processing can choose.
LIVER_BOX_PROBABILITY = PostprocessOptions().otsu_range[0]
#: Liver-like components smaller than this (voxels; ≈ 1 mL at 1 mm) are speckle and do not widen the box.
LIVER_BOX_MIN_VOXELS = 1000

Progress = Callable[[str, float], None]


def run_cascade(
    prepared: PreparedVolume,
    bundle: Bundle,
    *,
    device: str = "cpu",
    threads: int | None = None,
    batch_size: int = 8,
    liver_scales: Sequence[float] | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (liver, tumour) float32 probability maps on the body crop of ``prepared``.

    ``liver_scales``: the in-plane zooms the liver branch runs at (mean of their probabilities); default the
    bundle's :attr:`~.bundle.Bundle.liver_scales`.
    """
    contract = bundle.contract
    offsets = contract.stack_offsets
    scales = bundle.liver_scales if liver_scales is None else check_liver_scales(liver_scales)
    volume = prepared.intensities
    session = bundle.session("liver", device=device, threads=threads)
    zoomed = [scale for scale in scales if scale != 1.0]
    passes = len(zoomed) + 1

    def pass_progress(number):
        return lambda stage, fraction: progress(stage, (number + fraction) / passes) if progress else None

    def liver_pass(number, scale, add_to=None):
        return _run_branch(session, volume, None, np.arange(volume.shape[0]), offsets, batch_size, "liver network",
                           pass_progress(number), cancel, scale=scale, multiple=contract.spatial_multiple,
                           add_to=add_to)

    # The tumour branch's box and fourth channel come from the unzoomed liver probability (see the module notes).
    liver = liver_pass(0, 1.0)
    box = liver_box(liver > LIVER_BOX_PROBABILITY, contract.spatial_multiple)
    sub_liver = None if box is None else crop_padded(liver[box[0]], box[1:])
    if zoomed:  # the average is built in place: no second whole-volume map
        liver *= np.float32(scales.count(1.0))
        for number, scale in enumerate(zoomed, start=1):
            liver_pass(number, scale, add_to=liver)
        liver /= np.float32(len(scales))
    tumour = np.zeros_like(liver)
    if box is None:
        if progress:
            progress("tumour network", 1.0)
        return liver, tumour
    zs, ys, xs = box
    sub_volume = crop_padded(volume[zs], (ys, xs))
    sub_tumour = _run_branch(
        bundle.session("tumour", device=device, threads=threads), sub_volume, sub_liver,
        np.arange(sub_volume.shape[0]), offsets, batch_size, "tumour network", progress, cancel,
    )
    y_in = slice(max(ys.start, 0), min(ys.stop, volume.shape[1]))
    x_in = slice(max(xs.start, 0), min(xs.stop, volume.shape[2]))
    tumour[zs, y_in, x_in] = sub_tumour[:, y_in.start - ys.start : y_in.stop - ys.start, x_in.start - xs.start : x_in.stop - xs.start]
    return liver, tumour


def liver_box(mask: np.ndarray, multiple: int) -> tuple[slice, slice, slice] | None:
    """(z, y, x) box around every liver-like component (the largest, and all others of at least
    :data:`LIVER_BOX_MIN_VOXELS`), with a margin; ``None`` if there is none.

    The in-plane size is grown to a multiple of ``multiple``; it may reach past the crop (padded later).
    """
    components, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = _component_sizes(components, count)
    kept = (sizes >= LIVER_BOX_MIN_VOXELS) | (sizes == sizes.max())
    boxes = [box for box, keep in zip(ndimage.find_objects(components), kept) if keep]
    z, y, x = (slice(min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes)) for axis in range(3))
    zs = slice(max(z.start - LIVER_BOX_MARGIN_SLICES, 0), min(z.stop + LIVER_BOX_MARGIN_SLICES, mask.shape[0]))
    ys = grow_to_multiple(y.start - LIVER_BOX_MARGIN_PX, y.stop + LIVER_BOX_MARGIN_PX, multiple)
    xs = grow_to_multiple(x.start - LIVER_BOX_MARGIN_PX, x.stop + LIVER_BOX_MARGIN_PX, multiple)
    return zs, ys, xs


def _component_sizes(components: np.ndarray, count: int, slices: int = 16) -> np.ndarray:
    """Voxel counts of components 1..count, counted a few slices at a time: scipy's ``sum_labels`` and one
    whole-volume ``bincount`` copy the label map as 64-bit values (gigabytes on a long scan)."""
    sizes = np.zeros(count + 1, dtype=np.int64)
    for first in range(0, components.shape[0], slices):
        sizes += np.bincount(components[first:first + slices].ravel(), minlength=count + 1)
    return sizes[1:]


def _run_branch(session, volume, liver_prob, z_indices, offsets, batch_size, stage, progress, cancel, *,
                scale: float = 1.0, multiple: int = 1, add_to: np.ndarray | None = None) -> np.ndarray:
    """The branch's probability on every slice of ``z_indices`` (added into ``add_to`` when given, which is
    returned); at ``scale`` ≠ 1 (liver branch: no fourth channel) the slices are zoomed in-plane, padded to a
    multiple of ``multiple`` and the probabilities zoomed back."""
    input_name = session.get_inputs()[0].name
    out = np.zeros(volume.shape, dtype=np.float32) if add_to is None else add_to
    total = len(z_indices)
    for start in range(0, total, batch_size):
        if cancel and cancel():
            raise Cancelled("Segmentation cancelled; nothing was written.")
        batch = z_indices[start : start + batch_size]
        if scale == 1.0:
            stacks = slice_stacks(volume, batch, offsets)
            if liver_prob is not None:
                stacks = np.concatenate([stacks, liver_prob[batch][:, None]], axis=1)
            out[batch] += session.run(None, {input_name: stacks})[0][:, 0]
        else:
            out[batch] += _zoomed_run(session, input_name, volume, batch, offsets, scale, multiple)
        if progress:
            progress(stage, min(1.0, (start + len(batch)) / total))
    return out


def _zoomed_run(session, input_name: str, volume: np.ndarray, batch: np.ndarray, offsets, scale: float,
                multiple: int) -> np.ndarray:
    """One batch of the liver branch on the in-plane zoom of ``volume``: only the slices the batch's stacks use
    are zoomed (bilinear, rounded to the uint8 grey levels the network reads), padded with air (0) to a multiple
    of ``multiple``; the probabilities are zoomed back onto the volume's grid."""
    first = max(int(batch.min()) + min(offsets), 0)
    last = min(int(batch.max()) + max(offsets), volume.shape[0] - 1)
    zoomed = ndimage.zoom(volume[first:last + 1], (1, scale, scale), order=1, grid_mode=True, mode="nearest")
    pad = [(0, 0)] + [(0, (-size) % multiple) for size in zoomed.shape[1:]]
    stacks = slice_stacks(np.pad(zoomed, pad), batch - first, offsets)
    probability = session.run(None, {input_name: stacks})[0][:, 0, : zoomed.shape[1], : zoomed.shape[2]]
    height, width = volume.shape[1:]
    back = ndimage.zoom(probability, (1, height / probability.shape[1], width / probability.shape[2]), order=1,
                        grid_mode=True, mode="nearest")
    return np.clip(back, 0.0, 1.0, out=back)
