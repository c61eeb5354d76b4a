"""Network definitions of the training package and the model registry."""

from __future__ import annotations

from typing import Callable, Dict

import torch.nn as nn

from .cascade import PRESETS as CASCADE_PRESETS
from .cascade import AttentionDenseUNet, AttentionGate, CascadeNet

__all__ = [
    "MODELS",
    "CASCADE_PRESETS",
    "AttentionDenseUNet",
    "AttentionGate",
    "CascadeNet",
    "build_model",
    "register_model",
]

#: name -> factory(preset, **flags)
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "cascade": CascadeNet,
}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Adds a model factory ``factory(preset=..., **flags)`` to the registry."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = factory


def build_model(name: str = "cascade", preset: str = "lite", **flags) -> nn.Module:
    """Builds a registered model, e.g. ``build_model("cascade", "paper", attention=False)``."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}") from None
    return factory(preset=preset, **flags)
from . import baselines  # noqa: E402,F401  (registers the seed baselines)
