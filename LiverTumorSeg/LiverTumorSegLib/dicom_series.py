"""DICOM series folders: choose one series, check its slice geometry, and read it onto a regular grid.

SimpleITK's ImageSeriesReader reads a series whose slices are missing, duplicated, unevenly spaced,
mixed with a localizer or sheared by gantry tilt without complaint, and the volumes measured on the
result are then wrong. SimpleITK (GDCM) still lists the series and reads the voxels; the headers are
read with pydicom and checked here first, and the geometry of the result is set from them.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from .errors import InputError
from .image_io import IMAGE_SUFFIXES, _first_line

log = logging.getLogger("LiverTumorSeg")

#: Largest difference of direction cosines still counted as the same orientation (about 0.06°): header
#: values are decimal strings exact to ~1e-6, while a localizer differs by up to 1.
ORIENTATION_TOLERANCE = 1e-3
#: Slices closer than this along the slice normal lie at the same position.
DUPLICATE_TOLERANCE_MM = 0.01
#: A step this many times the median step means that slices are missing.
GAP_FACTOR = 1.5
#: A step may differ from the median step by 1 % (the volume then errs by at most ~1 %) or by 0.02 mm,
#: whichever is larger: scanners that round positions to 0.01 mm make thin-slice steps alternate by that.
SPACING_TOLERANCE = 0.01
SPACING_TOLERANCE_MM = 0.02
#: Slice origins may leave the line along the slice normal by half a pixel before the series counts as
#: tilted: a smaller offset is below what the voxel grid can represent.
TILT_TOLERANCE_PIXELS = 0.5
AIR_HU = -1024
_SHARP_KERNEL = re.compile(r"LUNG|BONE|SHARP|EDGE|DETAIL|^[BIHQ][A-Z]?[5-9]\d", re.IGNORECASE)
_SHOWN = 5


@dataclass(frozen=True)
class _Slice:
    path: str
    header: pydicom.Dataset

    @property
    def label(self) -> str:
        number = self.header.get("InstanceNumber")
        name = Path(self.path).name
        return f"instance {number} ({name})" if number not in (None, "") else name


def list_series(folder: Path) -> dict[str, list[str]]:
    """Series UID → its file names, as SimpleITK (GDCM) finds them in ``folder``."""
    reader = sitk.ImageSeriesReader()
    return {uid: list(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in reader.GetGDCMSeriesIDs(str(folder)) or []}


def read_dicom_series(folder: Path, series: str | None = None) -> sitk.Image:
    """Read one DICOM series of ``folder`` after checking its geometry; ``series`` is a SeriesInstanceUID.

    Without ``series`` the folder's series are ranked by: most files; then thinnest slice spacing
    (median step between slice positions, to 0.01 mm); then a soft-tissue kernel, i.e. a
    ConvolutionKernel that does not name LUNG, BONE, SHARP, EDGE or DETAIL and is no Siemens-style
    code numbered 50 or more (B60f, Br64, I70f); then the lowest SeriesInstanceUID in string order.

    Localizers with another orientation and exact copies of a file are left out with a warning; a gantry
    tilt is corrected by resampling onto an orthogonal grid; missing position or orientation headers,
    several slices at one position, missing slices and uneven spacing raise :class:`InputError`.
    """
    files = list_series(folder)
    if not files:
        raise InputError(
            f"No DICOM series found in the folder '{folder}'. Give a folder that holds the CT's DICOM files "
            f"(one series), or an image file ({', '.join(IMAGE_SUFFIXES)})."
        )
    uid = _choose(folder, files, series)
    if len(files[uid]) == 1:  # a single (possibly multi-frame) file: GDCM reads its geometry itself
        return _read_voxels(folder, files[uid])
    slices = _check_orientation(folder, uid, _read_headers(folder, files[uid]))
    row, col = np.split(_orientation(slices[0]), 2)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    slices, depth = _check_positions(folder, uid, slices, normal)
    image = _read_voxels(folder, [s.path for s in slices])
    if len(slices) < 2:
        return image
    origins = np.array([_position(s) for s in slices])
    along = depth - depth[0]
    step = along[-1] / (len(slices) - 1)  # the mean step keeps the series' extent exact
    image.SetOrigin(origins[0].tolist())
    image.SetDirection(np.column_stack([row, col, normal]).ravel().tolist())
    image.SetSpacing((*image.GetSpacing()[:2], step))
    return _correct_tilt(folder, uid, image, slices, origins - origins[0] - np.outer(along, normal), along)


def _choose(folder: Path, files: dict[str, list[str]], wanted: str | None) -> str:
    if wanted is not None:
        if wanted.strip() in files:
            return wanted.strip()
        available = "; ".join(f"{uid} ({len(paths)} files, {_description(paths[0])})" for uid, paths in sorted(files.items()))
        raise InputError(
            f"The DICOM series '{wanted}' is not in the folder '{folder}'. Available series: {available}. "
            "Give one of these SeriesInstanceUIDs (--series UID on the command line)."
        )
    most = max(len(paths) for paths in files.values())
    tied = sorted(uid for uid, paths in files.items() if len(paths) == most)
    chosen = tied[0] if len(tied) == 1 else min(tied, key=lambda uid: _rank(_read_headers(folder, files[uid]), uid))
    others = [f"{uid} ({len(paths)} files)" for uid, paths in files.items() if uid != chosen]
    if others:
        log.warning(
            "The folder '%s' holds %d DICOM series; using %s (%d files; chosen by most slices, then thinnest "
            "slice spacing, then a soft-tissue kernel). Also found: %s. Choose another with --series UID, or "
            "give a folder with only the wanted series.",
            folder, len(files), chosen, len(files[chosen]), "; ".join(others),
        )
    return chosen


def _rank(slices: list[_Slice], uid: str) -> tuple:
    """Sort key of a series among series with equal file counts (smallest first)."""
    placed = [s for s in slices if _position(s) is not None and _orientation(s) is not None]
    step = math.inf
    if placed:
        row, col = np.split(_orientation(placed[0]), 2)
        depth = np.unique(np.round([_position(s) @ np.cross(row, col) for s in placed], 2))
        step = float(np.median(np.diff(depth))) if len(depth) > 1 else math.inf
    kernel = slices[0].header.get("ConvolutionKernel", "")
    kernel = "\\".join(kernel) if isinstance(kernel, pydicom.multival.MultiValue) else str(kernel)
    return round(step, 2), bool(_SHARP_KERNEL.search(kernel)), uid


def _description(path: str) -> str:
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError):
        return "unreadable header"
    return f"'{header.get('SeriesDescription', '')}'" if header.get("SeriesDescription") else "no description"


def _read_headers(folder: Path, paths: list[str]) -> list[_Slice]:
    slices = []
    for path in paths:
        try:
            slices.append(_Slice(path, pydicom.dcmread(path, stop_before_pixels=True)))
        except (InvalidDicomError, OSError) as error:
            raise InputError(
                f"The DICOM file '{path}' in '{folder}' could not be read ({_first_line(error)}). "
                "Copy or export the series again."
            ) from None
    return slices


def _position(s: _Slice) -> np.ndarray | None:
    value = s.header.get("ImagePositionPatient")
    return np.array([float(v) for v in value]) if value is not None and len(value) == 3 else None


def _orientation(s: _Slice) -> np.ndarray | None:
    value = s.header.get("ImageOrientationPatient")
    return np.array([float(v) for v in value]) if value is not None and len(value) == 6 else None


def _few(labels: list[str]) -> str:
    more = f" and {len(labels) - _SHOWN} more" if len(labels) > _SHOWN else ""
    return ", ".join(labels[:_SHOWN]) + more


def _check_orientation(folder: Path, uid: str, slices: list[_Slice]) -> list[_Slice]:
    """Refuse slices without position or orientation; drop a minority with another orientation."""
    missing = [s.label for s in slices if _position(s) is None or _orientation(s) is None]
    if missing:
        raise InputError(
            f"{len(missing)} of {len(slices)} files of the DICOM series {uid} in '{folder}' have no valid "
            f"ImagePositionPatient or ImageOrientationPatient ({_few(missing)}), so their slice positions are "
            "unknown. Export the series again with complete headers (anonymisation must keep these tags)."
        )
    cosines = np.array([_orientation(s) for s in slices])
    _, first, counts = np.unique(np.round(cosines / ORIENTATION_TOLERANCE), axis=0, return_index=True, return_counts=True)
    reference = cosines[first[np.argmax(counts)]]
    same = np.abs(cosines - reference).max(axis=1) <= ORIENTATION_TOLERANCE
    if 2 * same.sum() <= len(slices):
        raise InputError(
            f"The DICOM series {uid} in '{folder}' mixes slice orientations and none holds most of its "
            f"{len(slices)} files. Export the axial CT series on its own."
        )
    if not same.all():
        log.warning(
            "Leaving out %d file(s) of the DICOM series %s whose orientation differs from its other %d slices "
            "(a localizer or scout image): %s.",
            len(slices) - same.sum(), uid, same.sum(), _few([s.label for s, ok in zip(slices, same) if not ok]),
        )
    return [s for s, ok in zip(slices, same) if ok]


def _check_positions(folder: Path, uid: str, slices: list[_Slice], normal: np.ndarray) -> tuple[list[_Slice], np.ndarray]:
    """Order the slices along ``normal``; drop exact copies; refuse clashes, gaps and uneven steps."""
    depth = np.array([_position(s) @ normal for s in slices])
    order = np.argsort(depth, kind="stable")
    kept, copies, clashes = [order[0]], [], []
    for i in order[1:]:
        last = kept[-1]
        if depth[i] - depth[last] >= DUPLICATE_TOLERANCE_MM:
            kept.append(i)
        elif slices[i].header.get("SOPInstanceUID") == slices[last].header.get("SOPInstanceUID"):
            copies.append(slices[i].label)
        else:
            clashes.append(f"{slices[last].label} and {slices[i].label} at {depth[i]:.2f} mm")
    where = f"The DICOM series {uid} in '{folder}'"
    if clashes:
        raise InputError(
            f"{where} has {len(clashes)} pair(s) of different slices at the same position: {_few(clashes)}. "
            "It probably holds more than one acquisition (e.g. two contrast phases or a repeated scan). "
            "Export each acquisition as its own series and give one of them."
        )
    if copies:
        log.warning("Leaving out %d duplicate copy(ies) of the same image (same SOPInstanceUID) in the DICOM series %s: %s.",
                    len(copies), uid, _few(copies))
    slices, depth = [slices[i] for i in kept], depth[kept]
    if len(slices) < 2:
        return slices, depth
    steps = np.diff(depth)
    median = float(np.median(steps))
    gaps = [f"between positions {depth[k]:.2f} and {depth[k + 1]:.2f} mm ({slices[k].label} and {slices[k + 1].label})"
            for k in np.flatnonzero(steps > GAP_FACTOR * median)]
    if gaps:
        raise InputError(
            f"{where} is missing slice(s) {_few(gaps)}; its usual step is {median:.3g} mm. Copy or export the "
            "complete series again: a volume read across a missing slice is wrong."
        )
    uneven = np.flatnonzero(np.abs(steps - median) > max(SPACING_TOLERANCE * median, SPACING_TOLERANCE_MM))
    if uneven.size:
        examples = [f"{steps[k]:.3g} mm between {slices[k].label} and {slices[k + 1].label}" for k in uneven]
        raise InputError(
            f"{where} has non-uniform slice spacing: steps from {steps.min():.3g} to {steps.max():.3g} mm around "
            f"a median of {median:.3g} mm ({_few(examples)}). Export a reconstruction with constant slice "
            "spacing, or resample the series to uniform spacing first."
        )
    return slices, depth


def _read_voxels(folder: Path, paths: list[str]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(paths)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InputError(f"The DICOM series in '{folder}' could not be read ({_first_line(error)}).") from None


def _correct_tilt(folder: Path, uid: str, image: sitk.Image, slices: list[_Slice], offsets: np.ndarray,
                  along: np.ndarray) -> sitk.Image:
    """Resample a sheared stack (slice origins drift in-plane along the stack) onto an orthogonal grid.

    ``offsets`` are the slice origins' in-plane displacements from the first origin, ``along`` their
    distances along the slice normal. The drift is fitted as a line (``offsets ≈ along × drift``); each
    output slice lies in the plane of its input slice, so only in-plane interpolation takes place.
    """
    pixel = min(image.GetSpacing()[:2])
    drift = np.linalg.lstsq(along[:, None], offsets, rcond=None)[0][0]
    off_line = np.linalg.norm(offsets - np.outer(along, drift), axis=1)
    if off_line.max() > TILT_TOLERANCE_PIXELS * pixel:
        worst = int(np.argmax(off_line))
        raise InputError(
            f"The slice origins of the DICOM series {uid} in '{folder}' do not lie on a straight line "
            f"({slices[worst].label} is {off_line[worst]:.2f} mm off it), so the slices do not form one "
            "volume. Export the series again."
        )
    if np.linalg.norm(drift) * along[-1] <= TILT_TOLERANCE_PIXELS * pixel:
        return image
    axes = np.asarray(image.GetDirection()).reshape(3, 3)
    origin, spacing, size = np.asarray(image.GetOrigin()), np.asarray(image.GetSpacing()), np.asarray(image.GetSize())
    end = along[-1] * drift @ axes[:, :2]  # in-plane (x, y) shift of the last slice, mm
    low = np.minimum(end, 0)
    grow = np.ceil(np.abs(end) / spacing[:2] - 1e-6).astype(int)
    shear = sitk.AffineTransform(3)
    shear.SetCenter(origin.tolist())
    shear.SetMatrix((np.eye(3) - np.outer(drift, axes[:, 2])).ravel().tolist())
    pixel_type = image.GetPixelID()
    if sitk.GetArrayViewFromImage(image).dtype.kind == "u":  # air (-1024) needs a signed type
        pixel_type = sitk.sitkFloat32
    out = sitk.Resample(
        image, [int(size[0] + grow[0]), int(size[1] + grow[1]), int(size[2])], shear, sitk.sitkLinear,
        (origin + axes[:, :2] @ low).tolist(), spacing.tolist(), axes.ravel().tolist(), float(AIR_HU), pixel_type,
    )
    log.warning(
        "The DICOM series %s was acquired with a gantry tilt of %.2f°; it was resampled onto an orthogonal "
        "grid of %d × %d × %d voxels (linear interpolation, %d HU outside the scanned field).",
        uid, math.degrees(math.atan(np.linalg.norm(drift))), *out.GetSize(), AIR_HU,
    )
    return out
