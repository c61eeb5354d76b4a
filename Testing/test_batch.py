"""`livertumorseg batch`: a cohort on Dask, resumable, failures recorded, tables equal to what `segment` writes.

Real Dask clusters (the command's own local cluster of worker processes, and a LocalCluster started here and
passed by its scheduler address), real ONNX Runtime with the bundled model, real SimpleITK files: four small
crops of one synthetic phantom and one corrupt file.
"""

import contextlib
import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet
import pytest
from distributed import LocalCluster

from LiverTumorSegLib.batch import (BASE_BYTES, BYTES_PER_INPUT_VOXEL, BYTES_PER_PROCESSING_VOXEL, MEMORY,
                                    memory_estimate, memory_request, read_cohort_list, studies_from_paths)
from LiverTumorSegLib.cli import main
from LiverTumorSegLib.image_io import Geometry, Image, read_image, write_image
from LiverTumorSegLib.phantoms import generate_phantom

CASES = ("case-1", "case-2", "case-3", "case-4")


def _run(args) -> tuple[int, str, str]:
    """Run the command in this process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    assert "Traceback" not in err.getvalue()
    return code, out.getvalue(), err.getvalue()


def _read_csv(path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as stream:
        return list(csv.DictReader(stream))


def _studies_run(stderr: str) -> list[str]:
    """The studies a run processed, from its --progress json lines."""
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith('{"stage": "batch"')]
    return sorted(line["study"] for line in lines if "study" in line)


def _snapshot(out_dir) -> dict:
    """Each study's run.json: its bytes and modification time (a study that ran again changes both)."""
    return {case: ((out_dir / case / "run.json").read_bytes(), (out_dir / case / "run.json").stat().st_mtime_ns)
            for case in CASES if (out_dir / case / "run.json").exists()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four small CTs (crops of one phantom around its liver: 16 slices of 80×88 voxels) and a corrupt file."""
    folder = tmp_path_factory.mktemp("cohort")
    phantom = generate_phantom(7, size="small")
    geometry = phantom.image.geometry
    paths = {}
    for case, first in zip(CASES, (16, 18, 20, 22)):
        origin = tuple(geometry.index_to_physical(np.array([first, 12, 20], float)))
        crop = np.ascontiguousarray(phantom.image.array[first:first + 16, 12:92, 20:108])
        paths[case] = write_image(Image(crop, Geometry(geometry.spacing, origin, geometry.direction)),
                                  folder / f"{case}.nii.gz")
    paths["broken"] = folder / "broken.nii.gz"
    paths["broken"].write_bytes(b"\x1f\x8b" + b"not a NIfTI file" * 8)
    return paths


@pytest.fixture(scope="module")
def scheduler():
    """A running cluster (2 workers offering 4 GiB each), known to the command only by its address."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, resources={MEMORY: 4 * 2**30},
                      dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def runs(cohort, scheduler, tmp_path_factory):
    """The same cohort folder through five runs: two studies on the command's own local cluster; then all five
    studies by address (the two done ones skipped); the same again after case-1's file was touched; the four good
    ones (nothing to do); and `segment` of case-3 on its own."""
    base = tmp_path_factory.mktemp("runs")
    out = base / "cohort"
    listing = cohort["case-1"].parent / "cohort.csv"
    listing.write_text("input\n" + "".join(f"{cohort[name].name}\n" for name in (*CASES[:2], "broken", *CASES[2:])),
                       encoding="utf-8")
    good = base / "good.csv"
    good.write_text("input\n" + "".join(f"{cohort[name]}\n" for name in CASES), encoding="utf-8")
    steps = {}
    steps["first two"] = _run(["batch", cohort["case-1"], cohort["case-2"], "-o", out, "--workers", 2,
                               "--progress", "json"])
    steps["first two", "run.json"] = _snapshot(out)
    (out / ".case-3.x1y2.partial").mkdir()  # what a killed run leaves behind
    by_address = ["--scheduler", scheduler, "--progress", "json"]
    steps["all"] = _run(["batch", "--list", listing, "-o", out, *by_address])
    steps["all", "run.json"] = _snapshot(out)
    steps["all", "failures"] = _read_csv(out / "failures.csv")
    stat = cohort["case-1"].stat()
    os.utime(cohort["case-1"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    steps["touched"] = _run(["batch", "--list", listing, "-o", out, *by_address])
    steps["touched", "run.json"] = _snapshot(out)
    steps["nothing new"] = _run(["batch", "--list", good, "-o", out, *by_address])
    steps["nothing new", "run.json"] = _snapshot(out)
    steps["segment"] = _run(["segment", cohort["case-3"], "-o", base / "case-3", "--threads", 1, "--progress", "none"])
    return {"out": out, "segment folder": base / "case-3", **steps}


@pytest.mark.slow
def test_each_run_processes_only_what_is_missing(runs):
    code, stdout, stderr = runs["first two"]
    assert code == 0 and _studies_run(stderr) == ["case-1", "case-2"]
    assert "2 of 2 studies done (2 new, 0 up to date), 0 failed" in stdout
    assert "Dask dashboard: http" in stdout
    code, stdout, stderr = runs["all"]
    assert _studies_run(stderr) == ["broken", "case-3", "case-4"]  # the two done studies were skipped
    assert "4 of 5 studies done (2 new, 2 up to date), 1 failed" in stdout
    before = runs["first two", "run.json"]
    assert {case: runs["all", "run.json"][case] for case in before} == before
    assert not list(runs["out"].glob(".*.partial"))  # the killed run's leftover is gone
    code, stdout, stderr = runs["touched"]
    assert _studies_run(stderr) == ["broken", "case-1"]  # a changed input runs again; a failure is retried
    changed = {case for case in CASES if runs["touched", "run.json"][case] != runs["all", "run.json"][case]}
    assert changed == {"case-1"}
    code, stdout, stderr = runs["nothing new"]
    assert code == 0 and _studies_run(stderr) == []
    assert "4 of 4 studies done (0 new, 4 up to date), 0 failed" in stdout
    assert runs["nothing new", "run.json"] == runs["touched", "run.json"]
    assert _read_csv(runs["out"] / "failures.csv") == []  # the tables describe this run's cohort


@pytest.mark.slow
def test_a_bad_study_fails_alone_with_its_error_and_exit_code(runs, cohort):
    code, stdout, stderr = runs["all"]
    assert code == 2  # the exit code of a bad input image, as `segment` gives for it
    failures = runs["all", "failures"]
    assert [(row["study_id"], row["input"], row["error"], row["exit_code"]) for row in failures] == [
        ("broken", str(cohort["broken"]), "InputError", "2")]
    assert "could not be read as an image" in failures[0]["message"]
    assert f"FAILED  broken: '{cohort['broken']}' could not be read as an image" in stdout
    assert not (runs["out"] / "broken").exists()
    assert sorted(p.name for p in runs["out"].iterdir() if p.is_dir()) == list(CASES)


@pytest.mark.slow
def test_cohort_table_holds_what_each_study_wrote(runs, cohort):
    out = runs["out"]
    rows = _read_csv(out / "cohort.csv")
    assert [row["study_id"] for row in rows] == list(CASES)
    expected_lesions = []
    for row in rows:
        volumetry = json.loads((out / row["study_id"] / "volumetry.json").read_text(encoding="utf-8"))
        details = json.loads((out / row["study_id"] / "run.json").read_text(encoding="utf-8"))
        assert row["input"] == str(cohort[row["study_id"]])
        assert float(row["liver_volume_ml"]) == volumetry["liver_volume_ml"]
        assert float(row["tumour_volume_ml"]) == volumetry["tumour_volume_ml"]
        assert float(row["tumour_burden_percent"]) == volumetry["tumour_burden_percent"]
        assert int(row["lesion_count"]) == volumetry["lesion_count"] == len(volumetry["lesions"])
        assert row["model"] == details["bundle"] and details["batch"]["study_id"] == row["study_id"]
        assert float(row["segment_s"]) == pytest.approx(sum(details["timings_s"].values()), abs=1e-3)
        assert volumetry["liver_volume_ml"] > 0
        for line in _read_csv(out / row["study_id"] / "volumetry.csv"):
            if line.pop("structure") == "lesion":
                expected_lesions.append({"study_id": row["study_id"], **line})
    assert _read_csv(out / "lesions.csv") == expected_lesions
    assert len(expected_lesions) == sum(int(row["lesion_count"]) for row in rows) > 0
    parquet = pyarrow.parquet.read_table(out / "cohort.parquet").to_pylist()
    assert [(r["study_id"], r["liver_volume_ml"], r["lesion_count"]) for r in parquet] == [
        (row["study_id"], float(row["liver_volume_ml"]), int(row["lesion_count"])) for row in rows]
    assert pyarrow.parquet.read_table(out / "lesions.parquet").num_rows == len(expected_lesions)


@pytest.mark.slow
def test_a_study_equals_segment_of_its_input(runs):
    assert runs["segment"][0] == 0
    batch, single = runs["out"] / "case-3", runs["segment folder"]
    assert json.loads((batch / "volumetry.json").read_text()) == json.loads((single / "volumetry.json").read_text())
    assert (batch / "volumetry.csv").read_bytes() == (single / "volumetry.csv").read_bytes()
    assert np.array_equal(read_image(batch / "segmentation.nii.gz").array, read_image(single / "segmentation.nii.gz").array)
    assert sorted(p.name for p in batch.iterdir()) == sorted(p.name for p in single.iterdir())


def test_study_ids_are_safe_unique_and_independent_of_order(tmp_path):
    paths = [tmp_path / "a" / "ct.nii.gz", tmp_path / "b" / "CT.nrrd", tmp_path / "Patient 7 (Müller).mha",
             tmp_path / "dicom" / "SERIES_1", tmp_path / "cohort.csv.nii.gz"]
    ids = {str(study.path): study.id for study in studies_from_paths(paths)}
    assert ids[str(paths[2])] == "Patient_7_Muller"
    assert ids[str(paths[3])] == "SERIES_1"
    assert ids[str(paths[4])] == "cohort.csv_"  # never the name of a table of the cohort folder
    first, second = ids[str(paths[0])], ids[str(paths[1])]  # "ct" and "CT" collide on case-blind file systems
    assert first != second and first[:3] == "ct-" and second[:3] == "CT-" and len(first) == len(second) == 11
    assert {str(study.path): study.id for study in studies_from_paths(paths[::-1])} == ids


def test_cohort_list_columns(tmp_path):
    (tmp_path / "scans").mkdir()
    listing = tmp_path / "list.csv"
    listing.write_text("\ufeffInput,ID,series,age\nscans/a.nii.gz,P001,,61\n\n/data/b,,1.2.3,70\nscans/c.nrrd,,,\n",
                       encoding="utf-8")
    studies = read_cohort_list(listing)
    assert [(s.id, s.path, s.series) for s in studies] == [
        ("P001", tmp_path / "scans" / "a.nii.gz", None), ("b", Path("/data/b"), "1.2.3"),
        ("c", tmp_path / "scans" / "c.nrrd", None)]


@pytest.mark.parametrize("content, message", [
    ("path\na.nii.gz\n", "has no 'input' column"),
    ("input,id\na.nii.gz,P1\nb.nii.gz,p1\n", "The study id 'p1' is given to"),
    ("input,id\na.nii.gz,../x\n", "cannot name a folder"),
    ("input\na.nii.gz\n./a.nii.gz\n", "is listed twice"),
    ("input\n", "lists no studies"),
])
def test_bad_cohort_lists_are_refused_before_any_work(tmp_path, content, message):
    listing = tmp_path / "list.csv"
    listing.write_text(content, encoding="utf-8")
    code, _, stderr = _run(["batch", "--list", listing, "-o", tmp_path / "out"])
    assert code == 64 and message in stderr
    assert not (tmp_path / "out").exists()


def test_bad_options_and_output_folders_are_refused(cohort, tmp_path):
    ct = cohort["case-1"]
    code, _, stderr = _run(["batch", "-o", tmp_path / "out"])
    assert code == 64 and "either as INPUT paths or as --list CSV" in stderr
    code, _, stderr = _run(["batch", ct, "-o", tmp_path / "out", "--scheduler", "tcp://127.0.0.1:1", "--workers", 2])
    assert code == 64 and "Leave out one of them" in stderr
    code, _, stderr = _run(["batch", ct, "-o", ct.parent])  # the inputs' own folder
    assert code == 3 and "is, contains or lies inside the input" in stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    code, _, stderr = _run(["batch", ct, "-o", foreign])
    assert code == 3 and "not a cohort folder of livertumorseg" in stderr
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_missing_dask_or_scheduler_is_a_clear_error(cohort, tmp_path, monkeypatch):
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        code, _, stderr = _run(["batch", cohort["broken"], "-o", tmp_path / "a", "--scheduler", "tcp://127.0.0.1:9"])
    assert code == 5 and "Cannot reach the Dask scheduler at 'tcp://127.0.0.1:9'" in stderr
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if Dask were not installed
    code, _, stderr = _run(["batch", cohort["broken"], "-o", tmp_path / "b"])
    assert code == 5 and "pip install 'livertumorseg[batch]'" in stderr


def test_workers_without_memory_resource_still_run_and_say_so(cohort, tmp_path):
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        code, stdout, stderr = _run(["batch", cohort["broken"], "-o", tmp_path / "out", "--scheduler",
                                     cluster.scheduler_address, "--progress", "none"])
    assert code == 2 and "FAILED  broken" in stdout
    assert "declare no MEMORY resource" in stderr


def test_memory_estimate_from_the_header_and_request(tmp_path):
    image = Image(np.zeros((30, 20, 10), np.int16), Geometry((2.0, 0.5, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    path = write_image(image, tmp_path / "ct.nrrd")
    voxels, in_plane_mm2 = 30 * 20 * 10, 2.0 * 0.5
    assert memory_estimate(path) == int(BASE_BYTES + voxels * (BYTES_PER_INPUT_VOXEL + BYTES_PER_PROCESSING_VOXEL * in_plane_mm2))
    assert memory_estimate(tmp_path / "missing.nii.gz") == BASE_BYTES
    assert memory_request(3 * 2**30, [2 * 2**30, 4 * 2**30]) == {MEMORY: 3 * 2**30}
    assert memory_request(6 * 2**30, [2 * 2**30, 4 * 2**30]) == {MEMORY: 4 * 2**30}  # runs alone on the largest
    assert memory_request(6 * 2**30, []) == {}
