"""The Slicer module's "Export DICOM SEG" (``LiverTumorSegLib.dicom_export``) on real MRML (slicer-core).

A phantom's DICOM CT series (the fixture of ``test_dicom_seg``) is loaded as a volume node that lists its
SOP Instance UIDs as Slicer's DICOM module does; the DICOM database's ``fileForInstance`` is the lookup of
those real files. The SEG is read back with highdicom.
"""

import highdicom as hd
import numpy as np
import pytest
from test_dicom_seg import IDENTIFIERS, _headers, phantom_series  # noqa: F401 - phantom_series is a fixture
from test_dicom_series import SERIES_A
from test_slicer_module import _mrml

from LiverTumorSegLib import dicom_export
from LiverTumorSegLib.dicom_seg import DicomSegUnavailable
from LiverTumorSegLib.errors import InputError, OutputError
from LiverTumorSegLib.image_io import Geometry, Image, read_image
from LiverTumorSegLib.seg_nrrd import ALGORITHM_NAME_TAG

MODEL = "LiverTumorSeg-demo 0.3.0"


@pytest.fixture
def loaded(phantom_series):
    """(scene, CT volume node as loaded from the DICOM database, segmentation node of the truth, the series'
    headers, fileForInstance of the database)."""
    mn = _mrml()
    folder, truth = phantom_series
    headers = _headers(folder)
    files = {h.SOPInstanceUID: str(path) for h, path in zip(headers, sorted(folder.glob("*.dcm")))}
    image = read_image(folder)
    scene = mn.create_scene()
    volume = mn.volume_node_from_image(scene, image, "CT abdomen")
    volume.SetAttribute(dicom_export.INSTANCE_UIDS_ATTRIBUTE, " ".join(h.SOPInstanceUID for h in headers))
    segmentation = mn.segmentation_node_from_labels(scene, image.with_array(truth), volume, name="CT liver segmentation",
                                                    algorithm_name=MODEL)
    return scene, volume, segmentation, headers, files.get


def test_the_segments_are_exported_as_a_seg_of_the_series(loaded, phantom_series, tmp_path):
    scene, volume, segmentation, headers, file_for_instance = loaded
    assert dicom_export.instance_uids(volume) == [h.SOPInstanceUID for h in headers]
    path = dicom_export.export_dicom_seg(segmentation, volume, tmp_path / "seg.dcm", file_for_instance)
    assert path == tmp_path / "seg.dcm" and sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm"]
    seg = hd.seg.segread(path)
    frames = seg.get_pixels_by_source_instance([h.SOPInstanceUID for h in headers], combine_segments=True)
    truth = phantom_series[1]
    assert (truth == 1).any() and (truth == 2).any()
    np.testing.assert_array_equal(frames, truth)
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == SERIES_A
    assert sorted(item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence) == sorted(
        h.SOPInstanceUID for h in headers)
    for keyword in IDENTIFIERS:
        assert seg.get(keyword) == headers[0].get(keyword), keyword
    for segment in seg.SegmentSequence:
        assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == MODEL


def test_segments_without_a_model_tag_say_so(loaded, tmp_path):
    scene, volume, segmentation, _, file_for_instance = loaded
    for segment_id in segmentation.GetSegmentation().GetSegmentIDs():
        segmentation.GetSegmentation().GetSegment(segment_id).RemoveTag(ALGORITHM_NAME_TAG)
    assert dicom_export.algorithm_version(segmentation) == dicom_export.NOT_RECORDED == "not recorded"
    seg = hd.seg.segread(dicom_export.export_dicom_seg(segmentation, volume, tmp_path / "seg.dcm", file_for_instance))
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "not recorded"


def test_a_volume_not_from_the_dicom_database_or_with_files_gone_is_refused(loaded, tmp_path):
    scene, volume, segmentation, headers, file_for_instance = loaded
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "From a NIfTI file")
    with pytest.raises(InputError, match="'From a NIfTI file' was not loaded from the DICOM database"):
        dicom_export.export_dicom_seg(segmentation, other, tmp_path / "seg.dcm", file_for_instance)
    gone = headers[3].SOPInstanceUID
    with pytest.raises(InputError, match=f"1 of the {len(headers)} images of 'CT abdomen' are no longer in the DICOM "
                                         f"database \\(for example {gone}\\)"):
        dicom_export.export_dicom_seg(segmentation, volume, tmp_path / "seg.dcm",
                                      lambda uid: None if uid == gone else file_for_instance(uid))
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_never_replaced(loaded, tmp_path):
    scene, volume, segmentation, _, file_for_instance = loaded
    (tmp_path / "seg.dcm").write_bytes(b"mine")
    with pytest.raises(OutputError, match="already exists, and an existing file is never replaced"):
        dicom_export.export_dicom_seg(segmentation, volume, tmp_path / "seg.dcm", file_for_instance)
    assert (tmp_path / "seg.dcm").read_bytes() == b"mine" and len(list(tmp_path.iterdir())) == 1


def test_a_segmentation_without_liver_is_refused(loaded, tmp_path):
    scene, volume, segmentation, _, file_for_instance = loaded
    segmentation.GetSegmentation().RemoveSegment("Liver")
    with pytest.raises(InputError, match="has no 'Liver' segment"):
        dicom_export.export_dicom_seg(segmentation, volume, tmp_path / "seg.dcm", file_for_instance)
    assert list(tmp_path.iterdir()) == []


def test_a_volume_off_the_series_grid_gets_no_seg(loaded, tmp_path):
    """A volume whose grid is not the images' (here moved 5 mm) cannot reference them: DicomSegUnavailable,
    which the module shows as a message, and no file."""
    mn = _mrml()
    scene, volume, segmentation, _, file_for_instance = loaded
    from LiverTumorSegLib.resection_nodes import geometry_from_volume_node

    geometry, _ = geometry_from_volume_node(volume)
    moved = Geometry(geometry.spacing, (geometry.origin[0] + 5.0, *geometry.origin[1:]), geometry.direction)
    shape = tuple(reversed(volume.GetImageData().GetDimensions()))
    shifted = mn.volume_node_from_image(scene, Image(np.zeros(shape, np.int16), moved), "CT moved")
    shifted.SetAttribute(dicom_export.INSTANCE_UIDS_ATTRIBUTE, volume.GetAttribute(dicom_export.INSTANCE_UIDS_ATTRIBUTE))
    with pytest.raises(DicomSegUnavailable, match="do not lie on the label map's grid"):
        dicom_export.export_dicom_seg(segmentation, shifted, tmp_path / "seg.dcm", file_for_instance)
    assert list(tmp_path.iterdir()) == []


def test_default_file_name():
    scene = _mrml().create_scene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", 'CT: "abdomen"/venous')
    assert dicom_export.default_file_name(volume) == "CT_ _abdomen__venous liver segmentation.dcm"
