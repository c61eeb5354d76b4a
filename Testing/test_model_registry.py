"""The model registry through `livertumorseg models` and `segment --model`, against a real HTTP server.

A zip of the bundled model under another name ("LiverTumorSeg-lab") is served by ``http.server`` on
127.0.0.1 together with a model index that points at it by a relative URL. The per-user models folder is
a temporary folder ($LIVERTUMORSEG_MODELS_DIR), never the real home.
"""

import hashlib
import json
import re
import shutil
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from LiverTumorSegLib import model_registry
from LiverTumorSegLib.bundle import DEFAULT_BUNDLE, load_bundle, sha256_of, write_bundle
from LiverTumorSegLib.cli import main
from LiverTumorSegLib.image_io import write_image
from LiverTumorSegLib.model_registry import INDEX_ENV, MODELS_DIR_ENV, pack_bundle
from LiverTumorSegLib.phantoms import generate_phantom

NAME, VERSION, LICENCE = "LiverTumorSeg-lab", "1.0.0", "CC-BY-4.0"
SOURCES = ["the bundled demo model's weights, renamed for this test"]


@pytest.fixture(scope="module")
def lab_zip(tmp_path_factory):
    """The bundled model as a lab would publish it: another name, version and licence, zipped."""
    folder = tmp_path_factory.mktemp("lab")
    demo = load_bundle(DEFAULT_BUNDLE)
    manifest = {k: v for k, v in demo.manifest.items() if k not in ("format", "format_version", "files")}
    manifest.update(name=NAME, version=VERSION, licence=LICENCE, training={**manifest["training"], "data_sources": SOURCES})
    bundle = write_bundle(folder / NAME, manifest, {name: demo.path / name for name in demo.manifest["files"]})
    return pack_bundle(bundle.path, folder / f"{NAME}.zip")


def _zip_with_manifest(source, target, **changes):
    """A copy of the bundle zip ``source`` whose manifest has ``changes``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = old.read(info)
            if info.filename.endswith("/manifest.json"):
                data = json.dumps({**json.loads(data), **changes}).encode()
            new.writestr(info.filename, data)
    return target


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files`` (path → bytes), honours "Range: bytes=N-", and drops the connection of a zip
    request after the first number of ``server.zip_cuts`` bytes, if any."""

    def do_GET(self):
        server = self.server
        server.requests.append({"path": self.path, "range": self.headers.get("Range")})
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(asked.group(1)) if asked else 0
        self.send_response(206 if asked else 200)
        if asked:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = server.zip_cuts.pop(0) if server.zip_cuts and self.path.endswith(".zip") else None
        self.wfile.write(body[start:] if cut is None else body[start:start + cut])  # HTTP/1.0: then the connection closes

    def log_message(self, *args):
        pass


@pytest.fixture
def server(lab_zip):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests, httpd.zip_cuts = [], []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.files = {"/bundles/lab.zip": lab_zip.read_bytes()}
    httpd.publish = lambda **entry: _publish(httpd, **entry)
    httpd.publish()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _publish(httpd, **changes):
    """Serve /index.json with the lab's model (``changes`` override the entry's fields)."""
    body = httpd.files["/bundles/lab.zip"]
    entry = {"name": NAME, "version": VERSION, "description": "A lab's liver model.", "training_data": "lab CTs",
             "licence": LICENCE, "engine_version": "0.1.0", "url": "bundles/lab.zip", "size": len(body),
             "sha256": hashlib.sha256(body).hexdigest(), **changes}
    index = {"format": "livertumorseg-model-index", "format_version": 1, "models": [entry]}
    httpd.files["/index.json"] = json.dumps(index).encode()
    return f"{httpd.url}/index.json"


@pytest.fixture
def models(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    monkeypatch.setenv(MODELS_DIR_ENV, str(folder))
    monkeypatch.delenv(INDEX_ENV, raising=False)
    return folder


def _run(capsys, *args):
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:  # argparse's own usage errors
        code = exit.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured


def _files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _zip_requests(server):
    return [r for r in server.requests if r["path"] == "/bundles/lab.zip"]


def test_list_shows_the_bundled_model_with_its_training_data_and_licence(models, capsys):
    code, captured = _run(capsys, "models", "list", "--json")
    assert code == 0
    (demo,) = json.loads(captured.out)
    manifest = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text(encoding="utf-8"))
    assert demo["name"] == "LiverTumorSeg-demo" and demo["status"] == "bundled" and demo["version"] == manifest["version"]
    assert demo["training_data"] == "; ".join(manifest["training"]["data_sources"])  # the bundle's own statement
    assert demo["licence"] == "Apache-2.0"  # the manifest has none: the index's
    code, captured = _run(capsys, "models", "list")
    assert "LiverTumorSeg-demo" in captured.out and "licence: Apache-2.0" in captured.out
    code, captured = _run(capsys, "models", "path", "LiverTumorSeg-demo")
    assert code == 0 and captured.out.strip() == str(DEFAULT_BUNDLE)
    code, captured = _run(capsys, "models", "path")
    assert code == 0 and captured.out.strip() == str(models)


@pytest.mark.slow
def test_download_installs_and_segment_model_uses_it(server, models, tmp_path, capsys):
    index = server.publish()
    code, captured = _run(capsys, "models", "list", "--index", index, "--json")
    lab = next(m for m in json.loads(captured.out) if m["name"] == NAME)
    assert lab["status"] == "available" and lab["url"] == f"{server.url}/bundles/lab.zip" and lab["licence"] == LICENCE

    code, captured = _run(capsys, "models", "download", NAME, "--index", index, "--progress", "none")
    assert code == 0, captured.err
    assert _files_under(models) == sorted([f"{NAME}/manifest.json", f"{NAME}/liver.onnx", f"{NAME}/tumour.onnx"])
    installed = load_bundle(models / NAME)
    assert installed.manifest["version"] == VERSION
    code, captured = _run(capsys, "models", "list", "--index", index, "--json")
    lab = next(m for m in json.loads(captured.out) if m["name"] == NAME)
    assert lab["status"] == "installed" and lab["path"] == str(models / NAME)
    assert lab["training_data"] == SOURCES[0] and lab["licence"] == LICENCE
    code, captured = _run(capsys, "models", "path", NAME)
    assert captured.out.strip() == str(models / NAME)

    ct = write_image(generate_phantom(7, size="small").image, tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    code, captured = _run(capsys, "segment", ct, "-o", out, "--model", NAME, "--threads", "2", "--progress", "none")
    assert code == 0, captured.err
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["bundle_path"] == str(models / NAME) and run["bundle"] == f"{NAME} {VERSION}"

    code, captured = _run(capsys, "models", "download", NAME, "--index", index, "--progress", "none")
    assert code == 0 and len(_zip_requests(server)) == 1  # already installed: not downloaded again


def test_model_and_bundle_together_are_a_usage_error(models, tmp_path, capsys):
    code, captured = _run(capsys, "segment", tmp_path / "ct.nii.gz", "-o", tmp_path / "out",
                          "--model", "LiverTumorSeg-demo", "--bundle", DEFAULT_BUNDLE)
    assert code == 64 and "either --bundle DIR or --model NAME" in captured.err
    code, captured = _run(capsys, "segment", tmp_path / "ct.nii.gz", "-o", tmp_path / "out", "--model", "no-such-model")
    assert code == 4 and "No model 'no-such-model' is installed" in captured.err


def test_wrong_checksum_is_refused_and_leaves_nothing(server, models, capsys):
    index = server.publish(sha256="0" * 64)
    code, captured = _run(capsys, "models", "download", NAME, "--index", index, "--progress", "none")
    assert code == 4 and "does not match the sha256" in captured.err and "Nothing was installed" in captured.err
    assert _files_under(models) == [] and not (models / NAME).exists()


def test_interrupted_download_resumes_with_a_range_request(server, models, lab_zip, monkeypatch):
    server.zip_cuts = [1_000_000]  # the first response stops after 1 MB
    fractions = []
    path = model_registry.download_model(NAME, index=server.publish(), progress=lambda stage, f: fractions.append(f))
    first, second = _zip_requests(server)
    assert first["range"] is None and second["range"] == "bytes=1000000-"
    assert fractions[-1] == 1.0 and all(a <= b for a, b in zip(fractions, fractions[1:]))
    demo = load_bundle(DEFAULT_BUNDLE)
    assert {name: sha256_of(path / name) for name in demo.manifest["files"]} == {
        name: info["sha256"] for name, info in demo.manifest["files"].items()}


def test_download_interrupted_in_one_run_resumes_in_the_next(server, models, lab_zip, monkeypatch, capsys):
    monkeypatch.setattr(model_registry, "RETRIES", 0)
    server.zip_cuts = [3_000_000]
    index = server.publish()
    code, captured = _run(capsys, "models", "download", NAME, "--index", index, "--progress", "none")
    assert code == 4 and "interrupted" in captured.err and "resumes where it stopped" in captured.err
    part = models / ".downloads" / f"{NAME}-{VERSION}.zip.part"
    assert part.stat().st_size == 3_000_000 and not (models / NAME).exists()
    assert part.read_bytes() == lab_zip.read_bytes()[:3_000_000]

    code, captured = _run(capsys, "models", "download", NAME, "--index", index, "--progress", "none")
    assert code == 0, captured.err
    assert [r["range"] for r in _zip_requests(server)] == [None, "bytes=3000000-"]
    assert not part.exists() and load_bundle(models / NAME).manifest["name"] == NAME


def test_unreachable_server_is_a_clear_error(server, models, capsys):
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    index = server.publish(url=f"http://127.0.0.1:{closed}/lab.zip")
    code, captured = _run(capsys, "models", "download", NAME, "--index", index, "--progress", "none")
    assert code == 4 and f"Cannot reach 127.0.0.1:{closed}" in captured.err and "network connection" in captured.err
    assert not (models / NAME).exists()
    code, captured = _run(capsys, "models", "list", "--index", f"http://127.0.0.1:{closed}/index.json")
    assert code == 4 and "Cannot read the model index" in captured.err


def test_a_bundle_for_a_newer_engine_is_refused(server, models, lab_zip, tmp_path, capsys):
    index = server.publish(engine_version="99.0.0")
    code, captured = _run(capsys, "models", "download", NAME, "--index", index, "--progress", "none")
    assert code == 4 and "needs LiverTumorSeg 99.0.0 or newer; this is LiverTumorSeg 0.1.0" in captured.err
    assert _zip_requests(server) == []  # refused before downloading

    newer = _zip_with_manifest(lab_zip, tmp_path / "newer.zip", engine_version="99.0.0")
    server.files["/bundles/lab.zip"] = newer.read_bytes()
    code, captured = _run(capsys, "models", "download", NAME, "--index", server.publish(), "--progress", "none")
    assert code == 4 and "needs LiverTumorSeg 99.0.0" in captured.err
    code, captured = _run(capsys, "models", "import", newer)
    assert code == 4 and "needs LiverTumorSeg 99.0.0" in captured.err
    assert _files_under(models) == []

    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(newer) as archive:
        archive.extractall(folder)
    code, captured = _run(capsys, "segment", tmp_path / "ct.nii.gz", "-o", tmp_path / "out", "--bundle", folder / NAME)
    assert code == 4 and "needs LiverTumorSeg 99.0.0" in captured.err


def test_import_offline_then_overwrite_and_remove(models, lab_zip, capsys):
    code, captured = _run(capsys, "models", "import", lab_zip)
    assert code == 0, captured.err
    assert load_bundle(models / NAME).manifest["licence"] == LICENCE
    code, captured = _run(capsys, "models", "import", lab_zip)
    assert code == 3 and "already installed" in captured.err and "--overwrite" in captured.err
    code, captured = _run(capsys, "models", "import", lab_zip, "--overwrite")
    assert code == 0 and _files_under(models) == sorted([f"{NAME}/manifest.json", f"{NAME}/liver.onnx",
                                                         f"{NAME}/tumour.onnx"])

    code, captured = _run(capsys, "models", "remove", NAME)
    assert code == 0 and not (models / NAME).exists() and _files_under(models) == []
    code, captured = _run(capsys, "models", "remove", NAME)
    assert code == 4 and f"No installed model '{NAME}'" in captured.err
    code, captured = _run(capsys, "models", "remove", "LiverTumorSeg-demo")
    assert code == 64 and "bundled model" in captured.err and (DEFAULT_BUNDLE / "manifest.json").is_file()


def test_zips_that_are_not_bundles_are_refused(models, lab_zip, tmp_path, capsys):
    renamed = _zip_with_manifest(lab_zip, tmp_path / "demo.zip", name="LiverTumorSeg-demo")
    code, captured = _run(capsys, "models", "import", renamed)
    assert code == 4 and "the name of the bundled model" in captured.err
    extra = tmp_path / "extra.zip"
    shutil.copyfile(lab_zip, extra)
    with zipfile.ZipFile(extra, "a") as archive:
        archive.writestr(f"{NAME}/run.py", "print('hello')")
    code, captured = _run(capsys, "models", "import", extra)
    assert code == 4 and "run.py" in captured.err
    damaged = _zip_with_manifest(lab_zip, tmp_path / "damaged.zip",
                                 files={"liver.onnx": {"sha256": "0" * 64}, "tumour.onnx": {"sha256": "0" * 64}})
    code, captured = _run(capsys, "models", "import", damaged)
    assert code == 4 and "checksum" in captured.err and "nothing was installed" in captured.err
    (tmp_path / "not.zip").write_text("not a zip", encoding="utf-8")
    code, captured = _run(capsys, "models", "import", tmp_path / "not.zip")
    assert code == 4 and "as a zip file" in captured.err
    assert _files_under(models) == []
