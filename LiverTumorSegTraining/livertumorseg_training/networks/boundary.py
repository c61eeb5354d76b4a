"""Boundary-refinement CNNs (paper §3.3.3): 3D patch classifiers and their exact dense rewrite.

A patch classifier reads one s×s×s block of 8-bit intensities (one channel, values in [0, 255], scaled by
1/255 inside the model) centred on a voxel of the boundary band and returns one logit: "this voxel is
tumour". For inference the classifier is rewritten by :func:`to_dense` as a fully convolutional network that
gives the same logit for every voxel of a box in one pass.

Why every convolution is unpadded ("valid")
-------------------------------------------
A padded convolution sees zeros at the border of the patch; the dense network sees real neighbouring
voxels there, so a padded patch classifier has no exact dense equivalent. With valid convolutions and
pooling whose windows tile the map exactly, output voxel ``i`` of the dense network is, bit for bit up to
float rounding, the classifier applied to the input block ``[i, i + s)`` on each axis, whose centre is
``i + (s − 1) / 2``. The receptive field of every network built here equals its patch size ``s``
(checked at construction by :func:`analyse_extent`).

AlexNet-style network (:func:`alexnet3d`, the paper's choice)
-------------------------------------------------------------
The paper's layer order: conv 3³ ×2 (c1 channels), 2×2×2 max-pool, conv 3³ ×2 (c2), 2×2×2 max-pool,
conv 3³ (c3), fully connected layers, sigmoid. With valid convolutions every 3³ convolution consumes 2
voxels of context and every 2×2×2 pool 1, while the patch only offers ``s − 1``; five 3³ convolutions alone
need 11. A stride-2 pool would double the context every later layer consumes, so no layout with stride-2
pooling fits five 3³ convolutions into a 9–15 voxel patch. The layout is therefore built greedily in the
paper's order from the budget ``s − 1``:

- each 3×3×3 convolution (stride 1) is applied while 2 voxels of context remain, otherwise it becomes a
  1×1×1 convolution (on a map of extent 1, a position-wise fully connected layer);
- each 2×2×2 max-pool has stride 1 (it keeps the resolution of these tiny maps; stride 2 would leave
  nothing to convolve) and is applied while 1 voxel of context remains;
- what is left of the budget is the kernel ``r`` of the first fully connected layer (``r³`` positions),
  then ReLU, dropout, and a fully connected layer to one logit.

Resulting layouts (map extent after each layer; "P" = 2×2×2 max-pool, stride 1; receptive field = s):

====  =====================================================  ======
s     layers                                                 FC r
====  =====================================================  ======
9     3³ 7, 3³ 5, P 4, 3³ 2, 1³ 2, P 1, 1³ 1                 1
11    3³ 9, 3³ 7, P 6, 3³ 4, 3³ 2, P 1, 1³ 1                 1
13    3³ 11, 3³ 9, P 8, 3³ 6, 3³ 4, P 3, 3³ 1                1
15    3³ 13, 3³ 11, P 10, 3³ 8, 3³ 6, P 5, 3³ 3              3
====  =====================================================  ======

Every convolution is followed by batch normalisation and ReLU (paper §4.2). Presets (parameters at s = 11 / 15):

- ``paper``: channels 64, 64, 128, 128, 256; FC 256 → 256 → 1 (876 k / 3.43 M parameters; the 3.43 M are
  mostly the 256·3³ → 256 first FC layer);
- ``lite``: channels 16, 16, 32, 32, 64; FC 64 → 64 → 1 (55 k / 215 k parameters);
- ``tiny``: channels 4, 4, 8, 8, 16; FC 16 → 16 → 1 (3.6 k / 13.6 k parameters; for tests).

Deeper comparison network (:func:`resnet3d`, paper Table 2)
-----------------------------------------------------------
A small 3D ResNet with valid convolutions: a 3³ stem, then up to three residual blocks (two 3³ conv + BN,
identity or 1×1×1-projection shortcut cropped to the centre, ReLU after the sum), each consuming 4 voxels;
at s = 15: 15 → 13 → 9 → 5 → 1 (seven 3³ convolutions), FC → 1. Presets: ``paper`` stem 32, blocks 64,
128, 256, FC 256 (3.60 M parameters at s = 15); ``lite`` stem 16, blocks 16, 32, 64, FC 64 (229 k). Smaller
patches get fewer blocks (s = 11: two blocks) and the leftover context goes to the first FC kernel.

Dense rewrite (:func:`to_dense`)
--------------------------------
The standard "shift-and-stitch" / à trous rewrite, general enough for strided layers too: walking the
layers with the product ``j`` of the strides so far, a convolution or pooling of stride ``t`` and dilation
``d`` becomes stride 1 with dilation ``d·j`` (and ``j ← j·t``); the first fully connected layer becomes a
convolution with kernel ``r`` (the remaining extent) and dilation ``j``, its weights reshaped; later fully
connected layers become 1×1×1 convolutions; batch normalisation (in eval mode) and ReLU carry over; dropout
disappears. The AlexNet layouts above have no strided layer (``j`` stays 1), but :func:`to_dense` is tested
on networks with stride-2 pooling as well.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ALEXNET_PRESETS",
    "RESNET_PRESETS",
    "ARCHITECTURES",
    "PatchClassifier",
    "DenseBoundaryNet",
    "ValidResidual3d",
    "alexnet3d",
    "resnet3d",
    "build_boundary_cnn",
    "analyse_extent",
    "alexnet_layout",
    "to_dense",
    "count_parameters",
]

INPUT_SCALE = 1.0 / 255.0

ALEXNET_PRESETS = {
    "paper": {"channels": (64, 64, 128, 128, 256), "fc": 256},
    "lite": {"channels": (16, 16, 32, 32, 64), "fc": 64},
    "tiny": {"channels": (4, 4, 8, 8, 16), "fc": 16},
}
RESNET_PRESETS = {
    "paper": {"stem": 32, "blocks": (64, 128, 256), "fc": 256},
    "lite": {"stem": 16, "blocks": (16, 32, 64), "fc": 64},
    "tiny": {"stem": 4, "blocks": (4, 8, 16), "fc": 16},
}


# ------------------------------------------------------------------------------------------------ blocks


class ValidResidual3d(nn.Module):
    """``ReLU(body(x) + crop(shortcut(x)))`` with an unpadded body; the shortcut is cropped to the centre.

    ``crop`` (voxels removed on each side) is derived from the body's convolutions, so it stays right after
    :func:`to_dense` multiplies their dilations. The body must have stride 1 everywhere.
    """

    def __init__(self, body: nn.Sequential, shortcut: Optional[nn.Module] = None):
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.crop = _body_reduction(body) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        skip = self.shortcut(x)
        c = self.crop
        if c:
            skip = skip[:, :, c:-c, c:-c, c:-c]
        return F.relu(y + skip)


def _body_reduction(body: nn.Module) -> int:
    total = 0
    for layer in body.modules():
        if isinstance(layer, (nn.Conv3d, nn.MaxPool3d)):
            k, s, d, p = _geometry(layer)
            if s != 1 or p != 0:
                raise ValueError("residual bodies must be unpadded and of stride 1")
            total += d * (k - 1)
    if total % 2:
        raise ValueError("a residual body must shrink its input by an even number of voxels")
    return total


def _single(value) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"anisotropic kernel/stride/dilation {value} is not supported")
        return int(value[0])
    return int(value)


def _geometry(layer: nn.Module) -> tuple[int, int, int, int]:
    """(kernel, stride, dilation, padding) of a Conv3d or MaxPool3d, isotropic."""
    if isinstance(layer, nn.MaxPool3d) and layer.ceil_mode:
        raise ValueError("ceil-mode pooling has no exact dense equivalent")
    return _single(layer.kernel_size), _single(layer.stride), _single(layer.dilation), _single(layer.padding)


def conv_bn_relu(cin: int, cout: int, kernel: int, batch_norm: bool = True) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, kernel, bias=not batch_norm), *([nn.BatchNorm3d(cout)] if batch_norm else []),
            nn.ReLU(inplace=True)]


# ---------------------------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class Extent:
    remaining: int  # spatial extent of the feature map handed to the first fully connected layer
    channels: int
    receptive_field: int  # of the whole classifier, including the first fully connected layer
    jump: int  # product of the strides (dilation of the first FC layer in the dense network)


def analyse_extent(features: nn.Sequential, patch_size: int, in_channels: int = 1) -> Extent:
    """Follow a patch of ``patch_size`` through ``features``; check that every layer consumes its input
    exactly (no voxel dropped by a stride, no padding) and return the remaining extent.

    The classifier's receptive field is ``1 + Σ dilation·(kernel−1)·jump`` plus ``(remaining − 1)·jump``
    for the first fully connected layer; with exact consumption it equals ``patch_size``.
    """
    n, rf, jump, channels = int(patch_size), 1, 1, in_channels

    def walk(layers, n, rf, jump, channels):
        for layer in layers:
            if isinstance(layer, (nn.Conv3d, nn.MaxPool3d)):
                k, s, d, p = _geometry(layer)
                if p != 0:
                    raise ValueError(f"{layer}: padded layers have no exact dense equivalent; use padding 0")
                span = d * (k - 1) + 1
                if n < span:
                    raise ValueError(f"{layer}: a map of extent {n} is smaller than the layer's span {span}")
                if (n - span) % s:
                    raise ValueError(f"{layer}: stride {s} leaves voxels of a map of extent {n} unused")
                n = (n - span) // s + 1
                rf += d * (k - 1) * jump
                jump *= s
                if isinstance(layer, nn.Conv3d):
                    channels = layer.out_channels
            elif isinstance(layer, ValidResidual3d):
                n, rf, jump, channels = walk(layer.body, n, rf, jump, channels)
            elif isinstance(layer, nn.Sequential):
                n, rf, jump, channels = walk(layer, n, rf, jump, channels)
            elif isinstance(layer, (nn.BatchNorm3d, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Identity, nn.Dropout,
                                    nn.Dropout3d)):
                continue
            else:
                raise TypeError(f"{type(layer).__name__} is not supported in a densifiable feature extractor")
        return n, rf, jump, channels

    n, rf, jump, channels = walk(features, n, rf, jump, channels)
    rf += (n - 1) * jump
    return Extent(n, channels, rf, jump)


# ------------------------------------------------------------------------------------------- classifiers


class PatchClassifier(nn.Module):
    """One s³ patch of intensities in [0, 255], shape (N, 1, s, s, s) → one logit per patch, (N, 1)."""

    def __init__(self, features: nn.Sequential, head: nn.Sequential, patch_size: int, *, architecture: str = "custom",
                 preset: str = "custom"):
        super().__init__()
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch size must be odd (a voxel-centred patch), got {patch_size}")
        self.features = features
        self.head = head
        self.patch_size = int(patch_size)
        self.architecture = architecture
        self.preset = preset
        extent = analyse_extent(features, patch_size)
        if extent.receptive_field != patch_size:
            raise ValueError(f"receptive field {extent.receptive_field} != patch size {patch_size}")
        first = next((m for m in head if isinstance(m, nn.Linear)), None)
        if first is None or first.in_features != extent.channels * extent.remaining ** 3:
            raise ValueError(f"the first fully connected layer must take {extent.channels}·{extent.remaining}³ inputs")
        self.extent = extent

    @property
    def receptive_field(self) -> int:
        return self.extent.receptive_field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x * INPUT_SCALE)
        return self.head(torch.flatten(f, 1))

    def describe(self) -> dict:
        return {"architecture": self.architecture, "preset": self.preset, "patch_size": self.patch_size,
                "receptive_field": self.receptive_field, "parameters": count_parameters(self)}


class DenseBoundaryNet(nn.Module):
    """Fully convolutional equivalent of a :class:`PatchClassifier`: (N, 1, D, H, W) intensities in [0, 255]
    → logits (N, 1, D−s+1, H−s+1, W−s+1); output voxel i is the classifier on the block [i, i+s)."""

    def __init__(self, features: nn.Sequential, head: nn.Sequential, patch_size: int):
        super().__init__()
        self.features = features
        self.head = head
        self.patch_size = int(patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * INPUT_SCALE))

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(x))


def count_parameters(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def alexnet_layout(patch_size: int) -> list[str]:
    """The greedy layout of :func:`alexnet3d` for a patch size: entries "conv3", "conv1", "pool", "fc<r>"."""
    budget = int(patch_size) - 1
    plan = []
    for item in ("conv", "conv", "pool", "conv", "conv", "pool", "conv"):
        if item == "conv":
            plan.append("conv3" if budget >= 2 else "conv1")
            budget -= 2 if budget >= 2 else 0
        elif budget >= 1:
            plan.append("pool")
            budget -= 1
    plan.append(f"fc{budget + 1}")
    return plan


def alexnet3d(preset: str = "lite", patch: int = 11, *, channels: Optional[Sequence[int]] = None,
              fc: Optional[int] = None, batch_norm: bool = True, dropout: float = 0.5) -> PatchClassifier:
    """The paper's compact AlexNet-style 3D CNN with valid convolutions (see the module docstring)."""
    config = dict(ALEXNET_PRESETS[preset])
    channels = tuple(channels or config["channels"])
    fc = int(fc or config["fc"])
    if len(channels) != 5:
        raise ValueError("alexnet3d takes five channel counts (two, two and one convolution layers)")
    layers: list[nn.Module] = []
    cin, conv_index = 1, 0
    plan = alexnet_layout(patch)
    for item in plan[:-1]:
        if item == "pool":
            layers.append(nn.MaxPool3d(2, stride=1))
        else:
            layers += conv_bn_relu(cin, channels[conv_index], 3 if item == "conv3" else 1, batch_norm)
            cin = channels[conv_index]
            conv_index += 1
    r = int(plan[-1][2:])
    head = nn.Sequential(nn.Linear(cin * r ** 3, fc), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(fc, 1))
    return PatchClassifier(nn.Sequential(*layers), head, patch, architecture="alexnet3d", preset=preset)


def resnet3d(preset: str = "lite", patch: int = 15, *, stem: Optional[int] = None,
             blocks: Optional[Sequence[int]] = None, fc: Optional[int] = None, dropout: float = 0.5) -> PatchClassifier:
    """A deeper 3D ResNet-style patch classifier with valid convolutions (Table 2 comparison)."""
    config = dict(RESNET_PRESETS[preset])
    stem = int(stem or config["stem"])
    blocks = tuple(blocks or config["blocks"])
    budget = int(patch) - 1
    if budget < 2:
        raise ValueError("resnet3d needs a patch of at least 3 voxels")
    layers: list[nn.Module] = conv_bn_relu(1, stem, 3)
    budget -= 2
    cin = stem
    for width in blocks:
        if budget < 4:
            break
        body = nn.Sequential(*conv_bn_relu(cin, width, 3), nn.Conv3d(width, width, 3, bias=False), nn.BatchNorm3d(width))
        shortcut = None if width == cin else nn.Sequential(nn.Conv3d(cin, width, 1, bias=False), nn.BatchNorm3d(width))
        layers.append(ValidResidual3d(body, shortcut))
        budget -= 4
        cin = width
    r = budget + 1
    head = nn.Sequential(nn.Linear(cin * r ** 3, fc or config["fc"]), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(fc or config["fc"], 1))
    return PatchClassifier(nn.Sequential(*layers), head, patch, architecture="resnet3d", preset=preset)


ARCHITECTURES = {"alexnet3d": alexnet3d, "resnet3d": resnet3d}


def build_boundary_cnn(architecture: str = "alexnet3d", preset: str = "lite", patch: int = 11, **options) -> PatchClassifier:
    try:
        factory = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"unknown boundary CNN {architecture!r}; available: {', '.join(ARCHITECTURES)}") from None
    return factory(preset=preset, patch=patch, **options)


# ----------------------------------------------------------------------------------------- dense rewrite


def _dense_layer(layer: nn.Module, jump: int) -> tuple[Optional[nn.Module], int]:
    """The dense counterpart of one feature layer at the current stride product ``jump``."""
    if isinstance(layer, nn.Conv3d):
        k, s, d, p = _geometry(layer)
        dense = nn.Conv3d(layer.in_channels, layer.out_channels, k, stride=1, dilation=d * jump, padding=0,
                          groups=layer.groups, bias=layer.bias is not None)
        dense.load_state_dict(layer.state_dict())
        return dense, jump * s
    if isinstance(layer, nn.MaxPool3d):
        k, s, d, p = _geometry(layer)
        return nn.MaxPool3d(k, stride=1, dilation=d * jump), jump * s
    if isinstance(layer, ValidResidual3d):
        body, inner = _dense_sequence(layer.body, jump)
        shortcut, _ = _dense_sequence(nn.Sequential(layer.shortcut), jump)
        if inner != jump:
            raise ValueError("strided residual bodies are not supported")
        return ValidResidual3d(body, shortcut), jump
    if isinstance(layer, nn.Sequential):
        return _dense_sequence(layer, jump)
    if isinstance(layer, (nn.Dropout, nn.Dropout3d, nn.Identity)):
        return None, jump
    if isinstance(layer, (nn.BatchNorm3d, nn.ReLU, nn.LeakyReLU, nn.ELU)):
        return copy.deepcopy(layer), jump
    raise TypeError(f"{type(layer).__name__} has no dense rewrite")


def _dense_sequence(layers: nn.Sequential, jump: int) -> tuple[nn.Sequential, int]:
    out = []
    for layer in layers:
        dense, jump = _dense_layer(layer, jump)
        if dense is not None:
            out.append(dense)
    return nn.Sequential(*out), jump


def to_dense(model: PatchClassifier) -> DenseBoundaryNet:
    """Rewrite a trained :class:`PatchClassifier` as an equivalent fully convolutional network (weights copied).

    The result is in eval mode (batch normalisation with its running statistics, no dropout) and does not
    share parameters with ``model``.
    """
    extent = analyse_extent(model.features, model.patch_size)
    features, jump = _dense_sequence(model.features, 1)
    if jump != extent.jump:
        raise AssertionError("stride bookkeeping mismatch")
    head: list[nn.Module] = []
    first = True
    channels, r = extent.channels, extent.remaining
    for layer in model.head:
        if isinstance(layer, nn.Linear):
            kernel = r if first else 1
            conv = nn.Conv3d(channels if first else layer.in_features, layer.out_features, kernel,
                             dilation=jump if first else 1, bias=layer.bias is not None)
            with torch.no_grad():
                conv.weight.copy_(layer.weight.reshape(conv.weight.shape))
                if layer.bias is not None:
                    conv.bias.copy_(layer.bias)
            head.append(conv)
            first = False
        elif isinstance(layer, nn.BatchNorm1d):
            bn = nn.BatchNorm3d(layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine)
            bn.load_state_dict(layer.state_dict())
            head.append(bn)
        elif isinstance(layer, (nn.ReLU, nn.LeakyReLU, nn.ELU)):
            head.append(copy.deepcopy(layer))
        elif isinstance(layer, (nn.Dropout, nn.Identity)):
            continue
        else:
            raise TypeError(f"{type(layer).__name__} in the classifier head has no dense rewrite")
    dense = DenseBoundaryNet(features, nn.Sequential(*head), model.patch_size)
    device = next(model.parameters()).device
    return dense.to(device).eval()


def _register() -> None:
    from . import MODELS, register_model

    for name, factory in (("boundary_alexnet3d", alexnet3d), ("boundary_resnet3d", resnet3d)):
        if name not in MODELS:
            register_model(name, factory)


_register()
