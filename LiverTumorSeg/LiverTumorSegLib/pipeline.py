"""The segmentation pipeline: orchestrates the stages, one module each, and writes the outputs.

read → canonical orientation → preprocess → cascade → post-process → (radiomics filter) →
(boundary refinement) → back to the input grid → volumetry. Every stage reports progress through one
callback ``progress(stage, fraction)`` and checks one ``cancel()`` flag between steps. A bundle of a seed
baseline (``input.kind`` other than ``cascade_2_5d``) replaces preprocess … refinement by its own published
recipe (``baseline_networks``); reorientation and volumetry are shared.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import __version__
from .bundle import CASCADE_KIND, Bundle
from .cascade import run_cascade
from .errors import Cancelled, InputError
from .image_io import Image, atomic_path, from_canonical, read_image, to_canonical, write_image
from .output_folder import (DICOM_SEG_FILE, LABELS_FILE, PRODUCER, REPORT_HTML, RUN_JSON, SEGMENTATION_FILE,
                            VOLUMETRY_CSV, VOLUMETRY_JSON, check_output_folder)
from .postprocess import PostprocessOptions, postprocess
from .preprocess import labels_to_grid, prepare_volume, resample_in_plane
from .volumetry import measure, write_volumetry

log = logging.getLogger("LiverTumorSeg")

Progress = Callable[[str, float], None]
Cancel = Callable[[], bool]



@dataclass
class PipelineOptions:
    device: str = "cpu"
    threads: int | None = None
    batch_size: int = 8
    #: In-plane zooms of the liver branch, averaged (None: the bundle's ``inference.liver_scales``).
    liver_scales: tuple[float, ...] | None = None
    postprocess: PostprocessOptions = field(default_factory=PostprocessOptions)
    radiomics: bool = True
    refine: bool = True
    check_intensities: bool = True


@dataclass
class SegmentationResult:
    labels: Image  # 0 / 1 liver / 2 tumour on the input grid
    volumetry: dict
    details: dict  # bundle, stages run or skipped, thresholds, timings, warnings


#: Adult liver volumes outside this range (mL) are flagged for review.
PLAUSIBLE_LIVER_ML = (600.0, 4500.0)
#: Share of the liver's voxels on the image's border above which the liver counts as cut by the field of view.
LIVER_EDGE_FRACTION = 0.005


def check_ct_intensities(image: Image) -> list[str]:
    """Refuse volumes that are clearly not CT in Hounsfield units; return warnings for doubtful ones.

    CT of the abdomen always holds air (≈ −1000 HU: outside the body, lungs, bowel gas) or fat (≈ −100 HU:
    subcutaneous and visceral), and dense values (> 1000 HU) only in bone cortex and metal. A volume with no
    negative value, stored in 8 bits, without either air or fat, or with much of it above 1000 HU (CT saved
    without its −1024 rescale intercept, PET in Bq/mL, MR) would make the network's HU window meaningless.
    """
    command = "pass --skip-intensity-check (Slicer: Advanced > skip the intensity check) if you are sure."
    if np.issubdtype(image.array.dtype, np.integer) and image.array.dtype.itemsize == 1:
        raise InputError(
            f"The image is stored as {image.array.dtype} (8 bits), which cannot hold Hounsfield units (air −1000, "
            f"bone above 300): it is a windowed or display export. Give the original CT series, or {command}"
        )
    values = image.array.ravel()[:: max(1, image.array.size // 2_000_000)].astype(np.float32)
    low, high = np.percentile(values, [0.5, 99.5])
    if values.min() >= 0:
        raise InputError(
            f"The image has no negative values (range {values.min():.0f} to {values.max():.0f}), so it is not CT in "
            "Hounsfield units (air is −1000 HU): it looks like MR, or a CT saved without its rescale intercept. "
            f"Give a CT volume in HU (e.g. load the DICOM series, which applies the rescale), or {command}"
        )
    in_range = values[values >= -1100]  # leaves out padding (−2000, −3024) outside the scan circle
    share = (lambda lo, hi: float(np.count_nonzero((in_range >= lo) & (in_range <= hi))) / max(in_range.size, 1))
    air, fat, dense = share(-1100, -900), share(-150, -50), share(1000, np.inf)
    if dense > 0.3:
        raise InputError(
            f"{dense:.0%} of the voxels are above 1000 HU, where only bone cortex and metal lie: this looks like a CT "
            "stored without its rescale intercept (HU + 1024) or not a CT at all (PET, MR). Give a CT volume in HU, "
            f"or {command}"
        )
    if air < 0.005 and fat < 0.005:
        raise InputError(
            f"The image shows neither air (−1000 HU: {air:.1%} of voxels) nor fat (−100 HU: {fat:.1%}), which every "
            "abdominal CT in Hounsfield units has: it looks like PET, MR or a CT on another intensity scale. Give a "
            f"CT volume in HU, or {command}"
        )
    warnings = []
    if low > -500:
        warnings.append(
            f"Almost no air-like voxels (0.5th percentile {low:.0f} HU): the field of view may cut through the "
            "body or the image may not be in HU; check the result carefully."
        )
    if high > 4000:
        warnings.append(f"Very high intensities (99.5th percentile {high:.0f} HU): metal or a non-CT scale.")
    return warnings


def check_result_plausibility(labels: np.ndarray, volumetry: dict) -> list[str]:
    """Warnings for a segmentation whose volumes may be wrong: an adult liver volume out of range, or a liver
    cut by the edge of the image (its volume is then underestimated)."""
    liver_ml = volumetry["liver_volume_ml"]
    if liver_ml == 0:
        return []
    warnings = []
    low, high = PLAUSIBLE_LIVER_ML
    if not low <= liver_ml <= high:
        warnings.append(
            f"The liver volume {liver_ml:.0f} mL is outside the usual adult range ({low:.0f}–{high:.0f} mL): the "
            "field of view may cut the liver, the segmentation may leak into neighbouring organs or miss part of the "
            "liver, or the patient is not an adult. Review the segmentation before using its volumes."
        )
    liver = labels >= 1
    faces = {"first slice": liver[0], "last slice": liver[-1], "first row": liver[:, 0], "last row": liver[:, -1],
             "first column": liver[:, :, 0], "last column": liver[:, :, -1]}
    total = np.count_nonzero(liver)
    touching = [name for name, face in faces.items() if np.count_nonzero(face) > LIVER_EDGE_FRACTION * total]
    if touching:
        warnings.append(
            f"The liver touches the edge of the image ({', '.join(touching)}): part of it probably lies outside the "
            "field of view, so the liver volume is underestimated and a tumour there may be missed."
        )
    return warnings


def segment(
    image: Image,
    bundle: Bundle,
    options: PipelineOptions | None = None,
    *,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> SegmentationResult:
    """Segment liver and tumours in a CT :class:`Image` (any orientation); results on the input grid."""
    options = options or PipelineOptions()
    progress = progress or (lambda stage, fraction: None)
    timings: dict[str, float] = {}
    warnings: list[str] = []
    stages: dict[str, str] = {}
    details_extra: dict[str, dict] = {}

    def step(name: str):
        if cancel and cancel():
            raise Cancelled("Segmentation cancelled; nothing was written.")
        progress(name, 0.0)
        return _Timer(timings, name)

    with step("check input"):
        if options.check_intensities:
            warnings += check_ct_intensities(image)
    with step("reorient"):
        canonical, orientation = to_canonical(image)
    if bundle.kind != CASCADE_KIND:
        labels, info = _segment_with_baseline(canonical, orientation, bundle, options, step, progress, cancel)
        stages.update(info.pop("stages"))
        details_extra[bundle.kind] = info
        lesion_probability = None
    else:
        labels, lesion_probability = _segment_with_cascade(
            canonical, orientation, bundle, options, step, progress, cancel, stages, details_extra)
    with step("volumetry"):
        volumetry = measure(labels.array, image.array, image.geometry, probability_map=lesion_probability)
    if volumetry["liver_volume_ml"] == 0:
        warnings.append("No liver was found in this image: the segmentation is empty. Is the liver in the field of view?")
    warnings += check_result_plausibility(labels.array, volumetry)
    unfiltered = details_extra.get("radiomics filter", {}).get("kept_despite_failed_features")
    if unfiltered:
        warnings.append(
            f"Radiomic features could not be computed for {len(unfiltered)} candidate lesion(s); they were kept "
            "without the false-positive filter's judgement (run.json: radiomics filter → feature_failures)."
        )
    for message in warnings:
        log.warning(message)
    progress("done", 1.0)
    details = {
        "producer": PRODUCER,
        "engine_version": __version__,
        "bundle": bundle.name,
        "bundle_path": str(bundle.path),
        "stages": stages,
        **details_extra,
        "timings_s": {name: round(seconds, 3) for name, seconds in timings.items()},
        "warnings": warnings,
    }
    return SegmentationResult(labels, volumetry, details)


def _segment_with_baseline(canonical, orientation, bundle, options, step, progress, cancel) -> tuple[Image, dict]:
    """The network stage of a seed baseline (its own published inference recipe), then back to the input grid."""
    from .baseline_networks import run_baseline

    with step("network"):
        labels, info = run_baseline(canonical.array, bundle, device=options.device, threads=options.threads,
                                    progress=progress, cancel=cancel)
    with step("back to input grid"):
        labels = from_canonical(labels, orientation)
    not_applicable = f"not applicable: the {bundle.kind} model has its own published recipe"
    info["stages"] = {"network": f"run ({bundle.kind})", "post-process": not_applicable,
                      "radiomics filter": not_applicable, "boundary refinement": not_applicable}
    return labels, info


def _segment_with_cascade(canonical, orientation, bundle, options, step, progress, cancel, stages, details_extra):
    """Preprocess → cascade → post-process → (radiomics filter) → (boundary refinement) → back to the input grid."""
    with step("preprocess"):
        prepared = prepare_volume(canonical, bundle.contract)
    with step("cascade"):
        liver_prob, tumour_prob = run_cascade(
            prepared, bundle, device=options.device, threads=options.threads, batch_size=options.batch_size,
            liver_scales=options.liver_scales, progress=progress, cancel=cancel,
        )
    details_extra["cascade"] = {"liver_scales": list(bundle.liver_scales if options.liver_scales is None
                                                     else options.liver_scales)}
    with step("post-process"):
        labels_crop, post_info = postprocess(liver_prob, tumour_prob, options.postprocess, progress, cancel)
        del liver_prob, tumour_prob
    stages["post-process"] = "run"
    details_extra["postprocess"] = post_info
    lesion_ids = None  # processing-grid map of each kept lesion's classifier probability, when the filter runs
    if not options.radiomics:
        stages["radiomics filter"] = "switched off"
    elif not bundle.has("lesion_classifier"):
        stages["radiomics filter"] = "skipped: the bundle has no lesion_classifier"
    else:
        from .radiomics_filter import LesionClassifier, filter_lesions

        with step("radiomics filter"):
            classifier = LesionClassifier.from_bundle(bundle, threads=options.threads)
            labels_crop, probabilities, radiomics_info = filter_lesions(
                prepared.hu, labels_crop, prepared.grid.spacing, classifier, threads=options.threads or 1,
                progress=progress, cancel=cancel,
            )
            lesion_ids = _probability_map(labels_crop, probabilities)
        stages["radiomics filter"] = "run"
        details_extra["radiomics filter"] = radiomics_info
    if not options.refine:
        stages["boundary refinement"] = "switched off"
    elif not bundle.has("boundary_cnn"):
        stages["boundary refinement"] = "skipped: the bundle has no boundary_cnn"
    else:
        from .refinement import refine_boundaries

        with step("boundary refinement"):
            labels_crop, refine_info = refine_boundaries(
                prepared.intensities, labels_crop, prepared.grid.spacing, bundle, device=options.device,
                threads=options.threads, progress=progress, cancel=cancel,
            )
        stages["boundary refinement"] = "run"
        details_extra["boundary refinement"] = refine_info
    with step("back to input grid"):
        on_grid = labels_to_grid(prepared.uncrop(labels_crop), prepared.grid, canonical.geometry, canonical.array.shape)
        labels = from_canonical(on_grid, orientation)
        lesion_probability = None
        if lesion_ids is not None:
            lesion_probability = from_canonical(
                resample_in_plane(prepared.uncrop(lesion_ids), prepared.grid, canonical.geometry, canonical.array.shape,
                                  order=0, fill=0), orientation,
            ).array
    return labels, lesion_probability


def write_outputs(
    result: SegmentationResult,
    image: Image,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    label_format: str = "nifti",
    per_lesion: bool = False,
    title: str = "Liver and tumour segmentation",
    inputs: Sequence[str | Path] = (),
    dicom_source=None,
) -> Path:
    """Write all outputs into ``out_dir`` atomically: the folder appears complete or not at all.

    ``inputs`` (the files or folders the image was read from) are never replaced: see
    :func:`~LiverTumorSegLib.output_folder.check_output_folder`, which also limits ``overwrite`` to a
    previous output of this tool. ``dicom_source`` (a :class:`~.dicom_seg.SourceSeries`, for DICOM input)
    adds the DICOM SEG; when the series allows none, a warning says why (also in the report and run.json).
    """
    from .dicom_seg import DicomSegUnavailable, write_dicom_seg
    from .report import write_report
    from .seg_nrrd import write_segmentation

    details = result.details
    out_dir = check_output_folder(out_dir, inputs, overwrite=overwrite)
    with atomic_path(out_dir, overwrite=overwrite) as tmp:
        tmp.mkdir()
        write_image(result.labels, tmp / LABELS_FILE[label_format])
        write_segmentation(result.labels, tmp / SEGMENTATION_FILE, per_lesion=per_lesion, algorithm_name=details["bundle"])
        if dicom_source is not None:
            try:
                write_dicom_seg(result.labels, tmp / DICOM_SEG_FILE, dicom_source, algorithm_version=details["bundle"])
            except DicomSegUnavailable as reason:
                log.warning("%s", reason)
                details = {**details, "warnings": [*details.get("warnings", []), str(reason)]}
        write_volumetry(result.volumetry, tmp / VOLUMETRY_JSON, tmp / VOLUMETRY_CSV)
        write_report(
            tmp / REPORT_HTML, image.array, result.labels.array, image.geometry, result.volumetry,
            title=title, details=details,
        )
        (tmp / RUN_JSON).write_text(json.dumps(details, indent=2) + "\n", encoding="utf-8")
    return out_dir


def segment_input(
    path: str | Path,
    bundle: Bundle,
    options: PipelineOptions,
    out_dir: str | Path,
    *,
    series: str | None = None,
    progress: Progress | None = None,
    details: dict | None = None,
    **write_options,
) -> tuple[SegmentationResult, Path]:
    """Read a CT file or DICOM series folder, segment it and write its outputs: ``livertumorseg segment`` for one
    input (``batch`` runs it once per study). ``details`` are added to ``run.json``; ``write_options`` go to
    :func:`write_outputs`."""
    image = read_image(path, series=series)
    result = segment(image, bundle, options, progress=progress)
    result.details.update(details or {})
    out = write_outputs(result, image, out_dir, title=f"Liver and tumour segmentation of {Path(path).name}",
                        inputs=[path], **write_options)
    return result, out


def _probability_map(labels: np.ndarray, probabilities: dict[int, float]) -> np.ndarray:
    """float32 map holding each kept lesion's classifier probability on its voxels (0 elsewhere).

    ``probabilities`` is keyed by the candidate's lesion id in the filter's input (:func:`.masks.label_lesions`);
    the kept lesions, numbered again, come in the same order.
    """
    from .masks import label_lesions

    components, count = label_lesions(labels == 2)
    values = np.zeros(count + 1, np.float32)
    values[1:] = [probabilities[key] for key in sorted(probabilities)][:count]
    return values[components]


class _Timer:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = time.perf_counter() - self.start
