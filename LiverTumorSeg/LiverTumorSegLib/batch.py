"""Cohort processing on Dask (``livertumorseg batch``): many studies, one task each, resumable.

Each study (a CT file or DICOM series folder) is one ``dask.distributed`` task that runs
:func:`.pipeline.segment_input`, exactly what ``livertumorseg segment`` runs, and writes ``OUTDIR/<study id>/``
atomically. Its ``run.json`` records the study's fingerprint (the input's path, size and modification time,
and the model's name and manifest digest); a later run skips every study whose fingerprint still matches, so
a re-run after an interruption does only what is missing, and failed studies are tried again. A study that
fails is recorded in ``failures.csv`` and stops nothing else. The output folder and its tables:
:mod:`.cohort_output`.

Workers: a ``LocalCluster`` by default (``--workers`` processes, one study at a time each), or any running
scheduler by address. Each study uses ``--threads-per-worker`` ONNX Runtime intra-op threads and asks the
scheduler for its memory as the ``MEMORY`` resource, estimated from the image size, wherever the workers
declare that resource (local workers do: their share of this machine's memory).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import sys
import time
import unicodedata
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path

from .cohort_output import (COHORT_CSV, FAILURES_CSV, RESERVED_NAMES, CohortTables, check_batch_folder,
                            finished_outputs, mark_batch_folder)
from .errors import BundleError, Cancelled, DeviceError, LiverTumorSegError, UsageError
from .image_io import IMAGE_SUFFIXES

log = logging.getLogger("LiverTumorSeg")

#: The Dask resource through which studies ask for memory (bytes) and workers offer it.
MEMORY = "MEMORY"
#: Memory estimate of one study, beyond the idle worker: ONNX Runtime sessions and buffers, plus bytes per
#: input voxel (the image, its canonical copy, label maps) and per processing voxel (the 1 mm in-plane grid:
#: resampled volume, network inputs, probabilities). Deliberately generous: small phantoms peaked at about
#: 190 MB plus 5 bytes per processing voxel above the idle process (resource.getrusage); full-size scans are
#: measured by scripts/benchmark_pipeline.py.
BASE_BYTES, BYTES_PER_INPUT_VOXEL, BYTES_PER_PROCESSING_VOXEL = 512 * 2**20, 24, 16
INSTALL_HINT = "pip install 'livertumorseg[batch]'"

_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
_VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_RESERVED_IDS = {name.casefold() for name in RESERVED_NAMES}


@dataclass(frozen=True)
class Study:
    id: str  # names its folder in the output: OUTDIR/<id>/
    path: Path  # a CT file or a DICOM series folder
    series: str | None = None  # SeriesInstanceUID, for a folder with several series


# --------------------------------------------------------------------------------------------- the cohort


def studies_from_paths(paths) -> list[Study]:
    """Studies of the inputs given on the command line, their ids derived from the file or folder names."""
    return _with_ids([(Path(path), None, None) for path in paths])


def read_cohort_list(csv_path: str | os.PathLike) -> list[Study]:
    """Studies of a cohort CSV: column ``input`` (a file or DICOM folder; relative paths are relative to the
    CSV's folder), optional ``id`` (the study's folder name) and ``series`` (a SeriesInstanceUID)."""
    csv_path = Path(csv_path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "it is not UTF-8 text"
        raise UsageError(f"Cannot read the cohort list '{csv_path}' ({reason}). Give a CSV file whose first line "
                         "names its columns: input, and optionally id and series.") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = [(name or "").strip().lower() for name in reader.fieldnames or []]
    if "input" not in columns:
        raise UsageError(f"The cohort list '{csv_path}' has no 'input' column (its first line is "
                         f"{','.join(columns) or 'empty'}). Name the columns on the first line: input, and "
                         "optionally id and series.")
    entries = []
    for row in reader:
        cells = {(name or "").strip().lower(): (value or "").strip() for name, value in row.items()
                 if isinstance(value, str)}
        if not any(cells.values()):
            continue
        if not cells.get("input"):
            raise UsageError(f"The cohort list '{csv_path}', line {reader.line_num}: the input cell is empty. "
                             "Give a file or DICOM folder on every line.")
        path = Path(cells["input"]).expanduser()
        entries.append((path if path.is_absolute() else csv_path.parent / path,
                        cells.get("id") or None, cells.get("series") or None))
    if not entries:
        raise UsageError(f"The cohort list '{csv_path}' lists no studies. Add one line per study under the header.")
    return _with_ids(entries)


def derived_id(path: Path) -> str:
    """A filesystem-safe study id from a file's name without its image suffix, or a folder's name."""
    name = Path(os.path.abspath(path)).name
    suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), "")
    name = name[: len(name) - len(suffix)]
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    study_id = _UNSAFE_CHARACTERS.sub("_", ascii_name).strip("._-")[:100] or "study"
    return study_id + "_" if study_id.casefold() in _RESERVED_IDS else study_id


def _with_ids(entries: list[tuple[Path, str | None, str | None]]) -> list[Study]:
    """Studies with unique ids. A given id is checked; derived ids that collide (ignoring case, as some file
    systems do) all get a suffix from their own path, so an id does not depend on the order of the inputs."""
    seen_inputs, given = {}, {}
    for path, study_id, series in entries:
        key = (os.path.realpath(path), series)
        if key in seen_inputs:
            raise UsageError(f"The input '{path}'{f' (series {series})' if series else ''} is listed twice. "
                             "List each study once.")
        seen_inputs[key] = path
        if study_id is None:
            continue
        if not _VALID_ID.fullmatch(study_id) or study_id.casefold() in _RESERVED_IDS:
            raise UsageError(f"The study id '{study_id}' cannot name a folder: use up to 100 letters, digits, '.', "
                             "'-' and '_', starting with a letter or digit, and not a table's name.")
        if study_id.casefold() in given:
            raise UsageError(f"The study id '{study_id}' is given to '{given[study_id.casefold()]}' and '{path}' "
                             "(ids are compared ignoring case). Give each study its own id.")
        given[study_id.casefold()] = path
    derived = [derived_id(path) if study_id is None else None for path, study_id, _ in entries]
    counts: dict[str, int] = {}
    for candidate in filter(None, derived):
        counts[candidate.casefold()] = counts.get(candidate.casefold(), 0) + 1
    studies = []
    for (path, study_id, series), candidate in zip(entries, derived):
        if candidate is not None:
            study_id = candidate
            if counts[candidate.casefold()] > 1 or candidate.casefold() in given:
                key = f"{os.path.realpath(path)}\n{series or ''}"
                study_id = f"{candidate}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
        studies.append(Study(study_id, path, series))
    return studies


# ----------------------------------------------------------------------------- fingerprints and memory


def input_fingerprint(study: Study) -> dict:
    """What identifies a study's input: resolved path, series, size and modification time (a DICOM folder:
    its files' count, total size and latest modification)."""
    path = Path(os.path.realpath(study.path))
    record: dict = {"path": str(path), "series": study.series}
    try:
        if path.is_dir():
            stats = [entry.stat() for entry in os.scandir(path) if entry.is_file()]
            record.update(files=len(stats), bytes=sum(s.st_size for s in stats),
                          mtime_ns=max((s.st_mtime_ns for s in stats), default=0))
        else:
            stat = path.stat()
            record.update(bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
    except OSError:
        record["unreadable"] = True  # the worker's read reports what is wrong
    return record


def model_identity(bundle) -> dict:
    """The model's name and version, and a digest of its manifest (which holds every file's checksum)."""
    digest = hashlib.sha256(json.dumps(bundle.manifest, sort_keys=True).encode("utf-8")).hexdigest()
    return {"name": bundle.name, "manifest_sha256": digest}


def memory_estimate(path: Path) -> int:
    """Bytes one study of this image needs, from its header (a DICOM folder: 2 bytes per voxel on disk)."""
    import SimpleITK as sitk

    path = Path(path)
    voxels, in_plane_mm2 = 0, 1.0
    try:
        if path.is_dir():
            voxels = sum(entry.stat().st_size for entry in os.scandir(path) if entry.is_file()) // 2
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size, spacing = reader.GetSize(), reader.GetSpacing()
            voxels = int(size[0]) * int(size[1]) * int(size[2] if len(size) > 2 else 1)
            in_plane_mm2 = float(spacing[0] * spacing[1])
    except (OSError, RuntimeError):
        pass  # unreadable: the worker's read reports it
    return int(BASE_BYTES + voxels * (BYTES_PER_INPUT_VOXEL + BYTES_PER_PROCESSING_VOXEL * in_plane_mm2))


def memory_request(estimate: int, worker_memory: list[float]) -> dict:
    """The Dask resources of one study: its memory estimate, capped at the largest worker's offer (it then
    runs alone there); none when no worker offers memory (the scheduler could never place the task)."""
    if not worker_memory:
        return {}
    return {MEMORY: min(float(estimate), max(worker_memory))}


# ------------------------------------------------------------------------------------- on a worker


@lru_cache(maxsize=4)
def _worker_bundle(path: str | None):
    from .bundle import load_bundle

    return load_bundle(path)


def segment_study(study: Study, out_dir: str, bundle_path: str | None, fingerprint: dict, threads: int) -> dict:
    """The Dask task of one study: segment it into ``out_dir/<id>/`` and return its volumetry and run details,
    or its error (a failure is a result, so that it stops no other study)."""
    from .dicom_seg import find_source_series
    from .pipeline import PipelineOptions, segment_input

    try:
        bundle = _worker_bundle(bundle_path)
        if model_identity(bundle) != fingerprint["model"]:
            raise BundleError(f"This worker's model is {bundle.name} at '{bundle.path}', not the "
                              f"{fingerprint['model']['name']} the run was started with. Install the same "
                              "livertumorseg on every worker, or give --bundle a folder every worker can read.")
        batch = {"study_id": study.id, "fingerprint": fingerprint,
                 "processed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        # As `segment` does, a DICOM series folder also gets a DICOM SEG of its series.
        source = find_source_series(study.path, study.series) if Path(study.path).is_dir() else None
        result, _ = segment_input(study.path, bundle, PipelineOptions(threads=threads), Path(out_dir) / study.id,
                                  series=source.series_uid if source else study.series, dicom_source=source,
                                  overwrite=True, details={"batch": batch})
    except LiverTumorSegError as error:
        return {"failed": type(error).__name__, "exit_code": error.exit_code, "message": str(error)}
    except Exception as error:  # noqa: BLE001 - any other problem fails this study only, and is reported
        log.exception("Study %s failed unexpectedly", study.id)
        return {"failed": type(error).__name__, "exit_code": 1, "message": f"unexpected problem: {error}"}
    return {"volumetry": result.volumetry, "details": result.details}


# ------------------------------------------------------------------------------------- the run


def run_batch(studies: list[Study], out_dir: str | os.PathLike, *, bundle_path=None, scheduler: str | None = None,
              workers: int | None = None, threads: int = 1, progress: str = "bar", sources=()) -> int:
    """Segment every study not yet done into ``out_dir``; return the exit code (0 when none failed, else the
    failures' exit code when they share one, else 1).

    ``sources`` are further files the run reads (the cohort list): like the inputs, never overwritten.
    """
    from .bundle import load_bundle

    if threads < 1 or (workers is not None and workers < 1):
        raise UsageError("--threads-per-worker and --workers must be at least 1.")
    if scheduler and workers is not None:
        raise UsageError("--workers starts a local cluster, but --scheduler names an existing one with its own "
                         "workers. Leave out one of them.")
    distributed = _import_distributed()
    out_dir = Path(out_dir)
    check_batch_folder(out_dir, [study.path for study in studies] + [Path(s) for s in sources])
    model = model_identity(load_bundle(bundle_path))
    tables = CohortTables([study.id for study in studies], out_dir)
    todo = []
    for study in studies:
        fingerprint = {"input": input_fingerprint(study), "model": model}
        finished = finished_outputs(out_dir / study.id, fingerprint)
        if finished:
            tables.add_finished(study.id, str(study.path), *finished)
        else:
            todo.append((study, fingerprint))
    # Connect first: a cluster that cannot start or be reached leaves nothing behind.
    with _dask_client(distributed, scheduler, workers, threads) if todo else nullcontext() as client:
        mark_batch_folder(out_dir)
        tables.write()
        reporter = BatchProgress(progress, total=len(studies), up_to_date=len(studies) - len(todo))
        try:
            if client is not None:
                reporter.dashboard(_dashboard_link(client))
                _process(client, distributed, todo, out_dir, bundle_path, threads, tables, reporter)
        except (KeyboardInterrupt, Cancelled):
            raise Cancelled(f"Cancelled: the {len(tables.finished)} finished studies are kept in '{out_dir}' and its "
                            "tables; run the same command again to process the rest.") from None
        finally:
            reporter.close()
    failed = list(tables.failed.values())
    print(f"{len(tables.finished)} of {len(studies)} studies done ({len(todo) - len(failed)} new, "
          f"{len(studies) - len(todo)} up to date), {len(failed)} failed"
          + (f": see {out_dir / FAILURES_CSV}" if failed else ""))
    print(f"cohort table: {out_dir / COHORT_CSV}")
    codes = {row["exit_code"] for row in failed}
    return 0 if not codes else codes.pop() if len(codes) == 1 else 1


def _process(client, distributed, todo, out_dir, bundle_path, threads, tables, reporter) -> None:
    """Submit the studies, then record each one as it finishes and rewrite the tables."""
    offers = [info.get("resources", {}).get(MEMORY) for info in client.scheduler_info()["workers"].values()]
    offers = [offer for offer in offers if offer]
    if not offers:
        log.warning("The Dask workers declare no %s resource, so the scheduler cannot keep studies from sharing a "
                    "worker's memory. Start them with 'dask worker ADDRESS --resources %s=BYTES'.", MEMORY, MEMORY)
    bundle_arg = None if bundle_path is None else os.path.realpath(bundle_path)
    futures = {}
    for study, fingerprint in todo:
        estimate = memory_estimate(study.path)
        future = client.submit(segment_study, study, os.path.realpath(out_dir), bundle_arg, fingerprint, threads,
                               key=f"segment-{study.id}-{uuid.uuid4().hex[:8]}",
                               resources=memory_request(estimate, offers) or None, pure=False)
        futures[future] = (study, estimate)
    for future in distributed.as_completed(futures):
        study, estimate = futures.pop(future)
        outcome = future.result() if future.status == "finished" else _lost_task(future, estimate)
        if "failed" in outcome:
            tables.add_failed(study.id, str(study.path), outcome["failed"], outcome["exit_code"], outcome["message"])
            reporter.study(study.id, f"FAILED  {study.id}: {outcome['message']}", failed=True)
        else:
            row = tables.add_finished(study.id, str(study.path), outcome["volumetry"], outcome["details"])
            reporter.study(study.id, f"done    {study.id}: liver {row['liver_volume_ml']:.1f} mL, "
                           f"{row['lesion_count']} tumour(s), burden {row['tumour_burden_percent']:.2f} % "
                           f"({row['segment_s']:.1f} s)" + ("; warnings in cohort.csv" if row["warnings"] else ""),
                           failed=False)
        tables.write()


def _lost_task(future, estimate: int) -> dict:
    """The failure record of a task that returned nothing: its worker died, or the scheduler lost it."""
    error = future.exception() if future.status == "error" else None
    message = f"{type(error).__name__}: {error}" if error else f"the task was {future.status}"
    return {"failed": type(error).__name__ if error else "LostTask", "exit_code": 1,
            "message": f"{message}. The worker running it may have run out of memory (this study needs about "
                       f"{estimate / 2**30:.1f} GiB): run with fewer --workers, or on workers with more memory."}


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise DeviceError(f"The batch command runs on Dask, which is not installed here. Install it with: "
                          f"{INSTALL_HINT}") from None
    return distributed


@contextmanager
def _dask_client(distributed, scheduler: str | None, workers: int | None, threads: int):
    """A client of the scheduler at ``scheduler``, or of a new local cluster of ``workers`` processes (default:
    as many as this process's CPU cores hold ``threads`` each)."""
    # Dask logs every connection at INFO through the command's warning handler; its warnings still show.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if scheduler:
        try:
            client = distributed.Client(scheduler)  # waits up to Dask's distributed.comm.timeouts.connect
        except (OSError, TimeoutError, ValueError) as error:
            raise DeviceError(f"Cannot reach the Dask scheduler at '{scheduler}' ({error}). Check the address "
                              "(e.g. tcp://host:8786) and that the scheduler runs, or leave out --scheduler to use "
                              "a local cluster.") from None
        with client:
            yield client
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    count = workers or max(1, cores // threads)
    memory = distributed.system.MEMORY_LIMIT // count  # the share of this machine's memory each worker may use
    # One Dask thread per worker: a worker runs one study at a time, with --threads-per-worker ONNX threads.
    with distributed.LocalCluster(n_workers=count, threads_per_worker=1, memory_limit=memory,
                                  resources={MEMORY: memory}, dashboard_address=":0") as cluster:
        with distributed.Client(cluster) as client:
            yield client


def _dashboard_link(client) -> str | None:
    return client.dashboard_link if "dashboard" in client.scheduler_info().get("services", {}) else None


class BatchProgress:
    """Progress of a cohort on stderr: a bar with done, failed, remaining and the ETA; one JSON object per line
    (the ``stage``, ``fraction`` and ``message`` of ``segment --progress json``, plus the counts); or nothing.
    Each study that finishes also prints one line on stdout."""

    def __init__(self, mode: str, *, total: int, up_to_date: int):
        self.mode = "none" if mode == "bar" and not sys.stderr.isatty() else mode
        self.total, self.up_to_date, self.done, self.failed = total, up_to_date, up_to_date, 0
        self.started = time.monotonic()
        self._show()

    def dashboard(self, link: str | None) -> None:
        if link:
            self._print(f"Dask dashboard: {link}")
            self._show(dashboard=link)

    def study(self, study_id: str, line: str, *, failed: bool) -> None:
        self.failed += failed
        self.done += not failed
        self._print(line)
        self._show(study=study_id, status="failed" if failed else "done")

    def close(self) -> None:
        if self.mode == "bar":
            print(file=sys.stderr, flush=True)

    def _print(self, line: str) -> None:
        if self.mode == "bar":
            print("\r\033[K", end="", file=sys.stderr, flush=True)  # clear the bar; it is drawn again below
        print(line, flush=True)

    def _show(self, **extra) -> None:
        remaining = self.total - self.done - self.failed
        processed = self.done + self.failed - self.up_to_date
        eta = (time.monotonic() - self.started) / processed * remaining if processed else None
        message = f"{self.done}/{self.total} done, {self.failed} failed, {remaining} remaining" + (
            f", ETA {timedelta(seconds=round(eta))}" if eta is not None else "")
        fraction = (self.total - remaining) / max(self.total, 1)
        if self.mode == "json":
            print(json.dumps({"stage": "batch", "fraction": round(fraction, 4), "message": message, "done": self.done,
                              "failed": self.failed, "remaining": remaining,
                              "eta_s": None if eta is None else round(eta, 1), **extra}), file=sys.stderr, flush=True)
        elif self.mode == "bar":
            print(f"\rbatch [{'#' * int(fraction * 30):<30}] {message}", end="", file=sys.stderr, flush=True)
