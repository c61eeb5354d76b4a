"""Segmenting and scoring the cases: the engine on every case with every run (in worker processes, one case
each), then the output folder written atomically."""

from __future__ import annotations

import logging
import os
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from LiverTumorSegLib.bundle import Bundle, load_bundle
from LiverTumorSegLib.errors import LiverTumorSegError, OutputError
from LiverTumorSegLib.image_io import Image, atomic_path, to_canonical
from LiverTumorSegLib.masks import label_lesions
from LiverTumorSegLib.metrics import evaluate_case

from ..datasets import Case, load_case
from .figures import write_figures
from .markdown import results_markdown
from .plan import EvaluationConfig, Run, plan_evaluation
from .tables import Report

#: Bundles a worker process has loaded, by path (each is loaded once per process).
_WORKER_BUNDLES: dict[str, Bundle] = {}


def perturb(image: Image, perturbation: tuple | None, *, seed: int, case_id: str) -> Image:
    """The CT with noise (``("noise", σ)``: HU + N(0, σ²)) or scaling (``("scale", s)``: s·HU), float32."""
    if perturbation is None:
        return image
    kind, value = perturbation
    hu = image.array.astype(np.float32)
    if kind == "noise":
        rng = np.random.default_rng([seed, zlib.crc32(case_id.encode("utf-8")), int(round(value * 1000))])
        hu += np.float32(value) * rng.standard_normal(hu.shape, dtype=np.float32)
    elif kind == "scale":
        hu *= np.float32(value)
    else:
        raise ValueError(f"unknown perturbation {kind!r}")
    return image.with_array(hu)


def evaluate_one_case(case: Case, runs: list[Run], bundle_paths: dict[str, str], seed: int, device: str,
                      overlay_run: str | None) -> dict:
    """Segment one case with every run and score it; returns plain data (sent back from a worker process)."""
    from LiverTumorSegLib.pipeline import segment

    try:
        image, reference = load_case(case)
        spacing = image.geometry.spacing
        rows, lesions, stages, overlay = [], [], {}, None
        for run in runs:
            path = bundle_paths[run.bundle]
            bundle = _WORKER_BUNDLES.get(path) or _WORKER_BUNDLES.setdefault(path, load_bundle(path))
            result = segment(perturb(image, run.perturbation, seed=seed, case_id=case.case_id), bundle, run.options(device))
            scored = evaluate_case(result.labels.array, reference, spacing)
            rows.append({"case": case.case_id, "run": run.key, **scored.metrics})
            lesions += [{"case": case.case_id, "run": run.key, **lesion} for lesion in scored.lesions]
            stages[run.key] = result.details["stages"]
            if run.key == overlay_run:
                overlay = overlay_slice(image, reference, result.labels.array)
        return {"case": case.case_id, "rows": rows, "lesions": lesions, "stages": stages, "overlay": overlay}
    except LiverTumorSegError as error:
        raise type(error)(f"case {case.case_id}: {error}") from None
    except Exception as error:  # name the case, keep the cause
        raise RuntimeError(f"case {case.case_id} failed: {type(error).__name__}: {error}") from error


def _worker_init() -> None:
    logging.getLogger("LiverTumorSeg").setLevel(logging.ERROR)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def overlay_slice(image: Image, reference: np.ndarray, prediction: np.ndarray) -> dict:
    """The axial slice (canonical orientation) where the largest reference lesion has its largest area
    (no tumour: the largest liver area; no liver: the middle slice), with both label maps."""
    canonical, _ = to_canonical(image)
    ref = to_canonical(image.with_array(np.asarray(reference, np.uint8)))[0].array
    pred = to_canonical(image.with_array(np.asarray(prediction, np.uint8)))[0].array
    lesions, count = label_lesions(ref == 2)
    if count:  # lesion 1 is the largest
        z = int(np.argmax((lesions == 1).sum(axis=(1, 2))))
    elif (ref >= 1).any():
        z = int(np.argmax((ref >= 1).sum(axis=(1, 2))))
    else:
        z = ref.shape[0] // 2
    sx, sy, _ = canonical.geometry.spacing
    hu = np.clip(canonical.array[z], -1024, 3071).astype(np.int16)
    return {"image": hu, "reference": ref[z], "prediction": pred[z], "spacing_yx": (float(sy), float(sx)), "slice": z}


def evaluate(config: EvaluationConfig) -> Path:
    """Plan, segment and score every case, then write the output folder atomically; returns it."""
    out = Path(config.out)
    for path in (out, config.results_md):
        if path is not None and Path(path).exists() and not config.overwrite:
            raise OutputError(f"'{path}' already exists. Choose another output, or pass --overwrite to replace it.")
    plan = plan_evaluation(config)
    bundle_paths = {key: str(bundle.path) for key, bundle in plan.bundles.items()}
    full_run = plan.methods[0][1]
    tasks = [(case, plan.runs, bundle_paths, config.seed, config.device, full_run.key) for case in plan.cases]
    results: dict[str, dict] = {}
    workers = min(config.workers, len(tasks))
    from tqdm import tqdm

    with tqdm(total=len(tasks), desc="evaluate", unit="case", disable=not config.progress, file=sys.stderr) as bar:
        if workers == 1:
            for task in tasks:
                result = evaluate_one_case(*task)
                results[result["case"]] = result
                bar.update(1)
        else:
            import multiprocessing

            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init) as pool:
                futures = [pool.submit(evaluate_one_case, *task) for task in tasks]
                try:
                    for future in as_completed(futures):
                        result = future.result()
                        results[result["case"]] = result
                        bar.update(1)
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    ordered = [results[case.case_id] for case in plan.cases]
    report = Report(config, plan, ordered)
    with atomic_path(out, overwrite=config.overwrite) as tmp:
        tmp.mkdir()
        report.write_csvs(tmp)
        (tmp / "figures").mkdir()
        write_figures(report, tmp / "figures")
        markdown = results_markdown(report, figures=Path("figures"))
        (tmp / "RESULTS.md").write_text(markdown, encoding="utf-8")
    if config.results_md is not None:
        md_path = Path(config.results_md)
        relative = Path(os.path.relpath(out.resolve() / "figures", md_path.resolve().parent))
        with atomic_path(md_path, overwrite=config.overwrite) as tmp:
            tmp.write_text(results_markdown(report, figures=relative), encoding="utf-8")
    return out
