"""The Slicer module's resection planner: plans on MRML nodes, keeps the last one, refills the same result nodes.

Each plan fills the plan table and the "Liver remnant" / "Liver resected" segmentation that belong to the
segmentation it was made from (linked to it by node references, so they are found again after the scene
is saved and loaded, and reused while a plane is dragged). The label map exported for one pair of nodes
is kept, so a moving plane is planned without exporting the segments again. MRML comes in as arguments
(``slicer-core`` in tests, the application's scene in Slicer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from . import resection_nodes
from .errors import InputError, LiverTumorSegError
from .scene_run import in_scene, place_in_study

#: Node reference roles on the segmentation that link its resection plan table and segmentation.
TABLE_REFERENCE = "LiverTumorSegResectionTable"
SEGMENTATION_REFERENCE = "LiverTumorSegResectionSegmentation"


@dataclass
class PlannedResection:
    """The last resection plan with what its report needs, and the nodes that show it."""

    plan: Any  # resection.ResectionPlan
    labels: Any
    geometry: Any
    title: str
    inputs: dict
    table_node: Any
    segmentation_node: Any


class ResectionPlanner:
    """Plans resections on a segmentation node and remembers the last plan for its report."""

    def __init__(self) -> None:
        self.last: Optional[PlannedResection] = None
        self._labels = None  # (key of the nodes, label map exported from them)

    def plan(self, segmentation_node, reference_volume, *, plane_node=None, resected_segment_id=None,
             liver_state: str = "normal", flip_plane: bool = False, reuse_labels: bool = False) -> PlannedResection:
        """Plan with a Markups plane (normal into the resected part; ``flip_plane`` resects the other side) or a
        segment of ``segmentation_node``, on the grid of ``reference_volume``; fill or create the result nodes
        (new ones next to the CT in the subject hierarchy).

        ``reuse_labels`` reuses the label map read from the same nodes last time (while a plane is dragged).
        Raises the engine's InputError with a message for the user when the inputs cannot be planned.
        """
        scene = segmentation_node.GetScene()
        key = (segmentation_node.GetID(), reference_volume.GetID())
        labels = self._labels[1] if reuse_labels and self._labels is not None and self._labels[0] == key else None
        plan, labels, geometry = resection_nodes.plan_from_nodes(
            segmentation_node, reference_volume, plane_node=plane_node, resected_segment_id=resected_segment_id,
            liver_state=liver_state, flip=flip_plane, labels=labels)
        self._labels = (key, labels)

        created = []
        table = segmentation_node.GetNodeReference(TABLE_REFERENCE)
        table = resection_nodes.plan_table_node(scene, plan.result, name=f"{reference_volume.GetName()} resection plan",
                                                table_node=table if in_scene(scene, table) else None)
        target = segmentation_node.GetNodeReference(SEGMENTATION_REFERENCE)
        target = resection_nodes.remnant_resected_segmentation(
            scene, plan, labels, geometry, f"{reference_volume.GetName()} resection",
            segmentation_node=target if in_scene(scene, target) else None,
            reference_volume_node=reference_volume, tumours=True)
        for role, node in ((TABLE_REFERENCE, table), (SEGMENTATION_REFERENCE, target)):
            if segmentation_node.GetNodeReferenceID(role) != node.GetID():
                segmentation_node.SetNodeReferenceID(role, node.GetID())
                created.append(node)
        place_in_study(scene, reference_volume, created)  # new result nodes go next to the CT

        if plane_node is not None:
            method = f"plane '{plane_node.GetName()}'" + (" (other side)" if flip_plane else "")
        else:
            segment = segmentation_node.GetSegmentation().GetSegment(resected_segment_id)
            method = f"segment '{segment.GetName() if segment else resected_segment_id}'"
        inputs = {"volume": reference_volume.GetName(), "segmentation": segmentation_node.GetName(), "resection": method}
        self.last = PlannedResection(plan, labels, geometry, reference_volume.GetName(), inputs, table, target)
        return self.last

    def plan_choice(self, segmentation_node, reference_volume, *, method: str = "plane", plane_node=None,
                    flip_plane: bool = False, liver_state: str = "normal", reuse_labels: bool = False) -> PlannedResection:
        """:meth:`plan` with the module's choices: ``method`` "plane" (``plane_node``) or "segment" (the segment
        named "Resected" of ``segmentation_node``); InputError saying what to choose when something is missing."""
        if segmentation_node is None or reference_volume is None:
            raise InputError("Select the CT volume and its output segmentation (segment the liver first).")
        if method == "plane":
            if plane_node is None:
                raise InputError("Choose or create a resection plane.")
            return self.plan(segmentation_node, reference_volume, plane_node=plane_node, liver_state=liver_state,
                             flip_plane=flip_plane, reuse_labels=reuse_labels)
        segment_id = resection_nodes.find_segment_id(segmentation_node, resection_nodes.RESECTED_SEGMENT_NAME)
        if segment_id is None:
            raise InputError(f'The output segmentation has no segment named "{resection_nodes.RESECTED_SEGMENT_NAME}". '
                             "Draw the part to resect as such a segment in the Segment Editor, or choose a plane.")
        return self.plan(segmentation_node, reference_volume, resected_segment_id=segment_id, liver_state=liver_state,
                         reuse_labels=reuse_labels)

    def save_report(self, folder, title: str) -> Path:
        """Write plan.json, plan.csv and plan.html of the last plan into the new folder ``folder``; return it."""
        from .resection_report import check_plan_folder, write_plan

        if self.last is None:
            raise LiverTumorSegError("Plan a resection first.")
        folder = check_plan_folder(Path(folder))
        return write_plan(folder, self.last.plan, self.last.labels, self.last.geometry, title=title,
                          inputs=self.last.inputs)

    def clear(self) -> None:
        """Forget the last plan and the label map kept for it (e.g. when the scene closes)."""
        self.last = None
        self._labels = None
