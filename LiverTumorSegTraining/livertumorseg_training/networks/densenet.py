"""DenseNet building blocks of H-DenseUNet's 2D and 3D DenseUNets: dense layers, blocks, transitions and the
encoder (torchvision's ``densenet161().features`` module names, so ImageNet weights load directly), and the
layer helpers both decoders use."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DenseLayer", "DenseBlock", "Transition", "DenseEncoder"]

#: Batch-normalisation epsilon of the official DenseNet port.
BN_EPS = 1.1e-5


def conv_class(nd: int):
    """nn.Conv2d or nn.Conv3d."""
    return nn.Conv2d if nd == 2 else nn.Conv3d


def batch_norm(nd: int, ch: int, eps: float = BN_EPS) -> nn.Module:
    """2D or 3D batch normalisation, by default with the official DenseNet port's epsilon."""
    return (nn.BatchNorm2d if nd == 2 else nn.BatchNorm3d)(ch, eps=eps)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear (4D) or trilinear (5D) resize to ``size`` (``align_corners=False``)."""
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)  # symbolic when traced for ONNX


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1(bn_size*k)-BN-ReLU-Conv3(k) on the concatenation of all earlier features (torchvision's
    ``_DenseLayer`` parameter names). The cascade's dense blocks use it too, with PyTorch's BatchNorm epsilon."""

    def __init__(self, nd: int, in_ch: int, growth: int, bn_size: int, eps: float = BN_EPS):
        super().__init__()
        conv = conv_class(nd)
        mid = bn_size * growth
        self.norm1 = batch_norm(nd, in_ch, eps)
        self.conv1 = conv(in_ch, mid, 1, bias=False)
        self.norm2 = batch_norm(nd, mid, eps)
        self.conv2 = conv(mid, growth, 3, padding=1, bias=False)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1) if len(features) > 1 else features[0]
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    """Dense block: ``denselayer1..n`` (torchvision's ``_DenseBlock`` names); returns the concatenation."""

    def __init__(self, nd: int, num_layers: int, in_ch: int, growth: int, bn_size: int):
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = DenseLayer(nd, in_ch + i * growth, growth, bn_size)
        self.out_channels = in_ch + num_layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Module):
    """BN-ReLU-Conv1 (compression) - average pooling (2x2 in 2D; 2x2x1 = no pooling along z in 3D)."""

    def __init__(self, nd: int, in_ch: int, out_ch: int):
        super().__init__()
        self.norm = batch_norm(nd, in_ch)
        self.conv = conv_class(nd)(in_ch, out_ch, 1, bias=False)
        self.pool = nn.AvgPool2d(2) if nd == 2 else nn.AvgPool3d((1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(F.relu(self.norm(x))))


class DenseEncoder(nn.Module):
    """DenseNet encoder (2D or 3D) with torchvision ``features`` names.

    ``forward(x)`` returns ``(skips, final)``: ``skips = [stem, db1, db2, db3]`` (the stem's BN-ReLU output and the
    raw outputs of dense blocks 1-3) and ``final = ReLU(norm5(db4))``.
    """

    def __init__(self, nd: int, in_ch: int, stem: int, growth: int, blocks: Sequence[int], bn_size: int,
                 compression: float):
        super().__init__()
        conv = conv_class(nd)
        self.nd = nd
        self.conv0 = conv(in_ch, stem, 7, stride=2, padding=3, bias=False)
        self.norm0 = batch_norm(nd, stem)
        self.pool0 = (nn.MaxPool2d if nd == 2 else nn.MaxPool3d)(3, stride=2, padding=1)
        ch = stem
        self.skip_channels: List[int] = [stem]
        self.num_blocks = len(blocks)
        for i, n in enumerate(blocks):
            block = DenseBlock(nd, int(n), ch, growth, bn_size)
            self.add_module(f"denseblock{i + 1}", block)
            ch = block.out_channels
            if i < len(blocks) - 1:
                self.skip_channels.append(ch)
                out = int(ch * compression)
                self.add_module(f"transition{i + 1}", Transition(nd, ch, out))
                ch = out
        self.norm5 = batch_norm(nd, ch)
        self.out_channels = ch

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        x = F.relu(self.norm0(self.conv0(x)))
        skips = [x]
        x = self.pool0(x)
        for i in range(self.num_blocks):
            x = getattr(self, f"denseblock{i + 1}")(x)
            if i < self.num_blocks - 1:
                skips.append(x)
                x = getattr(self, f"transition{i + 1}")(x)
        return skips, F.relu(self.norm5(x))


def conv_bn_relu(nd: int, in_ch: int, out_ch: int) -> nn.Sequential:
    """3x3(x3) convolution with bias, batch normalisation, ReLU."""
    return nn.Sequential(conv_class(nd)(in_ch, out_ch, 3, padding=1), batch_norm(nd, out_ch), nn.ReLU(inplace=True))


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan-out) convolutions, zero biases, unit batch normalisation."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
