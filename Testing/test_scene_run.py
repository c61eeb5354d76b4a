"""What the Slicer module's Logic does on the scene, on real MRML (slicer-core), without the Slicer application.

* ``scene_run``: a volume node segmented by the real engine in a background process; the results go into new
  nodes next to the CT or into the chosen ones; a failed, cancelled or unloadable run leaves the scene as it was.
* ``resection_planner``: plans from the module's choices, refilling the same result nodes while the plane moves.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from test_slicer_module import _case, _mrml

MODULE_DIR = Path(__file__).resolve().parents[1] / "LiverTumorSeg"


@pytest.fixture(scope="module")
def small_ct():
    """A small phantom CT as a volume node of a slicer-core scene, and an untrained bundle."""
    mn = _mrml()
    if importlib.util.find_spec("LiverTumorSegLib.phantoms") is None:
        pytest.skip("the phantom generator (LiverTumorSegLib.phantoms) is not there yet")
    from LiverTumorSegLib import selftest

    import slicer

    scene = mn.create_scene()
    volume, phantom = selftest.make_phantom_volume(scene, 11, size="small")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Phantom patient"), "CT study")
    hierarchy.CreateItem(study, volume)
    return SimpleNamespace(scene=scene, volume=volume, phantom=phantom, hierarchy=hierarchy, study=study)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from test_process import untrained_bundle

    return untrained_bundle(tmp_path_factory.mktemp("bundle"))


def _scene_run(small_ct, tmp_path, options=None, **nodes):
    """A SceneRun as the module's Logic starts one, with this Python instead of PythonSlicer."""
    from LiverTumorSegLib import process
    from LiverTumorSegLib.scene_run import SceneRun

    return SceneRun(small_ct.scene, small_ct.volume, sys.executable, options, temporary_root=tmp_path / "temporary",
                    environment=process.engine_environment(os.environ, [MODULE_DIR]), working_directory=str(MODULE_DIR),
                    **nodes)


def _node_ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def test_volume_node_is_segmented_into_new_nodes_next_to_it(small_ct, bundle, tmp_path):
    from LiverTumorSegLib import selftest

    scene, reports = small_ct.scene, []
    classes = ("vtkMRMLSegmentationNode", "vtkMRMLTableNode")
    counts = [scene.GetNumberOfNodesByClass(cls) for cls in classes]
    run = _scene_run(small_ct, tmp_path, {"bundle_path": str(bundle), "per_lesion_segments": True},
                     keep_output_folder=tmp_path / "kept", progress=lambda *report: reports.append(report))
    run.run.wait(run.progress, timeout=600)
    result = run.finish()
    assert result.succeeded, result.message
    assert [stage for _, _, stage in reports][-2:] == ["import", "done"] and reports[-1][0] == 1.0
    assert [fraction for fraction, _, _ in reports] == sorted(fraction for fraction, _, _ in reports)
    name = small_ct.volume.GetName()
    assert [scene.GetNumberOfNodesByClass(cls) for cls in classes] == [counts[0] + 1, counts[1] + 1]
    assert result.segmentation_node.GetName() == f"{name} liver segmentation"
    assert result.table_node.GetName() == f"{name} liver volumetry"
    for node in (result.segmentation_node, result.table_node):
        assert small_ct.hierarchy.GetItemParent(small_ct.hierarchy.GetItemByDataNode(node)) == small_ct.study
    labels, volumetry = selftest.check_output_folder(tmp_path / "kept", reference=small_ct.phantom.image)
    assert volumetry == result.volumetry and np.array_equal(labels.array, result.labels.array)
    selftest.check_same_grid(result.labels, small_ct.phantom.image)  # phantom -> MRML -> file -> engine -> nodes: same grid
    selftest.check_result_nodes(result.segmentation_node, result.table_node, result.volumetry, per_lesion=True,
                                labels=result.labels.array, reference_volume_node=small_ct.volume)
    assert result.summary() == (f"Done in {result.elapsed_seconds:.0f} s: liver {volumetry['liver_volume_ml']:.0f} mL, "
                                f"{volumetry['lesion_count']} lesion(s), tumour burden {volumetry['tumour_burden_percent']:.1f} %.")
    assert not run.run.folder.exists() and list((tmp_path / "temporary").iterdir()) == []
    for node in (result.segmentation_node, result.table_node):
        selftest.remove_node(scene, node)


def test_results_fill_the_chosen_nodes_and_nothing_else(small_ct, bundle, tmp_path):
    from LiverTumorSegLib import selftest

    scene = small_ct.scene
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My segmentation")
    mine.CreateDefaultDisplayNodes()
    mine.GetSegmentation().AddEmptySegment("old", "Old segment")
    my_table = scene.AddNewNodeByClass("vtkMRMLTableNode", "My volumetry")
    before = _node_ids(scene)
    run = _scene_run(small_ct, tmp_path, {"bundle_path": str(bundle)}, segmentation_node=mine, table_node=my_table)
    run.run.wait(timeout=600)
    result = run.finish()
    assert result.succeeded, result.message
    assert result.segmentation_node is mine and result.table_node is my_table
    assert mine.GetName() == "My segmentation" and my_table.GetName() == "My volumetry"
    assert selftest.segment_names(mine) == ["Liver", "Liver tumor"]
    selftest.check_result_nodes(mine, my_table, result.volumetry, labels=result.labels.array,
                                reference_volume_node=small_ct.volume)
    assert _node_ids(scene) - before <= {mine.GetDisplayNode().GetID()}, "no other node is added"
    for node in (mine, my_table):
        selftest.remove_node(scene, node)


def test_failed_run_leaves_the_scene_as_it_was(small_ct, tmp_path):
    mn = _mrml()
    from LiverTumorSegLib.image_io import Geometry, Image

    scene = small_ct.scene
    array = np.full((8, 48, 48), 100, dtype=np.int16)  # no air: not CT in Hounsfield units
    array[:, 10:30, 10:30] = 400
    not_ct = mn.volume_node_from_image(scene, Image(array, Geometry((1.0, 1.0, 2.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))), "Not CT")
    nodes = scene.GetNumberOfNodes()
    run = _scene_run(SimpleNamespace(scene=scene, volume=not_ct), tmp_path)
    run.run.wait(timeout=600)
    result = run.finish()
    assert result.status == "failed" and result.exit_code == 2 and "Hounsfield" in result.message
    assert result.segmentation_node is None and scene.GetNumberOfNodes() == nodes
    assert not run.run.folder.exists()
    scene.RemoveNode(not_ct)


@pytest.mark.skipif(os.name == "nt", reason="process groups and SIGTERM are POSIX")
def test_cancelled_run_leaves_the_scene_as_it_was(small_ct, bundle, tmp_path):
    from LiverTumorSegLib.process import stage_key

    scene, stages = small_ct.scene, []
    nodes = scene.GetNumberOfNodes()
    run = _scene_run(small_ct, tmp_path, {"bundle_path": str(bundle)},
                     progress=lambda fraction, text, stage: stages.append(stage_key(stage)))
    while "livernetwork" not in stages:
        assert not run.poll(), "the engine ended before it could be cancelled"
    run.run.cancel()
    while not run.poll():
        pass
    result = run.finish()
    assert result.status == "cancelled" and result.message == "The segmentation was cancelled; nothing was written."
    assert "import" not in stages and scene.GetNumberOfNodes() == nodes and not run.run.folder.exists()


def test_a_volume_node_without_image_is_refused(small_ct, tmp_path):
    from LiverTumorSegLib.errors import InputError

    empty = small_ct.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Empty")
    with pytest.raises(InputError, match="Select an input CT volume that holds an image"):
        _scene_run(SimpleNamespace(scene=small_ct.scene, volume=empty), tmp_path)
    assert not (tmp_path / "temporary").exists() or list((tmp_path / "temporary").iterdir()) == []
    small_ct.scene.RemoveNode(empty)


def test_results_that_cannot_be_loaded_leave_no_node(tmp_path):
    """A volumetry that cannot become a table: the segmentation made before it is removed again."""
    mn = _mrml()
    from LiverTumorSegLib.pipeline import SegmentationResult, write_outputs
    from LiverTumorSegLib.scene_run import load_results
    from LiverTumorSegLib.volumetry import measure

    image, labels = _case()
    out = write_outputs(SegmentationResult(labels, measure(labels.array, image.array, image.geometry),
                                           {"bundle": "test bundle", "stages": {}, "timings_s": {}, "warnings": []}),
                        image, tmp_path / "result")
    scene = mn.create_scene()
    volume = mn.volume_node_from_image(scene, image, "CT")
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My segmentation")
    mine.GetSegmentation().AddEmptySegment("old", "Old segment")
    (out / "volumetry.json").write_text(json.dumps({"lesions": 5}))
    nodes = scene.GetNumberOfNodes()
    with pytest.raises(TypeError):
        load_results(scene, out, volume, segmentation_node=mine)
    assert scene.GetNumberOfNodes() == nodes and mine.GetSegmentation().GetSegmentIDs() == ("old",)


def test_segments_are_shown_with_a_translucent_liver():
    mn = _mrml()
    from LiverTumorSegLib.scene_run import show_segments

    image, labels = _case()
    scene = mn.create_scene()
    segmentation = mn.segmentation_node_from_labels(scene, labels, mn.volume_node_from_image(scene, image, "CT"))
    show_segments(segmentation)
    display = segmentation.GetDisplayNode()
    assert (display.GetVisibility(), display.GetVisibility2DFill(), display.GetVisibility2DOutline(),
            display.GetVisibility3D()) == (1, 1, 1, 1)
    assert display.GetPreferredDisplayRepresentationName3D() == "Closed surface"
    assert display.GetSegmentOpacity3D("Liver") == pytest.approx(0.35) and display.GetSegmentOpacity3D("Liver_tumor") == 1.0


# ----------------------------------------------------------------------------- resection planning


def _planning_case():
    """The CT and its segmentation in a scene, the CT in a study of the subject hierarchy."""
    mn = _mrml()
    import slicer

    image, labels = _case()
    scene = mn.create_scene()
    volume = mn.volume_node_from_image(scene, image, "CT")
    segmentation = mn.segmentation_node_from_labels(scene, labels, volume, name="CT segmentation")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient"), "Study")
    hierarchy.CreateItem(study, volume)
    return SimpleNamespace(scene=scene, volume=volume, segmentation=segmentation, labels=labels, hierarchy=hierarchy,
                           study=study)


def _cut_at(case, plane, x_index):
    """Move the plane to x = ``x_index`` of the grid, its normal along LPS +x (RAS -x): higher x is resected."""
    from LiverTumorSegLib.mrml_nodes import lps_to_ras

    plane.SetCenterWorld(*lps_to_ras(case.labels.geometry.index_to_physical(np.array([7.0, 20.0, x_index]))))
    plane.SetNormalWorld(-1.0, 0.0, 0.0)


def test_planner_refills_the_same_nodes_while_the_plane_moves(tmp_path):
    """_case's liver spans x = 8..35, 10 x 24 voxels each; tumours of 256 voxels at x 12..19, 18 voxels at x 28..30."""
    from LiverTumorSegLib.errors import LiverTumorSegError, OutputError
    from LiverTumorSegLib.resection_planner import SEGMENTATION_REFERENCE, TABLE_REFERENCE, ResectionPlanner
    from LiverTumorSegLib.resection_report import PLAN_FILES

    case = _planning_case()
    plane = case.scene.AddNewNodeByClass("vtkMRMLMarkupsPlaneNode", "Cut")
    _cut_at(case, plane, 19.5)
    planner = ResectionPlanner()
    planned = planner.plan_choice(case.segmentation, case.volume, method="plane", plane_node=plane, liver_state="cirrhosis")
    voxel_ml = 0.8 * 0.75 * 2.5 / 1000.0
    result = planned.plan.result
    assert result["resected_volume_ml"] == pytest.approx(10 * 24 * 16 * voxel_ml)
    assert result["functional_remnant_volume_ml"] == pytest.approx((10 * 24 * 12 - 256) * voxel_ml)
    assert result["flr_percent"] == pytest.approx(100.0 * (10 * 24 * 12 - 256) / (10 * 24 * 28 - 274))
    assert (result["threshold_percent"], result["verdict"]) == (40.0, "pass")
    table, target = planned.table_node, planned.segmentation_node
    assert table.GetTable().GetNumberOfRows() == 2 + result["tumour_count"] == 4
    assert case.segmentation.GetNodeReference(TABLE_REFERENCE) is table
    assert case.segmentation.GetNodeReference(SEGMENTATION_REFERENCE) is target
    for node in (table, target):
        assert case.hierarchy.GetItemParent(case.hierarchy.GetItemByDataNode(node)) == case.study
    nodes = case.scene.GetNumberOfNodes()

    _cut_at(case, plane, 24.5)
    moved = planner.plan_choice(case.segmentation, case.volume, method="plane", plane_node=plane, flip_plane=True,
                                reuse_labels=True)
    assert moved.table_node is table and moved.segmentation_node is target and case.scene.GetNumberOfNodes() == nodes
    # flipped: x 8..24 is resected, the 256-voxel tumour with it
    assert moved.plan.result["flr_percent"] == pytest.approx(100.0 * (10 * 24 * 11 - 18) / (10 * 24 * 28 - 274))
    assert moved.plan.result["threshold_percent"] == 20.0
    assert planner.last is moved
    assert moved.inputs == {"volume": "CT", "segmentation": "CT segmentation", "resection": "plane 'Cut' (other side)"}

    folder = planner.save_report(tmp_path / "plan", title="Resection plan: CT")
    assert {p.name for p in folder.iterdir()} == PLAN_FILES
    assert json.loads((folder / "plan.json").read_text())["inputs"] == moved.inputs
    with pytest.raises(OutputError, match="already exists"):
        planner.save_report(tmp_path / "plan", title="again")
    planner.clear()
    with pytest.raises(LiverTumorSegError, match="Plan a resection first"):
        planner.save_report(tmp_path / "plan 2", title="none")


def test_planner_choices_that_cannot_be_planned_say_what_to_choose():
    from LiverTumorSegLib import mrml_nodes as mn
    from LiverTumorSegLib.errors import InputError
    from LiverTumorSegLib.resection_planner import ResectionPlanner

    case = _planning_case()
    planner = ResectionPlanner()
    with pytest.raises(InputError, match="Select the CT volume and its output segmentation"):
        planner.plan_choice(None, case.volume)
    with pytest.raises(InputError, match="Choose or create a resection plane"):
        planner.plan_choice(case.segmentation, case.volume, method="plane", plane_node=None)
    with pytest.raises(InputError, match='no segment named "Resected"'):
        planner.plan_choice(case.segmentation, case.volume, method="segment")
    assert planner.last is None

    image, voxels = mn._labelmap_image(case.labels.array.shape, case.labels.geometry, 1)
    voxels[...] = 0
    voxels[:, :, 20:] = 1  # the same cut as a plane at x = 19.5
    del voxels
    case.segmentation.AddSegmentFromBinaryLabelmapRepresentation(image, "Resected", [0.2, 0.2, 1.0])
    planned = planner.plan_choice(case.segmentation, case.volume, method="segment", plane_node=None)
    assert planned.inputs["resection"] == "segment 'Resected'"
    assert planned.plan.result["flr_percent"] == pytest.approx(100.0 * (10 * 24 * 12 - 256) / (10 * 24 * 28 - 274))


# -------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_end_to_end_with_the_bundled_model(small_ct, tmp_path):
    """The bundled model on a small phantom, run and loaded as the module does; it must find the liver."""
    from LiverTumorSegLib import bundle, selftest

    if not (bundle.DEFAULT_BUNDLE / "manifest.json").is_file():
        pytest.skip(f"no bundled model at {bundle.DEFAULT_BUNDLE}")
    run = _scene_run(small_ct, tmp_path)
    run.run.wait(timeout=900)
    result = run.finish()
    assert result.succeeded, result.message
    selftest.check_liver_found(result.labels.array, small_ct.phantom.label)
    selftest.check_result_nodes(result.segmentation_node, result.table_node, result.volumetry,
                                labels=result.labels.array, reference_volume_node=small_ct.volume)
    for node in (result.segmentation_node, result.table_node):
        selftest.remove_node(small_ct.scene, node)
