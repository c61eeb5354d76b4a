"""Tissue classes of the phantoms and their HU: the class ids, the contrast phases, the mean HU of every
tissue drawn per case and phase (portal-venous liver about 90-130 HU, enhanced portal and hepatic veins
about 150-200 HU), and per-tissue HU statistics of generated cases."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from .case import Phantom


#: Internal tissue classes of the phantoms (id -> name). ``tissues`` maps use these ids.
TISSUES: dict[int, str] = {
    0: "air",
    1: "fat",
    2: "muscle",
    3: "liver",
    4: "tumour",
    5: "hepatic/portal vessels",
    6: "spleen",
    7: "kidney cortex",
    8: "kidney medulla",
    9: "stomach wall",
    10: "stomach fluid",
    11: "gas",
    12: "aorta",
    13: "ivc",
    14: "bone cortical",
    15: "bone marrow",
    16: "lung",
    17: "heart",
    18: "gallbladder",
    19: "skin",
    20: "bowel",
    21: "pancreas",
    22: "oral contrast",
    23: "table",
    24: "myocardium",
    25: "spinal canal",
    26: "intervertebral disc",
    27: "stool",
    28: "pulmonary vessels",
    29: "mesenteric vessels",
    30: "cartilage",
    31: "ascites",
    32: "calcification",
    33: "gallbladder wall",
}


class Tissue:
    """Tissue ids by name (see :data:`TISSUES`)."""

    AIR, FAT, MUSCLE, LIVER, TUMOUR, VESSEL, SPLEEN, CORTEX, MEDULLA = range(9)
    STOMACH_WALL, STOMACH_FLUID, GAS, AORTA, IVC, CORTICAL, MARROW, LUNG, HEART = range(9, 18)
    GALLBLADDER, SKIN, BOWEL, PANCREAS, ORAL, TABLE, MYOCARDIUM, CANAL, DISC = range(18, 27)
    STOOL, PULM_VESSEL, MES_VESSEL, CARTILAGE, ASCITES, CALCIFICATION, GB_WALL = range(27, 34)


PHASES = ("portal_venous", "late_arterial", "unenhanced")
PHASE_PROBABILITIES = (0.75, 0.15, 0.10)
#: The equilibrium phase (3-5 min): :func:`tissue_levels` and :func:`.lesions.tumour_levels` accept it too;
#: the procedural phantoms do not draw it (other generators do).
DELAYED = "delayed"
ALL_PHASES = PHASES + (DELAYED,)


def tissue_levels(rng: np.random.Generator, phase: str, c: float, *, steatosis: bool, sludge: bool,
                  age_factor: float) -> dict:
    """Mean HU of every tissue for one case (contrast phase ``phase``, contrast scale ``c``), keyed by
    :class:`Tissue` id, plus named levels (hepatic veins, bowel fluid) and texture strengths.

    ``steatosis`` lowers the liver, ``sludge`` raises the gallbladder content, ``age_factor`` (0 young .. 1
    old) lowers the bone density."""
    if phase not in ALL_PHASES:
        raise ValueError(f"unknown contrast phase {phase!r}; use one of {ALL_PHASES}")
    u = rng.uniform
    pv, la, dl = phase == "portal_venous", phase == "late_arterial", phase == DELAYED
    washout = u(0.75, 1.0) if dl else 1.0  # drawn in the delayed phase only: other phases keep their draws

    def enh(pv_range, la_range, delayed=0.8):
        """Enhancement; in the delayed phase ``delayed`` x the portal-venous value, times the washout."""
        v_pv, v_la = u(*pv_range), u(*la_range)
        return c * (v_pv if pv else v_la if la else v_pv * delayed * washout if dl else 0.0)

    blood = u(36, 46)
    liver0 = u(52, 66) - (u(15, 35) if steatosis else 0.0)
    L = {}
    L[Tissue.AIR] = -1000.0
    L[Tissue.FAT] = u(-112, -88)
    L[Tissue.MUSCLE] = u(42, 58) + enh((5, 15), (3, 10), 1.0)
    L[Tissue.LIVER] = liver0 + enh((38, 62), (12, 30), 0.75)
    portal = blood + enh((110, 150), (60, 110), 0.6)
    L[Tissue.VESSEL] = portal
    L["hepatic_veins"] = blood + enh((100, 145), (0, 25), 0.6)
    L[Tissue.SPLEEN] = u(42, 52) + enh((55, 85), (60, 100))
    cortex0 = u(28, 38)
    L[Tissue.CORTEX] = cortex0 + enh((120, 165), (140, 220))
    L[Tissue.MEDULLA] = cortex0 + enh((85, 130), (20, 60), 1.25)
    L[Tissue.STOMACH_WALL] = u(35, 45) + enh((35, 65), (45, 80))
    L[Tissue.GB_WALL] = u(35, 45) + enh((25, 55), (30, 60))
    L[Tissue.STOMACH_FLUID] = u(0, 20)
    L[Tissue.GAS] = u(-1000, -975)
    L[Tissue.AORTA] = blood + enh((105, 150), (190, 300), 0.6)
    L[Tissue.IVC] = blood + enh((80, 130), (15, 50), 0.7)
    L[Tissue.CORTICAL] = u(750, 1200) - 150 * age_factor
    L[Tissue.MARROW] = u(210, 300) - 60 * age_factor
    L[Tissue.LUNG] = u(-900, -840)
    L[Tissue.HEART] = blood + enh((100, 150), (180, 300), 0.6)
    L[Tissue.GALLBLADDER] = u(25, 40) if sludge else u(0, 22)
    L[Tissue.SKIN] = u(15, 40) + enh((5, 15), (5, 15), 1.0)
    L[Tissue.BOWEL] = u(30, 42) + enh((35, 65), (35, 70))
    L[Tissue.PANCREAS] = u(38, 50) + enh((45, 70), (65, 100), 0.7)
    L[Tissue.ORAL] = u(150, 450)
    L[Tissue.TABLE] = u(200, 450)
    L[Tissue.MYOCARDIUM] = u(42, 55) + enh((50, 80), (60, 100))
    L[Tissue.CANAL] = u(15, 35)
    L[Tissue.DISC] = u(70, 110)
    L[Tissue.STOOL] = u(-40, 30)
    L[Tissue.PULM_VESSEL] = blood + enh((60, 120), (60, 160), 0.6)
    L[Tissue.MES_VESSEL] = blood + enh((90, 140), (50, 150), 0.6)
    L[Tissue.CARTILAGE] = u(90, 180)
    L[Tissue.ASCITES] = u(0, 18)
    L[Tissue.CALCIFICATION] = u(300, 900)
    L["bowel_fluid"] = u(5, 25)
    L["lung_dependent"] = u(40, 140)
    L["liver_texture"] = u(2.5, 5.0) if pv else u(5.0, 9.0) if la else u(2.0, 4.0)
    L["spleen_texture"] = u(20, 35) if la else u(2, 5)
    L["marrow_texture"] = u(20, 40)
    L["fat_texture"] = u(4, 10)
    L["muscle_texture"] = u(3, 8)
    return L


def levels_lut(levels: dict) -> np.ndarray:
    """Lookup table tissue id -> mean HU (float32, 256 entries) from the id keys of :func:`tissue_levels`."""
    lut = np.zeros(256, np.float32)
    for k, v in levels.items():
        if isinstance(k, int):
            lut[k] = v
    return lut


def tissue_hu_table(phantoms: Sequence[Phantom], names: dict[int, str] = TISSUES) -> list[dict]:
    """Per-tissue HU statistics over ``phantoms`` (anything with ``image`` and ``tissues``): rows {"id",
    "tissue", "mean_hu", "std_hu", "voxels"} for the tissue ``names`` present."""
    n = np.zeros(256, np.float64)
    s1 = np.zeros(256, np.float64)
    s2 = np.zeros(256, np.float64)
    for p in phantoms:
        t = p.tissues.ravel()
        v = p.image.array.ravel().astype(np.float64)
        n += np.bincount(t, minlength=256)
        s1 += np.bincount(t, weights=v, minlength=256)
        s2 += np.bincount(t, weights=v * v, minlength=256)
    rows = []
    for tid, name in names.items():
        if n[tid] == 0:
            continue
        mean = s1[tid] / n[tid]
        var = max(s2[tid] / n[tid] - mean * mean, 0.0)
        rows.append(dict(id=tid, tissue=name, mean_hu=round(float(mean), 2), std_hu=round(float(math.sqrt(var)), 2),
                         voxels=int(n[tid])))
    return rows
