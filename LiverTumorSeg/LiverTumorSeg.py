"""3D Slicer module: automatic liver and liver-tumour segmentation of contrast-enhanced CT, with volumetry.

Slicer glue only. The engine (``LiverTumorSegLib``, next to this file) does the work in a background
process (``PythonSlicer -m LiverTumorSegLib.cli segment ...``), so Slicer stays responsive; this module
writes the input volume to a temporary file, starts the process, shows its progress, lets the user
cancel, and turns the engine's outputs into MRML nodes through the engine's ``mrml_nodes`` adapter.
"""

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import ctk
import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer before 5.4

    def _(text):
        return text

    def translate(context, text):
        return text


DOCUMENTATION_URL = "https://github.com/LiverTumorSeg/SlicerLiverTumorSeg#readme"

# ------------------------------------------------------------------------------------------------
# Engine command line: arguments, progress lines and error messages.
# Plain functions on the standard library only (Testing/test_slicer_module.py checks them against the
# engine's real command-line parser and progress output).
# ------------------------------------------------------------------------------------------------

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


def stageKey(stage):
    """An engine stage name reduced to lower-case letters ('Post-process' -> 'postprocess')."""
    return "".join(character for character in str(stage).lower() if character.isalpha())


def parseProgressLine(line):
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


def overallProgress(stage, fraction, previous=0.0):
    """Fraction (0..1) of the whole run after a progress record; never goes backwards."""
    span = STAGE_SPANS.get(stageKey(stage))
    if span is None:
        return previous
    start, stop = span
    return max(previous, start + (stop - start) * min(max(float(fraction), 0.0), 1.0))


def progressText(stage, fraction):
    """Status text for a progress record."""
    if stageKey(stage) == "done":
        return "Writing the results..."
    name = str(stage)
    return f"{name[:1].upper()}{name[1:]}: {float(fraction):.0%}"


def engineCommandArguments(inputPath, outputDir, bundlePath="", device="cpu", useRadiomicsFilter=True,
                           useBoundaryRefinement=True, perLesionSegments=False):
    """Arguments after the Python executable for one ``segment`` run of the engine command line."""
    arguments = ["-m", "LiverTumorSegLib.cli", "segment", str(inputPath), "-o", str(outputDir), "--progress", "json"]
    if bundlePath:
        arguments += ["--bundle", str(bundlePath)]
    if device == "cuda":
        arguments += ["--device", "cuda"]
    if not useRadiomicsFilter:
        arguments.append("--no-radiomics")
    if not useBoundaryRefinement:
        arguments.append("--no-refine")
    if perLesionSegments:
        arguments.append("--per-lesion")
    return arguments


def engineWarnings(outputLines):
    """The engine's warnings ('warning: ...' lines), without the prefix."""
    return [line.strip()[len("warning:"):].strip() for line in outputLines if line.strip().startswith("warning:")]


def engineErrorMessage(outputLines, exitCode):
    """A message for the user about a failed run: what happened, what to do, and the engine's own words."""
    errors = [line.strip()[len("error:"):].strip() for line in outputLines if line.strip().startswith("error:")]
    if exitCode is not None and exitCode < 0:
        hint = (f"The segmentation process was stopped by the operating system (signal {-exitCode}). This usually "
                "means it ran out of memory: close other programs, or crop the volume to the abdomen (Crop Volume "
                "module) and try again.")
    else:
        hint = EXIT_HINTS.get(exitCode, f"The segmentation failed (exit code {exitCode}).")
    if errors:
        return f"{hint}\n\n{errors[-1]}"
    tail = [line.rstrip() for line in outputLines if line.strip() and parseProgressLine(line) is None][-12:]
    return hint + ("\n\nLast output of the segmentation process:\n" + "\n".join(tail) if tail else "")


#: Parameters bound to their widgets in code rather than by a SlicerParameterName in the .ui (the
#: parameter node wrapper has no connector for these types): parameter name -> widget name.
MANUALLY_BOUND_PARAMETERS = {
    "device": "deviceComboBox",  # the GPU entry exists only where ONNX Runtime has CUDA
    "bundlePath": "bundlePathLineEdit",  # str ("" = the bundled model); ctkPathLineEdit binds only pathlib.Path
}

#: Liver states of the resection planner (keys of ``LiverTumorSegLib.resection.FLR_THRESHOLDS_PERCENT``)
#: with the minimum future liver remnant each needs, in the order of the liver-state combo box.
LIVER_STATES = (("normal", 20), ("chemotherapy", 30), ("cirrhosis", 40))
#: Wait this long after the last move of the resection plane before the plan is computed again.
RESECTION_UPDATE_DELAY_MS = 300

# ------------------------------------------------------------------------------------------------
# Module
# ------------------------------------------------------------------------------------------------


class LiverTumorSeg(ScriptedLoadableModule):
    """Module description shown in Slicer (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Liver Tumor Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LiverTumorSeg developers"]
        self.parent.helpText = _(
            "Automatic segmentation of the liver and liver tumours in contrast-enhanced (portal-venous) abdominal CT, "
            "with volumetry for surgical planning: liver volume, number of lesions, per-lesion volume and diameters, "
            "and tumour burden.<br><br>"
            "Select the CT volume and press <b>Apply</b>. The result is a segmentation with the segments "
            "<i>Liver</i> and <i>Liver tumor</i> (optionally one segment per lesion) and a volumetry table. "
            "Processing runs in the background; press <b>Cancel</b> to stop it. The first run installs the Python "
            "packages the engine needs (ONNX Runtime, scikit-image, PyRadiomics) after asking.<br><br>"
            "<b>Resection planning</b>: cut the segmented liver with a Markups plane (its normal points into the part "
            "that is resected) or a segment named <i>Resected</i>, and get the remnant and resected volumes, the future "
            "liver remnant (FLR) against the threshold of the liver state, and each tumour's margin to the cut, as a "
            "table, <i>Liver remnant</i> / <i>Liver resected</i> segments and a printable report.<br><br>"
            "The bundled demonstration model was trained on synthetic CT phantoms: use a model trained on real data "
            "(Advanced > Model folder) for real scans. For research use only, not for clinical decisions.<br><br>"
            f'See the <a href="{DOCUMENTATION_URL}">documentation</a> for details.'
        )
        self.parent.acknowledgementText = _(
            "This module implements the pipeline of: X. Li, W. Jia, K. Sharipov, A. Ruslan, L. Mazbutdzhon, "
            "I. Shuhratjon and Y. Zheng, <i>Precise liver tumor segmentation in CT using a hybrid deep "
            "learning&ndash;radiomics framework</i>, preprint, December 2025 (cascaded 2.5D attention dense U-Net, "
            "radiomics-based false-positive filtering and 3D CNN boundary refinement). It is an independent "
            "implementation, not the authors' code. Labels follow the LiTS benchmark conventions."
        )


# ------------------------------------------------------------------------------------------------
# Parameter node
# ------------------------------------------------------------------------------------------------


@parameterNodeWrapper
class LiverTumorSegParameterNode:
    """What the user chose in the module.

    inputVolume - contrast-enhanced abdominal CT (HU).
    outputSegmentation - segmentation that receives the result (a new one is created when empty).
    volumetryTable - table that receives the volumetry (a new one is created when empty).
    useRadiomicsFilter - drop candidate lesions that the radiomics classifier rejects.
    useBoundaryRefinement - relabel the voxels around each tumour boundary with the 3D CNN.
    perLesionSegments - one segment per lesion ("Liver tumor 1..n") instead of one "Liver tumor".
    device - "cpu", or "cuda" where ONNX Runtime has CUDA.
    bundlePath - model bundle folder; empty for the bundled model.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    useRadiomicsFilter: bool = True
    useBoundaryRefinement: bool = True
    perLesionSegments: bool = False
    device: Annotated[str, Choice(["cpu", "cuda"])] = "cpu"
    bundlePath: str = ""
    volumetryTable: vtkMRMLTableNode


# ------------------------------------------------------------------------------------------------
# Widget
# ------------------------------------------------------------------------------------------------


class LiverTumorSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._resectionPlane = None
        self._resectionTimer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LiverTumorSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LiverTumorSegLogic()

        self.ui.bundlePathLineEdit.filters = ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Drives | ctk.ctkPathLineEdit.Readable
        self.ui.bundlePathLineEdit.currentPath = ""
        self.ui.progressBar.setRange(0, 1000)
        self.ui.progressBar.hide()
        self._populateDevices()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.bundlePathLineEdit.connect("currentPathChanged(QString)", self.onBundlePathChanged)
        self._setupResectionPlanning()

        self.initializeParameterNode()
        self._setStatus(_("Select a contrast-enhanced CT volume and press Apply."))

    def cleanup(self):
        """Called when the application closes or the module is reloaded: stop a running segmentation."""
        if self.logic is not None and self.logic.isRunning():
            self.logic.cancel()
        if self._resectionTimer is not None:
            self._resectionTimer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)  # a run in progress goes on; its results still reach the parameter node

    def onSceneStartClose(self, caller, event):
        if self.logic is not None and self.logic.isRunning():
            self.logic.cancel()  # its input is about to disappear
        self.setParameterNode(None)
        self._observeResectionPlane(None)
        if self._resectionTimer is not None:
            self._resectionTimer.stop()
        self.logic.clearResection()
        self.ui.saveResectionReportButton.enabled = False

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = self.logic.firstCtCandidate()
            if volume is not None:
                self._parameterNode.inputVolume = volume

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" dynamic property in the .ui are bound here; the device and
            # the model folder (MANUALLY_BOUND_PARAMETERS) are synchronised in _updateGui and their slots.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._updateGui()

    # -------------------------------------------------------------------------------- GUI state

    def _populateDevices(self):
        combo = self.ui.deviceComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("CPU"), "cpu")
        if self.logic.cudaAvailable():
            combo.addItem(_("GPU (CUDA)"), "cuda")
            combo.toolTip = _("Where the networks run. The GPU is much faster on large volumes.")
        else:
            combo.toolTip = _("Where the networks run. A GPU is offered when ONNX Runtime with CUDA support "
                              "(the onnxruntime-gpu package) is installed in Slicer's Python and a CUDA GPU is present.")
        combo.blockSignals(wasBlocked)
        self._updateGui()

    def _updateGui(self, caller=None, event=None):
        if not hasattr(self, "ui"):
            return
        running = self.logic is not None and self.logic.isRunning()
        parameterNode = self._parameterNode
        hasInput = bool(parameterNode and parameterNode.inputVolume)

        for section in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton,
                        self.ui.advancedCollapsibleButton, self.ui.resectionCollapsibleButton):
            section.enabled = not running
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the segmentation; the scene is left unchanged.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Apply")
            self.ui.applyButton.enabled = hasInput
            self.ui.applyButton.toolTip = (_("Segment the liver and liver tumours in the input volume.") if hasInput
                                           else _("Select an input CT volume first."))

        if parameterNode is None:
            return
        combo = self.ui.deviceComboBox
        index = combo.findData(parameterNode.device)
        wasBlocked = combo.blockSignals(True)
        combo.currentIndex = index if index >= 0 else 0
        combo.blockSignals(wasBlocked)

        pathEdit = self.ui.bundlePathLineEdit
        if pathEdit.currentPath != parameterNode.bundlePath:
            wasBlocked = pathEdit.blockSignals(True)
            pathEdit.currentPath = parameterNode.bundlePath
            pathEdit.blockSignals(wasBlocked)

    def onDeviceChanged(self, index):
        if self._parameterNode is None or index < 0:
            return
        device = self.ui.deviceComboBox.itemData(index)
        if device and device != self._parameterNode.device:
            self._parameterNode.device = device

    def onBundlePathChanged(self, path):
        if self._parameterNode is not None and self._parameterNode.bundlePath != path:
            self._parameterNode.bundlePath = path

    def _setStatus(self, text):
        self.ui.statusLabel.text = text

    # ------------------------------------------------------------------------ resection planning

    def _setupResectionPlanning(self):
        combo = self.ui.liverStateComboBox
        combo.clear()
        names = {"normal": _("Normal liver"), "chemotherapy": _("After chemotherapy"), "cirrhosis": _("Cirrhosis")}
        for state, threshold in LIVER_STATES:
            combo.addItem(_("{state} (FLR \u2265 {threshold} %)").format(state=names[state], threshold=threshold), state)
        self._resectionTimer = qt.QTimer()
        self._resectionTimer.setSingleShot(True)
        self._resectionTimer.setInterval(RESECTION_UPDATE_DELAY_MS)
        self._resectionTimer.connect("timeout()", lambda: self.onUpdateResection(automatic=True))
        self.ui.resectionPlaneSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onResectionPlaneChanged)
        self.ui.resectionPlaneRadioButton.connect("toggled(bool)", self._onResectionChoiceChanged)
        self.ui.resectionFlipCheckBox.connect("toggled(bool)", lambda checked: self._scheduleResectionUpdate())
        self.ui.liverStateComboBox.connect("currentIndexChanged(int)", lambda index: self._scheduleResectionUpdate())
        self.ui.updateResectionButton.connect("clicked(bool)", lambda checked=False: self.onUpdateResection())
        self.ui.saveResectionReportButton.connect("clicked(bool)", self.onSaveResectionReport)
        self._onResectionChoiceChanged()

    def _usePlane(self):
        return self.ui.resectionPlaneRadioButton.checked

    def _onResectionChoiceChanged(self, checked=None):
        usePlane = self._usePlane()
        self.ui.resectionPlaneSelector.enabled = usePlane
        self.ui.resectionFlipCheckBox.enabled = usePlane
        self._scheduleResectionUpdate()

    def onResectionPlaneChanged(self, node):
        self._observeResectionPlane(node)
        self._scheduleResectionUpdate()

    def _observeResectionPlane(self, node):
        """Recompute the plan (after a short delay) whenever the plane, its points or its transform change."""
        events = (vtk.vtkCommand.ModifiedEvent, slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
                  slicer.vtkMRMLTransformableNode.TransformModifiedEvent)
        if self._resectionPlane is not None:
            for event in events:
                self.removeObserver(self._resectionPlane, event, self._onResectionPlaneModified)
        self._resectionPlane = node
        if node is not None:
            for event in events:
                self.addObserver(node, event, self._onResectionPlaneModified)

    def _onResectionPlaneModified(self, caller=None, event=None):
        if self._usePlane():
            self._scheduleResectionUpdate()

    def _scheduleResectionUpdate(self):
        """Restart the single-shot timer: a plane being dragged is planned once it rests for a moment."""
        if self._resectionTimer is None or (self.logic is not None and self.logic.isRunning()):
            return
        if self._usePlane() and self.ui.resectionPlaneSelector.currentNode() is None:
            return
        self._resectionTimer.start()

    def onUpdateResection(self, automatic=False):
        """Plan the resection with the current choices; errors go to the result label (and a dialog when asked)."""
        from LiverTumorSegLib.errors import InputError
        from LiverTumorSegLib.resection_nodes import RESECTED_SEGMENT_NAME, find_segment_id, summary_text

        parameterNode = self._parameterNode or self.logic.getParameterNode()
        segmentationNode, referenceVolume = parameterNode.outputSegmentation, parameterNode.inputVolume
        label = self.ui.resectionResultLabel
        if segmentationNode is None or referenceVolume is None:
            label.text = _("Select the CT volume and its output segmentation (segment the liver first).")
            return None
        planeNode, segmentId = None, None
        if self._usePlane():
            planeNode = self.ui.resectionPlaneSelector.currentNode()
            if planeNode is None:
                label.text = _("Choose or create a resection plane.")
                return None
        else:
            segmentId = find_segment_id(segmentationNode, RESECTED_SEGMENT_NAME)
            if segmentId is None:
                label.text = _('The output segmentation has no segment named "{name}". Draw the part to resect as '
                               "such a segment in the Segment Editor, or choose a plane.").format(name=RESECTED_SEGMENT_NAME)
                return None
        combo = self.ui.liverStateComboBox
        liverState = combo.itemData(combo.currentIndex) or "normal"
        try:
            with slicer.util.WaitCursor():
                plan = self.logic.planResection(
                    segmentationNode, referenceVolume, planeNode=planeNode, resectedSegmentId=segmentId,
                    liverState=liverState, flipPlane=self.ui.resectionFlipCheckBox.checked, reuseLabels=automatic)
        except InputError as error:
            label.text = str(error)
            self.ui.saveResectionReportButton.enabled = False
            return None
        except Exception as error:
            logging.exception("LiverTumorSeg: resection planning failed")
            label.text = _("The resection could not be planned: {error}").format(error=error)
            self.ui.saveResectionReportButton.enabled = False
            if not automatic:
                slicer.util.errorDisplay(label.text, windowTitle=_("Resection planning"))
            return None
        label.text = summary_text(plan.result)
        self.ui.saveResectionReportButton.enabled = True
        return plan

    def onSaveResectionReport(self):
        from LiverTumorSegLib.resection_nodes import report_folder

        if self.logic.lastResection is None:
            return
        start = slicer.mrmlScene.GetRootDirectory() or str(Path.home())
        parent = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Folder for the planning report (a new subfolder is created in it)"), start)
        if not parent:
            return
        with slicer.util.tryWithErrorDisplay(_("The planning report could not be written."), waitCursor=True):
            folder = self.logic.saveResectionReport(report_folder(parent, self.logic.lastResection.title))
            self.ui.resectionResultLabel.text = self.ui.resectionResultLabel.text + "\n" + _(
                "Report saved in {folder}").format(folder=folder)

    # ------------------------------------------------------------------------------- processing

    def onApplyButton(self):
        if self.logic.isRunning():
            self.logic.cancel()
            self._setStatus(_("Cancelling..."))
            return
        parameterNode = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("The Python packages that the segmentation needs could not be installed.")):
            if not self._ensureDependencies():
                return
        with slicer.util.tryWithErrorDisplay(_("The segmentation could not be started."), waitCursor=True):
            device = parameterNode.device
            if device == "cuda" and not self.logic.cudaAvailable():
                device = "cpu"
            self.ui.progressBar.value = 0
            self.ui.progressBar.show()
            self._setStatus(_("Starting..."))
            try:
                self.logic.process(
                    parameterNode.inputVolume,
                    parameterNode.outputSegmentation,
                    parameterNode.volumetryTable,
                    useRadiomicsFilter=parameterNode.useRadiomicsFilter,
                    useBoundaryRefinement=parameterNode.useBoundaryRefinement,
                    perLesionSegments=parameterNode.perLesionSegments,
                    device=device,
                    bundlePath=parameterNode.bundlePath,
                    wait=False,
                    progressCallback=self._onProgress,
                    completedCallback=self._onCompleted,
                )
            except Exception:
                self.ui.progressBar.hide()
                self._setStatus(_("The segmentation could not be started."))
                raise
            finally:
                self._updateGui()

    def _ensureDependencies(self):
        """Check the engine's Python packages; offer to install missing ones. True when all are there."""
        missing = self.logic.missingDependencies()
        if not missing:
            return True
        text = _(
            "Liver Tumor Segmentation needs these Python packages, which are not installed in Slicer yet:\n\n"
            "    {packages}\n\n"
            "Install them now? This downloads about 100 MB and takes a few minutes; Slicer is busy meanwhile."
        ).format(packages=", ".join(missing))
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Install Python packages")):
            self._setStatus(_("The required Python packages are not installed; press Apply again to install them."))
            return False
        self._setStatus(_("Installing Python packages..."))
        slicer.app.processEvents()
        with slicer.util.WaitCursor():
            self.logic.installDependencies()
        self._populateDevices()
        return True

    def _onProgress(self, fraction, text, stage):
        self.ui.progressBar.value = int(round(1000 * fraction))
        self._setStatus(text)
        if stage == "import":  # loading into the scene blocks the event loop: paint the message now
            self.ui.progressBar.repaint()
            self.ui.statusLabel.repaint()

    def _onCompleted(self, result):
        self.ui.progressBar.hide()
        self._updateGui()
        if result.status == "completed":
            volumetry = result.volumetry or {}
            self._setStatus(_("Done in {seconds:.0f} s: liver {liver:.0f} mL, {count} lesion(s), tumour burden {burden:.1f} %.").format(
                seconds=result.elapsedSeconds, liver=volumetry.get("liver_volume_ml", 0.0),
                count=volumetry.get("lesion_count", 0), burden=volumetry.get("tumour_burden_percent", 0.0)))
            parameterNode = self.logic.getParameterNode()  # also when the module is not shown now
            parameterNode.outputSegmentation = result.segmentationNode
            parameterNode.volumetryTable = result.tableNode
            if result.warnings:
                slicer.util.warningDisplay("\n\n".join(result.warnings), windowTitle=_("Check the segmentation"))
        elif result.status == "cancelled":
            self._setStatus(_("Cancelled. The scene was not changed."))
        else:
            self._setStatus(_("The segmentation failed."))
            slicer.util.errorDisplay(result.message, windowTitle=_("Liver Tumor Segmentation"),
                                     detailedText="\n".join(result.output[-200:]))


# ------------------------------------------------------------------------------------------------
# Logic
# ------------------------------------------------------------------------------------------------


class LiverTumorSegError(RuntimeError):
    """A problem the user can act on; the message says what to do."""


class LiverTumorSegProcessingError(LiverTumorSegError):
    """The segmentation ran but failed (``wait=True`` mode); ``result`` has the details."""

    def __init__(self, result):
        super().__init__(result.message)
        self.result = result


@dataclass
class LiverTumorSegResult:
    """Outcome of one segmentation run."""

    status: str  # "completed", "cancelled" or "failed"
    message: str = ""
    segmentationNode: Any = None
    tableNode: Any = None
    volumetry: Optional[dict] = None
    labels: Any = None  # engine Image (0/1/2 on the input grid) of a completed run
    warnings: list = field(default_factory=list)
    exitCode: Optional[int] = None
    elapsedSeconds: float = 0.0
    output: list = field(default_factory=list)  # every line the engine printed

    @property
    def succeeded(self):
        return self.status == "completed"


class EngineProcess:
    """The engine command line in a child process of its own process group.

    A thread reads its output (stdout and stderr merged) into a queue; the owner collects the lines with
    :meth:`readLines` in its own thread, so nothing touches Qt or MRML outside the main thread.
    """

    #: Seconds to wait for the end of the output after the process exited (a grandchild may hold the pipe).
    OUTPUT_GRACE_SECONDS = 5.0

    def __init__(self, command, environment=None, workingDirectory=None):
        self.command = [str(part) for part in command]
        self.environment = environment
        self.workingDirectory = workingDirectory
        self.process = None
        self.lines = []
        self._queue = queue.Queue()
        self._outputEnded = False
        self._exitSeenAt = None
        self._reader = None

    def start(self):
        options = {
            "stdin": subprocess.DEVNULL,
            "stdout": subprocess.PIPE,
            "stderr": subprocess.STDOUT,
            "env": self.environment,
            "cwd": self.workingDirectory,
            "text": True,
            "encoding": "utf-8",
            "errors": "replace",
            "bufsize": 1,
        }
        if os.name == "nt":
            options["creationflags"] = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200)
                                        | getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000))
        else:
            options["start_new_session"] = True  # its own process group: cancel reaches the launcher's child too
        logging.debug("LiverTumorSeg: starting %s", subprocess.list2cmdline(self.command))
        self.process = subprocess.Popen(self.command, **options)
        self._reader = threading.Thread(target=self._readOutput, name="LiverTumorSeg output", daemon=True)
        self._reader.start()

    def _readOutput(self):
        try:
            for line in self.process.stdout:
                self._queue.put(line.rstrip("\r\n"))
        finally:
            try:
                self.process.stdout.close()
            except OSError:
                pass
            self._queue.put(None)

    def readLines(self, timeout=0.0):
        """Output lines printed since the last call; waits up to ``timeout`` seconds for the first."""
        lines = []
        try:
            item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            while True:
                if item is None:
                    self._outputEnded = True
                else:
                    lines.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        self.lines.extend(lines)
        return lines

    @property
    def returnCode(self):
        return None if self.process is None else self.process.poll()

    def isFinished(self):
        if self.process is None or self.process.poll() is None:
            return False
        if self._outputEnded:
            return True
        if self._exitSeenAt is None:
            self._exitSeenAt = time.monotonic()
        return time.monotonic() - self._exitSeenAt > self.OUTPUT_GRACE_SECONDS

    def terminate(self, force=False):
        """Stop the process and its children: SIGTERM to the group (the engine then exits cleanly), or SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.process.pid)], capture_output=True,
                               creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000), check=False)
            else:
                os.killpg(self.process.pid, signal.SIGKILL if force else signal.SIGTERM)
        except (ProcessLookupError, PermissionError, OSError) as error:
            logging.debug("LiverTumorSeg: stopping the process: %s", error)


@dataclass
class ResectionPlanState:
    """The last resection plan with what its report needs, and the nodes that show it."""

    plan: Any
    labels: Any
    geometry: Any
    title: str
    inputs: dict
    tableNode: Any = None
    segmentationNode: Any = None


@dataclass
class _Run:
    """State of the run in progress."""

    engine: EngineProcess
    temporaryFolder: Path
    outputFolder: Path
    inputVolume: Any
    outputSegmentation: Any
    volumetryTable: Any
    perLesionSegments: bool
    keepOutputFolder: Optional[Path]
    showResults: bool
    progressCallback: Optional[Callable] = None
    completedCallback: Optional[Callable] = None
    startTime: float = field(default_factory=time.monotonic)
    progress: float = 0.0
    cancelRequested: bool = False


class LiverTumorSegLogic(ScriptedLoadableModuleLogic):
    """Runs the engine on a volume node and brings the results into the scene.

    For scripts::

        logic = LiverTumorSegLogic()
        logic.installDependencies()  # once, if logic.missingDependencies() lists packages
        result = logic.process(volumeNode, wait=True)
        result.segmentationNode, result.tableNode, result.volumetry
    """

    #: Import name -> pip requirement of the engine's packages that Slicer does not ship.
    REQUIRED_PACKAGES = {
        "onnxruntime": "onnxruntime",
        "skimage": "scikit-image",
        "radiomics": "pyradiomics-bhklab",
        "matplotlib": "matplotlib",
    }
    POLL_INTERVAL_MS = 200
    FORCE_KILL_AFTER_MS = 10000

    _dependenciesChecked = False
    _cudaAvailable = None

    #: Node reference roles on the segmentation that link its resection plan table and segmentation.
    RESECTION_TABLE_REFERENCE = "LiverTumorSegResectionTable"
    RESECTION_SEGMENTATION_REFERENCE = "LiverTumorSegResectionSegmentation"

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._run = None
        self._timer = None
        self.lastResection = None
        self._resectionLabels = None

    def getParameterNode(self):
        return LiverTumorSegParameterNode(super().getParameterNode())

    # ----------------------------------------------------------------------------- environment

    @staticmethod
    def moduleDirectory():
        return Path(__file__).resolve().parent

    @classmethod
    def requirementsPath(cls):
        return cls.moduleDirectory() / "Resources" / "requirements.txt"

    @classmethod
    def requirements(cls):
        """The pip requirement lines of Resources/requirements.txt."""
        lines = cls.requirementsPath().read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip() and not line.strip().startswith(("#", "-"))]

    def missingDependencies(self):
        """pip names of the engine's packages that do not import in Slicer's Python (empty when all do)."""
        if LiverTumorSegLogic._dependenciesChecked:
            return []
        import importlib

        importlib.invalidate_caches()
        missing = []
        for importName, requirement in self.REQUIRED_PACKAGES.items():
            try:
                importlib.import_module(importName)
            except Exception as error:  # ImportError, or a broken install that fails while importing
                logging.info("LiverTumorSeg: Python package '%s' does not import: %s", importName, error)
                missing.append(requirement)
        LiverTumorSegLogic._dependenciesChecked = not missing
        return missing

    def installDependencies(self):
        """pip-install Resources/requirements.txt into Slicer's Python (no questions asked).

        Raises :class:`LiverTumorSegError` with what to do when the packages still do not import.
        """
        requirementsFile = self.requirementsPath()
        packaging = _slicerPackageManager()
        try:
            if packaging is not None:
                import inspect

                requirements = packaging.load_requirements(str(requirementsFile))
                options = {
                    "prompt_install": False,  # the module has asked already
                    "prompt_restart": not slicer.app.testingEnabled(),
                    "requester": "LiverTumorSeg",
                    "skip_in_testing": False,  # the self-test needs the packages too
                    "skip_packages": ["SimpleITK"],  # Slicer's own SimpleITK must stay
                }
                accepted = inspect.signature(packaging.pip_ensure).parameters
                packaging.pip_ensure(requirements, **{key: value for key, value in options.items() if key in accepted})
            else:
                slicer.util.pip_install(" ".join(self.requirements()))
        except Exception as error:
            raise LiverTumorSegError(
                f"Installing the Python packages failed: {error}\n\nCheck the internet connection (and proxy settings), "
                "then press Apply again. To install by hand, run this in the Python console (View > Python Console) "
                f"and restart Slicer:\n\nslicer.util.pip_install({' '.join(self.requirements())!r})"
            ) from error
        LiverTumorSegLogic._dependenciesChecked = False
        LiverTumorSegLogic._cudaAvailable = None
        missing = self.missingDependencies()
        if missing:
            raise LiverTumorSegError(
                f"The Python packages {', '.join(missing)} were installed but do not import. Restart Slicer and press "
                "Apply again; if that does not help, see the Python console for the import error."
            )

    def cudaAvailable(self):
        """True when ONNX Runtime in Slicer's Python can run on a CUDA GPU."""
        if LiverTumorSegLogic._cudaAvailable is None:
            import importlib.util

            available = False
            if importlib.util.find_spec("onnxruntime") is not None:
                try:
                    import onnxruntime

                    available = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
                except Exception as error:
                    logging.info("LiverTumorSeg: ONNX Runtime does not import: %s", error)
            LiverTumorSegLogic._cudaAvailable = available
        return LiverTumorSegLogic._cudaAvailable

    @staticmethod
    def pythonExecutable():
        """Slicer's stand-alone Python launcher (PythonSlicer), which runs the engine."""
        found = shutil.which("PythonSlicer")
        if found:
            return found
        name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        for folder in (Path(sys.executable).parent, Path(slicer.app.slicerHome) / "bin" if hasattr(slicer, "app") else None):
            if folder is not None and (folder / name).is_file():
                return str(folder / name)
        raise LiverTumorSegError("Slicer's Python launcher (PythonSlicer) was not found. Reinstall 3D Slicer.")

    def engineEnvironment(self):
        """Environment of the engine process: Slicer's, with this module's folder on the Python path."""
        environment = dict(os.environ)
        paths = [str(self.moduleDirectory())] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
        environment["PYTHONPATH"] = os.pathsep.join(paths)
        environment["PYTHONUNBUFFERED"] = "1"
        environment["PYTHONIOENCODING"] = "utf-8"
        return environment

    @staticmethod
    def firstCtCandidate():
        """The first scalar volume of the scene that is not a label map, or None."""
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if not node.IsA("vtkMRMLLabelMapVolumeNode"):
                return node
        return None

    # ------------------------------------------------------------------------------- processing

    def isRunning(self):
        return self._run is not None

    def runningTemporaryFolder(self):
        """Temporary folder of the run in progress (removed when it ends), or None."""
        return None if self._run is None else self._run.temporaryFolder

    def process(self, inputVolume, outputSegmentation=None, volumetryTable=None, useRadiomicsFilter=True,
                useBoundaryRefinement=True, perLesionSegments=False, device="cpu", bundlePath="", wait=False,
                progressCallback=None, completedCallback=None, showResults=True, keepOutputFolder=None):
        """Segment ``inputVolume``.

        :param outputSegmentation: segmentation node that receives the segments (replacing its content), or
            None for a new one. Likewise ``volumetryTable`` for the volumetry table.
        :param wait: True: run to the end and return a :class:`LiverTumorSegResult` (raises
            :class:`LiverTumorSegProcessingError` when the run fails). False: return None at once; the
            process runs in the background and ``completedCallback(result)`` is called at the end (also
            after a failure or a cancel; it then holds the message).
        :param progressCallback: ``progressCallback(fraction, text, stage)`` while running.
        :param showResults: show the segmentation in the views and the table in a table layout.
        :param keepOutputFolder: copy all engine outputs (label map, .seg.nrrd, volumetry, HTML report) to this
            new folder after a successful run.
        The scene is changed only when a run succeeds; the temporary folder is always removed.
        """
        if self._run is not None:
            raise LiverTumorSegError("A segmentation is already running. Wait for it, or cancel it first.")
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise LiverTumorSegError("Select an input CT volume that holds an image.")
        dimensions = inputVolume.GetImageData().GetDimensions()
        if min(dimensions) < 1 or inputVolume.GetImageData().GetNumberOfScalarComponents() != 1:
            raise LiverTumorSegError(f"'{inputVolume.GetName()}' is not a single-component 3D volume; select a CT volume.")
        if device not in ("cpu", "cuda"):
            raise LiverTumorSegError(f"Unknown device '{device}'; use 'cpu' or 'cuda'.")
        if bundlePath and not Path(bundlePath).is_dir():
            raise LiverTumorSegError(f"The model folder '{bundlePath}' does not exist. Clear the field to use the bundled model.")
        missing = self.missingDependencies()
        if missing:
            raise LiverTumorSegError(
                f"The Python packages {', '.join(missing)} are missing. Press Apply in the Liver Tumor Segmentation "
                "module to install them, or call LiverTumorSegLogic().installDependencies()."
            )

        temporaryRoot = getattr(getattr(slicer, "app", None), "temporaryPath", None) or tempfile.gettempdir()
        Path(temporaryRoot).mkdir(parents=True, exist_ok=True)
        temporaryFolder = Path(tempfile.mkdtemp(prefix="LiverTumorSeg-", dir=temporaryRoot))
        try:
            inputPath = temporaryFolder / "input.nrrd"
            self._writeVolume(inputVolume, inputPath)
            outputFolder = temporaryFolder / "result"
            command = [self.pythonExecutable()] + engineCommandArguments(
                inputPath, outputFolder, bundlePath=bundlePath, device=device, useRadiomicsFilter=useRadiomicsFilter,
                useBoundaryRefinement=useBoundaryRefinement, perLesionSegments=perLesionSegments,
            )
            engine = EngineProcess(command, self.engineEnvironment(), str(self.moduleDirectory()))
            self._run = _Run(
                engine=engine, temporaryFolder=temporaryFolder, outputFolder=outputFolder, inputVolume=inputVolume,
                outputSegmentation=outputSegmentation, volumetryTable=volumetryTable,
                perLesionSegments=perLesionSegments, keepOutputFolder=Path(keepOutputFolder) if keepOutputFolder else None,
                showResults=showResults, progressCallback=progressCallback, completedCallback=completedCallback,
            )
            engine.start()
        except Exception:
            self._run = None
            shutil.rmtree(temporaryFolder, ignore_errors=True)
            raise
        logging.info("LiverTumorSeg: segmenting '%s'", inputVolume.GetName())

        if wait:
            while True:
                self._handleLines(self._run.engine.readLines(timeout=0.2))
                if self._run.engine.isFinished():
                    break
            self._handleLines(self._run.engine.readLines())
            result = self._finish()
            if not result.succeeded:
                raise LiverTumorSegProcessingError(result)
            return result

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._poll)
        self._timer.start()
        return None

    def cancel(self):
        """Stop the run in progress; the scene stays as it was and the temporary files are removed."""
        run = self._run
        if run is None or run.cancelRequested:
            return
        run.cancelRequested = True
        logging.info("LiverTumorSeg: cancelling")
        run.engine.terminate()
        engine = run.engine
        qt.QTimer.singleShot(self.FORCE_KILL_AFTER_MS, lambda: engine.terminate(force=True))

    @staticmethod
    def _writeVolume(volumeNode, path):
        """Write the volume to ``path`` with a storage node that is not part of the scene (no trace left)."""
        storageNode = slicer.mrmlScene.CreateNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storageNode.SetFileName(str(path))
            storageNode.UseCompressionOff()
            if not storageNode.WriteData(volumeNode) or not Path(path).is_file():
                raise LiverTumorSegError(
                    f"The input volume could not be written to the temporary folder '{Path(path).parent}'. Check the "
                    "free disk space and the temporary directory (Application settings > General)."
                )
        finally:
            storageNode.UnRegister(None)

    def _poll(self):
        run = self._run
        if run is None:
            self._stopTimer()
            return
        try:
            self._handleLines(run.engine.readLines())
            if not run.engine.isFinished():
                return
            self._handleLines(run.engine.readLines())
        except Exception as error:  # never leave the timer firing on an error
            logging.exception("LiverTumorSeg: reading the process output failed")
            run.engine.terminate(force=True)
            run.engine.lines.append(f"error: {error}")
        self._stopTimer()
        result = self._finish()
        if run.completedCallback is not None:
            run.completedCallback(result)

    def _stopTimer(self):
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def _handleLines(self, lines):
        run = self._run
        for line in lines:
            record = parseProgressLine(line)
            if record is None:
                if line.strip():
                    logging.info("LiverTumorSeg: %s", line)
                continue
            run.progress = overallProgress(record["stage"], record["fraction"], run.progress)
            if run.progressCallback is not None and not run.cancelRequested:
                run.progressCallback(run.progress, progressText(record["stage"], record["fraction"]), record["stage"])

    def _finish(self):
        """End of a run: import the results (when it succeeded), remove the temporary folder, return the result."""
        run, self._run = self._run, None
        engine = run.engine
        exitCode = engine.returnCode
        result = LiverTumorSegResult(status="failed", exitCode=exitCode, output=list(engine.lines),
                                     warnings=engineWarnings(engine.lines))
        try:
            if run.cancelRequested:
                result.status = "cancelled"
                result.message = "The segmentation was cancelled; the scene was not changed."
            elif exitCode != 0:
                result.message = engineErrorMessage(engine.lines, exitCode)
            elif not slicer.mrmlScene.IsNodePresent(run.inputVolume):
                result.message = "The input volume was removed from the scene while it was being segmented."
            else:
                if run.progressCallback is not None:
                    run.progressCallback(0.97, "Loading the results into the scene...", "import")
                self._importResults(run, result)
                if run.keepOutputFolder is not None:
                    shutil.copytree(run.outputFolder, run.keepOutputFolder)
                result.status = "completed"
                if run.showResults:
                    self.showResults(run.inputVolume, result.segmentationNode, result.tableNode)
                if run.progressCallback is not None:
                    run.progressCallback(1.0, "Done.", "done")
        except Exception as error:
            logging.exception("LiverTumorSeg: loading the results failed")
            result.status = "failed"
            result.message = f"The segmentation finished but its results could not be loaded into the scene: {error}"
        finally:
            shutil.rmtree(run.temporaryFolder, ignore_errors=True)
        result.elapsedSeconds = time.monotonic() - run.startTime
        for warning in result.warnings:
            logging.warning("LiverTumorSeg: %s", warning)
        logging.info("LiverTumorSeg: %s after %.1f s", result.status, result.elapsedSeconds)
        return result

    def _importResults(self, run, result):
        """Engine outputs -> segmentation and table nodes (through the engine's MRML adapter); all or nothing."""
        from LiverTumorSegLib import mrml_nodes
        from LiverTumorSegLib.image_io import read_image

        scene = slicer.mrmlScene
        labels = read_image(run.outputFolder / "segmentation.nii.gz", kind="label map")
        volumetry = json.loads((run.outputFolder / "volumetry.json").read_text(encoding="utf-8"))
        details = {}
        if (run.outputFolder / "run.json").is_file():
            details = json.loads((run.outputFolder / "run.json").read_text(encoding="utf-8"))
        algorithmName = str(details.get("bundle") or "LiverTumorSeg")

        inputVolume = run.inputVolume
        outputSegmentation = run.outputSegmentation if _inScene(scene, run.outputSegmentation) else None
        volumetryTable = run.volumetryTable if _inScene(scene, run.volumetryTable) else None
        created = []
        try:
            segmentationName = outputSegmentation.GetName() if outputSegmentation else f"{inputVolume.GetName()} liver segmentation"
            newSegmentation = mrml_nodes.segmentation_node_from_labels(
                scene, labels, inputVolume, name=segmentationName, per_lesion=run.perLesionSegments,
                algorithm_name=algorithmName,
            )
            created.append(newSegmentation)
            if outputSegmentation is not None:
                _copySegmentationContent(outputSegmentation, newSegmentation)  # keeps the node's name and display
                _removeNode(scene, newSegmentation)
                created.remove(newSegmentation)
                outputSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
                outputSegmentation.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
                outputSegmentation.CreateDefaultDisplayNodes()
                segmentationNode = outputSegmentation
            else:
                segmentationNode = newSegmentation
            mrml_nodes.add_closed_surfaces(segmentationNode)

            tableName = volumetryTable.GetName() if volumetryTable else f"{inputVolume.GetName()} liver volumetry"
            newTable = mrml_nodes.volumetry_table_node(scene, volumetry, name=tableName)
            created.append(newTable)
            if volumetryTable is not None:
                volumetryTable.SetLocked(False)
                volumetryTable.CopyContent(newTable, True)
                _removeNode(scene, newTable)
                created.remove(newTable)
                tableNode = volumetryTable
            else:
                tableNode = newTable
            self.placeInStudy(inputVolume, [segmentationNode, tableNode])
        except Exception:
            for node in created:
                _removeNode(scene, node)
            raise
        result.segmentationNode = segmentationNode
        result.tableNode = tableNode
        result.volumetry = volumetry
        result.labels = labels

    # ---------------------------------------------------------------------------- resection planning

    def planResection(self, segmentationNode, referenceVolume, planeNode=None, resectedSegmentId=None,
                      liverState="normal", flipPlane=False, reuseLabels=False):
        """Plan a resection on the segmentation's liver and tumours; returns the engine's ResectionPlan.

        Give a Markups plane (its normal points into the resected part; ``flipPlane`` resects the other
        side) or the ID of a segment of ``segmentationNode`` to resect. The segments are read on the grid
        of ``referenceVolume`` (the CT); ``reuseLabels`` reuses the label map read for the same nodes last
        time (while a plane is dragged). Fills or creates the plan table and the "Liver remnant" / "Liver
        resected" segmentation, linked to ``segmentationNode`` by node references, and keeps the plan in
        ``lastResection`` for :meth:`saveResectionReport`. Raises the engine's InputError with a message
        for the user when the inputs cannot be planned (no liver, plane outside the liver, ...).
        """
        from LiverTumorSegLib import resection_nodes

        scene = segmentationNode.GetScene()
        key = (segmentationNode.GetID(), referenceVolume.GetID())
        labels = None
        if reuseLabels and self._resectionLabels is not None and self._resectionLabels[0] == key:
            labels = self._resectionLabels[1]
        plan, labels, geometry = resection_nodes.plan_from_nodes(
            segmentationNode, referenceVolume, plane_node=planeNode, resected_segment_id=resectedSegmentId,
            liver_state=liverState, flip=flipPlane, labels=labels)
        self._resectionLabels = (key, labels)

        created = []
        table = segmentationNode.GetNodeReference(self.RESECTION_TABLE_REFERENCE)
        table = resection_nodes.plan_table_node(
            scene, plan.result, name=f"{referenceVolume.GetName()} resection plan",
            table_node=table if _inScene(scene, table) else None)
        if segmentationNode.GetNodeReferenceID(self.RESECTION_TABLE_REFERENCE) != table.GetID():
            segmentationNode.SetNodeReferenceID(self.RESECTION_TABLE_REFERENCE, table.GetID())
            created.append(table)
        target = segmentationNode.GetNodeReference(self.RESECTION_SEGMENTATION_REFERENCE)
        target = resection_nodes.remnant_resected_segmentation(
            scene, plan, labels, geometry, f"{referenceVolume.GetName()} resection",
            segmentation_node=target if _inScene(scene, target) else None,
            reference_volume_node=referenceVolume, tumours=True)
        if segmentationNode.GetNodeReferenceID(self.RESECTION_SEGMENTATION_REFERENCE) != target.GetID():
            segmentationNode.SetNodeReferenceID(self.RESECTION_SEGMENTATION_REFERENCE, target.GetID())
            created.append(target)
        if created:
            self.placeInStudy(referenceVolume, created)

        if planeNode is not None:
            method = f"plane '{planeNode.GetName()}'" + (" (other side)" if flipPlane else "")
        else:
            segment = segmentationNode.GetSegmentation().GetSegment(resectedSegmentId)
            method = f"segment '{segment.GetName() if segment else resectedSegmentId}'"
        inputs = {"volume": referenceVolume.GetName(), "segmentation": segmentationNode.GetName(), "resection": method}
        self.lastResection = ResectionPlanState(plan, labels, geometry, referenceVolume.GetName(), inputs,
                                                table, target)
        return plan

    def saveResectionReport(self, folder):
        """Write plan.json, plan.csv and plan.html of the last plan into the new folder ``folder``; return it."""
        from LiverTumorSegLib.resection_report import check_plan_folder, write_plan

        state = self.lastResection
        if state is None:
            raise LiverTumorSegError(_("Plan a resection first."))
        folder = check_plan_folder(Path(folder))
        return write_plan(folder, state.plan, state.labels, state.geometry,
                          title=_("Resection plan: {name}").format(name=state.title), inputs=state.inputs)

    def clearResection(self):
        """Forget the last plan and the label map kept for it (e.g. when the scene closes)."""
        self.lastResection = None
        self._resectionLabels = None

    @staticmethod
    def placeInStudy(volumeNode, nodes):
        """Put ``nodes`` in the subject hierarchy next to ``volumeNode`` (same patient/study folder)."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        volumeItem = shNode.GetItemByDataNode(volumeNode)
        if not volumeItem:
            return
        parentItem = shNode.GetItemParent(volumeItem)
        for node in nodes:
            item = shNode.GetItemByDataNode(node)
            if item and shNode.GetItemParent(item) != parentItem:
                shNode.SetItemParent(item, parentItem)

    @staticmethod
    def showResults(volumeNode, segmentationNode, tableNode):
        """CT in the slice views with the segments on top, surfaces in 3D, the volumetry in the table view."""
        if not hasattr(slicer, "app") or slicer.app.layoutManager() is None:
            return
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
        segmentationNode.CreateDefaultDisplayNodes()
        display = segmentationNode.GetDisplayNode()
        if display is not None:
            display.SetVisibility(True)
            display.SetVisibility2DFill(True)
            display.SetVisibility2DOutline(True)
            display.SetVisibility3D(True)
            display.SetPreferredDisplayRepresentationName3D("Closed surface")
            if segmentationNode.GetSegmentation().GetSegment("Liver") is not None:
                display.SetSegmentOpacity3D("Liver", 0.35)  # tumours stay visible inside the liver
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        applicationLogic = slicer.app.applicationLogic()
        applicationLogic.GetSelectionNode().SetActiveTableID(tableNode.GetID())
        applicationLogic.PropagateTableSelection()
        threeDWidget = layoutManager.threeDWidget(0)
        if threeDWidget is not None:
            threeDWidget.threeDView().resetFocalPoint()


def _slicerPackageManager():
    """Slicer's package-management module with ``pip_ensure`` (Slicer 5.11 and later), or None."""
    import importlib

    for name in ("slicer.packaging", "slicer.pydeps"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "pip_ensure") and hasattr(module, "load_requirements"):
            return module
    return None


def _copySegmentationContent(target, source):
    """Replace the segments of ``target`` with those of ``source``.

    ``CopyContent`` copies the segments (voxels, names, colours, tags) but marks every name and colour as
    auto-generated, which would let Slicer rename them from the terminology: restore the source's flags.
    """
    target.CopyContent(source, True)
    sourceSegmentation, targetSegmentation = source.GetSegmentation(), target.GetSegmentation()
    for segmentId in sourceSegmentation.GetSegmentIDs():
        original, copied = sourceSegmentation.GetSegment(segmentId), targetSegmentation.GetSegment(segmentId)
        if original is not None and copied is not None:
            copied.SetNameAutoGenerated(original.GetNameAutoGenerated())
            copied.SetColorAutoGenerated(original.GetColorAutoGenerated())


def _inScene(scene, node):
    return node is not None and scene.IsNodePresent(node)


def _removeNode(scene, node):
    """Remove a node with its display and storage nodes."""
    if node is None or not scene.IsNodePresent(node):
        return
    attached = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] if hasattr(node, "GetNumberOfDisplayNodes") else []
    attached += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())] if hasattr(node, "GetNumberOfStorageNodes") else []
    for attachedNode in attached:
        if attachedNode is not None and scene.IsNodePresent(attachedNode):
            scene.RemoveNode(attachedNode)
    scene.RemoveNode(node)


# ------------------------------------------------------------------------------------------------
# Test
# ------------------------------------------------------------------------------------------------


class LiverTumorSegTest(ScriptedLoadableModuleTest):
    """Self-test: segments a small synthetic CT phantom with the bundled model.

    Runs the engine checks of ``LiverTumorSegLib.selftest`` (also run by the repository's tests outside
    Slicer) on the nodes this module creates.
    """

    PHANTOM_SEED = 11

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ApplyNeedsInputVolume()
        self.setUp()
        self.test_SegmentPhantom()
        self.setUp()
        self.test_ExistingOutputsPerLesion()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()
        self.setUp()
        self.test_NonCtInputShowsEngineMessage()
        self.setUp()
        self.test_ResectionPlanning()

    # ------------------------------------------------------------------------------ shared steps

    def _logic(self):
        logic = LiverTumorSegLogic()
        missing = logic.missingDependencies()
        if missing:
            self.delayDisplay(f"Installing Python packages: {', '.join(missing)}")
            logic.installDependencies()
        return logic

    def _phantom(self):
        from LiverTumorSegLib import selftest

        volume, phantom = selftest.make_phantom_volume(slicer.mrmlScene, self.PHANTOM_SEED, size="small")
        return volume, phantom

    # ----------------------------------------------------------------------------------- tests

    def test_ApplyNeedsInputVolume(self):
        self.delayDisplay("Apply is enabled only with an input volume")
        slicer.util.selectModule("LiverTumorSeg")  # entering the module connects its parameter node
        widget = slicer.util.getModuleWidget("LiverTumorSeg")
        parameterNode = widget.logic.getParameterNode()
        parameterNode.inputVolume = None
        self.assertFalse(widget.ui.applyButton.enabled)
        volume, _ = self._phantom()
        parameterNode.inputVolume = volume
        self.assertTrue(widget.ui.applyButton.enabled)
        self.assertEqual(widget.ui.applyButton.text, "Apply")
        self.delayDisplay("Test passed")

    def test_SegmentPhantom(self):
        import tempfile as _tempfile

        from LiverTumorSegLib import selftest

        self.delayDisplay("Segmenting a synthetic CT phantom")
        logic = self._logic()
        volume, phantom = self._phantom()
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        patient = shNode.CreateSubjectItem(shNode.GetSceneItemID(), "Phantom patient")
        study = shNode.CreateStudyItem(patient, "Phantom CT study")
        shNode.SetItemParent(shNode.GetItemByDataNode(volume), study)

        keep = Path(_tempfile.mkdtemp(prefix="LiverTumorSegTest-")) / "outputs"
        progress = []
        try:
            result = logic.process(volume, wait=True, keepOutputFolder=keep,
                                   progressCallback=lambda fraction, text, stage: progress.append(fraction))
            self.assertTrue(result.succeeded, result.message)
            self.assertTrue(progress and progress == sorted(progress), "progress must be reported and never go back")

            labels, volumetry = selftest.check_output_folder(keep, reference=phantom.image)
            self.assertEqual(volumetry, result.volumetry)
            counts = selftest.check_result_nodes(
                result.segmentationNode, result.tableNode, result.volumetry,
                labels=result.labels.array, reference_volume_node=volume,
            )
            dice = selftest.check_liver_found(result.labels.array, phantom.label)
            self.delayDisplay(selftest.summary(selftest.segment_names(result.segmentationNode), counts, volumetry)
                              + f"; liver Dice {dice:.3f}")
        finally:
            shutil.rmtree(keep.parent, ignore_errors=True)

        for node in (result.segmentationNode, result.tableNode):
            self.assertEqual(shNode.GetItemParent(shNode.GetItemByDataNode(node)), study,
                             f"'{node.GetName()}' must be in the volume's study")
        display = result.segmentationNode.GetDisplayNode()
        self.assertTrue(display is not None and display.GetVisibility() and display.GetVisibility3D())
        selection = slicer.app.applicationLogic().GetSelectionNode()
        self.assertEqual(selection.GetActiveTableID(), result.tableNode.GetID())
        self.assertIsNone(logic.runningTemporaryFolder())
        self.delayDisplay("Test passed")

    def test_ExistingOutputsPerLesion(self):
        from LiverTumorSegLib import selftest

        self.delayDisplay("Writing into existing output nodes, one segment per lesion")
        logic = self._logic()
        volume, _ = self._phantom()
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My segmentation")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.GetSegmentation().AddEmptySegment("old", "Old segment")
        table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "My volumetry")
        result = logic.process(volume, segmentation, table, perLesionSegments=True, useRadiomicsFilter=False,
                               useBoundaryRefinement=False, wait=True, showResults=False)
        self.assertIs(result.segmentationNode, segmentation)
        self.assertIs(result.tableNode, table)
        self.assertEqual(segmentation.GetName(), "My segmentation")
        self.assertNotIn("Old segment", selftest.segment_names(segmentation))
        selftest.check_result_nodes(segmentation, table, result.volumetry, per_lesion=True,
                                    labels=result.labels.array, reference_volume_node=volume)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 1)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTableNode"), 1)
        self.delayDisplay("Test passed")

    def test_CancelLeavesSceneUnchanged(self):
        self.delayDisplay("Cancelling a running segmentation")
        logic = self._logic()
        volume, _ = self._phantom()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        finished = []
        logic.process(volume, wait=False, completedCallback=finished.append)
        temporaryFolder = logic.runningTemporaryFolder()
        self.assertTrue(temporaryFolder is not None and temporaryFolder.is_dir())
        self.assertTrue(logic.isRunning())
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            slicer.app.processEvents()
            time.sleep(0.05)
        logic.cancel()
        while not finished and time.monotonic() - started < 120.0:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertTrue(finished, "the run did not end after cancel")
        self.assertIn(finished[0].status, ("cancelled", "completed"))  # a very fast machine may finish first
        if finished[0].status == "cancelled":
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.assertFalse(temporaryFolder.exists(), "the temporary folder must be removed")
        self.assertFalse(logic.isRunning())
        self.delayDisplay("Test passed")

    def test_NonCtInputShowsEngineMessage(self):
        import numpy as np

        self.delayDisplay("A volume that is not CT in HU is refused with the engine's message")
        logic = self._logic()
        array = np.full((8, 48, 48), 100, dtype=np.int16)
        array[:, 10:30, 10:30] = 400
        volume = slicer.util.addVolumeFromArray(array, nodeClassName="vtkMRMLScalarVolumeNode", name="Not CT")
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(LiverTumorSegProcessingError) as context:
            logic.process(volume, wait=True, showResults=False)
        self.assertEqual(context.exception.result.exitCode, 2)
        self.assertIn("Hounsfield", str(context.exception))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Test passed")

    def test_ResectionPlanning(self):
        import numpy as np

        from LiverTumorSegLib import mrml_nodes
        from LiverTumorSegLib.image_io import Image
        from LiverTumorSegLib.resection_report import PLAN_FILES

        self.delayDisplay("Resection planning with a plane on the phantom's true liver")
        logic = LiverTumorSegLogic()
        volume, phantom = self._phantom()
        labels = Image(np.asarray(phantom.label, dtype=np.uint8), phantom.image.geometry)
        segmentation = mrml_nodes.segmentation_node_from_labels(slicer.mrmlScene, labels, volume, name="Truth")
        liverIndex = np.argwhere(labels.array > 0).mean(axis=0)
        centre = mrml_nodes.lps_to_ras(labels.geometry.index_to_physical(liverIndex))
        plane = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsPlaneNode", "Cut")
        plane.SetCenterWorld(*centre)
        plane.SetNormalWorld(-1.0, 0.0, 0.0)  # RAS: resect the patient's left
        plan = logic.planResection(segmentation, volume, planeNode=plane, liverState="chemotherapy")
        self.assertTrue(0.0 < plan.result["flr_percent"] < 100.0)
        self.assertEqual(plan.result["threshold_percent"], 30.0)
        state = logic.lastResection
        self.assertEqual(state.tableNode.GetTable().GetNumberOfRows(), 2 + plan.result["tumour_count"])
        names = [state.segmentationNode.GetSegmentation().GetSegment(sid).GetName()
                 for sid in state.segmentationNode.GetSegmentation().GetSegmentIDs()]
        self.assertEqual(names, ["Liver remnant", "Liver resected", "Liver tumor"])

        plane.SetCenterWorld(centre[0] + 10.0, centre[1], centre[2])  # moved: the same nodes are refilled
        moved = logic.planResection(segmentation, volume, planeNode=plane, reuseLabels=True)
        self.assertIs(logic.lastResection.tableNode, state.tableNode)
        self.assertIs(logic.lastResection.segmentationNode, state.segmentationNode)
        self.assertNotEqual(moved.result["flr_percent"], plan.result["flr_percent"])
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTableNode"), 1)

        folder = Path(tempfile.mkdtemp(prefix="LiverTumorSeg-plan-")) / "plan"
        try:
            written = logic.saveResectionReport(folder)
            self.assertEqual({p.name for p in written.iterdir()}, PLAN_FILES)
        finally:
            shutil.rmtree(folder.parent, ignore_errors=True)
        self.delayDisplay("Test passed")
