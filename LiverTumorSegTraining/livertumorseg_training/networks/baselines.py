"""Registers the seed baselines with the model registry.

=============  ==========================================  =====================================================
name           model                                       flags
=============  ==========================================  =====================================================
``unet3d``     :class:`.unet3d.UNet3D` (seed 002)           none
``hdenseunet`` :class:`.hdenseunet.HDenseUNet` (seed 004)   ``unet_connections`` (2D skip sums), ``phase``
``e2net``      :class:`.e2net.E2NetModel` (seed 003)        ``edge_branch``, ``dcff`` (the paper's ablation)
=============  ==========================================  =====================================================

Each has the presets ``paper`` and ``lite``, an ``INPUT_CONTRACT`` class attribute (the engine's input
contract) and ``branch_inputs(size)`` for :func:`livertumorseg_training.model_summary.summarize`.
Importing this module registers the three names (``build_model("unet3d", "paper")``).
"""

from __future__ import annotations

import torch.nn as nn

from .e2net import E2NetModel
from .hdenseunet import HDenseUNet
from .unet3d import UNet3D

__all__ = ["unet3d", "hdenseunet", "e2net", "BASELINES"]


def unet3d(preset: str = "lite") -> nn.Module:
    """3D U-Net of seed paper 002 (liver only, AdvancedComboLoss)."""
    return UNet3D(preset)


def hdenseunet(preset: str = "lite", unet_connections: bool = True, phase: str = "joint") -> nn.Module:
    """H-DenseUNet of seed paper 004 (2D DenseUNet-167 + 3D DenseUNet-65 + HFF)."""
    return HDenseUNet(preset, unet_connections=unet_connections, phase=phase)


def e2net(preset: str = "lite", edge_branch: bool = True, dcff: bool = True) -> nn.Module:
    """E2Net of seed paper 003 (stage-1 R2UNet + stage-2 edge-enhanced network)."""
    return E2NetModel(preset, edge_branch=edge_branch, dcff=dcff)


BASELINES = {"unet3d": unet3d, "hdenseunet": hdenseunet, "e2net": e2net}


def _register() -> None:
    from . import MODELS, register_model

    for name, factory in BASELINES.items():
        if name not in MODELS:
            register_model(name, factory)


_register()
