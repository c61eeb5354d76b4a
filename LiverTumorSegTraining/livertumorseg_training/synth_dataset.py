"""Writing label-bank phantoms as a training dataset, resumably, in the LiTS layout the trainer reads
(``volume-N.nii.gz``, ``segmentation-N.nii.gz``, ``volume-N.json``), so that ``livertumorseg-train train
--data OUT`` uses them unchanged.

Case N is painted from one map of the chosen sources (the maps in a seeded order, cycled) with the seed
``case_seed(seed, N)``. A case is complete when its sidecar exists (it is renamed into place last); a
second run with the same settings keeps the complete cases and writes the missing ones, so an interrupted
run, or a larger ``--count``, continues where it stopped. ``synth_phantoms.json`` records the settings; a
folder holding other files, or phantoms of other settings, is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from LiverTumorSegLib.errors import OutputError, UsageError
from LiverTumorSegLib.phantoms import SIZES, case_seed
from LiverTumorSegLib.phantoms.writing import case_files, write_case

from .label_bank import SOURCES, list_label_maps, read_label_map
from .synth_ct import SYNTH_VERSION, SynthOptions, synthesize
from .synth_paint import SYNTH_TISSUES

MANIFEST = "synth_phantoms.json"
PRODUCER = "livertumorseg-train synth-phantoms"
_OURS = re.compile(r"(volume-\d+\.nii\.gz|segmentation-\d+\.nii\.gz|volume-\d+\.json|\.volume-\d+\..*\.partial"
                   r"|\.synth_phantoms\.json\..*)")


def write_synth_dataset(bank: str | Path, out: str | Path, count: int, seed: int = 0, sources=SOURCES,
                        size: str = "full", progress: Callable[[str], None] = print) -> list[Path]:
    """Write cases 0..count-1 of label-bank phantoms into ``out`` (complete ones already there are kept);
    returns the volumes' paths in order."""
    if count < 1:
        raise UsageError("--count must be at least 1.")
    if size not in SIZES:
        raise UsageError(f"Unknown size {size!r}; use one of {', '.join(SIZES)}.")
    entries = list_label_maps(bank, sources)
    out = Path(out)
    settings = dict(producer=PRODUCER, version=SYNTH_VERSION, seed=int(seed), sources=sorted(set(sources)), size=size)
    has_manifest = _check_folder(out, settings)
    order = np.random.default_rng(seed).permutation(len(entries))
    written = []
    for index in range(count):
        volume, _, sidecar = case_files(index)
        if (out / sidecar).is_file():
            progress(f"case {index}: complete, kept")
        else:
            entry = entries[order[index % len(entries)]]
            phantom = synthesize(read_label_map(entry.path), case_seed(seed, index), SynthOptions(size=size),
                                 source=entry.case_id)
            phantom.meta.update(dataset_seed=int(seed), case=index)
            side = dict(case=index, label_map=entry.case_id, tumours=phantom.tumours, meta=phantom.meta,
                        labels={"0": "background", "1": "liver", "2": "tumour"},
                        tissues={str(k): v for k, v in SYNTH_TISSUES.items()})
            if not has_manifest:  # written with the first case: a run that fails before it leaves nothing
                _write_manifest(out, settings)
                has_manifest = True
            write_case(out, index, phantom.image, phantom.label, side)
            progress(f"case {index}: {entry.case_id}, {phantom.meta['phase']}, {phantom.image.array.shape[::-1]} voxels of "
                     f"{tuple(round(s, 2) for s in phantom.image.geometry.spacing)} mm, "
                     f"{phantom.meta['inserted_tumours']} inserted tumour(s)")
        written.append(out / volume)
    return written


def _check_folder(out: Path, settings: dict) -> bool:
    """Refuse an ``out`` that is not a folder, holds other files, or phantoms of other ``settings``; remove
    the temporary folders of an interrupted run. Returns whether ``out`` holds our manifest."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"'{out}' exists and is not a folder. Choose a folder for the phantoms.")
    if not out.is_dir():
        return False
    foreign = sorted(p.name for p in out.iterdir() if p.name != MANIFEST and not _OURS.fullmatch(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (" …" if len(foreign) > 5 else "")
        raise OutputError(f"'{out}' holds other files ({shown}). Choose a new or empty folder for the phantoms.")
    manifest = out / MANIFEST
    if not manifest.is_file():
        if any(out.glob("volume-*")):
            raise OutputError(f"'{out}' holds phantom files but no {MANIFEST}; they were not written by this "
                              "command. Choose a new or empty folder.")
        return False
    try:
        previous = json.loads(manifest.read_text(encoding="utf-8"))
    except ValueError:
        previous = None
    if previous != settings:
        raise OutputError(f"'{out}' holds label-bank phantoms of other settings ({previous}); continuing would mix "
                          f"them with {settings}. Choose another folder, or the same settings.")
    for leftover in out.glob(".volume-*.partial"):  # temporary folders of an interrupted run
        shutil.rmtree(leftover, ignore_errors=True)
    return True


def _write_manifest(out: Path, settings: dict) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=out)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(settings, stream, indent=1)
        os.replace(tmp, out / MANIFEST)
    except OSError as error:
        raise OutputError(f"Cannot write to '{out}' ({error.strerror}). Choose a writable output location.") from None
