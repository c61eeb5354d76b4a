"""Which of the engine's Python packages 3D Slicer still needs, and which ``radiomics`` package the engine uses.

The SlicerRadiomics extension brings its own pyradiomics (installed with ``pip install --prefix`` into
the extension's folder, which Slicer puts on ``sys.path``). Python imports only the first ``radiomics``
package on the path, so the module never installs a second one: it uses SlicerRadiomics' package when
its version suits the model, installs pyradiomics only when no ``radiomics`` package is there at all, and
otherwise says what to do. The decisions are pure functions of a search path and a version, so they
are tested without Slicer; the module calls them with Slicer's ``sys.path``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from .errors import LiverTumorSegError
from .radiomics_catalogue import major_version  # the engine's own reading of a pyradiomics version

log = logging.getLogger("LiverTumorSeg")

#: Import name -> pip name of the engine's packages that 3D Slicer does not ship (Resources/requirements.txt
#: installs them; numpy, scipy, SimpleITK and VTK come with Slicer).
REQUIRED_PACKAGES = {
    "onnxruntime": "onnxruntime",
    "skimage": "scikit-image",
    "radiomics": "pyradiomics-bhklab",
    "matplotlib": "matplotlib",
    "slicerio": "slicerio",
    "highdicom": "highdicom",
    "platformdirs": "platformdirs",  # the per-user models folder of the model registry
}
RADIOMICS = "radiomics"
#: Folder name of the SlicerRadiomics extension (``<extensions folder>/SlicerRadiomics/...``).
SLICER_RADIOMICS = "SlicerRadiomics"


def requirement_name(line: str) -> str:
    """The normalised project name of a requirement line ('scikit_image>=0.21' -> 'scikit-image').

    PEP 503 normalisation written here because ``packaging`` (which has it) is not a package of the engine.
    """
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""


def requirement_lines(path) -> List[str]:
    """The requirement lines of a pip requirements file that apply to this Python (no comments, blank lines,
    options, or lines whose environment marker, e.g. ``; python_version >= "3.10"``, excludes this Python)."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "-")) and _marker_applies(line)]


def _marker_applies(line: str) -> bool:
    if ";" not in line:
        return True
    try:
        from packaging.markers import Marker
    except ImportError:  # Slicer before 5.11 may lack `packaging`; pip, which Slicer installs packages with, has it
        try:
            from pip._vendor.packaging.markers import Marker
        except ImportError:  # no installer in this Python: keep the line, pip evaluates its marker when installing
            return True
    return Marker(line.split(";", 1)[1].strip()).evaluate()


@dataclass(frozen=True)
class RadiomicsPackage:
    """A ``radiomics`` package in one folder of the search path."""

    folder: str  # the search-path entry that holds radiomics/
    distribution: str  # the pip project that installed it ('pyradiomics', 'pyradiomics-bhklab'); '' when unknown
    version: str  # '' when unknown

    @property
    def from_slicer_radiomics(self) -> bool:
        return SLICER_RADIOMICS in Path(self.folder).parts

    def describe(self) -> str:
        source = "the SlicerRadiomics extension" if self.from_slicer_radiomics else (self.distribution or "an unknown project")
        return f"pyradiomics {self.version or '(version unknown)'} from {source} in '{self.folder}'"


def find_radiomics(search_path: Iterable[str]) -> List[RadiomicsPackage]:
    """Every ``radiomics`` package on ``search_path``, in path order (Python imports the first)."""
    found = []
    for entry in dict.fromkeys(str(entry) for entry in search_path):
        folder = Path(entry or ".")
        if not (folder / RADIOMICS / "__init__.py").is_file():
            continue
        distribution, version = "", ""
        for candidate in metadata.distributions(path=[str(folder)]):
            top_level = (candidate.read_text("top_level.txt") or "").split()
            files = [str(file) for file in (candidate.files or [])]
            if RADIOMICS in top_level or f"{RADIOMICS}/__init__.py" in files:
                distribution, version = candidate.metadata["Name"] or "", candidate.version or ""
                break
        found.append(RadiomicsPackage(str(folder), distribution, version))
    return found


@dataclass(frozen=True)
class RadiomicsDecision:
    """What the module does about pyradiomics."""

    install: bool  # pip-install the engine's pyradiomics requirement (no radiomics package anywhere)
    package: Optional[RadiomicsPackage]  # the package Slicer's Python imports, if any
    python_path: Tuple[str, ...] = ()  # folders the engine process needs on PYTHONPATH to import that package
    problem: str = ""  # why the radiomics filter cannot run with it, and what to do
    note: str = ""  # something to log (a second, shadowed radiomics package)


def decide_radiomics(packages: Sequence[RadiomicsPackage], needed_major: Optional[str]) -> RadiomicsDecision:
    """Use the first ``radiomics`` package when its major version is ``needed_major`` (None: any); install
    pyradiomics only when there is none; never add a second one."""
    if not packages:
        return RadiomicsDecision(install=True, package=None)
    used = packages[0]
    python_path = (used.folder,) if used.from_slicer_radiomics else ()
    note = ""
    if len(packages) > 1:
        note = (f"Several radiomics packages are on Slicer's Python path; {used.describe()} is used and "
                + "; ".join(p.describe() for p in packages[1:]) + " is never imported. Uninstall the extra one "
                "(slicer.util.pip_uninstall('pyradiomics-bhklab') in the Python console removes the one this module "
                "installed) and restart Slicer.")
    problem = ""
    if needed_major and used.version and major_version(used.version) != str(needed_major):
        update = ("Update the SlicerRadiomics extension in the Extensions Manager" if used.from_slicer_radiomics
                  else f"Install pyradiomics {needed_major}.x in place of it")
        problem = (f"The model's radiomics filter was trained with pyradiomics {needed_major}.x, but Slicer has "
                   f"{used.describe()}, and a second radiomics package cannot be used next to it. {update}, or "
                   "switch the radiomics filter off (Advanced section) to segment without it.")
    return RadiomicsDecision(install=False, package=used, python_path=python_path, problem=problem, note=note)


def classifier_pyradiomics_version(bundle_path=None) -> Optional[str]:
    """The pyradiomics version that the bundle's lesion classifier was trained with; None when the bundle has no
    classifier (then the radiomics filter does not run and any version will do)."""
    from .bundle import load_bundle
    from .radiomics_filter import COMPONENT

    bundle = load_bundle(bundle_path or None)
    if not bundle.has(COMPONENT):
        return None
    features_file = bundle.component(COMPONENT).get("features_file")
    meta = json.loads((bundle.path / features_file).read_text(encoding="utf-8")) if features_file else {}
    return str(meta.get("pyradiomics_version") or "") or None


def missing_imports(packages: Optional[dict] = None) -> List[str]:
    """Import names of ``packages`` (default: the engine's, but ``radiomics``, which :func:`find_radiomics` judges
    by what is on the path) that do not import."""
    importlib.invalidate_caches()
    missing = []
    for name in packages if packages is not None else [n for n in REQUIRED_PACKAGES if n != RADIOMICS]:
        try:
            importlib.import_module(name)
        except Exception as error:  # ImportError, or a broken install that fails while importing
            log.info("Python package '%s' does not import: %s", name, error)
            missing.append(name)
    return missing


def requirements_to_install(lines: Sequence[str], missing: Iterable[str], radiomics: RadiomicsDecision) -> List[str]:
    """The requirement lines to pip-install: those of the ``missing`` import names, and pyradiomics only when
    ``radiomics`` says so."""
    wanted = {requirement_name(REQUIRED_PACKAGES.get(name, name)) for name in missing}
    pyradiomics = requirement_name(REQUIRED_PACKAGES[RADIOMICS])
    wanted.discard(pyradiomics)
    if radiomics.install:
        wanted.add(pyradiomics)
    return [line for line in lines if requirement_name(line) in wanted]


def missing_requirements(requirements_file, search_path: Iterable[str]) -> List[str]:
    """The lines of ``requirements_file`` still to install into the Python whose path is ``search_path``."""
    radiomics = decide_radiomics(find_radiomics(search_path), None)
    return requirements_to_install(requirement_lines(requirements_file), missing_imports(), radiomics)


def require_installed(requirements_file, search_path: Iterable[str]) -> None:
    """LiverTumorSegError naming the requirements still to install, and how."""
    missing = missing_requirements(requirements_file, search_path)
    if missing:
        raise LiverTumorSegError(f"The Python packages {', '.join(missing)} are missing. Press Apply in the Liver Tumor "
                                 "Segmentation module to install them, or call LiverTumorSegLogic().installDependencies().")


def radiomics_for_run(search_path: Iterable[str], bundle_path=None, use_filter: bool = True) -> RadiomicsDecision:
    """The radiomics package a run of the bundle will use; LiverTumorSegError when the filter is on and that
    package's major version is not the one the bundle's classifier was trained with."""
    needed = classifier_pyradiomics_version(bundle_path) if use_filter else None
    decision = decide_radiomics(find_radiomics(search_path), major_version(needed) if needed else None)
    if decision.note:
        log.warning("%s", decision.note)
    if decision.problem:
        raise LiverTumorSegError(decision.problem)
    return decision


def slicer_pydeps():
    """``slicer.pydeps``, Slicer's package installer from 5.11 on; None in earlier Slicer (and outside Slicer)."""
    try:
        import slicer.pydeps as pydeps
    except ImportError:
        return None
    return pydeps


def install_requirements(requirements_file, search_path: Iterable[str], pip_install: Callable, pydeps=None,
                         **ensure_options) -> None:
    """pip-install what :func:`missing_requirements` lists, through Slicer: ``pydeps`` (``slicer.pydeps``, Slicer
    5.11 and later: its ``pip_ensure`` with the ``ensure_options`` it accepts, never replacing Slicer's own
    SimpleITK) or ``pip_install`` (``slicer.util.pip_install``, given a list of requirements).
    LiverTumorSegError with what to do when the installation fails or the packages still do not import."""
    requirements = missing_requirements(requirements_file, search_path)
    if not requirements:
        return
    try:
        if pydeps is not None:
            wanted = {requirement_name(line) for line in requirements}
            chosen = [r for r in pydeps.load_requirements(str(requirements_file)) if requirement_name(r.name) in wanted]
            options = {"skip_packages": ["SimpleITK"], **ensure_options}
            accepted = inspect.signature(pydeps.pip_ensure).parameters
            pydeps.pip_ensure(chosen, **{key: value for key, value in options.items() if key in accepted})
        else:  # one argument per requirement, so that a line with an environment marker stays whole
            pip_install(list(requirements))
    except Exception as error:
        raise LiverTumorSegError(
            f"Installing the Python packages failed: {error}\n\nCheck the internet connection (and proxy settings), then "
            "press Apply again. To install by hand, run this in the Python console (View > Python Console) and restart "
            f"Slicer:\n\nslicer.util.pip_install({list(requirements)!r})") from error
    still_missing = missing_requirements(requirements_file, search_path)
    if still_missing:
        raise LiverTumorSegError(f"The Python packages {', '.join(still_missing)} were installed but do not import. "
                                 "Restart Slicer and try again; if that does not help, see the Python console for the error.")


def cuda_available() -> bool:
    """True when ONNX Runtime in this Python can run on a CUDA GPU."""
    try:
        import onnxruntime
    except Exception as error:  # ImportError, or a broken install that fails while importing
        log.info("ONNX Runtime does not import: %s", error)
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
