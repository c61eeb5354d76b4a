"""The ``livertumorseg models`` and ``livertumorseg features`` commands: the model registry and radiomic features."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .cli import EXIT_CODES, _ProgressReporter
from .errors import UsageError


def add_commands(commands) -> None:
    """Add ``models`` (list, download, import, remove, path) and ``features`` to the subparsers ``commands``."""
    models = commands.add_parser(
        "models", help="list, download, import and remove model bundles", epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The bundled model, the models of the model index (the shipped one plus --index or "
        "$LIVERTUMORSEG_MODEL_INDEX) and the models installed in the per-user models folder "
        "($LIVERTUMORSEG_MODELS_DIR to choose another). 'segment --model NAME' runs one of them.",
    )
    actions = models.add_subparsers(title="actions", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="each model with its description, training data and licence")
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    listing.set_defaults(run=_models_list)
    download = actions.add_parser("download", help="download (resumable), verify and install a model of the index")
    download.add_argument("name")
    download.add_argument("--progress", choices=("bar", "json", "none"), default="bar", help="progress on stderr")
    download.set_defaults(run=_models_download)
    for action in (listing, download):
        action.add_argument("--index", metavar="PATH_OR_URL", default=None,
                            help="a further model index (e.g. a lab's own), listed beside the shipped one")
    importing = actions.add_parser("import", help="install a bundle zip (livertumorseg-train export --zip), offline")
    importing.add_argument("zip", type=Path)
    importing.add_argument("--overwrite", action="store_true", help="replace an installed model of the same name")
    importing.set_defaults(run=_models_import)
    remove = actions.add_parser("remove", help="delete an installed model (never the bundled one)")
    remove.add_argument("name")
    remove.set_defaults(run=_models_remove)
    where = actions.add_parser("path", help="print the models folder, or the folder of model NAME")
    where.add_argument("name", nargs="?")
    where.set_defaults(run=_models_path)

    features = commands.add_parser(
        "features", help="radiomic features of a masked region as JSON", epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compute the radiomics filter's 728 features (or the --only ones) of the region of MASK in "
        "IMAGE, on the image's voxel grid, and print them as JSON with the extraction time.",
    )
    features.add_argument("image", type=Path, nargs="?", help="CT image (file or DICOM series folder)")
    features.add_argument("mask", type=Path, nargs="?", help="mask or label map on the image's grid")
    features.add_argument("--label", type=int, default=None, help="mask value of the region (default: every nonzero voxel)")
    features.add_argument("--only", metavar="NAMES", default=None, help="comma-separated feature names")
    features.add_argument("--list", action="store_true", help="print the 728 feature names and exit")
    features.set_defaults(run=_features)


def _models_list(args) -> int:
    from .model_registry import describe, list_models

    models = list_models(index=args.index)
    print(json.dumps([model.as_dict() for model in models], indent=2) if args.json
          else "\n\n".join(describe(model) for model in models))
    return 0


def _models_download(args) -> int:
    from .model_registry import download_model

    reporter = _ProgressReporter(args.progress)
    path = download_model(args.name, index=args.index, progress=reporter)
    reporter.close()
    print(f"{args.name}: {path}")
    return 0


def _models_import(args) -> int:
    from .model_registry import install_zip

    print(f"installed: {install_zip(args.zip, overwrite=args.overwrite)}")
    return 0


def _models_remove(args) -> int:
    from .model_registry import remove_model

    print(f"removed: {remove_model(args.name)}")
    return 0


def _models_path(args) -> int:
    from .model_registry import models_dir, resolve_model

    print(resolve_model(args.name) if args.name else models_dir())
    return 0


def _features(args) -> int:
    import math

    import SimpleITK as sitk

    from .errors import InputError
    from .image_io import read_image
    from .radiomics_catalogue import FEATURE_NAMES
    from .radiomics_features import extract_features

    if args.list:
        print("\n".join(FEATURE_NAMES))
        return 0
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only is not None else None
    unknown = sorted(set(only or ()) - set(FEATURE_NAMES))
    if unknown or only == []:
        raise UsageError(f"Unknown feature name(s): {', '.join(unknown) or '(none given)'}. "
                         "'livertumorseg features --list' prints the 728 names (e.g. original_shape_VoxelVolume).")
    if args.image is None or args.mask is None:
        raise UsageError("features needs IMAGE and MASK (or --list to print the feature names).")
    image, mask = read_image(args.image), read_image(args.mask, kind="mask")
    region = (mask.array == args.label) if args.label is not None else (mask.array != 0)
    try:  # ITK compares size, spacing, origin and direction, with its own tolerance
        sitk.LabelStatisticsImageFilter().Execute(image.to_sitk(), mask.with_array(region.astype("uint8")).to_sitk())
    except RuntimeError:
        raise InputError(f"The mask '{args.mask}' does not lie on the grid of '{args.image}' (size, spacing, origin "
                         "or direction differ). Give a mask on the image's grid, e.g. a label map of that volume.") from None
    if not region.any():
        raise InputError(f"The mask '{args.mask}' has no voxel " + (f"with label {args.label}" if args.label is not None
                         else "that is nonzero") + ". Check --label (the label map's values).")
    started = time.perf_counter()
    values = extract_features(image.array, region, image.geometry.spacing, only=only)
    print(json.dumps({
        "image": str(args.image), "mask": str(args.mask), "label": args.label, "voxels": int(region.sum()),
        "extraction_time_s": round(time.perf_counter() - started, 3),
        "features": {name: (value if math.isfinite(value) else None) for name, value in values.items()},
    }, indent=2))
    return 0
