"""Cascaded 2.5D network stage: liver and tumour probability maps from ONNX Runtime.

The liver branch runs on every slice of the body crop (fully convolutional, batched over slices). Its
probability map locates the liver; the tumour branch then runs only on the slices and the in-plane box
that hold liver (plus a margin), with the liver probability as its fourth input channel (paper §3.1).

The box holds every voxel that post-processing could keep as liver: all liver-like components at the
lowest probability its Otsu threshold can take (``PostprocessOptions.otsu_range[0]``), not only the
largest one at p > 0.5, so that tumour in a second liver part or in liver between the two thresholds
gets a tumour probability.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

from .bundle import Bundle
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
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (liver, tumour) float32 probability maps on the body crop of ``prepared``.

    Each batch's result goes straight into the maps: beside the input, only the two maps are held, whatever
    the number of slices.
    """
    offsets = bundle.contract.stack_offsets
    volume = prepared.intensities
    liver = np.empty(volume.shape, dtype=np.float32)

    def store_liver(batch, result):
        liver[batch] = result

    _run_branch(bundle.session("liver", device=device, threads=threads), volume, offsets, batch_size,
                "liver network", progress, cancel, store_liver)
    tumour = np.zeros_like(liver)
    box = liver_box(liver > LIVER_BOX_PROBABILITY, bundle.contract.spatial_multiple)
    if box is None:
        if progress:
            progress("tumour network", 1.0)
        return liver, tumour
    zs, ys, xs = box
    # The box may reach past the crop (grown to the networks' multiple): inputs are padded, and only the part
    # inside the crop is kept.
    y_in = slice(max(ys.start, 0), min(ys.stop, volume.shape[1]))
    x_in = slice(max(xs.start, 0), min(xs.stop, volume.shape[2]))
    inside = (slice(y_in.start - ys.start, y_in.stop - ys.start), slice(x_in.start - xs.start, x_in.stop - xs.start))

    def liver_channel(batch):
        return crop_padded(liver[zs.start + batch], (ys, xs))

    def store_tumour(batch, result):
        tumour[zs.start + batch, y_in, x_in] = result[(slice(None), *inside)]

    _run_branch(bundle.session("tumour", device=device, threads=threads), crop_padded(volume[zs], (ys, xs)),
                offsets, batch_size, "tumour network", progress, cancel, store_tumour, liver_channel)
    return liver, tumour


def liver_box(mask: np.ndarray, multiple: int) -> tuple[slice, slice, slice] | None:
    """(z, y, x) box around every liver-like component (the largest, and all others of at least
    :data:`LIVER_BOX_MIN_VOXELS`), with a margin; ``None`` if there is none.

    The in-plane size is grown to a multiple of ``multiple``; it may reach past the crop (padded later).
    """
    components, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = ndimage.sum_labels(mask, components, index=np.arange(1, count + 1))
    kept = (sizes >= LIVER_BOX_MIN_VOXELS) | (sizes == sizes.max())
    boxes = [box for box, keep in zip(ndimage.find_objects(components), kept) if keep]
    z, y, x = (slice(min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes)) for axis in range(3))
    zs = slice(max(z.start - LIVER_BOX_MARGIN_SLICES, 0), min(z.stop + LIVER_BOX_MARGIN_SLICES, mask.shape[0]))
    ys = grow_to_multiple(y.start - LIVER_BOX_MARGIN_PX, y.stop + LIVER_BOX_MARGIN_PX, multiple)
    xs = grow_to_multiple(x.start - LIVER_BOX_MARGIN_PX, x.stop + LIVER_BOX_MARGIN_PX, multiple)
    return zs, ys, xs


def _run_branch(session, volume, offsets, batch_size, stage, progress, cancel,
                store: Callable[[np.ndarray, np.ndarray], None],
                extra_channel: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    """Run a branch on every slice of ``volume`` in batches: ``store(slice indices, probabilities)`` per batch;
    ``extra_channel(slice indices)`` gives a 4th input channel (the tumour branch's liver probability)."""
    input_name = session.get_inputs()[0].name
    total = volume.shape[0]
    for start in range(0, total, batch_size):
        if cancel and cancel():
            raise Cancelled("Segmentation cancelled; nothing was written.")
        batch = np.arange(start, min(start + batch_size, total))
        stacks = slice_stacks(volume, batch, offsets)
        if extra_channel is not None:
            stacks = np.concatenate([stacks, extra_channel(batch)[:, None]], axis=1)
        store(batch, session.run(None, {input_name: stacks})[0][:, 0])
        if progress:
            progress(stage, min(1.0, (start + len(batch)) / total))
