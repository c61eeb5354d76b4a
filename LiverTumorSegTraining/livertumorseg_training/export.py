"""Export a trained cascade checkpoint into a model bundle the engine runs (ONNX + manifest.json).

The ONNX files are checked against the torch model on the same input before the bundle is written
(maximum absolute difference of the probabilities < 1e-4), and the bundle is written with the engine's
own :func:`LiverTumorSegLib.bundle.write_bundle`, so the two sides share one format definition.
"""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path

import numpy as np
import torch

from LiverTumorSegLib import __version__ as engine_version
from LiverTumorSegLib.bundle import Bundle, write_bundle

from .networks import build_model
from .onnx_export import check_onnx_matches_torch, export_branch_onnx

ONNX_TOLERANCE = 1e-4
#: Engine component name → (branch attribute of CascadeNet, input channels, description).
BRANCHES = {
    "liver": ("liver", 3, "liver branch: 3-slice stack [0, 255] → liver probability"),
    "tumour": ("tumor", 4, "tumour branch: 3-slice stack [0, 255] + liver probability → tumour probability"),
}


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The cascade of a training checkpoint (our own ``best.pt``/``last.pt``) and the checkpoint dict."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    config = state["config"]
    model = build_model("cascade", config["preset"], dense_skips=config["dense_skips"], subpixel=config["subpixel"],
                        attention=config["attention"])
    model.load_state_dict(state["model"])
    return model.eval(), state


def export_bundle(checkpoint: str | Path, out_dir: str | Path, *, name: str, version: str, description: str = "",
                  metrics: dict | None = None, overwrite: bool = False, seed: int = 0) -> Bundle:
    model, state = load_checkpoint(checkpoint)
    config = state["config"]
    rng = np.random.default_rng(seed)
    components, files, differences = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for component, (attribute, channels, role) in BRANCHES.items():
            branch = getattr(model, attribute)
            path = export_branch_onnx(branch, channels, Path(tmp) / f"{component}.onnx", opset=17)
            probe = rng.uniform(0, 255, size=(2, channels, 96, 64)).astype(np.float32)
            if channels == 4:
                probe[:, 3] = rng.uniform(0, 1, size=probe[:, 3].shape)
            differences[component] = check_onnx_matches_torch(branch, path, probe)
            if differences[component] >= ONNX_TOLERANCE:
                raise RuntimeError(f"ONNX export of the {component} branch differs from torch by {differences[component]:.2e}")
            components[component] = {"file": path.name, "kind": "onnx", "role": role, "in_channels": channels,
                                      "input": "input", "output": "probability"}
            files[path.name] = path
        manifest = {
            "name": name,
            "version": version,
            "description": description,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "engine_version": engine_version,
            "model": {"name": "cascade", "preset": config["preset"],
                      "flags": {k: config[k] for k in ("dense_skips", "subpixel", "attention")},
                      "parameters": {c: sum(p.numel() for p in getattr(model, a).parameters()) for c, (a, _, _) in BRANCHES.items()}},
            "input": config["contract"],
            "components": components,
            "thresholds": {"otsu": "per volume and channel on 8-bit probabilities", "restore_probability": 0.6},
            "training": {
                "data": Path(config["data"]).name,
                "split": state.get("split"),
                "epochs_run": state["epoch"] + 1,
                "config": {k: v for k, v in config.items() if k not in ("data", "out")},
            },
            "metrics": {"validation": state.get("validation", {}), **(metrics or {})},
            "onnx_max_abs_difference": differences,
        }
        return write_bundle(out_dir, manifest, files, overwrite=overwrite)
