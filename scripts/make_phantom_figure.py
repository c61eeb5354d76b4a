"""Render axial and coronal slices of full-size synthetic CT phantoms with their liver/tumour labels.

    python scripts/make_phantom_figure.py --out docs/phantoms.png [--seeds 0 1 2] [--size full]

Display follows radiological convention: axial slices seen from the feet (patient right on the image's
left, anterior at the top), coronal slices seen from the front (superior at the top). CT window W400/L50.
The liver outline is drawn in green and tumour outlines in red.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LiverTumorSeg"))

from LiverTumorSegLib.phantoms import generate_phantom  # noqa: E402

WINDOW, LEVEL = 400.0, 50.0
LIVER_COLOUR, TUMOUR_COLOUR = "#39d353", "#ff3030"


def _slices(label: np.ndarray) -> tuple[int, int]:
    """Axial index through the largest tumour section (else the largest liver section) and the coronal
    row through the same structure."""
    tumour = label == 2
    target = tumour if tumour.any() else label >= 1
    k = int(np.argmax(target.sum(axis=(1, 2))))
    rows = np.where(target[k].any(axis=1))[0]
    y = int(rows[len(rows) // 2]) if rows.size else label.shape[1] // 2
    return k, y


def _panel(ax, image: np.ndarray, label: np.ndarray, aspect: float, title: str) -> None:
    lo, hi = LEVEL - WINDOW / 2, LEVEL + WINDOW / 2
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="bilinear")
    if (label >= 1).any():
        ax.contour(label >= 1, levels=[0.5], colors=LIVER_COLOUR, linewidths=0.8)
    if (label == 2).any():
        ax.contour(label == 2, levels=[0.5], colors=TUMOUR_COLOUR, linewidths=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "phantoms.png")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", default="full", choices=["full", "small"])
    parser.add_argument("--dpi", type=int, default=72)
    args = parser.parse_args(argv)

    fig, axes = plt.subplots(len(args.seeds), 2, figsize=(11, 5.4 * len(args.seeds)), squeeze=False,
                             gridspec_kw=dict(width_ratios=[1, 1]))
    for row, seed in zip(axes, args.seeds):
        start = time.perf_counter()
        ph = generate_phantom(seed, args.size)
        seconds = time.perf_counter() - start
        image, label = ph.image.array, ph.label
        sx, sy, sz = ph.image.geometry.spacing
        k, y = _slices(label)
        m = ph.meta
        kinds = ", ".join(sorted({t["type"] for t in ph.tumours})) or "no tumour"
        print(f"seed {seed}: shape {image.shape}, spacing {sx:.2f}x{sy:.2f}x{sz:.2f} mm, {m['phase']}, "
              f"{len(ph.tumours)} tumour(s), generated in {seconds:.1f} s")
        head = f"seed {seed} · {m['phase'].replace('_', '-')} · {sx:.2f}×{sz:.2f} mm · {len(ph.tumours)} tumour(s)"
        _panel(row[0], image[k], label[k], 1.0, f"{head}\naxial slice {k} ({kinds})")
        # coronal: array z runs inferior->superior, so flip for display (superior at the top)
        _panel(row[1], image[::-1, y, :], label[::-1, y, :], sz / sx, f"coronal row {y} · liver "
               f"{m['liver_volume_ml']:.0f} mL · liver {m['liver_hu']:.0f} HU")
    fig.text(0.5, 0.005, "Synthetic phantoms, W400/L50. Radiological display: patient right on the image left; "
             "green = liver label, red = tumour label.", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.015, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp.png")
    fig.savefig(tmp, dpi=args.dpi)
    tmp.replace(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
