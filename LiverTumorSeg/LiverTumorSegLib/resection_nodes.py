"""MRML adapter of the resection planner: plane and resected segment in, plan table and segments out.

Pure functions on MRML nodes, used by the Slicer module's "Resection planning" section and tested outside
the application with ``slicer-core`` (real MRML without Qt). ``slicer`` and ``vtk`` are imported inside
the functions, so the engine imports without them.

Coordinates
    MRML works in RAS millimetres; the engine (:mod:`.resection`, :class:`~.image_io.Geometry`) in LPS.
    A point or direction moves between them by negating its first two coordinates (x and y).

The label map
    The planner works on the reference volume's voxel grid (usually the CT the segmentation was made
    from), in the volume's own coordinate frame: :func:`labels_from_segmentation` exports the "Liver" and
    tumour segments onto that grid (1 liver, 2 tumour; recognised as :mod:`.mrml_nodes` reads them back)
    and :func:`geometry_from_volume_node` gives the grid as an LPS :class:`~.image_io.Geometry`.

Plane (:func:`plane_from_markups`)
    The centre and normal of a ``vtkMRMLMarkupsPlaneNode`` in world coordinates (``GetCenterWorld``,
    ``GetNormalWorld``, so a parent transform of the plane counts). **The plane's normal, the arrow Slicer
    draws on the plane, points into the part that is resected**; ``flip=True`` resects the other side
    (as the markups' "Flip normal" would). When the reference volume sits under a linear transform, the
    plane is expressed in the volume's own frame (point by the inverse transform, normal by its inverse
    transpose), so the sides are those seen in the views.

Resected segment (:func:`resected_mask_from_segment`)
    A segment (e.g. one named "Resected", drawn in the Segment Editor) exported onto the same grid:
    nonzero voxels are resected; only voxels inside the liver count (see :mod:`.resection`).

Outputs
    :func:`plan_table_node` (layout in its docstring) and :func:`remnant_resected_segmentation`: the
    segments "Liver remnant" (green) and "Liver resected" (blue) hold the liver parenchyma (label 1) on
    each side of the cut; tumours are not split: they stay as they are, in their own "Liver tumor" segment.
    The two segments therefore measure the functional remnant and resected volumes of the plan.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from . import mrml_nodes
from .errors import InputError
from .image_io import Geometry
from .resection import TUMOUR, Plane, ResectionPlan, plan_resection

RESECTED_SEGMENT_NAME = "Resected"
REMNANT_SEGMENT_ID, REMNANT_SEGMENT_NAME = "Liver_remnant", "Liver remnant"
RESECTION_SEGMENT_ID, RESECTION_SEGMENT_NAME = "Liver_resected", "Liver resected"
#: Remnant green and resected blue (the blue of the plan report's figures, RGB 60/120/216).
REMNANT_COLOR = (0.0, 0.75, 0.3)
RESECTION_COLOR = (60 / 255, 120 / 255, 216 / 255)

# ------------------------------------------------------------------------------------------- geometry


def ras_to_lps(vector: Sequence[float]) -> tuple[float, float, float]:
    """A point or direction in RAS as LPS (negate x and y); its own inverse."""
    x, y, z = (float(v) for v in vector)
    return (-x, -y, z)


def geometry_from_volume_node(volume_node) -> tuple[Geometry, tuple[int, int, int]]:
    """The volume's voxel grid as an LPS :class:`Geometry` and its array shape (z, y, x)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    ras_to_lps_matrix = np.diag([-1.0, -1.0, 1.0])
    axes = ras_to_lps_matrix @ ijk_to_ras[:3, :3]  # columns: the i, j, k steps in LPS mm
    spacing = np.linalg.norm(axes, axis=0)
    if not np.all(spacing > 0):
        raise InputError(f"The volume '{volume_node.GetName()}' has a zero voxel spacing.")
    direction = axes / spacing
    origin = ras_to_lps_matrix @ ijk_to_ras[:3, 3]
    image = volume_node.GetImageData()
    if image is None:
        raise InputError(f"The volume '{volume_node.GetName()}' has no voxels.")
    x, y, z = image.GetDimensions()
    geometry = Geometry(tuple(float(v) for v in spacing), tuple(float(v) for v in origin),
                        tuple(float(v) for v in direction.ravel()))
    return geometry, (int(z), int(y), int(x))


def _world_to_local(node) -> Optional[np.ndarray]:
    """4×4 matrix from world to the node's own coordinates; None when the node is not transformed."""
    import slicer
    import vtk

    if node is None or node.GetParentTransformNode() is None:
        return None
    parent = node.GetParentTransformNode()
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"The volume '{node.GetName()}' is under a non-linear transform. Harden the transform "
                         "(Transforms module) before planning the resection.")
    matrix = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(None, parent, matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def plane_from_markups(plane_node, reference_node=None, *, flip: bool = False) -> Plane:
    """The markups plane as an LPS :class:`Plane` whose normal points into the resected part.

    The plane's world centre and normal (its parent transform counts); the node's normal is the resected
    direction, reversed with ``flip``. With ``reference_node`` (the volume the label map lies on) under a
    linear transform, the plane is expressed in that volume's own coordinates.
    """
    if plane_node is None:
        raise InputError("Select a resection plane (a Markups plane) first.")
    valid = plane_node.GetIsPlaneValid() if hasattr(plane_node, "GetIsPlaneValid") else \
        plane_node.GetNumberOfControlPoints() > 0
    if not valid:
        raise InputError(f"The plane '{plane_node.GetName()}' is not placed yet. Place it in a view "
                         "(Markups module, or click in a slice view after choosing it).")
    center, normal = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    plane_node.GetCenterWorld(center)
    plane_node.GetNormalWorld(normal)
    center, normal = np.asarray(center, dtype=float), np.asarray(normal, dtype=float)
    local = _world_to_local(reference_node)
    if local is not None:
        center = local[:3, :3] @ center + local[:3, 3]
        normal = np.linalg.inv(local[:3, :3]).T @ normal
    if flip:
        normal = -normal
    return Plane.from_values(list(ras_to_lps(center)) + list(ras_to_lps(normal)))


# ------------------------------------------------------------------------------------------- segments


def find_segment_id(segmentation_node, name: str = RESECTED_SEGMENT_NAME) -> Optional[str]:
    """ID of the first segment named ``name`` (case and surrounding spaces ignored), or None."""
    if segmentation_node is None:
        return None
    segmentation = segmentation_node.GetSegmentation()
    wanted = name.strip().lower()
    for segment_id in segmentation.GetSegmentIDs():
        if (segmentation.GetSegment(segment_id).GetName() or "").strip().lower() == wanted:
            return segment_id
    return None


def _export(segmentation_node, segment_ids: Sequence[str], reference_volume_node) -> np.ndarray:
    """The segments exported onto the reference grid (segment k of the list → value k); the scene is left as it was."""
    import slicer
    from slicer import util

    scene = segmentation_node.GetScene()
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "LiverTumorSeg resection export")
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, list(segment_ids), labelmap, reference_volume_node
        ):
            raise InputError(f"The segments of '{segmentation_node.GetName()}' could not be mapped onto the grid "
                             f"of '{reference_volume_node.GetName()}'.")
        return np.array(util.arrayFromVolume(labelmap), copy=True)
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in before and scene.IsNodePresent(node):
                scene.RemoveNode(node)


def _reference(segmentation_node, reference_volume_node, geometry, shape):
    """(reference node, temporary node to remove or None) from a volume node or a geometry and shape."""
    if reference_volume_node is not None:
        return reference_volume_node, None
    if geometry is None or shape is None:
        raise ValueError("give a reference volume node, or a geometry and a shape")
    node = mrml_nodes._reference_volume_node(segmentation_node.GetScene(), geometry, shape)
    return node, node


def labels_from_segmentation(segmentation_node, reference_volume_node=None, *, geometry: Optional[Geometry] = None,
                             shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """The liver and tumour segments as a 0/1/2 (z, y, x) uint8 label map on the reference grid.

    Segments are recognised by terminology, then name, as :func:`.seg_nrrd.read_segmentation_labels`
    does ("Liver" = 1; "Liver tumor", "Liver tumor <k>" or a Neoplasm terminology = 2, painted over the
    liver); all others (e.g. "Resected", "Liver remnant") are ignored. The grid is the reference volume's,
    or ``geometry`` and ``shape``.
    """
    if segmentation_node is None:
        raise InputError("Select the segmentation with the 'Liver' and 'Liver tumor' segments first.")
    segmentation = segmentation_node.GetSegmentation()
    chosen = []
    for segment_id in segmentation.GetSegmentIDs():
        label = mrml_nodes._segment_class(segmentation.GetSegment(segment_id))
        if label:
            chosen.append((label, segment_id))
    if not any(label == 1 for label, _ in chosen):
        raise InputError(f"The segmentation '{segmentation_node.GetName()}' has no 'Liver' segment. Segment the "
                         "liver first (Apply), or name the liver segment 'Liver'.")
    chosen.sort(key=lambda item: item[0])  # liver first, so tumour segments are painted over it
    reference, temporary = _reference(segmentation_node, reference_volume_node, geometry, shape)
    try:
        exported = _export(segmentation_node, [segment_id for _, segment_id in chosen], reference)
    finally:
        if temporary is not None:
            segmentation_node.GetScene().RemoveNode(temporary)
    lookup = np.zeros(max(int(exported.max()), len(chosen)) + 1, dtype=np.uint8)
    lookup[1: len(chosen) + 1] = [label for label, _ in chosen]
    return lookup[exported]


def resected_mask_from_segment(segmentation_node, segment_id: str, reference_volume_node=None, *,
                               geometry: Optional[Geometry] = None,
                               shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """The segment as a bool (z, y, x) mask on the reference grid (the volume's, or ``geometry``/``shape``)."""
    if segmentation_node is None or not segment_id or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise InputError(f"No segment '{segment_id}' in the segmentation. Draw the part to resect as a segment "
                         f"named '{RESECTED_SEGMENT_NAME}' (Segment Editor), or choose a plane.")
    reference, temporary = _reference(segmentation_node, reference_volume_node, geometry, shape)
    try:
        exported = _export(segmentation_node, [segment_id], reference)
    finally:
        if temporary is not None:
            segmentation_node.GetScene().RemoveNode(temporary)
    return exported != 0


def plan_from_nodes(segmentation_node, reference_volume_node, *, plane_node=None, resected_segment_id=None,
                    liver_state: str = "normal", flip: bool = False, labels: Optional[np.ndarray] = None):
    """Plan a resection from MRML nodes: (plan, labels, geometry) on the reference volume's grid.

    Give exactly one of ``plane_node`` and ``resected_segment_id`` (a segment of ``segmentation_node``).
    ``labels`` may pass a label map already exported from the same nodes (it is then not read again).
    """
    if (plane_node is None) == (not resected_segment_id):
        raise InputError("Choose either a resection plane or a 'Resected' segment.")
    if reference_volume_node is None:
        raise InputError("Select the CT volume the segmentation belongs to.")
    geometry, shape = geometry_from_volume_node(reference_volume_node)
    if labels is None:
        labels = labels_from_segmentation(segmentation_node, reference_volume_node)
    if plane_node is not None:
        plane = plane_from_markups(plane_node, reference_volume_node, flip=flip)
        plan = plan_resection(labels, geometry, plane=plane, liver_state=liver_state)
    else:
        mask = resected_mask_from_segment(segmentation_node, resected_segment_id, reference_volume_node)
        plan = plan_resection(labels, geometry, resected=mask, liver_state=liver_state)
    return plan, labels, geometry


# ---------------------------------------------------------------------------------------------- table

PLAN_TABLE_COLUMNS = (
    # name, kind, unit, description
    ("Structure", "string", "", "Whole liver, functional liver (liver without tumours), or one tumour "
     "(numbered as in the volumetry table)"),
    ("Volume (mL)", "double", "mL", "Volume from the voxel count"),
    ("Resected (mL)", "double", "mL", "Volume on the resected side of the cut"),
    ("Remnant (mL)", "double", "mL", "Volume left in the patient"),
    ("FLR (%)", "double", "%", "Future liver remnant: functional remnant / functional liver volume"),
    ("FLR threshold (%)", "double", "%", "Minimum FLR for the liver state"),
    ("Verdict", "string", "", "pass when the FLR reaches the threshold, else fail"),
    ("Side", "string", "", "Where the tumour lies: resected, remnant, or both (the cut crosses it)"),
    ("Margin (mm)", "double", "mm", "Smallest distance from the tumour to the cut (0 when the cut crosses it)"),
    ("Margin flag", "string", "", "crosses, R1 risk (< 1 mm), close (< 10 mm), or empty"),
    ("Centroid R (mm)", "double", "mm", "Tumour centroid, Right coordinate (RAS)"),
    ("Centroid A (mm)", "double", "mm", "Tumour centroid, Anterior coordinate (RAS)"),
    ("Centroid S (mm)", "double", "mm", "Tumour centroid, Superior coordinate (RAS)"),
)
PLAN_TABLE_COLUMN_NAMES = tuple(column[0] for column in PLAN_TABLE_COLUMNS)
_SIDES = {"fully": "resected", "not": "remnant", "partly": "both"}


def plan_table_rows(result: dict) -> list[list]:
    """The rows of :func:`plan_table_node` (NaN and "" where a cell does not apply)."""
    nan = float("nan")
    rows = [
        ["Liver (whole organ)", result["liver_volume_ml"], result["resected_volume_ml"], result["remnant_volume_ml"],
         nan, nan, "", "", nan, "", nan, nan, nan],
        [f"Functional liver ({result['liver_state']} liver)", result["functional_volume_ml"],
         result["functional_resected_volume_ml"], result["functional_remnant_volume_ml"], result["flr_percent"],
         result["threshold_percent"], result["verdict"], "", nan, "", nan, nan, nan],
    ]
    for tumour in result["tumours"]:
        rows.append([
            f"Tumour {tumour['id']}", tumour["volume_ml"], tumour["resected_volume_ml"],
            tumour["volume_ml"] - tumour["resected_volume_ml"], nan, nan, "", _SIDES[tumour["resected"]],
            tumour["margin_mm"], tumour["margin_flag"] or "", *mrml_nodes.lps_to_ras(tumour["centroid_lps_mm"]),
        ])
    return [[float(v) if kind == "double" else str(v) for v, (_, kind, _, _) in zip(row, PLAN_TABLE_COLUMNS)]
            for row in rows]


def plan_table_node(scene, result: dict, name: str = "Resection plan", table_node=None):
    """A locked ``vtkMRMLTableNode`` with the plan (a new one, or ``table_node`` refilled in place).

    Rows: "Liver (whole organ)" (volume, resected, remnant), "Functional liver (<state> liver)" (the same
    for the liver without tumours, plus FLR %, its threshold and the verdict), then "Tumour <id>" (volume,
    resected, remnant, side, margin, flag, centroid in RAS). Columns: :data:`PLAN_TABLE_COLUMNS`; numbers
    are doubles (NaN where a cell does not apply), words strings. The FLR, threshold, verdict, liver state
    and closest margin are also node attributes ``LiverTumorSeg.*``.
    """
    rows = plan_table_rows(result)
    mrml_nodes._ensure_logics(scene)
    node = table_node if table_node is not None else scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    was_modifying = node.StartModify()
    node.SetLocked(False)
    node.RemoveAllColumns()  # with their properties
    mrml_nodes.fill_table(node, PLAN_TABLE_COLUMNS, rows)
    closest = closest_margin(result)
    node.SetAttribute("LiverTumorSeg.FLRPercent", repr(float(result["flr_percent"])))
    node.SetAttribute("LiverTumorSeg.FLRThresholdPercent", repr(float(result["threshold_percent"])))
    node.SetAttribute("LiverTumorSeg.Verdict", result["verdict"])
    node.SetAttribute("LiverTumorSeg.LiverState", result["liver_state"])
    node.SetAttribute("LiverTumorSeg.ClosestMarginMm", repr(float(closest["margin_mm"])) if closest else "nan")
    node.SetLocked(True)
    node.EndModify(was_modifying)
    return node


def closest_margin(result: dict) -> Optional[dict]:
    """The tumour closest to the cut (smallest margin, the lower id on ties), or None without tumours."""
    tumours = result.get("tumours") or []
    return min(tumours, key=lambda t: (t["margin_mm"], t["id"])) if tumours else None


def summary_text(result: dict) -> str:
    """One line for the module panel: FLR with threshold and verdict, and the closest margin."""
    text = (f"FLR {result['flr_percent']:.1f} % (remnant {result['functional_remnant_volume_ml']:.0f} of "
            f"{result['functional_volume_ml']:.0f} mL functional liver); {result['liver_state']} liver needs "
            f"≥ {result['threshold_percent']:.0f} %: {result['verdict'].upper()}.")
    closest = closest_margin(result)
    if closest is None:
        return text + " No tumour."
    flag = f" [{closest['margin_flag']}]" if closest["margin_flag"] else ""
    return text + f" Closest margin: {closest['margin_mm']:.1f} mm (tumour {closest['id']}){flag}."


# ------------------------------------------------------------------------------------------ segments out


def remnant_resected_segmentation(scene, plan: ResectionPlan, labels: np.ndarray, geometry: Geometry,
                                  name: str = "Resection plan", segmentation_node=None, *,
                                  reference_volume_node=None, tumours: Optional[bool] = None):
    """Segments "Liver remnant" and "Liver resected" (the liver parenchyma on each side) of a plan.

    Into ``segmentation_node`` (its segments with those IDs are replaced, the others left alone) or a new
    node named ``name``. Tumours are not split: with ``tumours`` (default: only for a new node) a
    "Liver tumor" segment holds label 2 as it is. The segments lie on the label map's grid; a new node
    takes the reference volume's geometry and parent transform. Returns the node.
    """
    import slicer
    import vtk

    labels = np.asarray(labels)
    if labels.shape != plan.resected_liver.shape:
        raise InputError(f"The plan has shape {plan.resected_liver.shape} but the label map {labels.shape}.")
    mrml_nodes._ensure_logics(scene)
    new = segmentation_node is None
    if tumours is None:
        tumours = new
    parenchyma = labels == 1
    segments = [(REMNANT_SEGMENT_ID, REMNANT_SEGMENT_NAME, REMNANT_COLOR, parenchyma & ~plan.resected_liver),
                (RESECTION_SEGMENT_ID, RESECTION_SEGMENT_NAME, RESECTION_COLOR, parenchyma & plan.resected_liver)]
    if tumours:
        segments.append((mrml_nodes.TUMOUR_SEGMENT_ID, mrml_nodes.TUMOUR_SEGMENT_NAME, mrml_nodes.TUMOUR_COLOR,
                         labels == TUMOUR))
    image, voxels = mrml_nodes._labelmap_image(labels.shape, geometry, len(segments))
    voxels[...] = 0
    for value, (_, _, _, mask) in enumerate(segments, start=1):
        voxels[mask] = value
    del voxels

    if new:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        if reference_volume_node is not None:
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
            segmentation_node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
        else:
            segmentation_node.GetSegmentation().SetConversionParameter(
                slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
                slicer.vtkSegmentationConverter.SerializeImageGeometry(image),
            )
    segmentation = segmentation_node.GetSegmentation()
    was_modifying = segmentation_node.StartModify()
    try:
        segment_ids = vtk.vtkStringArray()
        for segment_id, segment_name, color, _ in segments:
            if segmentation.GetSegment(segment_id) is not None:
                segmentation.RemoveSegment(segment_id)
            added = segmentation.AddEmptySegment(segment_id, segment_name, list(color))
            if added != segment_id:
                raise RuntimeError(f"could not add the segment '{segment_id}' (got '{added}')")
            segment = segmentation.GetSegment(segment_id)
            segment.SetNameAutoGenerated(False)
            segment.SetColorAutoGenerated(False)
            if segment_id == mrml_nodes.TUMOUR_SEGMENT_ID:
                segment.SetTag(segment.GetTerminologyEntryTagName(), mrml_nodes.TUMOUR_TERMINOLOGY)
            segment_ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(image, segmentation_node,
                                                                                         segment_ids):
            raise RuntimeError("importing the remnant and resected liver into the segmentation failed")
    finally:
        segmentation_node.EndModify(was_modifying)
    segmentation_node.CreateDefaultDisplayNodes()
    return segmentation_node


# ---------------------------------------------------------------------------------------------- report


def report_folder(parent, name: str):
    """A new folder path ``<parent>/<name> resection plan`` (then `` 2``, `` 3``, … if taken); not created.

    Characters that are not allowed in file names are replaced by ``_``.
    """
    from pathlib import Path

    safe = "".join("_" if c in '<>:"/\\|?*' or ord(c) < 32 else c for c in (name or "").strip()).strip(" .")
    base = f"{safe or 'Liver'} resection plan"
    parent = Path(parent)
    candidate, number = parent / base, 1
    while candidate.exists() or candidate.is_symlink():
        number += 1
        candidate = parent / f"{base} {number}"
    return candidate
