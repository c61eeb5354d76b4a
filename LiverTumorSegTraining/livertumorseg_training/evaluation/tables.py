"""The numbers of every table (method comparison with Wilcoxon tests, ablation, size strata, robustness) from
the per-case results, and their CSV files."""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path

import numpy as np

from LiverTumorSegLib.metrics import SIZE_STRATA, GlobalDice, burden_rmse, detection_scores, mean_std

from .plan import EvaluationConfig, Plan, effective, predicts_tumour

#: Columns of per_case.csv before the metrics.
RUN_COLUMNS = ("case", "run", "bundle", "bundle_name", "slice_consistency", "radiomics", "refine", "perturbation")
LESION_COLUMNS = ("case", "run", "bundle", "lesion", "voxels", "volume_mm3", "diameter_mm", "stratum", "detected", "dice")


def _csv_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)  # shortest exact round trip; nan as 'nan'
    return "" if value is None else str(value)


def _write_csv(path: Path, columns, rows) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_value(row.get(column)) for column in columns])
    path.write_text(buffer.getvalue(), encoding="utf-8")


#: Table 4 rows: (label, metric key or aggregate, digits).
METHOD_ROWS = (
    ("Tumour sensitivity", "tumour_sensitivity", 3),
    ("Tumour PPV", "tumour_ppv", 3),
    ("Tumour Dice (per case)", "tumour_dice", 3),
    ("Tumour Dice (global)", "global:tumour", 3),
    ("Liver sensitivity", "liver_sensitivity", 3),
    ("Liver PPV", "liver_ppv", 3),
    ("Liver Dice (per case)", "liver_dice", 3),
    ("Liver Dice (global)", "global:liver", 3),
    ("Lesion precision (pooled)", "pooled:lesion_precision", 3),
    ("Lesion recall (pooled)", "pooled:lesion_recall", 3),
    ("Lesion F1 (pooled)", "pooled:lesion_f1", 3),
    ("Tumour ASSD (mm)", "tumour_assd_mm", 2),
    ("Tumour HD95 (mm)", "tumour_hd95_mm", 2),
    ("Liver ASSD (mm)", "liver_assd_mm", 2),
    ("Liver HD95 (mm)", "liver_hd95_mm", 2),
    ("Tumour burden RMSE", "burden_rmse", 4),
)
WILCOXON_METRICS = (("tumour_dice", "Tumour Dice"), ("tumour_sensitivity", "Tumour sensitivity"))


class Report:
    """The numbers of all tables from the per-case results (figures: :func:`.figures.write_figures`, Markdown:
    :func:`.markdown.results_markdown`)."""

    def __init__(self, config: EvaluationConfig, plan: Plan, results: list[dict]):
        self.config, self.plan, self.results = config, plan, results
        self.n = len(results)
        self.rows = {run.key: [] for run in plan.runs}
        self.lesions = {run.key: [] for run in plan.runs}
        for result in results:
            for row in result["rows"]:
                self.rows[row["run"]].append(row)
            for lesion in result["lesions"]:
                self.lesions[lesion["run"]].append(lesion)
        self.runs = {run.key: run for run in plan.runs}
        self.full_name = plan.methods[0][0]
        self.full_run = plan.methods[0][1]
        self.stage_notes = self._stage_notes()
        self.method_stats = {name: self.summarise(run.key) for name, run in plan.methods if run}
        self.wilcoxon = self._wilcoxon()
        self.ablation = self._ablation()
        self.size = self._size()
        self.robustness = self._robustness()

    def values(self, run_key: str, metric: str) -> list[float]:
        return [row[metric] for row in self.rows[run_key]]

    def summarise(self, run_key: str) -> dict:
        rows = self.rows[run_key]
        stats: dict = {}
        for label, key, digits in METHOD_ROWS:
            if key.startswith("global:"):
                structure = key.split(":")[1]
                accumulator = GlobalDice()
                for row in rows:
                    accumulator.add_counts(row[f"{structure}_intersection_voxels"], row[f"{structure}_predicted_voxels"],
                                           row[f"{structure}_reference_voxels"])
                stats[key] = (accumulator.value, math.nan, len(rows))
            elif key.startswith("pooled:"):
                sums = {k: sum(row[k] for row in rows) for k in ("lesions_predicted_matched", "lesions_predicted",
                                                                  "lesions_reference_detected", "lesions_reference")}
                scores = detection_scores(sums["lesions_predicted_matched"], sums["lesions_predicted"],
                                          sums["lesions_reference_detected"], sums["lesions_reference"])
                stats[key] = (scores[key.split(":")[1]], math.nan, len(rows))
            elif key == "burden_rmse":
                value = burden_rmse([r["tumour_burden_predicted"] for r in rows], [r["tumour_burden_reference"] for r in rows])
                stats[key] = (value, math.nan, len(rows))
            else:
                stats[key] = mean_std(row[key] for row in rows)
        return stats

    def _wilcoxon(self) -> list[dict]:
        from scipy.stats import wilcoxon

        out = []
        if not self.full_run:
            return out
        for name, run in self.plan.methods[1:]:
            for metric, label in WILCOXON_METRICS:
                entry = {"reference": self.full_name, "other": name, "metric": metric, "label": label, "pairs": 0,
                         "mean_difference": math.nan, "statistic": math.nan, "p_value": math.nan, "note": ""}
                if run is None or not predicts_tumour(self.plan.bundles[name]):
                    entry["note"] = "not trained" if run is None else "liver-only model"
                    out.append(entry)
                    continue
                a = np.asarray(self.values(self.full_run.key, metric), float)
                b = np.asarray(self.values(run.key, metric), float)
                keep = np.isfinite(a) & np.isfinite(b)
                a, b = a[keep], b[keep]
                entry["pairs"] = int(keep.sum())
                if entry["pairs"]:
                    entry["mean_difference"] = float(np.mean(a - b))
                if entry["pairs"] == 0:
                    entry["note"] = "no pairs"
                elif np.all(a == b):
                    entry["note"] = "identical per-case values"
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        test = wilcoxon(a, b)
                    entry["statistic"], entry["p_value"] = float(test.statistic), float(test.pvalue)
                out.append(entry)
        return out

    def _ablation(self) -> list[dict]:
        rows, previous = [], None
        for entry in self.plan.ablation:
            row = {"configuration": entry["row"], "bundle": entry["bundle"], "status": entry["status"],
                   "mean": math.nan, "std": math.nan, "n": 0, "change": math.nan}
            if entry["run"] is not None:
                row["mean"], row["std"], row["n"] = mean_std(self.values(entry["run"].key, "tumour_dice"))
                if previous is not None:
                    row["change"] = row["mean"] - previous
                previous = row["mean"]
            else:
                previous = None
            row["stages"] = _stages_text(entry["stages"])
            rows.append(row)
        return rows

    def _size(self) -> list[dict]:
        rows = []
        for name, run in self.plan.methods:
            for stratum, label in SIZE_STRATA:
                lesions = [l for l in self.lesions[run.key] if l["stratum"] == stratum] if run else []
                mean, std, n = mean_std(l["dice"] for l in lesions)
                rows.append({"method": name, "stratum": stratum, "label": label, "lesions": len(lesions),
                             "detected": sum(l["detected"] for l in lesions), "dice_mean": mean, "dice_std": std,
                             "trained": run is not None})
        return rows

    def _robustness(self) -> list[dict]:
        if not self.plan.robustness:
            return []
        base = self.full_run.key
        rows = [{"perturbation": "None (unperturbed)", "run": base}]
        rows += [{"perturbation": label, "run": run.key} for label, run in self.plan.robustness]
        for row in rows:
            for structure in ("tumour", "liver"):
                values = np.asarray(self.values(row["run"], f"{structure}_dice"), float)
                reference = np.asarray(self.values(base, f"{structure}_dice"), float)
                row[f"{structure}_dice_mean"], row[f"{structure}_dice_std"], _ = mean_std(values)
                row[f"{structure}_dice_change"] = float(np.mean(values - reference)) if len(values) else math.nan
        return rows

    def _stage_notes(self) -> dict[str, str]:
        """Per run: the pipeline's stage statuses as the engine reported them, merged over the cases."""
        notes = {}
        for run in self.plan.runs:
            statuses = [r["stages"].get(run.key, {}) for r in self.results]
            merged = {}
            for status in statuses:
                for stage, text in status.items():
                    merged.setdefault(stage, set()).add(text)
            notes[run.key] = "; ".join(f"{stage}: {' / '.join(sorted(texts))}" for stage, texts in merged.items())
        return notes

    def overlay_choice(self) -> list[tuple[str, dict, dict]]:
        """(label, per-case row, overlay) for the best, median and worst case by tumour Dice (full bundle)."""
        rows = self.rows[self.full_run.key]
        indices = list(range(len(rows)))
        with_tumour = [i for i in indices if rows[i]["tumour_reference_voxels"] > 0]
        pool = with_tumour or indices
        ranked = sorted(pool, key=lambda i: (rows[i]["tumour_dice"], i))
        picks = [("best", ranked[-1]), ("median", ranked[(len(ranked) - 1) // 2]), ("worst", ranked[0])]
        return [(label, rows[i], self.results[i]["overlay"]) for label, i in picks]

    def write_csvs(self, folder: Path) -> None:
        """per_case.csv, per_lesion.csv and one CSV per table."""
        metric_columns = list(self.results[0]["rows"][0]) if self.results and self.results[0]["rows"] else []
        metric_columns = [c for c in metric_columns if c not in ("case", "run")]
        per_case = []
        for result in self.results:
            for row in result["rows"]:
                run = self.runs[row["run"]]
                bundle = self.plan.bundles[run.bundle]
                ran = effective(run, bundle)
                per_case.append({**row, "bundle": run.bundle, "bundle_name": bundle.name,
                                 "slice_consistency": ran.slice_consistency, "radiomics": ran.radiomics, "refine": ran.refine,
                                 "perturbation": run.perturbation_text})
        _write_csv(folder / "per_case.csv", [*RUN_COLUMNS, *metric_columns], per_case)
        method_keys = {run.key: name for name, run in self.plan.methods if run}
        lesions = [{**l, "bundle": method_keys[l["run"]]} for result in self.results for l in result["lesions"]
                   if l["run"] in method_keys]
        _write_csv(folder / "per_lesion.csv", LESION_COLUMNS, lesions)
        table4 = []
        for name, run in self.plan.methods:
            for label, key, _ in METHOD_ROWS:
                mean, std, n = self.method_stats[name][key] if run else (math.nan, math.nan, 0)
                table4.append({"method": name, "metric": key.split(":")[-1] if ":" in key else key,
                               "aggregate": key.split(":")[0] if ":" in key else ("rmse" if key == "burden_rmse" else "mean over cases"),
                               "value": mean, "std": std, "cases": n, "status": "run" if run else "not trained"})
        _write_csv(folder / "table4_methods.csv", ("method", "metric", "aggregate", "value", "std", "cases", "status"), table4)
        _write_csv(folder / "table4_wilcoxon.csv",
                   ("reference", "other", "metric", "pairs", "mean_difference", "statistic", "p_value", "note"), self.wilcoxon)
        _write_csv(folder / "table5_ablation.csv",
                   ("configuration", "bundle", "status", "stages", "mean", "std", "n", "change"), self.ablation)
        _write_csv(folder / "table6_size.csv",
                   ("method", "stratum", "label", "lesions", "detected", "dice_mean", "dice_std", "trained"), self.size)
        _write_csv(folder / "robustness.csv",
                   ("perturbation", "run", "tumour_dice_mean", "tumour_dice_std", "tumour_dice_change", "liver_dice_mean",
                    "liver_dice_std", "liver_dice_change"), self.robustness)


def _stages_text(stages: dict) -> str:
    on = ["Otsu + morphology"]
    on += [label for stage, label in (("slice_consistency", "three-slice"), ("radiomics", "radiomics"), ("refine", "refinement"))
           if stages.get(stage)]
    return ", ".join(on)
