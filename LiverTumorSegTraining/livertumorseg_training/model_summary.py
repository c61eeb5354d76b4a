"""Parameter and FLOP counts of the registered models, per branch.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` for one 224 x 224 slice (batch 1) through
each branch. That counter counts multiply-adds of convolutions and matrix products as 2 FLOPs and ignores
element-wise operations (BatchNorm, ReLU, pooling, interpolation, concatenation), which are a small fraction.
The models are built on the ``meta`` device, so no memory is allocated and nothing is computed.

A model takes part in the summary by providing ``branch_inputs(size) -> {name: (module, input_shape)}``.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch.utils.flop_counter import FlopCounterMode

from .networks import build_model

__all__ = ["summarize", "format_summary"]


def _count(module: torch.nn.Module) -> Dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"parameters": int(total), "trainable_parameters": int(trainable)}


def summarize(model_name: str = "cascade", preset: str = "lite", size: int = 224, **flags) -> Dict[str, Any]:
    """Returns ``{"model", "preset", "flags", "input_size", "total_parameters", "branches": {name: {...}}}``
    where each branch has ``in_channels``, ``parameters``, ``trainable_parameters`` and ``flops_per_slice``."""
    with torch.device("meta"):
        model = build_model(model_name, preset, **flags)
    if not hasattr(model, "branch_inputs"):
        raise TypeError(f"model {model_name!r} does not provide branch_inputs(size) for the summary")
    model.eval()
    branches: Dict[str, Dict[str, Any]] = {}
    for name, (module, shape) in model.branch_inputs(size).items():
        x = torch.zeros(shape, device="meta")
        with FlopCounterMode(display=False) as counter:
            with torch.no_grad():
                module(x)
        branches[name] = {
            "in_channels": int(shape[1]),
            "input_shape": tuple(int(s) for s in shape),
            **_count(module),
            "flops_per_slice": int(counter.get_total_flops()),
        }
    return {
        "model": model_name,
        "preset": preset,
        "flags": dict(flags),
        "input_size": int(size),
        "total_parameters": int(sum(p.numel() for p in model.parameters())),
        "branches": branches,
    }


def format_summary(summary: Dict[str, Any]) -> str:
    """Plain-text table of a :func:`summarize` result."""
    flags = ", ".join(f"{k}={v}" for k, v in summary.get("flags", {}).items()) or "defaults"
    size = summary["input_size"]
    lines = [
        f"model {summary['model']}  preset {summary['preset']}  flags {flags}",
        f"{'branch':<10}{'in ch':>6}{'parameters':>14}{'M params':>10}{f'GFLOPs/{size}x{size}':>18}",
    ]
    for name, b in summary["branches"].items():
        lines.append(
            f"{name:<10}{b['in_channels']:>6}{b['parameters']:>14,}{b['parameters'] / 1e6:>10.2f}"
            f"{b['flops_per_slice'] / 1e9:>18.3f}"
        )
    lines.append(f"{'total':<10}{'':>6}{summary['total_parameters']:>14,}{summary['total_parameters'] / 1e6:>10.2f}")
    return "\n".join(lines)
