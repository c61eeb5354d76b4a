"""The layers the cascade's branches are built from (``cascade.py``): dense blocks (of ``densenet``'s dense
layers), transitions, attention gates and the two kinds of x2 upsampling, all 2D."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .densenet import DenseLayer


def conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int) -> nn.Sequential:
    """Conv (same padding, no bias), BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class InputScale(nn.Module):
    """Multiplies each input channel by a constant (part of the exported graph).

    ``scales`` has one entry per channel; the default for image channels is 1/255 so that the network sees
    [0, 1] intensities while its callers pass the engine's 8-bit-range slices.
    """

    def __init__(self, scales: Sequence[float]):
        super().__init__()
        self.register_buffer("scale", torch.tensor(list(scales), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(dtype=x.dtype)


class DenseBlock(nn.Module):
    """Dense block (its layers as ``layers.N``); returns the concatenation of its input and all layers' outputs."""

    def __init__(self, num_layers: int, in_ch: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(2, in_ch + i * growth_rate, growth_rate, bn_size, eps=1e-5) for i in range(num_layers)
        )
        self.out_channels = in_ch + num_layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Module):
    """Transition-down: BN-ReLU (its output is the skip feature), Conv1x1 (compression), 2x2 avg-pool."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        skip = F.relu(self.norm(x))
        return skip, F.avg_pool2d(self.conv(skip), 2)


class AttentionGate(nn.Module):
    """Additive attention gate, ``alpha = sigmoid(psi^T ReLU(W_x x + W_g g + b))``, output ``alpha * x``.

    ``W_g g`` is computed at ``g``'s resolution and resampled bilinearly to ``x``'s size (cheaper than
    resampling ``g`` itself and identical up to the linear map). ``g`` may have the same size as ``x`` (7x7 gate).
    """

    def __init__(self, x_channels: int, g_channels: int, inter_channels: int):
        super().__init__()
        self.w_x = nn.Conv2d(x_channels, inter_channels, 1, bias=False)
        self.w_g = nn.Conv2d(g_channels, inter_channels, 1, bias=True)  # its bias is b
        self.psi = nn.Conv2d(inter_channels, 1, 1, bias=True)

    def coefficients(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Attention coefficients alpha in [0, 1], shape (N, 1, H_x, W_x)."""
        theta = self.w_x(x)
        phi = self.w_g(g)
        if phi.shape[-2:] != theta.shape[-2:]:
            phi = F.interpolate(phi, size=theta.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.psi(F.relu(theta + phi)))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * self.coefficients(x, g)


def icnr_(weight: torch.Tensor, scale: int) -> None:
    """ICNR init: every group of ``scale**2`` sub-pixel output channels starts with the same kernel."""
    out_ch = weight.shape[0] // (scale * scale)
    sub = torch.empty((out_ch,) + tuple(weight.shape[1:]), dtype=weight.dtype, device=weight.device)
    nn.init.kaiming_normal_(sub, mode="fan_out", nonlinearity="relu")
    with torch.no_grad():
        weight.copy_(sub.repeat_interleave(scale * scale, dim=0))


class SubPixelUp(nn.Module):
    """x2 upsampling by sub-pixel convolution: Conv3x3(C_in -> 4 C_out), PixelShuffle(2), BN, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, scale: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch * scale * scale, 3, padding=1, bias=False)
        self.shuffle = nn.PixelShuffle(scale)
        self.norm = nn.BatchNorm2d(out_ch)
        icnr_(self.conv.weight, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.shuffle(self.conv(x))))


class BilinearUp(nn.Module):
    """Ablation replacement of ``SubPixelUp``: bilinear x2 upsampling, Conv3x3(C_in -> C_out), BN, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.conv = conv_bn_relu(in_ch, out_ch, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=float(self.scale), mode="bilinear", align_corners=False)
        return self.conv(x)


def conv_stage(in_ch: int, out_ch: int, n_convs: int) -> nn.Sequential:
    """A decoder stage: ``n_convs`` 3x3 conv-BN-ReLU layers (at least one)."""
    layers = [conv_bn_relu(in_ch, out_ch, 3)]
    layers += [conv_bn_relu(out_ch, out_ch, 3) for _ in range(max(0, n_convs - 1))]
    return nn.Sequential(*layers)
