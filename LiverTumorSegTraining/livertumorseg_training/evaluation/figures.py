"""The figures of RESULTS.md: per-case Dice box plots, size-stratified bars, robustness bars, and overlays of
the best, median and worst case."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from LiverTumorSegLib.metrics import SIZE_STRATA

from .markdown import fmt_number
from .tables import Report

#: Display window of the overlays (HU).
OVERLAY_WINDOW = (-100.0, 250.0)


def write_figures(report: Report, folder: Path) -> None:
    """Write the PNG figures of the report into ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    plt.rcParams.update({"font.size": 9})
    methods = [(name, run) for name, run in report.plan.methods if run]
    # Per-case Dice box plots.
    fig, axes = plt.subplots(1, 2, figsize=(3 + 1.2 * len(methods) * 2, 3.6), constrained_layout=True)
    for ax, structure in zip(axes, ("tumour", "liver")):
        data = [[v for v in report.values(run.key, f"{structure}_dice") if math.isfinite(v)] for _, run in methods]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(methods) + 1), [name for name, _ in methods], rotation=20)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{structure.capitalize()} Dice per case (n = {report.n})")
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(folder / "dice_boxplot.png", dpi=120)
    plt.close(fig)
    # Size-stratified bars.
    fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
    width = 0.8 / max(1, len(methods))
    for i, (name, _) in enumerate(methods):
        rows = [r for r in report.size if r["method"] == name]
        x = np.arange(len(rows)) + (i - (len(methods) - 1) / 2) * width
        means = [r["dice_mean"] if math.isfinite(r["dice_mean"]) else 0.0 for r in rows]
        stds = [r["dice_std"] if math.isfinite(r["dice_std"]) else 0.0 for r in rows]
        bars = ax.bar(x, means, width, yerr=stds, capsize=3, label=name)
        for bar, row, mean, std in zip(bars, rows, means, stds):
            ax.annotate(f"n={row['lesions']}", (bar.get_x() + bar.get_width() / 2, min(mean + std, 1.0) + 0.01),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(SIZE_STRATA)), [f"{name} ({label})" for name, label in SIZE_STRATA])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("per-lesion Dice")
    ax.set_title("Tumour Dice by reference lesion size")
    ax.legend(fontsize=8)
    fig.savefig(folder / "size_stratified.png", dpi=120)
    plt.close(fig)
    # Robustness bars.
    if report.robustness:
        rows = report.robustness[1:]
        fig, ax = plt.subplots(figsize=(6, 3.4), constrained_layout=True)
        x = np.arange(len(rows))
        for offset, structure in ((-0.2, "tumour"), (0.2, "liver")):
            ax.bar(x + offset, [100 * r[f"{structure}_dice_change"] for r in rows], 0.4, label=f"{structure} Dice")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, [r["perturbation"].replace("Gaussian noise ", "noise ").replace("Intensity scaling ", "scale ")
                          for r in rows])
        ax.set_ylabel("Dice change (percentage points)")
        ax.set_title("Robustness of the full pipeline (mean paired change)")
        ax.legend(fontsize=8)
        fig.savefig(folder / "robustness.png", dpi=120)
        plt.close(fig)
    # Overlays.
    for label, row, overlay in report.overlay_choice():
        if overlay is None:
            continue
        sy, sx = overlay["spacing_yx"]
        rows_n, cols_n = overlay["image"].shape
        extent = (0, cols_n * sx, rows_n * sy, 0)
        fig, ax = plt.subplots(figsize=(5, 5 * rows_n * sy / max(cols_n * sx, 1e-6) + 0.6), constrained_layout=True)
        ax.imshow(overlay["image"], cmap="gray", vmin=OVERLAY_WINDOW[0], vmax=OVERLAY_WINDOW[1], extent=extent,
                  interpolation="nearest")
        styles = [("reference", 1, "#00c8ff", "solid"), ("prediction", 1, "#ffd000", "dashed"),
                  ("reference", 2, "#00ff40", "solid"), ("prediction", 2, "#ff3030", "dashed")]
        handles = []
        for source, value, colour, style in styles:
            mask = (overlay[source] >= value).astype(float) if value == 1 else (overlay[source] == 2).astype(float)
            if mask.any():
                ys = (np.arange(rows_n) + 0.5) * sy
                xs = (np.arange(cols_n) + 0.5) * sx
                ax.contour(xs, ys, mask, levels=[0.5], colors=[colour], linestyles=style, linewidths=1.2)
            handles.append(Line2D([0], [0], color=colour, linestyle=style,
                                  label=f"{source} {'liver' if value == 1 else 'tumour'}"))
        ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.7)
        ax.set_title(f"{label}: {row['case']}, tumour Dice {fmt_number(row['tumour_dice'])}, liver Dice "
                     f"{fmt_number(row['liver_dice'])} (axial slice {overlay['slice']})", fontsize=8)
        ax.set_axis_off()
        fig.savefig(folder / f"overlay_{label}.png", dpi=120)
        plt.close(fig)
