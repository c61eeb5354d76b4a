"""Slicer ``.seg.nrrd`` files without Slicer: the segments of a label map, written and read with ``slicerio``.

``slicerio`` (by 3D Slicer's developers) reads and writes the file format; it is imported inside the
functions, so this module, and :mod:`.mrml_nodes` that takes its segment layout from here, import without it.

Segments
    :func:`segments_of` turns a LiTS-style label map (0 background, 1 liver, 2 tumour) into the segments
    "Liver" and "Liver tumor" (or, with ``per_lesion=True``, "Liver" and "Liver tumor 1..n", one per lesion
    of :func:`.masks.label_lesions`: 26-connected, largest first, the volumetry's lesion ids). The segments
    are exclusive, exactly as in the label map: the "Liver" segment holds the liver parenchyma *without*
    the tumours, although anatomically the tumours are part of the liver; the whole liver is the union of
    all segments. Both classes always get a segment, an empty one when the class is absent, so every output
    has the same structure. Each segment carries its standard terminology (:data:`LIVER_TERMINOLOGY`,
    :data:`TUMOUR_TERMINOLOGY`), a fixed name and colour (not marked auto-generated), and the DICOM
    algorithm tags (AUTOMATIC, algorithm name) that Slicer's DICOM SEG export writes into the segment sequence.

Colours
    Liver: the terminology's recommended colour, RGB 221/130/101. Tumour: the DICOM terminology has no
    recommended colour for "Neoplasm"; we use RGB 144/238/144, the colour of Slicer's generic anatomy
    "tumor"/"mass" label, which stands out against the liver in 2D and 3D. Per-lesion segments cycle through
    a fixed palette that starts with that colour and avoids the liver's hue.

Files
    :func:`write_segmentation` writes one layer (segment k has label value k) on the whole grid of the
    label map, every segment's extent being that grid (as Slicer writes with "crop to minimum extent" off),
    so the file lines up with the CT voxel by voxel; the grid is also stored as Slicer's reference image
    geometry. :func:`read_segmentation_labels` reads any ``.seg.nrrd`` (ours, or Slicer's with cropped
    extents or overlapping segments in several layers) onto a reference grid.

Coordinates
    The engine's :class:`~.image_io.Geometry` is in ITK's LPS patient frame (as the NRRD header); Slicer is
    RAS. Moving between them negates the first two rows of the direction matrix and the first two origin
    coordinates (:func:`ijk_to_ras`, :func:`lps_to_ras`).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from .errors import InputError, OutputError
from .image_io import Geometry, Image, atomic_path
from .masks import bounding_box, label_lesions

# ------------------------------------------------------------------------------------------ terminology

GENERAL_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

#: Slicer terminology entry (context~category~type~type modifier~region context~region~region modifier).
LIVER_TERMINOLOGY = (
    f"{GENERAL_ANATOMY_CONTEXT}~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^"
    f"~{ANATOMIC_CONTEXT}~^^~^^"
)
TUMOUR_TERMINOLOGY = (
    f"{DICOM_MASTER_CONTEXT}~SCT^49755003^Morphologically Altered Structure~SCT^108369006^Neoplasm~^^"
    f"~{ANATOMIC_CONTEXT}~SCT^10200004^Liver~^^"
)

LIVER_SEGMENT_NAME = "Liver"
TUMOUR_SEGMENT_NAME = "Liver tumor"
LIVER_SEGMENT_ID = "Liver"
TUMOUR_SEGMENT_ID = "Liver_tumor"

#: The liver's recommended terminology colour (3D Slicer General Anatomy list, SCT 10200004).
LIVER_COLOR = (221 / 255, 130 / 255, 101 / 255)
#: Tumour colour: Slicer's generic anatomy "tumor"/"mass" colour (the Neoplasm entry recommends none).
TUMOUR_COLOR = (144 / 255, 238 / 255, 144 / 255)
#: Per-lesion colours, cycled; the first is TUMOUR_COLOR. None is close to the liver's orange.
LESION_PALETTE = tuple(
    (r / 255, g / 255, b / 255)
    for r, g, b in (
        (144, 238, 144),  # light green
        (102, 178, 255),  # light blue
        (255, 215, 0),  # gold
        (190, 120, 255),  # violet
        (0, 200, 200),  # teal
        (255, 110, 190),  # pink
        (180, 255, 60),  # lime
        (120, 120, 255),  # periwinkle
        (255, 255, 150),  # pale yellow
        (40, 210, 130),  # jade
    )
)

ALGORITHM_TYPE_TAG = "DICOM.SegmentAlgorithmType"
ALGORITHM_NAME_TAG = "DICOM.SegmentAlgorithmName"

_LIVER_TYPE_CODE = "10200004"
_ANATOMICAL_STRUCTURE_CODE = "123037004"
#: Neoplasm, Neoplasm primary, Neoplasm secondary (DICOM CID 7159): read back as tumour.
_TUMOUR_TYPE_CODES = {"108369006", "86049000", "14799000"}

SEGMENTATION_SUFFIX = ".seg.nrrd"
#: The fastest gzip level: a label map is long runs of one value and compresses well at any level.
_COMPRESSION_LEVEL = 1
_REFERENCE_GEOMETRY = "Reference image geometry"


class Segment(NamedTuple):
    """One segment of a result: its fixed ID and name, display colour (0–1 RGB) and terminology entry."""

    id: str
    name: str
    color: tuple[float, float, float]
    terminology: str


LIVER_SEGMENT = Segment(LIVER_SEGMENT_ID, LIVER_SEGMENT_NAME, LIVER_COLOR, LIVER_TERMINOLOGY)
TUMOUR_SEGMENT = Segment(TUMOUR_SEGMENT_ID, TUMOUR_SEGMENT_NAME, TUMOUR_COLOR, TUMOUR_TERMINOLOGY)

# --------------------------------------------------------------------------------------------- geometry


def ijk_to_lps(geometry: Geometry) -> np.ndarray:
    """4×4 IJK→LPS matrix of a grid (columns: the i, j, k voxel axes scaled by spacing; then the origin)."""
    matrix = np.eye(4)
    matrix[:3, :3] = geometry.direction_matrix @ np.diag(np.asarray(geometry.spacing, dtype=float))
    matrix[:3, 3] = geometry.origin
    return matrix


def ijk_to_ras(geometry: Geometry) -> np.ndarray:
    """4×4 IJK→RAS matrix of a grid given in LPS (what MRML volumes and Slicer's reference geometry hold)."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps(geometry)


def lps_to_ras(point: Sequence[float]) -> tuple[float, float, float]:
    """A point in LPS millimetres as RAS millimetres."""
    x, y, z = (float(v) for v in point)
    return (-x, -y, z)


def _geometry_of(matrix: np.ndarray) -> Geometry:
    """The grid of an IJK→LPS matrix."""
    axes = np.asarray(matrix, dtype=float)[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    return Geometry(tuple(spacing.tolist()), tuple(np.asarray(matrix, dtype=float)[:3, 3].tolist()),
                    tuple((axes / spacing).ravel().tolist()))


# --------------------------------------------------------------------------------------------- segments


def check_labels(labels: Image) -> np.ndarray:
    """The voxels of a 0/1/2 label map; :class:`InputError` for another shape, type or value."""
    array = np.asarray(labels.array)
    if array.ndim != 3:
        raise InputError(f"The label map must be 3D (z, y, x); it has shape {array.shape}.")
    if array.dtype != bool and array.dtype.kind not in "iu":
        raise InputError(
            f"The label map has voxel type {array.dtype}; an integer label map is needed "
            "(0 background, 1 liver, 2 tumour)."
        )
    if array.size and (int(array.min()) < 0 or int(array.max()) > 2):
        found = np.unique(array)
        raise InputError(
            f"The label map contains the values {found[:10].tolist()}{' …' if found.size > 10 else ''}; only 0 "
            "(background), 1 (liver) and 2 (tumour) are allowed, as in LiTS. Relabel it first."
        )
    return array


def segments_of(array: np.ndarray, per_lesion: bool = False) -> tuple[np.ndarray, list[Segment]]:
    """The segments of a checked 0/1/2 label map (see the module notes) and its voxels numbered by segment.

    Voxel value k (1-based) belongs to the k-th segment: 1 the liver, 2 the tumour, or with ``per_lesion``
    2..n+1 the lesions 1..n; in the smallest unsigned type that holds them (``array`` itself when that is uint8
    and no lesion is numbered).
    """
    box = bounding_box(array == 2) if per_lesion else None
    if box is None:
        return array.astype(np.uint8, copy=False), [LIVER_SEGMENT, TUMOUR_SEGMENT]
    lesions, count = label_lesions(array[box] == 2)  # every tumour voxel lies in the box
    voxels = array.astype(np.min_scalar_type(count + 1))
    inside, in_lesion = voxels[box], lesions > 0
    inside[in_lesion] = lesions[in_lesion].astype(voxels.dtype) + 1  # lesion k is value k + 1 (1 stays the liver)
    palette = LESION_PALETTE
    return voxels, [LIVER_SEGMENT] + [
        Segment(f"{TUMOUR_SEGMENT_ID}_{k}", f"{TUMOUR_SEGMENT_NAME} {k}", palette[(k - 1) % len(palette)],
                TUMOUR_TERMINOLOGY)
        for k in range(1, count + 1)
    ]


def segment_label(name: str, category_code: str = "", type_code: str = "") -> int:
    """1 for a liver segment, 2 for a tumour segment, 0 for anything else (by terminology codes, then name)."""
    if type_code in _TUMOUR_TYPE_CODES:
        return 2
    if type_code == _LIVER_TYPE_CODE and category_code == _ANATOMICAL_STRUCTURE_CODE:
        return 1
    name = (name or "").strip().lower()
    if name.startswith(("liver tumor", "liver tumour")):
        return 2
    return 1 if name == "liver" else 0


# ------------------------------------------------------------------------------------------------ files


def write_segmentation(
    labels: Image,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    per_lesion: bool = False,
    algorithm_name: str = "LiverTumorSeg",
) -> Path:
    """Write a 0/1/2 label map as a Slicer ``.seg.nrrd``, atomically; return the path written.

    Refuses to replace an existing file unless ``overwrite``. The file is written under a temporary name,
    read back and compared voxel by voxel with ``labels`` (a full disk can leave a short file without an
    error), and only then renamed; on any failure nothing is left behind.
    """
    import slicerio
    from slicerio.segmentation import terminology_entry_from_string

    path = Path(path)
    if not path.name.lower().endswith(SEGMENTATION_SUFFIX):
        raise OutputError(f"'{path}': a segmentation file name must end with '{SEGMENTATION_SUFFIX}'.")
    if path.is_dir():
        raise OutputError(f"'{path}' is a folder. Give a file name ending with '{SEGMENTATION_SUFFIX}'.")
    if path.exists() and not overwrite:
        raise OutputError(f"'{path}' already exists. Choose another output, or pass --overwrite to replace it.")
    array = check_labels(labels)
    voxels, segments = segments_of(array, per_lesion)
    full_extent = [v for size in array.shape[::-1] for v in (0, size - 1)]  # i, j, k
    # Slicer's serialised image geometry: the IJK→RAS matrix row by row, then the extent.
    reference = "".join(f"{v:.17g};" for v in [*ijk_to_ras(labels.geometry).ravel(), *full_extent])
    segmentation = {
        "voxels": voxels.transpose(2, 1, 0),  # slicerio indexes voxels (i, j, k); a view, no copy
        "ijkToLPS": ijk_to_lps(labels.geometry),
        "containedRepresentationNames": ["Binary labelmap"],
        # Slicer takes a conversion parameter only when "&" ends it; slicerio puts none after the last one.
        "conversionParameters": [{"name": _REFERENCE_GEOMETRY, "value": reference,
                                  "description": "Image geometry of the CT the segmentation was made on.&"}],
        "segments": [
            {"id": segment.id, "name": segment.name, "nameAutoGenerated": False, "color": list(segment.color),
             "colorAutoGenerated": False, "labelValue": value, "layer": 0, "extent": full_extent,
             "terminology": terminology_entry_from_string(segment.terminology),
             "tags": {ALGORITHM_TYPE_TAG: "AUTOMATIC", ALGORITHM_NAME_TAG: algorithm_name}}
            for value, segment in enumerate(segments, start=1)
        ],
    }
    with atomic_path(path, overwrite=overwrite) as tmp:
        try:
            slicerio.write_segmentation(str(tmp), segmentation, compression_level=_COMPRESSION_LEVEL)
        except OSError as error:
            raise OutputError(f"Writing '{path}' failed ({error.strerror or error}). Check that the disk is not "
                              "full and the location is writable.") from None
        _verify_written(tmp, labels, path)
    return path


def _verify_written(written: Path, labels: Image, path: Path) -> None:
    """Raise OutputError unless ``written`` holds exactly ``labels`` on its grid (tumour segments counting as 2)."""
    try:
        segmentation = _read(written)
        problem = None
        if not np.allclose(segmentation["ijkToLPS"], ijk_to_lps(labels.geometry), rtol=1e-6, atol=1e-6):
            problem = "its voxel grid differs from the label map's"
        elif not np.array_equal(_labels_on_own_grid(segmentation, written), labels.array):
            problem = "its voxels differ from the label map"
    except InputError as error:
        problem = f"it cannot be read back: {error}"
    if problem:
        raise OutputError(f"Writing '{path}' failed: the file written is damaged ({problem}). "
                          "Check that the disk is not full, then run again.")


def read_segmentation_labels(path: str | os.PathLike, reference: Image) -> np.ndarray:
    """Read a ``.seg.nrrd`` into a (z, y, x) uint8 label map on ``reference``'s grid.

    1 = the "Liver" segment, 2 = any tumour segment ("Liver tumor", "Liver tumor <k>", or a Neoplasm
    terminology); other segments are ignored. Where segments overlap, tumour wins. The file's grid is
    mapped onto the reference grid by nearest neighbour (SimpleITK), which is exact where the grids share
    their voxels (the grid the file was written on, or a Slicer file cropped to its segments' extent).
    """
    from .preprocess import resample

    path = Path(path)
    if not path.is_file():
        raise InputError(f"Segmentation file not found: '{path}'.")
    segmentation = _read(path)
    labels = _labels_on_own_grid(segmentation, path)
    shape = tuple(np.asarray(reference.array).shape)
    on_file_grid = Image(np.ascontiguousarray(labels), _geometry_of(segmentation["ijkToLPS"]))
    return resample(on_file_grid, reference.geometry, shape, order=0, fill=0).array.astype(np.uint8, copy=False)


def _read(path: Path) -> dict:
    """The file as slicerio reads it; :class:`InputError` when it is not a readable ``.seg.nrrd``."""
    import slicerio

    try:  # slicerio raises OSError for what the NRRD reader refuses
        segmentation = slicerio.read_segmentation(str(path))
        if segmentation.get("voxels") is None or segmentation["voxels"].ndim not in (3, 4):
            raise ValueError("no 3D voxel data")
    except (OSError, ValueError, KeyError, IndexError, EOFError, zlib.error) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise InputError(
            f"'{path}' is not a readable segmentation file ({lines[-1] if lines else type(error).__name__}). "
            "It may be truncated: copy or export it again (3D Slicer: save the segmentation as .seg.nrrd)."
        ) from None
    return segmentation


def _labels_on_own_grid(segmentation: dict, path: Path) -> np.ndarray:
    """The liver (1) and tumour (2) segments of a slicerio segmentation as (z, y, x) uint8 on the file's grid."""
    import slicerio

    chosen = []
    for segment in segmentation.get("segments", []):
        terminology = segment.get("terminology") or {}
        category, type_ = (list(terminology.get(field) or []) + ["", ""] for field in ("category", "type"))
        label = segment_label(segment.get("name", ""), category[1], type_[1])  # [scheme, code, meaning]
        if label:
            chosen.append((label, segment))
    if not chosen:
        names = ", ".join(str(segment.get("name", segment.get("id"))) for segment in segmentation.get("segments", []))
        raise InputError(f"'{path}' has no 'Liver' or 'Liver tumor' segment (found: {names or 'none'}).")
    labels = np.zeros(segmentation["voxels"].shape[-3:], dtype=np.uint8)
    for label, segment in sorted(chosen, key=lambda item: item[0]):  # tumour painted over the liver
        labels[slicerio.segment_mask(segmentation, segment)] = label
    return labels.transpose(2, 1, 0)  # (i, j, k) → (z, y, x)
