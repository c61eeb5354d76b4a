"""Resection planning on real MRML (slicer-core): markups plane and "Resected" segment in, table and segments out."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("slicer", reason="needs slicer-core (pip install 'trame-slicer[standalone]==2.0.0')")
import vtk  # noqa: E402
from slicer import util  # noqa: E402

from LiverTumorSegLib import mrml_nodes as mn  # noqa: E402
from LiverTumorSegLib import resection_nodes as rn  # noqa: E402
from LiverTumorSegLib.errors import InputError  # noqa: E402
from LiverTumorSegLib.image_io import Geometry, Image  # noqa: E402
from LiverTumorSegLib.resection import Plane, plan_resection  # noqa: E402

#: A grid whose voxel axes are not the patient axes (x flipped, y/z swapped), off-origin, anisotropic,
#: so that an LPS/RAS or axis-order slip changes the numbers.
GEOMETRY = Geometry(
    spacing=(1.5, 1.0, 2.0),
    origin=(30.0, -20.0, 50.0),
    direction=(-1.0, 0.0, 0.0,
               0.0, 0.0, 1.0,
               0.0, -1.0, 0.0),
)
SHAPE = (20, 24, 30)  # z, y, x


def _labels() -> np.ndarray:
    """A box liver with a sphere tumour in it."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[2:18, 3:21, 4:26] = 1
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    physical = lambda k, j, i: GEOMETRY.index_to_physical(np.stack(np.broadcast_arrays(k, j, i), axis=-1))  # noqa: E731
    centre = GEOMETRY.index_to_physical(np.array([10.0, 12.0, 18.0]))
    distance = np.linalg.norm(physical(z, y, x) - centre, axis=-1)
    labels[distance <= 5.0] = 2
    return labels


@pytest.fixture
def case():
    scene = mn.create_scene()
    labels = _labels()
    ct = np.where(labels > 0, 100, -900).astype(np.int16)
    volume = mn.volume_node_from_image(scene, Image(ct, GEOMETRY), "CT")
    segmentation = mn.segmentation_node_from_labels(scene, Image(labels, GEOMETRY), volume, name="CT segmentation")
    return scene, volume, segmentation, labels


def _plane_node(scene, center_ras, normal_ras):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsPlaneNode", "Cut")
    node.SetCenterWorld(*center_ras)
    node.SetNormalWorld(*normal_ras)
    return node


def _segment_voxels(node, segment_id) -> int:
    segment = node.GetSegmentation().GetSegment(segment_id)
    return int(np.count_nonzero(util.arrayFromSegmentInternalBinaryLabelmap(node, segment_id) == segment.GetLabelValue()))


def _same_result(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "tumours":
            assert len(a[key]) == len(b[key])
            for ta, tb in zip(a[key], b[key]):
                assert ta.keys() == tb.keys()
                for k in ta:
                    assert ta[k] == pytest.approx(tb[k], abs=1e-9) if isinstance(ta[k], (float, list)) else ta[k] == tb[k], k
        elif isinstance(a[key], float):
            assert a[key] == pytest.approx(b[key], abs=1e-9), key
        elif key == "resection":
            assert a[key]["type"] == b[key]["type"]
            for k in ("point_lps_mm", "normal_lps"):
                if k in a[key]:
                    assert a[key][k] == pytest.approx(b[key][k], abs=1e-9)
        else:
            assert a[key] == b[key], key


# ----------------------------------------------------------------------------------------------- grid


def test_geometry_and_labels_come_back_from_the_nodes(case):
    scene, volume, segmentation, labels = case
    geometry, shape = rn.geometry_from_volume_node(volume)
    assert shape == SHAPE
    assert np.allclose(geometry.spacing, GEOMETRY.spacing) and np.allclose(geometry.origin, GEOMETRY.origin)
    assert np.allclose(geometry.direction, GEOMETRY.direction)
    nodes = scene.GetNumberOfNodes()
    assert np.array_equal(rn.labels_from_segmentation(segmentation, volume), labels)
    assert np.array_equal(rn.labels_from_segmentation(segmentation, geometry=GEOMETRY, shape=SHAPE), labels)
    assert scene.GetNumberOfNodes() == nodes, "reading the segments must leave the scene as it was"


# ---------------------------------------------------------------------------------------------- plane


def test_markups_plane_gives_the_plan_of_the_same_lps_plane(case):
    scene, volume, segmentation, labels = case
    # RAS centre (-20.3, 5, 60.1) = LPS (20.3, -5, 60.1); RAS normal (-1, 0, 0.2) = LPS (1, 0, 0.2): resect the
    # patient's left. (No voxel centre lies on this plane, so rounding cannot move a voxel across.)
    node = _plane_node(scene, (-20.3, 5.0, 60.1), (-1.0, 0.0, 0.2))
    plane = rn.plane_from_markups(node)
    norm = math.hypot(1.0, 0.2)
    assert plane.point == pytest.approx((20.3, -5.0, 60.1))
    assert plane.normal == pytest.approx((1.0 / norm, 0.0, 0.2 / norm))
    expected = plan_resection(labels, GEOMETRY, plane=Plane.from_values([20.3, -5.0, 60.1, 1.0, 0.0, 0.2]), liver_state="cirrhosis")
    plan, read_labels, geometry = rn.plan_from_nodes(segmentation, volume, plane_node=node, liver_state="cirrhosis")
    assert np.array_equal(read_labels, labels)
    _same_result(plan.result, expected.result)
    assert np.array_equal(plan.resected_liver, expected.resected_liver)
    assert 0 < plan.result["flr_percent"] < 100 and plan.result["tumour_count"] == 1
    # flip: the other side is resected, so the remnant becomes the resected part
    flipped, _, _ = rn.plan_from_nodes(segmentation, volume, plane_node=node, flip=True, labels=read_labels)
    assert np.array_equal(flipped.resected_liver, (labels > 0) & ~expected.resected_liver)
    assert flipped.result["functional_remnant_volume_ml"] == pytest.approx(expected.result["functional_resected_volume_ml"])


def test_plane_and_volume_transforms_are_respected(case):
    scene, volume, segmentation, labels = case
    node = _plane_node(scene, (0.0, 0.0, 0.0), (0.0, 0.0, 1.0))
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(2, 3, 58.0)  # S + 58 mm
    shift.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(shift.GetID())
    plane = rn.plane_from_markups(node)
    assert plane.point == pytest.approx((0.0, 0.0, 58.0)) and plane.normal == pytest.approx((0.0, 0.0, 1.0))
    # the same transform on the volume too: in the volume's frame the plane sits at S = 0 again
    volume.SetAndObserveTransformNodeID(shift.GetID())
    local = rn.plane_from_markups(node, volume)
    assert local.point == pytest.approx((0.0, 0.0, 0.0), abs=1e-9) and local.normal == pytest.approx((0.0, 0.0, 1.0))


def test_unplaced_plane_and_wrong_choices_are_refused(case):
    scene, volume, segmentation, labels = case
    empty = scene.AddNewNodeByClass("vtkMRMLMarkupsPlaneNode", "Not placed")
    with pytest.raises(InputError, match="not placed"):
        rn.plane_from_markups(empty)
    with pytest.raises(InputError, match="either a resection plane or"):
        rn.plan_from_nodes(segmentation, volume)
    outside = _plane_node(scene, (-500.0, 0.0, 0.0), (-1.0, 0.0, 0.0))
    with pytest.raises(InputError, match="misses the liver"):
        rn.plan_from_nodes(segmentation, volume, plane_node=outside)


# ---------------------------------------------------------------------------------------- "Resected"


def test_resected_segment_gives_the_plan_of_the_mask(case):
    scene, volume, segmentation, labels = case
    mask = np.zeros(SHAPE, dtype=bool)
    mask[:, :, :12] = True  # grid columns 0..11: LPS x 30 down to 13.5 mm, the patient's left part; tumour not reached
    image, voxels = mn._labelmap_image(SHAPE, GEOMETRY, 1)
    voxels[...] = mask
    del voxels
    segmentation.AddSegmentFromBinaryLabelmapRepresentation(image, "Resected", [0.2, 0.2, 1.0])
    segment_id = rn.find_segment_id(segmentation, " resected ")
    assert segment_id is not None and rn.find_segment_id(segmentation, "nothing") is None
    nodes = scene.GetNumberOfNodes()
    assert np.array_equal(rn.resected_mask_from_segment(segmentation, segment_id, volume), mask)
    assert np.array_equal(rn.resected_mask_from_segment(segmentation, segment_id, geometry=GEOMETRY, shape=SHAPE), mask)
    assert scene.GetNumberOfNodes() == nodes
    # the "Resected" segment does not count as liver or tumour
    assert np.array_equal(rn.labels_from_segmentation(segmentation, volume), labels)
    expected = plan_resection(labels, GEOMETRY, resected=mask)
    plan, _, _ = rn.plan_from_nodes(segmentation, volume, resected_segment_id=segment_id)
    _same_result(plan.result, expected.result)
    assert np.array_equal(plan.resected_liver, expected.resected_liver)
    assert plan.result["tumours"][0]["resected"] == "not" and plan.result["tumours"][0]["margin_mm"] > 0
    with pytest.raises(InputError, match="No segment 'missing'"):
        rn.resected_mask_from_segment(segmentation, "missing", volume)


# ---------------------------------------------------------------------------------------------- table


def test_plan_table_rows_and_values(case):
    scene, volume, segmentation, labels = case
    node = _plane_node(scene, (-20.0, 5.0, 60.0), (-1.0, 0.0, 0.0))
    plan, _, _ = rn.plan_from_nodes(segmentation, volume, plane_node=node)
    result = plan.result
    table = rn.plan_table_node(scene, result)
    assert table.GetName() == "Resection plan" and table.GetLocked()
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == list(rn.PLAN_TABLE_COLUMN_NAMES)
    vtk_table = table.GetTable()
    assert vtk_table.GetNumberOfRows() == 2 + result["tumour_count"] == 3
    for name, kind, unit, _ in rn.PLAN_TABLE_COLUMNS:
        column = vtk_table.GetColumnByName(name)
        assert isinstance(column, vtk.vtkDoubleArray if kind == "double" else vtk.vtkStringArray), name
        assert table.GetColumnUnitLabel(name) == unit

    def row(index):
        return {name: vtk_table.GetColumnByName(name).GetValue(index) for name in rn.PLAN_TABLE_COLUMN_NAMES}

    liver, functional, tumour = row(0), row(1), row(2)
    voxel_ml = GEOMETRY.voxel_volume_mm3 / 1000.0
    assert liver["Structure"] == "Liver (whole organ)"
    assert liver["Volume (mL)"] == result["liver_volume_ml"] == np.count_nonzero(labels) * voxel_ml
    assert liver["Resected (mL)"] == result["resected_volume_ml"]
    assert liver["Remnant (mL)"] == result["remnant_volume_ml"]
    assert math.isnan(liver["FLR (%)"]) and liver["Verdict"] == "" and math.isnan(liver["Margin (mm)"])
    assert functional["Structure"] == "Functional liver (normal liver)"
    assert functional["Volume (mL)"] == result["functional_volume_ml"] == np.count_nonzero(labels == 1) * voxel_ml
    assert functional["Resected (mL)"] == result["functional_resected_volume_ml"]
    assert functional["Remnant (mL)"] == result["functional_remnant_volume_ml"]
    assert functional["FLR (%)"] == result["flr_percent"]
    assert functional["FLR threshold (%)"] == 20.0 and functional["Verdict"] == result["verdict"]
    t = result["tumours"][0]
    assert tumour["Structure"] == "Tumour 1"
    assert tumour["Volume (mL)"] == t["volume_ml"] == np.count_nonzero(labels == 2) * voxel_ml
    assert tumour["Resected (mL)"] == t["resected_volume_ml"]
    assert tumour["Remnant (mL)"] == t["volume_ml"] - t["resected_volume_ml"]
    assert tumour["Side"] == {"fully": "resected", "not": "remnant", "partly": "both"}[t["resected"]]
    assert tumour["Margin (mm)"] == t["margin_mm"] and tumour["Margin flag"] == (t["margin_flag"] or "")
    x, y, z = t["centroid_lps_mm"]
    assert (tumour["Centroid R (mm)"], tumour["Centroid A (mm)"], tumour["Centroid S (mm)"]) == (-x, -y, z)
    assert math.isnan(tumour["FLR (%)"])
    assert table.GetAttribute("LiverTumorSeg.Verdict") == result["verdict"]
    assert float(table.GetAttribute("LiverTumorSeg.FLRPercent")) == result["flr_percent"]
    assert float(table.GetAttribute("LiverTumorSeg.ClosestMarginMm")) == t["margin_mm"]

    # refilled in place: same node, new numbers, no leftover rows or columns
    crossing = _plane_node(scene, tuple(mn.lps_to_ras(t["centroid_lps_mm"])), (-1.0, 0.0, 0.0))
    plan2, _, _ = rn.plan_from_nodes(segmentation, volume, plane_node=crossing, liver_state="chemotherapy")
    again = rn.plan_table_node(scene, plan2.result, table_node=table)
    assert again is table and table.GetNumberOfColumns() == len(rn.PLAN_TABLE_COLUMNS)
    assert vtk_table.GetNumberOfRows() == 3
    assert row(2)["Side"] == "both" and row(2)["Margin (mm)"] == 0.0 and row(2)["Margin flag"] == "crosses"
    assert row(1)["FLR threshold (%)"] == 30.0 and row(1)["FLR (%)"] == plan2.result["flr_percent"]
    assert "Closest margin: 0.0 mm (tumour 1) [crosses]" in rn.summary_text(plan2.result)


# ------------------------------------------------------------------------------------- segments out


def test_remnant_and_resected_segments_match_the_plan(case):
    scene, volume, segmentation, labels = case
    node = _plane_node(scene, (-20.0, 5.0, 60.0), (-1.0, 0.0, 0.0))
    plan, _, geometry = rn.plan_from_nodes(segmentation, volume, plane_node=node)
    voxel_ml = GEOMETRY.voxel_volume_mm3 / 1000.0
    remnant = (labels == 1) & ~plan.resected_liver
    resected = (labels == 1) & plan.resected_liver

    new = rn.remnant_resected_segmentation(scene, plan, labels, geometry, "CT resection", reference_volume_node=volume)
    segments = new.GetSegmentation()
    assert [segments.GetSegment(s).GetName() for s in segments.GetSegmentIDs()] == \
        ["Liver remnant", "Liver resected", "Liver tumor"]
    assert _segment_voxels(new, rn.REMNANT_SEGMENT_ID) == np.count_nonzero(remnant)
    assert _segment_voxels(new, rn.RESECTION_SEGMENT_ID) == np.count_nonzero(resected)
    assert _segment_voxels(new, mn.TUMOUR_SEGMENT_ID) == np.count_nonzero(labels == 2)
    assert np.count_nonzero(remnant) * voxel_ml == pytest.approx(plan.result["functional_remnant_volume_ml"])
    assert np.count_nonzero(resected) * voxel_ml == pytest.approx(plan.result["functional_resected_volume_ml"])
    assert segments.GetSegment(rn.REMNANT_SEGMENT_ID).GetColor() == pytest.approx(rn.REMNANT_COLOR)
    assert segments.GetSegment(rn.RESECTION_SEGMENT_ID).GetColor() == pytest.approx(rn.RESECTION_COLOR)
    # voxel for voxel, on the label map's grid
    exported = rn._export(new, [rn.REMNANT_SEGMENT_ID, rn.RESECTION_SEGMENT_ID, mn.TUMOUR_SEGMENT_ID], volume)
    assert np.array_equal(exported == 1, remnant) and np.array_equal(exported == 2, resected)
    assert np.array_equal(exported == 3, labels == 2)

    # into the existing segmentation: liver and tumour segments stay as they are, a second call replaces
    other = plan_resection(labels, GEOMETRY, plane=Plane((10.0, 0.0, 0.0), (1.0, 0.0, 0.0)))
    for current in (plan, other):
        rn.remnant_resected_segmentation(scene, current, labels, geometry, segmentation_node=segmentation)
        names = [segmentation.GetSegmentation().GetSegment(s).GetName()
                 for s in segmentation.GetSegmentation().GetSegmentIDs()]
        assert names == ["Liver", "Liver tumor", "Liver remnant", "Liver resected"]
        assert _segment_voxels(segmentation, rn.REMNANT_SEGMENT_ID) == np.count_nonzero((labels == 1) & ~current.resected_liver)
        assert _segment_voxels(segmentation, rn.RESECTION_SEGMENT_ID) == np.count_nonzero((labels == 1) & current.resected_liver)
        assert np.array_equal(rn.labels_from_segmentation(segmentation, volume), labels)


# ---------------------------------------------------------------------------------------------- report


def test_report_folder_is_new_and_written_by_the_report(case, tmp_path):
    from LiverTumorSegLib.resection_report import PLAN_FILES, write_plan

    scene, volume, segmentation, labels = case
    first = rn.report_folder(tmp_path, 'CT: a/b')
    assert first == tmp_path / "CT_ a_b resection plan" and not first.exists()
    node = _plane_node(scene, (-20.0, 5.0, 60.0), (-1.0, 0.0, 0.0))
    plan, read_labels, geometry = rn.plan_from_nodes(segmentation, volume, plane_node=node)
    write_plan(first, plan, read_labels, geometry, title="CT", inputs={"segmentation": segmentation.GetName()})
    assert {p.name for p in first.iterdir()} == PLAN_FILES
    assert rn.report_folder(tmp_path, "CT: a/b") == tmp_path / "CT_ a_b resection plan 2"
