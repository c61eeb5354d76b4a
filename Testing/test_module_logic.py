"""The Slicer module's Logic without Qt (``LiverTumorSegLib.module_logic``) on real MRML (slicer-core).

A segmentation run with a model chosen by name and a model download go through real engine processes (this
Python in place of PythonSlicer); the lab's model comes from the real HTTP server of ``test_model_registry``.
"""

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from test_model_registry import NAME, lab_zip, models, server  # noqa: F401 - lab_zip, models and server are fixtures
from test_scene_run import bundle, small_ct  # noqa: F401 - fixtures

from LiverTumorSegLib import module_logic
from LiverTumorSegLib.errors import BundleError, LiverTumorSegError
from LiverTumorSegLib.model_registry import INDEX_ENV

MODULE_DIR = Path(__file__).resolve().parents[1] / "LiverTumorSeg"


class PolledLogic(module_logic.ModuleLogic):
    """The Logic as the module subclasses it, with a loop in place of the Qt timer."""

    def __init__(self, temporary_root):
        super().__init__(MODULE_DIR, temporary_root=temporary_root, python_executable=sys.executable)
        self.polling_started = 0

    def startPolling(self):
        self.polling_started += 1

    def poll_until_idle(self, timeout=600):
        started = time.monotonic()
        while self.poll():
            assert time.monotonic() - started < timeout, "the background work did not end"
            time.sleep(0.1)


def test_the_packages_of_this_python_are_complete(tmp_path):
    assert PolledLogic(tmp_path).missingDependencies() == []


@pytest.mark.slow
def test_a_run_with_a_model_chosen_by_name(small_ct, bundle, models, tmp_path):
    from LiverTumorSegLib import selftest

    shutil.copytree(bundle, models / "untrained")  # an installed model, as `livertumorseg models import` leaves it
    logic = PolledLogic(tmp_path / "temporary")
    with pytest.raises(BundleError, match="The model 'not-installed' is not installed. Press Download"):
        logic.process(small_ct.volume, modelName="not-installed", wait=True)
    result = logic.process(small_ct.volume, modelName="untrained", wait=True, keepOutputFolder=tmp_path / "kept")
    assert result.succeeded, result.message
    run = json.loads((tmp_path / "kept" / "run.json").read_text(encoding="utf-8"))
    assert run["bundle_path"] == str(models / "untrained")  # `segment --model untrained` ran it
    assert result.segmentation_node.GetDisplayNode().GetVisibility3D()  # shown by showResults
    assert logic.polling_started == 0 and not logic.isRunning() and logic.runningTemporaryFolder() is None
    assert list((tmp_path / "temporary").iterdir()) == []
    for node in (result.segmentation_node, result.table_node):
        selftest.remove_node(small_ct.scene, node)


@pytest.mark.slow
def test_a_run_and_a_download_at_the_same_time(small_ct, bundle, server, models, monkeypatch, tmp_path):
    from LiverTumorSegLib import selftest

    monkeypatch.setenv(INDEX_ENV, server.publish())  # the download process inherits the environment
    logic, ended = PolledLogic(tmp_path / "temporary"), []
    logic.process(small_ct.volume, bundlePath=str(bundle), completedCallback=lambda result: ended.append(result))
    logic.downloadModel(NAME, completedCallback=lambda outcome: ended.append(outcome))
    assert logic.isRunning() and logic.isDownloading() and logic.polling_started == 2
    with pytest.raises(LiverTumorSegError, match="A segmentation is already running"):
        logic.process(small_ct.volume, bundlePath=str(bundle))
    with pytest.raises(LiverTumorSegError, match="A model is already being downloaded"):
        logic.downloadModel(NAME)
    logic.poll_until_idle()
    statuses = sorted((type(item).__name__, item.status) for item in ended)
    assert statuses == [("RunOutcome", "completed"), ("SceneRunResult", "completed")], [item.message for item in ended]
    assert (models / NAME / "manifest.json").is_file()
    result = next(item for item in ended if type(item).__name__ == "SceneRunResult")
    for node in (result.segmentation_node, result.table_node):
        selftest.remove_node(small_ct.scene, node)


@pytest.mark.slow
def test_a_failed_run_in_wait_mode_raises_with_the_result(small_ct, tmp_path):
    logic = PolledLogic(tmp_path / "temporary")
    nodes = small_ct.scene.GetNumberOfNodes()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "manifest.json").write_text("{}", encoding="utf-8")
    with pytest.raises(module_logic.ProcessingError) as raised:
        logic.process(small_ct.volume, bundlePath=str(damaged), useRadiomicsFilter=False, wait=True)
    assert raised.value.result.exit_code == 4 and str(raised.value) == raised.value.result.message
    assert small_ct.scene.GetNumberOfNodes() == nodes and not logic.isRunning()
