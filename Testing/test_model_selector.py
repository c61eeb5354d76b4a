"""The Slicer module's model selector (``LiverTumorSegLib.model_selector``), without Slicer.

The registry is the real one with a temporary models folder ($LIVERTUMORSEG_MODELS_DIR) and a lab's model
index served by a real HTTP server on 127.0.0.1 (the fixtures of ``test_model_registry``); downloads run
``livertumorseg models download`` in a real child process, as the module runs it with PythonSlicer.
"""

import os
import socket
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from test_model_registry import (  # noqa: F401 - lab_zip, models and server are fixtures
    LICENCE, NAME, VERSION, _Handler, _publish, _zip_requests, lab_zip, models, server,
)

from LiverTumorSegLib import cli, model_selector, process
from LiverTumorSegLib.bundle import DEFAULT_BUNDLE, load_bundle
from LiverTumorSegLib.errors import BundleError
from LiverTumorSegLib.model_registry import INDEX_ENV, MODELS_DIR_ENV

ENGINE_DIR = Path(__file__).resolve().parents[1] / "LiverTumorSeg"
DEMO = "LiverTumorSeg-demo"


def _download(name, models_dir, index, progress=None):
    """A ModelDownload as the module's Logic starts one, with this Python instead of PythonSlicer."""
    environment = process.engine_environment({**os.environ, MODELS_DIR_ENV: str(models_dir), INDEX_ENV: index}, [ENGINE_DIR])
    return model_selector.ModelDownload(sys.executable, name, progress, environment=environment,
                                        working_directory=str(ENGINE_DIR))


class _StallingHandler(_Handler):
    """Sends the first ``server.stall_after`` bytes of the zip, then holds the connection until ``server.release``."""

    def do_GET(self):
        server = self.server
        if not (self.path.endswith(".zip") and server.stall_after and not self.headers.get("Range")):
            return super().do_GET()
        server.requests.append({"path": self.path, "range": None})
        body = server.files[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:server.stall_after])
        self.wfile.flush()
        server.release.wait(timeout=120)


@pytest.fixture
def stalling_server(lab_zip):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _StallingHandler)
    httpd.requests, httpd.zip_cuts, httpd.stall_after, httpd.release = [], [], 500_000, threading.Event()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.files = {"/bundles/lab.zip": lab_zip.read_bytes()}
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


def test_choices_list_the_bundled_and_the_downloadable_models_with_their_statements(server, models, monkeypatch):
    monkeypatch.setenv(INDEX_ENV, server.publish())
    choices, problem = model_selector.model_choices()
    assert problem == ""
    demo, lab = choices
    manifest = load_bundle(DEFAULT_BUNDLE).manifest
    assert demo == model_selector.ModelChoice(DEMO, f"{DEMO} {manifest['version']} (bundled)", demo.details,
                                              installed=True, downloadable=False)
    assert demo.details.splitlines()[1:] == [
        f"  {manifest['description']}", f"  training data: {'; '.join(manifest['training']['data_sources'])}",
        "  licence: Apache-2.0"]
    size_mb = round(len(server.files["/bundles/lab.zip"]) / 1e6)
    assert (lab.name, lab.text, lab.installed, lab.downloadable) == (NAME, f"{NAME} {VERSION} (download, {size_mb} MB)",
                                                                     False, True)
    assert lab.details.splitlines()[1:] == ["  A lab's liver model.", "  training data: lab CTs", f"  licence: {LICENCE}"]


def test_an_unreadable_extra_index_still_offers_the_shipped_models(models, monkeypatch):
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv(INDEX_ENV, f"http://127.0.0.1:{closed}/index.json")
    choices, problem = model_selector.model_choices()
    assert [choice.name for choice in choices] == [DEMO]
    assert problem.startswith(f"Cannot read the model index 'http://127.0.0.1:{closed}/index.json'")


def test_without_the_registry_packages_the_choices_say_to_install_them(monkeypatch):
    """In Slicer before the first Apply, platformdirs (the per-user models folder) is not installed yet."""
    monkeypatch.delenv(MODELS_DIR_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "platformdirs", None)  # what Python's import finds for a missing package
    choices, problem = model_selector.model_choices()
    assert choices == [] and problem.startswith("The models can be listed once the Python packages of the "
                                                "segmentation are installed (press Apply once): ")


def test_the_model_a_run_uses(models, tmp_path):
    assert model_selector.model_for_run() == ({}, None)  # the engine's bundled model
    assert model_selector.model_for_run(DEMO) == ({"model": DEMO}, str(DEFAULT_BUNDLE))
    folder = str(tmp_path / "my bundle")
    assert model_selector.model_for_run(DEMO, folder) == ({"bundle_path": folder}, folder)  # the Advanced folder wins
    with pytest.raises(BundleError, match=f"The model '{NAME}' is not installed. Press Download"):
        model_selector.model_for_run(NAME)
    arguments = process.engine_command_arguments(tmp_path / "input.nrrd", tmp_path / "out", model=NAME)
    parsed = cli._parser().parse_args(arguments[2:])
    assert (parsed.model, parsed.bundle) == (NAME, None)


@pytest.mark.slow
def test_a_download_in_the_background_installs_the_model(server, models):
    fractions, texts = [], []
    download = _download(NAME, models, server.publish(), lambda fraction, text, stage: (fractions.append(fraction),
                                                                                        texts.append((text, stage))))
    outcome = download.wait(timeout=300)
    assert (outcome.status, outcome.exit_code, outcome.message) == ("completed", 0, f"The model '{NAME}' is installed.")
    assert fractions[-1] == 1.0 and fractions == sorted(fractions) and texts[-1] == (f"Downloading {NAME}: 100%", "download")
    assert load_bundle(models / NAME).manifest["version"] == VERSION
    choices, _ = model_selector.model_choices(directory=models)  # the index is no longer in this process's env
    assert [(c.name, c.text, c.installed, c.downloadable) for c in choices][1] == (
        NAME, f"{NAME} {VERSION} (installed)", True, False)
    assert model_selector.model_for_run(NAME) == ({"model": NAME}, str(models / NAME))


@pytest.mark.slow
def test_a_cancelled_download_installs_nothing_and_the_next_one_resumes(stalling_server, models):
    index = _publish(stalling_server)
    fractions = []
    download = _download(NAME, models, index, lambda fraction, text, stage: fractions.append(fraction))
    while not fractions and not download.poll(timeout=0.2):  # wait for the first bytes
        pass
    assert fractions and 0.0 < fractions[-1] < 1.0
    download.cancel()
    outcome = download.wait(timeout=120)
    assert outcome.status == "cancelled" and outcome.exit_code == 130
    assert "nothing was installed" in outcome.message and "resumes" in outcome.message
    assert not (models / NAME).exists()
    part = models / ".downloads" / f"{NAME}-{VERSION}.zip.part"
    assert 0 < part.stat().st_size <= stalling_server.stall_after

    received = part.stat().st_size
    stalling_server.stall_after = 0  # the next download gets the rest
    outcome = _download(NAME, models, index).wait(timeout=300)
    assert outcome.status == "completed", outcome.message
    assert [r["range"] for r in _zip_requests(stalling_server)] == [None, f"bytes={received}-"]
    assert load_bundle(models / NAME).manifest["name"] == NAME and not part.exists()


def test_a_failed_download_says_what_went_wrong(server, models):
    outcome = _download(NAME, models, server.publish(sha256="0" * 64)).wait(timeout=300)
    assert (outcome.status, outcome.exit_code) == ("failed", 4)
    assert outcome.message.startswith(model_selector.DOWNLOAD_HINTS[4] + "\n\nThe file downloaded from ")
    assert "does not match the sha256" in outcome.message and not (models / NAME).exists()
    outcome = _download("no-such-model", models, server.publish()).wait(timeout=300)
    assert outcome.status == "failed" and "The model index has no model 'no-such-model'" in outcome.message
