"""An input is never deleted or changed: `--overwrite` replaces only a previous output of this tool.

Every refusal happens before any work, with exit code 3 and a message; the inputs are byte-for-byte unchanged.
The inputs are real CT files (a small phantom), so a missing check would run the pipeline and replace them.
"""

import hashlib
import json
import os
import shutil

import pytest

from LiverTumorSegLib.cli import main
from LiverTumorSegLib.errors import OutputError
from LiverTumorSegLib.image_io import write_image
from LiverTumorSegLib.output_folder import PRODUCER, check_output_folder
from LiverTumorSegLib.phantoms import generate_phantom


@pytest.fixture(scope="module")
def ct_bytes(tmp_path_factory):
    path = write_image(generate_phantom(7, size="small").image, tmp_path_factory.mktemp("ct") / "ct.nii.gz")
    return path.read_bytes()


@pytest.fixture
def study(tmp_path, ct_bytes):
    """A folder holding the input CT and a file of the user's beside it."""
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "ct.nii.gz").write_bytes(ct_bytes)
    (folder / "notes.txt").write_text("the user's notes")
    return folder


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _segment(capsys, source, out, *extra):
    code = main(["segment", str(source), "-o", str(out), "--progress", "none", "--threads", "2", *map(str, extra)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    "output, expected",
    [
        (lambda study: study, "contains the input"),  # the input's own folder
        (lambda study: study / "ct.nii.gz", "is, or lies inside, the input"),  # the input file itself
        (lambda study: study.parent, "contains the input"),  # a folder above the input
    ],
    ids=["input-folder", "input-file", "ancestor-folder"],
)
def test_overwrite_never_replaces_an_input(study, capsys, output, expected):
    before = _snapshot(study)
    code, err = _segment(capsys, study / "ct.nii.gz", output(study), "--overwrite")
    assert code == 3 and expected in err and err.startswith("error:")
    assert _snapshot(study) == before


def test_output_inside_a_dicom_series_folder_is_refused(study, capsys):
    """A series folder is an input as a whole: neither it nor anything inside it can be the output."""
    before = _snapshot(study)
    for out in (study, study / "result"):
        code, err = _segment(capsys, study, out, "--overwrite")
        assert code == 3 and ("lies inside, the input" in err or "is, or lies inside" in err)
    assert _snapshot(study) == before and not (study / "result").exists()


def test_output_through_a_symbolic_link_to_the_input_folder_is_refused(study, tmp_path, capsys):
    alias = tmp_path / "alias"
    alias.symlink_to(study, target_is_directory=True)
    before = _snapshot(study)
    code, err = _segment(capsys, study / "ct.nii.gz", alias, "--overwrite")
    assert code == 3 and "contains the input" in err
    assert _snapshot(study) == before


def test_current_folder_is_refused_even_when_it_holds_no_input(study, tmp_path, capsys, monkeypatch):
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    monkeypatch.chdir(elsewhere)
    code, err = _segment(capsys, study / "ct.nii.gz", ".", "--overwrite")
    assert code == 3 and "current folder" in err
    assert (elsewhere / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_output_below_a_regular_file_is_refused_up_front(study, capsys):
    code, err = _segment(capsys, study / "ct.nii.gz", study / "notes.txt" / "out")
    assert code == 3 and "is a file, not a folder" in err


@pytest.mark.parametrize(
    "fill, reason",
    [
        (lambda d: (d / "keep.txt").write_text("mine"), "holds other files: keep.txt"),
        (lambda d: (d / "run.json").write_text(json.dumps({"stages": {}})), "not written by livertumorseg"),
        (lambda d: (d / "volumetry.json").write_text("{}"), "no readable run.json"),
        (lambda d: (d / "run.json").mkdir(), "holds other files: run.json"),
    ],
    ids=["foreign-file", "foreign-run-json", "no-run-json", "run-json-folder"],
)
def test_overwrite_refuses_a_folder_that_is_not_our_output(study, tmp_path, capsys, fill, reason):
    out = tmp_path / "out"
    out.mkdir()
    fill(out)
    before = sorted(p.name for p in out.iterdir())
    code, err = _segment(capsys, study / "ct.nii.gz", out, "--overwrite")
    assert code == 3 and reason in err and "--overwrite will not replace it" in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_existing_output_needs_overwrite_and_a_previous_output_is_replaced(study, tmp_path, capsys):
    out = tmp_path / "out"
    assert _segment(capsys, study / "ct.nii.gz", out)[0] == 0
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["producer"] == PRODUCER
    code, err = _segment(capsys, study / "ct.nii.gz", out)
    assert code == 3 and "--overwrite" in err
    marker = os.stat(out / "run.json").st_mtime_ns
    (out / "run.json").write_text(json.dumps({**run, "marker": "previous run"}), encoding="utf-8")
    assert _segment(capsys, study / "ct.nii.gz", out, "--overwrite")[0] == 0
    rerun = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert "marker" not in rerun and os.stat(out / "run.json").st_mtime_ns >= marker


def test_demo_refuses_the_current_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["demo", "-o", ".", "--overwrite"]) == 3
    assert "current folder" in capsys.readouterr().err and (tmp_path / "keep.txt").exists()


def test_library_callers_get_the_same_protection(study):
    """``write_outputs``, which library callers use, runs this check first."""
    with pytest.raises(OutputError, match="contains the input"):
        check_output_folder(study, [study / "ct.nii.gz"], overwrite=True)
    copy = study.parent / "copy"
    shutil.copytree(study, copy)
    with pytest.raises(OutputError, match="holds other files"):
        check_output_folder(copy, [study / "ct.nii.gz"], overwrite=True)
    assert check_output_folder(study.parent / "new", [study / "ct.nii.gz"]) == study.parent / "new"
