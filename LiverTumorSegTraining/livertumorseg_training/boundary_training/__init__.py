"""Boundary CNN (paper §3.3.3, §4.2, §4.4): band samples, training, dense ONNX export, tuning and the studies.

Modules: :mod:`.samples` (band samples of the labelled cases), :mod:`.train` (the two-phase training),
:mod:`.export` (dense ONNX into a bundle), :mod:`.tuning` (band half-width and threshold chosen on data),
:mod:`.studies` (patch size, architecture, refinement effect). The band itself is the engine's
(:mod:`LiverTumorSegLib.refinement`), so training and inference agree.
"""

from .export import dense_differences, export_boundary_cnn, export_dense_onnx
from .samples import case_band, load_case_bands, sample_boundary_patches
from .studies import architecture_study, patch_size_study, refinement_effect, write_study_table
from .train import augment_patches, fit_boundary_cnn, load_boundary_checkpoint, train_boundary_cnn
from .tuning import apply_tuning, tune_refinement

__all__ = [
    "apply_tuning",
    "architecture_study",
    "augment_patches",
    "case_band",
    "dense_differences",
    "export_boundary_cnn",
    "export_dense_onnx",
    "fit_boundary_cnn",
    "load_boundary_checkpoint",
    "load_case_bands",
    "patch_size_study",
    "refinement_effect",
    "sample_boundary_patches",
    "train_boundary_cnn",
    "tune_refinement",
    "write_study_table",
]
