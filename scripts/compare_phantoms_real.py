"""Compare phantoms with real CT: HU, texture and noise inside the same structures.

    .venv/bin/python scripts/compare_phantoms_real.py [--label-bank ../shared/data/label-bank]
        [--synth 2] [--procedural 2] [--seed 0] [--json table.json]

Rows, for (a) the real portal-venous CT of 3D-IRCADb patient 1 (``ircad/ircad01_ct.nii.gz``), (b) label-bank
phantoms (``livertumorseg-train synth-phantoms``; the patient-1 map is never used) and (c) procedural
phantoms (``livertumorseg phantom``), all at full size:

* HU mean and standard deviation, and texture (the mean of the local standard deviation in 5x5-pixel
  windows that lie inside the structure), in the liver (LiTS liver label, vessels included, tumours not),
  the spleen, the stomach wall and contents (without gas), fat and muscle. The real CT labels only the
  liver (its LiTS label) and, in the same patient's label-bank map, the spleen; fat and muscle are selected
  the same way everywhere, by HU inside the body (fat -190..-30 HU, muscle 10..100 HU outside labelled
  organs), so the rows compare like with like.
* the noise power spectrum of the liver: 32x32-pixel patches inside the liver, mean removed, averaged
  |FFT|^2 over patches, summarised by the noise standard deviation it integrates to, its mean spatial
  frequency and its peak frequency (cycles/mm). Liver texture counts as noise here, in every source alike.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage
from threadpoolctl import threadpool_limits

from LiverTumorSegLib.image_io import read_image, to_canonical
from LiverTumorSegLib.phantoms import Tissue, generate_phantom
from livertumorseg_training.label_bank import list_label_maps, read_label_map
from livertumorseg_training.synth_ct import synthesize

ROOT = Path(__file__).resolve().parents[1]
FAT_HU, MUSCLE_HU = (-190, -30), (10, 100)
STRUCTURES = ("liver", "spleen", "stomach", "fat", "muscle")
PATCH = 32


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient: the largest connected region above -500 HU, holes filled slice by slice."""
    components, count = ndimage.label(hu > -500)
    if count == 0:
        return np.zeros(hu.shape, bool)
    largest = np.bincount(components.ravel())[1:].argmax() + 1
    return np.stack([ndimage.binary_fill_holes(plane) for plane in components == largest])


def regions(hu: np.ndarray, liver: np.ndarray, spleen, stomach, organs: np.ndarray) -> dict:
    body = body_mask(hu)
    free = body & ~organs
    return dict(liver=liver, spleen=spleen, stomach=stomach,
                fat=free & (hu >= FAT_HU[0]) & (hu <= FAT_HU[1]), muscle=free & (hu >= MUSCLE_HU[0]) & (hu <= MUSCLE_HU[1]))


def local_std(hu: np.ndarray, mask: np.ndarray) -> float:
    """Mean of the 5x5 in-plane local standard deviation over the windows that lie inside ``mask``."""
    size = (1, 5, 5)
    x = hu.astype(np.float64)
    mean = ndimage.uniform_filter(x, size)
    var = np.maximum(ndimage.uniform_filter(x * x, size) - mean * mean, 0.0)
    inside = ndimage.binary_erosion(mask, np.ones((1, 5, 5), bool))
    return float(np.sqrt(var[inside]).mean()) if inside.any() else float("nan")


def noise_spectrum(hu: np.ndarray, mask: np.ndarray, pixel_mm: float) -> dict:
    """Radially averaged NPS of PATCH x PATCH patches fully inside ``mask``: noise std, mean and peak frequency."""
    inside = ndimage.binary_erosion(mask, np.ones((1, 3, 3), bool))
    spectra = []
    for k in range(hu.shape[0]):
        for y in range(0, hu.shape[1] - PATCH + 1, PATCH):
            for x in range(0, hu.shape[2] - PATCH + 1, PATCH):
                if inside[k, y:y + PATCH, x:x + PATCH].all():
                    patch = hu[k, y:y + PATCH, x:x + PATCH].astype(np.float64)
                    spectra.append(np.abs(np.fft.fft2(patch - patch.mean())) ** 2)
    if not spectra:
        return dict(patches=0, noise_std=float("nan"), mean_freq=float("nan"), peak_freq=float("nan"))
    nps = np.mean(spectra, axis=0) / PATCH ** 2
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(PATCH), np.fft.fftfreq(PATCH), indexing="ij")) / pixel_mm
    bins = np.linspace(0, f.max(), 17)
    which = np.digitize(f.ravel(), bins) - 1
    radial = np.bincount(which, nps.ravel(), bins.size) / np.maximum(np.bincount(which, minlength=bins.size), 1)
    centres = np.append(0.5 * (bins[1:] + bins[:-1]), bins[-1])
    return dict(patches=len(spectra), noise_std=float(np.sqrt(nps.sum() / PATCH ** 2)),
                mean_freq=float((f * nps).sum() / nps.sum()), peak_freq=float(centres[1:][radial[1:].argmax()]))


def measure(name: str, hu: np.ndarray, pixel_mm: float, masks: dict) -> list[dict]:
    rows = []
    for structure in STRUCTURES:
        mask = masks.get(structure)
        if mask is None or not mask.any():
            rows.append(dict(source=name, structure=structure, voxels=0))
            continue
        values = hu[mask].astype(np.float64)
        rows.append(dict(source=name, structure=structure, voxels=int(mask.sum()), mean_hu=float(values.mean()),
                         std_hu=float(values.std()), local_std_5x5=local_std(hu, mask)))
    rows.append(dict(source=name, structure="liver NPS", **noise_spectrum(hu, masks["liver"], pixel_mm)))
    return rows


def real_rows(bank: Path) -> list[dict]:
    ct, _ = to_canonical(read_image(bank / "ircad" / "ircad01_ct.nii.gz"))
    lits, _ = to_canonical(read_image(bank / "ircad" / "ircad01_lits_label.nii.gz", kind="label map"))
    organs = read_label_map(bank / "ircad" / "ircad01.nii.gz").array
    hu = ct.array
    masks = regions(hu, lits.array == 1, organs == 3, None, (lits.array > 0) | ((organs > 0) & (organs != 27)))
    return measure("real CT (ircad01)", hu, ct.geometry.spacing[0], masks)


def phantom_rows(name: str, image, label: np.ndarray, tissues: np.ndarray) -> list[dict]:
    hu = image.array
    stomach = np.isin(tissues, (Tissue.STOMACH_WALL, Tissue.STOMACH_FLUID, Tissue.ORAL))
    organs = (label > 0) | ~np.isin(tissues, (Tissue.AIR, Tissue.FAT, Tissue.MUSCLE, Tissue.SKIN, Tissue.TABLE))
    masks = regions(hu, label == 1, tissues == Tissue.SPLEEN, stomach, organs)
    return measure(name, hu, image.geometry.spacing[0], masks)


def table(args) -> list[dict]:
    """All rows: the real CT, then the label-bank and the procedural phantoms."""
    rows = real_rows(args.label_bank)
    entries = list_label_maps(args.label_bank)
    order = np.random.default_rng(args.seed).permutation(len(entries))
    for i in range(args.synth):
        entry = entries[order[i]]
        ph = synthesize(read_label_map(entry.path), args.seed + i, source=entry.case_id)
        rows += phantom_rows(f"label-bank {entry.case_id} ({ph.meta['phase']})", ph.image, ph.label, ph.tissues)
    for i in range(args.procedural):
        ph = generate_phantom(args.seed + i, "full")
        rows += phantom_rows(f"procedural seed {args.seed + i} ({ph.meta['phase']})", ph.image, ph.label, ph.tissues)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label-bank", type=Path, default=ROOT.parent / "shared" / "data" / "label-bank")
    parser.add_argument("--synth", type=int, default=2, help="label-bank phantoms")
    parser.add_argument("--procedural", type=int, default=2, help="procedural phantoms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    with threadpool_limits(limits=1, user_api="blas"):  # small matrix products (see synth_ct.synthesize)
        rows = table(args)
    print(f"{'source':<44}{'structure':<11}{'voxels':>10}{'mean HU':>9}{'std HU':>8}{'5x5 std':>9}")
    for r in rows:
        if r["structure"] == "liver NPS":
            print(f"{r['source']:<44}{'liver NPS':<11}{r['patches']:>10} patches, noise std {r['noise_std']:.1f} HU, "
                  f"mean {r['mean_freq']:.3f} / peak {r['peak_freq']:.3f} cycles/mm")
        elif r["voxels"]:
            print(f"{r['source']:<44}{r['structure']:<11}{r['voxels']:>10}{r['mean_hu']:>9.1f}{r['std_hu']:>8.1f}"
                  f"{r['local_std_5x5']:>9.1f}")
        else:
            print(f"{r['source']:<44}{r['structure']:<11}{'not labelled':>10}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
