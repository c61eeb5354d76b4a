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
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import BundleError, DeviceError
from .image_io import atomic_path
from .preprocess import InputContract

#: In-plane zooms the liver branch may run at: the training's scale augmentation range
#: (``livertumorseg_training.slices.SCALE_RANGE``); outside it the networks were never trained.
LIVER_SCALE_RANGE = (0.8, 1.25)

FORMAT_NAME = "livertumorseg-bundle"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST = "manifest.json"
#: ``input.kind`` of the cascade's bundles (manifests without a kind are cascade bundles).
CASCADE_KIND = "cascade_2_5d"
ALLOWED_SUFFIXES = (".onnx", ".json")
#: The bundled model: package data of the engine, so that a wheel, an editable install and the Slicer module
#: (which installs the engine folder as it is) all find it.
DEFAULT_BUNDLE = Path(str(resources.files(__package__) / "models" / "LiverTumorSeg-demo"))


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

    @property
    def liver_scales(self) -> tuple[float, ...]:
        """In-plane zooms the cascade's liver branch runs at, averaged (manifest ``inference.liver_scales``;
        (1.0,) when absent)."""
        try:
            return check_liver_scales(self.manifest.get("inference", {}).get("liver_scales", [1.0]))
        except (AttributeError, TypeError, ValueError) as error:
            raise BundleError(f"Bundle '{self.path}': inference.liver_scales in {MANIFEST} is invalid ({error}). "
                              "Tune them again (livertumorseg-train tune-liver-scales) or remove the entry.") from None

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

        options = session_options(threads)
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            check_device(device)
            providers.insert(0, "CUDAExecutionProvider")
        try:
            return ort.InferenceSession(str(self.file(component)), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types for invalid models
            raise BundleError(
                f"Bundle '{self.path}': ONNX Runtime cannot load '{self.component(component)['file']}' "
                f"({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}). "
                "The model file is damaged or was made for a newer ONNX Runtime: export the bundle again."
            ) from None


def session_options(threads: int | None = None):
    """The ONNX Runtime options of every session (also used by ``scripts/benchmark_conv_peak.py``).

    ``threads``: intra-op threads (default: ONNX Runtime's, one per physical core); one inter-op thread, as
    the graphs run sequentially. All graph optimisations (the default, kept explicit: ``extended`` measured no
    faster); memory arena and memory patterns on (the defaults). Idle threads sleep instead of spinning
    (``scripts/benchmark_conv_peak.py --compare-spinning``): on a busy machine a spinning thread takes CPU
    time from the one that works, and on an idle one waking a thread takes microseconds against the tens of
    milliseconds of each convolution layer.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def check_device(device: str) -> None:
    """Refuse a device this ONNX Runtime cannot use (:class:`DeviceError`), before any work is done."""
    import onnxruntime as ort

    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise DeviceError(
            "--device cuda was asked for, but this onnxruntime has no CUDA support. "
            "Install onnxruntime-gpu with a matching CUDA, or use --device cpu."
        )
    if device not in ("cpu", "cuda"):
        raise DeviceError(f"Unknown device {device!r}: use cpu or cuda.")


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
    if not isinstance(manifest, dict):
        raise BundleError(f"'{manifest_path}' holds a JSON {type(manifest).__name__}, not an object. The bundle is "
                          "damaged: export or copy it again.")
    if manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"'{path}' is not a LiverTumorSeg model bundle (format {manifest.get('format')!r}).")
    version = manifest.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise BundleError(
            f"The bundle '{path}' has format version {version!r}; this LiverTumorSeg reads "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}. Update LiverTumorSeg, or export the bundle with a matching version."
        )
    check_engine_version(manifest.get("engine_version"), f"The bundle '{path}'")
    files, components = manifest.get("files"), manifest.get("components")
    if not isinstance(files, dict) or not all(isinstance(info, dict) for info in files.values()):
        raise BundleError(f"Bundle '{path}': 'files' in {MANIFEST} must map each file name to its checksum; "
                          "the manifest is damaged. Export or copy the bundle again.")
    if not isinstance(components, dict) or not all(isinstance(entry, dict) for entry in components.values()):
        raise BundleError(f"Bundle '{path}': 'components' in {MANIFEST} must map each component name to its "
                          "description; the manifest is damaged. Export or copy the bundle again.")
    for component, entry in components.items():
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
    bundle = Bundle(path, manifest)
    if bundle.kind == CASCADE_KIND:
        bundle.liver_scales  # raises BundleError when the entry is invalid
    return bundle


def check_liver_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """The liver branch's in-plane zooms as a tuple; ValueError unless non-empty and each in :data:`LIVER_SCALE_RANGE`."""
    scales = tuple(float(scale) for scale in scales)
    low, high = LIVER_SCALE_RANGE
    if not scales or not all(low <= scale <= high for scale in scales):
        raise ValueError(f"liver scales must be one or more zooms between {low} and {high}, got {list(scales)}")
    return scales


def check_engine_version(required, what: str) -> None:
    """:class:`BundleError` when ``what`` (a bundle, a model of the index) needs a newer engine than this one.

    ``required`` is the engine version that exported the bundle (the manifest's ``engine_version``) or the
    index's ``engine_version``; None means no requirement. Compared by release numbers (0.10.0 > 0.9.2), by
    hand because the engine also runs in Slicer's Python, where only the packages the module installs exist.
    """
    if required is None:
        return
    needed, current = _release(required), _release(__version__)
    if needed is None:
        raise BundleError(f"{what} names the engine version {required!r}, which is not a version number like 0.1.0. "
                          "The bundle or index is damaged: export or download it again.")
    if needed > current:
        raise BundleError(
            f"{what} needs LiverTumorSeg {required} or newer; this is LiverTumorSeg {__version__}. Update LiverTumorSeg "
            "(pip install --upgrade livertumorseg, or update the extension in Slicer's Extension Manager), or choose "
            f"a model made for {__version__}."
        )


def _release(version) -> tuple[int, ...] | None:
    """The release numbers at the start of a version ('0.2.0.dev1' → (0, 2, 0)), without trailing zeros; None if none."""
    match = re.match(r"(\d+(?:\.\d+)*)", str(version).strip())
    if not match:
        return None
    numbers = [int(part) for part in match.group(1).split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


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
