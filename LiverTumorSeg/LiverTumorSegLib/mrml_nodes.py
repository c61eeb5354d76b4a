"""MRML adapter: engine results as Slicer nodes (volume, segmentation, volumetry table).

The same code runs inside the 3D Slicer application (the caller passes ``slicer.mrmlScene``) and outside it
with the ``slicer-core`` package (real MRML without Qt; the caller makes a scene with :func:`create_scene`).
``slicer`` and ``vtk`` are imported inside the functions, so the engine imports without them.

Segments
    :func:`segmentation_node_from_labels` builds the segments that :mod:`.seg_nrrd` defines for a 0/1/2
    label map (names, IDs, colours, terminology, per-lesion numbering; see there) and that it writes to
    ``.seg.nrrd`` files without MRML. In a scene the liver's colour is read from the loaded terminology
    when available (the same value is the fallback).

Coordinates: the engine's :class:`~.image_io.Geometry` is LPS, MRML is RAS (:func:`~.seg_nrrd.ijk_to_ras`).

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
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .image_io import Geometry, Image
from .seg_nrrd import (  # noqa: F401 - the layout's names are part of this adapter for its callers
    ALGORITHM_NAME_TAG, ALGORITHM_TYPE_TAG, LIVER_COLOR, LIVER_SEGMENT_ID, LIVER_TERMINOLOGY, TUMOUR_COLOR,
    TUMOUR_SEGMENT_ID, TUMOUR_SEGMENT_NAME, TUMOUR_TERMINOLOGY, check_labels, ijk_to_ras, lps_to_ras, segment_label,
    segments_of,
)

log = logging.getLogger("LiverTumorSeg")

#: Terminology logics report this grey when an entry has no recommended colour.
_NO_RECOMMENDED_COLOR = (127, 127, 127)

_LOGICS_ATTRIBUTE = "_livertumorseg_logics"

# --------------------------------------------------------------------------------------------- geometry


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

    The segments of :func:`.seg_nrrd.segments_of`: "Liver" and "Liver tumor" (exclusive, as in the label
    map), or with ``per_lesion`` "Liver" and "Liver tumor 1..n" (an empty "Liver tumor" when there is no
    lesion), with fixed IDs ("Liver", "Liver_tumor", "Liver_tumor_<k>"). The reference image geometry is
    the reference volume's, or the label map's own grid without one.
    """
    import slicer
    import vtk

    voxels, segments = segments_of(check_labels(labels), per_lesion)
    _ensure_logics(scene)
    image, image_voxels = _labelmap_image(voxels.shape, labels.geometry, len(segments))
    image_voxels[...] = voxels
    del image_voxels
    liver_color = recommended_color(scene, LIVER_TERMINOLOGY, LIVER_COLOR)

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
        color = liver_color if segment_id == LIVER_SEGMENT_ID else color
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
    # Voxel value k of the image goes into the k-th segment; absent values leave their segment empty.
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


def _segment_class(segment) -> int:
    """1 for a liver segment, 2 for a tumour segment, 0 for anything else (:func:`.seg_nrrd.segment_label`)."""
    parts = (segment_tag(segment, segment.GetTerminologyEntryTagName()) or "").split("~") + ["", "", ""]
    category, type_ = ((part.split("^") + ["", ""])[1] for part in parts[1:3])  # scheme^code^meaning
    return segment_label(segment.GetName(), category, type_)


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
