"""The output folder of a segmentation: its file names, and the checks that keep it from ever touching an input.

``--overwrite`` replaces only a previous output of this tool. Before any work, :func:`check_output_folder`
refuses an output path that is an input, lies inside one, or contains one (``-o`` the input's own folder,
a DICOM series folder, ``.``), a path below a regular file, and an existing folder that is not recognisably
ours: ours holds a ``run.json`` whose ``producer`` is this engine and nothing but the files we write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .errors import OutputError

#: Output file names inside the output folder.
LABELS_FILE = {"nifti": "segmentation.nii.gz", "nrrd": "segmentation.nrrd"}
SEGMENTATION_FILE = "segmentation.seg.nrrd"
DICOM_SEG_FILE = "segmentation.dcm"  # for a DICOM series input
VOLUMETRY_JSON, VOLUMETRY_CSV, REPORT_HTML, RUN_JSON = "volumetry.json", "volumetry.csv", "report.html", "run.json"
OUTPUT_FILES = frozenset({*LABELS_FILE.values(), SEGMENTATION_FILE, DICOM_SEG_FILE, VOLUMETRY_JSON, VOLUMETRY_CSV,
                          REPORT_HTML, RUN_JSON})

#: The ``producer`` entry of our ``run.json``: how a folder is recognised as a previous output.
PRODUCER = "LiverTumorSeg"


def check_output_folder(output: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *, overwrite: bool = False,
                        files: frozenset = OUTPUT_FILES, marker: str = RUN_JSON) -> Path:
    """Refuse an output folder that could destroy data; return it unchanged when it is safe to write.

    ``files`` are the names an output folder of this kind holds and ``marker`` the JSON file among them whose
    ``producer`` identifies it (the defaults: a segmentation's; a resection plan passes its own).
    Raises :class:`OutputError` (exit code 3) naming the problem and what to do.
    """
    output = Path(output)
    target = _resolved(output)
    for source in inputs:
        source_path = _resolved(Path(source))
        if target == source_path or source_path in target.parents:
            raise OutputError(f"The output '{output}' is, or lies inside, the input '{source}'. "
                              "Choose an output folder outside the input.")
        if target in source_path.parents:
            raise OutputError(f"The output '{output}' contains the input '{source}'; replacing it would delete the "
                              "input. Choose a new, separate output folder.")
    if target == _resolved(Path.cwd()) or target in _resolved(Path.cwd()).parents:
        raise OutputError(f"The output '{output}' is the current folder or one above it. Choose a new, separate "
                          "output folder.")
    for parent in target.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"Cannot write '{output}': '{parent}' is a file, not a folder. Choose another output folder.")
    if not output.exists() and not output.is_symlink():
        return output
    if not overwrite:
        raise OutputError(f"'{output}' already exists. Choose another output folder, or pass --overwrite to replace "
                          "a previous output of this tool.")
    problem = _not_our_output(output, files, marker)
    if problem:
        raise OutputError(f"'{output}' is not a previous output of livertumorseg ({problem}), so --overwrite will "
                          "not replace it. Choose a new output folder, or remove it yourself.")
    return output


def _not_our_output(folder: Path, files: frozenset, marker: str) -> str | None:
    """Why ``folder`` is not a folder this tool wrote, or None if it is one."""
    if folder.is_symlink() or not folder.is_dir():
        return "it is not a folder"
    foreign = sorted(entry.name for entry in folder.iterdir() if entry.name not in files or not entry.is_file())
    if foreign:
        shown = ", ".join(foreign[:5]) + (" …" if len(foreign) > 5 else "")
        return f"it holds other files: {shown}"
    try:
        document = json.loads((folder / marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"it has no readable {marker}"
    if not isinstance(document, dict) or document.get("producer") != PRODUCER:
        return f"its {marker} was not written by livertumorseg"
    return None


def _resolved(path: Path) -> Path:
    """Absolute path with symbolic links followed (as far as they exist), so that aliases compare equal."""
    return Path(os.path.realpath(path))
