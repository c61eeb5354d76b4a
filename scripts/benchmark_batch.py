"""Benchmark: cohort throughput of `livertumorseg batch` (studies per hour) on a local Dask cluster.

    .venv/bin/python scripts/benchmark_batch.py [--count N] [--size small|full] [--workers 1 2]
                                                [--threads-per-worker T] [--bundle DIR]

Writes N synthetic phantoms (`livertumorseg phantom` layout) to a temporary folder, then runs the batch
command on all of them once per worker count, each time into a fresh cohort folder, and prints the wall time
(cluster start included) and the studies per hour. Run it on an otherwise idle machine.
"""

import argparse
import contextlib
import csv
import io
import tempfile
import time
from pathlib import Path

from LiverTumorSegLib.cli import main as livertumorseg
from LiverTumorSegLib.phantoms import write_phantom_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=8, help="phantoms in the cohort (default 8)")
    parser.add_argument("--size", choices=("small", "full"), default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--bundle", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="benchmark-batch-") as folder:
        folder = Path(folder)
        started = time.perf_counter()
        volumes = write_phantom_dataset(folder / "phantoms", args.count, size=args.size, seed=args.seed)
        print(f"{args.count} {args.size} phantoms (seed {args.seed}) written in {time.perf_counter() - started:.0f} s; "
              f"{args.threads_per_worker} ONNX Runtime thread(s) per worker")
        print(f"{'workers':>8}{'wall s':>10}{'studies/hour':>14}{'mean segment s':>16}")
        for workers in args.workers:
            out = folder / f"cohort-{workers}"
            command = ["batch", *map(str, volumes), "-o", str(out), "--workers", str(workers),
                       "--threads-per-worker", str(args.threads_per_worker), "--progress", "none"]
            if args.bundle:
                command += ["--bundle", args.bundle]
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                code = livertumorseg(command)
            wall = time.perf_counter() - started
            with open(out / "cohort.csv", encoding="utf-8", newline="") as stream:
                rows = list(csv.DictReader(stream))
            if code != 0 or len(rows) != args.count:
                failures = (out / "failures.csv").read_text(encoding="utf-8")
                raise SystemExit(f"the batch run with {workers} worker(s) failed (exit code {code}):\n{failures}")
            mean = sum(float(row["segment_s"]) for row in rows) / len(rows)
            print(f"{workers:>8}{wall:>10.1f}{args.count / wall * 3600:>14.0f}{mean:>16.1f}")


if __name__ == "__main__":
    main()
