"""``livertumorseg-train evaluate``: the paper's evaluation tables from one command.

Runs the **engine** (:func:`LiverTumorSegLib.pipeline.segment`, ONNX Runtime, one thread per case) on every
case of a labelled data set, in parallel over cases, and scores every result with
:mod:`LiverTumorSegLib.metrics` (the definitions and empty-mask conventions are documented there). It writes,
into one output folder that appears complete or not at all:

* ``RESULTS.md`` — the command, the data set and case ids, the bundles (name, version, network flags,
  components, manifest checksum), then the tables below and the figures;
* ``per_case.csv`` (one row per case and run, every number of :func:`~LiverTumorSegLib.metrics.case_metrics`),
  ``per_lesion.csv`` (one row per reference lesion of each compared method), one CSV per table;
* ``figures/``: Dice box plots per bundle, size-stratified bars, robustness bars, and overlays of the
  best, median and worst case by tumour Dice.

Tables
------
* **Method comparison (Table 4)**: each ``--bundle`` with every stage it has switched on. Sensitivity, PPV
  and Dice per case (mean ± sample standard deviation over cases) and global Dice for tumour and liver;
  lesion precision, recall and F1 pooled over cases (lesion counts summed first); ASSD and HD95 (means over
  the cases where both masks exist); tumour-burden RMSE. A paired Wilcoxon signed-rank test
  (:func:`scipy.stats.wilcoxon`, two-sided, pairs with an undefined value dropped) of the per-case tumour
  Dice and tumour sensitivity between the first bundle (the full pipeline) and each other bundle.
* **Ablation (Table 5)**: tumour Dice per row and its change from the row above. The network rows come from
  bundles trained with the ablation presets (``--ablation-baseline``: ``--no-dense-skips --no-subpixel
  --no-attention``; ``--ablation-dense``: ``--no-attention``; the attention row is the full bundle). The
  network rows run the **base post-processing** only — Otsu thresholding, 3×3 morphological cleaning and
  the liver confinement — with the three-slice rule, the radiomics filter and boundary refinement off, so
  that they measure the networks. The stage rows then switch the stages on one by one on the full bundle.
  A row whose bundle is not given (or whose folder does not exist) says "not trained", and a stage the full
  bundle lacks says "not available": no number is ever filled in.
* **Size-stratified Dice (Table 6)**: per-lesion Dice by the reference lesion's equivalent-sphere diameter
  (< 10, 10–30, > 30 mm), mean ± standard deviation over the lesions of all cases, per bundle.
* **Robustness (§4.8)**: the full bundle on perturbed copies of each CT, tumour and liver Dice and their
  mean paired change from the unperturbed run. Gaussian noise: ``HU' = HU + N(0, σ²)`` independently per
  voxel on the stored grid (before the engine resamples it), σ ∈ {5, 10} HU, seeded from ``--seed`` and the
  case id. Global intensity scaling: ``HU' = s·HU`` with s ∈ {0.9, 1.1}, i.e. about 0 HU (water), so water
  stays at 0, air moves to ∓100 HU of −1000 and enhanced liver (≈ 110 HU) by ∓11 HU — a contrast/
  calibration gain, not an offset. The paper draws the scale at random within ±10 %; the two extremes are
  used here so that the result is deterministic and bounds the random case.

Everything is deterministic given the inputs (bundles, data, case list, seed): the cases are processed in
any order but reported in data-set order, and nothing time-dependent is written.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import logging
import math
import os
import re
import shlex
import sys
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from LiverTumorSegLib import __version__ as engine_version
from LiverTumorSegLib.bundle import MANIFEST, Bundle, load_bundle
from LiverTumorSegLib.errors import InputError, LiverTumorSegError, OutputError
from LiverTumorSegLib.image_io import Image, atomic_path, to_canonical
from LiverTumorSegLib.metrics import (
    SIZE_STRATA, GlobalDice, burden_rmse, detection_scores, evaluate_case, label_lesions, mean_std,
)

from .datasets import Case, find_cases, load_case

log = logging.getLogger("LiverTumorSeg")

#: Robustness perturbations: (kind, value, label).
PERTURBATIONS = (
    ("noise", 5.0, "Gaussian noise σ = 5 HU"),
    ("noise", 10.0, "Gaussian noise σ = 10 HU"),
    ("scale", 0.9, "Intensity scaling × 0.9"),
    ("scale", 1.1, "Intensity scaling × 1.1"),
)
#: Network flags each ablation bundle is expected to have been trained with (manifest "model" → "flags").
EXPECTED_FLAGS = {
    "baseline": {"dense_skips": False, "subpixel": False, "attention": False},
    "dense": {"dense_skips": True, "subpixel": True, "attention": False},
    "full": {"dense_skips": True, "subpixel": True, "attention": True},
}
_BASE = {"slice_consistency": False, "radiomics": False, "refine": False}
#: Ablation rows: (configuration, which bundle, pipeline stages switched on beyond the base post-processing).
ABLATION_ROWS = (
    ("Baseline cascaded U-Net", "baseline", _BASE),
    ("+ Dense encoder/decoder and sub-pixel upsampling", "dense", _BASE),
    ("+ Attention gates", "full", _BASE),
    ("+ Three-slice consistency", "full", {"slice_consistency": True, "radiomics": False, "refine": False}),
    ("+ Radiomics false-positive removal", "full", {"slice_consistency": True, "radiomics": True, "refine": False}),
    ("+ 3D CNN boundary refinement (full pipeline)", "full", {"slice_consistency": True, "radiomics": True, "refine": True}),
)
#: Component a stage needs in the bundle.
STAGE_COMPONENT = {"radiomics": "lesion_classifier", "refine": "boundary_cnn"}
#: Internal bundle keys of the ablation networks.
ABLATION_KEYS = {"baseline": "ablation-baseline", "dense": "ablation-dense"}
#: Run keys of the ablation and robustness runs start with these; bundle names may not.
RESERVED_PREFIXES = ("ablation-", "robustness-")
#: Columns of per_case.csv before the metrics.
RUN_COLUMNS = ("case", "run", "bundle", "bundle_name", "slice_consistency", "radiomics", "refine", "perturbation")
LESION_COLUMNS = ("case", "run", "bundle", "lesion", "voxels", "volume_mm3", "diameter_mm", "stratum", "detected", "dice")
#: Display window of the overlays (HU).
OVERLAY_WINDOW = (-100.0, 250.0)


# ----------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Run:
    """One way of segmenting every case: a bundle, the pipeline stages, and an optional perturbation."""

    key: str
    bundle: str  # bundle key
    slice_consistency: bool = True
    radiomics: bool = True
    refine: bool = True
    perturbation: tuple | None = None  # ("noise", σ) or ("scale", s)

    @property
    def signature(self) -> tuple:
        return (self.bundle, self.slice_consistency, self.radiomics, self.refine, self.perturbation)

    def options(self, device: str):
        from LiverTumorSegLib.pipeline import PipelineOptions
        from LiverTumorSegLib.postprocess import PostprocessOptions

        return PipelineOptions(device=device, threads=1, postprocess=PostprocessOptions(slice_consistency=self.slice_consistency),
                               radiomics=self.radiomics, refine=self.refine)

    @property
    def perturbation_text(self) -> str:
        return "" if self.perturbation is None else f"{self.perturbation[0]} {self.perturbation[1]:g}"


@dataclass
class EvaluationConfig:
    bundles: list[tuple[str, Path]]  # (name, folder); the first is the full pipeline
    data: Path | list[Path]  # one data set folder, or several whose cases are pooled (ids must be unique)
    out: Path
    cases: list[str] | None = None
    cases_file: Path | None = None
    split: str | None = None
    ablation_baseline: Path | None = None
    ablation_dense: Path | None = None
    ablation: bool = True
    robustness: bool = True
    workers: int = 1
    seed: int = 0
    device: str = "cpu"
    overwrite: bool = False
    results_md: Path | None = None
    progress: bool = True
    command_line: str = ""


@dataclass
class Plan:
    cases: list[Case]
    selection: str
    bundles: dict[str, Bundle]  # key → loaded bundle (only those that exist)
    missing: dict[str, Path]  # key → path given but not there ("not trained")
    methods: list[tuple[str, Run | None]]  # (bundle name, its full run or None when not trained)
    ablation: list[dict] = field(default_factory=list)  # {"row", "bundle", "run" | None, "status"}
    robustness: list[tuple[str, Run]] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)  # unique runs, in report order


# ----------------------------------------------------------------------------------------- the CLI


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``evaluate`` options to a (sub)parser and return it (``.set_defaults(run=run_evaluate)``)."""
    parser.description = (
        "Run the engine on a labelled data set and write the paper's tables (method comparison, ablation, "
        "size-stratified Dice, robustness) as RESULTS.md, CSVs and figures into one folder."
    )
    parser.add_argument("--bundle", action="append", required=True, metavar="NAME=PATH",
                        help="a model bundle to evaluate, repeatable; the first is the full pipeline and the reference "
                             "of the Wilcoxon tests; a PATH that does not exist is reported as 'not trained'")
    parser.add_argument("--data", required=True, type=Path, nargs="+",
                        help="dataset folder(s) (LiTS, MSD Task03, 3D-IRCADb or paired layout); the cases of several "
                             "folders are pooled, e.g. real 8-bit validation scans and a real HU CT")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--cases", nargs="+", metavar="ID", help="case ids to evaluate (e.g. lits-3 or 3); default: all")
    selection.add_argument("--cases-file", type=Path, help="file with one case id per line ('#' starts a comment)")
    selection.add_argument("--split", choices=("train", "validation", "test", "real_holdout"),
                           help="the cases of this split recorded in the first bundle's manifest (e.g. its held-out test fold)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (RESULTS.md, CSVs, figures/)")
    parser.add_argument("--results-md", type=Path,
                        help="also write RESULTS.md here (e.g. docs/RESULTS.md), with figure links relative to it")
    parser.add_argument("--ablation-baseline", type=Path, metavar="BUNDLE",
                        help="bundle trained with --no-dense-skips --no-subpixel --no-attention (Table 5, first row)")
    parser.add_argument("--ablation-dense", type=Path, metavar="BUNDLE",
                        help="bundle trained with --no-attention (Table 5, second row)")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false", help="skip the ablation table")
    parser.add_argument("--no-robustness", dest="robustness", action="store_false", help="skip the robustness runs")
    parser.add_argument("--workers", type=int, default=1, help="worker processes, one case each at a time (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise perturbations (default 0)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="ONNX Runtime device")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder / RESULTS.md")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def run_evaluate(args: argparse.Namespace) -> int:
    """Backend of ``livertumorseg-train evaluate``: parse the options, evaluate, print where the results are."""
    config = EvaluationConfig(
        bundles=[parse_bundle_argument(text) for text in args.bundle], data=args.data, out=args.out,
        cases=args.cases, cases_file=args.cases_file, split=args.split, ablation_baseline=args.ablation_baseline,
        ablation_dense=args.ablation_dense, ablation=args.ablation, robustness=args.robustness, workers=args.workers,
        seed=args.seed, device=args.device, overwrite=args.overwrite, results_md=args.results_md, progress=args.progress,
        command_line=command_line(args),
    )
    out = evaluate(config)
    print(f"results written: {out / 'RESULTS.md'}" + (f" and {config.results_md}" if config.results_md else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m livertumorseg_training.evaluation ...``: the same as ``livertumorseg-train evaluate ...``."""
    args = add_evaluate_arguments(argparse.ArgumentParser(prog="livertumorseg-train evaluate")).parse_args(argv)
    try:
        return run_evaluate(args)
    except LiverTumorSegError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


def parse_bundle_argument(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    name = name.strip()
    if not sep or not name or not path:
        raise InputError(f"--bundle '{text}': give NAME=PATH, e.g. --bundle proposed=runs/full/bundle.")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name) or name.startswith(RESERVED_PREFIXES):
        raise InputError(f"--bundle '{text}': the name may use letters, digits and _.+- (not starting with "
                         f"{' or '.join(repr(p) for p in RESERVED_PREFIXES)}).")
    return name, Path(path)


def command_line(args: argparse.Namespace) -> str:
    """The command, in canonical form, that reproduces ``args`` (recorded at the top of RESULTS.md)."""
    parts = ["livertumorseg-train", "evaluate"]
    for text in args.bundle:
        parts += ["--bundle", text]
    parts += ["--data", *map(str, args.data)]
    if args.cases:
        parts += ["--cases", *args.cases]
    if args.cases_file:
        parts += ["--cases-file", str(args.cases_file)]
    if args.split:
        parts += ["--split", args.split]
    for option in ("ablation_baseline", "ablation_dense"):
        if getattr(args, option):
            parts += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    parts += ["--out", str(args.out)]
    if args.results_md:
        parts += ["--results-md", str(args.results_md)]
    parts += [] if args.ablation else ["--no-ablation"]
    parts += [] if args.robustness else ["--no-robustness"]
    parts += ["--workers", str(args.workers), "--seed", str(args.seed)]
    parts += ["--device", args.device] if args.device != "cpu" else []
    parts += ["--overwrite"] if args.overwrite else []
    return shlex.join(parts)


# ------------------------------------------------------------------------------------------ planning


def plan_evaluation(config: EvaluationConfig) -> Plan:
    """Check every input and decide the runs, before any case is segmented (errors come early)."""
    if not config.bundles:
        raise InputError("Give at least one --bundle NAME=PATH (the first is the full pipeline).")
    names = [name for name, _ in config.bundles]
    if len(set(names)) != len(names):
        raise InputError(f"--bundle names must be unique, got {', '.join(names)}.")
    if config.workers < 1:
        raise InputError(f"--workers must be at least 1, got {config.workers}.")
    bundles: dict[str, Bundle] = {}
    missing: dict[str, Path] = {}
    full_name, full_path = config.bundles[0]
    bundles[full_name] = load_bundle(full_path)  # the full pipeline must exist: BundleError otherwise
    for key, path in [*config.bundles[1:], *((ABLATION_KEYS[k], p) for k, p in
                                               (("baseline", config.ablation_baseline), ("dense", config.ablation_dense)) if p)]:
        if Path(path).exists():
            bundles[key] = load_bundle(path)
        else:
            log.warning("Bundle '%s' (%s) does not exist: reported as not trained.", key, path)
            missing[key] = Path(path)
    cases, selection = select_cases(config, bundles[full_name])

    unique: dict[tuple, Run] = {}

    def add(run: Run) -> Run:
        # A stage the bundle cannot run is the same computation as the stage switched off: one run for both.
        return unique.setdefault(effective(run, bundles[run.bundle]).signature, run)

    methods = [(name, add(Run(name, name)) if name in bundles else None) for name in names]
    plan = Plan(cases, selection, bundles, missing, methods)
    if config.ablation:
        for index, (row, which, stages) in enumerate(ABLATION_ROWS, start=1):
            key = full_name if which == "full" else ABLATION_KEYS[which]
            entry = {"row": row, "which": which, "bundle": key, "run": None, "stages": stages}
            needs = [STAGE_COMPONENT[s] for s, on in stages.items() if on and s in STAGE_COMPONENT]
            if key not in bundles:
                entry["status"] = "not trained"
            elif any(not bundles[key].has(component) for component in needs):
                lacking = [c for c in needs if not bundles[key].has(c)]
                entry["status"] = f"not available: the bundle has no {', '.join(lacking)}"
            else:
                entry["run"] = add(Run(f"ablation-{index}", key, **stages))
                entry["status"] = "run"
            plan.ablation.append(entry)
    if config.robustness:
        for kind, value, label in PERTURBATIONS:
            plan.robustness.append((label, add(Run(f"robustness-{kind}-{value:g}", full_name, perturbation=(kind, value)))))
    plan.runs = list(unique.values())
    return plan


def effective(run: Run, bundle: Bundle) -> Run:
    """The run with the stages the bundle cannot run (no component for them) switched off."""
    return replace(run, **{stage: getattr(run, stage) and bundle.has(component) for stage, component in STAGE_COMPONENT.items()})


def data_folders(config: EvaluationConfig) -> list[Path]:
    return [Path(p) for p in config.data] if isinstance(config.data, (list, tuple)) else [Path(config.data)]


def select_cases(config: EvaluationConfig, full: Bundle) -> tuple[list[Case], str]:
    cases = [case for folder in data_folders(config) for case in find_cases(folder)]
    repeated = sorted({c.case_id for c in cases if sum(other.case_id == c.case_id for other in cases) > 1})
    if repeated:
        raise InputError(f"Case ids occur in more than one --data folder: {', '.join(repeated[:10])}. Pool folders "
                         "whose case ids differ.")
    if config.cases:
        wanted, selection = list(config.cases), "the cases listed with --cases"
    elif config.cases_file:
        try:
            text = Path(config.cases_file).read_text(encoding="utf-8")
        except OSError as error:
            raise InputError(f"--cases-file '{config.cases_file}' cannot be read ({error.strerror}).") from None
        wanted = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        wanted = [w for w in wanted if w]
        selection = f"the cases listed in {config.cases_file}"
    elif config.split:
        split = (full.manifest.get("training") or {}).get("split") or {}
        if not split.get(config.split):
            raise InputError(
                f"--split {config.split}: the bundle '{full.path}' records no '{config.split}' cases in its manifest "
                "(training → split). List the cases with --cases or --cases-file instead."
            )
        wanted, selection = list(split[config.split]), f"the '{config.split}' split recorded in the bundle {full.name}"
    else:
        return cases, "all labelled cases of the data set"
    by_id = {case.case_id: case for case in cases}
    by_number = {case.case_id.split("-", 1)[-1]: case for case in cases}
    chosen, unknown = [], []
    for item in wanted:
        case = by_id.get(item) or by_number.get(item)
        (chosen.append(case) if case else unknown.append(item))
    if unknown:
        raise InputError(
            f"{len(unknown)} case id(s) not found in {', '.join(repr(str(p)) for p in data_folders(config))}: "
            f"{', '.join(unknown[:10])}"
            f"{' …' if len(unknown) > 10 else ''}. Available: {', '.join(c.case_id for c in cases[:10])}"
            f"{' …' if len(cases) > 10 else ''}."
        )
    if not chosen:
        raise InputError("The case selection is empty.")
    order = {case.case_id: i for i, case in enumerate(cases)}
    return sorted(set(chosen), key=lambda c: order[c.case_id]), selection


# ------------------------------------------------------------------------------------------ workers


_WORKER_BUNDLES: dict[str, Bundle] = {}


def perturb(image: Image, perturbation: tuple | None, *, seed: int, case_id: str) -> Image:
    """The CT with noise (``("noise", σ)``: HU + N(0, σ²)) or scaling (``("scale", s)``: s·HU), float32."""
    if perturbation is None:
        return image
    kind, value = perturbation
    hu = image.array.astype(np.float32)
    if kind == "noise":
        rng = np.random.default_rng([seed, zlib.crc32(case_id.encode("utf-8")), int(round(value * 1000))])
        hu += np.float32(value) * rng.standard_normal(hu.shape, dtype=np.float32)
    elif kind == "scale":
        hu *= np.float32(value)
    else:
        raise ValueError(f"unknown perturbation {kind!r}")
    return image.with_array(hu)


def evaluate_one_case(case: Case, runs: list[Run], bundle_paths: dict[str, str], seed: int, device: str,
                      overlay_run: str | None) -> dict:
    """Segment one case with every run and score it; returns plain data (sent back from a worker process)."""
    from LiverTumorSegLib.pipeline import segment

    try:
        image, reference = load_case(case)
        spacing = image.geometry.spacing
        rows, lesions, stages, overlay = [], [], {}, None
        for run in runs:
            path = bundle_paths[run.bundle]
            bundle = _WORKER_BUNDLES.get(path) or _WORKER_BUNDLES.setdefault(path, load_bundle(path))
            result = segment(perturb(image, run.perturbation, seed=seed, case_id=case.case_id), bundle, run.options(device))
            scored = evaluate_case(result.labels.array, reference, spacing)
            rows.append({"case": case.case_id, "run": run.key, **scored.metrics})
            lesions += [{"case": case.case_id, "run": run.key, **lesion} for lesion in scored.lesions]
            stages[run.key] = result.details["stages"]
            if run.key == overlay_run:
                overlay = overlay_slice(image, reference, result.labels.array)
        return {"case": case.case_id, "rows": rows, "lesions": lesions, "stages": stages, "overlay": overlay}
    except LiverTumorSegError as error:
        raise type(error)(f"case {case.case_id}: {error}") from None
    except Exception as error:  # name the case, keep the cause
        raise RuntimeError(f"case {case.case_id} failed: {type(error).__name__}: {error}") from error


def _worker_init() -> None:
    logging.getLogger("LiverTumorSeg").setLevel(logging.ERROR)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def overlay_slice(image: Image, reference: np.ndarray, prediction: np.ndarray) -> dict:
    """The axial slice (canonical orientation) where the largest reference lesion has its largest area
    (no tumour: the largest liver area; no liver: the middle slice), with both label maps."""
    canonical, _ = to_canonical(image)
    ref = to_canonical(image.with_array(np.asarray(reference, np.uint8)))[0].array
    pred = to_canonical(image.with_array(np.asarray(prediction, np.uint8)))[0].array
    components, count = label_lesions(ref == 2)
    if count:
        largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
        z = int(np.argmax((components == largest).sum(axis=(1, 2))))
    elif (ref >= 1).any():
        z = int(np.argmax((ref >= 1).sum(axis=(1, 2))))
    else:
        z = ref.shape[0] // 2
    sx, sy, _ = canonical.geometry.spacing
    hu = np.clip(canonical.array[z], -1024, 3071).astype(np.int16)
    return {"image": hu, "reference": ref[z], "prediction": pred[z], "spacing_yx": (float(sy), float(sx)), "slice": z}


# ----------------------------------------------------------------------------------------- evaluate


def evaluate(config: EvaluationConfig) -> Path:
    """Plan, segment and score every case, then write the output folder atomically; returns it."""
    out = Path(config.out)
    for path in (out, config.results_md):
        if path is not None and Path(path).exists() and not config.overwrite:
            raise OutputError(f"'{path}' already exists. Choose another output, or pass --overwrite to replace it.")
    plan = plan_evaluation(config)
    bundle_paths = {key: str(bundle.path) for key, bundle in plan.bundles.items()}
    full_run = plan.methods[0][1]
    tasks = [(case, plan.runs, bundle_paths, config.seed, config.device, full_run.key) for case in plan.cases]
    results: dict[str, dict] = {}
    workers = min(config.workers, len(tasks))
    from tqdm import tqdm

    with tqdm(total=len(tasks), desc="evaluate", unit="case", disable=not config.progress, file=sys.stderr) as bar:
        if workers == 1:
            for task in tasks:
                result = evaluate_one_case(*task)
                results[result["case"]] = result
                bar.update(1)
        else:
            import multiprocessing

            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init) as pool:
                futures = [pool.submit(evaluate_one_case, *task) for task in tasks]
                try:
                    for future in as_completed(futures):
                        result = future.result()
                        results[result["case"]] = result
                        bar.update(1)
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    ordered = [results[case.case_id] for case in plan.cases]
    report = Report(config, plan, ordered)
    with atomic_path(out, overwrite=config.overwrite) as tmp:
        tmp.mkdir()
        report.write(tmp)
        markdown = report.markdown(figures=Path("figures"))
        (tmp / "RESULTS.md").write_text(markdown, encoding="utf-8")
    if config.results_md is not None:
        md_path = Path(config.results_md)
        relative = Path(os.path.relpath(out.resolve() / "figures", md_path.resolve().parent))
        with atomic_path(md_path, overwrite=config.overwrite) as tmp:
            tmp.write_text(report.markdown(figures=relative), encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------ report


def _fmt(value: float, digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _fmt_ms(stats: tuple[float, float, int], total: int, digits: int = 3) -> str:
    mean, std, n = stats
    if n == 0:
        return "—"
    text = _fmt(mean, digits) + (f" ± {_fmt(std, digits)}" if math.isfinite(std) else "")
    return text + (f" (n = {n})" if n < total else "")


def _fmt_p(value: float) -> str:
    if not math.isfinite(value):
        return "—"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _signed(value: float, digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:+.{digits}f}"


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


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


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
    """All tables, CSVs and figures from the per-case results."""

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

    # ------------------------------------------------------------------ numbers
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

    # ------------------------------------------------------------------ files
    def write(self, folder: Path) -> None:
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
        (folder / "figures").mkdir()
        self.figures(folder / "figures")

    def figures(self, folder: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D

        plt.rcParams.update({"font.size": 9})
        methods = [(name, run) for name, run in self.plan.methods if run]
        # Per-case Dice box plots.
        fig, axes = plt.subplots(1, 2, figsize=(3 + 1.2 * len(methods) * 2, 3.6), constrained_layout=True)
        for ax, structure in zip(axes, ("tumour", "liver")):
            data = [[v for v in self.values(run.key, f"{structure}_dice") if math.isfinite(v)] for _, run in methods]
            ax.boxplot(data, showmeans=True)
            ax.set_xticks(range(1, len(methods) + 1), [name for name, _ in methods], rotation=20)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{structure.capitalize()} Dice per case (n = {self.n})")
            ax.grid(axis="y", alpha=0.3)
        fig.savefig(folder / "dice_boxplot.png", dpi=120)
        plt.close(fig)
        # Size-stratified bars.
        fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
        width = 0.8 / max(1, len(methods))
        for i, (name, _) in enumerate(methods):
            rows = [r for r in self.size if r["method"] == name]
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
        if self.robustness:
            rows = self.robustness[1:]
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
        for label, row, overlay in self.overlay_choice():
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
            ax.set_title(f"{label}: {row['case']}, tumour Dice {_fmt(row['tumour_dice'])}, liver Dice "
                         f"{_fmt(row['liver_dice'])} (axial slice {overlay['slice']})", fontsize=8)
            ax.set_axis_off()
            fig.savefig(folder / f"overlay_{label}.png", dpi=120)
            plt.close(fig)

    # ------------------------------------------------------------------ markdown
    def markdown(self, figures: Path) -> str:
        fig = lambda name: (figures / name).as_posix()
        cfg, plan = self.config, self.plan
        parts = ["# Evaluation results", ""]
        parts += ["Generated with:", "", "```bash", cfg.command_line or "(Python API)", "```", ""]
        parts += [
            "- **Data set:** " + ", ".join(f"`{p}`" for p in data_folders(cfg))
            + f" ({', '.join(sorted({c.layout for c in plan.cases}))} layout), {self.n} case(s), {plan.selection}: "
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
            bundle_rows.append([f"`{key}`", bundle.name, f"`{self._given_path(key)}`",
                                f"{model.get('name', '—')} {model.get('preset', '')}".strip() + f" ({flag_text})",
                                ", ".join(bundle.manifest.get("components", {})), f"`{manifest_sha}`"])
        for key, path in plan.missing.items():
            bundle_rows.append([f"`{key}`", "not trained", f"`{path}`", "—", "—", "—"])
        parts += [_table(["Key", "Name and version", "Path", "Network (flags)", "Components", "manifest.json sha256"], bundle_rows), ""]
        flag_warnings = self._flag_warnings()
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
                    cells.append(_fmt(self.method_stats[name][key][0], digits))
                else:
                    cells.append(_fmt_ms(self.method_stats[name][key], self.n, digits))
            rows.append(cells)
        parts += [_table(header, rows), ""]
        stage_rows = [[name, self.stage_notes[run.key] if run else "not trained"] for name, run in plan.methods]
        parts += ["Pipeline stages per bundle, as the engine reported them:", "", _table(["Bundle", "Stages"], stage_rows), ""]
        if self.wilcoxon:
            parts += [f"Paired Wilcoxon signed-rank tests against `{self.full_name}` (two-sided; mean difference = "
                      f"`{self.full_name}` − other):", ""]
            rows = [[w["other"], w["label"], str(w["pairs"]), _signed(w["mean_difference"]), _fmt(w["statistic"], 1),
                     _fmt_p(w["p_value"]) + (f" ({w['note']})" if w["note"] else "")] for w in self.wilcoxon]
            parts += [_table(["Compared with", "Metric", "Pairs", "Mean difference", "W", "p"], rows), ""]
        parts += [f"![Per-case Dice]({fig('dice_boxplot.png')})", ""]

        # Table 5
        if self.ablation:
            parts += ["## Ablation (Table 5)", "",
                      "Tumour Dice (mean ± standard deviation over cases) and the change from the row above. Network rows "
                      "use the base post-processing (Otsu, 3×3 morphology, liver confinement) without the three-slice "
                      "rule, radiomics or refinement; then the stages are switched on one by one on the full bundle.", ""]
            rows = []
            for row in self.ablation:
                if row["status"] == "run":
                    rows.append([row["configuration"], f"`{row['bundle']}`", row["stages"],
                                 _fmt_ms((row["mean"], row["std"], row["n"]), self.n), _signed(row["change"])])
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
                row = next(r for r in self.size if r["method"] == name and r["stratum"] == stratum)
                if not row["trained"]:
                    cells.append("not trained")
                elif row["lesions"] == 0:
                    cells.append("no lesions")
                else:
                    cells.append(f"{_fmt_ms((row['dice_mean'], row['dice_std'], row['lesions']), row['lesions'])} "
                                 f"({row['detected']}/{row['lesions']} detected)")
            rows.append(cells)
        parts += [_table(["Method"] + [f"{s.capitalize()} ({label})" for s, label in SIZE_STRATA], rows), ""]
        parts += [f"![Size-stratified Dice]({fig('size_stratified.png')})", ""]

        # Robustness
        if self.robustness:
            parts += ["## Robustness (§4.8)", "",
                      f"The full bundle `{self.full_name}` on perturbed CTs: noise HU' = HU + N(0, σ²) per voxel "
                      f"(seed {cfg.seed}); scaling HU' = s·HU (about 0 HU). Change = mean over cases of the paired "
                      "difference from the unperturbed run.", ""]
            rows = [[r["perturbation"], _fmt_ms((r["tumour_dice_mean"], r["tumour_dice_std"], self.n), self.n),
                     _signed(r["tumour_dice_change"]), _fmt_ms((r["liver_dice_mean"], r["liver_dice_std"], self.n), self.n),
                     _signed(r["liver_dice_change"])] for r in self.robustness]
            parts += [_table(["Perturbation", "Tumour Dice", "Change", "Liver Dice", "Change"], rows), ""]
            parts += [f"![Robustness]({fig('robustness.png')})", ""]

        # Overlays
        parts += ["## Examples", "",
                  f"Best, median and worst case by tumour Dice (`{self.full_name}`, cases with reference tumour), on the "
                  "axial slice where the largest reference lesion is largest: reference contours solid, predicted dashed "
                  "(liver blue/yellow, tumour green/red).", ""]
        for label, row, overlay in self.overlay_choice():
            if overlay is not None:
                parts += [f"![{label}: {row['case']}]({fig(f'overlay_{label}.png')})", ""]

        parts += ["## Definitions", "", *_DEFINITIONS, ""]
        parts += ["Files: `per_case.csv` (every number of every case and run), `per_lesion.csv`, `table4_methods.csv`, "
                  "`table4_wilcoxon.csv`, `table5_ablation.csv`, `table6_size.csv`, `robustness.csv`, `figures/`.", ""]
        return "\n".join(parts)

    def _given_path(self, key: str) -> Path:
        given = dict(self.config.bundles)
        given.update({ABLATION_KEYS["baseline"]: self.config.ablation_baseline, ABLATION_KEYS["dense"]: self.config.ablation_dense})
        return given.get(key) or self.plan.bundles[key].path

    def _flag_warnings(self) -> list[str]:
        out = []
        checks = [("full", self.full_name)] + [(which, key) for which, key in ABLATION_KEYS.items()]
        for which, key in checks:
            if key not in self.plan.bundles or not self.config.ablation:
                continue
            flags = (self.plan.bundles[key].manifest.get("model") or {}).get("flags")
            if flags is None:
                out.append(f"bundle `{key}` records no network flags; the ablation row assumes {EXPECTED_FLAGS[which]}.")
            elif any(flags.get(k) != v for k, v in EXPECTED_FLAGS[which].items()):
                out.append(f"bundle `{key}` was trained with {flags}, but its ablation row expects {EXPECTED_FLAGS[which]}.")
        return out


def predicts_tumour(bundle: Bundle) -> bool:
    """Whether the bundle's model segments tumours (the 3D U-Net of seed 002 is liver only, as published)."""
    return "tumour" in bundle.manifest["input"].get("outputs", ["liver", "tumour"])


def _is_tumour_metric(key: str) -> bool:
    return "tumour" in key or key.startswith("pooled:") or key == "burden_rmse"


def _stages_text(stages: dict) -> str:
    on = ["Otsu + morphology"]
    on += [label for stage, label in (("slice_consistency", "three-slice"), ("radiomics", "radiomics"), ("refine", "refinement"))
           if stages.get(stage)]
    return ", ".join(on)


_DEFINITIONS = [
    "- Liver = labels 1 and 2 (tumour included), tumour = label 2, as LiTS scores them.",
    "- Dice, sensitivity |P∩T|/|T| and PPV |P∩T|/|P| per case; both masks empty → 1 (LiTS); a ratio with an "
    "empty denominator is undefined and left out of the mean (the cell then says how many cases it covers). "
    "Global Dice pools the voxels of all cases.",
    "- Surfaces are the boundary voxels (6-neighbourhood); distances in mm between voxel centres with the voxel spacing. "
    "ASSD = mean of all distances of both directions pooled; HD95 = 95th percentile of the same pooled distances. Both "
    "empty → 0; one empty → undefined (left out, counted in n).",
    "- Lesions = 26-connected tumour components; a predicted and a reference lesion match when they share a voxel. "
    "Precision = matched predicted / predicted, recall = matched reference / reference, F1 = 2PR/(P+R), with the "
    "lesion counts summed over cases.",
    "- Tumour burden = tumour volume / liver volume (0 without liver); RMSE over cases.",
    "- Size strata by the reference lesion's equivalent-sphere diameter (6V/π)^(1/3): < 10 mm, 10–30 mm, > 30 mm.",
    "- Standard deviations are sample standard deviations (n − 1).",
]


if __name__ == "__main__":
    sys.exit(main())
