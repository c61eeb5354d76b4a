"""Writing phantom datasets in the LiTS layout the trainer reads: one volume, one label map and one JSON
sidecar per case, each case complete or absent (temporary files renamed into place)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import OutputError
from ..image_io import Image, write_image
from .case import Phantom, case_seed, generate_phantom
from .scanner import SIZES
from .tissues import TISSUES


def _sidecar(ph: Phantom, index: int) -> dict:
    """The ``volume-N.json`` sidecar of case ``index``: tumours, metadata, label and tissue names."""
    return dict(case=index, tumours=ph.tumours, meta=ph.meta,
                labels={"0": "background", "1": "liver", "2": "tumour"}, tissues={str(k): v for k, v in TISSUES.items()})


def write_phantom_dataset(out_dir, count: int, size: str = "small", seed: int = 0, overwrite: bool = False) -> list[Path]:
    """Write ``count`` phantoms in LiTS layout: ``volume-N.nii.gz``, ``segmentation-N.nii.gz`` and a
    ``volume-N.json`` sidecar (tumours and acquisition metadata) for N = 0..count-1.

    Case N uses :func:`case_seed` (seed, N). Each case is written completely or not at all (temporary files
    renamed into place). Existing files are refused with :class:`OutputError` unless ``overwrite``; the check
    covers all cases before anything is written. Returns the paths of the volumes, in order.
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    if size not in SIZES:
        raise ValueError(f"unknown phantom size {size!r}; use one of {sorted(SIZES)}")
    out = Path(out_dir)
    names = [case_files(i) for i in range(count)]
    if not overwrite:
        existing = [str(out / n) for trio in names for n in trio if (out / n).exists()]
        if existing:
            more = f" (and {len(existing) - 3} more)" if len(existing) > 3 else ""
            raise OutputError(
                f"The phantom dataset would overwrite existing files: {', '.join(existing[:3])}{more}. "
                "Choose an empty output folder, or pass overwrite=True (--overwrite) to replace them.")
    if out.exists() and not out.is_dir():
        raise OutputError(f"'{out}' exists and is not a folder. Choose a folder for the phantom dataset.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"Cannot create '{out}' ({error.strerror}). Choose a writable output location.") from None
    written = []
    for i in range(count):
        ph = generate_phantom(case_seed(seed, i), size)
        ph.meta["dataset_seed"] = int(seed)
        ph.meta["case"] = i
        written.append(write_case(out, i, ph.image, ph.label, _sidecar(ph, i)))
    return written


def case_files(index: int) -> tuple[str, str, str]:
    """File names of case ``index`` in the LiTS layout: volume, label map, JSON sidecar."""
    return f"volume-{index}.nii.gz", f"segmentation-{index}.nii.gz", f"volume-{index}.json"


def write_case(out: Path, index: int, image: Image, label: np.ndarray, sidecar: dict) -> Path:
    """Write one case into the folder ``out``: all three files are written to a temporary folder first and
    renamed into place, the sidecar last (a case with its sidecar is complete). Returns the volume's path."""
    vol, seg, side = case_files(index)
    tmp = Path(tempfile.mkdtemp(prefix=f".volume-{index}.", suffix=".partial", dir=out))
    try:
        write_image(image, tmp / vol)
        write_image(image.with_array(label), tmp / seg)
        (tmp / side).write_text(json.dumps(sidecar, indent=1))
        for n in (vol, seg, side):
            os.replace(tmp / n, out / n)
    except OSError as error:
        raise OutputError(f"Writing phantom case {index} to '{out}' failed ({error.strerror}).") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / vol
