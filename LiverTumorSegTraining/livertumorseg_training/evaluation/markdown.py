"""RESULTS.md: the command, the data set, the bundles, every table and the figures, as Markdown."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from LiverTumorSegLib import __version__ as engine_version
from LiverTumorSegLib.bundle import MANIFEST
from LiverTumorSegLib.metrics import SIZE_STRATA

from .plan import ABLATION_KEYS, EXPECTED_FLAGS, data_folders, predicts_tumour
from .tables import METHOD_ROWS, Report


def fmt_number(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals; "—" for a missing or non-finite value."""
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def fmt_mean_std(stats: tuple[float, float, int], total: int, digits: int = 3) -> str:
    """"mean ± std" of ``(mean, std, n)``, with "(n = …)" when it covers fewer than ``total`` values."""
    mean, std, n = stats
    if n == 0:
        return "—"
    text = fmt_number(mean, digits) + (f" ± {fmt_number(std, digits)}" if math.isfinite(std) else "")
    return text + (f" (n = {n})" if n < total else "")


def fmt_p_value(value: float) -> str:
    """A p-value with three decimals, "< 0.001" below that."""
    if not math.isfinite(value):
        return "—"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def fmt_signed(value: float, digits: int = 3) -> str:
    """``value`` with its sign (a change); "—" for a missing or non-finite value."""
    return "—" if value is None or not math.isfinite(value) else f"{value:+.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (``|`` in cells escaped)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def results_markdown(report: Report, figures: Path) -> str:
    """The text of RESULTS.md, with figure links below ``figures``."""
    fig = lambda name: (figures / name).as_posix()
    cfg, plan = report.config, report.plan
    parts = ["# Evaluation results", ""]
    parts += ["Generated with:", "", "```bash", cfg.command_line or "(Python API)", "```", ""]
    parts += [
        "- **Data set:** " + ", ".join(f"`{p}`" for p in data_folders(cfg))
        + f" ({', '.join(sorted({c.layout for c in plan.cases}))} layout), {report.n} case(s), {plan.selection}: "
        + ", ".join(f"`{c.case_id}`" for c in plan.cases) + ".",
        f"- **Engine:** LiverTumorSegLib {engine_version}, ONNX Runtime on {cfg.device}, one thread per case; "
        f"noise seed {cfg.seed}.",
        "",
        "## Bundles",
        "",
    ]
    bundle_rows = []
    for key, bundle in plan.bundles.items():
        model = bundle.manifest.get("model") or {}
        flags = model.get("flags")
        flag_text = ", ".join(f"{k}={'on' if v else 'off'}" for k, v in flags.items()) if flags else "—"
        manifest_sha = hashlib.sha256((bundle.path / MANIFEST).read_bytes()).hexdigest()[:12]
        bundle_rows.append([f"`{key}`", bundle.name, f"`{_given_path(report, key)}`",
                            f"{model.get('name', '—')} {model.get('preset', '')}".strip() + f" ({flag_text})",
                            ", ".join(bundle.manifest.get("components", {})), f"`{manifest_sha}`"])
    for key, path in plan.missing.items():
        bundle_rows.append([f"`{key}`", "not trained", f"`{path}`", "—", "—", "—"])
    parts += [_table(["Key", "Name and version", "Path", "Network (flags)", "Components", "manifest.json sha256"], bundle_rows), ""]
    flag_warnings = _flag_warnings(report)
    parts += [f"> **Check:** {w}" for w in flag_warnings] + ([""] if flag_warnings else [])

    # Table 4
    parts += ["## Method comparison (Table 4)", "",
              "Mean ± sample standard deviation over cases unless marked; every stage each bundle has is switched on.", ""]
    header = ["Metric"] + [name for name, _ in plan.methods]
    rows = []
    for label, key, digits in METHOD_ROWS:
        cells = [label]
        for name, run in plan.methods:
            if run is None:
                cells.append("not trained")
            elif _is_tumour_metric(key) and not predicts_tumour(plan.bundles[name]):
                cells.append("liver only")
            elif key.startswith(("global:", "pooled:")) or key == "burden_rmse":
                cells.append(fmt_number(report.method_stats[name][key][0], digits))
            else:
                cells.append(fmt_mean_std(report.method_stats[name][key], report.n, digits))
        rows.append(cells)
    parts += [_table(header, rows), ""]
    stage_rows = [[name, report.stage_notes[run.key] if run else "not trained"] for name, run in plan.methods]
    parts += ["Pipeline stages per bundle, as the engine reported them:", "", _table(["Bundle", "Stages"], stage_rows), ""]
    if report.wilcoxon:
        parts += [f"Paired Wilcoxon signed-rank tests against `{report.full_name}` (two-sided; mean difference = "
                  f"`{report.full_name}` − other):", ""]
        rows = [[w["other"], w["label"], str(w["pairs"]), fmt_signed(w["mean_difference"]), fmt_number(w["statistic"], 1),
                 fmt_p_value(w["p_value"]) + (f" ({w['note']})" if w["note"] else "")] for w in report.wilcoxon]
        parts += [_table(["Compared with", "Metric", "Pairs", "Mean difference", "W", "p"], rows), ""]
    parts += [f"![Per-case Dice]({fig('dice_boxplot.png')})", ""]

    # Table 5
    if report.ablation:
        parts += ["## Ablation (Table 5)", "",
                  "Tumour Dice (mean ± standard deviation over cases) and the change from the row above. Network rows "
                  "use the base post-processing (Otsu, 3×3 morphology, liver confinement) without the three-slice "
                  "rule, radiomics or refinement; then the stages are switched on one by one on the full bundle.", ""]
        rows = []
        for row in report.ablation:
            if row["status"] == "run":
                rows.append([row["configuration"], f"`{row['bundle']}`", row["stages"],
                             fmt_mean_std((row["mean"], row["std"], row["n"]), report.n), fmt_signed(row["change"])])
            else:
                rows.append([row["configuration"], f"`{row['bundle']}`", row["stages"], row["status"], "—"])
        parts += [_table(["Configuration", "Bundle", "Stages on", "Tumour Dice", "Change"], rows), ""]

    # Table 6
    parts += ["## Tumour Dice by lesion size (Table 6)", "",
              "Per-lesion Dice (reference lesion vs the predicted lesions overlapping it) by the reference lesion's "
              "equivalent-sphere diameter, mean ± standard deviation over lesions; detected = lesions with any "
              "overlap.", ""]
    rows = []
    for name, run in plan.methods:
        cells = [name]
        for stratum, _ in SIZE_STRATA:
            row = next(r for r in report.size if r["method"] == name and r["stratum"] == stratum)
            if not row["trained"]:
                cells.append("not trained")
            elif row["lesions"] == 0:
                cells.append("no lesions")
            else:
                cells.append(f"{fmt_mean_std((row['dice_mean'], row['dice_std'], row['lesions']), row['lesions'])} "
                             f"({row['detected']}/{row['lesions']} detected)")
        rows.append(cells)
    parts += [_table(["Method"] + [f"{s.capitalize()} ({label})" for s, label in SIZE_STRATA], rows), ""]
    parts += [f"![Size-stratified Dice]({fig('size_stratified.png')})", ""]

    # Robustness
    if report.robustness:
        parts += ["## Robustness (§4.8)", "",
                  f"The full bundle `{report.full_name}` on perturbed CTs: noise HU' = HU + N(0, σ²) per voxel "
                  f"(seed {cfg.seed}); scaling HU' = s·HU (about 0 HU). Change = mean over cases of the paired "
                  "difference from the unperturbed run.", ""]
        rows = [[r["perturbation"], fmt_mean_std((r["tumour_dice_mean"], r["tumour_dice_std"], report.n), report.n),
                 fmt_signed(r["tumour_dice_change"]), fmt_mean_std((r["liver_dice_mean"], r["liver_dice_std"], report.n), report.n),
                 fmt_signed(r["liver_dice_change"])] for r in report.robustness]
        parts += [_table(["Perturbation", "Tumour Dice", "Change", "Liver Dice", "Change"], rows), ""]
        parts += [f"![Robustness]({fig('robustness.png')})", ""]

    # Overlays
    parts += ["## Examples", "",
              f"Best, median and worst case by tumour Dice (`{report.full_name}`, cases with reference tumour), on the "
              "axial slice where the largest reference lesion is largest: reference contours solid, predicted dashed "
              "(liver blue/yellow, tumour green/red).", ""]
    for label, row, overlay in report.overlay_choice():
        if overlay is not None:
            parts += [f"![{label}: {row['case']}]({fig(f'overlay_{label}.png')})", ""]

    parts += ["## Definitions", "", *_DEFINITIONS, ""]
    parts += ["Files: `per_case.csv` (every number of every case and run), `per_lesion.csv`, `table4_methods.csv`, "
              "`table4_wilcoxon.csv`, `table5_ablation.csv`, `table6_size.csv`, `robustness.csv`, `figures/`.", ""]
    return "\n".join(parts)


def _given_path(report: Report, key: str) -> Path:
    """The bundle path as the command gave it."""
    given = dict(report.config.bundles)
    given.update({ABLATION_KEYS["baseline"]: report.config.ablation_baseline, ABLATION_KEYS["dense"]: report.config.ablation_dense})
    return given.get(key) or report.plan.bundles[key].path


def _flag_warnings(report: Report) -> list[str]:
    """Bundles of the ablation whose recorded network flags are not those their row expects."""
    out = []
    checks = [("full", report.full_name)] + [(which, key) for which, key in ABLATION_KEYS.items()]
    for which, key in checks:
        if key not in report.plan.bundles or not report.config.ablation:
            continue
        flags = (report.plan.bundles[key].manifest.get("model") or {}).get("flags")
        if flags is None:
            out.append(f"bundle `{key}` records no network flags; the ablation row assumes {EXPECTED_FLAGS[which]}.")
        elif any(flags.get(k) != v for k, v in EXPECTED_FLAGS[which].items()):
            out.append(f"bundle `{key}` was trained with {flags}, but its ablation row expects {EXPECTED_FLAGS[which]}.")
    return out


def _is_tumour_metric(key: str) -> bool:
    return "tumour" in key or key.startswith("pooled:") or key == "burden_rmse"


_DEFINITIONS = [
    "- Liver = labels 1 and 2 (tumour included), tumour = label 2, as LiTS scores them.",
    "- Dice, sensitivity |P∩T|/|T| and PPV |P∩T|/|P| per case; both masks empty → 1 (LiTS); a ratio with an "
    "empty denominator is undefined and left out of the mean (the cell then says how many cases it covers). "
    "Global Dice pools the voxels of all cases.",
    "- Surfaces are the boundary voxels (6-neighbourhood); distances in mm between voxel centres with the voxel spacing. "
    "ASSD = mean of all distances of both directions pooled; HD95 = 95th percentile of the same pooled distances. Both "
    "empty → 0; one empty → undefined (left out, counted in n).",
    "- Lesions = 26-connected tumour components, numbered largest first as in the volumetry; a predicted and a "
    "reference lesion match when they share a voxel. "
    "Precision = matched predicted / predicted, recall = matched reference / reference, F1 = 2PR/(P+R), with the "
    "lesion counts summed over cases.",
    "- Tumour burden = tumour volume / liver volume (0 without liver); RMSE over cases.",
    "- Size strata by the reference lesion's equivalent-sphere diameter (6V/π)^(1/3): < 10 mm, 10–30 mm, > 30 mm.",
    "- Standard deviations are sample standard deviations (n − 1).",
]
