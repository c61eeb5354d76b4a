"""The ``livertumorseg`` command: segment CT volumes, run the demo, make synthetic phantoms."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from . import __version__
from .errors import Cancelled, LiverTumorSegError, UsageError

EXIT_CODES = """exit codes:
  0    success
  1    unexpected problem (please report it with the message)
  2    bad input image (missing, unreadable, not a 3D CT volume)
  3    output problem (exists without --overwrite; is, holds or lies inside an input; not a previous
       output of livertumorseg; not writable)
  4    model bundle problem (missing, damaged, unknown version, needs a newer engine; a model download or
       model index that failed)
  5    requested device not available (e.g. --device cuda without a CUDA-enabled ONNX Runtime)
  64   usage error (unknown option, missing or invalid option value)
  130  cancelled (Ctrl-C or SIGTERM); nothing was written
"""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr, force=True)
    signal.signal(signal.SIGTERM, _raise_cancel)
    try:
        return args.run(args) or 0
    except LiverTumorSegError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("error: cancelled; nothing was written.", file=sys.stderr)
        return Cancelled.exit_code


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on exit code 64, apart from the bad-input code 2."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(UsageError.exit_code, f"error: {message}\n")


def _raise_cancel(signum, frame):
    raise Cancelled("Cancelled by a termination signal; nothing was written.")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="livertumorseg",
        description="Liver and liver-tumour segmentation of contrast-enhanced abdominal CT (research use).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    # Imported here: these command families import the shared helpers below from this module.
    from . import cli_batch, cli_models

    seg = commands.add_parser(
        "segment", help="segment a CT volume (file or DICOM folder)", epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Segment the liver and liver tumours; write label map, .seg.nrrd, volumetry and report.",
    )
    seg.add_argument("input", type=Path, help="CT image (.nii[.gz], .nrrd, .mha, .mhd) or a DICOM series folder")
    seg.add_argument("-o", "--output", type=Path, required=True, help="output folder (must not exist unless --overwrite)")
    seg.add_argument("--dicom-seg", action=argparse.BooleanOptionalAction, default=None,
                     help="also write segmentation.dcm, a DICOM SEG of the input series for PACS (default: on for a "
                     "DICOM series folder; refused for an image file)")
    _add_run_options(seg)
    seg.set_defaults(run=_segment)

    demo = commands.add_parser(
        "demo", help="segment a full-size synthetic CT with the bundled model and show the result",
        description="Generate a full-size synthetic CT phantom, segment it with the bundled model, write all "
        "outputs, and print the volumetry and the Dice against the phantom's ground truth.",
    )
    demo.add_argument("-o", "--output", type=Path, default=None, help="output folder (default: a new temporary folder)")
    demo.add_argument("--seed", type=int, default=2027, help="phantom seed (default 2027: an unseen portal-venous case with four tumours)")
    _add_run_options(demo)
    demo.set_defaults(run=_demo)
    cli_batch.add_command(commands)

    phantom = commands.add_parser("phantom", help="write synthetic CT phantoms in LiTS layout")
    phantom.add_argument("--out", type=Path, required=True, help="output folder")
    phantom.add_argument("--count", type=int, default=1, help="number of cases")
    phantom.add_argument("--size", choices=("full", "small"), default="full", help="512×512 in-plane, or a small fast grid")
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--overwrite", action="store_true", help="replace existing cases")
    phantom.set_defaults(run=_phantom)

    plan = commands.add_parser(
        "plan", help="plan a liver resection: remnant volume (FLR) and tumour margins", epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compute resected and remnant liver volume, the future liver remnant (FLR) with its verdict, "
        "and each tumour's side and margin for a resection plane or mask; write plan.json, plan.csv and plan.html.",
    )
    plan.add_argument("segmentation", type=Path, help="label map (0 background, 1 liver, 2 tumour), e.g. the "
                      "segmentation.nii.gz of 'livertumorseg segment'")
    resection = plan.add_mutually_exclusive_group(required=True)
    resection.add_argument("--plane", metavar="PX,PY,PZ,NX,NY,NZ",
                           help="point and normal in LPS mm, the normal pointing into the resected part "
                           "(write --plane=... when the first number is negative)")
    resection.add_argument("--resected", type=Path, metavar="MASK", help="mask on the label map's grid, nonzero = resected")
    plan.add_argument("--liver-state", choices=("normal", "chemotherapy", "cirrhosis"), default="normal",
                      help="FLR threshold preset: normal ≥ 20 %%, chemotherapy ≥ 30 %%, cirrhosis ≥ 40 %% "
                      "(default normal)")
    plan.add_argument("-o", "--output", type=Path, required=True, help="output folder (must not exist unless --overwrite)")
    plan.add_argument("--overwrite", action="store_true", help="replace a previous plan folder of livertumorseg")
    plan.set_defaults(run=_plan)
    cli_models.add_commands(commands)

    stats = commands.add_parser("phantom-stats", help="print HU mean and std per tissue over generated phantoms")
    stats.add_argument("--count", type=int, default=5)
    stats.add_argument("--size", choices=("full", "small"), default="full")
    stats.add_argument("--seed", type=int, default=0)
    stats.set_defaults(run=_phantom_stats)
    return parser


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle folder (default: the bundled model)")
    parser.add_argument("--model", metavar="NAME", default=None,
                        help="a bundled or installed model by name (see 'livertumorseg models list'); not with --bundle")
    parser.add_argument("--series", metavar="UID", default=None,
                        help="SeriesInstanceUID of the DICOM series to read when the input folder holds several")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime (default: all cores)")
    parser.add_argument("--liver-scales", type=float, nargs="+", metavar="ZOOM", default=None,
                        help="in-plane zooms (0.8-1.25) the liver network runs at, averaged (default: the bundle's; "
                             "1 alone is fastest)")
    parser.add_argument("--no-morphology", action="store_true", help="skip the 3×3 morphological cleaning")
    parser.add_argument("--no-slice-consistency", action="store_true", help="skip the three-slice consistency rule")
    parser.add_argument("--no-radiomics", action="store_true", help="skip the radiomics false-positive filter")
    parser.add_argument("--no-refine", action="store_true", help="skip the 3D CNN boundary refinement")
    parser.add_argument("--per-lesion", action="store_true", help="one segment per lesion in the .seg.nrrd")
    parser.add_argument("--label-format", choices=("nifti", "nrrd"), default="nifti")
    parser.add_argument("--skip-intensity-check", action="store_true", help="accept images that do not look like CT in HU")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous output folder of livertumorseg (never an input or any other folder)")
    parser.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                        help="progress on stderr: a bar, one JSON object per line (for the Slicer module), or nothing")


def _options(args):
    from .pipeline import PipelineOptions
    from .postprocess import PostprocessOptions

    return PipelineOptions(
        device=args.device, threads=_threads(args.threads), liver_scales=_liver_scales(args.liver_scales),
        postprocess=PostprocessOptions(morphology=not args.no_morphology, slice_consistency=not args.no_slice_consistency),
        radiomics=not args.no_radiomics, refine=not args.no_refine, check_intensities=not args.skip_intensity_check,
    )


def _liver_scales(requested: list[float] | None) -> tuple[float, ...] | None:
    """``--liver-scales`` checked before anything runs (None: the bundle's)."""
    from .bundle import check_liver_scales

    if requested is None:
        return None
    try:
        return check_liver_scales(requested)
    except ValueError as error:
        raise UsageError(f"--liver-scales: {error}.") from None


def _threads(requested: int | None) -> int | None:
    """``--threads``, at least 1 and at most the CPU cores this process may use (more only slows ONNX Runtime)."""
    if requested is None:
        return None
    if requested < 1:
        raise UsageError(f"--threads must be at least 1, got {requested}.")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > cores:
        logging.getLogger("LiverTumorSeg").warning("--threads %d is more than the %d CPU core(s) available; using %d.",
                                                   requested, cores, cores)
        return cores
    return requested


def _prepare_run(args, inputs=()):
    """Every check that needs no image, before the slow part: output folder, options, device, bundle."""
    from .bundle import check_device, load_bundle
    from .output_folder import check_output_folder

    check_output_folder(args.output, inputs, overwrite=args.overwrite)
    options = _options(args)
    check_device(options.device)
    return load_bundle(_bundle_path(args)), options


def _bundle_path(args):
    """--bundle DIR, or the folder of the registered model --model NAME (not both); None: the bundled model."""
    if args.model is None:
        return args.bundle
    if args.bundle is not None:
        raise UsageError("Give either --bundle DIR or --model NAME, not both.")
    from .model_registry import resolve_model

    return resolve_model(args.model)


def _run(args, image, title: str, bundle, options, inputs=()):
    from .pipeline import segment, write_outputs

    reporter = _ProgressReporter(args.progress)
    result = segment(image, bundle, options, progress=reporter)
    reporter.close()
    out = write_outputs(result, image, args.output, overwrite=args.overwrite, label_format=args.label_format,
                        per_lesion=args.per_lesion, title=title, inputs=inputs)
    return result, out


def _segment(args) -> int:
    from .dicom_seg import find_source_series
    from .pipeline import segment_input

    if args.dicom_seg and args.input.is_file():
        raise UsageError(f"--dicom-seg needs a DICOM series folder as input; '{args.input}' is a file. Give the "
                         "folder of the CT's DICOM series, or leave out --dicom-seg.")
    bundle, options = _prepare_run(args, [args.input])
    source = find_source_series(args.input, args.series) if args.input.is_dir() and args.dicom_seg is not False else None
    reporter = _ProgressReporter(args.progress)
    result, out = segment_input(args.input, bundle, options, args.output, series=source.series_uid if source else args.series,
                                progress=reporter, overwrite=args.overwrite, label_format=args.label_format,
                                per_lesion=args.per_lesion, dicom_source=source)
    reporter.close()
    _print_volumetry(result.volumetry)
    print(f"outputs: {out}")
    return 0


def _demo(args) -> int:
    from .metrics import dice
    from .phantoms import generate_phantom

    args.output = args.output or Path(tempfile.mkdtemp(prefix="livertumorseg-demo-")) / "result"
    bundle, options = _prepare_run(args)
    started = time.perf_counter()
    phantom = generate_phantom(args.seed, size="full")
    print(f"phantom: seed {args.seed}, {phantom.image.array.shape[::-1]} voxels, spacing "
          f"{tuple(round(s, 2) for s in phantom.image.geometry.spacing)} mm, {len(phantom.tumours)} tumour(s), "
          f"{phantom.meta.get('phase', '')} phase ({time.perf_counter() - started:.1f} s)")
    result, out = _run(args, phantom.image, f"LiverTumorSeg demo: synthetic CT phantom (seed {args.seed})", bundle, options)
    _print_volumetry(result.volumetry)
    labels = result.labels.array
    print(f"Dice against the phantom's truth: liver {dice(labels >= 1, phantom.label >= 1):.3f}, "
          f"tumour {dice(labels == 2, phantom.label == 2):.3f}")
    print(f"stage times (s): {json.dumps(result.details['timings_s'])}")
    print(f"outputs: {out}  (open {out / 'report.html'} in a browser; load {out / 'segmentation.seg.nrrd'} in 3D Slicer)")
    return 0


def _phantom(args) -> int:
    from .phantoms import write_phantom_dataset

    if args.count < 1:
        raise UsageError("--count must be at least 1.")
    written = write_phantom_dataset(args.out, args.count, size=args.size, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {args.count} case(s) to {args.out} ({len(written)} files)")
    return 0


def _phantom_stats(args) -> int:
    from .phantoms import generate_phantom, tissue_hu_table

    phantoms = [generate_phantom(args.seed + i, size=args.size) for i in range(args.count)]
    print(f"{'tissue':<24}{'mean HU':>10}{'std HU':>10}{'voxels':>14}")
    for row in tissue_hu_table(phantoms):
        print(f"{row['tissue']:<24}{row['mean_hu']:>10.1f}{row['std_hu']:>10.1f}{row['voxels']:>14d}")
    return 0


def _plan(args) -> int:
    from .image_io import read_image
    from .resection import Plane, check_same_grid, plan_resection
    from .resection_report import check_plan_folder, summary_lines, write_plan

    inputs = {"segmentation": args.segmentation, **({"resected": args.resected} if args.resected else {})}
    check_plan_folder(args.output, inputs.values(), overwrite=args.overwrite)
    labels = read_image(args.segmentation, kind="label map")
    plane = Plane.parse(args.plane) if args.plane else None
    mask = check_same_grid(read_image(args.resected, kind="resected mask"), labels) if args.resected else None
    plan = plan_resection(labels.array, labels.geometry, plane=plane, resected=mask, liver_state=args.liver_state)
    out = write_plan(args.output, plan, labels.array, labels.geometry, title=f"Resection plan for {args.segmentation.name}",
                     inputs={name: str(path) for name, path in inputs.items()}, overwrite=args.overwrite)
    print("\n".join(summary_lines(plan.result)))
    print(f"outputs: {out}")
    return 0


def _print_volumetry(volumetry: dict) -> None:
    print(f"liver volume: {volumetry['liver_volume_ml']:.1f} mL; tumours: {volumetry['lesion_count']} "
          f"({volumetry['tumour_volume_ml']:.2f} mL, burden {volumetry['tumour_burden_percent']:.2f} %)")
    if volumetry["lesions"]:
        print(f"{'lesion':>6}{'volume mL':>11}{'eq. diam mm':>13}{'axial diam mm':>15}{'mean HU':>9}")
        for lesion in volumetry["lesions"]:
            print(f"{lesion['id']:>6}{lesion['volume_ml']:>11.2f}{lesion['equivalent_diameter_mm']:>13.1f}"
                  f"{lesion['longest_axial_diameter_mm']:>15.1f}{lesion['mean_hu']:>9.0f}")


class _ProgressReporter:
    """Progress on stderr: a one-line bar on a terminal, JSON lines for the Slicer module, or nothing."""

    def __init__(self, mode: str):
        self.mode = "none" if mode == "bar" and not sys.stderr.isatty() else mode
        self.last = None

    def __call__(self, stage: str, fraction: float) -> None:
        if self.mode == "json":
            print(json.dumps({"stage": stage, "fraction": round(float(fraction), 4), "message": f"{stage} {fraction:.0%}"}),
                  file=sys.stderr, flush=True)
        elif self.mode == "bar" and (stage, int(fraction * 40)) != self.last:
            self.last = (stage, int(fraction * 40))
            bar = "#" * int(fraction * 30)
            print(f"\r{stage:<22}[{bar:<30}] {fraction:4.0%}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.mode == "bar":
            print(file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
