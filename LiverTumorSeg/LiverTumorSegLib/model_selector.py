"""The Slicer module's model selector: the models it offers, the model a run uses, downloads in the background.

The selector lists the bundled, installed and downloadable models of :mod:`.model_registry`, each with
its description, training data and licence. A model is downloaded on demand by running
``livertumorseg models download NAME --progress json`` in a background process (:class:`ModelDownload`),
as a segmentation runs in :mod:`.process`: progress, cancel, a message by exit code, and Slicer stays
responsive. The chosen model reaches the engine as ``segment --model NAME``. No Qt and no ``slicer``
here, so all of it is tested outside Slicer with a real HTTP server and real processes. The registry (and
with it numpy and SimpleITK) is imported only when models are listed, so Slicer loads the module fast.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .errors import BundleError
from .process import (EngineProcess, ProgressCallback, RunOutcome, engine_errors,
                      parse_progress_line)

log = logging.getLogger("LiverTumorSeg")

#: What to do when a download fails, by the command line's exit code (see ``LiverTumorSegLib.cli.EXIT_CODES``).
DOWNLOAD_HINTS = {
    3: "The model could not be saved in the models folder. Check that the folder is writable and the disk is not "
       "full (the environment variable LIVERTUMORSEG_MODELS_DIR chooses another folder).",
    4: "The model could not be downloaded or installed.",
}


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the selector."""

    name: str
    text: str  # what the selector shows
    details: str  # description, training data and licence (:func:`.model_registry.describe`)
    installed: bool  # a run can use it now (bundled or installed)
    downloadable: bool  # the index offers it, or a newer version of it, for download


def model_choices(directory=None) -> Tuple[List[ModelChoice], str]:
    """The selector's entries in the registry's order (the bundled model first), and a problem for the user ("" when
    none): the extra model index (``$LIVERTUMORSEG_MODEL_INDEX``) could not be read (then the shipped index's and
    the installed models are offered), or a package of the registry is not installed yet (then none are)."""
    from .model_registry import describe, list_models

    try:
        models, problem = list_models(directory=directory), ""
    except BundleError as error:
        models, problem = list_models(index="", directory=directory), str(error)  # index "": the shipped one only
    except ImportError as error:  # Slicer before the first Apply installs the engine's packages (platformdirs)
        return [], (f"The models can be listed once the Python packages of the segmentation are installed (press Apply "
                    f"once): {error}.")
    choices = []
    for model in models:
        if model.status == "available":
            size = f", {model.size / 1e6:.0f} MB" if model.size else ""
            state = f"download{size}"
        else:
            state = model.status
        update = f", version {model.index_version} available" if model.index_version else ""
        choices.append(ModelChoice(model.name, f"{model.name} {model.version} ({state}{update})", describe(model),
                                   installed=model.status != "available",
                                   downloadable=model.status == "available" or bool(model.index_version)))
    return choices, problem


def model_for_run(model_name: str = "", bundle_path: str = "", directory=None) -> Tuple[Dict[str, str], Optional[str]]:
    """The engine options that choose the model, and that model's folder (None: the bundled model).

    A model folder (``bundle_path``, the Advanced section) wins over the selector's ``model_name``; with
    neither the engine uses the bundled model. A model that is not installed raises BundleError saying
    to download it.
    """
    if bundle_path:
        return {"bundle_path": str(bundle_path)}, str(bundle_path)
    if not model_name:
        return {}, None
    from .model_registry import resolve_model

    try:
        folder = resolve_model(model_name, directory)
    except BundleError:
        raise BundleError(f"The model '{model_name}' is not installed. Press Download next to the model selector "
                          "(Inputs section), or choose another model.") from None
    return {"model": model_name}, str(folder)


def download_command_arguments(name: str) -> List[str]:
    """Arguments after the Python executable that download and install the model ``name`` of the index."""
    return ["-m", "LiverTumorSegLib.cli", "models", "download", str(name), "--progress", "json"]


#: The stage name a download reports to its ``progress(fraction, text, stage)`` callback.
DOWNLOAD_STAGE = "download"


class ModelDownload:
    """``livertumorseg models download NAME`` in a background process.

    Call :meth:`poll` until it returns True (or :meth:`wait`), then :meth:`finish` says how it ended. The
    models folder and the extra index are those of the environment the process gets (``$LIVERTUMORSEG_*``).
    A cancelled download installs nothing and keeps what has arrived, so the next download resumes.
    """

    def __init__(self, python_executable: str, name: str, progress: Optional[ProgressCallback] = None,
                 environment: Optional[dict] = None, working_directory=None):
        self.name = name
        self.progress = progress
        self.fraction = 0.0
        self.started_at = time.monotonic()
        self.engine = EngineProcess([python_executable] + download_command_arguments(name), environment,
                                    working_directory)
        self.engine.start()

    def poll(self, timeout: float = 0.0) -> bool:
        """Report the download's progress (never backwards, not after a cancel); kill a cancelled download that
        did not stop within :data:`.process.FORCE_KILL_AFTER_SECONDS`. True once the process has ended."""
        for line in self.engine.read_lines(timeout=timeout):
            record = parse_progress_line(line)
            if record is None:
                if line.strip():
                    log.info("%s", line)
                continue
            self.fraction = max(self.fraction, record["fraction"])
            if self.progress is not None and self.engine.cancel_requested_at is None:
                self.progress(self.fraction, f"Downloading {self.name}: {self.fraction:.0%}", DOWNLOAD_STAGE)
        self.engine.kill_if_cancel_overdue()
        return self.engine.is_finished()

    def wait(self, timeout: Optional[float] = None) -> RunOutcome:
        """Poll until the download ends (cancelled after ``timeout`` seconds); return :meth:`finish`."""
        while not self.poll(timeout=0.2):
            if timeout is not None and time.monotonic() - self.started_at > timeout:
                self.cancel()
        return self.finish()

    def cancel(self) -> None:
        """Ask the download to stop (SIGTERM: the command line stops and installs nothing)."""
        self.engine.cancel()

    def finish(self) -> RunOutcome:
        """How the ended download went: "completed", "cancelled" or "failed" with the message for the user."""
        self.poll()
        lines, code = list(self.engine.lines), self.engine.return_code
        outcome = RunOutcome("failed", code, output=lines, elapsed_seconds=time.monotonic() - self.started_at)
        if code == 0:  # also when a cancel came too late to stop it
            outcome.status, outcome.message = "completed", f"The model '{self.name}' is installed."
        elif self.engine.cancel_requested_at is not None:
            outcome.status = "cancelled"
            outcome.message = (f"The download of '{self.name}' was cancelled; nothing was installed. Downloading it "
                               "again resumes where it stopped.")
        else:
            errors = engine_errors(lines)
            hint = DOWNLOAD_HINTS.get(code, f"The download of '{self.name}' failed (exit code {code}).")
            outcome.message = hint + (f"\n\n{errors[-1]}" if errors else "")
        log.info("model download %s: %s", self.name, outcome.status)
        return outcome
