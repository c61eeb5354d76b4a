"""The Slicer module's "Export DICOM SEG": a segmentation of a volume from Slicer's DICOM database as a DICOM SEG.

A volume that Slicer's DICOM module loaded carries the SOP Instance UIDs of its images in the node
attribute ``DICOM.instanceUIDs``; the DICOM database gives their files (the module passes
``slicer.dicomDatabase.fileForInstance`` as ``file_for_instance``). The "Liver" and tumour segments are
exported onto the volume's grid (:func:`.resection_nodes.labels_from_segmentation`) and written by
:func:`.dicom_seg.write_dicom_seg`, the writer of ``livertumorseg segment``, with the model named in the
segments' algorithm tag (set by the engine when it made them). MRML comes in as arguments, so this runs
in Slicer and on ``slicer-core`` alike. The DICOM and MRML stacks are imported only when a SEG is exported,
so the module's panel checks :func:`instance_uids` without loading them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional

from .errors import InputError, OutputError

if TYPE_CHECKING:
    from .dicom_seg import SourceSeries

#: Node attribute in which Slicer's DICOM module lists the SOP Instance UIDs of a loaded volume's images.
INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
#: The SEG's algorithm version when the segments do not say which model made them.
NOT_RECORDED = "not recorded"


def instance_uids(volume_node) -> List[str]:
    """The SOP Instance UIDs of the images ``volume_node`` was loaded from; empty when not from DICOM."""
    return (volume_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split() if volume_node is not None else []


def source_series(volume_node, file_for_instance: Callable[[str], Optional[str]]) -> SourceSeries:
    """The DICOM series of ``volume_node``, its files found by ``file_for_instance(SOP Instance UID)``.

    InputError when the volume was not loaded from the DICOM database or its files are no longer there.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from .dicom_seg import SourceSeries

    uids = instance_uids(volume_node)
    name = volume_node.GetName() if volume_node is not None else ""
    if not uids:
        raise InputError(f"The volume '{name}' was not loaded from the DICOM database, so there is no DICOM series "
                         "for a DICOM SEG to refer to. Load the CT through the DICOM module and segment that volume.")
    files = [file_for_instance(uid) or "" for uid in uids]
    missing = [path or uid for path, uid in zip(files, uids) if not (path and Path(path).is_file())]
    if missing:
        raise InputError(f"{len(missing)} of the {len(uids)} images of '{name}' are no longer in the DICOM database "
                         f"(for example {missing[0]}). Import the series into the DICOM database again, load it from "
                         "there and export again.")
    try:
        header = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except (InvalidDicomError, OSError) as error:
        raise InputError(f"The DICOM file '{files[0]}' of '{name}' cannot be read ({error}). Import the series into "
                         "the DICOM database again.") from None
    return SourceSeries(Path(files[0]).parent, str(header.get("SeriesInstanceUID", "")), tuple(files))


def algorithm_version(segmentation_node) -> str:
    """The model that made the segments ("<model> <version>", their algorithm name tag), or "not recorded"."""
    from .mrml_nodes import segment_tag
    from .seg_nrrd import ALGORITHM_NAME_TAG

    segmentation = segmentation_node.GetSegmentation()
    for segment_id in segmentation.GetSegmentIDs():
        value = segment_tag(segmentation.GetSegment(segment_id), ALGORITHM_NAME_TAG)
        if value:
            return value
    return NOT_RECORDED


def default_file_name(volume_node) -> str:
    """A file name for the SEG of ``volume_node``'s segmentation (characters not allowed in file names become _)."""
    name = "".join("_" if c in '<>:"/\\|?*' or ord(c) < 32 else c for c in volume_node.GetName()).strip(" .")
    return f"{name or 'CT'} liver segmentation.dcm"


def export_dicom_seg(segmentation_node, volume_node, path, file_for_instance: Callable[[str], Optional[str]]) -> Path:
    """Write the liver and tumour segments of ``segmentation_node``, on the grid of ``volume_node``, as a DICOM SEG of
    the volume's series to the new file ``path``; return it. An existing file is never replaced.

    Raises InputError (volume not from the DICOM database, its files gone, no "Liver" segment),
    :class:`.dicom_seg.DicomSegUnavailable` (the series allows no SEG, or highdicom is not available in this
    Python) or OutputError, and writes nothing then.
    """
    from .dicom_seg import DicomSegUnavailable, write_dicom_seg
    from .image_io import Image
    from .resection_nodes import geometry_from_volume_node, labels_from_segmentation

    path = Path(path)
    if path.exists() or path.is_symlink():
        raise OutputError(f"'{path}' already exists, and an existing file is never replaced. Export again and choose "
                          "a new file name.")
    source = source_series(volume_node, file_for_instance)
    if importlib.util.find_spec("highdicom") is None:
        raise DicomSegUnavailable("DICOM SEG export needs the Python package highdicom, which needs Python 3.10 or "
                                  "later. Use a newer release of 3D Slicer to export DICOM SEG; the segmentation can "
                                  "still be saved as .seg.nrrd (File > Save Data).")
    geometry, _ = geometry_from_volume_node(volume_node)
    labels = Image(labels_from_segmentation(segmentation_node, volume_node), geometry)
    return write_dicom_seg(labels, path, source, algorithm_version=algorithm_version(segmentation_node), overwrite=False)
