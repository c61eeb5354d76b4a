"""Model registry: the index of model bundles, the per-user models folder, download, import and removal.

The index (``models/Models.json``, package data beside the bundled model) lists each model's name,
version, description, training data, licence and the engine version it needs. The bundled model is
marked ``"bundled": true``; a downloadable one has the ``url``, ``size`` (bytes) and ``sha256`` of its
zip. A lab publishes its own index (a file or an http(s) URL, with URLs relative to it allowed) and
passes it as ``--index`` or ``$LIVERTUMORSEG_MODEL_INDEX``; its models are listed beside the shipped ones.

Installed models are bundle folders ``<models folder>/<name>/`` (``$LIVERTUMORSEG_MODELS_DIR``, else the
per-user cache folder that platformdirs gives). A download goes to ``.downloads/<name>-<version>.zip.part``
and resumes from there with an HTTP Range request, after a dropped connection or in a later run; its size
and sha256 are checked before it is unpacked. A zip (downloaded or imported) is unpacked into a temporary
folder beside the target, verified there by :func:`.bundle.load_bundle`, and only then renamed into
place, so a model is either completely installed or not at all.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from . import __version__
from .bundle import DEFAULT_BUNDLE, MANIFEST, check_engine_version, load_bundle, sha256_of
from .errors import BundleError, Cancelled, OutputError, UsageError
from .image_io import atomic_path

INDEX_FORMAT, INDEX_VERSIONS = "livertumorseg-model-index", (1,)
#: The index shipped with the engine; it lists the bundled model.
SHIPPED_INDEX = DEFAULT_BUNDLE.parent / "Models.json"
INDEX_ENV, MODELS_DIR_ENV = "LIVERTUMORSEG_MODEL_INDEX", "LIVERTUMORSEG_MODELS_DIR"
DOWNLOADS = ".downloads"
NOT_STATED = "not stated"
#: Model names are folder names: letters, digits, '.', '_' and '-'.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
#: Fresh requests after a dropped connection within one download (each resumes where the last one stopped).
RETRIES = 3
TIMEOUT_S = 30
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

Progress = Callable[[str, float], None]
Cancel = Callable[[], bool]


@dataclass
class Model:
    """One model as the registry shows it; ``status`` is "bundled", "installed" or "available"."""

    name: str
    version: str
    status: str
    description: str
    training_data: str
    licence: str
    engine_version: Optional[str]
    path: Optional[str] = None  # the bundle folder, for bundled and installed models
    url: Optional[str] = None
    size: Optional[int] = None
    index_version: Optional[str] = None  # the index's version when it differs from the installed one

    def as_dict(self) -> dict:
        return asdict(self)


def models_dir(directory: str | os.PathLike | None = None) -> Path:
    """The folder of installed models: ``directory``, else ``$LIVERTUMORSEG_MODELS_DIR``, else the user cache."""
    if directory is not None:
        return Path(directory)
    if os.environ.get(MODELS_DIR_ENV):
        return Path(os.environ[MODELS_DIR_ENV])
    import platformdirs

    return Path(platformdirs.user_cache_dir("LiverTumorSeg", appauthor=False)) / "models"


def read_index(source: str | os.PathLike) -> list[dict]:
    """The validated entries of one index (file path or URL); relative download URLs made absolute."""
    source = str(source)
    base = source if _URL.match(source) else Path(source).resolve().as_uri()
    try:
        if _URL.match(source):
            with urllib.request.urlopen(_request(source), timeout=TIMEOUT_S) as response:
                text = response.read().decode("utf-8")
        else:
            text = Path(source).read_text(encoding="utf-8")
        document = json.loads(text)
    except (OSError, urllib.error.URLError, http.client.HTTPException) as error:
        raise BundleError(f"Cannot read the model index '{source}' ({_reason(error)}). Check the path or URL "
                          "(--index, $LIVERTUMORSEG_MODEL_INDEX) and the network connection.") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise BundleError(f"The model index '{source}' is not valid JSON ({error}).") from None
    if not isinstance(document, dict) or document.get("format") != INDEX_FORMAT \
            or document.get("format_version") not in INDEX_VERSIONS or not isinstance(document.get("models"), list):
        raise BundleError(f"'{source}' is not a LiverTumorSeg model index (an object with \"format\": "
                          f"\"{INDEX_FORMAT}\", \"format_version\": 1 and a \"models\" list).")
    return [_checked_entry(entry, source, base) for entry in document["models"]]


def _checked_entry(entry, source: str, base: str) -> dict:
    where = f"The model index '{source}'"
    if not isinstance(entry, dict) or not NAME.fullmatch(str(entry.get("name", ""))) or not entry.get("version"):
        raise BundleError(f"{where} has an entry without a valid name and version: {entry!r}. Names use letters, "
                          "digits, '.', '_' and '-'.")
    if entry.get("bundled"):
        if Path(source) != SHIPPED_INDEX:
            raise BundleError(f"{where} marks '{entry['name']}' as bundled; only the engine's own index lists "
                              "bundled models. Give it a url, size and sha256.")
        return {**entry, "index": source}
    if not (isinstance(entry.get("url"), str) and isinstance(entry.get("size"), int)
            and re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256", "")))):
        raise BundleError(f"{where}: '{entry['name']}' needs a url, its size in bytes and the sha256 (64 hex digits) "
                          "of its zip.")
    return {**entry, "url": urllib.parse.urljoin(base, entry["url"]), "index": source}


def index_entries(index: str | os.PathLike | None = None) -> dict[str, dict]:
    """Name → entry over the shipped index and the extra one (``index``, else ``$LIVERTUMORSEG_MODEL_INDEX``)."""
    extra = index if index is not None else os.environ.get(INDEX_ENV) or None
    entries: dict[str, dict] = {}
    for source in [SHIPPED_INDEX] + ([extra] if extra else []):
        for entry in read_index(source):
            if entry["name"] in entries:
                raise BundleError(f"The model '{entry['name']}' is listed by both '{entries[entry['name']]['index']}' "
                                  f"and '{source}'. Rename one of them.")
            entries[entry["name"]] = entry
    return entries


def list_models(index: str | os.PathLike | None = None, directory: str | os.PathLike | None = None) -> list[Model]:
    """Every model: bundled, installed (with or without an index entry) and available for download."""
    entries, folder = index_entries(index), models_dir(directory)
    installed = {path.name: path for path in _installed_folders(folder)}
    models = []
    for name, entry in entries.items():
        if entry.get("bundled"):
            models.append(_model(DEFAULT_BUNDLE.parent / name, entry, "bundled"))
        elif name in installed:
            models.append(_model(installed.pop(name), entry, "installed"))
        else:
            models.append(Model(name, str(entry["version"]), "available", entry.get("description", ""),
                                _stated(entry.get("training_data")), _stated(entry.get("licence")),
                                entry.get("engine_version"), url=entry["url"], size=entry["size"]))
    return models + [_model(path, {}, "installed") for path in installed.values()]


def _installed_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if not path.name.startswith(".") and (path / MANIFEST).is_file())


def _model(path: Path, entry: dict, status: str) -> Model:
    """A bundled or installed model: its manifest's statements first, the index entry's where it has none."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    training = manifest.get("training") if isinstance(manifest.get("training"), dict) else {}
    dataset = f"dataset '{training['data']}'" if training.get("data") else None
    version = str(manifest.get("version") or entry.get("version") or "")
    return Model(
        path.name, version, status, manifest.get("description") or entry.get("description", ""),
        _stated("; ".join(training.get("data_sources") or []), entry.get("training_data"), dataset),
        _stated(manifest.get("licence"), entry.get("licence")),
        manifest.get("engine_version") or entry.get("engine_version"), path=str(path),
        index_version=str(entry["version"]) if entry and str(entry["version"]) != version else None,
    )


def _stated(*texts) -> str:
    """The first statement that says something, else "not stated"."""
    return next((str(text) for text in texts if text and text != NOT_STATED), NOT_STATED)


def describe(model: Model) -> str:
    """A few lines on a model for people: name, version, status, description, training data, licence."""
    state = {"bundled": "bundled with the engine", "installed": f"installed in {model.path}",
             "available": f"available for download ({model.size / 1e6:.1f} MB)" if model.size else "available"}
    lines = [f"{model.name} {model.version}  [{state[model.status]}]"]
    if model.index_version:
        lines.append(f"  the index lists version {model.index_version}: 'livertumorseg models download {model.name}'")
    lines += [f"  {model.description}" if model.description else "  (no description)",
              f"  training data: {model.training_data}", f"  licence: {model.licence}"]
    return "\n".join(lines)


def resolve_model(name: str, directory: str | os.PathLike | None = None) -> Path:
    """The bundle folder of the bundled or installed model ``name`` (no network); :class:`BundleError` otherwise."""
    bundled = [entry["name"] for entry in read_index(SHIPPED_INDEX) if entry.get("bundled")]
    if name in bundled:
        return DEFAULT_BUNDLE.parent / name
    target = models_dir(directory) / name
    if NAME.fullmatch(name) and (target / MANIFEST).is_file():
        return target
    known = bundled + [path.name for path in _installed_folders(models_dir(directory))]
    raise BundleError(f"No model '{name}' is installed (available here: {', '.join(known)}). "
                      f"'livertumorseg models list' shows the models; 'livertumorseg models download {name}' "
                      "installs one of the index.")


def download_model(name: str, *, index: str | os.PathLike | None = None, directory: str | os.PathLike | None = None,
                   progress: Progress | None = None, cancel: Cancel | None = None) -> Path:
    """Download, verify and install the model ``name`` of the index; return its folder (also when already there)."""
    entries = index_entries(index)
    if name not in entries:
        raise BundleError(f"The model index has no model '{name}' (it lists: {', '.join(entries)}). "
                          "'livertumorseg models list' shows the models; --index adds a lab's own index.")
    entry = entries[name]
    if entry.get("bundled"):
        return DEFAULT_BUNDLE.parent / name
    folder = models_dir(directory)
    current = _model(folder / name, {}, "installed") if (folder / name / MANIFEST).is_file() else None
    if current is not None and current.version == str(entry["version"]):
        return folder / name
    check_engine_version(entry.get("engine_version"), f"The model '{name}' {entry['version']}")
    archive = _fetch(entry, folder / DOWNLOADS, progress or (lambda stage, fraction: None), cancel)
    try:
        return install_zip(archive, directory=folder, overwrite=True, expected=(name, str(entry["version"])))
    finally:
        archive.unlink(missing_ok=True)


def _fetch(entry: dict, downloads: Path, progress: Progress, cancel: Cancel | None) -> Path:
    """The verified zip of ``entry`` in ``downloads``: resumed from a partial file, retried after a dropped connection."""
    part = downloads / f"{entry['name']}-{entry['version']}.zip.part"
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"Cannot create '{downloads}' ({error.strerror}). Set {MODELS_DIR_ENV} to a writable folder.") from None
    size, stage = entry["size"], f"download {entry['name']}"
    for attempt in range(RETRIES + 1):
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        if have == size:
            break
        try:
            _transfer(entry["url"], part, have, size, lambda done: progress(stage, done / size), cancel)
        except _Interrupted as error:
            if attempt == RETRIES:
                raise BundleError(f"The download of '{entry['name']}' from {entry['url']} was interrupted ({error}). "
                                  "Run the same command again: it resumes where it stopped.") from None
    if sha256_of(part) != entry["sha256"]:
        part.unlink()
        raise BundleError(f"The file downloaded from {entry['url']} does not match the sha256 in the model index "
                          f"('{entry['index']}'): it was changed or damaged. Nothing was installed; tell the index's "
                          "publisher, or try again later.")
    return part


class _Interrupted(Exception):
    """The connection closed before the whole file arrived (what has arrived is kept)."""


def _transfer(url: str, part: Path, start: int, size: int, done: Callable[[int], None], cancel: Cancel | None) -> None:
    """Append the bytes from ``start`` on to ``part`` (from 0 if the server ignores the Range request)."""
    headers = {"Range": f"bytes={start}-"} if start else {}
    try:
        response = urllib.request.urlopen(_request(url, headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        raise BundleError(f"The server refused the download of {url}: HTTP {error.code} {error.reason}. Check the "
                          "URL in the model index; nothing was installed.") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise BundleError(f"Cannot reach {urllib.parse.urlsplit(url).netloc or url} to download the model "
                          f"({_reason(error)}). Check the network connection (and a proxy), then run the same "
                          "command again; nothing was installed.") from None
    with response:
        if start and getattr(response, "status", None) != 206:
            start = 0  # the server sends the whole file
        received = start
        with open(part, "ab" if start else "wb") as out:
            while received < size:
                if cancel is not None and cancel():
                    raise Cancelled("Download cancelled; nothing was installed (the part already downloaded is kept "
                                    "and the next download resumes from it).")
                try:
                    block = response.read(min(1 << 16, size - received))
                except (http.client.IncompleteRead, OSError) as error:
                    raise _Interrupted(f"{received} of {size} bytes received: {_reason(error)}") from None
                if not block:
                    raise _Interrupted(f"the server closed the connection after {received} of {size} bytes")
                out.write(block)
                received += len(block)
                done(received)


def install_zip(zip_path: str | os.PathLike, *, directory: str | os.PathLike | None = None, overwrite: bool = False,
                expected: tuple[str, str] | None = None) -> Path:
    """Install a bundle zip (manifest and files at its top or in one folder) as ``<models folder>/<name>``.

    ``expected`` (name, version) is what the index promised for a download. The zip's manifest must need no
    newer engine, and the unpacked bundle must pass :func:`.bundle.load_bundle` before it is moved into place.
    """
    zip_path = Path(zip_path)
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as error:
        raise BundleError(f"Cannot open '{zip_path}' as a zip file ({_reason(error)}). Give the .zip of a model "
                          "bundle (livertumorseg-train export --zip).") from None
    with archive:
        members = _bundle_members(archive, zip_path)
        try:
            manifest = json.loads(archive.read(next(m for m, file in members.items() if file == MANIFEST)))
            name, version = str(manifest["name"]), str(manifest.get("version", ""))
        except (ValueError, KeyError, TypeError, StopIteration):
            raise BundleError(f"'{zip_path}' holds no readable {MANIFEST} with a model name.") from None
        listed = {MANIFEST, *(manifest.get("files") if isinstance(manifest.get("files"), dict) else {})}
        unlisted = sorted(file for file in members.values() if file not in listed)
        if unlisted:
            raise BundleError(f"'{zip_path}' holds {', '.join(unlisted)}, which its {MANIFEST} does not list: it is not "
                              "a model bundle zip as exported. Export or download it again.")
        if expected is not None and (name, version) != expected:
            raise BundleError(f"The index promised {' '.join(expected)} but the downloaded zip holds {name} {version}. "
                              "Nothing was installed; tell the index's publisher.")
        if not NAME.fullmatch(name):
            raise BundleError(f"'{zip_path}': the model name {name!r} cannot be a folder name (use letters, digits, "
                              "'.', '_' and '-'); export the bundle again with another --name.")
        if name in [entry["name"] for entry in read_index(SHIPPED_INDEX)]:
            raise BundleError(f"'{zip_path}' holds a model named '{name}', the name of the bundled model. Export it "
                              "with another --name.")
        check_engine_version(manifest.get("engine_version"), f"The model '{name}' {version} in '{zip_path}'")
        target = models_dir(directory) / name
        if target.exists() and not overwrite:
            raise OutputError(f"A model '{name}' is already installed in '{target}'. Pass --overwrite to replace it, "
                              f"or remove it first ('livertumorseg models remove {name}').")
        with atomic_path(target, overwrite=True) as tmp:
            tmp.mkdir()
            for member, file in members.items():
                with archive.open(member) as source, open(tmp / file, "wb") as out:
                    shutil.copyfileobj(source, out)
            try:
                load_bundle(tmp)
            except BundleError as error:
                raise BundleError(f"'{zip_path}' does not hold a valid model bundle, so nothing was installed: "
                                  f"{error}") from None
    return target


def _bundle_members(archive: zipfile.ZipFile, zip_path: Path) -> dict[str, str]:
    """Zip member → bundle file name; only plain files at the top or inside a single top folder are accepted."""
    files = [info.filename for info in archive.infolist() if not info.is_dir()]
    tops = {name.split("/")[0] for name in files if "/" in name}
    prefix = f"{next(iter(tops))}/" if len(tops) == 1 and all("/" in name for name in files) else ""
    members = {}
    for name in files:
        file = name[len(prefix):]
        if not file or "/" in file or "\\" in file or file in (".", ".."):
            raise BundleError(f"'{zip_path}' holds '{name}', which is not part of a model bundle (a bundle zip holds "
                              f"{MANIFEST} and its ONNX and JSON files, at its top or in one folder).")
        members[name] = file
    if MANIFEST not in members.values():
        raise BundleError(f"'{zip_path}' holds no {MANIFEST}: it is not a model bundle zip.")
    return members


def remove_model(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Delete the installed model ``name`` and its partial downloads; the bundled model cannot be removed."""
    if name in [entry["name"] for entry in read_index(SHIPPED_INDEX) if entry.get("bundled")]:
        raise UsageError(f"'{name}' is the bundled model, part of the engine; it cannot be removed.")
    folder = models_dir(directory)
    target = folder / name
    if not NAME.fullmatch(name) or not (target / MANIFEST).is_file():
        installed = [path.name for path in _installed_folders(folder)]
        raise BundleError(f"No installed model '{name}' in '{folder}' (installed: {', '.join(installed) or 'none'}).")
    # Renamed first, so that an interrupted removal never leaves a half-deleted bundle under the model's name.
    doomed = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".removing", dir=folder))
    os.replace(target, doomed / name)
    shutil.rmtree(doomed)
    for part in (folder / DOWNLOADS).glob(f"{name}-*.zip.part"):
        part.unlink()
    return target


def pack_bundle(bundle_dir: str | os.PathLike, zip_path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a verified bundle as a zip that :func:`install_zip` imports: its files in one folder named after it."""
    bundle = load_bundle(bundle_dir)
    folder = str(bundle.manifest.get("name") or bundle.path.name)
    with atomic_path(zip_path, overwrite=overwrite) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for file in [MANIFEST, *bundle.manifest["files"]]:
                archive.write(bundle.path / file, f"{folder}/{file}")
    return Path(zip_path)


def _request(url: str, headers: dict | None = None) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"User-Agent": f"livertumorseg/{__version__}", **(headers or {})})


def _reason(error: Exception) -> str:
    reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
    return str(reason).strip() or type(error).__name__
