"""Command line of ``livertumorseg-train evaluate`` (and ``python -m livertumorseg_training.evaluation``)."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from LiverTumorSegLib.errors import InputError, LiverTumorSegError

from .plan import RESERVED_PREFIXES, EvaluationConfig
from .runs import evaluate


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
