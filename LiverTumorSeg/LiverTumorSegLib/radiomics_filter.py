"""Radiomics false-positive filter (paper §3.3.2): candidate lesions → 728 radiomic features → random forest.

Every lesion (26-connected component of the tumour label, :func:`.masks.label_lesions`) is a candidate.
For each one the classifier's selected features (about 20 of the 728 of :mod:`.radiomics_catalogue`,
computed by :mod:`.radiomics_features`) are computed, the random forest (ONNX, exported by the training
package with skl2onnx) gives the probability that it is a true tumour, and candidates below ``τ_rf``
are relabelled liver.

Parallelism over candidates (``filter_lesions(threads=…)``): pyradiomics' C extensions and scipy's
filters hold the GIL, so threads overlap only the numpy parts, while worker processes scale with the
cores but cost a start-up (a fork server that imports pyradiomics once per host process). Measured with
``scripts/benchmark_radiomics.py`` (30 candidates of 3–40 mm, 20 features) on a shared 2-core machine:
one process 1.6–2.1 s per volume, two threads 1.5–1.7 s, two worker processes 3.1 s on first use and
1.0–2.3 s after. So "auto" uses threads for two workers (a single volume per run is the common case)
and processes from three on, and threads wherever this Python cannot start a plain Python worker
(inside the Slicer application, whose executable is Slicer itself).
"""

from __future__ import annotations

import json
import logging
import math
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

import numpy as np
from scipy import ndimage

from .errors import BundleError, Cancelled
from .masks import grow_box, label_lesions
from .radiomics_catalogue import (
    KNOWN_NAMES,
    MARGIN_VOXELS,
    feature_settings,
    import_pyradiomics,
    major_version,
    pyradiomics_version,
)
from .radiomics_features import extract_features

log = logging.getLogger("LiverTumorSeg")

STAGE = "radiomics filter"
COMPONENT = "lesion_classifier"

Progress = Callable[[str, float], None]


# ------------------------------------------------------------------------------------------ classifier


class LesionClassifier:
    """The trained random forest (ONNX) with its selected features, standardisation and threshold τ_rf."""

    def __init__(self, session, meta: dict):
        self.session = session
        self.meta = meta
        try:
            self.feature_names: list[str] = [str(name) for name in meta["feature_names"]]
            self.tau: float = float(meta["tau_rf"])
            self.mean = np.asarray(meta["mean"], dtype=np.float64)
            self.std = np.asarray(meta["std"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as error:
            raise BundleError(f"The lesion classifier's feature file is incomplete ({error!r}); export it again.") from None
        unknown = [name for name in self.feature_names if name not in KNOWN_NAMES]
        if unknown:
            raise BundleError(f"The lesion classifier uses features this LiverTumorSeg does not know: {', '.join(unknown[:5])}.")
        if not (len(self.mean) == len(self.std) == len(self.feature_names)):
            raise BundleError("The lesion classifier's standardisation does not match its feature list; export it again.")
        trained_with = str(meta.get("pyradiomics_version") or "")
        if trained_with and major_version(trained_with) != major_version(pyradiomics_version()):
            raise BundleError(
                f"The lesion classifier was trained with pyradiomics {trained_with}, but pyradiomics "
                f"{pyradiomics_version()} is installed; features of another major version differ. Install pyradiomics "
                f"{major_version(trained_with)}.x, retrain the classifier, or switch the radiomics filter off."
            )
        settings = meta.get("settings")
        if settings != json.loads(json.dumps(feature_settings())):
            raise BundleError(
                "The lesion classifier was trained with other radiomic feature settings than this LiverTumorSeg "
                "computes; retrain it with this version (livertumorseg-train), or switch the radiomics filter off."
            )
        self._input = session.get_inputs()[0].name
        outputs = [o.name for o in session.get_outputs()]
        self._output = "probabilities" if "probabilities" in outputs else outputs[-1]

    @classmethod
    def from_bundle(cls, bundle, *, threads: int | None = None) -> "LesionClassifier":
        entry = bundle.component(COMPONENT)
        features_file = entry.get("features_file")
        if not features_file or features_file not in bundle.manifest.get("files", {}):
            raise BundleError(f"Bundle '{bundle.path}': the lesion classifier's feature file is missing from the manifest.")
        import_pyradiomics()  # fail before any work when pyradiomics is missing
        try:
            meta = json.loads((bundle.path / features_file).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BundleError(f"Bundle '{bundle.path}': '{features_file}' is not valid JSON ({error}).") from None
        return cls(bundle.session(COMPONENT, threads=threads or 1), meta)

    @classmethod
    def from_files(cls, onnx_path, json_path, *, threads: int | None = 1) -> "LesionClassifier":
        """Load from an ONNX file and its JSON (training and tests; the pipeline uses :meth:`from_bundle`)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        meta = json.loads(open(json_path, encoding="utf-8").read())
        return cls(ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"]), meta)

    def standardise(self, features: list[dict]) -> np.ndarray:
        """(N, n_features) float32: (x − mean) / std; non-finite values become 0 (the training mean)."""
        x = np.array([[f.get(name, math.nan) for name in self.feature_names] for f in features], dtype=np.float64)
        x = x.reshape(len(features), len(self.feature_names))
        z = (x - self.mean) / self.std
        z[~np.isfinite(z)] = 0.0
        return z.astype(np.float32)

    def predict(self, features: list[dict]) -> np.ndarray:
        """Probability of a true tumour for each feature dict."""
        if not features:
            return np.zeros(0, np.float64)
        x = self.standardise(features)
        probabilities = self.session.run([self._output], {self._input: x})[0]
        return np.asarray(probabilities, dtype=np.float64)[:, 1]


def _candidate_task(args):
    hu, mask, spacing, names = args
    return extract_features(hu, mask, spacing, only=names)


def filter_lesions(
    hu: np.ndarray,
    labels: np.ndarray,
    spacing_xyz: tuple,
    classifier: LesionClassifier,
    *,
    threads: int = 1,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    executor: str = "auto",
) -> tuple[np.ndarray, dict[int, float], dict]:
    """Drop candidate lesions the classifier rejects (probability < τ_rf): they become liver (1).

    Returns the new label map, ``{lesion id → probability}`` for the kept candidates (the input's lesion ids,
    :func:`.masks.label_lesions`) and an info dict.
    ``executor``: "serial", "thread", "process" or "auto" (one worker: serial; two: threads; more:
    processes — see the module notes).
    """
    started = time.perf_counter()

    def check_cancel():
        if cancel is not None and cancel():
            raise Cancelled("Radiomics filtering was cancelled; nothing was written.")

    check_cancel()
    if progress:
        progress(STAGE, 0.0)
    components, count = label_lesions(labels == 2)
    boxes = ndimage.find_objects(components)
    names = classifier.feature_names
    tasks = []
    for index, box in enumerate(boxes, start=1):
        crop = grow_box(box, MARGIN_VOXELS, labels.shape)
        tasks.append((np.ascontiguousarray(hu[crop]), components[crop] == index, tuple(spacing_xyz), names))
    features: list[dict | None] = [None] * count
    workers = max(1, min(int(threads or 1), count))
    if executor not in ("auto", "serial", "thread", "process"):
        raise ValueError(f"executor must be 'auto', 'serial', 'thread' or 'process', not {executor!r}")
    kind = executor if executor != "auto" else ("serial" if workers == 1 else "thread" if workers == 2 else "process")
    if kind == "process" and not _python_workers_possible():
        kind = "thread"
    t0 = time.perf_counter()
    if workers == 1 or kind == "serial":
        kind, workers = "serial", 1
        for i, task in enumerate(tasks):
            check_cancel()
            features[i] = _candidate_task(task)
            if progress:
                progress(STAGE, 0.9 * (i + 1) / count)
    else:
        pool_class = ProcessPoolExecutor if kind == "process" else ThreadPoolExecutor
        pool = pool_class(max_workers=workers, **({"mp_context": _mp_context()} if kind == "process" else {}))
        done_count = 0
        try:
            # Largest candidates first, so that one big lesion does not finish last on its own.
            order = sorted(range(count), key=lambda i: -int(tasks[i][1].sum()))
            pending = {pool.submit(_candidate_task, tasks[i]): i for i in order}
            while pending:
                check_cancel()
                done, _ = wait(list(pending), timeout=0.2, return_when=FIRST_COMPLETED)
                for future in done:
                    features[pending.pop(future)] = future.result()
                    done_count += 1
                    if progress:
                        progress(STAGE, 0.9 * done_count / count)
        except BrokenProcessPool as error:
            # Worker processes could not start (e.g. a host whose main module cannot be re-imported):
            # finish in this process rather than fail the segmentation.
            log.warning("Radiomics worker processes failed (%s); continuing in one process.", error)
            kind = "serial (worker processes failed)"
            for i in range(count):
                if features[i] is None:
                    check_cancel()
                    features[i] = _candidate_task(tasks[i])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    extract_s = time.perf_counter() - t0
    check_cancel()
    probabilities = classifier.predict(features) if count else np.zeros(0)
    # A lesion whose selected features could not all be computed is kept: its probability would rest on
    # imputed training means, not on the lesion.
    failures = {i + 1: n for i, f in enumerate(features)
                if (n := sum(not math.isfinite(float(f.get(name, math.nan))) for name in names))}
    kept = {i + 1: float(p) for i, p in enumerate(probabilities) if p >= classifier.tau or i + 1 in failures}
    dropped = {i + 1: float(p) for i, p in enumerate(probabilities) if i + 1 not in kept}
    out = labels.copy()
    if dropped:
        out[np.isin(components, list(dropped))] = 1
    if progress:
        progress(STAGE, 1.0)
    info = {
        "candidates": int(count),
        "kept": len(kept),
        "dropped": len(dropped),
        "dropped_probabilities": dropped,
        "tau_rf": classifier.tau,
        "features": len(names),
        "feature_failures": failures,  # lesion id → number of selected features that could not be computed
        "kept_despite_failed_features": sorted(i for i in failures if probabilities[i - 1] < classifier.tau),
        "executor": kind,
        "workers": workers,
        "timings_s": {"features": round(extract_s, 3), "total": round(time.perf_counter() - started, 3)},
    }
    return out, kept, info


def _python_workers_possible() -> bool:
    """Worker processes re-run ``sys.executable``; inside an application that embeds Python (Slicer) that
    is the application, not a Python interpreter."""
    import sys
    from pathlib import Path

    return "python" in Path(sys.executable or "").name.lower()


def _mp_context():
    """Worker processes come from a fork server that has imported this module and pyradiomics once, so a
    pool starts in milliseconds after the first; "spawn" would re-import everything for every pool (and
    the host application's main module), and forking the caller is unsafe in a process that holds
    ONNX Runtime threads."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "radiomics", "radiomics.glcm", "radiomics.glrlm", "radiomics.firstorder"])
    return context
