"""Export a trained cascade checkpoint into a model bundle the engine runs (ONNX + manifest.json).

The ONNX files are checked against the torch model on the same input before the bundle is written
(maximum absolute difference of the probabilities < 1e-4), and the bundle is written with the engine's
own :func:`LiverTumorSegLib.bundle.write_bundle`, so the two sides share one format definition.
"""

from __future__ import annotations

import copy
import datetime
import tempfile
from pathlib import Path

import numpy as np
import torch

from LiverTumorSegLib import __version__ as engine_version
from LiverTumorSegLib.bundle import Bundle, write_bundle
from LiverTumorSegLib.model_registry import NOT_STATED

from .datasets import folder_list
from .networks import build_model
from .onnx_export import check_onnx_matches_torch, export_branch_onnx, export_onnx

#: Largest allowed |ONNX Runtime − torch| of an exported probability. Different convolution kernels (and the
#: channels-last weights of training) leave float32 differences up to ~1e-4 on barely trained networks; a wrong
#: export (a missing input scale, a wrong stack) differs by 1e-2 or more, and 1e-3 is a quarter of one 8-bit
#: probability level, below anything post-processing can see.
ONNX_TOLERANCE = 1e-3
#: Engine component name → (branch attribute of CascadeNet, input channels, description).
BRANCHES = {
    "liver": ("liver", 3, "liver branch: 3-slice stack [0, 255] → liver probability"),
    "tumour": ("tumor", 4, "tumour branch: 3-slice stack [0, 255] + liver probability → tumour probability"),
}


def _folder_names(data) -> str:
    """The training folder's name, or the names of several joined by ", "."""
    return ", ".join(Path(folder).name for folder in folder_list(data))


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The cascade of a training checkpoint (our own ``best.pt``/``last.pt``) and the checkpoint dict."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    return _cascade_from_state(state), state


def _cascade_from_state(state: dict) -> torch.nn.Module:
    config = state["config"]
    model = build_model("cascade", config["preset"], dense_skips=config["dense_skips"], subpixel=config["subpixel"],
                        attention=config["attention"], liver_scale=config.get("liver_scale", 1))
    model.load_state_dict(state["model"])
    return model.eval()


def export_bundle(checkpoint: str | Path, out_dir: str | Path, *, name: str, version: str, description: str = "",
                  metrics: dict | None = None, overwrite: bool = False, seed: int = 0,
                  data_sources: list[str] | None = None, licence: str = NOT_STATED) -> Bundle:
    """A bundle from a training checkpoint: the cascade's, or a seed baseline's (see :func:`export_baseline_bundle`).

    ``licence``: the terms of the model weights (e.g. an SPDX id), recorded in the manifest beside the training
    data sources and shown by ``livertumorseg models list``.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if "model_name" in state:
        return export_baseline_bundle(state, out_dir, name=name, version=version, description=description,
                                      overwrite=overwrite, seed=seed, licence=licence)
    model, state = _cascade_from_state(state), state
    config = state["config"]
    rng = np.random.default_rng(seed)
    components, files, differences = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for component, (attribute, channels, role) in BRANCHES.items():
            branch = getattr(model, attribute)
            path = export_branch_onnx(branch, channels, Path(tmp) / f"{component}.onnx", opset=17)
            multiple = config["contract"]["spatial_multiple"]
            probe = rng.uniform(0, 255, size=(2, channels, 2 * multiple, multiple)).astype(np.float32)
            if channels == 4:
                probe[:, 3] = rng.uniform(0, 1, size=probe[:, 3].shape)
            differences[component] = check_onnx_matches_torch(branch, path, probe)
            if differences[component] >= ONNX_TOLERANCE:
                raise RuntimeError(f"ONNX export of the {component} branch differs from torch by {differences[component]:.2e}")
            components[component] = {"file": path.name, "kind": "onnx", "role": role, "in_channels": channels,
                                      "input": "input", "output": "probability"}
            files[path.name] = path
        manifest = {
            **_header(name, version, description, licence),
            "model": {"name": "cascade", "preset": config["preset"],
                      "flags": {k: config[k] for k in ("dense_skips", "subpixel", "attention")},
                      "liver_scale": model.liver_scale,  # the liver branch's spacing in processing-grid pixels
                      "parameters": {c: sum(p.numel() for p in getattr(model, a).parameters()) for c, (a, _, _) in BRANCHES.items()}},
            "input": config["contract"],
            "components": components,
            "thresholds": {"otsu": "per volume and channel on 8-bit probabilities", "restore_probability": 0.6},
            "training": {
                "data": _folder_names(config["data"]),
                "data_sources": list(data_sources or []),  # where each kind of training data comes from, its licence
                "split": state.get("split"),
                "epochs_run": state["epoch"] + 1,
                "config": {k: v for k, v in config.items() if k not in ("data", "out")},
            },
            "metrics": {"validation": state.get("validation", {}), **(metrics or {})},
            "onnx_max_abs_difference": differences,
        }
        return write_bundle(out_dir, manifest, files, overwrite=overwrite)


def _header(name: str, version: str, description: str, licence: str) -> dict:
    """The manifest entries every bundle starts with."""
    return {"name": name, "version": version, "description": description, "licence": licence,
            "engine_version": engine_version,
            "intended_use": "Research use only. Not a medical device; every result must be reviewed by a clinician.",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


class _Probabilities(torch.nn.Module):
    """A baseline network (or one of its parts) ending in its published activation, as the engine reads it."""

    def __init__(self, module: torch.nn.Module, activation: str, output: int | None = None, **kwargs):
        super().__init__()
        self.module, self.activation, self.output, self.kwargs = module, activation, output, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x, **self.kwargs)
        if self.output is not None:
            out = out[self.output]
        return torch.sigmoid(out) if self.activation == "sigmoid" else torch.softmax(out, 1)


def baseline_components(model_name: str, model: torch.nn.Module, extra: dict) -> dict:
    """Engine component name → (module with activation, example input, dynamic axes, role) of a baseline."""
    if model_name == "unet3d":
        return {"unet3d": (_Probabilities(model, "sigmoid"), torch.rand(1, 1, 16, 32, 32), (0, 2, 3, 4),
                           "resized volume (N, 1, Z, Y, X) → liver probability")}
    if model_name == "hdenseunet":
        coarse = copy.deepcopy(model.dense2d)
        coarse.load_state_dict(extra["coarse_liver"])
        return {
            "coarse_liver": (_Probabilities(coarse, "softmax", output=1), torch.rand(2, 3, 64, 64) * 100, (0, 2, 3),
                             "3-slice stacks (N, 3, H, W) → background/liver/tumour probabilities (ROI network)"),
            "hdenseunet": (_Probabilities(model, "softmax", output=0), torch.rand(1, 1, 12, 64, 64) * 100, (0, 2, 3, 4),
                           "12-slice slab (1, 1, 12, H, W) → background/liver/tumour probabilities (hybrid output)"),
        }
    if model_name == "e2net":
        return {
            "stage1": (_Probabilities(model.stage1, "sigmoid"), torch.rand(2, 1, 64, 64) * 2 - 1, (0, 2, 3),
                       "whole slices (N, 1, H, W) → liver probability"),
            "stage2": (_Probabilities(model.stage2, "sigmoid", output=0), torch.rand(2, 1, 64, 64) * 2 - 1, (0, 2, 3),
                       "liver boxes resized (N, 1, 256, 256) → liver/tumour probabilities (fused output s2)"),
        }
    raise ValueError(f"no export recipe for {model_name!r}")


def export_baseline_bundle(state: dict, out_dir: str | Path, *, name: str, version: str,
                           description: str = "", overwrite: bool = False, seed: int = 0,
                           licence: str = NOT_STATED) -> Bundle:
    """Bundle of a seed baseline's loaded checkpoint (``baseline_training``): ONNX parts checked against torch."""
    model = build_model(state["model_name"], state["preset"])
    model.load_state_dict(state["model"])
    model.eval()
    torch.manual_seed(seed)
    components, files, differences = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        parts = baseline_components(state["model_name"], model, state.get("extra", {}))
        for component, (module, example, dynamic, role) in parts.items():
            module.eval()
            path = export_onnx(module, example, Path(tmp) / f"{component}.onnx", dynamic)
            # checked on the export size and on a larger one: sizes must stay dynamic in the graph
            larger = torch.rand(example.shape[:-2] + (example.shape[-2] + 32, example.shape[-1] + 64)) * example.max()
            differences[component] = max(check_onnx_matches_torch(module, path, probe.numpy(), activation=None)
                                         for probe in (example, larger))
            if differences[component] >= ONNX_TOLERANCE:
                raise RuntimeError(f"ONNX export of {component} differs from torch by {differences[component]:.2e}")
            components[component] = {"file": path.name, "kind": "onnx", "role": role, "input": "input", "output": "probability"}
            files[path.name] = path
        config = state["config"]
        manifest = {
            **_header(name, version, description, licence),
            "model": {"name": state["model_name"], "preset": state["preset"],
                      "parameters": {c: sum(p.numel() for p in m.parameters()) for c, (m, *_) in parts.items()}},
            "input": model.input_contract,
            "components": components,
            "training": {"data": _folder_names(config["data"]), "split": state["split"], "epochs_run": state["epochs_run"],
                         "config": {k: v for k, v in config.items() if k not in ("data", "out")}},
            "metrics": {"validation_loss": state.get("validation", {})},
            "onnx_max_abs_difference": differences,
        }
        return write_bundle(out_dir, manifest, files, overwrite=overwrite)
