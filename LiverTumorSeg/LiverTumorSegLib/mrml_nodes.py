"""MRML adapter: engine results as Slicer nodes (volume, segmentation, volumetry table) and ``.seg.nrrd`` files.

The same code runs inside the 3D Slicer application (the caller passes ``slicer.mrmlScene``) and outside it
with the ``slicer-core`` package (real MRML without Qt; the caller makes a scene with :func:`create_scene`).
``slicer`` and ``vtk`` are imported inside the functions, so the engine imports without them.

Coordinates: the engine's :class:`~.image_io.Geometry` is in ITK's LPS patient frame; MRML is RAS. Moving
between them negates the first two rows of the direction matrix and the first two origin coordinates.

Segments
    ``segmentation_node_from_labels`` turns a LiTS-style label map (0 background, 1 liver, 2 tumour) into the
    segments "Liver" and "Liver tumor" (or, with ``per_lesion=True``, "Liver" and "Liver tumor 1..n", one per
    26-connected tumour component, largest first). The segments are exclusive, exactly as in the label map:
    the "Liver" segment holds the liver parenchyma *without* the tumours, although anatomically the tumours
    are part of the liver. The whole liver is the union of all segments (Slicer's Segment Statistics reports
    each segment separately; the volumetry table gives the whole-liver volume). Both classes always get a
    segment, an empty one when the class is absent, so every output has the same structure. Each segment
    carries its standard terminology (see :data:`LIVER_TERMINOLOGY`, :data:`TUMOUR_TERMINOLOGY`), a fixed
    name and colour (not marked auto-generated), and the DICOM algorithm tags (AUTOMATIC, algorithm name)
    that Slicer's DICOM SEG export writes into the segment sequence.

Colours
    Liver: the terminology's recommended colour (read from the loaded terminology when available; the
    same value, RGB 221/130/101, is the fallback). Tumour: the DICOM terminology has no recommended colour
    for "Neoplasm"; we use RGB 144/238/144, the colour of Slicer's generic anatomy "tumor"/"mass" label,
    which stands out against the liver in 2D and 3D. Per-lesion segments cycle through a fixed palette that
    starts with that colour and avoids the liver's hue.

Volumetry table (``volumetry_table_node``)
    Rows in the order of the engine's volumetry CSV: "Liver (whole organ)" (parenchyma plus tumours, as
    the volumetry stage defines the liver volume; unlike the "Liver" segment, which excludes the tumours),
    "All tumours (<n> lesions)", then "Lesion 1".."Lesion n" (the ids of the volumetry, which numbers lesions
    exactly as ``per_lesion`` numbers the segments "Liver tumor <n>": 26-connected, largest first).
    Columns: Structure, Volume (mL), Percent of liver (%) (100 for the liver, the tumour burden for all
    tumours, each lesion's share), Equivalent diameter (mm), Longest axial diameter (mm), Mean HU, Std HU,
    Centroid R, A, S (mm) (converted from the engine's LPS), Probability (radiomics classifier). Cells that
    do not apply (diameters of the summary rows, a probability that was not computed) are NaN. Every column
    has a unit label and a description; the summary numbers are also node attributes ``LiverTumorSeg.*``.
    The node is locked against editing in Slicer's table view.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import InputError, OutputError
from .image_io import Geometry, Image, atomic_path

log = logging.getLogger("LiverTumorSeg")

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

#: Fallback for the liver's recommended terminology colour (3D Slicer General Anatomy list, SCT 10200004).
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
#: Terminology logics report this grey when an entry has no recommended colour.
_NO_RECOMMENDED_COLOR = (127, 127, 127)

_LOGICS_ATTRIBUTE = "_livertumorseg_logics"

# --------------------------------------------------------------------------------------------- geometry


def ijk_to_ras(geometry: Geometry) -> np.ndarray:
    """4×4 IJK→RAS matrix of a grid given in LPS (columns: the i, j, k voxel axes scaled by spacing)."""
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    matrix = np.eye(4)
    matrix[:3, :3] = lps_to_ras @ geometry.direction_matrix @ np.diag(np.asarray(geometry.spacing, dtype=float))
    matrix[:3, 3] = lps_to_ras @ np.asarray(geometry.origin, dtype=float)
    return matrix


def lps_to_ras(point: Sequence[float]) -> tuple[float, float, float]:
    """A point in LPS millimetres as RAS millimetres."""
    x, y, z = (float(v) for v in point)
    return (-x, -y, z)


def _vtk_matrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


# ----------------------------------------------------------------------------------------------- scene


class _SceneLogics:
    """The module logics a stand-alone scene needs; kept alive as long as the scene's Python object."""

    def __init__(self, scene) -> None:
        import slicer

        self.colors = slicer.vtkMRMLColorLogic()
        self.colors.SetMRMLScene(scene)
        self.terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
        share = _terminologies_share_directory()
        if share is not None:
            self.terminologies.SetModuleShareDirectory(str(share))
        self.terminologies.SetMRMLScene(scene)
        # Setting the scene also registers the segmentation converter rules (labelmap ↔ closed surface).
        self.segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
        self.segmentations.SetMRMLScene(scene)


def _terminologies_share_directory() -> Path | None:
    """Folder with the terminology JSON files: slicer-core ships none, trame-slicer does.

    Found without importing trame-slicer (whose import pulls in the trame web stack, about a second).
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("trame_slicer")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "resources" / "terminologies"
        if any(path.glob("*.term.json")):
            return path
    return None


def _in_slicer_application() -> bool:
    import slicer

    return hasattr(slicer, "app") and hasattr(slicer, "modules")


def create_scene():
    """A new ``vtkMRMLScene`` with the colour, terminology and segmentation logics attached.

    For the command line and tests; inside the Slicer application pass ``slicer.mrmlScene`` instead.
    """
    import slicer

    scene = slicer.vtkMRMLScene()
    _ensure_logics(scene)
    return scene


def _ensure_logics(scene) -> _SceneLogics | None:
    """Logics for ``scene``: the application's inside Slicer, else ones attached to this scene object."""
    logics = getattr(scene, _LOGICS_ATTRIBUTE, None)
    if logics is not None:
        return logics
    if _in_slicer_application():
        return None
    logics = _SceneLogics(scene)
    setattr(scene, _LOGICS_ATTRIBUTE, logics)
    return logics


def _terminologies_logic(scene):
    logics = _ensure_logics(scene)
    if logics is not None:
        return logics.terminologies
    try:
        import slicer

        return slicer.modules.terminologies.logic()
    except Exception:  # noqa: BLE001 - module not loaded: fall back to fixed colours
        return None


def recommended_color(scene, terminology: str, fallback: Sequence[float]) -> tuple[float, float, float]:
    """Recommended display colour (0–1 RGB) of a terminology entry, or ``fallback`` if it has none."""
    try:
        import slicer

        logic = _terminologies_logic(scene)
        if logic is None:
            return tuple(fallback)
        entry = slicer.vtkSlicerTerminologyEntry()
        if not logic.DeserializeTerminologyEntry(terminology, entry):
            return tuple(fallback)
        if not logic.UpdateEntryFromLoadedTerminologies(entry, [], []):
            return tuple(fallback)
        type_object = entry.GetTypeObject()
        rgb = tuple(int(v) for v in type_object.GetRecommendedDisplayRGBValue())
        if type_object.GetCodeValue() == "" or rgb == _NO_RECOMMENDED_COLOR:
            return tuple(fallback)
        return tuple(v / 255.0 for v in rgb)
    except Exception as error:  # noqa: BLE001 - a colour is never worth failing the segmentation for
        log.debug("No recommended colour for %s (%s)", terminology, error)
        return tuple(fallback)


# --------------------------------------------------------------------------------------------- volumes


def volume_node_from_image(scene, image: Image, name: str):
    """Add a ``vtkMRMLScalarVolumeNode`` with the image's voxels (copied) and geometry to ``scene``."""
    from slicer import util

    array = np.asarray(image.array)
    if array.ndim != 3:
        raise ValueError(f"a 3D (z, y, x) image is needed, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype.kind in "iu" and array.dtype.itemsize == 8:  # VTK volumes do not support 64-bit integers
        fits = array.size == 0 or (array.min() >= np.iinfo(np.int32).min and array.max() <= np.iinfo(np.int32).max)
        array = array.astype(np.int32 if fits else np.float64)
    _ensure_logics(scene)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras(image.geometry)))
    util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.CreateDefaultDisplayNodes()
    return node


def _reference_volume_node(scene, geometry: Geometry, shape_zyx: Sequence[int]):
    """A label map node that only carries a grid (no voxel memory): the target geometry for exports."""
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "LiverTumorSeg reference grid")
    image = vtk.vtkImageData()
    image.SetDimensions(int(shape_zyx[2]), int(shape_zyx[1]), int(shape_zyx[0]))
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras(geometry)))
    return node


# ---------------------------------------------------------------------------------------- segmentation


def label_lesions(labels: np.ndarray, tumour_label: int = 2) -> tuple[np.ndarray, int]:
    """Number the 26-connected tumour components 1..n by decreasing voxel count (ties: scan order).

    The same numbering as the volumetry stage's lesion ids. Returns the lesion map (0 outside tumours;
    the smallest unsigned type that holds n) and n.
    """
    box, ranked, count = _ranked_lesions(np.asarray(labels), tumour_label)
    dtype = ranked.dtype if count else np.uint8
    lesions = np.zeros(np.shape(labels), dtype=dtype)
    if count:
        lesions[box] = ranked
    return lesions, count


def _ranked_lesions(labels: np.ndarray, tumour_label: int = 2):
    """(bounding box of the tumour, lesion numbers inside that box, n); the box is None when n = 0."""
    from scipy import ndimage

    mask = labels == tumour_label
    box = _bounding_box(mask)
    if box is None:
        return None, None, 0
    components, count = ndimage.label(mask[box], structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")  # component index (0-based) by decreasing size
    dtype = np.uint8 if count < 2**8 else np.uint16 if count < 2**16 else np.uint32
    rank = np.zeros(count + 1, dtype=dtype)
    rank[order + 1] = np.arange(1, count + 1)
    return box, rank[components], int(count)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _check_labels(labels: Image) -> np.ndarray:
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


def _labelmap_image(shape_zyx: Sequence[int], geometry: Geometry, max_label: int):
    """A ``vtkOrientedImageData`` on the label map's grid (RAS) and a numpy view of its voxels."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    if max_label < 2**8:
        vtk_type = vtk.VTK_UNSIGNED_CHAR
    elif max_label < 2**16:
        vtk_type = vtk.VTK_UNSIGNED_SHORT
    else:
        vtk_type = vtk.VTK_UNSIGNED_INT
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(int(shape_zyx[2]), int(shape_zyx[1]), int(shape_zyx[0]))
    image.AllocateScalars(vtk_type, 1)
    image.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras(geometry)))
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(tuple(shape_zyx))
    return image, voxels


def segmentation_node_from_labels(
    scene,
    labels: Image,
    reference_volume_node=None,
    *,
    name: str = "LiverTumorSeg",
    per_lesion: bool = False,
    algorithm_name: str = "LiverTumorSeg",
):
    """Add a ``vtkMRMLSegmentationNode`` with the segments of a 0/1/2 label map to ``scene``.

    Segments "Liver" and "Liver tumor" (exclusive, as in the label map; see the module docstring), or with
    ``per_lesion`` "Liver" and "Liver tumor 1..n" (26-connected components of label 2, largest first; an
    empty "Liver tumor" when there is none). The reference image geometry is the reference volume's, or
    the label map's own grid without one. Segment IDs are fixed ("Liver", "Liver_tumor", "Liver_tumor_<k>").
    """
    import slicer
    import vtk

    array = _check_labels(labels)
    _ensure_logics(scene)
    shape = array.shape

    if per_lesion:
        box, ranked, count = _ranked_lesions(array)
        image, voxels = _labelmap_image(shape, labels.geometry, count + 1)
        voxels[...] = array
        if count:  # every tumour voxel lies in the box: lesion k becomes label k + 1 (1 stays the liver)
            inside = voxels[box]
            tumour = ranked > 0
            inside[tumour] = ranked[tumour].astype(voxels.dtype) + 1
            palette = LESION_PALETTE
            tumour_segments = [
                (f"{TUMOUR_SEGMENT_ID}_{k}", f"{TUMOUR_SEGMENT_NAME} {k}", palette[(k - 1) % len(palette)])
                for k in range(1, count + 1)
            ]
        else:
            tumour_segments = [(TUMOUR_SEGMENT_ID, TUMOUR_SEGMENT_NAME, TUMOUR_COLOR)]
    else:
        image, voxels = _labelmap_image(shape, labels.geometry, 2)
        voxels[...] = array
        tumour_segments = [(TUMOUR_SEGMENT_ID, TUMOUR_SEGMENT_NAME, TUMOUR_COLOR)]
    del voxels

    liver_color = recommended_color(scene, LIVER_TERMINOLOGY, LIVER_COLOR)
    segments = [(LIVER_SEGMENT_ID, LIVER_SEGMENT_NAME, liver_color, LIVER_TERMINOLOGY)]
    segments += [(sid, sname, color, TUMOUR_TERMINOLOGY) for sid, sname, color in tumour_segments]

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    if reference_volume_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        if reference_volume_node.GetParentTransformNode() is not None:
            node.SetAndObserveTransformNodeID(reference_volume_node.GetParentTransformNode().GetID())
    else:
        node.GetSegmentation().SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
            slicer.vtkSegmentationConverter.SerializeImageGeometry(image),
        )
    segmentation = node.GetSegmentation()
    segment_ids = vtk.vtkStringArray()
    for segment_id, segment_name, color, terminology in segments:
        added = segmentation.AddEmptySegment(segment_id, segment_name, list(color))
        if added != segment_id:
            raise RuntimeError(f"could not add the segment '{segment_id}' to the segmentation (got '{added}')")
        segment = segmentation.GetSegment(segment_id)
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        segment.SetTag(segment.GetTerminologyEntryTagName(), terminology)  # what SetTerminology does, where it exists
        segment.SetTag(ALGORITHM_TYPE_TAG, "AUTOMATIC")
        segment.SetTag(ALGORITHM_NAME_TAG, algorithm_name)
        segment_ids.InsertNextValue(segment_id)
    # Label value k of the image goes into the k-th segment; absent labels leave their segment empty.
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(image, node, segment_ids):
        raise RuntimeError("importing the label map into the segmentation node failed")
    node.CreateDefaultDisplayNodes()
    return node


def segment_tag(segment, tag: str) -> str | None:
    """Value of a segment tag, or None if the segment does not have it."""
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(tag, value) else None


def add_closed_surfaces(segmentation_node) -> bool:
    """Create the closed-surface representation of every segment (what Slicer's 3D view shows)."""
    created = bool(segmentation_node.CreateClosedSurfaceRepresentation())
    if not created:
        log.warning("Closed surfaces could not be created for '%s'.", segmentation_node.GetName())
    return created


# ------------------------------------------------------------------------------------------------ files

SEGMENTATION_SUFFIX = ".seg.nrrd"


def write_segmentation(
    labels: Image,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    per_lesion: bool = False,
    algorithm_name: str = "LiverTumorSeg",
) -> Path:
    """Write a label map as a Slicer ``.seg.nrrd`` (through MRML's segmentation storage node), atomically.

    Uses its own scene. Refuses to replace an existing file unless ``overwrite``. The file is written under
    a temporary name, read back and compared voxel by voxel with ``labels`` (the NRRD writer reports
    success even when the disk fills up), and only then renamed; on any failure nothing is left behind.
    Returns the path written.
    """
    import slicer

    path = Path(path)
    if not path.name.lower().endswith(SEGMENTATION_SUFFIX):
        raise OutputError(f"'{path}': a segmentation file name must end with '{SEGMENTATION_SUFFIX}'.")
    if path.is_dir():
        raise OutputError(f"'{path}' is a folder. Give a file name ending with '{SEGMENTATION_SUFFIX}'.")
    if path.exists() and not overwrite:
        raise OutputError(f"'{path}' already exists. Choose another output, or pass --overwrite to replace it.")
    scene = create_scene()
    node = segmentation_node_from_labels(
        scene, labels, name=path.name[: -len(SEGMENTATION_SUFFIX)] or "LiverTumorSeg",
        per_lesion=per_lesion, algorithm_name=algorithm_name,
    )
    with atomic_path(path, overwrite=overwrite) as tmp:
        storage = slicer.vtkMRMLSegmentationStorageNode()
        scene.AddNode(storage)
        storage.SetUseCompression(True)
        storage.SetCropToMinimumExtent(False)  # keep the whole grid: the file lines up with the CT voxel by voxel
        storage.SetFileName(str(tmp))
        ok = storage.WriteData(node)
        if not ok or not tmp.is_file() or tmp.stat().st_size == 0:
            messages = storage.GetUserMessages().GetAllMessagesAsString().strip()
            raise OutputError(
                f"Writing '{path}' failed{f' ({messages})' if messages else ''}. "
                "Check that the disk is not full and the location is writable."
            )
        # The NRRD writer does not notice a full disk; read the file back before it replaces anything.
        _verify_written(tmp, labels, path)
    return path


def _verify_written(written: Path, labels: Image, path: Path) -> None:
    """Raise OutputError unless ``written`` holds exactly ``labels`` (any tumour segment counting as 2)."""
    import SimpleITK as sitk

    problem = None
    try:
        image = sitk.ReadImage(str(written))
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        problem = f"it cannot be read back ({lines[-1] if lines else 'unreadable'})"
    else:
        voxels = sitk.GetArrayViewFromImage(image)
        geometry = Geometry.from_sitk(image) if image.GetDimension() == 3 else None
        if voxels.shape != labels.array.shape or geometry is None:
            problem = f"it holds an image of shape {voxels.shape} instead of {labels.array.shape}"
        elif not all(
            np.allclose(a, b, rtol=1e-6, atol=1e-6)
            for a, b in zip(
                (geometry.spacing, geometry.origin, geometry.direction),
                (labels.geometry.spacing, labels.geometry.origin, labels.geometry.direction),
            )
        ):
            problem = "its voxel grid differs from the label map's"
        elif not np.array_equal(np.minimum(voxels, 2), labels.array):
            problem = "its voxels differ from the label map"
    if problem:
        raise OutputError(
            f"Writing '{path}' failed: the file written is damaged ({problem}). "
            "Check that the disk is not full, then run again."
        )


def _segment_class(segment) -> int:
    """1 for a liver segment, 2 for a tumour segment, 0 for anything else (by terminology, then name)."""
    parts = (segment_tag(segment, segment.GetTerminologyEntryTagName()) or "").split("~")
    if len(parts) >= 3:
        category = parts[1].split("^")
        type_ = parts[2].split("^")
        type_code = type_[1] if len(type_) > 1 else ""
        category_code = category[1] if len(category) > 1 else ""
        if type_code in _TUMOUR_TYPE_CODES:
            return 2
        if type_code == _LIVER_TYPE_CODE and category_code == _ANATOMICAL_STRUCTURE_CODE:
            return 1
    name = (segment.GetName() or "").strip().lower()
    if name.startswith(("liver tumor", "liver tumour")):
        return 2
    if name == "liver":
        return 1
    return 0


def read_segmentation_labels(path: str | os.PathLike, reference: Image) -> np.ndarray:
    """Read a ``.seg.nrrd`` into a (z, y, x) uint8 label map on ``reference``'s grid.

    1 = the "Liver" segment, 2 = any tumour segment ("Liver tumor", "Liver tumor <k>", or a Neoplasm
    terminology); other segments are ignored. Where segments overlap, tumour wins. On the grid the file
    was written on, this is an exact round trip of :func:`write_segmentation`.
    """
    import slicer
    from slicer import util

    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputError(f"Segmentation file not found: '{path}'.")
    # slicer-core's storage node aborts the whole process on a damaged NRRD (an uncaught ITK exception),
    # so the file must first pass SimpleITK, which reads it with the same NRRD code and raises instead.
    try:
        sitk.ReadImage(str(path))
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise InputError(
            f"'{path}' is not a readable segmentation file ({lines[-1] if lines else 'unreadable'}). "
            "It may be truncated: copy or export it again."
        ) from None
    scene = create_scene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "read")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        messages = storage.GetUserMessages().GetAllMessagesAsString().strip()
        raise InputError(
            f"'{path}' could not be read as a segmentation{f' ({messages})' if messages else ''}. "
            "Save it again from 3D Slicer as a .seg.nrrd file."
        )
    segmentation = node.GetSegmentation()
    chosen: list[tuple[int, str]] = []
    for segment_id in segmentation.GetSegmentIDs():
        label = _segment_class(segmentation.GetSegment(segment_id))
        if label:
            chosen.append((label, segment_id))
    if not chosen:
        raise InputError(
            f"'{path}' has no 'Liver' or 'Liver tumor' segment (found: "
            f"{', '.join(segmentation.GetSegment(s).GetName() for s in segmentation.GetSegmentIDs()) or 'none'})."
        )
    chosen.sort(key=lambda item: item[0])  # liver first, so tumour segments are painted over it
    shape = np.asarray(reference.array).shape
    reference_node = _reference_volume_node(scene, reference.geometry, shape)
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "read labels")
    ids = [segment_id for _, segment_id in chosen]
    if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        node, ids, labelmap_node, reference_node
    ):
        raise InputError(f"The segments of '{path}' could not be mapped onto the reference image grid.")
    exported = util.arrayFromVolume(labelmap_node)
    if exported.shape != shape:
        raise InputError(
            f"The segments of '{path}' came out with shape {exported.shape}, not the reference's {shape}."
        )
    # The export numbers the segments 1..n in the order given; map those numbers to liver/tumour.
    lookup = np.zeros(max(int(exported.max()), len(ids)) + 1, dtype=np.uint8)
    lookup[1 : len(ids) + 1] = [label for label, _ in chosen]
    return lookup[exported]


# ---------------------------------------------------------------------------------------------- tables

_TABLE_COLUMNS = (
    # name, kind, unit, description
    ("Structure", "string", "", "Whole liver, all tumours together, or one lesion ('Lesion <n>' is the "
     "per-lesion segment 'Liver tumor <n>')"),
    ("Volume (mL)", "double", "mL", "Volume from the voxel count"),
    ("Percent of liver (%)", "double", "%", "Volume as a percentage of the whole liver volume (tumours included); "
     "on the 'All tumours' row this is the tumour burden"),
    ("Equivalent diameter (mm)", "double", "mm", "Diameter of the sphere with the same volume"),
    ("Longest axial diameter (mm)", "double", "mm", "Longest in-plane (caliper) diameter on any axial slice"),
    ("Mean HU", "double", "HU", "Mean CT value in the lesion"),
    ("Std HU", "double", "HU", "Standard deviation of the CT values in the lesion"),
    ("Centroid R (mm)", "double", "mm", "Lesion centroid, Right coordinate (RAS)"),
    ("Centroid A (mm)", "double", "mm", "Lesion centroid, Anterior coordinate (RAS)"),
    ("Centroid S (mm)", "double", "mm", "Lesion centroid, Superior coordinate (RAS)"),
    ("Probability", "double", "", "Lesion probability from the radiomics classifier (NaN if not computed)"),
)
TABLE_COLUMN_NAMES = tuple(column[0] for column in _TABLE_COLUMNS)


def _number(value: Any) -> float:
    if value is None:
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def fill_table(node, columns, rows) -> None:
    """Add one typed column per ``(name, "string" | "double", unit, description)`` to a table node, with the
    values of ``rows`` (one sequence per row, in column order)."""
    import vtk

    for index, (column_name, kind, unit, description) in enumerate(columns):
        array = vtk.vtkStringArray() if kind == "string" else vtk.vtkDoubleArray()
        array.SetName(column_name)
        for row in rows:
            array.InsertNextValue(row[index])
        node.AddColumn(array)
        if unit:
            node.SetColumnUnitLabel(column_name, unit)
        node.SetColumnDescription(column_name, description)


def volumetry_table_node(scene, volumetry: dict, name: str = "Liver volumetry"):
    """Add a ``vtkMRMLTableNode`` with the volumetry (layout in the module docstring).

    Rows: "Liver (whole organ)", "All tumours (<n> lesions)", then "Lesion 1".."Lesion n".
    """
    lesions = list(volumetry.get("lesions") or [])
    liver_ml = _number(volumetry.get("liver_volume_ml"))
    tumour_ml = _number(volumetry.get("tumour_volume_ml"))
    burden = _number(volumetry.get("tumour_burden_percent"))
    count = int(volumetry.get("lesion_count", len(lesions)) or 0)
    nan = float("nan")
    has_liver = np.isfinite(liver_ml) and liver_ml > 0

    def percent(volume: float) -> float:
        return 100.0 * volume / liver_ml if has_liver else nan

    lesion_word = "no lesions" if count == 0 else "1 lesion" if count == 1 else f"{count} lesions"
    rows: list[list[Any]] = [
        ["Liver (whole organ)", liver_ml, percent(liver_ml)] + [nan] * 8,
        [f"All tumours ({lesion_word})", tumour_ml, burden] + [nan] * 8,
    ]
    for number, lesion in enumerate(lesions, start=1):
        volume = _number(lesion.get("volume_ml"))
        centroid = lesion.get("centroid_lps_mm")
        ras = lps_to_ras(centroid) if centroid is not None and len(centroid) == 3 else (nan, nan, nan)
        rows.append([
            f"Lesion {lesion.get('id', number)}",
            volume,
            percent(volume),
            _number(lesion.get("equivalent_diameter_mm")),
            _number(lesion.get("longest_axial_diameter_mm")),
            _number(lesion.get("mean_hu")),
            _number(lesion.get("std_hu")),
            *ras,
            _number(lesion.get("probability")),
        ])

    _ensure_logics(scene)
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    was_modifying = node.StartModify()
    fill_table(node, _TABLE_COLUMNS, rows)
    node.SetAttribute("LiverTumorSeg.LiverVolumeMl", repr(liver_ml))
    node.SetAttribute("LiverTumorSeg.TumourVolumeMl", repr(tumour_ml))
    node.SetAttribute("LiverTumorSeg.TumourBurdenPercent", repr(burden))
    node.SetAttribute("LiverTumorSeg.LesionCount", str(count))
    node.SetLocked(True)  # results, not a worksheet: Slicer's table view does not let users edit them
    node.EndModify(was_modifying)
    return node
