"""Preprocess stage: the one definition of the networks' input, shared by inference and training.

Paper §4.1: resample to 1.0 mm in-plane with a 3rd-order B-spline (labels: nearest neighbour), keep the
slice spacing, clip HU to [−100, 400] and rescale to [0, 255] (8-bit). Only the in-plane spacing changes,
so the resampling runs in-plane only (:class:`InPlaneResampling`), a few slices at a time.

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
from typing import Iterator

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
        on_grid = resample_in_plane(labels.astype(np.uint8, copy=False), image.geometry, self.grid, self.grid_shape,
                                    order=0, fill=0)
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


#: Slices resampled together: bounds the float32 temporaries (16 slices of 512×512: 16 MB) on any volume length.
SLAB_SLICES = 16
#: Output rows per block of an axis's resampling matrix; each block reads only the input columns it needs.
BAND_ROWS = 32
#: Weights below this are dropped from the B-spline's resampling matrix. The B-spline prefilter makes every
#: weight non-zero, decaying by (2 − √3) ≈ 0.27 per pixel; cutting at 1e-7 changes values of up to 3000 HU by
#: less than 1e-3 HU.
WEIGHT_CUTOFF = 1e-7
#: Boundary conditions of SimpleITK's interpolators (kept so that the result matches :func:`resample`):
#: linear interpolation repeats the edge pixel, the B-spline's coefficients are mirrored.
_SCIPY_MODE = {1: "nearest", 3: "mirror"}


@dataclass(frozen=True)
class _AxisResampling:
    """One in-plane axis: which output samples lie inside the input, and how they are computed from it."""

    inside: np.ndarray  # bool per output sample (SimpleITK's rule: continuous index in [−0.5, n − 0.5))
    nearest: np.ndarray | None  # order 0: the input index of each output sample
    bands: tuple  # orders 1, 3: (output rows, input columns, float32 weights) blocks of the resampling matrix


def _axis_resampling(source_size: int, start: float, step: float, target_size: int, order: int) -> _AxisResampling:
    """Output sample i lies at continuous input index ``start + step * i``."""
    position = start + step * np.arange(target_size)
    inside = (position >= -0.5) & (position < source_size - 0.5)
    if order == 0:  # SimpleITK rounds half-way positions up
        return _AxisResampling(inside, np.clip(np.floor(position + 0.5), 0, source_size - 1).astype(np.intp), ())
    # The resampling matrix, row i = the weights of output sample i, from scipy's spline interpolation of each
    # unit vector (the identity's second axis is sampled at its own integer positions, which leaves it as it is).
    weights = ndimage.affine_transform(np.eye(source_size), [step, 1.0], offset=[start, 0.0],
                                       output_shape=(target_size, source_size), order=order, mode=_SCIPY_MODE[order])
    weights[~inside] = 0.0
    weights[np.abs(weights) < WEIGHT_CUTOFF] = 0.0
    bands = []
    for first in range(0, target_size, BAND_ROWS):
        rows = slice(first, min(first + BAND_ROWS, target_size))
        used = np.flatnonzero(weights[rows].any(axis=0))
        if used.size:
            columns = slice(int(used[0]), int(used[-1]) + 1)
            bands.append((rows, columns, np.ascontiguousarray(weights[rows, columns], dtype=np.float32)))
    return _AxisResampling(inside, None, tuple(bands))


@dataclass(frozen=True)
class InPlaneResampling:
    """Resampling between two grids with the same slices that differ only in-plane (spacing, extent), such as
    a canonical CT and its processing grid: the same result as :func:`resample`, one in-plane axis at a time.

    Written here because SimpleITK and scipy interpolate point by point in every dimension (a 3D B-spline
    weighs 64 voxels per output voxel, of which the slice axis contributes nothing new when the slices stay).
    Along one axis, resampling is one matrix for every row of every slice: scipy's spline interpolation
    provides the matrix, BLAS applies it (in blocks of :data:`BAND_ROWS` rows, as it is banded).
    """

    x: _AxisResampling
    y: _AxisResampling
    order: int
    fill: float

    @classmethod
    def between(cls, source: Geometry, source_shape: tuple, target: Geometry, target_shape: tuple, *,
                order: int, fill: float) -> "InPlaneResampling":
        """``order`` 3 = B-spline, 1 = linear, 0 = nearest neighbour; ``fill`` outside the source.

        ``ValueError`` unless both grids have the same direction and slices (position, spacing and count).
        """
        direction = source.direction_matrix
        offset = (np.asarray(target.origin) - np.asarray(source.origin)) @ direction  # in the source's voxel axes
        same_slices = (source_shape[0] == target_shape[0] and np.isclose(source.spacing[2], target.spacing[2])
                       and abs(offset[2]) <= 1e-6 * source.spacing[2])
        if not (same_slices and np.allclose(direction, target.direction_matrix, atol=1e-9)):
            raise ValueError("in-plane resampling needs two grids with the same direction and the same slices; "
                             "use resample() for any other pair of grids")
        if order not in (0, 1, 3):
            raise ValueError(f"order must be 0, 1 or 3, got {order}")
        axes = [_axis_resampling(source_shape[2 - axis], offset[axis] / source.spacing[axis],
                                 target.spacing[axis] / source.spacing[axis], target_shape[2 - axis], order)
                for axis in (0, 1)]
        return cls(axes[0], axes[1], order, float(fill))

    def __call__(self, slices: np.ndarray) -> np.ndarray:
        """(k, y, x) source slices → (k, y', x') target slices: float32 (order 0: the input's dtype)."""
        count, rows, _ = slices.shape
        if self.order == 0:
            out = slices[:, self.y.nearest][:, :, self.x.nearest]
        else:
            # Both passes as few large matrix products: x on (slices·y, x), then y on (y, slices·x').
            values = np.asarray(slices, dtype=np.float32).reshape(count * rows, -1)
            columns = self.x.inside.size
            along_x = np.zeros((count * rows, columns), np.float32)
            for out_columns, in_columns, weights in self.x.bands:
                along_x[:, out_columns] = values[:, in_columns] @ weights.T
            along_x = along_x.reshape(count, rows, columns).transpose(1, 0, 2).reshape(rows, count * columns)
            along_y = np.zeros((self.y.inside.size, count * columns), np.float32)
            for out_rows, in_rows, weights in self.y.bands:
                along_y[out_rows] = weights @ along_x[in_rows]
            out = along_y.reshape(-1, count, columns).transpose(1, 0, 2)
        out[:, ~self.y.inside] = self.fill
        out[:, :, ~self.x.inside] = self.fill
        return out


def slabs(count: int, size: int = SLAB_SLICES) -> Iterator[slice]:
    """Consecutive ranges of at most ``size`` slices covering ``count`` slices."""
    for first in range(0, count, size):
        yield slice(first, min(first + size, count))


def resample_in_plane(array: np.ndarray, source: Geometry, target: Geometry, target_shape: tuple, *,
                      order: int, fill: float) -> np.ndarray:
    """A whole (z, y, x) array through :class:`InPlaneResampling` (float32; order 0 keeps the dtype)."""
    resampling = InPlaneResampling.between(source, array.shape, target, target_shape, order=order, fill=fill)
    out = np.empty(target_shape, array.dtype if order == 0 else np.float32)
    for z in slabs(array.shape[0]):
        out[z] = resampling(array[z])
    return out


def window_to_uint8(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip to the HU window and rescale linearly to [0, 255] (rounded)."""
    low, high = window
    scaled = np.clip(hu, low, high, dtype=np.float32)  # one float32 temporary, worked on in place
    scaled -= np.float32(low)
    scaled *= np.float32(255.0 / (high - low))
    return np.rint(scaled, out=scaled).astype(np.uint8)


#: Voxels above this count as body (or table) for the body crop.
BODY_HU = -500.0


def body_crop(projection: np.ndarray, spacing_mm: float, multiple: int) -> tuple[slice, slice]:
    """In-plane bounding box of the patient's body, grown to a multiple of ``multiple`` pixels.

    ``projection`` marks the (y, x) positions above :data:`BODY_HU` in any slice. The body is its largest
    connected region after an opening of ~6 mm that detaches the table and the blanket.
    """
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
    to_grid = InPlaneResampling.between(image.geometry, image.array.shape, grid, shape, order=3, fill=air)
    hu = np.empty(shape, np.int16)
    projection = np.zeros(shape[1:], bool)
    for z in slabs(shape[0]):  # a few float32 slices at a time: no float copy of the volume
        values = to_grid(image.array[z])
        projection |= (values > BODY_HU).any(axis=0)
        hu[z] = np.clip(np.rint(values, out=values), -32768, 32767, out=values)
    crop = body_crop(projection, contract.in_plane_spacing_mm, contract.spatial_multiple)
    hu_crop = crop_padded(hu, crop, fill=int(air))
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
    it is ≥ 0.5: smoother boundaries and more faithful volumes than nearest neighbour on a finer grid. The
    grids must share their slices (:class:`InPlaneResampling`), as the processing grid and the input's do.
    """
    back = InPlaneResampling.between(source, labels.shape, target, target_shape, order=1, fill=0.0)
    out = np.zeros(target_shape, dtype=np.uint8)
    for z in slabs(labels.shape[0]):
        for value in (1, 2):
            mask = labels[z] >= value
            if mask.any():  # slices without the label stay as they are
                out[z][back(mask) >= 0.5] = value
    return out
