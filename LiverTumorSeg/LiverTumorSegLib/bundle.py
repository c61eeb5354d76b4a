"""Model bundles: a folder with ``manifest.json`` and ONNX files, verified before anything is loaded.

The manifest records the format version, every file with its sha256, the input contract, the components
(each an ONNX file with its role), thresholds, the selected radiomic features when present, training
provenance and metrics. Only ONNX and JSON files are ever read — no pickle — so loading a bundle cannot
run code. The training package writes bundles through :func:`write_bundle`, so both sides agree on
the format by construction.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError
from .image_io import atomic_path
from .preprocess import InputContract

FORMAT_NAME = "livertumorseg-bundle"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST = "manifest.json"
#: ``input.kind`` of the cascade's bundles (manifests without a kind are cascade bundles).
CASCADE_KIND = "cascade_2_5d"
ALLOWED_SUFFIXES = (".onnx", ".json")
#: Bundled demo model, inside the Slicer module's resources (also used by the command line).
DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "Resources" / "Models" / "LiverTumorSeg-demo"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return f"{self.manifest.get('name', self.path.name)} {self.manifest.get('version', '')}".strip()

    @property
    def kind(self) -> str:
        """How the networks read the CT: ``cascade_2_5d`` (this pipeline) or a baseline's kind (``baseline_networks``)."""
        return self.manifest["input"].get("kind", CASCADE_KIND)

    @property
    def contract(self) -> InputContract:
        """The cascade's input contract (only for ``cascade_2_5d`` bundles)."""
        if self.kind != CASCADE_KIND:
            raise BundleError(f"The bundle '{self.path}' holds a {self.kind} model, not the cascade.")
        return InputContract.from_dict(self.manifest["input"])

    def has(self, component: str) -> bool:
        return component in self.manifest["components"]

    def component(self, component: str) -> dict:
        try:
            return self.manifest["components"][component]
        except KeyError:
            raise BundleError(
                f"The model bundle '{self.path}' has no '{component}' component "
                f"(it has: {', '.join(self.manifest['components'])}). Use a bundle that includes it, "
                "or switch the stage off."
            ) from None

    def file(self, component: str) -> Path:
        return self.path / self.component(component)["file"]

    def session(self, component: str, *, device: str = "cpu", threads: int | None = None):
        """An ONNX Runtime session for a component; CUDA when asked for and available."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BundleError(
                    "--device cuda was asked for, but this onnxruntime has no CUDA support. "
                    "Install onnxruntime-gpu with a matching CUDA, or use --device cpu."
                )
            providers.insert(0, "CUDAExecutionProvider")
        return ort.InferenceSession(str(self.file(component)), options, providers=providers)


def load_bundle(path: str | os.PathLike | None = None) -> Bundle:
    """Read and verify a bundle (default: the bundled demo model); :class:`BundleError` on any mismatch."""
    path = Path(path) if path is not None else DEFAULT_BUNDLE
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(
            f"No model bundle at '{path}' (missing {MANIFEST}). Give the folder that holds {MANIFEST}, "
            "or leave --bundle out to use the bundled model."
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"'{manifest_path}' is not valid JSON ({error}). The bundle is damaged: export it again.") from None
    if manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"'{path}' is not a LiverTumorSeg model bundle (format {manifest.get('format')!r}).")
    version = manifest.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise BundleError(
            f"The bundle '{path}' has format version {version!r}; this LiverTumorSeg reads "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}. Update LiverTumorSeg, or export the bundle with a matching version."
        )
    files = manifest.get("files", {})
    for component, entry in manifest.get("components", {}).items():
        if entry.get("file") not in files:
            raise BundleError(f"Bundle '{path}': component '{component}' names a file that is not listed with a checksum.")
    for name, info in files.items():
        file = path / name
        if Path(name).name != name or not name.endswith(ALLOWED_SUFFIXES):
            raise BundleError(f"Bundle '{path}': '{name}' is not an allowed file (only ONNX and JSON files in the folder).")
        if not file.is_file():
            raise BundleError(f"Bundle '{path}' is incomplete: '{name}' is missing. Copy or export the whole bundle again.")
        if sha256_of(file) != info.get("sha256"):
            raise BundleError(
                f"Bundle '{path}': the checksum of '{name}' does not match its manifest — the file was changed or "
                "damaged. Export or copy the bundle again."
            )
    check_input_contract(manifest, path)
    return Bundle(path, manifest)


def check_input_contract(manifest: dict, path) -> None:
    """:class:`BundleError` unless the manifest's input contract is complete for its kind."""
    try:
        kind = manifest["input"].get("kind", CASCADE_KIND)
        if kind == CASCADE_KIND:
            InputContract.from_dict(manifest["input"])
        else:
            from .baseline_networks import check_contract

            check_contract(kind, manifest["input"], manifest.get("components", {}))
    except (KeyError, TypeError, ValueError, AttributeError, BundleError) as error:
        raise BundleError(f"Bundle '{path}': the input contract in {MANIFEST} is incomplete ({error}).") from None


def write_bundle(out_dir: str | os.PathLike, manifest: dict, files: dict[str, Path], *, overwrite: bool = False) -> Bundle:
    """Write a bundle atomically: copy ``files`` (name → source path), add checksums and the format header.

    ``manifest`` carries everything else (name, version, input, components, thresholds, training, metrics).
    """
    out_dir = Path(out_dir)
    check_input_contract(manifest, out_dir)
    for name in files:
        if not name.endswith(ALLOWED_SUFFIXES) or Path(name).name != name:
            raise BundleError(f"'{name}': a bundle holds only ONNX and JSON files, without sub-folders.")
    with atomic_path(out_dir, overwrite=overwrite) as tmp:
        tmp.mkdir()
        listed = {}
        for name, source in files.items():
            shutil.copyfile(source, tmp / name)
            listed[name] = {"sha256": sha256_of(tmp / name), "bytes": (tmp / name).stat().st_size}
        full = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **manifest, "files": listed}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return load_bundle(out_dir)


def extend_bundle(bundle_dir: str | os.PathLike, components: dict, files: dict[str, Path], manifest_updates: dict | None = None) -> Bundle:
    """Add components (e.g. the lesion classifier or the boundary CNN) to an existing bundle, atomically.

    ``components`` maps component name → its manifest entry (with "file"); ``files`` maps file name → source.
    The existing files are re-verified first; the result is a complete new bundle in the same place.
    """
    bundle = load_bundle(bundle_dir)
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("format", "format_version", "files")}
    manifest["components"] = {**manifest["components"], **components}
    for key, value in (manifest_updates or {}).items():
        manifest[key] = {**manifest.get(key, {}), **value} if isinstance(value, dict) else value
    existing = {name: bundle.path / name for name in bundle.manifest["files"] if name not in files}
    with tempfile.TemporaryDirectory() as staging:  # the bundle folder itself is replaced below
        staged = {}
        for name, source in {**existing, **files}.items():
            staged[name] = Path(staging) / name
            shutil.copyfile(source, staged[name])
        return write_bundle(bundle.path, manifest, staged, overwrite=True)
