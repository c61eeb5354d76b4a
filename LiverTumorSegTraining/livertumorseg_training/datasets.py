"""Training data: finding cases in the supported layouts, reading them, and case-level splits.

Layouts:
- LiTS: ``volume-N.nii[.gz]`` + ``segmentation-N.nii[.gz]`` in one folder (our phantoms are written so too);
- MSD Task03 Liver: ``imagesTr/liver_N.nii.gz`` + ``labelsTr/liver_N.nii.gz``;
- 3D-IRCADb-01: one folder per patient with ``PATIENT_DICOM/`` and ``MASKS_DICOM/liver``,
  ``MASKS_DICOM/livertumor01``, ``livertumor02``, … (DICOM series; masks are 0/255);
- paired files: ``NAME_ct.nii.gz`` + ``NAME_label.nii.gz`` (or ``NAME_lits_label.nii.gz``), 0/1/2 labels.
  With a ``cases.json`` beside them the CTs are **8-bit windowed scans**, not HU: grey values 0–255 that
  stand for an unknown HU window, estimated as :data:`ESTIMATED_GREY_WINDOW` (fat peak at grey 36–40, liver
  median 150–180; see the real-train data's README). Training redraws that window per tile (``slices.py``).
Reading goes through the engine (``LiverTumorSegLib.image_io``), so training and inference read alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from LiverTumorSegLib.errors import InputError
from LiverTumorSegLib.image_io import Image, read_image


#: HU window that the grey values 0–255 of the 8-bit real scans are estimated to stand for:
#: grey = 255 · (HU + 170) / 460 puts fat (−100 HU) at grey ≈ 39 and portal-venous liver (≈ 110 HU) at ≈ 155.
ESTIMATED_GREY_WINDOW = (-170.0, 290.0)


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path  # file or DICOM folder
    labels: tuple[Path, ...]  # one LiTS-style label map, or IRCADb liver mask + tumour masks
    layout: str
    grey_window: tuple[float, float] | None = None  # 8-bit windowed scans: the HU window the grey values stand for


def find_cases(root: str | Path) -> list[Case]:
    """All labelled cases under ``root``, sorted by id; the layout is recognised from the file names."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"Dataset folder '{root}' does not exist.")
    cases = _lits(root) or _msd(root) or _ircadb(root) or _paired(root)
    if not cases:
        raise InputError(
            f"No labelled cases found in '{root}'. Expected LiTS (volume-N.nii[.gz] + segmentation-N.nii[.gz]), "
            "MSD Task03 (imagesTr/ + labelsTr/), 3D-IRCADb-01 (*/PATIENT_DICOM + */MASKS_DICOM/liver) or paired "
            "(NAME_ct.nii.gz + NAME_label.nii.gz) layout."
        )
    return cases


def find_cases_in(folders: str | Path | list) -> dict[str, Case]:
    """The cases of one or several dataset folders by id. With several folders each id is prefixed with its
    folder's name (``phantoms-train/lits-3``), since two LiTS folders both number their cases from 0."""
    folders = folder_list(folders)
    names = [Path(folder).name for folder in folders]
    if len(set(names)) < len(names):
        raise InputError(f"Training folders must have different names to tell their cases apart: {', '.join(map(str, folders))}.")
    cases = {}
    for folder, name in zip(folders, names):
        for case in find_cases(folder):
            key = case.case_id if len(folders) == 1 else f"{name}/{case.case_id}"
            cases[key] = case
    return cases


def folder_list(data: str | Path | list) -> list:
    """A training configuration's ``data``, one folder or several, as a list of folders."""
    return [data] if isinstance(data, (str, Path)) else list(data)


def bundle_cases_in(cases: list[str], folder: str | Path) -> list[str]:
    """A bundle's recorded case ids that belong to ``folder``. A model trained on several folders records its
    ids as ``FOLDER/ID`` (:func:`find_cases_in`): those of this folder lose the prefix, the others are left out."""
    name = Path(folder).name
    return [case.split("/", 1)[1] if "/" in case else case for case in cases
            if "/" not in case or case.split("/", 1)[0] == name]


def recorded_case_ids(training: dict, parts) -> list[str]:
    """The ids of a bundle's recorded split ``parts`` (e.g. ``("train", "real_train")``), each as ``FOLDER/ID`` where
    the manifest tells the folder: ids of a one-folder training run get that folder's name (``training["data"]``),
    real scans the name of ``--real-data``. An id whose folder is unknown (older bundles) stays bare."""
    split = training.get("split") or {}
    data_names = [name.strip() for name in str(training.get("data", "")).split(",") if name.strip()]
    real_data = (training.get("config") or {}).get("real_data")
    ids = []
    for part in parts:
        folder = Path(real_data).name if part.startswith("real_") and real_data else \
            (data_names[0] if len(data_names) == 1 and not part.startswith("real_") else None)
        ids += [case if "/" in case or folder is None else f"{folder}/{case}" for case in split.get(part, [])]
    return list(dict.fromkeys(ids))


def _natural(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _lits(root: Path) -> list[Case]:
    cases = []
    for volume in sorted(root.glob("volume-*.nii*"), key=lambda p: _natural(p.name)):
        number = volume.name.split("-", 1)[1].split(".")[0]
        label = next((p for p in (root / f"segmentation-{number}.nii.gz", root / f"segmentation-{number}.nii") if p.exists()), None)
        if label is not None:
            cases.append(Case(f"lits-{number}", volume, (label,), "lits"))
    return cases


def _msd(root: Path) -> list[Case]:
    images, labels = root / "imagesTr", root / "labelsTr"
    if not (images.is_dir() and labels.is_dir()):
        return []
    cases = []
    for image in sorted(images.glob("*.nii*"), key=lambda p: _natural(p.name)):
        if image.name.startswith("._"):  # macOS resource forks shipped in the MSD archives
            continue
        label = labels / image.name
        if label.exists():
            cases.append(Case(f"msd-{image.name.split('.')[0]}", image, (label,), "msd"))
    return cases


def _ircadb(root: Path) -> list[Case]:
    patients = [root] if (root / "PATIENT_DICOM").is_dir() else sorted(
        (p for p in root.iterdir() if (p / "PATIENT_DICOM").is_dir()), key=lambda p: _natural(p.name)
    )
    cases = []
    for patient in patients:
        masks = patient / "MASKS_DICOM"
        liver = masks / "liver"
        if not liver.is_dir():
            continue
        tumours = sorted((p for p in masks.iterdir() if p.is_dir() and p.name.startswith("livertumor")), key=lambda p: _natural(p.name))
        cases.append(Case(f"ircadb-{patient.name}", patient / "PATIENT_DICOM", (liver, *tumours), "ircadb"))
    return cases


def _paired(root: Path) -> list[Case]:
    windowed = (root / "cases.json").is_file()
    cases = []
    for image in sorted(root.glob("*_ct.nii*"), key=lambda p: _natural(p.name)):
        name, suffix = image.name.split("_ct.", 1)
        label = next((p for p in (root / f"{name}_label.{suffix}", root / f"{name}_lits_label.{suffix}") if p.exists()), None)
        if label is not None:
            cases.append(Case(name, image, (label,), "windowed-8bit" if windowed else "paired",
                              ESTIMATED_GREY_WINDOW if windowed else None))
    return cases


def load_case(case: Case) -> tuple[Image, np.ndarray]:
    """The CT and its 0/1/2 label map (uint8) on the CT's grid.

    An 8-bit windowed scan comes back in HU by its estimated window (float32; grey 0 and 255 stay at the
    window's edges, since what lies beyond them is unknown).
    """
    if case.grey_window is not None:
        grey = read_image(case.image, kind="8-bit CT")
        if grey.array.min() < 0 or grey.array.max() > 255:
            raise InputError(f"'{case.image}' has values outside 0–255; an 8-bit windowed scan was expected "
                             "(remove cases.json if these CTs are in HU).")
        low, high = case.grey_window
        image = grey.with_array(np.float32(low) + grey.array.astype(np.float32) * np.float32((high - low) / 255.0))
    else:
        image = read_image(case.image)
    if case.layout == "ircadb":
        labels = np.zeros(image.array.shape, np.uint8)
        for value, path in zip([1] + [2] * (len(case.labels) - 1), case.labels):
            mask = read_image(path, kind="mask").array
            _check_same_grid(image, mask, path)
            labels[mask > 0] = value
        return image, labels
    labels = read_image(case.labels[0], kind="label map").array
    _check_same_grid(image, labels, case.labels[0])
    labels = np.rint(labels).astype(np.uint8)
    if labels.max() > 2:
        raise InputError(f"'{case.labels[0]}' has label values up to {labels.max()}; expected 0 background, 1 liver, 2 tumour.")
    return image, labels


def _check_same_grid(image: Image, labels: np.ndarray, path: Path) -> None:
    if labels.shape != image.array.shape:
        raise InputError(f"'{path}' has shape {labels.shape[::-1]} but its CT has {image.array.shape[::-1]}: they must share one grid.")


def kfold_split(case_ids: list[str], folds: int, fold: int, validation: int, seed: int = 0) -> dict[str, list[str]]:
    """Case-level split (paper §4.1): fold ``fold`` of ``folds`` is the test set; ``validation`` cases are
    drawn once, with the seed, from the remaining training pool. Deterministic for a given seed."""
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in 0..{folds - 1}")
    order = np.random.default_rng(seed).permutation(len(case_ids))
    ids = [case_ids[i] for i in order]
    test = ids[fold::folds] if folds > 1 else []
    pool = [i for i in ids if i not in set(test)]
    if validation >= len(pool):
        raise ValueError(f"{validation} validation cases requested but only {len(pool)} training cases are available")
    return {"train": sorted(pool[validation:], key=_natural), "validation": sorted(pool[:validation], key=_natural),
            "test": sorted(test, key=_natural)}
