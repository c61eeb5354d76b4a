"""MRML adapter against real MRML (slicer-core): segments, geometry, surfaces, tables, and .seg.nrrd files of
slicerio loaded by slicer-core's storage node and the other way round (the files themselves: test_seg_nrrd)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("slicer", reason="needs slicer-core (pip install 'trame-slicer[standalone]==2.0.0')")
import slicer  # noqa: E402
import vtk  # noqa: E402
from slicer import util  # noqa: E402

from LiverTumorSegLib import mrml_nodes as mn  # noqa: E402
from LiverTumorSegLib import seg_nrrd as sn  # noqa: E402
from LiverTumorSegLib.errors import InputError  # noqa: E402
from LiverTumorSegLib.image_io import Geometry, Image  # noqa: E402
from LiverTumorSegLib.masks import label_lesions  # noqa: E402

from segmentation_case import GEOMETRY, SHAPE  # noqa: E402
from segmentation_case import labels as _labels  # noqa: E402


@pytest.fixture
def scene():
    return mn.create_scene()


def _segments(node) -> dict[str, object]:
    segmentation = node.GetSegmentation()
    segments = (segmentation.GetSegment(sid) for sid in segmentation.GetSegmentIDs())
    return {segment.GetName(): segment for segment in segments}


def _segment_array(node, name: str) -> np.ndarray:
    """The segment's voxels (bool) on the full label grid, from its internal binary labelmap."""
    segmentation = node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(name)
    segment = segmentation.GetSegment(segment_id)
    labelmap = node.GetBinaryLabelmapInternalRepresentation(segment_id)
    extent = labelmap.GetExtent()
    assert extent[0::2] == (0, 0, 0), "labelmap must start at voxel 0 so its voxels line up with the label grid"
    return util.arrayFromSegmentInternalBinaryLabelmap(node, segment_id) == segment.GetLabelValue()


def _matrix(vtk_matrix) -> np.ndarray:
    return util.arrayFromVTKMatrix(vtk_matrix)


# -------------------------------------------------------------------------------------------- constants


def test_module_imports_without_slicer_and_vtk():
    code = (
        "import sys; sys.modules['slicer'] = None; sys.modules['vtk'] = None\n"
        "import LiverTumorSegLib.mrml_nodes as m; print(m.LIVER_TERMINOLOGY)"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(mn.__file__).parents[1]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "10200004" in result.stdout


def test_terminology_strings_are_seven_part_entries_with_the_codes():
    liver = mn.LIVER_TERMINOLOGY.split("~")
    tumour = mn.TUMOUR_TERMINOLOGY.split("~")
    assert len(liver) == len(tumour) == 7
    assert liver[0] == "Segmentation category and type - 3D Slicer General Anatomy list"
    assert liver[1] == "SCT^123037004^Anatomical Structure" and liver[2] == "SCT^10200004^Liver"
    assert tumour[0] == "Segmentation category and type - DICOM master list"
    assert tumour[1] == "SCT^49755003^Morphologically Altered Structure" and tumour[2] == "SCT^108369006^Neoplasm"
    assert tumour[4] == "Anatomic codes - DICOM master list" and tumour[5] == "SCT^10200004^Liver"
    # Slicer's own parser accepts both.
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    for text in (mn.LIVER_TERMINOLOGY, mn.TUMOUR_TERMINOLOGY):
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(text, entry)
        assert logic.SerializeTerminologyEntry(entry).split("~")[1:4] == text.split("~")[1:4]


def test_liver_colour_comes_from_the_terminology(scene):
    assert mn.recommended_color(scene, mn.LIVER_TERMINOLOGY, (0, 0, 0)) == pytest.approx(
        (221 / 255, 130 / 255, 101 / 255))
    assert mn.LIVER_COLOR == pytest.approx((221 / 255, 130 / 255, 101 / 255))  # what files get without MRML
    assert mn.recommended_color(scene, mn.TUMOUR_TERMINOLOGY, (0.1, 0.2, 0.3)) == (0.1, 0.2, 0.3)  # none given


# ----------------------------------------------------------------------------------------- geometry


def test_volume_node_geometry_and_voxels(scene):
    ct = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    node = mn.volume_node_from_image(scene, Image(ct, GEOMETRY), "CT")
    assert node.IsA("vtkMRMLScalarVolumeNode") and node.GetName() == "CT"
    np.testing.assert_array_equal(util.arrayFromVolume(node), ct)
    assert node.GetSpacing() == pytest.approx(GEOMETRY.spacing)
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    # Voxel (z, y, x) lands on the LPS point SimpleITK gives, with x and y negated.
    for zyx in [(0, 0, 0), (11, 19, 23), (5, 3, 17)]:
        ras = _matrix(ijk_to_ras) @ np.array([*zyx[::-1], 1.0])
        lps = GEOMETRY.index_to_physical(np.array(zyx))
        np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-9)
    assert node.GetDisplayNode() is not None


def test_segmentation_voxels_map_to_the_same_ras_points_as_the_volume(scene):
    labels = _labels()
    volume = mn.volume_node_from_image(scene, Image(labels.astype(np.int16), GEOMETRY), "CT")
    node = mn.segmentation_node_from_labels(scene, Image(labels, GEOMETRY), volume)
    volume_matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(volume_matrix)
    for segment_id in node.GetSegmentation().GetSegmentIDs():
        labelmap = node.GetBinaryLabelmapInternalRepresentation(segment_id)
        segment_matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(segment_matrix)
        np.testing.assert_allclose(_matrix(segment_matrix), _matrix(volume_matrix), atol=1e-9)
        assert labelmap.GetExtent() == (0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1)
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume
    reference = node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    values = [float(v) for v in reference.strip(";").split(";")]
    np.testing.assert_allclose(np.reshape(values[:16], (4, 4)), _matrix(volume_matrix), atol=1e-9)
    assert values[16:] == [0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1]
    np.testing.assert_array_equal(_segment_array(node, "Liver"), labels == 1)
    np.testing.assert_array_equal(_segment_array(node, "Liver tumor"), labels == 2)


def test_reference_geometry_defaults_to_the_label_grid(scene):
    node = mn.segmentation_node_from_labels(scene, Image(_labels(), GEOMETRY))
    reference = node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    values = [float(v) for v in reference.strip(";").split(";")]
    np.testing.assert_allclose(np.reshape(values[:16], (4, 4)), mn.ijk_to_ras(GEOMETRY), atol=1e-9)


# ----------------------------------------------------------------------------------------- segments


def test_segments_names_colours_terminology_and_tags(scene):
    node = mn.segmentation_node_from_labels(scene, Image(_labels(), GEOMETRY), algorithm_name="LiverTumorSeg 0.1")
    segments = _segments(node)
    assert list(segments) == ["Liver", "Liver tumor"]
    assert list(node.GetSegmentation().GetSegmentIDs()) == ["Liver", "Liver_tumor"]
    liver, tumour = segments["Liver"], segments["Liver tumor"]
    assert liver.GetColor() == pytest.approx((221 / 255, 130 / 255, 101 / 255))
    assert tumour.GetColor() == pytest.approx(mn.TUMOUR_COLOR)
    for segment in (liver, tumour):
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
        assert mn.segment_tag(segment, "DICOM.SegmentAlgorithmType") == "AUTOMATIC"
        assert mn.segment_tag(segment, "DICOM.SegmentAlgorithmName") == "LiverTumorSeg 0.1"
    assert liver.GetTerminology() == mn.LIVER_TERMINOLOGY
    assert "SCT^123037004^" in liver.GetTerminology() and "SCT^10200004^Liver" in liver.GetTerminology()
    assert tumour.GetTerminology() == mn.TUMOUR_TERMINOLOGY
    assert "SCT^49755003^" in tumour.GetTerminology() and "SCT^108369006^" in tumour.GetTerminology()
    assert node.GetDisplayNode() is not None


def test_per_lesion_splits_connected_components_largest_first(scene):
    labels = _labels()
    node = mn.segmentation_node_from_labels(scene, Image(labels, GEOMETRY), per_lesion=True)
    segments = _segments(node)
    assert list(segments) == ["Liver", "Liver tumor 1", "Liver tumor 2"]
    first, second = _segment_array(node, "Liver tumor 1"), _segment_array(node, "Liver tumor 2")
    assert first.sum() == 90 and second.sum() == 9  # the corner-touching voxel joins the small lesion
    np.testing.assert_array_equal(first | second, labels == 2)
    assert not (first & second).any()
    assert first[4, 7, 8] and second[9, 14, 17]
    colours = {tuple(np.round(segments[name].GetColor(), 6)) for name in segments}
    assert len(colours) == 3
    for name in ("Liver tumor 1", "Liver tumor 2"):
        assert segments[name].GetTerminology() == mn.TUMOUR_TERMINOLOGY
        assert not segments[name].GetNameAutoGenerated()


def test_lesion_numbering_breaks_ties_in_array_order():
    labels = np.zeros((3, 5, 9), dtype=np.uint8)
    labels[1, 1, 6:8] = 2  # two voxels, first in (z, y, x) scan order among the two-voxel lesions
    labels[1, 3, 1:3] = 2  # two voxels, later in scan order
    labels[0, 0, 0] = 2  # first voxel of the array, but the smallest lesion
    lesions, count = label_lesions(labels == 2)
    assert count == 3
    assert lesions[1, 1, 6] == 1 and lesions[1, 3, 1] == 2 and lesions[0, 0, 0] == 3


def test_empty_tumour_still_gets_a_tumour_segment(scene):
    labels = _labels(tumour=False)
    for per_lesion in (False, True):
        node = mn.segmentation_node_from_labels(scene, Image(labels, GEOMETRY), per_lesion=per_lesion)
        assert list(_segments(node)) == ["Liver", "Liver tumor"]
        assert not _segment_array(node, "Liver tumor").any()
        np.testing.assert_array_equal(_segment_array(node, "Liver"), labels == 1)


def test_labels_outside_0_1_2_are_refused(scene):
    labels = _labels()
    labels[0, 0, 0] = 3
    with pytest.raises(InputError, match="only 0"):
        mn.segmentation_node_from_labels(scene, Image(labels, GEOMETRY))
    with pytest.raises(InputError, match="integer"):
        mn.segmentation_node_from_labels(scene, Image(_labels().astype(np.float32), GEOMETRY))


# ------------------------------------------------------------------------------ .seg.nrrd files in MRML


def _read_with_storage_node(path):
    """A segmentation node read from ``path`` by slicer-core's own storage node."""
    scene = mn.create_scene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


@pytest.mark.parametrize("per_lesion", [False, True])
def test_a_seg_nrrd_of_slicerio_loads_into_mrml_voxel_for_voxel(tmp_path, per_lesion):
    labels = _labels()
    path = sn.write_segmentation(Image(labels, GEOMETRY), tmp_path / "case.seg.nrrd", per_lesion=per_lesion,
                                 algorithm_name="LiverTumorSeg 0.1")
    node = _read_with_storage_node(path)
    segments = _segments(node)
    lesions, _ = label_lesions(labels == 2)
    expected = ({"Liver": labels == 1, "Liver tumor 1": lesions == 1, "Liver tumor 2": lesions == 2} if per_lesion
                else {"Liver": labels == 1, "Liver tumor": labels == 2})
    assert list(segments) == list(expected)
    for name, mask in expected.items():
        np.testing.assert_array_equal(_segment_array(node, name), mask)
        segment = segments[name]
        assert segment.GetTerminology() == (mn.LIVER_TERMINOLOGY if name == "Liver" else mn.TUMOUR_TERMINOLOGY)
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
        assert mn.segment_tag(segment, "DICOM.SegmentAlgorithmType") == "AUTOMATIC"
        assert mn.segment_tag(segment, "DICOM.SegmentAlgorithmName") == "LiverTumorSeg 0.1"
        world = vtk.vtkMatrix4x4()
        segment_id = node.GetSegmentation().GetSegmentIdBySegmentName(name)
        node.GetBinaryLabelmapInternalRepresentation(segment_id).GetImageToWorldMatrix(world)
        np.testing.assert_allclose(_matrix(world), mn.ijk_to_ras(GEOMETRY), atol=1e-9)
    assert segments["Liver"].GetColor() == pytest.approx(mn.LIVER_COLOR)
    reference = node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    values = [float(v) for v in reference.strip(";").split(";")]
    np.testing.assert_allclose(np.reshape(values[:16], (4, 4)), mn.ijk_to_ras(GEOMETRY), atol=1e-9)


@pytest.mark.parametrize("crop", [False, True], ids=["whole-grid", "cropped-to-extent"])
@pytest.mark.parametrize("per_lesion", [False, True])
def test_a_seg_nrrd_of_slicer_core_is_read_exactly(scene, tmp_path, per_lesion, crop):
    labels = _labels()
    node = mn.segmentation_node_from_labels(scene, Image(labels, GEOMETRY), per_lesion=per_lesion)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetCropToMinimumExtent(crop)
    storage.SetFileName(str(tmp_path / "slicer.seg.nrrd"))
    assert storage.WriteData(node)
    if crop:  # the file holds only the box of the segments, not the CT's grid
        assert sitk.ReadImage(str(tmp_path / "slicer.seg.nrrd")).GetSize() != SHAPE[::-1]
    back = sn.read_segmentation_labels(tmp_path / "slicer.seg.nrrd", Image(np.zeros(SHAPE, np.int16), GEOMETRY))
    np.testing.assert_array_equal(back, labels)


# ----------------------------------------------------------------------------------------- surfaces


def test_closed_surface_volume_matches_the_voxel_volume(scene):
    spacing = (0.9, 0.8, 2.0)
    zz, yy, xx = np.mgrid[0:36, 0:90, 0:100]
    ellipsoid = (
        ((xx - 50) * spacing[0] / 38) ** 2 + ((yy - 45) * spacing[1] / 30) ** 2 + ((zz - 18) * spacing[2] / 30) ** 2
    )
    labels = np.where(ellipsoid <= 1.0, 1, 0).astype(np.uint8)
    geometry = Geometry(spacing, (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    node = mn.segmentation_node_from_labels(scene, Image(labels, geometry))
    assert mn.add_closed_surfaces(node)
    surface = vtk.vtkPolyData()
    assert node.GetClosedSurfaceRepresentation("Liver", surface)
    assert surface.GetNumberOfPoints() > 1000
    triangles = vtk.vtkTriangleFilter()
    triangles.SetInputData(surface)
    mass = vtk.vtkMassProperties()
    mass.SetInputConnection(triangles.GetOutputPort())
    mass.Update()
    voxel_mm3 = labels.sum() * np.prod(spacing)
    assert voxel_mm3 == pytest.approx(4 / 3 * math.pi * 38 * 30 * 30, rel=0.02)
    assert mass.GetVolume() == pytest.approx(voxel_mm3, rel=0.03)
    empty = vtk.vtkPolyData()
    node.GetClosedSurfaceRepresentation("Liver_tumor", empty)
    assert empty.GetNumberOfPoints() == 0


# ------------------------------------------------------------------------------------------- tables


def test_volumetry_table(scene):
    volumetry = {
        "liver_volume_ml": 1500.0,
        "tumour_volume_ml": 45.0,
        "tumour_burden_percent": 3.0,
        "lesion_count": 2,
        "lesions": [
            {"id": 1, "volume_ml": 30.0, "equivalent_diameter_mm": 38.5, "longest_axial_diameter_mm": 44.0,
             "mean_hu": 60.5, "std_hu": 12.25, "centroid_lps_mm": [10.0, -20.0, 30.0], "probability": 0.93},
            {"id": 2, "volume_ml": 15.0, "equivalent_diameter_mm": 30.6, "longest_axial_diameter_mm": 35.0,
             "mean_hu": 40.0, "std_hu": 9.0, "centroid_lps_mm": [-5.0, 7.5, -2.0], "probability": None},
        ],
    }
    node = mn.volumetry_table_node(scene, volumetry)
    assert node.IsA("vtkMRMLTableNode") and node.GetName() == "Liver volumetry"
    table = node.GetTable()
    assert table.GetNumberOfRows() == 2 + 2
    assert [table.GetColumn(i).GetName() for i in range(table.GetNumberOfColumns())] == list(mn.TABLE_COLUMN_NAMES)
    assert node.GetColumnType("Structure") == vtk.VTK_STRING
    assert node.GetColumnType("Volume (mL)") == vtk.VTK_DOUBLE
    assert node.GetColumnUnitLabel("Volume (mL)") == "mL" and node.GetColumnUnitLabel("Centroid R (mm)") == "mm"
    assert node.GetColumnDescription("Percent of liver (%)")

    def row(index):
        return {name: node.GetCellText(index, column) for column, name in enumerate(mn.TABLE_COLUMN_NAMES)}

    def value(index, name):
        return table.GetColumnByName(name).GetValue(index)

    assert row(0)["Structure"] == "Liver (whole organ)" and value(0, "Volume (mL)") == 1500.0
    assert value(0, "Percent of liver (%)") == 100.0
    assert row(1)["Structure"] == "All tumours (2 lesions)" and value(1, "Volume (mL)") == 45.0
    assert value(1, "Percent of liver (%)") == 3.0
    assert math.isnan(value(1, "Equivalent diameter (mm)"))
    assert [row(i)["Structure"] for i in (2, 3)] == ["Lesion 1", "Lesion 2"]
    assert value(2, "Volume (mL)") == 30.0 and value(2, "Percent of liver (%)") == pytest.approx(2.0)
    assert value(2, "Equivalent diameter (mm)") == 38.5 and value(2, "Longest axial diameter (mm)") == 44.0
    assert value(2, "Mean HU") == 60.5 and value(2, "Std HU") == 12.25 and value(2, "Probability") == 0.93
    assert [value(2, f"Centroid {axis} (mm)") for axis in "RAS"] == [-10.0, 20.0, 30.0]
    assert [value(3, f"Centroid {axis} (mm)") for axis in "RAS"] == [5.0, -7.5, -2.0]
    assert math.isnan(value(3, "Probability"))
    assert node.GetAttribute("LiverTumorSeg.LesionCount") == "2"
    assert float(node.GetAttribute("LiverTumorSeg.TumourBurdenPercent")) == 3.0


def test_volumetry_table_without_lesions(scene):
    node = mn.volumetry_table_node(
        scene, {"liver_volume_ml": 1200.0, "tumour_volume_ml": 0.0, "tumour_burden_percent": 0.0,
                "lesion_count": 0, "lesions": []}, name="Empty")
    assert node.GetTable().GetNumberOfRows() == 2
    assert node.GetCellText(1, 0) == "All tumours (no lesions)"
