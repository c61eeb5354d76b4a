"""Which packages the Slicer module installs, and whose ``radiomics`` package the engine uses (without Slicer).

Real importable ``radiomics`` packages are written into temporary folders, with the pip metadata an
installation leaves (a ``*.dist-info`` folder), one of them laid out as the SlicerRadiomics extension
installs its pyradiomics; child Pythons get those folders on their path and decide as the module does
in Slicer. ``-S`` starts a Python without site-packages, that is without this environment's pyradiomics.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from LiverTumorSegLib import slicer_dependencies as dependencies
from LiverTumorSegLib.errors import LiverTumorSegError

ROOT = Path(__file__).resolve().parents[1]
ENGINE_DIR = ROOT / "LiverTumorSeg"
REQUIREMENTS_FILE = ENGINE_DIR / "Resources" / "requirements.txt"


def radiomics_package(folder, version, project="pyradiomics"):
    """An importable ``radiomics`` package of ``version`` in ``folder``, with its pip metadata; returns ``folder``."""
    folder = Path(folder)
    (folder / "radiomics").mkdir(parents=True)
    (folder / "radiomics" / "__init__.py").write_text(f"__version__ = 'v{version}'\n")
    info = folder / f"{project.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n")
    (info / "top_level.txt").write_text("radiomics\n")
    return folder


def slicer_radiomics_site_packages(root, version):
    """pyradiomics where the SlicerRadiomics extension installs it (``pip install --prefix`` into its folder)."""
    return radiomics_package(Path(root) / "Extensions-33241" / "SlicerRadiomics" / "lib" / "python3.9" / "site-packages", version)


def decide_in_child(python_path, needed_major, *, isolated=True):
    """The module's decision in a new Python whose path starts with ``python_path`` (and the engine)."""
    script = textwrap.dedent(f"""
        import json, sys
        from LiverTumorSegLib import slicer_dependencies as d
        decision = d.decide_radiomics(d.find_radiomics(sys.path), {needed_major!r})
        lines = d.requirement_lines({str(REQUIREMENTS_FILE)!r})
        imported = None
        try:
            import radiomics
            imported = [radiomics.__file__, radiomics.__version__]
        except ImportError:
            pass
        print(json.dumps({{"install": decision.install, "python_path": decision.python_path, "problem": decision.problem,
                          "note": decision.note, "packages": [vars(p) for p in d.find_radiomics(sys.path)],
                          "to_install": d.requirements_to_install(lines, [], decision), "imported": imported}}))
    """)
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(p) for p in python_path] + [str(ENGINE_DIR)]))
    command = [sys.executable] + (["-S"] if isolated else []) + ["-c", script]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ----------------------------------------------------------------------------------- SlicerRadiomics


def test_slicer_radiomics_package_is_used_and_nothing_installed(tmp_path):
    site = slicer_radiomics_site_packages(tmp_path, "3.0.1")
    decided = decide_in_child([site], "3")
    assert decided["imported"] == [str(site / "radiomics" / "__init__.py"), "v3.0.1"]
    assert decided["packages"] == [{"folder": str(site), "distribution": "pyradiomics", "version": "3.0.1"}]
    assert decided["install"] is False and decided["problem"] == "" and decided["note"] == ""
    assert decided["python_path"] == [str(site)], "the engine process gets SlicerRadiomics' folder on its path"
    assert decided["to_install"] == []


def test_slicer_radiomics_of_another_major_version_is_reported_not_doubled(tmp_path):
    site = slicer_radiomics_site_packages(tmp_path, "2.2.0")
    decided = decide_in_child([site], "3")
    assert decided["install"] is False and decided["to_install"] == []
    assert decided["problem"] == (
        "The model's radiomics filter was trained with pyradiomics 3.x, but Slicer has pyradiomics 2.2.0 from the "
        f"SlicerRadiomics extension in '{site}', and a second radiomics package cannot be used next to it. Update the "
        "SlicerRadiomics extension in the Extensions Manager, or switch the radiomics filter off (Advanced section) to "
        "segment without it.")
    assert decide_in_child([site], None)["problem"] == "", "a bundle without classifier takes any version"


def test_pyradiomics_is_installed_only_when_no_radiomics_package_is_there(tmp_path):
    decided = decide_in_child([tmp_path], "3")
    assert decided["imported"] is None and decided["packages"] == []
    assert decided["install"] is True and decided["to_install"] == ["pyradiomics-bhklab>=3.1"]


def test_a_second_radiomics_package_is_named_with_how_to_remove_it(tmp_path):
    """SlicerRadiomics' package first on the path, this environment's pip-installed pyradiomics-bhklab after it."""
    site = slicer_radiomics_site_packages(tmp_path, "3.0.1")
    decided = decide_in_child([site], "3", isolated=False)
    assert decided["imported"][0] == str(site / "radiomics" / "__init__.py")
    assert [p["distribution"] for p in decided["packages"]] == ["pyradiomics", "pyradiomics-bhklab"]
    assert decided["install"] is False and decided["problem"] == "" and decided["to_install"] == []
    assert decided["note"].startswith(f"Several radiomics packages are on Slicer's Python path; pyradiomics 3.0.1 from "
                                      f"the SlicerRadiomics extension in '{site}' is used")
    assert "pyradiomics-bhklab" in decided["note"] and "slicer.util.pip_uninstall('pyradiomics-bhklab')" in decided["note"]


def test_a_pip_installed_radiomics_of_another_major_version_says_to_replace_it(tmp_path):
    folder = radiomics_package(tmp_path / "site-packages", "4.0.0", project="pyradiomics")
    decision = dependencies.decide_radiomics(dependencies.find_radiomics([folder]), "3")
    assert decision.python_path == () and not decision.install
    assert "pyradiomics 4.0.0 from pyradiomics in" in decision.problem and "Install pyradiomics 3.x in place of it" in decision.problem


def test_find_radiomics_keeps_path_order_and_reads_unknown_versions(tmp_path):
    bare = tmp_path / "bare"
    (bare / "radiomics").mkdir(parents=True)
    (bare / "radiomics" / "__init__.py").write_text("")
    pip = radiomics_package(tmp_path / "pip", "3.1.4", project="pyradiomics-bhklab")
    found = dependencies.find_radiomics([str(tmp_path / "empty"), str(pip), str(bare), str(pip)])
    assert found == [dependencies.RadiomicsPackage(str(pip), "pyradiomics-bhklab", "3.1.4"),
                     dependencies.RadiomicsPackage(str(bare), "", "")]
    assert dependencies.decide_radiomics(found[1:], "3").problem == "", "an unknown version is not refused"


# ------------------------------------------------------------------------------ the model's version


def _bundle_with_classifier(folder, pyradiomics_version):
    from test_process import untrained_bundle

    from LiverTumorSegLib.bundle import extend_bundle

    bundle = untrained_bundle(folder)
    features = Path(folder) / "features.json"
    features.write_text(json.dumps({"pyradiomics_version": pyradiomics_version, "feature_names": []}))
    extend_bundle(bundle, {"lesion_classifier": {"file": "lesion_classifier.onnx", "features_file": "lesion_classifier.json"}},
                  {"lesion_classifier.onnx": bundle / "liver.onnx", "lesion_classifier.json": features})
    return bundle


def test_the_needed_version_is_the_one_the_classifier_was_trained_with(tmp_path):
    assert dependencies.classifier_pyradiomics_version() is None, "the bundled model has no radiomics filter"
    bundle = _bundle_with_classifier(tmp_path, "v3.1.4")
    assert dependencies.classifier_pyradiomics_version(bundle) == "v3.1.4"

    old = slicer_radiomics_site_packages(tmp_path / "slicer", "2.2.0")
    with pytest.raises(LiverTumorSegError, match=r"trained with pyradiomics 3\.x, but Slicer has pyradiomics 2\.2\.0"):
        dependencies.radiomics_for_run([str(old)], bundle, use_filter=True)
    off = dependencies.radiomics_for_run([str(old)], bundle, use_filter=False)
    assert off.python_path == (str(old),) and off.problem == ""
    assert dependencies.radiomics_for_run([str(old)], None, use_filter=True).problem == ""  # the bundled model


# ---------------------------------------------------------------------------------- other packages


def test_requirements_to_install_follow_the_missing_imports():
    lines = dependencies.requirement_lines(REQUIREMENTS_FILE)
    assert {dependencies.requirement_name(line) for line in lines} <= set(dependencies.REQUIRED_PACKAGES.values())
    none = dependencies.RadiomicsDecision(install=True, package=None)
    present = dependencies.RadiomicsDecision(install=False, package=dependencies.RadiomicsPackage("/x", "pyradiomics", "3.0.1"))
    assert dependencies.requirements_to_install(lines, list(dependencies.REQUIRED_PACKAGES), none) == lines
    assert dependencies.requirements_to_install(lines, ["skimage", "radiomics"], present) == ["scikit-image>=0.21"]
    assert dependencies.requirements_to_install(lines, [], none) == ["pyradiomics-bhklab>=3.1"]
    assert dependencies.requirements_to_install(lines, [], present) == []
    assert dependencies.requirement_name("Scikit_Image.x >= 1") == "scikit-image-x"


def test_requirement_lines_for_another_python_are_left_out(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\n-r other.txt\nalways>=1\nnewer>=2; python_version >= '3.99'\n"
                            "current>=3; python_version >= '3.9'\n\n")
    assert dependencies.requirement_lines(requirements) == ["always>=1", "current>=3; python_version >= '3.9'"]


def test_missing_imports_and_requirements_in_this_environment():
    assert dependencies.missing_imports(["json", "livertumorseg_no_such_package"]) == ["livertumorseg_no_such_package"]
    assert dependencies.missing_imports() == []
    assert dependencies.missing_requirements(REQUIREMENTS_FILE, sys.path) == []
    dependencies.require_installed(REQUIREMENTS_FILE, sys.path)


def test_nothing_is_installed_when_nothing_is_missing():
    def pip_install(requirements):
        raise AssertionError(f"pip was asked to install {requirements}")

    dependencies.install_requirements(REQUIREMENTS_FILE, sys.path, pip_install)


def test_a_failed_installation_says_how_to_install_by_hand(tmp_path):
    """In a Python without site-packages everything is missing; pip (offline here) fails to install it."""
    script = textwrap.dedent(f"""
        import subprocess, sys
        from LiverTumorSegLib import slicer_dependencies as d
        from LiverTumorSegLib.errors import LiverTumorSegError
        try:
            d.require_installed({str(REQUIREMENTS_FILE)!r}, sys.path)
        except LiverTumorSegError as error:
            print("REQUIRE:", error)
        def pip_install(requirements):
            subprocess.run([{sys.executable!r}, "-m", "pip", "install", "--no-index", "--target", {str(tmp_path / "t")!r}]
                           + requirements, check=True, capture_output=True)
        try:
            d.install_requirements({str(REQUIREMENTS_FILE)!r}, sys.path, pip_install)
        except LiverTumorSegError as error:
            print("INSTALL:", error)
    """)
    environment = dict(os.environ, PYTHONPATH=str(ENGINE_DIR))
    result = subprocess.run([sys.executable, "-S", "-c", script], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = dependencies.requirement_lines(REQUIREMENTS_FILE)
    assert f"REQUIRE: The Python packages {', '.join(lines)} are missing. Press Apply" in result.stdout
    assert "INSTALL: Installing the Python packages failed: Command" in result.stdout
    assert f"slicer.util.pip_install({lines!r})" in result.stdout
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())


def test_cuda_is_offered_only_where_onnx_runtime_has_it():
    import onnxruntime

    assert dependencies.cuda_available() == ("CUDAExecutionProvider" in onnxruntime.get_available_providers())
