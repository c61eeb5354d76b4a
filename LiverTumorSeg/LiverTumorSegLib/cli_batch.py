"""The ``livertumorseg batch`` command: a cohort on Dask (the optional extra ``livertumorseg[batch]``).

:mod:`.batch` (and the Dask it needs) is imported only when the command runs, so the rest of the command
line and the Slicer module never load it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli import EXIT_CODES, _bundle_path
from .errors import UsageError


def add_command(commands) -> None:
    """Add ``batch`` to the subparsers ``commands``."""
    batch = commands.add_parser(
        "batch", help="segment a cohort of studies on a Dask cluster, resumably", epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Segment each study (one Dask task each) into OUTDIR/<study id>/ as 'segment' does, with "
        "cohort.csv, lesions.csv and failures.csv in OUTDIR; a re-run does only the studies not yet done. Needs "
        "Dask: pip install 'livertumorseg[batch]'. Exit code 0 when every study succeeded.",
    )
    batch.add_argument("inputs", type=Path, nargs="*", metavar="INPUT", help="CT files or DICOM series folders")
    batch.add_argument("--list", type=Path, metavar="CSV", help="cohort CSV instead of INPUTs: columns input "
                       "(relative to the CSV's folder), optional id (the study's folder name) and series (UID)")
    batch.add_argument("-o", "--output", type=Path, required=True, help="cohort folder (new, or of an earlier batch run)")
    batch.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler, e.g. tcp://host:8786 "
                       "(default: a local cluster); its workers must see the inputs and OUTDIR")
    batch.add_argument("--workers", type=int, metavar="N", help="worker processes of the local cluster, one study at a time "
                       "each (default: CPU cores / threads per worker)")
    batch.add_argument("--threads-per-worker", type=int, default=1, metavar="T",
                       help="ONNX Runtime threads of each study (default 1)")
    batch.add_argument("--bundle", type=Path, default=None, help="model bundle folder (default: the bundled model)")
    batch.add_argument("--model", metavar="NAME", default=None, help="a bundled or installed model by name; not with --bundle")
    batch.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                       help="progress on stderr: a bar with the ETA, one JSON object per line, or nothing")
    batch.set_defaults(run=_batch)


def _batch(args) -> int:
    from .batch import read_cohort_list, run_batch, studies_from_paths

    if bool(args.inputs) == bool(args.list):
        raise UsageError("Give the studies either as INPUT paths or as --list CSV, one of the two.")
    studies = read_cohort_list(args.list) if args.list else studies_from_paths(args.inputs)
    return run_batch(studies, args.output, bundle_path=_bundle_path(args), scheduler=args.scheduler,
                     workers=args.workers, threads=args.threads_per_worker, progress=args.progress,
                     sources=[args.list] if args.list else [])
