"""The real-anatomy label bank: label maps drawn on real patients' CT (no images), in one label scheme.

The bank (``../shared/data/label-bank/``, see its README) holds multi-organ maps (FLARE22, WORD, AMOS,
AbdomenAtlas) and 3D-IRCADb maps with real liver tumours, cysts and intrahepatic vessels; ``labels.json``
names the label values and lists the cases. This module lists the cases of chosen sources, reads a map in the
engine's canonical orientation, and turns it into the LiTS labels the trainer learns (0 background,
1 liver, 2 tumour), where the liver region is the liver, its tumours and the vessels, cysts and bile ducts
inside it (:func:`liver_region`).

The 3D-IRCADb patient 1 is the real validation CT (``ircad/ircad01_ct.nii.gz``): its label map is never
listed for training (:data:`VALIDATION_CASES`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from LiverTumorSegLib.errors import InputError, UsageError
from LiverTumorSegLib.image_io import Image, read_image, to_canonical
from LiverTumorSegLib.masks import bounding_box
from LiverTumorSegLib.phantoms.grid import allowed_lut


class Structure:
    """Label values of the bank's scheme (``labels.json``)."""

    LIVER, TUMOUR, SPLEEN, KIDNEY_R, KIDNEY_L, STOMACH, PANCREAS, GALLBLADDER, AORTA, IVC = range(1, 11)
    PORTAL_VEIN, HEPATIC_VEINS, DUODENUM, OESOPHAGUS, ADRENALS, COLON, SMALL_BOWEL, RECTUM, BLADDER = range(11, 20)
    BONE, LUNGS, CYST, OTHER_TUMOUR, FEMORAL_HEADS, BILIARY, PELVIC_ORGAN, BODY = range(20, 28)


#: Names of the label values as ``labels.json`` gives them; a bank with another scheme is refused.
LABEL_NAMES = {
    1: "liver", 2: "liver tumour", 3: "spleen", 4: "right kidney", 5: "left kidney", 6: "stomach", 7: "pancreas",
    8: "gallbladder", 9: "aorta / arteries", 10: "inferior vena cava", 11: "portal vein", 12: "hepatic / venous system",
    13: "duodenum", 14: "oesophagus", 15: "adrenal glands", 16: "colon", 17: "small intestine", 18: "rectum",
    19: "urinary bladder", 20: "bone", 21: "lungs", 22: "liver cyst", 23: "other tumour", 24: "femoral heads",
    25: "biliary system", 26: "prostate / uterus", 27: "body (skin outline, filled)",
}

SOURCES = ("ircad", "flare22", "word", "amos", "abdomenatlas")

#: Label maps of the patient whose real CT validates the models: never used for training phantoms.
VALIDATION_CASES = ("ircad/ircad01",)

#: Structures that belong to the liver region (LiTS sense) where they lie inside the liver.
INTRAHEPATIC = (Structure.PORTAL_VEIN, Structure.HEPATIC_VEINS, Structure.CYST, Structure.BILIARY)

#: Codes given to the intrahepatic parts of :data:`INTRAHEPATIC` by :func:`mark_intrahepatic` (beyond the
#: bank's values), so that one resampling carries both what a voxel is and whether it is liver.
INTRAHEPATIC_CODE = {Structure.PORTAL_VEIN: 28, Structure.HEPATIC_VEINS: 29, Structure.CYST: 30, Structure.BILIARY: 31}
LIVER_REGION_CODES = (Structure.LIVER, Structure.TUMOUR, *INTRAHEPATIC_CODE.values())


@dataclass(frozen=True)
class LabelMapEntry:
    case_id: str  # "source/name", as labels.json lists it
    source: str
    path: Path


def list_label_maps(bank: str | Path, sources=SOURCES) -> list[LabelMapEntry]:
    """The bank's label maps of ``sources`` in ``labels.json`` order, without :data:`VALIDATION_CASES`."""
    bank = Path(bank)
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise UsageError(f"Unknown label-bank source(s): {', '.join(unknown)}. Choose from {', '.join(SOURCES)}.")
    index = bank / "labels.json"
    if not index.is_file():
        raise InputError(f"'{bank}' is not a label bank: it has no labels.json. Pass the label-bank folder "
                         "(e.g. ../shared/data/label-bank).")
    try:
        document = json.loads(index.read_text(encoding="utf-8"))
        names = {int(value): name for value, name in document["labels"].items()}
        cases = [str(case) for case in document["cases"]]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"'{index}' is not a label-bank index ({error}); it needs 'labels' and 'cases'.") from None
    differing = sorted(value for value, name in LABEL_NAMES.items() if names.get(value) != name)
    if differing:
        raise InputError(f"'{index}' uses another label scheme (values {differing} differ from the one this code "
                         "knows); the maps cannot be read as liver, tumour, organs.")
    entries = []
    for case in cases:
        source = case.split("/", 1)[0]
        if source not in sources or case in VALIDATION_CASES:
            continue
        path = bank / f"{case}.nii.gz"
        if not path.is_file():
            raise InputError(f"The label bank lists '{case}' but '{path}' is missing. Copy the bank again.")
        entries.append(LabelMapEntry(case, source, path))
    if not entries:
        raise InputError(f"The label bank '{bank}' has no label maps of the source(s) {', '.join(sources)}.")
    return entries


def read_label_map(path: str | Path) -> Image:
    """A label map in the canonical orientation (uint8), checked: values of the scheme, a liver present."""
    image, _ = to_canonical(read_image(path, kind="label map"))
    values = image.array
    if values.min() < 0 or values.max() > max(LABEL_NAMES) or not np.array_equal(values, np.rint(values)):
        raise InputError(f"'{path}' has values outside the label bank's scheme (integers 0-{max(LABEL_NAMES)}).")
    labels = values.astype(np.uint8)
    if not (labels == Structure.LIVER).any():
        raise InputError(f"'{path}' has no liver (label {Structure.LIVER}); label-bank phantoms are built on a real "
                         "liver. Leave this map out (choose other --sources) or add its liver label.")
    return image.with_array(labels)


def liver_region(labels: np.ndarray) -> np.ndarray:
    """The liver in the LiTS sense: liver and its tumours, plus the vessels, cysts and bile ducts that lie
    inside the liver's outline filled slice by slice (vessels entering at the hilum stay out).

    On the 3D-IRCADb patient 1 this gives Dice 0.998 against that patient's manual LiTS label."""
    core = (labels == Structure.LIVER) | (labels == Structure.TUMOUR)
    box = bounding_box(core)
    if box is None:
        return core
    enclosed = np.zeros_like(core)
    enclosed[box] = fill_holes_per_slice(core[box])
    return core | (enclosed & allowed_lut(INTRAHEPATIC)[labels])


#: In-plane 4-connectivity (no neighbours across slices).
_IN_PLANE = np.array([[[0, 0, 0], [0, 0, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]], [[0, 0, 0], [0, 0, 0], [0, 0, 0]]])


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """``mask`` with the holes of every axial slice filled (the background not connected in-plane to the
    slice's border), in one labelling pass instead of one iterative hole filling per slice."""
    padded = np.pad(~mask, ((0, 0), (1, 1), (1, 1)), constant_values=True)
    components, count = ndimage.label(padded, structure=_IN_PLANE)
    outside = np.zeros(count + 1, bool)
    for edge in (components[:, 0, :], components[:, -1, :], components[:, :, 0], components[:, :, -1]):
        outside[edge] = True
    return ~outside[components[:, 1:-1, 1:-1]]


def mark_intrahepatic(labels: np.ndarray) -> np.ndarray:
    """A copy of ``labels`` where the intrahepatic parts of :data:`INTRAHEPATIC` carry
    :data:`INTRAHEPATIC_CODE` values, so that :data:`LIVER_REGION_CODES` is the liver region."""
    inside = liver_region(labels) & allowed_lut(INTRAHEPATIC)[labels]
    out = labels.copy()
    for value, code in INTRAHEPATIC_CODE.items():
        out[inside & (labels == value)] = code
    return out


def lits_labels(marked: np.ndarray) -> np.ndarray:
    """LiTS labels (uint8: 0 background, 1 liver, 2 tumour) of a map marked by :func:`mark_intrahepatic`."""
    out = allowed_lut(LIVER_REGION_CODES)[marked].astype(np.uint8)
    out[marked == Structure.TUMOUR] = 2
    return out
