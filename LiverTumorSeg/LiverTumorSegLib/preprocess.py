"""Preprocess stage: the one definition of the networks' input, shared by inference and training.

Paper §4.1: resample to 1.0 mm in-plane with a 3rd-order B-spline (labels: nearest neighbour), keep the
slice spacing, clip HU to [−100, 400] and rescale to [0, 255] (8-bit).

Field of view. The paper crops "224×224 around the liver region based on a coarse body mask", which
presupposes knowing where the liver is before segmenting it. We resolve it with the networks being fully
convolutional: the processing grid is cropped to the body's bounding box (air, the table and empty
field of view removed) and padded to a multiple of 32; training samples 224×224 tiles from it, mostly
centred on the liver with a random offset and partly anywhere in the body; at inference the liver
branch runs on the whole body crop in one pass per slice (no tiling seams) and the tumour branch on the
liver's bounding box only. See ``cascade.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .image_io import Geometry, Image


@dataclass(frozen=True)
class InputContract:
    """What a model bundle expects as input (stored in its manifest under "input")."""

    in_plane_spacing_mm: float = 1.0
    hu_window: tuple[float, float] = (-100.0, 400.0)
    stack_offsets: tuple[int, ...] = (-1, 0, 1)
    spatial_multiple: int = 32
    training_tile: int = 224

    def to_dict(self) -> dict:
        return {
            "in_plane_spacing_mm": self.in_plane_spacing_mm,
            "hu_window": list(self.hu_window),
            "intensity_range": [0, 255],
            "stack_offsets": list(self.stack_offsets),
            "spatial_multiple": self.spatial_multiple,
            "training_tile": self.training_tile,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "InputContract":
        """The contract from a manifest's "input"; ``ValueError`` when a value cannot work."""
        contract = cls(
            float(data["in_plane_spacing_mm"]),
            tuple(float(v) for v in data["hu_window"]),
            tuple(int(v) for v in data["stack_offsets"]),
            int(data["spatial_multiple"]),
            int(data["training_tile"]),
        )
        low, high = contract.hu_window if len(contract.hu_window) == 2 else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            raise ValueError(f"hu_window must be [low, high] with low < high, got {list(contract.hu_window)}")
        if not (np.isfinite(contract.in_plane_spacing_mm) and contract.in_plane_spacing_mm > 0):
            raise ValueError(f"in_plane_spacing_mm must be positive, got {contract.in_plane_spacing_mm}")
        if not contract.stack_offsets or contract.spatial_multiple < 1 or contract.training_tile < 1:
            raise ValueError("stack_offsets must be non-empty and spatial_multiple, training_tile positive")
        return contract


@dataclass
class PreparedVolume:
    """A canonical CT on the processing grid, cropped to the body: what the networks see."""

    intensities: np.ndarray  # uint8 (z, y, x), HU window rescaled to [0, 255]
    hu: np.ndarray  # int16 (z, y, x) Hounsfield units on the same crop (radiomics and volumetry need HU)
    grid: Geometry  # geometry of the full 1 mm in-plane grid (before the body crop)
    grid_shape: tuple[int, int, int]
    crop: tuple[slice, slice]  # (y, x) body crop within the full processing grid (may reach past its edges)
    labels: np.ndarray | None = field(default=None)  # uint8 labels on the same crop, when given

    def uncrop(self, array: np.ndarray, fill=0) -> np.ndarray:
        """Place a (z, y, x) array on the body crop back onto the full processing grid."""
        full = np.full(self.grid_shape, fill, dtype=array.dtype)
        inside, within = _overlap(self.crop, self.grid_shape[1:])
        full[:, inside[0], inside[1]] = array[:, within[0], within[1]]
        return full

    def crop_labels(self, image: Image, labels: np.ndarray) -> np.ndarray:
        """A label map on the grid of the canonical ``image`` this volume was prepared from, taken onto the
        same crop (nearest neighbour)."""
        on_grid = resample(image.with_array(labels.astype(np.uint8, copy=False)), self.grid, self.grid_shape,
                           order=0, fill=0).array
        return crop_padded(on_grid, self.crop)


def processing_grid(geometry: Geometry, shape_zyx: tuple[int, int, int], spacing_mm: float) -> tuple[Geometry, tuple]:
    """The grid with ``spacing_mm`` in-plane over the same physical extent, slices unchanged."""
    sx, sy, sz = geometry.spacing
    nz, ny, nx = shape_zyx
    new_nx = max(1, int(round(nx * sx / spacing_mm)))
    new_ny = max(1, int(round(ny * sy / spacing_mm)))
    # Keep the physical centre of the field of view: shift the origin by half the change in extent.
    d = geometry.direction_matrix
    shift = 0.5 * ((spacing_mm - sx) * d[:, 0] + (spacing_mm - sy) * d[:, 1])
    grid = Geometry((spacing_mm, spacing_mm, sz), tuple(np.asarray(geometry.origin) + shift), geometry.direction)
    return grid, (nz, new_ny, new_nx)


def resample(image: Image, grid: Geometry, shape_zyx: tuple, *, order: int, fill: float) -> Image:
    """Resample onto another grid with SimpleITK: order 3 = B-spline, 1 = linear, 0 = nearest neighbour."""
    interpolator = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}[order]
    reference = grid.apply_to(sitk.Image(list(shape_zyx[::-1]), sitk.sitkUInt8))
    source = image.to_sitk()
    out = sitk.Resample(source, reference, sitk.Transform(), interpolator, float(fill), source.GetPixelID())
    return Image.from_sitk(out)


def window_to_uint8(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip to the HU window and rescale linearly to [0, 255] (rounded)."""
    low, high = window
    scaled = (np.clip(hu, low, high, dtype=np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.rint(scaled).astype(np.uint8)


def body_crop(hu: np.ndarray, spacing_mm: float, multiple: int) -> tuple[slice, slice]:
    """In-plane bounding box of the patient's body, grown to a multiple of ``multiple`` pixels.

    The body is the largest connected region above −500 HU in the maximum projection along z, after an
    opening of ~6 mm that detaches the table and the blanket.
    """
    projection = (hu > -500).any(axis=0)
    radius = max(1, int(round(6.0 / spacing_mm)))
    opened = ndimage.binary_opening(projection, structure=_disk(radius))
    components, count = ndimage.label(opened)
    if count:
        sizes = ndimage.sum_labels(opened, components, index=np.arange(1, count + 1))
        body = components == (1 + int(np.argmax(sizes)))
    else:  # nothing body-like: keep the whole field of view
        body = np.ones_like(projection)
    ys, xs = np.nonzero(body)
    margin = int(round(5.0 / spacing_mm))
    return (
        grow_to_multiple(ys.min() - margin, ys.max() + 1 + margin, multiple),
        grow_to_multiple(xs.min() - margin, xs.max() + 1 + margin, multiple),
    )


def grow_to_multiple(start: int, stop: int, multiple: int) -> slice:
    """A slice around [start, stop) of a length that is a multiple of ``multiple``; may extend past
    the array (callers pad), centred on the requested range."""
    length = max(multiple, int(np.ceil((stop - start) / multiple)) * multiple)
    start = (start + stop) // 2 - length // 2
    return slice(int(start), int(start + length))


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def crop_padded(array: np.ndarray, crop: tuple[slice, slice], fill=0) -> np.ndarray:
    """``array[:, crop]`` where the crop may reach outside the array; outside is ``fill``."""
    out = np.full((array.shape[0], crop[0].stop - crop[0].start, crop[1].stop - crop[1].start), fill, array.dtype)
    inside, within = _overlap(crop, array.shape[1:])
    out[:, within[0], within[1]] = array[:, inside[0], inside[1]]
    return out


def _overlap(crop: tuple[slice, slice], shape_yx: tuple) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """The part of ``crop`` inside an array of ``shape_yx``: as slices of the array and of the crop."""
    inside = tuple(slice(max(c.start, 0), min(c.stop, n)) for c, n in zip(crop, shape_yx))
    within = tuple(slice(i.start - c.start, i.stop - c.start) for i, c in zip(inside, crop))
    return inside, within


def prepare_volume(image: Image, contract: InputContract, labels: np.ndarray | None = None) -> PreparedVolume:
    """Canonical CT (and optionally its label map) → 8-bit body crop on the 1 mm in-plane grid."""
    grid, shape = processing_grid(image.geometry, image.array.shape, contract.in_plane_spacing_mm)
    air = float(min(contract.hu_window[0], -1000.0))
    hu = resample(image.with_array(image.array.astype(np.float32, copy=False)), grid, shape, order=3, fill=air).array
    crop = body_crop(hu, contract.in_plane_spacing_mm, contract.spatial_multiple)
    hu_crop = crop_padded(np.clip(np.rint(hu), -32768, 32767).astype(np.int16), crop, fill=int(air))
    del hu
    intensities = window_to_uint8(hu_crop, contract.hu_window)
    prepared = PreparedVolume(intensities, hu_crop, grid, shape, crop)
    if labels is not None:
        prepared.labels = prepared.crop_labels(image, labels)
    return prepared


def slice_stacks(intensities: np.ndarray, z_indices: np.ndarray, offsets=(-1, 0, 1)) -> np.ndarray:
    """(N, len(offsets), H, W) float32 stacks of neighbouring slices around each z; ends repeat the edge slice."""
    z = np.asarray(z_indices)[:, None] + np.asarray(offsets)[None, :]
    z = np.clip(z, 0, intensities.shape[0] - 1)
    return intensities[z].astype(np.float32)


def labels_to_grid(labels: np.ndarray, source: Geometry, target: Geometry, target_shape: tuple) -> np.ndarray:
    """Label map (0/1/2) from the processing grid onto another grid (e.g. the input's).

    Each nested mask (liver ⊇ tumour) is resampled as a fraction with linear interpolation and kept where
    it is ≥ 0.5: smoother boundaries and more faithful volumes than nearest neighbour on a finer grid.
    """
    out = np.zeros(target_shape, dtype=np.uint8)
    for value in (1, 2):
        mask = Image((labels >= value).astype(np.float32), source)
        fraction = resample(mask, target, target_shape, order=1, fill=0.0).array
        out[fraction >= 0.5] = value
    return out
