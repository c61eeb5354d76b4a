"""The Slicer module's Logic without Qt: segmentation runs and model downloads in background processes, resection plans.

``LiverTumorSeg.py`` subclasses :class:`ModuleLogic` and adds what needs the application: Slicer's
paths, the Qt timer that calls :meth:`ModuleLogic.poll` while something runs (:meth:`startPolling`),
the views that show a result (:meth:`showResults`), the package installer and the DICOM database. The
scene comes with the volume node, so this runs on ``slicer-core`` in tests, with real engine processes.
Methods that scripts call are named as in Slicer's Logic classes (``process``, ``isRunning``, ...).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import model_selector
from . import process as engine
from . import slicer_dependencies as dependencies
from .errors import LiverTumorSegError
from .resection_planner import ResectionPlanner
from .scene_run import SceneRun, show_segments

log = logging.getLogger("LiverTumorSeg")


class ProcessingError(LiverTumorSegError):
    """The segmentation ran but failed (``wait=True`` mode); ``result`` has the details."""

    def __init__(self, result):
        super().__init__(result.message)
        self.result = result


class ModuleLogic:
    """One segmentation run and one model download at a time, each in a background process; resection plans.

    ``module_directory`` holds ``LiverTumorSegLib`` and ``Resources/requirements.txt``; the engine runs in
    ``python_executable``, else in Slicer's Python launcher found in ``launcher_folders``, with its
    temporary folders under ``temporary_root``. ``search_path`` is the Python path whose packages are checked.
    """

    def __init__(self, module_directory, launcher_folders: Sequence = (), temporary_root=None,
                 python_executable: Optional[str] = None, search_path: Optional[Sequence[str]] = None):
        self.module_directory = Path(module_directory)
        self.requirements_file = self.module_directory / "Resources" / "requirements.txt"
        self.launcher_folders, self.temporary_root = list(launcher_folders), temporary_root
        self.python_executable = python_executable
        self.search_path = sys.path if search_path is None else search_path
        self._run = None  # scene_run.SceneRun in progress
        self._completion = (True, None, False)  # (show the results, completed callback, waited for) of that run
        self._download = None  # (model_selector.ModelDownload in progress, its completed callback)
        self.resection = ResectionPlanner()

    def missingDependencies(self) -> list:
        """Requirement lines still to install into Slicer's Python (pyradiomics only when no radiomics package,
        e.g. the SlicerRadiomics extension's, is on its path)."""
        return dependencies.missing_requirements(self.requirements_file, self.search_path)

    cudaAvailable = staticmethod(dependencies.cuda_available)

    def isRunning(self) -> bool:
        return self._run is not None

    def isDownloading(self) -> bool:
        return self._download is not None

    def runningTemporaryFolder(self) -> Optional[Path]:
        """Temporary folder of the run in progress (removed when it ends), or None."""
        return None if self._run is None else self._run.run.folder

    def _engine(self, python_path: Sequence = ()) -> tuple:
        """Python executable and process options of an engine command (the module first on PYTHONPATH)."""
        python = self.python_executable or engine.python_launcher(self.launcher_folders)
        return python, dict(environment=engine.engine_environment(os.environ, [self.module_directory, *python_path]),
                            working_directory=str(self.module_directory))

    def process(self, inputVolume, outputSegmentation=None, volumetryTable=None, useRadiomicsFilter=True,
                useBoundaryRefinement=True, perLesionSegments=False, device="cpu", bundlePath="", wait=False,
                progressCallback=None, completedCallback=None, showResults=True, keepOutputFolder=None, modelName=""):
        """Segment ``inputVolume`` into ``outputSegmentation`` / ``volumetryTable`` (content replaced; None: new nodes)
        with the model folder ``bundlePath``, else the bundled or installed model ``modelName``, else the bundled one.

        ``wait``: return the :class:`.scene_run.SceneRunResult` (:class:`ProcessingError` when the run fails); else
        return None and call ``completedCallback(result)`` at the end, also after a failure or a cancel.
        ``progressCallback(fraction, text, stage)`` while running; ``keepOutputFolder`` receives a copy of the
        engine's outputs. The scene changes only when a run succeeds."""
        if self._run is not None:
            raise LiverTumorSegError("A segmentation is already running. Wait for it, or cancel it first.")
        dependencies.require_installed(self.requirements_file, self.search_path)
        model_options, model_folder = model_selector.model_for_run(modelName, bundlePath)
        radiomics = dependencies.radiomics_for_run(self.search_path, model_folder, useRadiomicsFilter)
        python, process_options = self._engine(radiomics.python_path)
        options = dict(device=device, use_radiomics_filter=useRadiomicsFilter, use_boundary_refinement=useBoundaryRefinement,
                       per_lesion_segments=perLesionSegments, **model_options)
        self._run = SceneRun(inputVolume.GetScene(), inputVolume, python, options, segmentation_node=outputSegmentation,
                             table_node=volumetryTable, keep_output_folder=keepOutputFolder, progress=progressCallback,
                             temporary_root=self.temporary_root, **process_options)
        self._completion = (showResults, completedCallback, wait)
        log.info("segmenting '%s'", inputVolume.GetName())
        if not wait:
            self.startPolling()
            return None
        self._run.run.wait(progressCallback)
        result = self._finish()
        if not result.succeeded:
            raise ProcessingError(result)
        return result

    def cancel(self) -> None:
        """Stop the run in progress; the scene stays as it was and the temporary files are removed."""
        if self._run is not None:
            log.info("cancelling the segmentation")
            self._run.run.cancel()

    def _finish(self):
        """End of a run: its :class:`.scene_run.SceneRunResult`, the results shown when it succeeded."""
        scene_run, self._run = self._run, None
        result = scene_run.finish()
        if result.succeeded and self._completion[0]:
            self.showResults(scene_run.input_volume, result.segmentation_node, result.table_node)
        return result

    def downloadModel(self, name: str, progressCallback=None, completedCallback: Optional[Callable] = None) -> None:
        """Download and install the model ``name`` of the model index (``livertumorseg models download``);
        ``progressCallback(fraction, text, stage)`` while it runs, ``completedCallback(outcome)`` (a
        :class:`.process.RunOutcome`) at the end."""
        if self._download is not None:
            raise LiverTumorSegError("A model is already being downloaded. Wait for it, or cancel it first.")
        python, process_options = self._engine()
        self._download = (model_selector.ModelDownload(python, name, progressCallback, **process_options), completedCallback)
        self.startPolling()

    def cancelDownload(self) -> None:
        """Stop the download in progress; nothing is installed, and the next download resumes where it stopped."""
        if self._download is not None:
            self._download[0].cancel()

    def poll(self) -> bool:
        """Read the progress of the run and the download, finish each that ended (then its completed callback);
        True while one of them still runs."""
        if self._run is not None and not self._completion[2] and self._run.poll():
            result = self._finish()
            if self._completion[1] is not None:
                self._completion[1](result)
        if self._download is not None and self._download[0].poll():
            (download, completed), self._download = self._download, None
            outcome = download.finish()
            if completed is not None:
                completed(outcome)
        return self.isRunning() or self.isDownloading()

    def startPolling(self) -> None:
        """Something started: call :meth:`poll` from now on until it returns False (the module: a Qt timer)."""

    def showResults(self, volumeNode, segmentationNode, tableNode) -> None:
        """Show a run's results (the module also arranges Slicer's views): segments filled, surfaces in 3D."""
        show_segments(segmentationNode)

    def planResection(self, parameterNode, reuseLabels=False):
        """Plan the resection the parameter node describes (segmentation, CT, plane or "Resected" segment, liver
        state); the planner's PlannedResection, or the engine's InputError with a message for the user."""
        return self.resection.plan_choice(
            parameterNode.outputSegmentation, parameterNode.inputVolume, method=parameterNode.resectionMethod,
            plane_node=parameterNode.resectionPlane, flip_plane=parameterNode.flipResectionPlane,
            liver_state=parameterNode.liverState, reuse_labels=reuseLabels)
