"""The output folder of a cohort run (``livertumorseg batch``): its checks, its finished studies, its tables.

``OUTDIR/<study id>/`` holds each study's outputs, as ``livertumorseg segment`` writes them; ``batch.json``
marks the folder as a cohort run that a later run may add to (one run at a time per folder).

Tables: ``cohort.csv`` has one row per finished study (:data:`COHORT_COLUMNS`), ``lesions.csv`` one row per
lesion with the columns of each study's ``volumetry.csv`` (:data:`LESION_COLUMNS`), and ``failures.csv`` one
row per study that failed (:data:`FAILURE_COLUMNS`), all for the studies of the current run. Rows follow the
order of the cohort's inputs, not the order in which studies finish. Every file is replaced atomically each time a study finishes, so a run that is
killed leaves complete tables of what was finished. When ``pyarrow`` is importable, ``cohort.parquet`` and
``lesions.parquet`` hold the same rows with typed columns (read back from the CSV files, so both agree).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

from . import __version__
from .errors import OutputError
from .image_io import atomic_path
from .output_folder import PRODUCER, RUN_JSON, VOLUMETRY_JSON
from .volumetry import CSV_COLUMNS, volumetry_csv

#: Marks an output folder as a cohort run of livertumorseg.
BATCH_JSON = "batch.json"

COHORT_CSV, LESIONS_CSV, FAILURES_CSV = "cohort.csv", "lesions.csv", "failures.csv"
PARQUET_OF = {COHORT_CSV: "cohort.parquet", LESIONS_CSV: "lesions.parquet"}
#: Names in the output folder that are not study folders.
RESERVED_NAMES = frozenset({COHORT_CSV, LESIONS_CSV, FAILURES_CSV, *PARQUET_OF.values(), BATCH_JSON})

COHORT_COLUMNS = (
    "study_id", "input", "liver_volume_ml", "tumour_volume_ml", "tumour_burden_percent", "lesion_count",
    "model", "engine_version", "segment_s", "processed_at", "warnings",
)
LESION_COLUMNS = ("study_id", *(name for name in CSV_COLUMNS if name != "structure"))
FAILURE_COLUMNS = ("study_id", "input", "error", "exit_code", "message")
#: Columns kept as text in Parquet (type inference would turn the study id "007" into the number 7).
TEXT_COLUMNS = ("study_id", "input", "model", "engine_version", "warnings")


def check_batch_folder(out_dir: Path, sources: list[Path]) -> None:
    """Refuse an output folder that is, contains or lies inside an input, or an existing folder that is not
    empty and not a cohort run of livertumorseg. (``output_folder.check_output_folder`` guards the folder of
    one study, which must not exist or be a study; a cohort folder holds study folders and grows.)"""
    target = Path(os.path.realpath(out_dir))
    for source in sources:
        resolved = Path(os.path.realpath(source))
        if target == resolved or resolved in target.parents or target in resolved.parents:
            raise OutputError(f"The output '{out_dir}' is, contains or lies inside the input '{source}'. Choose a "
                              "separate output folder.")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"The output '{out_dir}' is a file. Choose a folder.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        try:
            ours = json.loads((out_dir / BATCH_JSON).read_text(encoding="utf-8")).get("producer") == PRODUCER
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise OutputError(f"'{out_dir}' is not empty and not a cohort folder of livertumorseg (it has no "
                              f"{BATCH_JSON}). Choose a new or empty output folder.")


def mark_batch_folder(out_dir: Path) -> None:
    """Write the folder's marker, and remove the temporary folders a killed run left (``.NAME.*.partial``)."""
    if not (out_dir / BATCH_JSON).exists():
        with atomic_path(out_dir / BATCH_JSON) as tmp:
            tmp.write_text(json.dumps({"producer": PRODUCER, "engine_version": __version__}) + "\n", encoding="utf-8")
    for leftover in out_dir.glob(".*.partial"):
        shutil.rmtree(leftover, ignore_errors=True)


def finished_outputs(study_dir: Path, fingerprint: dict) -> tuple[dict, dict] | None:
    """(volumetry, run details) of a study folder whose run matches ``fingerprint``; None to run it."""
    try:
        details = json.loads((study_dir / RUN_JSON).read_text(encoding="utf-8"))
        if details.get("batch", {}).get("fingerprint") != fingerprint or details.get("producer") != PRODUCER:
            return None
        return json.loads((study_dir / VOLUMETRY_JSON).read_text(encoding="utf-8")), details
    except (OSError, ValueError, AttributeError):
        return None


def study_rows(study_id: str, source: str, volumetry: dict, details: dict) -> tuple[dict, list[dict]]:
    """The cohort row and the lesion rows of one segmented study, from its volumetry and run details."""
    row = {
        "study_id": study_id,
        "input": source,
        "liver_volume_ml": volumetry["liver_volume_ml"],
        "tumour_volume_ml": volumetry["tumour_volume_ml"],
        "tumour_burden_percent": volumetry["tumour_burden_percent"],
        "lesion_count": volumetry["lesion_count"],
        "model": details["bundle"],
        "engine_version": details["engine_version"],
        "segment_s": round(sum(details["timings_s"].values()), 3),
        "processed_at": details.get("batch", {}).get("processed_at", ""),
        "warnings": " | ".join(details.get("warnings", [])),
    }
    # The lesion rows are those of the study's own volumetry.csv, so both tables always agree.
    lesions = [
        {"study_id": study_id, **{name: value for name, value in line.items() if name != "structure"}}
        for line in csv.DictReader(io.StringIO(volumetry_csv(volumetry)))
        if line["structure"] == "lesion"
    ]
    return row, lesions


class CohortTables:
    """The rows of every study of a run, kept in the cohort's order, and their files in the output folder."""

    def __init__(self, study_ids: list[str], out_dir: Path):
        self.order = {study_id: index for index, study_id in enumerate(study_ids)}
        self.out_dir = Path(out_dir)
        self.finished: dict[str, tuple[dict, list[dict]]] = {}
        self.failed: dict[str, dict] = {}

    def add_finished(self, study_id: str, source: str, volumetry: dict, details: dict) -> dict:
        """Record a segmented study; return its cohort row."""
        self.failed.pop(study_id, None)
        self.finished[study_id] = study_rows(study_id, source, volumetry, details)
        return self.finished[study_id][0]

    def add_failed(self, study_id: str, source: str, error: str, exit_code: int, message: str) -> None:
        self.finished.pop(study_id, None)
        self.failed[study_id] = {"study_id": study_id, "input": source, "error": error, "exit_code": exit_code,
                                 "message": message}

    def write(self) -> None:
        """Replace every table file atomically with the rows recorded so far."""
        ordered = sorted(self.finished, key=self.order.__getitem__)
        tables = {
            COHORT_CSV: (COHORT_COLUMNS, [self.finished[key][0] for key in ordered]),
            LESIONS_CSV: (LESION_COLUMNS, [lesion for key in ordered for lesion in self.finished[key][1]]),
            FAILURES_CSV: (FAILURE_COLUMNS, [self.failed[key] for key in sorted(self.failed, key=self.order.__getitem__)]),
        }
        for name, (columns, rows) in tables.items():
            _write_csv(self.out_dir / name, columns, rows)
        _write_parquet(self.out_dir)


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


def _write_parquet(out_dir: Path) -> None:
    """Parquet copies of the cohort and lesion tables when pyarrow is importable; without it, none are left
    behind from an earlier run (they would no longer match the CSV files)."""
    try:
        import pyarrow
        import pyarrow.csv
        import pyarrow.parquet
    except ImportError:
        for name in PARQUET_OF.values():
            (out_dir / name).unlink(missing_ok=True)
        return
    text = pyarrow.csv.ConvertOptions(column_types={name: pyarrow.string() for name in TEXT_COLUMNS})
    for csv_name, parquet_name in PARQUET_OF.items():
        table = pyarrow.csv.read_csv(out_dir / csv_name, convert_options=text)
        with atomic_path(out_dir / parquet_name, overwrite=True) as tmp:
            pyarrow.parquet.write_table(table, tmp)
