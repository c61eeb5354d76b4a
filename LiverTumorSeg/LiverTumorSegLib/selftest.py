"""Checks of a finished segmentation, shared by the Slicer module's self-test and the repository's tests.

The Slicer module's ``LiverTumorSegTest`` runs them inside the 3D Slicer application; ``Testing/`` runs the
same functions against real MRML from the ``slicer-core`` package. Each check raises
:class:`SelfTestFailure` (an ``AssertionError``) with a message that names what is wrong.

What a correct result looks like:

* **Output folder** of ``livertumorseg segment``: every output file is there; the label map holds only
  0/1/2 on the input's voxel grid; ``volumetry.json`` agrees with the label map
  (:func:`check_output_folder`, :func:`check_volumetry`).
* **Segmentation node**: segments "Liver" and "Liver tumor" (or "Liver tumor 1..n" per lesion), names and
  colours fixed (not auto-generated), the standard terminology (SCT 10200004 Liver; SCT 108369006 Neoplasm),
  the DICOM algorithm tags, and, given the expected label map and the reference volume, exactly its
  voxels (:func:`check_segmentation_node`); a closed surface for every non-empty segment
  (:func:`check_closed_surfaces`).
* **Volumetry table node**: the columns of :data:`~.mrml_nodes.TABLE_COLUMN_NAMES`, one row for the liver,
  one for all tumours and one per lesion, with the numbers of the volumetry (:func:`check_volumetry_table`).

``slicer`` and ``vtk`` are imported inside the functions, so this module imports without them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

#: Files the command line writes into its output folder (label map as NIfTI, the default).
OUTPUT_FILES = (
    "segmentation.nii.gz",
    "segmentation.seg.nrrd",
    "volumetry.json",
    "volumetry.csv",
    "report.html",
    "run.json",
)

LIVER_TYPE_CODE = "10200004"  # SCT Liver
NEOPLASM_TYPE_CODE = "108369006"  # SCT Neoplasm
#: Lowest liver Dice against a phantom's truth that a working bundled model must reach (a loose floor:
#: it catches a broken model, a flipped axis or a lost geometry, not a small loss of accuracy).
MIN_PHANTOM_LIVER_DICE = 0.5

_RELATIVE_TOLERANCE = 1e-6
_VOLUME_TOLERANCE_ML = 1e-6


class SelfTestFailure(AssertionError):
    """A result is not what the pipeline promises; the message says what differs."""


def _fail(message: str) -> None:
    raise SelfTestFailure(message)


def _close(a: float, b: float, *, abs_tol: float = _VOLUME_TOLERANCE_ML) -> bool:
    return math.isclose(float(a), float(b), rel_tol=_RELATIVE_TOLERANCE, abs_tol=abs_tol)


# ------------------------------------------------------------------------------------------ phantoms


def make_phantom_volume(scene, seed: int = 7, *, size: str = "small", name: Optional[str] = None):
    """Add a synthetic CT phantom to ``scene`` as a scalar volume node; return ``(volume_node, phantom)``.

    The node has the phantom's voxels (HU) and geometry and an abdominal CT window; ``phantom.label`` is
    the truth (0/1/2) on the same grid.
    """
    from .mrml_nodes import volume_node_from_image
    from .phantoms import generate_phantom

    phantom = generate_phantom(seed, size=size)
    node = volume_node_from_image(scene, phantom.image, name or f"LiverTumorSeg phantom {seed}")
    display = node.GetDisplayNode()
    if display is not None:
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(400.0, 50.0)
    return node, phantom


def liver_dice(labels: np.ndarray, truth: np.ndarray) -> float:
    """Dice of the whole liver (labels 1 and 2 together) of a result against a truth label map."""
    from .metrics import dice

    return dice(np.asarray(labels) >= 1, np.asarray(truth) >= 1)


def check_liver_found(labels: np.ndarray, truth: np.ndarray, min_dice: float = MIN_PHANTOM_LIVER_DICE) -> float:
    """The result finds the phantom's liver (whole-liver Dice at least ``min_dice``); return the Dice."""
    labels, truth = np.asarray(labels), np.asarray(truth)
    if labels.shape != truth.shape:
        _fail(f"The label map has shape {labels.shape}, the truth {truth.shape}: the result is not on the input grid.")
    value = liver_dice(labels, truth)
    if not value >= min_dice:
        _fail(
            f"Liver Dice against the phantom's truth is {value:.3f}, below {min_dice}: the model or the "
            "geometry handling is broken (a flipped axis or a lost spacing gives this)."
        )
    return value


# ------------------------------------------------------------------------------------- output folder


def check_volumetry(volumetry: dict, labels: np.ndarray, voxel_volume_mm3: float) -> None:
    """``volumetry`` (the engine's dict) agrees with the 0/1/2 ``labels`` it was measured on."""
    labels = np.asarray(labels)
    voxel_ml = float(voxel_volume_mm3) / 1000.0
    for key in ("liver_volume_ml", "tumour_volume_ml", "tumour_burden_percent", "lesion_count", "lesions"):
        if key not in volumetry:
            _fail(f"The volumetry has no '{key}'.")
    liver_ml = np.count_nonzero(labels) * voxel_ml
    tumour_ml = np.count_nonzero(labels == 2) * voxel_ml
    if not _close(volumetry["liver_volume_ml"], liver_ml, abs_tol=voxel_ml / 2):
        _fail(f"Liver volume {volumetry['liver_volume_ml']} mL differs from the label map's {liver_ml} mL.")
    if not _close(volumetry["tumour_volume_ml"], tumour_ml, abs_tol=voxel_ml / 2):
        _fail(f"Tumour volume {volumetry['tumour_volume_ml']} mL differs from the label map's {tumour_ml} mL.")
    burden = 100.0 * tumour_ml / liver_ml if liver_ml > 0 else 0.0
    if not _close(volumetry["tumour_burden_percent"], burden, abs_tol=1e-6):
        _fail(f"Tumour burden {volumetry['tumour_burden_percent']} % differs from tumour/liver = {burden} %.")
    lesions = volumetry["lesions"]
    if int(volumetry["lesion_count"]) != len(lesions):
        _fail(f"lesion_count is {volumetry['lesion_count']} but {len(lesions)} lesions are listed.")
    if tumour_ml == 0 and lesions:
        _fail("Lesions are listed although the label map has no tumour voxel.")
    if tumour_ml > 0 and not lesions:
        _fail("The label map has tumour voxels but the volumetry lists no lesion.")
    total = sum(float(lesion["volume_ml"]) for lesion in lesions)
    if not _close(total, tumour_ml, abs_tol=voxel_ml / 2):
        _fail(f"The lesion volumes add up to {total} mL, not to the tumour volume {tumour_ml} mL.")
    volumes = [float(lesion["volume_ml"]) for lesion in lesions]
    if volumes != sorted(volumes, reverse=True):
        _fail("Lesions are not numbered from the largest to the smallest.")
    if [int(lesion["id"]) for lesion in lesions] != list(range(1, len(lesions) + 1)):
        _fail("Lesion ids are not 1..n.")


def check_output_folder(out_dir, reference=None):
    """The command line's output folder is complete and consistent; return ``(labels_image, volumetry)``.

    ``reference`` (an engine :class:`~.image_io.Image`, the input CT) makes the check also require the
    label map to lie on the input's voxel grid.
    """
    from .image_io import read_image

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        _fail(f"The output folder '{out_dir}' does not exist.")
    missing = [name for name in OUTPUT_FILES if not (out_dir / name).is_file() or (out_dir / name).stat().st_size == 0]
    if missing:
        _fail(f"The output folder '{out_dir}' lacks {', '.join(missing)}.")
    labels = read_image(out_dir / "segmentation.nii.gz", kind="label map")
    values = set(np.unique(labels.array).tolist())
    if not values <= {0, 1, 2}:
        _fail(f"The label map holds values {sorted(values)}; only 0 (background), 1 (liver) and 2 (tumour) are allowed.")
    if reference is not None:
        check_same_grid(labels, reference)
    volumetry = json.loads((out_dir / "volumetry.json").read_text(encoding="utf-8"))
    check_volumetry(volumetry, labels.array, labels.geometry.voxel_volume_mm3)
    return labels, volumetry


def check_same_grid(image, reference) -> None:
    """Two engine images share the voxel grid: shape, spacing, origin and direction."""
    if tuple(image.array.shape) != tuple(reference.array.shape):
        _fail(f"The label map has shape {image.array.shape}, the input {reference.array.shape}.")
    for what in ("spacing", "origin", "direction"):
        a = np.asarray(getattr(image.geometry, what), dtype=float)
        b = np.asarray(getattr(reference.geometry, what), dtype=float)
        if not np.allclose(a, b, rtol=1e-5, atol=1e-4):
            _fail(f"The label map's {what} {tuple(a)} differs from the input's {tuple(b)}.")


# -------------------------------------------------------------------------------------- segmentation


def _tag(segment, name: str) -> str:
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else ""


def terminology_type_code(segment) -> str:
    """The SNOMED CT code of the segment's terminology type ('' without a terminology)."""
    parts = _tag(segment, segment.GetTerminologyEntryTagName()).split("~")
    if len(parts) < 3:
        return ""
    fields = parts[2].split("^")
    return fields[1] if len(fields) > 1 else ""


def segment_names(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetSegment(sid).GetName() for sid in segmentation.GetSegmentIDs()]


def check_segmentation_node(
    segmentation_node,
    *,
    per_lesion: bool = False,
    labels: Optional[np.ndarray] = None,
    reference_volume_node=None,
) -> dict[str, int]:
    """Check the segments of a result (see the module notes); return ``{segment name: voxel count}``.

    With ``labels`` (the expected 0/1/2 map) and ``reference_volume_node`` (the input volume), the segments
    are exported onto the input grid and must hold exactly those voxels (any tumour segment counting as 2).
    """
    from .mrml_nodes import ALGORITHM_NAME_TAG, ALGORITHM_TYPE_TAG

    if segmentation_node is None:
        _fail("There is no segmentation node.")
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segmentation.GetSegmentIDs())
    names = [segmentation.GetSegment(sid).GetName() for sid in ids]
    if not names or names[0] != "Liver":
        _fail(f"The first segment must be 'Liver'; the segments are {names}.")
    tumour_names = names[1:]
    if per_lesion:
        numbered = [f"Liver tumor {k}" for k in range(1, len(tumour_names) + 1)]
        if tumour_names != numbered and tumour_names != ["Liver tumor"]:
            _fail(f"Per-lesion segments must be 'Liver tumor 1..n' (or one empty 'Liver tumor'); got {tumour_names}.")
    elif tumour_names != ["Liver tumor"]:
        _fail(f"The segments must be 'Liver' and 'Liver tumor'; got {names}.")

    for sid, name in zip(ids, names):
        segment = segmentation.GetSegment(sid)
        if segment.GetNameAutoGenerated() or segment.GetColorAutoGenerated():
            _fail(f"Segment '{name}': its name and colour must be fixed, not marked auto-generated.")
        code = terminology_type_code(segment)
        expected = LIVER_TYPE_CODE if name == "Liver" else NEOPLASM_TYPE_CODE
        if code != expected:
            _fail(
                f"Segment '{name}' has terminology type code '{code or 'none'}'; expected SCT {expected} "
                f"({'Liver' if expected == LIVER_TYPE_CODE else 'Neoplasm'})."
            )
        if _tag(segment, ALGORITHM_TYPE_TAG) != "AUTOMATIC":
            _fail(f"Segment '{name}' lacks the DICOM algorithm type tag AUTOMATIC.")
        if not _tag(segment, ALGORITHM_NAME_TAG):
            _fail(f"Segment '{name}' lacks the DICOM algorithm name tag.")
    if not segmentation.ContainsRepresentation(segmentation.GetSourceRepresentationName()
                                               if hasattr(segmentation, "GetSourceRepresentationName")
                                               else segmentation.GetMasterRepresentationName()):
        _fail("The segmentation has no source (binary labelmap) representation.")

    counts: dict[str, int] = {}
    if labels is not None and reference_volume_node is not None:
        exported = segmentation_labels(segmentation_node, reference_volume_node)
        expected_labels = np.asarray(labels)
        if exported.shape != expected_labels.shape:
            _fail(f"The segments export to shape {exported.shape} on the input grid, not {expected_labels.shape}.")
        differ = int(np.count_nonzero(exported != expected_labels))
        if differ:
            _fail(f"The segments differ from the label map in {differ} voxel(s) on the input grid.")
        counts["Liver"] = int(np.count_nonzero(exported == 1))
        counts["tumour"] = int(np.count_nonzero(exported == 2))
    return counts


def segmentation_labels(segmentation_node, reference_volume_node) -> np.ndarray:
    """The segments as a 0/1/2 (z, y, x) array on the reference volume's grid (by terminology, then name).

    Exports through a temporary label map node; every node the export adds to the scene (the label map,
    its display node, a colour table) is removed again.
    """
    import slicer
    from slicer import util

    segmentation = segmentation_node.GetSegmentation()
    chosen = []
    for sid in segmentation.GetSegmentIDs():
        segment = segmentation.GetSegment(sid)
        code = terminology_type_code(segment)
        name = segment.GetName().lower()
        if code == NEOPLASM_TYPE_CODE or name.startswith("liver tumor"):
            chosen.append((2, sid))
        elif code == LIVER_TYPE_CODE or name == "liver":
            chosen.append((1, sid))
    chosen.sort(key=lambda item: item[0])  # liver first: tumour segments are painted over it
    scene = segmentation_node.GetScene()
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "LiverTumorSeg check labels")
    try:
        ids = [sid for _, sid in chosen]
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, reference_volume_node
        ):
            _fail("The segments could not be exported onto the input volume's grid.")
        exported = np.array(util.arrayFromVolume(labelmap), copy=True)
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        remove_node(scene, labelmap)
        for node in added:
            if node.GetID() not in before and scene.IsNodePresent(node):
                scene.RemoveNode(node)
    lookup = np.zeros(max(int(exported.max()), len(chosen)) + 1, dtype=np.uint8)
    lookup[1 : len(chosen) + 1] = [label for label, _ in chosen]
    return lookup[exported]


def remove_node(scene, node) -> None:
    """Remove a node with its display and storage nodes."""
    if node is None or scene is None:
        return
    attached = []
    for getter, count in (("GetNthDisplayNode", "GetNumberOfDisplayNodes"), ("GetNthStorageNode", "GetNumberOfStorageNodes")):
        if hasattr(node, count):
            attached += [getattr(node, getter)(i) for i in range(getattr(node, count)())]
    for attached_node in attached:
        if attached_node is not None and scene.IsNodePresent(attached_node):
            scene.RemoveNode(attached_node)
    if scene.IsNodePresent(node):
        scene.RemoveNode(node)


def check_closed_surfaces(segmentation_node) -> None:
    """Every non-empty segment has a closed surface (what the 3D view shows)."""
    import vtk

    segmentation = segmentation_node.GetSegmentation()
    if not segmentation.ContainsRepresentation("Closed surface"):
        _fail("The segmentation has no closed-surface representation: it would not show in the 3D view.")
    for sid in segmentation.GetSegmentIDs():
        segment = segmentation.GetSegment(sid)
        labelmap = segment.GetRepresentation(segmentation.GetSourceRepresentationName()
                                             if hasattr(segmentation, "GetSourceRepresentationName")
                                             else segmentation.GetMasterRepresentationName())
        empty = labelmap is None or _is_empty_labelmap(labelmap, segment.GetLabelValue())
        surface = vtk.vtkPolyData()
        segmentation_node.GetClosedSurfaceRepresentation(sid, surface)
        if not empty and surface.GetNumberOfPoints() == 0:
            _fail(f"Segment '{segment.GetName()}' is not empty but has an empty closed surface.")


def _is_empty_labelmap(labelmap, label_value: int) -> bool:
    from vtk.util import numpy_support

    scalars = labelmap.GetPointData().GetScalars() if labelmap.GetPointData() is not None else None
    if scalars is None or labelmap.GetNumberOfPoints() == 0:
        return True
    return not np.any(numpy_support.vtk_to_numpy(scalars) == label_value)


# --------------------------------------------------------------------------------------------- table


def _table_column(table_node, name: str) -> list[Any]:
    table = table_node.GetTable()
    column = table.GetColumnByName(name)
    if column is None:
        _fail(f"The volumetry table has no column '{name}'.")
    return [column.GetValue(row) for row in range(table.GetNumberOfRows())]


def check_volumetry_table(table_node, volumetry: dict) -> None:
    """The table node holds ``volumetry`` in the layout of :func:`~.mrml_nodes.volumetry_table_node`."""
    from .mrml_nodes import TABLE_COLUMN_NAMES

    if table_node is None:
        _fail("There is no volumetry table node.")
    table = table_node.GetTable()
    columns = [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]
    if tuple(columns) != tuple(TABLE_COLUMN_NAMES):
        _fail(f"The volumetry table has columns {columns}; expected {list(TABLE_COLUMN_NAMES)}.")
    lesions = list(volumetry.get("lesions") or [])
    if table.GetNumberOfRows() != 2 + len(lesions):
        _fail(f"The volumetry table has {table.GetNumberOfRows()} rows; expected {2 + len(lesions)} "
              f"(liver, all tumours, {len(lesions)} lesion(s)).")
    structures = [str(value) for value in _table_column(table_node, "Structure")]
    if structures[0] != "Liver (whole organ)" or not structures[1].startswith("All tumours"):
        _fail(f"The first rows must be the whole liver and all tumours; got {structures[:2]}.")
    expected_names = [f"Lesion {lesion.get('id', k)}" for k, lesion in enumerate(lesions, start=1)]
    if structures[2:] != expected_names:
        _fail(f"The lesion rows are {structures[2:]}; expected {expected_names}.")
    volumes = [float(value) for value in _table_column(table_node, "Volume (mL)")]
    expected_volumes = [volumetry["liver_volume_ml"], volumetry["tumour_volume_ml"]] + [l["volume_ml"] for l in lesions]
    for row, (got, want) in enumerate(zip(volumes, expected_volumes)):
        if not _close(got, want):
            _fail(f"Row '{structures[row]}': volume {got} mL in the table, {want} mL in the volumetry.")
    percents = [float(value) for value in _table_column(table_node, "Percent of liver (%)")]
    if volumetry["liver_volume_ml"] > 0 and not _close(percents[1], volumetry["tumour_burden_percent"]):
        _fail(f"Tumour burden {percents[1]} % in the table, {volumetry['tumour_burden_percent']} % in the volumetry.")
    count = table_node.GetAttribute("LiverTumorSeg.LesionCount")
    if count != str(int(volumetry["lesion_count"])):
        _fail(f"The table's LiverTumorSeg.LesionCount attribute is {count!r}, not {volumetry['lesion_count']}.")


def check_result_nodes(
    segmentation_node,
    table_node,
    volumetry: dict,
    *,
    per_lesion: bool = False,
    labels: Optional[np.ndarray] = None,
    reference_volume_node=None,
    closed_surfaces: bool = True,
) -> dict[str, int]:
    """All node checks of one result: segments, closed surfaces (optional) and the volumetry table."""
    counts = check_segmentation_node(
        segmentation_node, per_lesion=per_lesion, labels=labels, reference_volume_node=reference_volume_node
    )
    if closed_surfaces:
        check_closed_surfaces(segmentation_node)
    check_volumetry_table(table_node, volumetry)
    if per_lesion and volumetry.get("lesion_count", 0) > 0:
        names = segment_names(segmentation_node)
        if len(names) - 1 != int(volumetry["lesion_count"]):
            _fail(f"{len(names) - 1} tumour segments for {volumetry['lesion_count']} lesion(s) in the volumetry.")
    return counts


def summary(names: Sequence[str], counts: dict[str, int], volumetry: dict) -> str:
    """One line for a test log."""
    return (
        f"segments {list(names)}; liver {volumetry.get('liver_volume_ml', float('nan')):.1f} mL, "
        f"{volumetry.get('lesion_count', 0)} lesion(s), burden {volumetry.get('tumour_burden_percent', 0.0):.2f} %; "
        f"voxels {counts}"
    )
