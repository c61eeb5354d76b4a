"""The ``livertumorseg-train`` command: model summaries, training, bundle export."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from LiverTumorSegLib.errors import InputError, LiverTumorSegError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="livertumorseg-train", description="Train and export LiverTumorSeg models.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    summary = commands.add_parser("summary", help="parameters per branch and FLOPs per slice")
    summary.add_argument("--model", default="cascade", choices=("cascade", "unet3d", "hdenseunet", "e2net"))
    summary.add_argument("--preset", default="lite", choices=("paper", "lite"))
    summary.add_argument("--size", type=int, default=224, help="slice size for the FLOP count")
    _ablation_flags(summary)
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")
    summary.set_defaults(run=_summary)

    train = commands.add_parser("train", help="train the cascade on a dataset (LiTS, MSD Task03 or 3D-IRCADb layout)",
                                description="Runs under torchrun for DDP: torchrun --nproc_per_node N -m livertumorseg_training.cli train ...")
    train.add_argument("--data", required=True, nargs="+", help="dataset folder(s); several are trained on together")
    train.add_argument("--out", required=True, help="run folder (checkpoints, history.jsonl, loss_curve.png)")
    train.add_argument("--model", default="cascade", choices=("cascade", "unet3d", "hdenseunet", "e2net"),
                       help="the proposed cascade, or a seed baseline trained with its published recipe "
                            "(baselines use --data --out --preset --folds --fold --validation-cases --seed --epochs "
                            "--patience --time-limit-minutes --max-steps-per-epoch --augment --device)")
    train.add_argument("--preset", default="lite", choices=("paper", "lite"))
    _ablation_flags(train)
    for name, kind, default, text in (
        ("epochs", int, 160, "maximum epochs"), ("patience", int, 12, "early-stopping patience (epochs)"),
        ("batch-size", int, None, "batch size (default: 24 for paper, 8 for lite)"), ("lr", float, 3e-4, "Adam learning rate"),
        ("slices-per-volume", int, 25, "representative slices per volume"), ("tile", int, 224, "training tile size (multiple of 32)"),
        ("folds", int, 5, "cross-validation folds (1: no test fold)"), ("fold", int, 0, "fold used as test set"),
        ("validation-cases", int, 20, "validation cases drawn from the training pool"), ("seed", int, 0, "random seed"),
        ("workers", int, 0, "data-loader worker processes"), ("max-steps-per-epoch", int, None, "cap steps per epoch"),
        ("time-limit-minutes", float, None, "stop after the epoch that passes this time"),
    ):
        train.add_argument(f"--{name}", type=kind, default=default, help=text)
    train.add_argument("--augment", action="store_true", help="intensity, noise and scale augmentation (off in the paper)")
    train.add_argument("--real-data", default=None,
                       help="second folder of real scans that join the training set (e.g. 8-bit windowed CTs with cases.json)")
    train.add_argument("--real-holdout", nargs="*", default=[], help="ids in --real-data never trained on (the real validation set)")
    train.add_argument("--real-slices-per-volume", type=int, default=80, help="slices per real scan")
    train.add_argument("--train-only-data", nargs="+", default=[],
                       help="further dataset folder(s) whose cases are only trained on, never drawn for validation or "
                            "test (adding data to a fine-tuning stage keeps the --data folders' split)")
    train.add_argument("--no-channels-last", action="store_true", help="NCHW instead of channels-last memory format")
    train.add_argument("--init-from", default=None,
                       help="start from these cascade weights (fine-tuning): a training checkpoint (best.pt) or a "
                            "model bundle folder, e.g. the shipped one")
    train.add_argument("--liver-scale", type=int, default=1,
                       help="run the liver branch at this many times the grid's spacing (2: 2 mm, a 448 mm window per "
                            "224 tile: the whole abdomen as context); the tumour branch stays on the 1 mm grid")
    train.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    train.set_defaults(run=_train)

    export = commands.add_parser("export", help="write a model bundle from a checkpoint")
    export.add_argument("--checkpoint", required=True, type=Path)
    export.add_argument("--out", required=True, type=Path, help="bundle folder")
    export.add_argument("--name", default="LiverTumorSeg")
    export.add_argument("--version", default="0.1.0")
    export.add_argument("--description", default="")
    export.add_argument("--data-source", action="append", default=[], metavar="TEXT",
                        help="one training data source with its origin and licence, recorded in the manifest (repeatable)")
    export.add_argument("--licence", default="not stated", metavar="TEXT",
                        help="licence of the model weights (e.g. Apache-2.0), recorded in the manifest")
    export.add_argument("--zip", type=Path, default=None, metavar="ZIP",
                        help="also write the bundle as a zip for 'livertumorseg models import' (or a model index)")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(run=_export)

    classifier = commands.add_parser("lesion-classifier", help="train the radiomics lesion classifier and add it to a bundle")
    classifier.add_argument("--data", required=True, nargs="+",
                            help="dataset folder(s) of training cases, e.g. the cascade's phantoms and its real scans")
    classifier.add_argument("--bundle", required=True, type=Path, help="bundle with the cascade; the classifier is added to it")
    classifier.add_argument("--out", required=True, type=Path, help="run folder (samples, Table 1, summary)")
    classifier.add_argument("--cases", nargs="*", default=None,
                            help="training case ids, FOLDER/ID with several --data folders (default: the cases the "
                                 "bundle's cascade was trained and validated on, else all)")
    classifier.add_argument("--no-cascade-false-positives", action="store_true", help="negatives from sampling only")
    classifier.add_argument("--negative-ratio", type=float, default=1.0)
    classifier.add_argument("--threads", type=int, default=1)
    classifier.add_argument("--samples", type=Path, default=None,
                            help="refit from an earlier run folder's radiomics_samples.* instead of extracting features again")
    classifier.add_argument("--seed", type=int, default=0)
    classifier.set_defaults(run=_lesion_classifier)

    boundary = commands.add_parser("boundary-cnn", help="train the 3D boundary CNN and add it to a bundle")
    boundary.add_argument("--data", required=True, nargs="+",
                          help="dataset folder(s) of training cases, e.g. the cascade's phantoms and its real scans")
    boundary.add_argument("--bundle", required=True, type=Path, help="bundle the boundary CNN is added to")
    boundary.add_argument("--out", required=True, type=Path)
    boundary.add_argument("--preset", default="lite", choices=("paper", "lite"))
    boundary.add_argument("--patch", type=int, default=11, choices=(9, 11, 13, 15))
    boundary.add_argument("--cases", nargs="*", default=None,
                          help="training case ids, FOLDER/ID with several --data folders (default: the cases the "
                               "bundle's cascade was trained on; its validation cases choose the band and threshold)")
    boundary.add_argument("--samples-per-class", type=int, default=None)
    boundary.add_argument("--epochs-adam", type=int, default=None, help="Adam epochs (default: the preset's)")
    boundary.add_argument("--epochs-sgd", type=int, default=None, help="SGD fine-tuning epochs (default: the preset's)")
    boundary.add_argument("--no-augment", action="store_true", help="no flips or intensity variation of the patches")
    boundary.add_argument("--no-tune", action="store_true",
                          help="keep the paper's band (6) and threshold (0.5) instead of choosing them on the validation cases")
    boundary.add_argument("--time-limit-minutes", type=float, default=None)
    boundary.add_argument("--seed", type=int, default=0)
    boundary.set_defaults(run=_boundary_cnn)

    _tuning_command(commands, "tune-refinement", "choose the boundary CNN's band and threshold on labelled cases",
                    "bundle with a boundary_cnn; its band and threshold are set", "refinement_tuning.json",
                    "all of --data").set_defaults(run=_tune_refinement)
    _tuning_command(commands, "tune-liver-scales",
                    "choose the zooms the liver network runs at (averaged) on labelled cases",
                    "cascade bundle; its inference.liver_scales are set", "liver_scales_tuning.json",
                    "the bundle's validation cases").set_defaults(run=_tune_liver_scales)

    from .evaluation import add_evaluate_arguments, run_evaluate

    add_evaluate_arguments(
        commands.add_parser("evaluate", help="the paper's evaluation tables (RESULTS.md, CSVs, figures) from one command")
    ).set_defaults(run=run_evaluate)

    synth = commands.add_parser("synth-phantoms", help="training CT painted on the label bank's real anatomy (resumable)")
    synth.add_argument("--label-bank", required=True, type=Path, help="label-bank folder (with labels.json)")
    synth.add_argument("--out", required=True, type=Path, help="dataset folder (LiTS layout); complete cases there are kept")
    synth.add_argument("--count", required=True, type=int)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--sources", default="ircad,flare22,word,amos,abdomenatlas", help="comma-separated label-bank sources")
    synth.add_argument("--size", default="full", choices=("full", "small"), help="512 or 128 pixels in-plane")
    synth.set_defaults(run=_synth_phantoms)

    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except LiverTumorSegError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code



def _synth_phantoms(args) -> int:
    from .synth_dataset import write_synth_dataset

    sources = [name.strip() for name in args.sources.split(",") if name.strip()]
    written = write_synth_dataset(args.label_bank, args.out, args.count, seed=args.seed, sources=sources, size=args.size)
    print(f"{len(written)} case(s) in {args.out}")
    return 0


def _ablation_flags(parser) -> None:
    parser.add_argument("--no-dense-skips", action="store_true", help="plain U-Net skips (ablation)")
    parser.add_argument("--no-subpixel", action="store_true", help="bilinear upsampling instead of pixel shuffle (ablation)")
    parser.add_argument("--no-attention", action="store_true", help="no attention gates (ablation)")


def _flags(args) -> dict:
    return {"dense_skips": not args.no_dense_skips, "subpixel": not args.no_subpixel, "attention": not args.no_attention}


def _summary(args) -> int:
    from .model_summary import format_summary, summarize

    flags = _flags(args)
    if args.model != "cascade":
        if not all(flags.values()):
            raise InputError("--no-dense-skips, --no-subpixel and --no-attention are ablations of the cascade only.")
        flags = {}
    result = summarize(args.model, args.preset, size=args.size, **flags)
    print(json.dumps(result, indent=2) if args.json else format_summary(result))
    return 0


def _train(args) -> int:
    if args.model != "cascade":
        return _train_baseline(args)
    from .train import TrainConfig, train

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values.update(_flags(args), channels_last=not args.no_channels_last)
    if values.get("batch_size") is None:
        values["batch_size"] = 24 if args.preset == "paper" else 8
    values = {k: v for k, v in values.items() if v is not None}
    result = train(TrainConfig(**values))
    print(f"best epoch {result.best_epoch}, validation loss {result.best_validation_loss:.4f}; checkpoints in {args.out}")
    return 0


def _train_baseline(args) -> int:
    from .baseline_training import BaselineConfig, train_baseline

    config = BaselineConfig(
        model=args.model, data=args.data, out=args.out, preset=args.preset, folds=args.folds, fold=args.fold,
        validation_cases=args.validation_cases, seed=args.seed, epochs=args.epochs, patience=args.patience,
        time_limit_minutes=args.time_limit_minutes, augment=args.augment, device=args.device,
        **({"steps_per_epoch": args.max_steps_per_epoch} if args.max_steps_per_epoch else {}),
    )
    path = train_baseline(config)
    print(f"checkpoint: {path}; export it with: livertumorseg-train export --checkpoint {path} --out BUNDLE")
    return 0


def _export(args) -> int:
    from .export import export_bundle

    bundle = export_bundle(args.checkpoint, args.out, name=args.name, version=args.version,
                           description=args.description, overwrite=args.overwrite, data_sources=args.data_source,
                           licence=args.licence)
    print(f"bundle written: {bundle.path} ({', '.join(bundle.manifest['files'])})")
    if args.zip:
        from LiverTumorSegLib.model_registry import pack_bundle

        print(f"zip written: {pack_bundle(bundle.path, args.zip, overwrite=args.overwrite)}")
    return 0


def _training_cases(args) -> list[str] | None:
    """Explicit --cases, else the cases of the --data folders that the bundle's cascade was trained or validated on
    (its real training scans included; never its held-out or test cases)."""
    if args.cases:
        return args.cases
    return _recorded_cases(args.bundle, args.data, ("train", "validation", "real_train"))


def _tuning_command(commands, name: str, help_text: str, bundle_help: str, output: str, default_cases: str):
    """A command that chooses settings of a bundle on labelled cases and writes them into it."""
    command = commands.add_parser(name, help=help_text)
    command.add_argument("--data", required=True, nargs="+", help="folder(s) of labelled cases, never test cases")
    command.add_argument("--bundle", required=True, type=Path, help=bundle_help)
    command.add_argument("--out", required=True, type=Path, help=f"folder for {output}")
    command.add_argument("--cases", nargs="*", default=None,
                         help=f"case ids, FOLDER/ID with several --data folders (default: {default_cases})")
    command.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads")
    return command


def _recorded_cases(bundle: Path, data: list, parts: tuple[str, ...], required: bool = True) -> list[str] | None:
    """The cases of the folders ``data`` that the bundle's manifest records in the split ``parts``. With several
    folders the ids carry the folder's name (``real-train/mahler00``, as ``datasets.find_cases_in`` names them).
    None when the bundle records no split; an error when none of its cases is in the folders (``required``)."""
    from LiverTumorSegLib.bundle import load_bundle

    from .datasets import bundle_cases_in, find_cases_in, folder_list, recorded_case_ids

    training = load_bundle(bundle).manifest.get("training") or {}
    if not training.get("split"):
        return None
    recorded = recorded_case_ids(training, parts)
    folders = folder_list(data)
    available = find_cases_in(folders)
    chosen = []
    for folder in folders:
        prefix = f"{Path(folder).name}/" if len(folders) > 1 else ""
        chosen += [prefix + case for case in bundle_cases_in(recorded, folder) if prefix + case in available]
    if not chosen and required:
        raise InputError(f"None of the cases the bundle '{bundle}' records as {' or '.join(parts)} is in "
                         f"{', '.join(map(str, folders))}. Give the folders it was trained on, or list cases with --cases.")
    return chosen or None


def _lesion_classifier(args) -> int:
    from .lesion_classifier import train_lesion_classifier

    summary = train_lesion_classifier(
        args.data, args.bundle, cases=_training_cases(args), seed=args.seed,
        use_cascade_false_positives=not args.no_cascade_false_positives, out_dir=args.out,
        negative_ratio=args.negative_ratio, threads=args.threads, samples_from=args.samples,
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _boundary_cnn(args) -> int:
    from .boundary_training import export_boundary_cnn, train_boundary_cnn, tune_refinement

    cases = args.cases or _recorded_cases(args.bundle, args.data, ("train", "real_train"))
    validation = None if args.cases else _recorded_cases(args.bundle, args.data, ("validation",), required=False)
    result = train_boundary_cnn(
        args.data, args.out, preset=args.preset, patch=args.patch, samples_per_class=args.samples_per_class,
        cases=cases, validation_cases=validation, seed=args.seed, epochs_adam=args.epochs_adam,
        epochs_sgd=args.epochs_sgd, augment=not args.no_augment, time_limit_minutes=args.time_limit_minutes,
    )
    bundle = export_boundary_cnn(result, args.bundle)
    print(f"boundary CNN: validation accuracy {result.validation_accuracy:.3f}; added to {bundle.path}")
    if args.no_tune:
        return 0
    return _report_tuning(args.bundle, args.out, tune_refinement(args.data, args.bundle, result.split["validation"]), args.data)


def _tune_refinement(args) -> int:
    from .boundary_training import tune_refinement
    from .datasets import find_cases_in

    cases = args.cases or list(find_cases_in(args.data))
    tuning = tune_refinement(args.data, args.bundle, cases, threads=args.threads)
    return _report_tuning(args.bundle, args.out, tuning, args.data)


def _tune_liver_scales(args) -> int:
    from .datasets import folder_list
    from .liver_scales import apply_liver_scales, tune_liver_scales

    cases = args.cases or _recorded_cases(args.bundle, args.data, ("validation",))
    if not cases:
        raise InputError(f"The bundle '{args.bundle}' records no validation cases; list labelled cases with --cases.")
    tuning = tune_liver_scales(args.data, args.bundle, cases, threads=args.threads)
    tuning["data"] = ", ".join(map(str, folder_list(args.data)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "liver_scales_tuning.json").write_text(json.dumps(tuning, indent=1) + "\n", encoding="utf-8")
    apply_liver_scales(args.bundle, tuning)
    best = tuning["best"]
    single = tuning["scale_1_only"]
    print(f"liver scales on {len(cases)} cases: {best['liver_scales']} (liver Dice {best['liver_dice']:.4f}, tumour "
          f"{best['tumour_dice']:.4f})" + (f"; scale 1 alone {single['liver_dice']:.4f}, {single['tumour_dice']:.4f}"
                                           if single else "") + f" (now in {args.bundle})")
    return 0


def _report_tuning(bundle_dir: Path, out: Path, tuning: dict, data) -> int:
    from .boundary_training import apply_tuning
    from .datasets import folder_list

    tuning["data"] = ", ".join(map(str, folder_list(data)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "refinement_tuning.json").write_text(json.dumps(tuning, indent=1) + "\n", encoding="utf-8")
    apply_tuning(bundle_dir, tuning)
    best = tuning["best"]
    print(f"refinement on {len(tuning['cases'])} cases: tumour Dice {tuning['unrefined_dice']:.4f} unrefined, "
          f"{best['dice']:.4f} with band {best['band']:g} and threshold {best['threshold']:g} (now in {bundle_dir})")
    if best["dice"] <= tuning["unrefined_dice"]:
        print("warning: no band and threshold improved tumour Dice on these cases; "
              "switch the refinement off for this bundle (PipelineOptions(refine=False), --no-refine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
