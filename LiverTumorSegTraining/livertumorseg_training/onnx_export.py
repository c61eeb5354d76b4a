"""ONNX export of the cascade branches for the engine (ONNX Runtime).

Each branch is exported on its own with its sigmoid, so the graph maps a raw stack to a probability map:

- input ``"input"``: float32 (N, C, H, W); image channels in [0, 255] (scaled inside the graph), plus for the
  tumour branch the liver probability in [0, 1] as the 4th channel;
- output ``"probability"``: float32 (N, 1, H, W) in [0, 1];
- batch, height and width are dynamic (height and width must be multiples of 32).

The classic TorchScript-based exporter (``dynamo=False``) is used: the torch.export-based one needs
``onnxscript``, which the training package does not depend on. Files are written to a temporary name in the
target folder and renamed when complete, so a failed export never leaves a partial file behind.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "BranchWithSigmoid",
    "export_branch_onnx",
    "export_onnx",
    "export_cascade_onnx",
    "check_onnx_matches_torch",
    "INPUT_NAME",
    "OUTPUT_NAME",
]

INPUT_NAME = "input"
OUTPUT_NAME = "probability"


class BranchWithSigmoid(nn.Module):
    """Wraps a logit branch so that its output is a probability."""

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.branch(x))


def export_branch_onnx(
    branch_module: nn.Module,
    in_channels: int,
    path: Union[str, os.PathLike],
    opset: int = 17,
    example_size: tuple = (64, 64),
    metadata: Optional[Mapping[str, str]] = None,
) -> Path:
    """Exports one branch (with sigmoid) to ``path`` and returns the path.

    The module is exported from a CPU copy in eval mode (BatchNorm uses its running statistics); the caller's
    module is not modified. ``metadata`` key/value strings are stored in the model's ``metadata_props``.
    """
    h, w = example_size
    example = torch.rand(1, int(in_channels), int(h), int(w)) * 255.0
    return export_onnx(BranchWithSigmoid(copy.deepcopy(branch_module)), example, path, (0, 2, 3), opset, metadata)


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: Union[str, os.PathLike],
    dynamic: tuple = (0, 2, 3),
    opset: int = 17,
    metadata: Optional[Mapping[str, str]] = None,
) -> Path:
    """Exports ``module`` (one input ``"input"``, one output ``"probability"``) to ``path``, atomically.

    ``dynamic`` lists the input and output axes of variable size. The module is exported from a CPU copy in
    eval mode; the file is checked with ``onnx.checker`` before it is renamed into place.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(module).to("cpu", torch.float32).eval()
    dyn = {axis: f"axis{axis}" for axis in dynamic}
    fd, tmp = tempfile.mkstemp(suffix=".onnx.part", dir=str(path.parent))
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            with torch.no_grad():
                torch.onnx.export(
                    model,
                    (example.to("cpu", torch.float32),),
                    tmp,
                    dynamo=False,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: dyn, OUTPUT_NAME: dyn},
                    opset_version=int(opset),
                    do_constant_folding=True,
                )
        proto = onnx.load(tmp)
        onnx.checker.check_model(proto)
        if metadata:
            for key, value in metadata.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = str(key), str(value)
            onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def export_cascade_onnx(
    cascade: nn.Module, folder: Union[str, os.PathLike], opset: int = 17, prefix: str = "cascade"
) -> Dict[str, Path]:
    """Exports both branches of a ``CascadeNet`` as ``<prefix>_liver.onnx`` and ``<prefix>_tumor.onnx``."""
    folder = Path(folder)
    out: Dict[str, Path] = {}
    for name, branch in cascade.branches().items():
        scale = branch.input_scale.scale.flatten().tolist()
        meta = {
            "branch": name,
            "input_channel_scale": ",".join(f"{s:.9g}" for s in scale),
            "size_multiple": "32",
        }
        out[name] = export_branch_onnx(branch, branch.in_channels, folder / f"{prefix}_{name}.onnx", opset,
                                       metadata=meta)
    return out


def check_onnx_matches_torch(
    branch: nn.Module,
    path: Union[str, os.PathLike],
    input: Union[torch.Tensor, np.ndarray],
    threads: int = 1,
    activation=torch.sigmoid,
) -> float:
    """Runs the torch branch (eval, + ``activation``; ``None`` when the module ends in its own) and the ONNX file
    (ONNX Runtime, CPU) on ``input``; returns the maximum absolute difference of the probabilities."""
    import onnxruntime as ort

    x = torch.as_tensor(np.asarray(input, dtype=np.float32))
    was_training = branch.training
    branch.eval()
    try:
        with torch.no_grad():
            device = next(branch.parameters()).device
            out = branch(x.to(device))
            ref = (activation(out) if activation is not None else out).float().cpu().numpy()
    finally:
        branch.train(was_training)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    if got.shape != ref.shape:
        raise AssertionError(f"ONNX output shape {got.shape} != torch output shape {ref.shape}")
    return float(np.max(np.abs(got - ref)))
