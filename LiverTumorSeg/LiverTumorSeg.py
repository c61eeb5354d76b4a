"""3D Slicer module: automatic liver and liver-tumour segmentation of contrast-enhanced CT, with volumetry.

Slicer glue only (panel, parameter node, Qt timers). The engine next to this file runs segmentations and model
downloads in background processes (``LiverTumorSegLib.module_logic``, ``process``, ``scene_run``), lists models
(``model_selector``), exports DICOM SEG (``dicom_export``), plans resections (``resection_planner``) and decides
which packages Slicer needs (``slicer_dependencies``), tested without Slicer.
"""

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import ctk
import qt
import vtk

import slicer
from slicer import vtkMRMLMarkupsPlaneNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.util import VTKObservationMixin

from LiverTumorSegLib import model_selector
from LiverTumorSegLib import slicer_dependencies as dependencies
from LiverTumorSegLib.dicom_export import instance_uids
from LiverTumorSegLib.module_logic import ModuleLogic
from LiverTumorSegLib.module_logic import ProcessingError as LiverTumorSegProcessingError  # noqa: F401 - for scripts

DOCUMENTATION_URL = "https://github.com/LiverTumorSeg/SlicerLiverTumorSeg#readme"
MODULE_DIRECTORY = Path(__file__).resolve().parent
REQUIREMENTS_FILE = MODULE_DIRECTORY / "Resources" / "requirements.txt"

#: Parameters bound to their widgets in code rather than by a SlicerParameterName in the .ui (the parameter
#: node wrapper's connectors cannot show them as these widgets do): parameter name -> widget name.
MANUALLY_BOUND_PARAMETERS = {
    "device": "deviceComboBox",  # the GPU entry exists only where ONNX Runtime has CUDA
    "bundlePath": "bundlePathLineEdit",  # str ("" = the chosen model); ctkPathLineEdit binds only pathlib.Path
    "modelName": "modelComboBox",  # entries are the registry's models, each with its details as tooltip
    "liverState": "liverStateComboBox",  # entries show each state's FLR threshold
    "resectionMethod": "resectionPlaneRadioButton",  # two radio buttons: plane or "Resected" segment
}
#: Wait this long after the last move of the resection plane before the plan is computed again.
RESECTION_UPDATE_DELAY_MS = 300


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
            "with volumetry: liver volume, lesions with their volumes and diameters, tumour burden.<br><br>"
            "Select the CT volume and press <b>Apply</b> (<b>Cancel</b> stops the background run). The first run "
            "installs ONNX Runtime, scikit-image and PyRadiomics (unless the SlicerRadiomics extension provides it) "
            "after asking.<br><br><b>Resection planning</b>: cut the liver with a Markups plane (its normal points into "
            "the resected part) or a segment named <i>Resected</i>; get remnant and resected volumes, the future liver "
            "remnant (FLR) against the liver state's threshold, tumour margins, and a printable report. The choices "
            "are saved with the scene.<br><br>The bundled demonstration model was trained on synthetic CT phantoms; "
            "for real scans choose (and download) a model trained on real data in the Model list, or give a model "
            "folder (Advanced). <b>Export DICOM SEG</b> writes the segmentation of a CT loaded from the DICOM database "
            "as a DICOM SEG for PACS. Research use only.<br><br>"
            f'See the <a href="{DOCUMENTATION_URL}">documentation</a> for details.'
        )
        self.parent.acknowledgementText = _(
            "This module implements the pipeline of: X. Li, W. Jia, K. Sharipov, A. Ruslan, L. Mazbutdzhon, "
            "I. Shuhratjon and Y. Zheng, <i>Precise liver tumor segmentation in CT using a hybrid deep "
            "learning&ndash;radiomics framework</i>, preprint, December 2025 (cascaded 2.5D attention dense U-Net, "
            "radiomics-based false-positive filtering and 3D CNN boundary refinement). It is an independent "
            "implementation, not the authors' code. Labels follow the LiTS benchmark conventions."
        )


@parameterNodeWrapper
class LiverTumorSegParameterNode:
    """What the user chose in the module; saved with the scene."""

    inputVolume: vtkMRMLScalarVolumeNode  # contrast-enhanced abdominal CT (HU)
    outputSegmentation: vtkMRMLSegmentationNode  # receives the result (a new one is created when empty)
    useRadiomicsFilter: bool = True  # drop candidate lesions that the radiomics classifier rejects
    useBoundaryRefinement: bool = True  # relabel the voxels around each tumour boundary with the 3D CNN
    perLesionSegments: bool = False  # one segment per lesion ("Liver tumor 1..n") instead of one "Liver tumor"
    device: Annotated[str, Choice(["cpu", "cuda"])] = "cpu"  # "cuda" where ONNX Runtime has CUDA
    bundlePath: str = ""  # model bundle folder, used in place of modelName; empty for the chosen model
    modelName: str = ""  # a bundled or installed model of the registry by name; empty for the bundled model
    volumetryTable: vtkMRMLTableNode  # receives the volumetry (a new one is created when empty)
    resectionMethod: Annotated[str, Choice(["plane", "segment"])] = "plane"  # cut by a plane or by the "Resected" segment
    resectionPlane: vtkMRMLMarkupsPlaneNode  # its normal points into the resected part
    flipResectionPlane: bool = False  # resect the side the plane's normal points away from
    liverState: Annotated[str, Choice(["normal", "chemotherapy", "cirrhosis"])] = "normal"  # the FLR threshold preset


class LiverTumorSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._resectionPlane = None  # the plane whose moves are observed
        self._resectionChoices = None  # the resection settings last planned with
        self._resectionTimer = None
        self._modelChoices, self._modelProblem = {}, ""  # the selector's entries by name; why some may be missing

    def setup(self):
        from LiverTumorSegLib.resection import FLR_THRESHOLDS_PERCENT

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LiverTumorSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LiverTumorSegLogic()

        self.ui.bundlePathLineEdit.filters = ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Drives | ctk.ctkPathLineEdit.Readable
        self._populateDevices()
        self._populateModels()
        for state, threshold in FLR_THRESHOLDS_PERCENT.items():
            self.ui.liverStateComboBox.addItem(f"{state.capitalize()} (FLR \u2265 {threshold:g} %)", state)
        self._resectionTimer = qt.QTimer()
        self._resectionTimer.setSingleShot(True)
        self._resectionTimer.setInterval(RESECTION_UPDATE_DELAY_MS)
        self._resectionTimer.connect("timeout()", lambda: self.onUpdateResection(automatic=True))

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelDownloadButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.exportDicomSegButton.connect("clicked(bool)", self.onExportDicomSeg)
        for widget, signal in ((self.ui.deviceComboBox, "currentIndexChanged(int)"),
                               (self.ui.modelComboBox, "currentIndexChanged(int)"),
                               (self.ui.liverStateComboBox, "currentIndexChanged(int)"),
                               (self.ui.resectionPlaneRadioButton, "toggled(bool)"),
                               (self.ui.bundlePathLineEdit, "currentPathChanged(QString)")):
            widget.connect(signal, self._storeManualParameters)
        self.ui.updateResectionButton.connect("clicked(bool)", lambda checked=False: self.onUpdateResection())
        self.ui.saveResectionReportButton.connect("clicked(bool)", self.onSaveResectionReport)
        self.initializeParameterNode()
        self.ui.statusLabel.text = _("Select a contrast-enhanced CT volume and press Apply.")

    def cleanup(self):
        """Called when the application closes or the module is reloaded: stop a running segmentation or download."""
        self.logic.cancel()
        self.logic.cancelDownload()
        self._resectionTimer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)  # a run in progress goes on; its results still reach the parameter node

    def onSceneStartClose(self, caller, event):
        self.logic.cancel()  # its input is about to disappear
        self.setParameterNode(None)
        self._observeResectionPlane(None)
        self._resectionTimer.stop()
        self.logic.resection.clear()
        self.ui.saveResectionReportButton.enabled = False

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:  # the first CT-like volume of the scene
            self._parameterNode.inputVolume = next((node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                                                    if not node.IsA("vtkMRMLLabelMapVolumeNode")), None)

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" dynamic property in the .ui are bound here; those of
            # MANUALLY_BOUND_PARAMETERS are synchronised in _updateGui and _storeManualParameters.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._updateGui()

    def _populateDevices(self):
        combo = self.ui.deviceComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("CPU"), "cpu")
        if self.logic.cudaAvailable():  # the .ui tooltip says when a GPU is offered
            combo.addItem(_("GPU (CUDA)"), "cuda")
        combo.blockSignals(wasBlocked)
        self._updateGui()

    def _populateModels(self):
        """Fill the model selector with the bundled, installed and downloadable models."""
        choices, self._modelProblem = model_selector.model_choices()
        self._modelChoices = {choice.name: choice for choice in choices}
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for index, choice in enumerate(choices):
            combo.addItem(choice.text, choice.name)
            combo.setItemData(index, choice.details, qt.Qt.ToolTipRole)
        combo.blockSignals(wasBlocked)
        self._updateGui()

    def _updateModelWidgets(self):
        """The chosen model's details, and the download button (a cancel button while downloading)."""
        choice = self._modelChoices.get(self.ui.modelComboBox.currentData)
        downloading, folderGiven = self.logic.isDownloading(), bool(self.ui.bundlePathLineEdit.currentPath)
        self.ui.modelComboBox.enabled = not downloading and not folderGiven
        self.ui.modelInfoLabel.text = (_("The model folder of the Advanced section is used.") if folderGiven else
                                       "\n\n".join(text for text in (choice and choice.details, self._modelProblem) if text))
        self.ui.modelDownloadButton.text = _("Cancel download") if downloading else _("Download")
        self.ui.modelDownloadButton.enabled = downloading or bool(choice and choice.downloadable and not folderGiven)

    def _storeManualParameters(self, *changed):
        """A widget of MANUALLY_BOUND_PARAMETERS changed: store their values in the parameter node."""
        values = {"device": self.ui.deviceComboBox.currentData, "bundlePath": self.ui.bundlePathLineEdit.currentPath,
                  "modelName": self.ui.modelComboBox.currentData,
                  "liverState": self.ui.liverStateComboBox.currentData,
                  "resectionMethod": "plane" if self.ui.resectionPlaneRadioButton.checked else "segment"}
        for name, value in values.items():
            if self._parameterNode is not None and value is not None and getattr(self._parameterNode, name) != value:
                setattr(self._parameterNode, name, value)

    def _updateGui(self, caller=None, event=None):
        if not hasattr(self, "ui"):
            return
        running = self.logic.isRunning()
        parameterNode = self._parameterNode
        hasInput = bool(parameterNode and parameterNode.inputVolume)
        for section in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton,
                        self.ui.advancedCollapsibleButton, self.ui.resectionCollapsibleButton):
            section.enabled = not running
        self.ui.progressBar.visible = running or self.logic.isDownloading()
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = running or hasInput
        self.ui.applyButton.toolTip = (_("Stop the segmentation; the scene is left unchanged.") if running else
                                       _("Segment the liver and liver tumours in the input volume.") if hasInput else
                                       _("Select an input CT volume first."))
        if parameterNode is None:
            return
        manual = (self.ui.deviceComboBox, self.ui.liverStateComboBox, self.ui.bundlePathLineEdit, self.ui.resectionPlaneRadioButton,
                  self.ui.modelComboBox)
        wasBlocked = [widget.blockSignals(True) for widget in manual]
        self.ui.deviceComboBox.currentIndex = max(self.ui.deviceComboBox.findData(parameterNode.device), 0)
        self.ui.modelComboBox.currentIndex = max(self.ui.modelComboBox.findData(parameterNode.modelName), 0)
        self.ui.liverStateComboBox.currentIndex = max(self.ui.liverStateComboBox.findData(parameterNode.liverState), 0)
        if self.ui.bundlePathLineEdit.currentPath != parameterNode.bundlePath:
            self.ui.bundlePathLineEdit.currentPath = parameterNode.bundlePath
        usePlane = parameterNode.resectionMethod == "plane"
        (self.ui.resectionPlaneRadioButton if usePlane else self.ui.resectedSegmentRadioButton).checked = True
        for widget, blocked in zip(manual, wasBlocked):
            widget.blockSignals(blocked)
        self._updateModelWidgets()
        self.ui.exportDicomSegButton.enabled = bool(parameterNode.outputSegmentation and instance_uids(parameterNode.inputVolume))
        self.ui.resectionPlaneSelector.enabled = self.ui.resectionFlipCheckBox.enabled = usePlane
        if parameterNode.resectionPlane is not self._resectionPlane:
            self._observeResectionPlane(parameterNode.resectionPlane)
        choices = (parameterNode.resectionMethod, parameterNode.resectionPlane, parameterNode.flipResectionPlane,
                   parameterNode.liverState)
        if choices != self._resectionChoices:  # plan again when a resection setting changed, not on every change
            self._resectionChoices = choices
            self._scheduleResectionUpdate()

    def _observeResectionPlane(self, node):
        """Plan again (after a short delay) whenever the plane, its points or its transform change."""
        for event in (vtk.vtkCommand.ModifiedEvent, slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
                      slicer.vtkMRMLTransformableNode.TransformModifiedEvent):
            if self._resectionPlane is not None:
                self.removeObserver(self._resectionPlane, event, self._scheduleResectionUpdate)
            if node is not None:
                self.addObserver(node, event, self._scheduleResectionUpdate)
        self._resectionPlane = node

    def _scheduleResectionUpdate(self, caller=None, event=None):
        """Restart the single-shot timer: a plane being dragged is planned once it rests for a moment. Moves of
        the plane (``caller``) count only while the plane is the chosen resection."""
        node = self._parameterNode
        if node is None or node.outputSegmentation is None or self.logic.isRunning():
            return
        usePlane = node.resectionMethod == "plane"
        if (usePlane and node.resectionPlane is not None) or (not usePlane and caller is None):
            self._resectionTimer.start()

    def onUpdateResection(self, automatic=False):
        """Plan with the parameter node's choices; problems go to the result label (and a dialog when asked)."""
        from LiverTumorSegLib.errors import InputError
        from LiverTumorSegLib.resection_nodes import summary_text

        label, planned = self.ui.resectionResultLabel, None
        try:
            with slicer.util.WaitCursor():
                planned = self.logic.planResection(self._parameterNode or self.logic.getParameterNode(), reuseLabels=automatic)
            label.text = summary_text(planned.plan.result)
        except InputError as error:
            label.text = str(error)
        except Exception as error:
            logging.exception("LiverTumorSeg: resection planning failed")
            label.text = _("The resection could not be planned: {error}").format(error=error)
            if not automatic:
                slicer.util.errorDisplay(label.text, windowTitle=_("Resection planning"))
        self.ui.saveResectionReportButton.enabled = planned is not None
        return planned

    def onSaveResectionReport(self):
        from LiverTumorSegLib.resection_nodes import report_folder

        planned = self.logic.resection.last
        parent = planned and qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Folder for the planning report (a new subfolder is created in it)"),
            slicer.mrmlScene.GetRootDirectory() or str(Path.home()))
        if not parent:
            return
        with slicer.util.tryWithErrorDisplay(_("The planning report could not be written."), waitCursor=True):
            folder = self.logic.resection.save_report(report_folder(parent, planned.title),
                                                      title=_("Resection plan: {name}").format(name=planned.title))
            self.ui.resectionResultLabel.text += "\n" + _("Report saved in {folder}").format(folder=folder)

    def onDownloadModel(self):
        if self.logic.isDownloading():
            self.logic.cancelDownload()
            self.ui.statusLabel.text = _("Cancelling the download...")
            return
        with slicer.util.tryWithErrorDisplay(_("The model download could not be started.")):
            self.ui.progressBar.value = 0
            self.logic.downloadModel(self.ui.modelComboBox.currentData, self._onProgress, self._onDownloadCompleted)
        self._updateGui()

    def _onDownloadCompleted(self, outcome):
        self._populateModels()  # an installed model is now listed as such
        self.ui.statusLabel.text = outcome.message if outcome.status != "failed" else _("The model download failed.")
        if outcome.status == "failed":
            slicer.util.errorDisplay(outcome.message, windowTitle=_("Download model"), detailedText="\n".join(outcome.output[-200:]))

    def onExportDicomSeg(self):
        from LiverTumorSegLib.dicom_export import default_file_name
        from LiverTumorSegLib.dicom_seg import DicomSegUnavailable

        node = self._parameterNode
        folder = Path(slicer.mrmlScene.GetRootDirectory() or Path.home())
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Export DICOM SEG"),
                                              str(folder / default_file_name(node.inputVolume)), _("DICOM files (*.dcm)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("The DICOM SEG could not be exported."), waitCursor=True):
            try:
                written = self.logic.exportDicomSeg(node.outputSegmentation, node.inputVolume, path)
            except DicomSegUnavailable as reason:
                slicer.util.warningDisplay(str(reason), windowTitle=_("Export DICOM SEG"))
                return
            self.ui.statusLabel.text = _("DICOM SEG written to {path}").format(path=written)

    def onApplyButton(self):
        if self.logic.isRunning():
            self.logic.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        with slicer.util.tryWithErrorDisplay(_("The Python packages that the segmentation needs could not be installed.")):
            if not self._ensureDependencies():
                return
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("The segmentation could not be started."), waitCursor=True):
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...")
            try:
                self.logic.process(
                    node.inputVolume, node.outputSegmentation, node.volumetryTable, node.useRadiomicsFilter,
                    node.useBoundaryRefinement, node.perLesionSegments, node.device if self.logic.cudaAvailable() else "cpu",
                    node.bundlePath, progressCallback=self._onProgress, completedCallback=self._onCompleted,
                    modelName=node.modelName)
            except Exception:
                self.ui.statusLabel.text = _("The segmentation could not be started.")
                raise
            finally:
                self._updateGui()

    def _ensureDependencies(self):
        """Check the engine's Python packages; offer to install missing ones. True when all are there."""
        missing = self.logic.missingDependencies()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(_(
                "Liver Tumor Segmentation needs these Python packages, which are not installed in Slicer yet:\n\n    "
                "{packages}\n\nInstall them now? This downloads about 100 MB and takes a few minutes; Slicer is busy "
                "meanwhile.").format(packages=", ".join(missing)), windowTitle=_("Install Python packages")):
            self.ui.statusLabel.text = _("The required Python packages are not installed; press Apply again to install them.")
            return False
        self.ui.statusLabel.text = _("Installing Python packages...")
        slicer.app.processEvents()
        with slicer.util.WaitCursor():
            self.logic.installDependencies()
        self._populateDevices()
        self._populateModels()
        return True

    def _onProgress(self, fraction, text, stage):
        self.ui.progressBar.value = int(round(1000 * fraction))
        self.ui.statusLabel.text = text
        if stage == "import":  # loading into the scene blocks the event loop: paint the message now
            self.ui.progressBar.repaint()
            self.ui.statusLabel.repaint()

    def _onCompleted(self, result):
        self._updateGui()
        if result.succeeded:
            self.ui.statusLabel.text = result.summary()
            parameterNode = self.logic.getParameterNode()  # also when the module is not shown now
            parameterNode.outputSegmentation, parameterNode.volumetryTable = result.segmentation_node, result.table_node
            if result.warnings:
                slicer.util.warningDisplay("\n\n".join(result.warnings), windowTitle=_("Check the segmentation"))
        elif result.status == "cancelled":
            self.ui.statusLabel.text = _("Cancelled. The scene was not changed.")
        else:
            self.ui.statusLabel.text = _("The segmentation failed.")
            slicer.util.errorDisplay(result.message, windowTitle=_("Liver Tumor Segmentation"),
                                     detailedText="\n".join(result.output[-200:]))


class LiverTumorSegLogic(ModuleLogic, ScriptedLoadableModuleLogic):
    """Runs the engine on a volume node and brings the results into the scene; downloads models; exports DICOM SEG;
    plans resections. Runs, downloads and plans are ``LiverTumorSegLib.module_logic.ModuleLogic``'s; this adds
    Slicer's paths, the Qt timer, the views, the package installer and the DICOM database.

    For scripts::

        logic = LiverTumorSegLogic()
        logic.installDependencies()  # once, if logic.missingDependencies() lists packages
        result = logic.process(volumeNode, wait=True)
        result.segmentation_node, result.table_node, result.volumetry
    """

    POLL_INTERVAL_MS = 200

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)  # its super().__init__() is object's: ModuleLogic is first in the MRO
        ModuleLogic.__init__(self, MODULE_DIRECTORY, [Path(sys.executable).parent, Path(slicer.app.slicerHome) / "bin"],
                             slicer.app.temporaryPath)
        self._timer = None

    def getParameterNode(self):
        return LiverTumorSegParameterNode(super().getParameterNode())

    @staticmethod
    def installDependencies():
        """pip-install the missing requirements (no questions asked); LiverTumorSegError says what to do on failure."""
        dependencies.install_requirements(REQUIREMENTS_FILE, sys.path, slicer.util.pip_install, dependencies.slicer_pydeps(),
                                          prompt_install=False, prompt_restart=not slicer.app.testingEnabled(),
                                          requester="LiverTumorSeg", skip_in_testing=False)

    def startPolling(self):
        """Poll the run and the download with a Qt timer while either of them goes on."""
        if self._timer is None:
            self._timer = qt.QTimer()
            self._timer.setInterval(self.POLL_INTERVAL_MS)
            self._timer.connect("timeout()", self._poll)
            self._timer.start()

    def _poll(self):
        if not self.poll():
            self._timer.stop()
            self._timer = None

    @staticmethod
    def exportDicomSeg(segmentationNode, volumeNode, path):
        """Write the liver and tumour segments as a DICOM SEG of the DICOM series ``volumeNode`` was loaded from, to
        the new file ``path`` (``LiverTumorSegLib.dicom_export``); DicomSegUnavailable when the series allows none."""
        from LiverTumorSegLib.dicom_export import export_dicom_seg

        return export_dicom_seg(segmentationNode, volumeNode, path, slicer.dicomDatabase.fileForInstance)

    def showResults(self, volumeNode, segmentationNode, tableNode):
        """CT in the slice views with the segments on top, surfaces in 3D, the volumetry in the table view."""
        ModuleLogic.showResults(self, volumeNode, segmentationNode, tableNode)
        if slicer.app.layoutManager() is None:  # Slicer without its main window
            return
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(tableNode.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        slicer.app.layoutManager().threeDWidget(0).threeDView().resetFocalPoint()


class LiverTumorSegTest(ScriptedLoadableModuleTest):
    """Self-test in Slicer: the panel, a phantom segmented and cancelled through the Logic, a resection plan (the
    checks of ``LiverTumorSegLib.selftest``; the engine modules the Logic uses are tested outside Slicer too)."""

    def runTest(self):
        for test in (self.test_ApplyNeedsInputVolume, self.test_SegmentPhantom, self.test_CancelLeavesSceneUnchanged,
                     self.test_ResectionPlanning):
            slicer.mrmlScene.Clear()
            self.delayDisplay(test.__name__)
            test()

    def _logic(self):
        LiverTumorSegLogic.installDependencies()  # installs only what is missing
        return LiverTumorSegLogic()

    def _phantom(self):
        from LiverTumorSegLib import selftest

        return selftest.make_phantom_volume(slicer.mrmlScene, 11, size="small")  # (volume node, phantom)

    def test_ApplyNeedsInputVolume(self):
        slicer.util.selectModule("LiverTumorSeg")  # entering the module connects its parameter node
        widget = slicer.util.getModuleWidget("LiverTumorSeg")
        parameterNode = widget.logic.getParameterNode()
        parameterNode.inputVolume = None
        self.assertFalse(widget.ui.applyButton.enabled)
        parameterNode.inputVolume = self._phantom()[0]
        self.assertTrue(widget.ui.applyButton.enabled and widget.ui.applyButton.text == "Apply")

    def test_SegmentPhantom(self):
        from LiverTumorSegLib import selftest

        logic = self._logic()
        volume, phantom = self._phantom()
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        study = shNode.CreateStudyItem(shNode.CreateSubjectItem(shNode.GetSceneItemID(), "Phantom patient"), "CT study")
        shNode.SetItemParent(shNode.GetItemByDataNode(volume), study)
        with tempfile.TemporaryDirectory(prefix="LiverTumorSegTest-") as folder:
            progress = []
            result = logic.process(volume, wait=True, keepOutputFolder=Path(folder) / "outputs",
                                   progressCallback=lambda fraction, text, stage: progress.append(fraction))
            self.assertTrue(progress and progress == sorted(progress), "progress must be reported and never go back")
            labels, volumetry = selftest.check_output_folder(Path(folder) / "outputs", reference=phantom.image)
        self.assertEqual(volumetry, result.volumetry)
        selftest.check_result_nodes(result.segmentation_node, result.table_node, result.volumetry,
                                    labels=result.labels.array, reference_volume_node=volume)
        selftest.check_liver_found(result.labels.array, phantom.label)
        for node in (result.segmentation_node, result.table_node):
            self.assertEqual(shNode.GetItemParent(shNode.GetItemByDataNode(node)), study, "results go to the CT's study")
        self.assertTrue(result.segmentation_node.GetDisplayNode().GetVisibility3D())
        self.assertEqual(slicer.app.applicationLogic().GetSelectionNode().GetActiveTableID(), result.table_node.GetID())
        self.assertIsNone(logic.runningTemporaryFolder())

    def test_CancelLeavesSceneUnchanged(self):
        logic = self._logic()
        volume, _ = self._phantom()
        nodesBefore, finished = slicer.mrmlScene.GetNumberOfNodes(), []
        logic.process(volume, completedCallback=finished.append)
        temporaryFolder = logic.runningTemporaryFolder()
        self.assertTrue(logic.isRunning() and temporaryFolder.is_dir())
        started = time.monotonic()
        while not finished and time.monotonic() - started < 120.0:
            if time.monotonic() - started > 2.0:
                logic.cancel()
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertTrue(finished, "the run did not end after cancel")
        self.assertIn(finished[0].status, ("cancelled", "completed"))  # a very fast machine may finish first
        if finished[0].status == "cancelled":
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.assertFalse(temporaryFolder.exists() or logic.isRunning())

    def test_ResectionPlanning(self):
        import numpy as np

        from LiverTumorSegLib import mrml_nodes
        from LiverTumorSegLib.image_io import Image

        logic = LiverTumorSegLogic()
        volume, phantom = self._phantom()
        labels = Image(np.asarray(phantom.label, dtype=np.uint8), phantom.image.geometry)
        node = logic.getParameterNode()
        node.inputVolume = volume
        node.outputSegmentation = mrml_nodes.segmentation_node_from_labels(slicer.mrmlScene, labels, volume, name="Truth")
        centre = mrml_nodes.lps_to_ras(labels.geometry.index_to_physical(np.argwhere(labels.array > 0).mean(axis=0)))
        node.resectionPlane = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsPlaneNode", "Cut")
        node.resectionPlane.SetCenterWorld(*centre)
        node.resectionPlane.SetNormalWorld(-1.0, 0.0, 0.0)  # RAS: resect the patient's left
        node.liverState = "chemotherapy"
        planned = logic.planResection(node)
        self.assertTrue(0.0 < planned.plan.result["flr_percent"] < 100.0)
        self.assertEqual(planned.plan.result["threshold_percent"], 30.0)
        node.resectionPlane.SetCenterWorld(centre[0] + 10.0, centre[1], centre[2])  # moved: the same nodes are refilled
        moved = logic.planResection(node, reuseLabels=True)
        self.assertIs(moved.table_node, planned.table_node)
        self.assertNotEqual(moved.plan.result["flr_percent"], planned.plan.result["flr_percent"])
