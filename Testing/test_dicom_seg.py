"""DICOM SEG of a DICOM series input: `livertumorseg segment` on real DICOM files, the SEG read back with highdicom.

A phantom is written as a DICOM CT series with the slice writer of ``test_dicom_series`` and the headers a
scanner adds (patient, study, frame of reference).
"""

import json
import subprocess
import sys

import highdicom as hd
import numpy as np
import pydicom
import pytest
from test_dicom_series import SERIES_A, SERIES_B, _series, _write_slice

from LiverTumorSegLib import __version__
from LiverTumorSegLib.cli import main
from LiverTumorSegLib.dicom_seg import DicomSegUnavailable, find_source_series, write_dicom_seg
from LiverTumorSegLib.image_io import Geometry, Image, read_image, write_image
from LiverTumorSegLib.phantoms import generate_phantom

#: Headers a scanner writes that the geometry tests of test_dicom_series leave out.
SCANNER_HEADERS = {
    "PatientID": "LTS-0007", "PatientName": "Phantom^Seven", "PatientBirthDate": "19700101", "PatientSex": "O",
    "StudyID": "S7", "AccessionNumber": "ACC7", "StudyDate": "20250101", "StudyTime": "120000",
    "ReferringPhysicianName": "", "FrameOfReferenceUID": "1.2.826.0.1.3680043.2.1125.7.99",
}
#: Slices of the small phantom around its tumour: a short series that segments in seconds.
SLICES = slice(23, 37)
IDENTIFIERS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
               "AccessionNumber", "StudyDate", "FrameOfReferenceUID")


def _add_scanner_headers(paths):
    for path in paths:
        dataset = pydicom.dcmread(path)
        for keyword, value in SCANNER_HEADERS.items():
            setattr(dataset, keyword, value)
        dataset.save_as(path)


def _headers(folder):
    """The series' headers in slice order (the files are named by slice, lowest first)."""
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(folder.glob("*.dcm"))]


def _run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory):
    """(folder of a phantom's DICOM CT series, the phantom's truth label map on the series' grid)."""
    phantom = generate_phantom(7, size="small")
    hu, truth, geometry = phantom.image.array[SLICES], phantom.label[SLICES], phantom.image.geometry
    folder = tmp_path_factory.mktemp("dicom") / "ct"
    folder.mkdir()
    paths = []
    for k in range(hu.shape[0]):
        path = folder / f"ct_{k:03d}.dcm"
        position = geometry.index_to_physical(np.array([SLICES.start + k, 0, 0]))
        _write_slice(path, hu[k], position, instance=k + 1, pixel=geometry.spacing[0], thickness=geometry.spacing[2])
        paths.append(path)
    _add_scanner_headers(paths)
    return folder, truth


@pytest.fixture(scope="module")
def segmented(phantom_series, tmp_path_factory):
    """`livertumorseg segment` on the series in a fresh Python: (output folder, run.json, the modules of
    3D Slicer, VTK or trame-slicer that the run imported)."""
    folder, _ = phantom_series
    out = tmp_path_factory.mktemp("run") / "out"
    script = (
        "import json, sys\n"
        "from LiverTumorSegLib.cli import main\n"
        f"code = main(['segment', {str(folder)!r}, '-o', {str(out)!r}, '--threads', '2', '--progress', 'none'])\n"
        "roots = ('slicer', 'vtk', 'vtkmodules', 'trame_slicer', 'mrml')\n"
        "print(json.dumps([code, sorted(m for m in sys.modules if m.split('.')[0] in roots)]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    code, modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert code == 0, result.stderr
    return out, json.loads((out / "run.json").read_text(encoding="utf-8")), modules


def test_segment_writes_the_seg_without_importing_slicer(segmented):
    out, _, modules = segmented
    assert sorted(p.name for p in out.iterdir()) == [
        "report.html", "run.json", "segmentation.dcm", "segmentation.nii.gz", "segmentation.seg.nrrd",
        "volumetry.csv", "volumetry.json"]
    assert modules == []


def test_seg_frames_equal_the_label_map_on_the_source_grid(segmented, phantom_series):
    out, _, _ = segmented
    folder, _ = phantom_series
    labels = read_image(out / "segmentation.nii.gz").array
    assert (labels == 1).any() and (labels == 2).any()  # both segments have frames to compare
    seg = hd.seg.segread(out / "segmentation.dcm")
    frames = seg.get_pixels_by_source_instance([h.SOPInstanceUID for h in _headers(folder)], combine_segments=True)
    np.testing.assert_array_equal(frames, labels)


def test_seg_references_the_series_and_keeps_its_identifiers(segmented, phantom_series):
    out, run, _ = segmented
    headers = _headers(phantom_series[0])
    seg = hd.seg.segread(out / "segmentation.dcm")
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == SERIES_A != seg.SeriesInstanceUID
    assert sorted(item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence) == sorted(
        h.SOPInstanceUID for h in headers)
    for keyword in IDENTIFIERS:
        assert seg.get(keyword) == headers[0].get(keyword), keyword
    assert seg.ContentQualification == "RESEARCH" and seg.SoftwareVersions == __version__

    liver, tumour = seg.SegmentSequence
    assert (liver.SegmentNumber, liver.SegmentLabel, tumour.SegmentNumber, tumour.SegmentLabel) == (
        1, "Liver", 2, "Liver tumor")
    codes = [(s.SegmentedPropertyCategoryCodeSequence[0], s.SegmentedPropertyTypeCodeSequence[0]) for s in (liver, tumour)]
    assert [(c.CodingSchemeDesignator, c.CodeValue, t.CodingSchemeDesignator, t.CodeValue) for c, t in codes] == [
        ("SCT", "123037004", "SCT", "10200004"), ("SCT", "49755003", "SCT", "108369006")]
    assert tumour.AnatomicRegionSequence[0].CodeValue == "10200004" and "AnatomicRegionSequence" not in liver
    assert hd.color.CIELabColor.from_dicom_value(liver.RecommendedDisplayCIELabValue).to_rgb() == (221, 130, 101)
    for segment in (liver, tumour):
        assert segment.SegmentAlgorithmType == "AUTOMATIC" and segment.SegmentAlgorithmName == "LiverTumorSeg"
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == "LiverTumorSeg" and algorithm.AlgorithmVersion == run["bundle"]


@pytest.mark.parametrize("which", ["truth", "empty"])
def test_a_label_map_round_trips_exactly(phantom_series, tmp_path, which):
    folder, truth = phantom_series
    image = read_image(folder)
    labels = truth if which == "truth" else np.zeros_like(truth)
    path = write_dicom_seg(image.with_array(labels), tmp_path / "seg.dcm", find_source_series(folder),
                           algorithm_version="test 1.0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm"]
    frames = hd.seg.segread(path).get_pixels_by_source_instance(
        [h.SOPInstanceUID for h in _headers(folder)], combine_segments=True)
    np.testing.assert_array_equal(frames, labels)


def test_the_seg_references_the_series_the_engine_reads(tmp_path):
    _series(tmp_path, [1.0 * k for k in range(8)], series=SERIES_B, thickness=1.0)
    _series(tmp_path, [3.0 * k for k in range(8)], series=SERIES_A, thickness=3.0)
    chosen = find_source_series(tmp_path)
    assert chosen.series_uid == SERIES_B and len(chosen.files) == 8  # the thinner one, as read_image chooses
    assert read_image(tmp_path).geometry.spacing[2] == pytest.approx(1.0)
    assert find_source_series(tmp_path, SERIES_A).series_uid == SERIES_A
    empty = tmp_path / "empty"
    empty.mkdir()
    assert find_source_series(empty) is None  # reading it raises the clear "no DICOM series" error


def test_a_series_without_frame_of_reference_gets_no_seg(tmp_path):
    _series(tmp_path, [2.0 * k for k in range(6)])
    image = read_image(tmp_path)
    with pytest.raises(DicomSegUnavailable, match="no FrameOfReferenceUID"):
        write_dicom_seg(image.with_array(np.zeros(image.array.shape, np.uint8)), tmp_path / "seg.dcm",
                        find_source_series(tmp_path), algorithm_version="test 1.0")
    assert not (tmp_path / "seg.dcm").exists()


def test_gantry_tilt_skips_the_seg_with_a_warning(tmp_path, capsys):
    """A tilted series is resampled: the other outputs are written on that grid, the SEG is not (see dicom_seg)."""
    _add_scanner_headers(_series(tmp_path / "ct", [2.0 * k for k in range(8)], shift=(0.0, 0.5)))
    out = tmp_path / "out"
    code, err = _run(["segment", tmp_path / "ct", "-o", out, "--skip-intensity-check", "--threads", "1",
                      "--progress", "none"], capsys)
    assert code == 0
    assert "gantry tilt" in err and "No DICOM SEG (segmentation.dcm) was written" in err
    assert "segmentation.dcm" not in {p.name for p in out.iterdir()}
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert any(w.startswith("No DICOM SEG") and "resampled" in w for w in run["warnings"])


def test_no_dicom_seg_and_overwrite_of_a_dicom_output(tmp_path, capsys):
    _add_scanner_headers(_series(tmp_path / "ct", [2.0 * k for k in range(6)]))
    out = tmp_path / "out"
    common = ["segment", tmp_path / "ct", "-o", out, "--skip-intensity-check", "--threads", "1", "--progress", "none"]
    assert _run(common + ["--dicom-seg"], capsys)[0] == 0
    assert (out / "segmentation.dcm").is_file()
    assert _run(common + ["--no-dicom-seg", "--overwrite"], capsys)[0] == 0  # a folder with a SEG is ours
    assert "segmentation.dcm" not in {p.name for p in out.iterdir()}


@pytest.mark.parametrize("depths, message", [
    ([2.0 * k for k in range(10) if k != 6], "is missing slice(s) between positions 10.00 and 14.00 mm"),
    ([0, 2, 4, 6, 8, 10, 12.5, 14.5, 16.5, 18.5], "has non-uniform slice spacing"),
], ids=["missing-slice", "uneven-spacing"])
def test_a_broken_series_gets_the_clear_error_and_no_seg(tmp_path, capsys, depths, message):
    _add_scanner_headers(_series(tmp_path / "ct", depths))
    out = tmp_path / "out"
    code, err = _run(["segment", tmp_path / "ct", "-o", out, "--dicom-seg", "--progress", "none"], capsys)
    assert code == 2 and message in err
    assert not out.exists()


def test_dicom_seg_for_an_image_file_is_a_usage_error(tmp_path, capsys):
    ct = write_image(Image(np.full((4, 8, 8), -1000, np.int16), Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0),
                                                                        (1, 0, 0, 0, 1, 0, 0, 0, 1))),
                     tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    code, err = _run(["segment", ct, "-o", out, "--dicom-seg", "--progress", "none"], capsys)
    assert code == 64 and "--dicom-seg needs a DICOM series folder" in err
    assert not out.exists()
