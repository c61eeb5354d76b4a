"""The Slicer module without the Slicer application: its files, its parameter node, the shared checks.

* ``LiverTumorSeg.py``, its ``.ui``, icon and ``requirements.txt`` are well formed and agree with each other
  (widgets, parameter node fields and their bindings, packages); the CMake lists install exactly the files on disk.
* ``LiverTumorSegLib.selftest`` (the checks the module's self-test runs inside Slicer) passes on correct
  results and catches wrong ones, on real MRML from ``slicer-core``.

What the module's Logic does on the scene is tested in ``test_scene_run.py``, its background process in
``test_process.py``, the packages it installs in ``test_slicer_dependencies.py``.
"""

import ast
import json
import py_compile
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

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
SLICER_PROVIDED = {"numpy", "scipy", "SimpleITK", "vtk", "slicer", "pydicom",
                   "pip", "packaging"}  # pip installs the packages; slicer.pydeps (5.11) brings packaging

#: Engine modules of the command-line feature ``livertumorseg batch`` (Dask), and the command-line module whose
#: batch command is the only place that imports them (see test_engine_imports_only_what_slicer_has_or_the_module_installs).
BATCH_COMMAND_MODULES = {"batch", "cohort_output"}
BATCH_COMMAND_CLI = "cli_batch"

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
    "modelName": ("str", ""),
    "volumetryTable": ("vtkMRMLTableNode", None),
    # resection planning, saved with the scene
    "resectionMethod": ("str", "plane"),
    "resectionPlane": ("vtkMRMLMarkupsPlaneNode", None),
    "flipResectionPlane": ("bool", False),
    "liverState": ("str", "normal"),
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
        "modelComboBox": "QComboBox",
        "modelInfoLabel": "QLabel",
        "modelDownloadButton": "QPushButton",
        "exportDicomSegButton": "QPushButton",
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
    # the model selector with its details and download in Inputs, the DICOM SEG export with the output segmentation
    inputs = {w.get("name") for w in widgets[sections["Inputs"]].iter("widget")}
    assert {"modelComboBox", "modelInfoLabel", "modelDownloadButton"} <= inputs
    assert "exportDicomSegButton" in {w.get("name") for w in widgets[sections["Outputs"]].iter("widget")}


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
    assert "Choice(['plane', 'segment'])" in fields["resectionMethod"][0]
    from LiverTumorSegLib.resection import FLR_THRESHOLDS_PERCENT

    states = ast.literal_eval(re.search(r"Choice\((\[.*?\])\)", fields["liverState"][0]).group(1))
    assert states == list(FLR_THRESHOLDS_PERCENT), "the liver states are the planner's threshold presets"


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


def test_module_is_thin_glue():
    """Process handling, package decisions and scene work live in the engine, where they are tested without Slicer."""
    assert len(MODULE_PY.read_text(encoding="utf-8").splitlines()) <= 600
    imported = {alias.name.split(".")[0] for node in ast.walk(_module_tree()) if isinstance(node, ast.Import) for alias in node.names}
    assert not imported & {"subprocess", "threading", "queue", "signal", "shutil", "json", "importlib"}, imported
    for module in ("process", "scene_run", "slicer_dependencies", "resection_planner", "module_logic", "model_selector",
                   "dicom_export"):
        assert f"LiverTumorSegLib/{module}.py" in _cmake_list("MODULE_PYTHON_SCRIPTS")


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
    from LiverTumorSegLib.slicer_dependencies import REQUIRED_PACKAGES

    assert {pip.lower() for pip in REQUIRED_PACKAGES.values()} <= set(names), "the module checks packages it does not install"


def _imports(tree):
    """(top-level package, import node, enclosing function or None, enclosing ``try`` nodes) of each absolute import."""
    found = []

    def visit(node, function, tries):
        if isinstance(node, ast.Import):
            found.extend((alias.name.split(".")[0], node, function, tries) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node, function, tries))
        function = node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
        for child in ast.iter_child_nodes(node):
            visit(child, function, tries + (node,) if isinstance(node, ast.Try) and child in node.body else tries)

    visit(tree, None, ())
    return found


def _relative_imports(tree):
    """(engine module name, enclosing function or None) of each ``from .x import`` / ``from . import x``."""
    found = []

    def visit(node, function):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
            found.extend((name, function) for name in names)
        function = node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return found


def _batch_extra_imports():
    """Import names of the ``livertumorseg[batch]`` extra: each requirement and the extras it names
    (``dask[distributed]`` installs the packages ``dask`` and ``distributed``)."""
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]["batch"]
    names = set()
    for requirement in extra:
        match = re.match(r"^\s*([A-Za-z0-9._-]+)(?:\[([^\]]*)\])?", requirement)
        names |= {match.group(1)} | {name.strip() for name in (match.group(2) or "").split(",") if name.strip()}
    return {name.lower().replace("-", "_") for name in names}


def _catches_import_error(try_node):
    """The ``except`` clauses of ``try_node`` that catch ImportError (or its subclass ModuleNotFoundError)."""
    return [handler for handler in try_node.handlers
            if handler.type is not None and {"ImportError", "ModuleNotFoundError"} & {
                n.id for n in ast.walk(handler.type) if isinstance(n, ast.Name)}]


def test_engine_imports_only_what_slicer_has_or_the_module_installs():
    """Slicer's Python gets the engine's packages from Resources/requirements.txt (REQUIRED_PACKAGES); the one
    exception is the command-line feature ``livertumorseg batch`` (the optional extra ``livertumorseg[batch]``),
    which Slicer never runs and so must never make Slicer install Dask.

    The rule for that exception: only the modules of BATCH_COMMAND_MODULES may import such packages, and only
    inside a function (nothing is loaded when the module is imported), inside a ``try`` that catches ImportError,
    with the package declared in the ``batch`` extra (the handler then says how to install it) or used only when
    present (a handler that raises nothing: pyarrow's Parquet copies of the CSV tables). Those modules in turn
    are imported only inside the batch command's function of the command line, never by the module or by any
    other engine module, so neither Slicer nor ``livertumorseg segment`` loads them.
    """
    from LiverTumorSegLib.slicer_dependencies import REQUIRED_PACKAGES

    allowed = set(sys.stdlib_module_names) | SLICER_PROVIDED | set(REQUIRED_PACKAGES) | {"LiverTumorSegLib"}
    batch_extra = _batch_extra_imports()
    assert {"dask", "distributed"} <= batch_extra
    problems = []
    for path in sorted((MODULE_DIR / "LiverTumorSegLib").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name, node, function, tries in _imports(tree):
            if name in allowed:
                continue
            handlers = [h for t in tries for h in _catches_import_error(t)]
            optional = handlers and not any(isinstance(n, ast.Raise) for h in handlers for n in ast.walk(h))
            if path.stem in BATCH_COMMAND_MODULES and function is not None and handlers and (name in batch_extra or optional):
                continue
            problems.append(f"{path.name}:{node.lineno}: {name}")
        for imported, function in _relative_imports(tree):
            if imported in BATCH_COMMAND_MODULES and path.stem not in BATCH_COMMAND_MODULES and not (
                    path.stem == BATCH_COMMAND_CLI and function is not None):
                problems.append(f"{path.name} imports the batch command's module {imported}"
                                + ("" if function is not None else " when it is imported"))
    for node in ast.walk(_module_tree()):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "LiverTumorSegLib":
            names = set(node.module.split(".")[1:]) | {alias.name for alias in node.names}
            problems += [f"LiverTumorSeg.py imports {name}" for name in sorted(names & BATCH_COMMAND_MODULES)]
    assert not problems, (
        "the engine imports packages that Slicer lacks and Resources/requirements.txt does not install (or the "
        "batch command's modules outside that command): " + ", ".join(problems)
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
    from LiverTumorSegLib.scene_run import copy_segmentation_content

    copy_segmentation_content(mine, segmentation)  # ... which the module restores
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


def test_engine_and_module_run_on_the_python_of_slicer_5_8():
    """3D Slicer 5.8 ships Python 3.9: the engine and the module must not use newer syntax or library calls."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "vermin"), "--target=3.9-", "--no-tips", "--violations",
         "--eval-annotations", str(MODULE_DIR / "LiverTumorSegLib"), str(MODULE_DIR / "LiverTumorSeg.py")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
