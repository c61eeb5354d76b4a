"""Read stage: CT images and label maps in and out of the engine, with their full geometry.

Arrays are numpy in (z, y, x) order; the geometry (spacing, origin, direction, in ITK's LPS patient
coordinates) travels beside them in :class:`Geometry`. SimpleITK does all reading and writing; this
module adds what a clinical tool needs around it: validation with messages that say what to do,
DICOM series selection, exact reorientation to one canonical axial orientation and back, and
atomic writes that never leave partial output or overwrite by accident.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError

#: File name endings SimpleITK reads as one 3D image (DICOM comes as a folder).
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Canonical processing orientation: array axes (z, y, x) run inferior→superior,
#: anterior→posterior and right→left, i.e. the voxel axes point to L, P, S (DICOM/LPS convention).
CANONICAL_ORIENTATION = "LPS"
MIN_SLICES = 3
#: Plausible voxel spacings of a CT (mm); outside them the header's unit is wrong.
MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 50.0


@dataclass(frozen=True)
class Geometry:
    """Voxel grid in patient (LPS) coordinates, as SimpleITK defines it; all tuples in (x, y, z) order."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major direction cosines (columns are the voxel axes)

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def index_to_physical(self, zyx: np.ndarray) -> np.ndarray:
        """Continuous (z, y, x) voxel indices, shape (..., 3) → LPS millimetres (x, y, z)."""
        ijk = np.asarray(zyx, dtype=float)[..., ::-1]
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing)) @ self.direction_matrix.T


@dataclass
class Image:
    """A 3D scalar image: ``array`` in (z, y, x) plus its :class:`Geometry`."""

    array: np.ndarray
    geometry: Geometry

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Image":
        return cls(sitk.GetArrayFromImage(image), Geometry.from_sitk(image))

    def to_sitk(self) -> sitk.Image:
        return self.geometry.apply_to(sitk.GetImageFromArray(self.array))

    def with_array(self, array: np.ndarray) -> "Image":
        """Same grid, other voxel values (e.g. a label map on this image's grid)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the image's {self.array.shape}")
        return Image(array, self.geometry)


# --------------------------------------------------------------------------------------------- reading


def read_image(path: str | os.PathLike, *, kind: str = "image", series: str | None = None) -> Image:
    """Read a NIfTI / NRRD / MHA / MHD file or a DICOM series folder into an :class:`Image`.

    ``kind`` ("image" or "label map") only words the error messages; ``series`` picks a DICOM series by
    its SeriesInstanceUID (see :func:`.dicom_series.read_dicom_series`). Every problem a user can meet
    raises :class:`InputError` with a message that says what is wrong and what to do.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{kind} not found: '{path}'. Check the path; a DICOM series is given as its folder.")
    if path.is_dir():
        image = _read_dicom_folder(path, series)
    else:
        if path.stat().st_size == 0:
            raise InputError(f"'{path}' is an empty file. Export the {kind} again.")
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            if "spacing" in str(error).lower():
                raise InputError(_SPACING_MESSAGE.format(path=path, spacing="with a zero value")) from None
            raise InputError(
                f"'{path}' could not be read as an image ({_first_line(error)}). Supported: "
                f"{', '.join(IMAGE_SUFFIXES)} files and DICOM series folders. If the file was copied, "
                "it may be truncated: copy it again."
            ) from None
        _check_complete(path, image, kind)
    _validate(image, path, kind)
    return Image.from_sitk(image)


_SPACING_MESSAGE = (
    "'{path}' has an invalid voxel spacing {spacing}: every spacing must be a positive number of mm. "
    "Fix the image header (e.g. in 3D Slicer's Volumes module) and save it again."
)


def _check_complete(path: Path, image: sitk.Image, kind: str) -> None:
    """Refuse truncated files, which ITK reads without complaint (the missing voxels come back as zeros).

    ITK checks neither the end of a gzip stream nor the length of uncompressed voxel data, so both are
    checked here: every member of a gzip file must decompress to its end, and the data must hold at least
    the voxel bytes its header promises. For NIfTI that is the *stored* type (``bitpix``) after
    ``vox_offset``, not the type ITK returns after applying ``scl_slope``/``scl_inter``.
    """
    name = path.name.lower()
    expected = _stored_bytes(image)
    if name.endswith(".gz") and _is_gzip(path):
        complete, size = _gzip_size(path)
        complete = complete and size >= expected
    elif name.endswith((".nii", ".nii.gz")) or (name.endswith((".mha", ".nrrd")) and not _has_compressed_payload(path)):
        complete = path.stat().st_size >= expected  # a plain file (also one named .gz that is not compressed)
    else:
        complete = True  # detached or compressed payloads: ITK's own reader checks those
    if not complete:
        raise InputError(
            f"'{path}' is truncated: it holds fewer voxel bytes than its header announces. "
            f"Copy or export the {kind} again."
        )


def _stored_bytes(image: sitk.Image) -> int:
    """Bytes of voxel data the file must hold: NIfTI's header offset + stored type, else ITK's pixel type."""
    voxels = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel()
    if image.HasMetaDataKey("bitpix") and image.HasMetaDataKey("vox_offset"):
        return int(float(image.GetMetaData("vox_offset"))) + voxels * int(image.GetMetaData("bitpix")) // 8
    return voxels * image.GetSizeOfPixelComponent()


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _gzip_size(path: Path) -> tuple[bool, int]:
    """(whether every gzip member ends properly, total decompressed bytes); members are read one after
    another, as gzip itself does (``cat a.gz b.gz`` is a valid gzip file)."""
    decompressor, size = zlib.decompressobj(16 + zlib.MAX_WBITS), 0
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                while block:
                    size += len(decompressor.decompress(block, 1 << 26))
                    while decompressor.unconsumed_tail:
                        size += len(decompressor.decompress(decompressor.unconsumed_tail, 1 << 26))
                    block = decompressor.unused_data if decompressor.eof else b""
                    if block:  # the next member starts in this block
                        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    except zlib.error:
        return False, size
    return decompressor.eof, size


def _has_compressed_payload(path: Path) -> bool:
    """Whether an NRRD/MHA header announces compressed or detached voxel data."""
    with open(path, "rb") as handle:
        header = handle.read(4096).split(b"\n\n", 1)[0].lower().replace(b" ", b"")
    if path.name.lower().endswith(".mha"):
        return b"compresseddata=true" in header or b"elementdatafile=local" not in header
    return b"encoding:raw" not in header or b"datafile:" in header


def _read_dicom_folder(folder: Path, series: str | None = None) -> sitk.Image:
    from .dicom_series import read_dicom_series

    return read_dicom_series(folder, series)


def _validate(image: sitk.Image, path: Path, kind: str) -> None:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"'{path}' has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector "
            f"image); a CT {kind} has one. Export the original grey-scale CT series."
        )
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        # A 4D file with a single time point is a 3D volume in disguise (some NIfTI writers do this).
        image = image[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise InputError(
            f"'{path}' is a {dim}D image of size {image.GetSize()}; a 3D CT volume is needed. "
            + ("Give the whole series, not a single slice." if dim == 2 else "Split the series into 3D volumes.")
        )
    spacing = image.GetSpacing()
    if not all(np.isfinite(s) and s > 0 for s in spacing):  # ITK folds negative spacings into the direction
        raise InputError(_SPACING_MESSAGE.format(path=path, spacing=tuple(spacing)))
    if not all(MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        raise InputError(
            f"'{path}' has a voxel spacing of {tuple(round(s, 4) for s in spacing)} mm, which no CT has (expected "
            f"{MIN_SPACING_MM}–{MAX_SPACING_MM} mm). The header's unit is probably wrong (metres or micrometres "
            "instead of millimetres): fix the spacing in the header (e.g. in 3D Slicer's Volumes module) and save again."
        )
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputError(
            f"'{path}' has a non-orthogonal (sheared) direction matrix, e.g. from a gantry-tilted series saved "
            "without correction; its voxels are not boxes, so volumes and the output grids would be wrong. "
            "Resample it onto an orthogonal grid first (e.g. dcm2niix corrects gantry tilt, or 3D Slicer's "
            "'Harden transform'), or give the DICOM series folder, which is corrected on reading."
        )
    if image.GetSize()[2] < MIN_SLICES:
        raise InputError(
            f"'{path}' has only {image.GetSize()[2]} slice(s); at least {MIN_SLICES} are needed "
            "(the network reads each slice with its two neighbours). Give the whole CT series."
        )
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        count = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise InputError(
            f"'{path}' contains {count} NaN or infinite voxel value(s). Re-export the {kind} from the "
            "original data; a valid CT has a finite value in every voxel."
        )


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# ----------------------------------------------------------------------------------------- orientation


@dataclass(frozen=True)
class Orientation:
    """How an image was reoriented to the canonical orientation, so that results can go back exactly."""

    original: Geometry
    original_code: str
    original_shape: tuple[int, int, int]
    canonical: Geometry


def to_canonical(image: Image) -> tuple[Image, Orientation]:
    """Permute and flip the voxel axes (no resampling) so the image lies in the canonical orientation.

    For an oblique acquisition the nearest canonical axes are chosen and the remaining rotation stays in
    the direction matrix, so no voxel is interpolated.
    """
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.geometry.direction)
    canonical = Image.from_sitk(sitk.DICOMOrient(image.to_sitk(), CANONICAL_ORIENTATION))
    return canonical, Orientation(image.geometry, code, tuple(image.array.shape), canonical.geometry)


def from_canonical(array: np.ndarray, orientation: Orientation) -> Image:
    """Map an array on the canonical grid (e.g. a label map) back onto the original image grid, exactly."""
    canonical = orientation.canonical.apply_to(sitk.GetImageFromArray(array))
    back = sitk.GetArrayFromImage(sitk.DICOMOrient(canonical, orientation.original_code))
    if back.shape != orientation.original_shape:
        raise ValueError(f"reoriented shape {back.shape} does not match the input's {orientation.original_shape}")
    # Axis permutations and flips are exact; the original geometry is restored verbatim, not recomputed.
    return Image(back, orientation.original)


# --------------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block completes.

    Works for files and folders. Refuses to replace an existing ``path`` unless ``overwrite``; on any
    error (including cancellation) the temporary output is removed and ``path`` is left untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"'{path}' already exists. Choose another output, or pass --overwrite to replace it.")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=parent))
    except OSError as error:
        raise OutputError(f"Cannot write to '{parent}' ({error.strerror}). Choose a writable output location.") from None
    tmp = tmp_dir / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        # Companion files written beside ``tmp`` (the voxel data of .mhd / .nhdr headers) move first,
        # so that the header never appears before its data.
        for companion in tmp_dir.iterdir():
            if companion != tmp:
                os.replace(companion, parent / companion.name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_image(image: Image, path: str | os.PathLike, *, overwrite: bool = False, compress: bool = True) -> Path:
    """Write an image or label map (format from the file name) atomically; return the path written."""
    path = Path(path)
    if not str(path.name).lower().endswith(IMAGE_SUFFIXES):
        raise OutputError(f"'{path}': unknown image format. Use one of {', '.join(IMAGE_SUFFIXES)}.")
    with atomic_path(path, overwrite=overwrite) as tmp:
        try:
            sitk.WriteImage(image.to_sitk(), str(tmp), compress)
        except RuntimeError as error:
            raise OutputError(f"Writing '{path}' failed ({_first_line(error)}).") from None
    return path
