"""The engine command line as a background process (``LiverTumorSegLib.process``), without Slicer.

The command line the Slicer module builds is checked against the engine's real parser; the real
``livertumorseg`` CLI runs on a small phantom in a real child process, and its progress, its exit codes
turned into messages, and a cancel that leaves nothing behind are checked on what that process did.
"""

import ast
import contextlib
import io
import os
import re
import signal
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from LiverTumorSegLib import cli, process
from LiverTumorSegLib.errors import BundleError, LiverTumorSegError, OutputError, UsageError

ROOT = Path(__file__).resolve().parents[1]
ENGINE_DIR = ROOT / "LiverTumorSeg"

#: The stages the engine reports for a cascade bundle without radiomics filter and boundary CNN, in order.
CASCADE_STAGES = ["checkinput", "reorient", "preprocess", "cascade", "livernetwork", "tumournetwork", "postprocess",
                  "backtoinputgrid", "volumetry", "done"]


def untrained_bundle(folder):
    """A real but untrained cascade bundle: each branch is sigmoid(mean of its input channels)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from LiverTumorSegLib.bundle import write_bundle
    from LiverTumorSegLib.preprocess import InputContract

    files = {}
    for name, channels in (("liver.onnx", 3), ("tumour.onnx", 4)):
        graph = helper.make_graph(
            [helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=1, axes=[1]),
             helper.make_node("Sigmoid", ["mean"], ["probability"])],
            "branch",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, "H", "W"])],
            [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        )
        files[name] = Path(folder) / f"source-{name}"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), files[name])
    manifest = {"name": "untrained test bundle", "version": "1", "input": InputContract().to_dict(),
                "components": {"liver": {"file": "liver.onnx"}, "tumour": {"file": "tumour.onnx"}}}
    write_bundle(Path(folder) / "bundle", manifest, files)
    return Path(folder) / "bundle"


@pytest.fixture(scope="module")
def engine_inputs(tmp_path_factory):
    """A small phantom CT file (the module writes NRRD) and an untrained bundle."""
    from LiverTumorSegLib.image_io import write_image
    from LiverTumorSegLib.phantoms import generate_phantom

    folder = tmp_path_factory.mktemp("engine-inputs")
    ct = write_image(generate_phantom(11, size="small").image, folder / "ct.nrrd", compress=False)
    return ct, untrained_bundle(folder)


def _run(tmp_path, ct_file, **options):
    """An EngineRun of the real CLI in this Python, the input copied in as the module writes it."""
    run = process.EngineRun(sys.executable, options, temporary_root=tmp_path / "temporary",
                            environment=process.engine_environment(os.environ, [ENGINE_DIR]), working_directory=str(ENGINE_DIR))
    run.input_path.write_bytes(Path(ct_file).read_bytes())
    return run


# ------------------------------------------------------------------------------------ command line


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bundle_path": "/models/my bundle", "device": "cuda", "use_radiomics_filter": False,
         "use_boundary_refinement": False, "per_lesion_segments": True},
        {"use_radiomics_filter": False},
        {"per_lesion_segments": True, "device": "cpu"},
    ],
)
def test_command_line_is_accepted_by_the_engine_parser(tmp_path, options):
    arguments = process.engine_command_arguments(tmp_path / "input volume.nrrd", tmp_path / "out", **options)
    assert arguments[:2] == ["-m", "LiverTumorSegLib.cli"]
    parsed = cli._parser().parse_args(arguments[2:])
    assert parsed.run is cli._segment
    assert parsed.input == tmp_path / "input volume.nrrd" and parsed.output == tmp_path / "out"
    assert parsed.progress == "json"
    assert parsed.bundle == (Path(options["bundle_path"]) if options.get("bundle_path") else None)
    assert parsed.device == options.get("device", "cpu")
    assert parsed.no_radiomics is not options.get("use_radiomics_filter", True)
    assert parsed.no_refine is not options.get("use_boundary_refinement", True)
    assert parsed.per_lesion is options.get("per_lesion_segments", False)
    assert not parsed.overwrite  # the module always writes into a new folder


def test_progress_lines_of_the_engine_are_read():
    stream = io.StringIO()
    with contextlib.redirect_stderr(stream):
        reporter = cli._ProgressReporter("json")
        for stage, fraction in (("check input", 0.0), ("liver network", 0.25), ("liver network", 1.0),
                                ("postprocess", 0.5), ("done", 1.0)):
            reporter(stage, fraction)
        reporter.close()
    lines = stream.getvalue().splitlines() + ["warning: No liver was found in this image.", "outputs: /x", "{not json"]
    records = [process.parse_progress_line(line) for line in lines]
    assert [r["stage"] for r in records if r] == ["check input", "liver network", "liver network", "postprocess", "done"]
    assert records[2]["fraction"] == 1.0 and records[1]["fraction"] == 0.25
    assert records[-3:] == [None, None, None]
    assert process.parse_progress_line('{"stage": "x", "fraction": 7}')["fraction"] == 1.0
    assert process.parse_progress_line('{"stage": "x"}') is None
    overall, seen = 0.0, []
    for record in filter(None, records):
        overall = process.overall_progress(record["stage"], record["fraction"], overall)
        seen.append(overall)
    assert seen == sorted(seen) and 0.9 < seen[-1] < 1.0
    assert process.overall_progress("a stage added later", 0.5, 0.4) == 0.4
    assert process.progress_text("liver network", 0.25) == "Liver network: 25%"
    assert process.engine_warnings(lines) == ["No liver was found in this image."]


def test_every_engine_stage_moves_the_progress_bar():
    """Stage names the engine reports have a span: pipeline steps, network branches, each stage's STAGE."""
    stages = set()
    for path in sorted((ENGINE_DIR / "LiverTumorSegLib").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("step", "progress"):
                if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    stages.add(node.args[0].value)
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "STAGE" for t in node.targets):
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    stages.add(node.value.value)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"\w+ network", node.value):
                stages.add(node.value)
    assert {"check input", "liver network", "tumour network", "postprocess", "done"} <= stages
    missing = sorted(s for s in stages if process.stage_key(s) not in process.STAGE_SPANS)
    assert not missing, f"add these engine stages to STAGE_SPANS in LiverTumorSegLib/process.py: {missing}"
    assert all(0.0 <= a <= b <= 1.0 for a, b in process.STAGE_SPANS.values())


def test_error_messages_say_what_to_do():
    for code in process.EXIT_HINTS:
        assert re.search(rf"^\s*{code}\s", cli.EXIT_CODES, re.M), f"exit code {code} is not an engine exit code"
    message = process.engine_error_message(
        ['{"stage": "check input", "fraction": 0.0, "message": "check input 0%"}',
         "error: The image has no negative values, so it is not CT in Hounsfield units."], 2)
    assert message == process.EXIT_HINTS[2] + "\n\nThe image has no negative values, so it is not CT in Hounsfield units."
    crash = process.engine_error_message(["Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: boom"], 1)
    assert crash.startswith(process.EXIT_HINTS[1]) and crash.endswith("ValueError: boom")
    killed = process.engine_error_message([], -9)
    assert "memory" in killed and "signal 9" in killed
    assert process.engine_error_message([], 77) == "The segmentation failed (exit code 77)."


def test_engine_environment_puts_the_engine_first_once():
    environment = process.engine_environment({"PYTHONPATH": os.pathsep.join(["/b", "/a"]), "HOME": "/h"}, ["/a", Path("/c")])
    assert environment["PYTHONPATH"].split(os.pathsep) == ["/a", "/c", "/b"]
    assert environment["HOME"] == "/h" and environment["PYTHONUNBUFFERED"] == "1" and environment["PYTHONIOENCODING"] == "utf-8"


def test_python_launcher_is_found_in_the_given_folders(tmp_path):
    launcher = tmp_path / "bin" / "PythonSlicerTest"
    launcher.parent.mkdir()
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    assert process.python_launcher([tmp_path / "nothing", launcher.parent], name="PythonSlicerTest") == str(launcher)
    with pytest.raises(LiverTumorSegError, match="PythonSlicerTest.*Reinstall 3D Slicer"):
        process.python_launcher([tmp_path], name="PythonSlicerTest")


# ------------------------------------------------------------------------- the real CLI in a process


def test_run_reports_every_stage_in_order_and_leaves_only_the_kept_outputs(engine_inputs, tmp_path):
    ct, bundle = engine_inputs
    run = _run(tmp_path, ct, bundle_path=str(bundle), per_lesion_segments=True)
    run.start()
    reports = []
    outcome = run.wait(lambda fraction, text, stage: reports.append((fraction, text, stage)), timeout=600)
    assert outcome.status == "completed" and outcome.exit_code == 0, outcome.message
    stages = [process.stage_key(stage) for _, _, stage in reports]
    assert list(dict.fromkeys(stages)) == CASCADE_STAGES
    fractions = [fraction for fraction, _, _ in reports]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == process.STAGE_SPANS["done"][1]
    assert reports[-1][1] == "Writing the results..."
    assert outcome.elapsed_seconds > 0 and any(line.startswith("outputs: ") for line in outcome.output)

    kept = run.keep_outputs(tmp_path / "kept")
    assert sorted(p.name for p in kept.iterdir()) == sorted(p.name for p in run.output_folder.iterdir())
    with pytest.raises(OutputError, match="already exists"):
        run.keep_outputs(tmp_path / "kept")
    run.close()
    assert not run.folder.exists() and list((tmp_path / "temporary").iterdir()) == []
    assert ct.is_file()  # the input is never touched


def test_non_ct_input_fails_with_exit_code_2_and_its_message(tmp_path):
    from LiverTumorSegLib.image_io import Geometry, Image, write_image

    array = np.full((8, 48, 48), 100, dtype=np.int16)  # no air: not CT in Hounsfield units
    array[:, 10:30, 10:30] = 400
    ct = write_image(Image(array, Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))), tmp_path / "not-ct.nrrd")
    run = _run(tmp_path, ct)
    run.start()
    outcome = run.wait(timeout=600)
    assert outcome.status == "failed" and outcome.exit_code == 2
    assert outcome.message.startswith(process.EXIT_HINTS[2] + "\n\n") and "Hounsfield" in outcome.message
    assert not run.output_folder.exists()
    run.close()
    assert not run.folder.exists()


def test_damaged_bundle_fails_with_exit_code_4(engine_inputs, tmp_path):
    ct, _ = engine_inputs
    (tmp_path / "empty bundle").mkdir()
    run = _run(tmp_path, ct, bundle_path=str(tmp_path / "empty bundle"))
    run.start()
    outcome = run.wait(timeout=600)
    assert outcome.exit_code == 4 and outcome.message.startswith(process.EXIT_HINTS[4]) and "manifest.json" in outcome.message
    run.close()


def test_options_are_refused_before_a_temporary_folder_is_made(tmp_path):
    with pytest.raises(UsageError, match="Unknown device 'tpu'"):
        process.EngineRun(sys.executable, {"device": "tpu"}, temporary_root=tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        process.EngineRun(sys.executable, {"bundle_path": str(tmp_path / "missing")}, temporary_root=tmp_path)
    with pytest.raises(LiverTumorSegError, match="was not written"):
        process.EngineRun(sys.executable, {}, temporary_root=tmp_path / "run").start()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.skipif(os.name == "nt", reason="process groups and SIGTERM are POSIX")
def test_cancel_stops_the_engine_and_leaves_no_output(engine_inputs, tmp_path):
    ct, bundle = engine_inputs
    run = _run(tmp_path, ct, bundle_path=str(bundle))
    run.start()
    stages = []
    while "livernetwork" not in stages:
        assert not run.is_finished(), "the engine ended before it could be cancelled"
        run.poll(lambda fraction, text, stage: stages.append(process.stage_key(stage)), timeout=0.2)
    run.cancel()
    reported = len(stages)
    outcome = run.wait(lambda fraction, text, stage: stages.append(stage), timeout=120)
    assert outcome.status == "cancelled" and len(stages) == reported, "no progress is reported after a cancel"
    assert outcome.exit_code in (130, -signal.SIGTERM)
    assert outcome.exit_code == -signal.SIGTERM or "error: cancelled" in "\n".join(outcome.output).lower()
    assert not run.output_folder.exists() and sorted(p.name for p in run.folder.iterdir()) == [process.INPUT_FILE]
    run.close()
    assert not run.folder.exists()


@pytest.mark.skipif(os.name == "nt", reason="process groups and signals are POSIX")
def test_a_process_that_ignores_the_cancel_is_killed(tmp_path, monkeypatch):
    monkeypatch.setattr(process, "FORCE_KILL_AFTER_SECONDS", 0.5)
    script = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "print('{\"stage\": \"check input\", \"fraction\": 0.5}', flush=True); time.sleep(60)")
    run = process.EngineRun(sys.executable, {}, temporary_root=tmp_path)
    run.engine = process.EngineProcess([sys.executable, "-c", script])
    run.input_path.write_bytes(b"")
    run.start()
    while not run.engine.lines:
        run.poll(timeout=0.2)
    run.cancel()
    outcome = run.wait(timeout=30)
    assert outcome.status == "cancelled" and outcome.exit_code == -signal.SIGKILL
    run.close()
    assert not run.folder.exists()
