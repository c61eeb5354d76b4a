"""The Slicer module without the Slicer application: its files, its contract with the engine, the shared checks.

* ``LiverTumorSeg.py``, its ``.ui``, icon and ``requirements.txt`` are well formed and agree with each other;
  the CMake lists install exactly the files on disk.
* The module's command-line glue (plain functions in ``LiverTumorSeg.py``, compiled here on their own)
  produce arguments the engine's real parser accepts and read the engine's real progress output.
* ``LiverTumorSegLib.selftest`` (the checks the module's self-test runs inside Slicer) passes on correct
  results and catches wrong ones, on real MRML from ``slicer-core``.
* End to end when a phantom generator and the bundled model are present: the command line as the module
  starts it, then the results through the engine's MRML adapter as the module loads them.
"""

import ast
import contextlib
import importlib.util
import io
import json
import logging
import os
import py_compile
import queue
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "LiverTumorSeg"
MODULE_PY = MODULE_DIR / "LiverTumorSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "LiverTumorSeg.ui"
ICON_FILE = MODULE_DIR / "Resources" / "Icons" / "LiverTumorSeg.png"
REQUIREMENTS_FILE = MODULE_DIR / "Resources" / "requirements.txt"
CMAKE_FILE = MODULE_DIR / "CMakeLists.txt"

#: What 3D Slicer ships in its Python (never to be pip-installed by the module; pydicom comes with its DICOM module).
SLICER_PROVIDED = {"numpy", "scipy", "SimpleITK", "vtk", "slicer", "pydicom"}

#: Qt classes a Slicer .ui may use without declaring them as custom widgets.
QT_CLASSES = {"QWidget", "QLabel", "QPushButton", "QCheckBox", "QComboBox", "QProgressBar", "QLineEdit",
              "QSpinBox", "QDoubleSpinBox", "QGroupBox", "QRadioButton", "QFrame", "QTextEdit", "QPlainTextEdit",
              "QToolButton", "QSlider", "QTabWidget", "QScrollArea", "QTableWidget", "QTreeWidget", "QListWidget"}

PARAMETER_FIELDS = {
    "inputVolume": ("vtkMRMLScalarVolumeNode", None),
    "outputSegmentation": ("vtkMRMLSegmentationNode", None),
    "useRadiomicsFilter": ("bool", True),
    "useBoundaryRefinement": ("bool", True),
    "perLesionSegments": ("bool", False),
    "device": ("str", "cpu"),
    "bundlePath": ("str", ""),
    "volumetryTable": ("vtkMRMLTableNode", None),
}


# ------------------------------------------------------------------------------------------ parsing


def _ui_tree():
    return ET.parse(UI_FILE).getroot()


def _ui_widgets():
    """{name: element} of every <widget> in the .ui."""
    return {widget.get("name"): widget for widget in _ui_tree().iter("widget")}


def _string_property(widget, name):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            string = prop.find("string")
            return None if string is None else (string.text or "")
    return None


def _slicer_parameter_names():
    """{parameter name: widget element} from the SlicerParameterName dynamic properties."""
    found = {}
    for widget in _ui_tree().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", f"{widget.get('name')}: SlicerParameterName must be a dynamic property (stdset=0)"
                found[prop.find("string").text] = widget
    return found


def _module_tree():
    return ast.parse(MODULE_PY.read_text(encoding="utf-8"), filename=str(MODULE_PY))


def _parameter_node_fields():
    """{field: (type source, default or None)} of the @parameterNodeWrapper class in LiverTumorSeg.py."""
    for node in _module_tree().body:
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list
        ):
            fields = {}
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                    default = ast.literal_eval(statement.value) if statement.value is not None else None
                    fields[statement.target.id] = (ast.unparse(statement.annotation), default)
            return node.name, fields
    raise AssertionError("LiverTumorSeg.py has no @parameterNodeWrapper class")


def _module_constant(name, class_name=None):
    """A literal assigned at module level (or in ``class_name``) of LiverTumorSeg.py."""
    body = _module_tree().body
    if class_name is not None:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == class_name).body
    for node in body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"LiverTumorSeg.py defines no {name}")


CLI_GLUE_NAMES = (
    "STAGE_SPANS", "EXIT_HINTS", "stageKey", "parseProgressLine", "overallProgress", "progressText",
    "engineCommandArguments", "engineWarnings", "engineErrorMessage", "EngineProcess",
)


def _cli_glue():
    """The module's command-line glue, compiled from LiverTumorSeg.py without Slicer (stdlib only)."""
    tree = _module_tree()
    body = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in CLI_GLUE_NAMES:
            body.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in CLI_GLUE_NAMES for t in node.targets):
            body.append(node)
    namespace = {module.__name__: module for module in (json, logging, os, queue, signal, subprocess, threading, time)}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(MODULE_PY), "exec"), namespace)
    missing = [name for name in CLI_GLUE_NAMES if name not in namespace]
    assert not missing, f"LiverTumorSeg.py lacks the glue {missing}"
    return SimpleNamespace(**{name: namespace[name] for name in CLI_GLUE_NAMES})


@pytest.fixture(scope="module")
def glue():
    return _cli_glue()


def _requirement_names():
    names = []
    for line in REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-")):
            continue
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        assert match, f"requirements.txt: cannot read the line {line!r}"
        names.append(match.group(1).lower().replace("_", "-"))
    return names


def _cmake_list(name):
    text = CMAKE_FILE.read_text(encoding="utf-8")
    match = re.search(rf"set\(\s*{name}\s+(.*?)\)", text, re.S)
    assert match, f"{CMAKE_FILE.name} has no set({name} ...)"
    entries = [line.split("#")[0].strip() for line in match.group(1).splitlines()]
    return [entry.replace("${MODULE_NAME}", "LiverTumorSeg") for entry in entries if entry]


# -------------------------------------------------------------------------------------------- the .ui


def test_ui_is_well_formed_designer_xml():
    root = _ui_tree()
    assert root.tag == "ui" and root.get("version") == "4.0"
    assert root.findtext("class") == "LiverTumorSeg"
    top = root.findall("widget")
    assert len(top) == 1 and top[0].get("class") == "qMRMLWidget" and top[0].get("name") == "LiverTumorSeg"
    names = []
    for widget in root.iter("widget"):
        assert widget.get("class"), f"a <widget> without class: {ET.tostring(widget)[:80]!r}"
        assert widget.get("name"), f"a <{widget.get('class')}> without name"
        names.append(widget.get("name"))
    assert len(names) == len(set(names)), "widget names must be unique"
    declared = {custom.findtext("class") for custom in root.iter("customwidget")}
    for widget in root.iter("widget"):
        cls = widget.get("class")
        assert cls in QT_CLASSES or cls in declared, f"{cls} is used but not declared in <customwidgets>"
    for layout in root.iter("layout"):
        assert layout.get("class") and layout.get("name")
    # every scene-aware selector gets the scene through a connection from the top widget
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)" and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    selectors = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors and selectors <= connected


def test_ui_has_the_module_widgets():
    widgets = _ui_widgets()
    sections = {_string_property(w, "text"): name for name, w in widgets.items() if w.get("class") == "ctkCollapsibleButton"}
    assert {"Inputs", "Outputs", "Advanced"} <= set(sections)
    expected = {
        "inputVolumeSelector": "qMRMLNodeComboBox",
        "outputSegmentationSelector": "qMRMLNodeComboBox",
        "volumetryTableSelector": "qMRMLNodeComboBox",
        "bundlePathLineEdit": "ctkPathLineEdit",
        "deviceComboBox": "QComboBox",
        "applyButton": "QPushButton",
        "progressBar": "QProgressBar",
        "statusLabel": "QLabel",
    }
    for name, cls in expected.items():
        assert name in widgets and widgets[name].get("class") == cls, f"{name} must be a {cls}"
    for name, node_type in (("inputVolumeSelector", "vtkMRMLScalarVolumeNode"),
                            ("outputSegmentationSelector", "vtkMRMLSegmentationNode"),
                            ("volumetryTableSelector", "vtkMRMLTableNode")):
        types = [s.text for p in widgets[name].findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
        assert types == [node_type], f"{name}: nodeTypes {types}"
    # the stage toggles, the device and the model folder sit in the Advanced section
    advanced = widgets[sections["Advanced"]]
    inside = {w.get("name") for w in advanced.iter("widget")}
    assert {"useRadiomicsFilterCheckBox", "useBoundaryRefinementCheckBox", "deviceComboBox", "bundlePathLineEdit"} <= inside


def test_every_ui_name_the_module_uses_exists():
    widgets = set(_ui_widgets())
    used = set()
    for node in ast.walk(_module_tree()):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"):
            used.add(node.attr)
    assert used, "the module uses no self.ui.<widget>"
    assert used <= widgets, f"used in LiverTumorSeg.py but not in the .ui: {sorted(used - widgets)}"


def test_parameter_node_has_the_specified_fields():
    _, fields = _parameter_node_fields()
    assert set(fields) == set(PARAMETER_FIELDS)
    for name, (type_name, default) in PARAMETER_FIELDS.items():
        annotation, value = fields[name]
        assert type_name in annotation, f"{name}: annotated {annotation}, expected {type_name}"
        assert value == default, f"{name}: default {value!r}, expected {default!r}"
    assert "Choice" in fields["device"][0] and "'cuda'" in fields["device"][0]


def test_ui_parameter_names_are_parameter_node_fields():
    _, fields = _parameter_node_fields()
    bound = _slicer_parameter_names()
    assert set(bound) <= set(fields), f"SlicerParameterName not in the parameter node: {sorted(set(bound) - set(fields))}"
    manual = _module_constant("MANUALLY_BOUND_PARAMETERS")
    widgets = _ui_widgets()
    for parameter, widget_name in manual.items():
        assert parameter in fields and widget_name in widgets
        assert parameter not in bound, f"{parameter} is bound twice"
    unbound = set(fields) - set(bound) - set(manual)
    assert not unbound, f"parameters without a widget: {sorted(unbound)}"
    # each bound widget has a connector for its parameter's type
    for parameter, widget in bound.items():
        annotation = fields[parameter][0]
        if annotation == "bool":
            assert widget.get("class") == "QCheckBox", parameter
        elif annotation.startswith("vtkMRML"):
            assert widget.get("class") == "qMRMLNodeComboBox", parameter
        else:
            pytest.fail(f"{parameter} ({annotation}) has no GUI connector for {widget.get('class')}")


# ----------------------------------------------------------------------------------------- the module


def test_module_compiles_and_imports_no_torch(tmp_path):
    py_compile.compile(str(MODULE_PY), cfile=str(tmp_path / "LiverTumorSeg.pyc"), doraise=True)
    imported = set()
    for node in ast.walk(_module_tree()):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert "torch" not in imported
    assert not re.search(r"^\s*(import torch|from torch)", MODULE_PY.read_text(encoding="utf-8"), re.M)


def test_module_installs_nothing_at_import_time():
    """pip and package checks only run inside functions (on Apply), never when Slicer loads the module."""
    for node in _module_tree().body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        for call in ast.walk(node):
            if isinstance(call, ast.Call):
                text = ast.unparse(call.func)
                assert not any(word in text for word in ("pip_install", "pip_ensure", "installDependencies",
                                                          "missingDependencies", "import_module")), text


def test_module_metadata():
    text = MODULE_PY.read_text(encoding="utf-8")
    assert 'self.parent.title = _("Liver Tumor Segmentation")' in text
    assert '"Segmentation")]' in text
    url = _module_constant("DOCUMENTATION_URL")
    assert url.startswith("https://") and "{DOCUMENTATION_URL}" in text
    acknowledgement = text[text.index("acknowledgementText"):]
    for part in ("X. Li", "Y. Zheng", "Precise liver tumor segmentation in CT using a hybrid deep"):
        assert part in acknowledgement, part


def test_requirements_are_the_engine_packages_slicer_lacks():
    names = _requirement_names()
    assert {"onnxruntime", "scikit-image", "pyradiomics-bhklab"} <= set(names)
    for forbidden in ("torch", "torchvision", "vtk", "slicer-core", "trame-slicer", "simpleitk", "numpy"):
        assert forbidden not in names, f"{forbidden} must not be installed into Slicer's Python"
    required = _module_constant("REQUIRED_PACKAGES", "LiverTumorSegLogic")
    assert {pip.lower() for pip in required.values()} <= set(names), "the module checks packages it does not install"


def test_engine_imports_only_what_slicer_has_or_the_module_installs():
    required = _module_constant("REQUIRED_PACKAGES", "LiverTumorSegLogic")
    allowed = set(sys.stdlib_module_names) | SLICER_PROVIDED | set(required) | {"LiverTumorSegLib"}
    problems = []
    for path in sorted((MODULE_DIR / "LiverTumorSegLib").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            problems += [f"{path.name}: {name}" for name in names if name.split(".")[0] not in allowed]
    assert not problems, (
        "the engine imports packages that Slicer lacks and Resources/requirements.txt does not install: " + ", ".join(problems)
    )


# ------------------------------------------------------------------------------------------ the icon


def test_icon_is_a_128_png():
    data = ICON_FILE.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)
    pil = pytest.importorskip("PIL.Image")
    with pil.open(ICON_FILE) as image:
        image.load()
        rgba = np.asarray(image.convert("RGBA"))
    opaque = rgba[..., 3] > 128
    assert 0.2 < opaque.mean() < 0.9, "the icon should be a figure on a transparent background"


# ------------------------------------------------------------------------------------------ packaging


def test_cmake_lists_match_the_files():
    scripts = _cmake_list("MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list("MODULE_PYTHON_RESOURCES")
    missing = [entry for entry in scripts + resources if not (MODULE_DIR / entry).is_file()]
    assert not missing, f"listed in {CMAKE_FILE.name} but not on disk: {missing}"
    assert "LiverTumorSeg.py" in scripts
    engine = sorted(p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "LiverTumorSegLib").rglob("*.py")
                    if "__pycache__" not in p.parts)
    unlisted = [path for path in engine if path not in scripts]
    assert not unlisted, f"engine files not installed by {CMAKE_FILE.name}: {unlisted}"
    on_disk = sorted(
        p.relative_to(MODULE_DIR).as_posix()
        for folder in ("Resources/Icons", "Resources/UI", "LiverTumorSegLib/models")
        for p in (MODULE_DIR / folder).rglob("*")
        if p.is_file() and p.name != ".gitkeep"
    )
    unlisted = [path for path in on_disk if path not in resources]
    assert not unlisted, f"resources not installed by {CMAKE_FILE.name}: {unlisted}"
    assert "Resources/requirements.txt" in resources
    text = CMAKE_FILE.read_text(encoding="utf-8")
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


# ------------------------------------------------------------------------- the module and the engine CLI


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bundlePath": "/models/my bundle", "device": "cuda", "useRadiomicsFilter": False,
         "useBoundaryRefinement": False, "perLesionSegments": True},
        {"useRadiomicsFilter": False},
        {"perLesionSegments": True, "device": "cpu"},
    ],
)
def test_command_line_is_accepted_by_the_engine_parser(glue, tmp_path, options):
    from LiverTumorSegLib import cli

    arguments = glue.engineCommandArguments(tmp_path / "input volume.nrrd", tmp_path / "out", **options)
    assert arguments[:2] == ["-m", "LiverTumorSegLib.cli"]
    parsed = cli._parser().parse_args(arguments[2:])
    assert parsed.run is cli._segment
    assert parsed.input == tmp_path / "input volume.nrrd" and parsed.output == tmp_path / "out"
    assert parsed.progress == "json"
    assert parsed.bundle == (Path(options["bundlePath"]) if options.get("bundlePath") else None)
    assert parsed.device == options.get("device", "cpu")
    assert parsed.no_radiomics is not options.get("useRadiomicsFilter", True)
    assert parsed.no_refine is not options.get("useBoundaryRefinement", True)
    assert parsed.per_lesion is options.get("perLesionSegments", False)
    assert not parsed.overwrite  # the module always writes into a new folder


def test_progress_lines_of_the_engine_are_read(glue):
    from LiverTumorSegLib import cli

    stream = io.StringIO()
    with contextlib.redirect_stderr(stream):
        reporter = cli._ProgressReporter("json")
        for stage, fraction in (("check input", 0.0), ("liver network", 0.25), ("liver network", 1.0),
                                ("postprocess", 0.5), ("done", 1.0)):
            reporter(stage, fraction)
        reporter.close()
    lines = stream.getvalue().splitlines() + ["warning: No liver was found in this image.", "outputs: /x", "{not json"]
    records = [glue.parseProgressLine(line) for line in lines]
    assert [r["stage"] for r in records if r] == ["check input", "liver network", "liver network", "postprocess", "done"]
    assert records[2]["fraction"] == 1.0 and records[1]["fraction"] == 0.25
    assert records[-3:] == [None, None, None]
    assert glue.parseProgressLine('{"stage": "x", "fraction": 7}')["fraction"] == 1.0
    assert glue.parseProgressLine('{"stage": "x"}') is None
    overall, seen = 0.0, []
    for record in filter(None, records):
        overall = glue.overallProgress(record["stage"], record["fraction"], overall)
        seen.append(overall)
    assert seen == sorted(seen) and 0.9 < seen[-1] < 1.0
    assert glue.overallProgress("a stage added later", 0.5, 0.4) == 0.4
    assert glue.progressText("liver network", 0.25) == "Liver network: 25%"
    assert glue.engineWarnings(lines) == ["No liver was found in this image."]


def test_every_engine_stage_moves_the_progress_bar(glue):
    """Stage names the engine reports have a span: pipeline steps, network branches, each stage's STAGE."""
    stages = set()
    for path in sorted((MODULE_DIR / "LiverTumorSegLib").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("step", "progress"):
                if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    stages.add(node.args[0].value)
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "STAGE" for t in node.targets):
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    stages.add(node.value.value)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"\w+ network", node.value):
                stages.add(node.value)
    assert {"check input", "liver network", "tumour network", "postprocess", "done"} <= stages
    missing = sorted(s for s in stages if glue.stageKey(s) not in glue.STAGE_SPANS)
    assert not missing, f"add these engine stages to STAGE_SPANS in LiverTumorSeg.py: {missing}"
    spans = sorted(glue.STAGE_SPANS.values())
    assert all(0.0 <= a <= b <= 1.0 for a, b in spans)


def test_error_messages_say_what_to_do(glue):
    from LiverTumorSegLib import cli

    for code in glue.EXIT_HINTS:
        assert re.search(rf"^\s*{code}\s", cli.EXIT_CODES, re.M), f"exit code {code} is not an engine exit code"
    message = glue.engineErrorMessage(
        ['{"stage": "check input", "fraction": 0.0, "message": "check input 0%"}',
         "error: The image has no negative values, so it is not CT in Hounsfield units."], 2)
    assert message.startswith(glue.EXIT_HINTS[2]) and "Hounsfield" in message
    crash = glue.engineErrorMessage(["Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: boom"], 1)
    assert "report" in crash and "ValueError: boom" in crash
    killed = glue.engineErrorMessage([], -9)
    assert "memory" in killed and "signal 9" in killed
    assert "exit code 77" in glue.engineErrorMessage([], 77)


# --------------------------------------------------------------------- shared checks on real MRML

def _mrml():
    pytest.importorskip("slicer", reason="needs slicer-core (pip install 'trame-slicer[standalone]==2.0.0')")
    from LiverTumorSegLib import mrml_nodes

    return mrml_nodes


def _case():
    """A small CT-like image with a liver and two tumours, on an oblique-free but non-trivial grid."""
    from LiverTumorSegLib.image_io import Geometry, Image

    geometry = Geometry(spacing=(0.8, 0.75, 2.5), origin=(-120.0, -90.0, 40.0),
                        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    shape = (14, 40, 44)
    ct = np.full(shape, -950, dtype=np.int16)
    ct[1:13, 4:36, 4:40] = 40
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2:12, 8:32, 8:36] = 1
    labels[4:8, 12:20, 12:20] = 2
    labels[9:11, 25:28, 28:31] = 2
    ct[labels == 1] = 110
    ct[labels == 2] = 60
    return Image(ct, geometry), Image(labels, geometry)


def _result_nodes(scene, image, labels, per_lesion=False):
    from LiverTumorSegLib import mrml_nodes
    from LiverTumorSegLib.volumetry import measure

    volume = mrml_nodes.volume_node_from_image(scene, image, "CT")
    segmentation = mrml_nodes.segmentation_node_from_labels(scene, labels, volume, name="CT liver segmentation",
                                                            per_lesion=per_lesion, algorithm_name="test bundle")
    mrml_nodes.add_closed_surfaces(segmentation)
    volumetry = measure(labels.array, image.array, image.geometry)
    table = mrml_nodes.volumetry_table_node(scene, volumetry, name="CT liver volumetry")
    return volume, segmentation, table, volumetry


@pytest.mark.parametrize("per_lesion", [False, True])
def test_shared_checks_pass_on_correct_nodes(per_lesion):
    mn = _mrml()
    from LiverTumorSegLib import selftest

    image, labels = _case()
    scene = mn.create_scene()
    volume, segmentation, table, volumetry = _result_nodes(scene, image, labels, per_lesion)
    nodes_before = scene.GetNumberOfNodes()
    counts = selftest.check_result_nodes(segmentation, table, volumetry, per_lesion=per_lesion,
                                         labels=labels.array, reference_volume_node=volume)
    assert scene.GetNumberOfNodes() == nodes_before, "the checks must leave the scene as it was"
    assert counts == {"Liver": int((labels.array == 1).sum()), "tumour": int((labels.array == 2).sum())}
    expected = ["Liver", "Liver tumor 1", "Liver tumor 2"] if per_lesion else ["Liver", "Liver tumor"]
    assert selftest.segment_names(segmentation) == expected
    selftest.check_volumetry(volumetry, labels.array, image.geometry.voxel_volume_mm3)
    assert selftest.check_liver_found(labels.array, labels.array) == 1.0
    assert "2 lesion(s)" in selftest.summary(expected, counts, volumetry)


def test_shared_checks_catch_wrong_results():
    mn = _mrml()
    from LiverTumorSegLib import selftest

    image, labels = _case()
    scene = mn.create_scene()
    volume, segmentation, table, volumetry = _result_nodes(scene, image, labels)

    wrong = labels.array.copy()
    wrong[2, 8, 8] = 0
    with pytest.raises(selftest.SelfTestFailure, match="differ from the label map in 1 voxel"):
        selftest.check_segmentation_node(segmentation, labels=wrong, reference_volume_node=volume)

    changed = json.loads(json.dumps(volumetry))
    changed["lesions"][0]["volume_ml"] += 1.0
    with pytest.raises(selftest.SelfTestFailure, match="Lesion 1"):
        selftest.check_volumetry_table(table, changed)
    with pytest.raises(selftest.SelfTestFailure, match="lesion volumes add up"):
        selftest.check_volumetry(changed, labels.array, image.geometry.voxel_volume_mm3)
    with pytest.raises(selftest.SelfTestFailure, match="rows"):
        selftest.check_volumetry_table(table, dict(volumetry, lesions=volumetry["lesions"][:1], lesion_count=1))

    segment = segmentation.GetSegmentation().GetSegment("Liver_tumor")
    segment.SetTag(segment.GetTerminologyEntryTagName(), mn.LIVER_TERMINOLOGY)
    with pytest.raises(selftest.SelfTestFailure, match="terminology type code '10200004'"):
        selftest.check_segmentation_node(segmentation)
    segment.SetTag(segment.GetTerminologyEntryTagName(), mn.TUMOUR_TERMINOLOGY)
    selftest.check_segmentation_node(segmentation)
    segment.SetName("Tumour")
    with pytest.raises(selftest.SelfTestFailure, match="'Liver' and 'Liver tumor'"):
        selftest.check_segmentation_node(segmentation)

    with pytest.raises(selftest.SelfTestFailure, match="Dice"):
        selftest.check_liver_found(np.zeros_like(labels.array), labels.array)


def _module_function(name):
    """A function of LiverTumorSeg.py that uses only its arguments (compiled here without Slicer)."""
    node = next(n for n in _module_tree().body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(MODULE_PY), "exec"), namespace)
    return namespace[name]


def test_existing_output_nodes_receive_the_result():
    """The module writes into a chosen segmentation / table: names stay, content and all checks pass."""
    mn = _mrml()
    from LiverTumorSegLib import selftest

    image, labels = _case()
    scene = mn.create_scene()
    volume, segmentation, table, volumetry = _result_nodes(scene, image, labels, per_lesion=True)

    plain = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Plain copy")
    plain.CopyContent(segmentation, True)  # MRML marks copied names as auto-generated ...
    with pytest.raises(selftest.SelfTestFailure, match="auto-generated"):
        selftest.check_segmentation_node(plain, per_lesion=True)

    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My segmentation")
    mine.CreateDefaultDisplayNodes()
    mine.GetSegmentation().AddEmptySegment("old", "Old segment")
    my_table = scene.AddNewNodeByClass("vtkMRMLTableNode", "My table")
    _module_function("_copySegmentationContent")(mine, segmentation)  # ... which the module restores
    my_table.CopyContent(table, True)
    assert mine.GetName() == "My segmentation" and my_table.GetName() == "My table"
    selftest.check_result_nodes(mine, my_table, volumetry, per_lesion=True, labels=labels.array,
                                reference_volume_node=volume)


def test_output_folder_check_on_engine_outputs(tmp_path):
    _mrml()
    from LiverTumorSegLib import selftest
    from LiverTumorSegLib.pipeline import SegmentationResult, write_outputs
    from LiverTumorSegLib.volumetry import measure

    image, labels = _case()
    volumetry = measure(labels.array, image.array, image.geometry)
    details = {"bundle": "test bundle", "stages": {}, "timings_s": {}, "warnings": []}
    out = write_outputs(SegmentationResult(labels, volumetry, details), image, tmp_path / "result")
    read_labels, read_volumetry = selftest.check_output_folder(out, reference=image)
    assert np.array_equal(read_labels.array, labels.array) and read_volumetry == json.loads(json.dumps(volumetry))

    (out / "report.html").unlink()
    with pytest.raises(selftest.SelfTestFailure, match="report.html"):
        selftest.check_output_folder(out)
    from LiverTumorSegLib.image_io import Geometry, Image

    shifted = Image(image.array, Geometry(image.geometry.spacing, (0.0, 0.0, 0.0), image.geometry.direction))
    with pytest.raises(selftest.SelfTestFailure, match="origin"):
        selftest.check_same_grid(read_labels, shifted)


# ------------------------------------------------------------------- the engine in a background process


def _tiny_bundle(folder):
    """A real but untrained bundle: each branch is sigmoid(mean of its input channels)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from LiverTumorSegLib.bundle import write_bundle
    from LiverTumorSegLib.preprocess import InputContract

    files = {}
    for name, channels in (("liver.onnx", 3), ("tumour.onnx", 4)):
        graph = helper.make_graph(
            [helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=1, axes=[1]),
             helper.make_node("Sigmoid", ["mean"], ["probability"])],
            "branch",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, "H", "W"])],
            [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        )
        files[name] = folder / f"source-{name}"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), files[name])
    manifest = {"name": "untrained test bundle", "version": "1", "input": InputContract().to_dict(),
                "components": {"liver": {"file": "liver.onnx"}, "tumour": {"file": "tumour.onnx"}}}
    write_bundle(folder / "bundle", manifest, files)
    return folder / "bundle"


def _engine(glue, arguments):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    return glue.EngineProcess([sys.executable] + arguments, env, str(MODULE_DIR))


def _drive(engine, glue, until=None, timeout=900.0):
    """Read the engine's output as the module's timer does; stop early when ``until(record)`` is true."""
    started, records = time.monotonic(), []
    while not engine.isFinished():
        assert time.monotonic() - started < timeout, "the engine process did not finish in time"
        for line in engine.readLines(timeout=0.2):
            record = glue.parseProgressLine(line)
            if record:
                records.append(record)
                if until is not None and until(record):
                    return records
    engine.readLines()
    return records


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    """A small phantom CT written as the module writes its input (MRML storage node outside the scene)."""
    mn = _mrml()
    if importlib.util.find_spec("LiverTumorSegLib.phantoms") is None:
        pytest.skip("the phantom generator (LiverTumorSegLib.phantoms) is not there yet")
    from LiverTumorSegLib import selftest

    folder = tmp_path_factory.mktemp("ct")
    scene = mn.create_scene()
    volume, phantom = selftest.make_phantom_volume(scene, 11, size="small")
    nodes = scene.GetNumberOfNodes()
    storage = scene.CreateNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(folder / "input.nrrd"))
    storage.UseCompressionOff()
    assert storage.WriteData(volume)
    storage.UnRegister(None)
    assert scene.GetNumberOfNodes() == nodes, "writing the input must leave no node in the scene"
    return SimpleNamespace(path=folder / "input.nrrd", scene=scene, volume=volume, phantom=phantom)


def test_engine_process_runs_and_its_results_load(glue, small_ct, tmp_path):
    mn = _mrml()
    from LiverTumorSegLib import selftest
    from LiverTumorSegLib.image_io import read_image

    bundle = _tiny_bundle(tmp_path)
    out = tmp_path / "result"
    engine = _engine(glue, glue.engineCommandArguments(small_ct.path, out, bundlePath=bundle, perLesionSegments=True))
    engine.start()
    records = _drive(engine, glue)
    assert engine.returnCode == 0, glue.engineErrorMessage(engine.lines, engine.returnCode)
    overall = 0.0
    for record in records:
        overall = glue.overallProgress(record["stage"], record["fraction"], overall)
    assert records[-1]["stage"] == "done" and overall == pytest.approx(glue.STAGE_SPANS["done"][1])

    labels, volumetry = selftest.check_output_folder(out, reference=read_image(small_ct.path))
    selftest.check_same_grid(labels, small_ct.phantom.image)  # phantom -> MRML -> file -> engine -> file: same grid
    segmentation = mn.segmentation_node_from_labels(small_ct.scene, labels, small_ct.volume, name="result",
                                                    per_lesion=True)
    mn.add_closed_surfaces(segmentation)
    table = mn.volumetry_table_node(small_ct.scene, volumetry)
    selftest.check_result_nodes(segmentation, table, volumetry, per_lesion=True, labels=labels.array,
                                reference_volume_node=small_ct.volume)


@pytest.mark.skipif(os.name == "nt", reason="process groups and SIGTERM are POSIX")
def test_engine_process_cancel_stops_it_and_writes_nothing(glue, small_ct, tmp_path):
    bundle = _tiny_bundle(tmp_path)
    out = tmp_path / "result"
    engine = _engine(glue, glue.engineCommandArguments(small_ct.path, out, bundlePath=bundle))
    engine.start()
    records = _drive(engine, glue, until=lambda record: glue.stageKey(record["stage"]) == "livernetwork")
    assert records and not engine.isFinished()
    engine.terminate()
    _drive(engine, glue, timeout=60.0)
    assert engine.returnCode in (130, -signal.SIGTERM)
    assert "error: cancelled" in "\n".join(engine.lines).lower() or engine.returnCode == -signal.SIGTERM
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    engine.terminate()  # harmless once it has ended


# -------------------------------------------------------------------------------- end to end


def _end_to_end_ready():
    from LiverTumorSegLib import bundle

    if importlib.util.find_spec("LiverTumorSegLib.phantoms") is None:
        return "the phantom generator (LiverTumorSegLib.phantoms) is not there yet"
    if not (bundle.DEFAULT_BUNDLE / "manifest.json").is_file():
        return f"no bundled model at {bundle.DEFAULT_BUNDLE}"
    return None


@pytest.mark.slow
def test_end_to_end_with_the_bundled_model(glue, small_ct, tmp_path):
    """The bundled model on a small phantom, run and loaded as the module does; it must find the liver."""
    mn = _mrml()
    reason = _end_to_end_ready()
    if reason:
        pytest.skip(reason)
    from LiverTumorSegLib import selftest
    from LiverTumorSegLib.image_io import read_image

    out = tmp_path / "result"
    engine = _engine(glue, glue.engineCommandArguments(small_ct.path, out))
    engine.start()
    records = _drive(engine, glue)
    assert engine.returnCode == 0, glue.engineErrorMessage(engine.lines, engine.returnCode)
    assert records and records[-1]["stage"] == "done"

    labels, volumetry = selftest.check_output_folder(out, reference=read_image(small_ct.path))
    selftest.check_liver_found(labels.array, small_ct.phantom.label)
    segmentation = mn.segmentation_node_from_labels(small_ct.scene, labels, small_ct.volume, name="phantom liver")
    mn.add_closed_surfaces(segmentation)
    table = mn.volumetry_table_node(small_ct.scene, volumetry, name="phantom liver volumetry")
    selftest.check_result_nodes(segmentation, table, volumetry, labels=labels.array,
                                reference_volume_node=small_ct.volume)


def test_engine_and_module_run_on_the_python_of_slicer_5_8():
    """3D Slicer 5.8 ships Python 3.9: the engine and the module must not use newer syntax or library calls."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "vermin"), "--target=3.9-", "--no-tips", "--violations",
         "--eval-annotations", str(MODULE_DIR / "LiverTumorSegLib"), str(MODULE_DIR / "LiverTumorSeg.py")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
