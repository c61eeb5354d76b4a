"""DICOM SEG for PACS: a result as a DICOM Segmentation (``highdicom``) that references its CT series.

``livertumorseg segment`` writes ``segmentation.dcm`` beside the other outputs when its input is a DICOM
series folder (``--no-dicom-seg`` leaves it out). The file holds:

* **Segments**, one per structure, of segmentation type BINARY: 1 "Liver" (category SCT 123037004
  Anatomical Structure, type SCT 10200004 Liver), the parenchyma without the tumours as in the label map,
  and 2 "Liver tumor" (SCT 49755003 Morphologically Altered Structure, SCT 108369006 Neoplasm, anatomic
  region SCT 10200004 Liver): the names, codes and colours of the ``.seg.nrrd`` (:mod:`.seg_nrrd`).
  Lesions are not split (``--per-lesion`` applies to the ``.seg.nrrd``). Algorithm type AUTOMATIC, and
  the algorithm identification: name LiverTumorSeg, version the model bundle's name and version, family
  Artificial Intelligence; the engine's version is the software version. Content qualification RESEARCH.
* **Frames on the source grid**: the frame of label-map slice k references the instance of slice k.
  Frames without a voxel of their segment are left out (highdicom's default; readers restore them empty).
* **References** to the source series and each of its instances that was segmented (a localizer that the
  reader leaves out is not one), and the patient, study and frame of reference of the series.

Slices and instances
    The engine reads a series onto a grid whose slice k is the k-th image along the slice normal
    (:mod:`.dicom_series`). :func:`source_slices` finds each image's slice on the label map's grid from its
    ImagePositionPatient, and refuses anything that is not one image per grid slice, lined up with the
    grid: raising :class:`DicomSegUnavailable`, which the command line turns into a warning.

Gantry tilt
    The engine resamples a tilted series onto an orthogonal grid, whose slices no longer coincide with the
    scanner's images (they are wider and shifted in-plane). For such a series **no SEG is written**, with
    a warning; the label map and the ``.seg.nrrd`` hold the result on the resampled grid. A SEG whose
    frames do not coincide with the images they reference is shown misplaced by viewers that overlay a
    SEG on its source images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pydicom

from . import __version__
from .dicom_series import ORIENTATION_TOLERANCE, _choose, _read_headers, list_series
from .errors import OutputError
from .image_io import Geometry, Image, atomic_path
from .output_folder import DICOM_SEG_FILE
from .seg_nrrd import LIVER_SEGMENT, TUMOUR_SEGMENT, Segment, check_labels

ALGORITHM_NAME = "LiverTumorSeg"
#: A high series number, so that a PACS lists the result after the scanner's series of the study.
SERIES_NUMBER = 900
#: Software has no serial number, but the attribute is required (type 1) in a DICOM SEG.
DEVICE_SERIAL_NUMBER = "0"
#: An image origin may lie this many pixels off the label map's grid (the reader keeps a series unresampled
#: when its origins drift by less than half a pixel, see :data:`.dicom_series.TILT_TOLERANCE_PIXELS`).
_PLACEMENT_TOLERANCE = 0.5


class DicomSegUnavailable(Exception):
    """No DICOM SEG can be made for this series; the message says why and where the result is instead."""


@dataclass(frozen=True)
class SourceSeries:
    """The DICOM series a label map was made from: its folder, SeriesInstanceUID and files."""

    folder: Path
    series_uid: str
    files: tuple[str, ...]


def find_source_series(folder: str | os.PathLike, series: Optional[str] = None) -> Optional[SourceSeries]:
    """The series of ``folder`` that the engine reads: ``series`` (a SeriesInstanceUID), or the one
    :func:`.dicom_series.read_dicom_series` chooses. None when the folder holds no DICOM series (reading it
    then raises the clear error); an unknown ``series`` raises :class:`~.errors.InputError`."""
    folder = Path(folder)
    files = list_series(folder)
    if not files:
        return None
    uid = _choose(folder, files, series)
    return SourceSeries(folder, uid, tuple(files[uid]))


def source_slices(source: SourceSeries, geometry: Geometry, shape_zyx: tuple[int, int, int]) -> list[pydicom.Dataset]:
    """The headers of the source images in the order of the label map's slices (see the module notes).

    Raises :class:`DicomSegUnavailable` unless every grid slice has exactly one image, of the grid's rows
    and columns, whose origin lies on the grid's slice origin.
    """
    axes = geometry.direction_matrix  # columns: the unit vectors of the voxel axes i, j, k (LPS)
    origin, spacing = np.asarray(geometry.origin, dtype=float), np.asarray(geometry.spacing, dtype=float)
    row_and_column = np.concatenate([axes[:, 0], axes[:, 1]])
    placed: dict[int, pydicom.Dataset] = {}
    for image in _read_headers(source.folder, list(source.files)):
        header = image.header
        if int(header.get("NumberOfFrames") or 1) > 1:
            raise DicomSegUnavailable(_not_written(f"the series is a multi-frame file ({image.label}); a DICOM SEG "
                                                   "is written for series of single-frame images"))
        orientation, position = header.get("ImageOrientationPatient"), header.get("ImagePositionPatient")
        if orientation is None or position is None or \
                np.abs(np.asarray(orientation, float) - row_and_column).max() > ORIENTATION_TOLERANCE:
            continue  # a localizer, which the reader left out as well
        i, j, k = (np.asarray(position, float) - origin) @ axes / spacing
        if (header.Rows, header.Columns) != tuple(shape_zyx[1:]) or max(abs(i), abs(j)) > _PLACEMENT_TOLERANCE:
            raise DicomSegUnavailable(_not_written(
                f"its images do not lie on the label map's grid ({image.label}: {header.Rows} × {header.Columns} "
                f"pixels, origin at voxel ({i:.2f}, {j:.2f}); the label map's slices: {shape_zyx[1]} × {shape_zyx[2]} "
                "voxels): the series was resampled, for a gantry tilt. The label map and the .seg.nrrd hold the "
                "result on the resampled grid"))
        slice_index = int(round(k))
        if placed.get(slice_index, header).SOPInstanceUID != header.SOPInstanceUID:  # exact copies are kept once
            raise DicomSegUnavailable(_not_written(f"two images lie on slice {slice_index} of the label map"))
        placed[slice_index] = header
    if sorted(placed) != list(range(shape_zyx[0])):
        raise DicomSegUnavailable(_not_written(
            f"its {len(placed)} images do not lie one on each of the label map's {shape_zyx[0]} slices"))
    if any(not header.get("FrameOfReferenceUID") for header in placed.values()):
        raise DicomSegUnavailable(_not_written("the series has no FrameOfReferenceUID, which a DICOM SEG shares with "
                                               "its images; export the series again with complete headers"))
    return [placed[k] for k in range(shape_zyx[0])]


def write_dicom_seg(labels: Image, path: str | os.PathLike, source: SourceSeries, *, algorithm_version: str,
                    overwrite: bool = False) -> Path:
    """Write a 0/1/2 label map on the series' grid as a DICOM SEG of ``source``, atomically; return the path.

    ``algorithm_version`` is the model bundle's name and version. Raises :class:`DicomSegUnavailable` (and
    writes nothing) when the series allows no SEG, :class:`~.errors.OutputError` when writing fails.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    path = Path(path)
    array = check_labels(labels)
    headers = source_slices(source, labels.geometry, array.shape)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version)
    try:
        segmentation = hd.seg.Segmentation(
            source_images=headers,
            pixel_array=array.astype(np.uint8, copy=False),  # label-map style: value k is segment k
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[_description(number, segment, algorithm)
                                  for number, segment in enumerate((LIVER_SEGMENT, TUMOUR_SEGMENT), start=1)],
            series_instance_uid=hd.UID(),
            series_number=SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=ALGORITHM_NAME,
            manufacturer_model_name=ALGORITHM_NAME,
            software_versions=__version__,
            device_serial_number=DEVICE_SERIAL_NUMBER,
            content_label="LIVERTUMORSEG",
            content_description="Liver and liver tumour segmentation (research use)",
            content_qualification=hd.ContentQualificationValues.RESEARCH,
            series_description=f"{ALGORITHM_NAME} liver and tumours",
            omit_empty_frames=bool(array.any()),  # an empty result keeps its frames: a SEG needs at least one
        )
    except (AttributeError, ValueError) as error:  # highdicom names the header attribute it cannot take over
        raise DicomSegUnavailable(_not_written(f"the series' headers do not allow one ({error})")) from None
    with atomic_path(path, overwrite=overwrite) as tmp:
        try:
            segmentation.save_as(tmp)
        except OSError as error:
            raise OutputError(f"Writing '{path}' failed ({error.strerror or error}). Check that the disk is not "
                              "full and the location is writable.") from None
    return path


def _description(number: int, segment: Segment, algorithm):
    """highdicom's description of one segment, with the codes and colour of its Slicer terminology entry."""
    import highdicom as hd
    from pydicom.sr.coding import Code
    from slicerio.segmentation import terminology_entry_from_string

    terminology = terminology_entry_from_string(segment.terminology)  # codes as [scheme, value, meaning]

    def code(scheme_value_meaning: list[str]) -> Code:
        scheme, value, meaning = scheme_value_meaning
        return Code(value, scheme, meaning)

    region = terminology.get("anatomicRegion")
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=segment.name,
        segmented_property_category=code(terminology["category"]),
        segmented_property_type=code(terminology["type"]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[code(region)] if region else None,
        display_color=hd.color.CIELabColor.from_rgb(*(round(255 * value) for value in segment.color)),
    )


def _not_written(reason: str) -> str:
    return f"No DICOM SEG ({DICOM_SEG_FILE}) was written: {reason}."
