"""The full pipeline through the `livertumorseg` command: outputs, geometry, progress, and every bad input.

Runs the bundled demo model with real ONNX Runtime on small synthetic phantoms.
"""

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.bundle import load_bundle
from LiverTumorSegLib.cli import main
from LiverTumorSegLib.errors import Cancelled
from LiverTumorSegLib.image_io import Geometry, Image, read_image, write_image
from LiverTumorSegLib.seg_nrrd import read_segmentation_labels
from LiverTumorSegLib.phantoms import generate_phantom
from LiverTumorSegLib.pipeline import PipelineOptions, segment


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(7, size="small")


@pytest.fixture(scope="module")
def phantom_file(phantom, tmp_path_factory):
    return write_image(phantom.image, tmp_path_factory.mktemp("in") / "ct.nii.gz")


@pytest.fixture(scope="module")
def segmented(phantom_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["segment", str(phantom_file), "-o", str(out), "--threads", "2", "--progress", "none"]) == 0
    return out


def _run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured


def test_outputs_are_complete_and_consistent(segmented, phantom):
    names = sorted(p.name for p in segmented.iterdir())
    assert names == ["report.html", "run.json", "segmentation.nii.gz", "segmentation.seg.nrrd", "volumetry.csv", "volumetry.json"]
    labels = read_image(segmented / "segmentation.nii.gz")
    assert labels.array.shape == phantom.image.array.shape
    np.testing.assert_allclose(labels.geometry.spacing, phantom.image.geometry.spacing, rtol=1e-6)
    assert set(np.unique(labels.array)) <= {0, 1, 2}
    assert np.array_equal(read_segmentation_labels(segmented / "segmentation.seg.nrrd", phantom.image), labels.array)
    volumetry = json.loads((segmented / "volumetry.json").read_text(encoding="utf-8"))
    voxel_ml = np.prod(phantom.image.geometry.spacing) / 1000
    assert volumetry["liver_volume_ml"] == pytest.approx((labels.array >= 1).sum() * voxel_ml, rel=1e-6)
    run = json.loads((segmented / "run.json").read_text(encoding="utf-8"))
    assert run["stages"]["post-process"] == "run" and run["bundle"].startswith("LiverTumorSeg-demo")
    assert run["cascade"]["liver_scales"] == list(load_bundle().liver_scales)
    # the shipped model has neither the radiomics filter nor the boundary CNN: neither raised held-out tumour Dice
    assert run["stages"]["radiomics filter"] == "skipped: the bundle has no lesion_classifier"
    assert run["stages"]["boundary refinement"] == "skipped: the bundle has no boundary_cnn"
    assert "research use" in (segmented / "report.html").read_text(encoding="utf-8").lower()


def test_demo_model_finds_the_liver(segmented, phantom):
    from LiverTumorSegLib.metrics import dice

    labels = read_image(segmented / "segmentation.nii.gz").array
    assert dice(labels >= 1, phantom.label >= 1) > 0.6  # a floor that catches a broken model or a lost geometry


def test_flipped_and_oblique_input_aligns_with_the_input(phantom, segmented, tmp_path, capsys):
    """Axes flipped and permuted, direction rotated a little: the labels must follow the voxels exactly."""
    reference = read_image(segmented / "segmentation.nii.gz").array
    array = np.ascontiguousarray(np.flip(phantom.image.array, axis=2).transpose(0, 2, 1))
    angle = np.radians(8)
    d = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], float)  # the direction that matches the flip and swap
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    spacing = phantom.image.geometry.spacing
    geometry = Geometry((spacing[1], spacing[0], spacing[2]), (5.0, -3.0, 40.0), tuple((rotation @ d).ravel()))
    path = write_image(Image(array, geometry), tmp_path / "oblique.nrrd")
    code, _ = _run(["segment", path, "-o", tmp_path / "out", "--threads", "2", "--progress", "none"], capsys)
    assert code == 0
    labels = read_image(tmp_path / "out" / "segmentation.nii.gz")
    assert labels.geometry.direction == pytest.approx(geometry.direction)
    expected = np.ascontiguousarray(np.flip(reference, axis=2).transpose(0, 2, 1))
    agreement = (labels.array == expected).mean()
    assert agreement > 0.999  # same voxels (only resampling round-off differs)


def test_progress_json_lines(phantom_file, tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "LiverTumorSegLib.cli", "segment", str(phantom_file), "-o", str(tmp_path / "o"),
         "--progress", "json", "--threads", "2"], capture_output=True, text=True, timeout=600,
    )
    assert process.returncode == 0, process.stderr
    events = [json.loads(line) for line in process.stderr.splitlines() if line.startswith("{")]
    stages = [e["stage"] for e in events]
    assert "liver network" in stages and stages[-1] == "done"
    assert all(0.0 <= e["fraction"] <= 1.0 and e["message"] for e in events)


def _file(path, content: bytes):
    path.write_bytes(content)
    return path


def _write(path, array, spacing=(0.8, 0.8, 2.5), vector=False):
    image = sitk.GetImageFromArray(array, isVector=vector)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize(
    "make, code, message",
    [
        (lambda d: d / "missing.nii.gz", 2, "not found"),
        (lambda d: _file(d / "empty.nii.gz", b""), 2, "empty file"),
        (lambda d: _file(d / "junk.nrrd", b"garbage"), 2, "could not be read"),
        (lambda d: _write(d / "slice.nii.gz", np.zeros((32, 32), np.int16), (0.8, 0.8)), 2, "2D image"),
        (lambda d: _write(d / "4d.nrrd", np.zeros((2, 3, 16, 16), np.int16), (1, 1, 1, 1)), 2, "4D image"),
        (lambda d: _write(d / "rgb.nrrd", np.zeros((3, 16, 16, 3), np.uint8), vector=True), 2, "components"),
        (lambda d: _write(d / "two.nii.gz", np.zeros((2, 32, 32), np.int16)), 2, "at least 3"),
        (lambda d: _write(d / "mr.nii.gz", np.random.default_rng(0).integers(0, 4000, (8, 32, 32)).astype(np.int16)), 2, "not CT"),
    ],
)
def test_bad_input_fails_cleanly(tmp_path, capsys, make, code, message):
    source = make(tmp_path)
    out = tmp_path / "out"
    result, captured = _run(["segment", source, "-o", out, "--progress", "none"], capsys)
    assert result == code
    assert message in captured.err and captured.err.startswith("error:")
    assert not out.exists()


def test_truncated_file_fails_cleanly(phantom_file, tmp_path, capsys):
    cut = tmp_path / "cut.nii.gz"
    data = phantom_file.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    result, captured = _run(["segment", cut, "-o", tmp_path / "out"], capsys)
    assert result == 2 and "truncated" in captured.err and not (tmp_path / "out").exists()


def test_no_liver_gives_an_empty_segmentation_and_a_warning(tmp_path, capsys):
    """A body of fat and muscle with no organs: an empty segmentation and a warning, not a crash."""
    array = np.full((12, 96, 96), -1000, np.int16)
    yy, xx = np.mgrid[:96, :96]
    body = (yy - 48) ** 2 / 30**2 + (xx - 48) ** 2 / 40**2
    array[:, body < 1] = -100
    array[:, (body < 1) & (body > 0.8)] = 50
    source = _write(tmp_path / "body.nii.gz", array, (3.0, 3.0, 5.0))
    result, captured = _run(["segment", source, "-o", tmp_path / "out", "--progress", "none"], capsys)
    assert result == 0 and "No liver was found" in captured.err
    assert read_image(tmp_path / "out" / "segmentation.nii.gz").array.max() == 0


def test_unwritable_output_fails_cleanly(phantom_file, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    result, captured = _run(["segment", phantom_file, "-o", blocker / "out", "--progress", "none"], capsys)
    assert result == 3 and "is a file, not a folder" in captured.err


def test_cancel_in_the_middle_raises_and_writes_nothing(phantom):
    seen = []

    def progress(stage, fraction):
        seen.append(stage)

    with pytest.raises(Cancelled):
        segment(phantom.image, load_bundle(), PipelineOptions(threads=2), progress=progress,
                cancel=lambda: "liver network" in seen)
    assert "volumetry" not in seen


def test_sigterm_cancels_the_command_without_output(phantom_file, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "LiverTumorSegLib.cli", "segment", str(phantom_file), "-o", str(out), "--progress", "json"],
        stderr=subprocess.PIPE, text=True,
    )
    for line in process.stderr:  # wait until the networks are running
        if '"liver network"' in line:
            break
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "cancel" in err.lower()
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
