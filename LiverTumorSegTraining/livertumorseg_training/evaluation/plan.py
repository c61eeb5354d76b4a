"""The evaluation's configuration and plan: which bundles, cases and runs, checked before any case is segmented.

A :class:`Run` is one way of segmenting every case (a bundle, the pipeline stages switched on, an optional
perturbation); the method comparison, the ablation rows and the robustness perturbations each ask for runs,
and runs that compute the same thing are run once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from LiverTumorSegLib.bundle import Bundle, load_bundle
from LiverTumorSegLib.errors import InputError

from ..datasets import Case, bundle_cases_in, find_cases, recorded_case_ids

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
        # Recorded ids name their folder where the manifest tells it: take those of the folders given with --data.
        recorded = recorded_case_ids(full.manifest["training"], (config.split,))
        wanted = list(dict.fromkeys(case for folder in data_folders(config) for case in bundle_cases_in(recorded, folder)))
        if not wanted:
            raise InputError(
                f"--split {config.split}: none of the bundle's '{config.split}' cases ({', '.join(split[config.split][:5])}"
                f"{' …' if len(split[config.split]) > 5 else ''}) belongs to the --data folder(s) "
                f"{', '.join(repr(p.name) for p in data_folders(config))}. Give the folder they were drawn from."
            )
        selection = f"the '{config.split}' split recorded in the bundle {full.name}"
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


def predicts_tumour(bundle: Bundle) -> bool:
    """Whether the bundle's model segments tumours (the 3D U-Net of seed 002 is liver only, as published)."""
    return "tumour" in bundle.manifest["input"].get("outputs", ["liver", "tumour"])
