"""Each class of failure has its own exit code, listed in --help, and options are checked before any work."""

import os

import onnxruntime
import pytest

from LiverTumorSegLib.cli import EXIT_CODES, main

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _main(capsys, *args):
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured


def test_help_lists_every_exit_code(capsys):
    code, captured = _main(capsys, "segment", "--help")
    assert code == 0
    for number in ("0", "1", "2", "3", "4", "5", "64", "130"):
        assert f"\n  {number} " in EXIT_CODES and f"  {number} " in captured.out


@pytest.mark.parametrize("args", [["segment"], ["segment", "ct.nii.gz", "-o", "out", "--no-such-option"],
                                  ["segment", "ct.nii.gz", "-o", "out", "--threads", "many"]],
                         ids=["missing-arguments", "unknown-option", "non-integer"])
def test_usage_errors_exit_64_not_the_bad_input_code(capsys, args):
    code, captured = _main(capsys, *args)
    assert code == 64 and "error:" in captured.err


def test_invalid_option_values_exit_64_before_the_input_is_read(tmp_path, capsys):
    # the input does not exist: had it been read first, the exit code would be 2
    code, captured = _main(capsys, "segment", tmp_path / "missing.nii.gz", "-o", tmp_path / "out", "--threads", "0")
    assert code == 64 and "--threads must be at least 1" in captured.err
    code, captured = _main(capsys, "segment", tmp_path / "missing.nii.gz", "-o", tmp_path / "out", "--liver-scales", "1", "2")
    assert code == 64 and "--liver-scales: liver scales must be one or more zooms between 0.8 and 1.25, got [1.0, 2.0]" in captured.err
    code, captured = _main(capsys, "phantom", "--out", tmp_path / "p", "--count", "0")
    assert code == 64 and "--count must be at least 1" in captured.err


def test_too_many_threads_are_capped_at_the_cores(tmp_path, capsys):
    code, captured = _main(capsys, "segment", tmp_path / "missing.nii.gz", "-o", tmp_path / "out", "--threads", "1000")
    assert f"--threads 1000 is more than the {CORES} CPU core(s) available; using {CORES}." in captured.err
    assert code == 2 and "not found" in captured.err  # then the missing input, as usual


def test_unavailable_device_exits_5_before_the_input_is_read(tmp_path, capsys):
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    code, captured = _main(capsys, "segment", tmp_path / "missing.nii.gz", "-o", tmp_path / "out", "--device", "cuda")
    assert code == 5 and "no CUDA support" in captured.err and not (tmp_path / "out").exists()
