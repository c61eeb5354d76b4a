"""The engine command line as a background process: command, progress, messages, cancel, temporary files.

The Slicer module runs ``PythonSlicer -m LiverTumorSegLib.cli segment ... --progress json`` through
:class:`EngineRun` so that Slicer stays responsive; everything here is standard library (no Qt, no
``slicer``), so it is tested with real processes outside Slicer. A run owns a temporary folder with the
input file and the engine's output folder; the caller writes the input, polls for progress, reads the
outcome, and closes the run, which removes the folder.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

from .errors import BundleError, LiverTumorSegError, UsageError

log = logging.getLogger("LiverTumorSeg")

#: Share of the whole run that each engine stage covers (stage names reduced to lower-case letters).
#: Stages not listed here keep the bar where it is and only change the text.
STAGE_SPANS = {
    "checkinput": (0.00, 0.02),
    "reorient": (0.02, 0.04),
    "preprocess": (0.04, 0.10),
    "cascade": (0.10, 0.12),
    "livernetwork": (0.12, 0.55),
    "tumournetwork": (0.55, 0.75),
    "tumornetwork": (0.55, 0.75),
    # seed-baseline bundles (LiverTumorSegLib.baseline_networks)
    "network": (0.04, 0.12),
    "coarselivernetwork": (0.12, 0.40),
    "hdenseunet": (0.40, 0.93),
    "enetliverstage": (0.12, 0.45),
    "enetliverandtumourstage": (0.45, 0.93),
    "postprocess": (0.75, 0.82),
    "radiomicsfilter": (0.82, 0.88),
    "boundaryrefinement": (0.88, 0.93),
    "backtoinputgrid": (0.93, 0.95),
    "volumetry": (0.95, 0.96),
    "done": (0.96, 0.96),
}

#: What to do, by the engine's exit code (see ``LiverTumorSegLib.cli.EXIT_CODES``).
EXIT_HINTS = {
    1: "An unexpected problem stopped the segmentation. Please report it with the details below.",
    2: "The input volume cannot be segmented.",
    3: "The results could not be written. Check that the temporary folder (Application settings > "
       "General > Temporary directory) is writable and the disk is not full.",
    4: "The model could not be loaded. Clear the model folder (Advanced section) to use the bundled model, "
       "or give a complete model folder.",
    5: "The chosen device is not available: choose CPU in the Advanced section, or install a CUDA-enabled ONNX Runtime.",
    64: "The segmentation process was started with invalid options. Please report it with the details below.",
    130: "The segmentation was cancelled.",
}

#: Name of the input file the caller writes into the run's temporary folder.
INPUT_FILE = "input.nrrd"
#: Seconds between a cancel (SIGTERM, after which the engine removes its partial output and exits) and a kill.
FORCE_KILL_AFTER_SECONDS = 10.0


def stage_key(stage) -> str:
    """An engine stage name reduced to lower-case letters ('Post-process' -> 'postprocess')."""
    return "".join(character for character in str(stage).lower() if character.isalpha())


def parse_progress_line(line) -> Optional[dict]:
    """The progress record in one line of the engine's ``--progress json`` output, or None.

    Returns a dict with ``stage`` (str), ``fraction`` (0..1) and ``message`` (str).
    """
    text = str(line).strip()
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or "stage" not in record or "fraction" not in record:
        return None
    try:
        fraction = float(record["fraction"])
    except (TypeError, ValueError):
        return None
    if fraction != fraction:  # NaN
        fraction = 0.0
    fraction = min(max(fraction, 0.0), 1.0)
    stage = str(record["stage"])
    message = record.get("message")
    return {"stage": stage, "fraction": fraction, "message": str(message) if message else f"{stage} {fraction:.0%}"}


def overall_progress(stage, fraction, previous: float = 0.0) -> float:
    """Fraction (0..1) of the whole run after a progress record; never goes backwards."""
    span = STAGE_SPANS.get(stage_key(stage))
    if span is None:
        return previous
    start, stop = span
    return max(previous, start + (stop - start) * min(max(float(fraction), 0.0), 1.0))


def progress_text(stage, fraction) -> str:
    """Status text for a progress record."""
    if stage_key(stage) == "done":
        return "Writing the results..."
    name = str(stage)
    return f"{name[:1].upper()}{name[1:]}: {float(fraction):.0%}"


def engine_command_arguments(input_path, output_dir, bundle_path="", device="cpu", use_radiomics_filter=True,
                             use_boundary_refinement=True, per_lesion_segments=False, model="") -> List[str]:
    """Arguments after the Python executable for one ``segment`` run of the engine command line (``model``: a
    bundled or installed model by name, instead of a ``bundle_path``)."""
    arguments = ["-m", "LiverTumorSegLib.cli", "segment", str(input_path), "-o", str(output_dir), "--progress", "json"]
    if bundle_path:
        arguments += ["--bundle", str(bundle_path)]
    if model:
        arguments += ["--model", str(model)]
    if device == "cuda":
        arguments += ["--device", "cuda"]
    if not use_radiomics_filter:
        arguments.append("--no-radiomics")
    if not use_boundary_refinement:
        arguments.append("--no-refine")
    if per_lesion_segments:
        arguments.append("--per-lesion")
    return arguments


def engine_environment(base: dict, python_paths: Iterable = ()) -> dict:
    """Environment of the engine process: ``base`` with ``python_paths`` first on PYTHONPATH, unbuffered UTF-8 output."""
    environment = dict(base)
    paths = [str(path) for path in python_paths] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    environment["PYTHONUNBUFFERED"] = "1"
    environment["PYTHONIOENCODING"] = "utf-8"
    return environment


def python_launcher(folders: Iterable = (), name: str = "PythonSlicer") -> str:
    """Slicer's stand-alone Python launcher: on PATH, or in one of ``folders``."""
    found = shutil.which(name)
    if found:
        return found
    file_name = f"{name}.exe" if os.name == "nt" else name
    for folder in folders:
        if folder and (Path(folder) / file_name).is_file():
            return str(Path(folder) / file_name)
    raise LiverTumorSegError(f"Slicer's Python launcher ({name}) was not found. Reinstall 3D Slicer.")


def engine_warnings(output_lines: Iterable[str]) -> List[str]:
    """The engine's warnings ('warning: ...' lines), without the prefix."""
    return [line.strip()[len("warning:"):].strip() for line in output_lines if line.strip().startswith("warning:")]


def engine_errors(output_lines: Iterable[str]) -> List[str]:
    """The engine's error messages ('error: ...' lines), without the prefix."""
    return [line.strip()[len("error:"):].strip() for line in output_lines if line.strip().startswith("error:")]


def engine_error_message(output_lines: Sequence[str], exit_code: Optional[int]) -> str:
    """A message for the user about a failed run: what happened, what to do, and the engine's own words."""
    errors = engine_errors(output_lines)
    if exit_code is not None and exit_code < 0:
        hint = (f"The segmentation process was stopped by the operating system (signal {-exit_code}). This usually "
                "means it ran out of memory: close other programs, or crop the volume to the abdomen (Crop Volume "
                "module) and try again.")
    else:
        hint = EXIT_HINTS.get(exit_code, f"The segmentation failed (exit code {exit_code}).")
    if errors:
        return f"{hint}\n\n{errors[-1]}"
    tail = [line.rstrip() for line in output_lines if line.strip() and parse_progress_line(line) is None][-12:]
    return hint + ("\n\nLast output of the segmentation process:\n" + "\n".join(tail) if tail else "")


class EngineProcess:
    """A command in a child process of its own process group, its output (stdout and stderr merged) read by a thread.

    The owner collects the lines with :meth:`read_lines` in its own thread, so nothing touches Qt or MRML
    outside the main thread.
    """

    #: Seconds to wait for the end of the output after the process exited (a grandchild may hold the pipe).
    OUTPUT_GRACE_SECONDS = 5.0

    def __init__(self, command: Sequence, environment: Optional[dict] = None, working_directory=None):
        self.command = [str(part) for part in command]
        self.environment = environment
        self.working_directory = working_directory
        self.process = None
        self.lines: List[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._output_ended = False
        self._exit_seen_at = None
        self.cancel_requested_at: Optional[float] = None

    def start(self) -> None:
        options = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT,
                   "env": self.environment, "cwd": self.working_directory, "text": True, "encoding": "utf-8",
                   "errors": "replace", "bufsize": 1}
        if os.name == "nt":
            options["creationflags"] = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200)
                                        | getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000))
        else:
            options["start_new_session"] = True  # its own process group: cancel reaches the launcher's child too
        log.debug("starting %s", subprocess.list2cmdline(self.command))
        self.process = subprocess.Popen(self.command, **options)
        threading.Thread(target=self._read_output, name="LiverTumorSeg output", daemon=True).start()

    def _read_output(self) -> None:
        try:
            for line in self.process.stdout:
                self._queue.put(line.rstrip("\r\n"))
        finally:
            try:
                self.process.stdout.close()
            except OSError:
                pass
            self._queue.put(None)

    def read_lines(self, timeout: float = 0.0) -> List[str]:
        """Output lines printed since the last call; waits up to ``timeout`` seconds for the first."""
        lines = []
        try:
            item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            while True:
                if item is None:
                    self._output_ended = True
                else:
                    lines.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        self.lines.extend(lines)
        return lines

    @property
    def return_code(self) -> Optional[int]:
        return None if self.process is None else self.process.poll()

    def is_finished(self) -> bool:
        if self.process is None or self.process.poll() is None:
            return False
        if self._output_ended:
            return True
        if self._exit_seen_at is None:
            self._exit_seen_at = time.monotonic()
        return time.monotonic() - self._exit_seen_at > self.OUTPUT_GRACE_SECONDS

    def terminate(self, force: bool = False) -> None:
        """Stop the process and its children: SIGTERM to the group (the engine then exits cleanly), or SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.process.pid)], capture_output=True,
                               creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000), check=False)
            else:
                os.killpg(self.process.pid, signal.SIGKILL if force else signal.SIGTERM)
        except OSError as error:  # ProcessLookupError, PermissionError: it ended meanwhile
            log.debug("stopping the process: %s", error)

    def cancel(self) -> None:
        """Ask the process to stop (SIGTERM to its group), once; :meth:`kill_if_cancel_overdue` then kills it."""
        if self.cancel_requested_at is None:
            self.cancel_requested_at = time.monotonic()
            self.terminate()

    def kill_if_cancel_overdue(self) -> None:
        """SIGKILL a cancelled process still running :data:`FORCE_KILL_AFTER_SECONDS` after the cancel."""
        if self.cancel_requested_at is not None and time.monotonic() - self.cancel_requested_at > FORCE_KILL_AFTER_SECONDS:
            self.terminate(force=True)


@dataclass
class RunOutcome:
    """How a run ended: ``status`` "completed", "cancelled" or "failed", with the message for the user."""

    status: str
    exit_code: Optional[int]
    message: str = ""
    warnings: List[str] = field(default_factory=list)
    output: List[str] = field(default_factory=list)  # every line the engine printed
    elapsed_seconds: float = 0.0

    @property
    def succeeded(self) -> bool:
        return self.status == "completed"


#: ``progress(fraction of the whole run, status text, stage name)``
ProgressCallback = Callable[[float, str, str], None]


class EngineRun:
    """One ``segment`` run of the engine in a new temporary folder under ``temporary_root``.

    Write the input volume to :attr:`input_path`, call :meth:`start`, then :meth:`poll` until
    :meth:`is_finished`; :meth:`outcome` says how it ended and :attr:`output_folder` holds the results
    of a completed run until :meth:`close` removes the temporary folder.
    """

    def __init__(self, python_executable: str, options: Optional[dict] = None, temporary_root=None,
                 environment: Optional[dict] = None, working_directory=None):
        """``options``: the keyword arguments of :func:`engine_command_arguments` after the paths; an unknown
        device or a model folder that does not exist is refused here, before anything is written."""
        options = dict(options or {})
        if options.get("device", "cpu") not in ("cpu", "cuda"):
            raise UsageError(f"Unknown device '{options['device']}'; use 'cpu' or 'cuda'.")
        if options.get("bundle_path") and options.get("model"):
            raise UsageError("Give either a model folder or a model name, not both.")
        if options.get("bundle_path") and not Path(options["bundle_path"]).is_dir():
            raise BundleError(f"The model folder '{options['bundle_path']}' does not exist. Clear the field to use the "
                              "bundled model, or choose the folder that holds manifest.json.")
        root = Path(temporary_root or tempfile.gettempdir())
        root.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="LiverTumorSeg-", dir=root))
        self.input_path = self.folder / INPUT_FILE
        self.output_folder = self.folder / "result"
        command = [python_executable] + engine_command_arguments(self.input_path, self.output_folder, **options)
        self.engine = EngineProcess(command, environment, working_directory)
        self.progress = 0.0
        self.started_at = time.monotonic()

    def start(self) -> None:
        if not self.input_path.is_file():
            raise LiverTumorSegError(f"The input volume was not written to '{self.input_path}'. Check the free disk space "
                                     "and the temporary folder.")
        self.started_at = time.monotonic()
        self.engine.start()

    @property
    def elapsed_seconds(self) -> float:
        return time.monotonic() - self.started_at

    def poll(self, progress: Optional[ProgressCallback] = None, timeout: float = 0.0) -> None:
        """Read the engine's output; report progress (never backwards, not after a cancel); kill a cancelled
        run that did not stop within :data:`FORCE_KILL_AFTER_SECONDS`."""
        for line in self.engine.read_lines(timeout=timeout):
            record = parse_progress_line(line)
            if record is None:
                if line.strip():
                    log.info("%s", line)
                continue
            self.progress = overall_progress(record["stage"], record["fraction"], self.progress)
            if progress is not None and self.engine.cancel_requested_at is None:
                progress(self.progress, progress_text(record["stage"], record["fraction"]), record["stage"])
        self.engine.kill_if_cancel_overdue()

    def is_finished(self) -> bool:
        return self.engine.is_finished()

    def wait(self, progress: Optional[ProgressCallback] = None, timeout: Optional[float] = None) -> RunOutcome:
        """Poll until the run ends (cancelled after ``timeout`` seconds); return its outcome."""
        while not self.is_finished():
            if timeout is not None and self.elapsed_seconds > timeout and self.engine.cancel_requested_at is None:
                self.cancel()
            self.poll(progress, timeout=0.2)
        self.poll(progress)
        return self.outcome()

    def cancel(self) -> None:
        """Ask the engine to stop (it writes nothing after a cancel); the next polls kill it if it does not."""
        self.engine.cancel()

    def outcome(self) -> RunOutcome:
        """How the finished run ended."""
        lines, code = list(self.engine.lines), self.engine.return_code
        outcome = RunOutcome("failed", code, warnings=engine_warnings(lines), output=lines,
                             elapsed_seconds=self.elapsed_seconds)
        if self.engine.cancel_requested_at is not None:
            outcome.status, outcome.message = "cancelled", "The segmentation was cancelled; nothing was written."
        elif code != 0:
            outcome.message = engine_error_message(lines, code)
        elif not self.output_folder.is_dir():
            outcome.message = engine_error_message(lines + ["error: the engine ended without writing its outputs."], 1)
        else:
            outcome.status = "completed"
        return outcome

    def keep_outputs(self, folder) -> Path:
        """Copy the outputs of a completed run to the new folder ``folder`` (atomically); return it."""
        from .image_io import atomic_path

        with atomic_path(folder) as partial:
            shutil.copytree(self.output_folder, partial)
        return Path(folder)

    def close(self) -> None:
        """Stop the process if it still runs and remove the temporary folder."""
        if not self.engine.is_finished():
            self.engine.terminate(force=True)
        shutil.rmtree(self.folder, ignore_errors=True)
