"""3D U-Net for liver segmentation (seed paper 002, Srivastava & Pandey; SEED_SPECS section 1).

Architecture (SEED_SPECS section 1.2, the paper's tables)::

    Block(Cin, Cout) = Conv3d(Cin, Cout, 3, p=1) -> BN3d -> LeakyReLU(0.01) -> Dropout3d(0.2)
                       -> Conv3d(Cout, Cout, 3, p=1) -> BN3d -> LeakyReLU(0.01)

    enc1 = Block(1, 32)                         80 x 160 x 160   (z, y, x)
    enc2 = MaxPool3d(2) -> Block(32, 64)        40 x  80 x  80
    enc3 = MaxPool3d(2) -> Block(64, 128)       20 x  40 x  40
    bott = MaxPool3d(2) -> Block(128, 256)      10 x  20 x  20
    dec3 = ConvTranspose3d(256, 128, k=2, s=2) -> cat(u3, enc3) -> Block(256, 128)
    dec2 = ConvTranspose3d(128, 64,  k=2, s=2) -> cat(u2, enc2) -> Block(128, 64)
    dec1 = ConvTranspose3d(64, 32,   k=2, s=2) -> cat(u1, enc1) -> Block(64, 32)
    head = Conv3d(32, 1, 1)                     -> one logit channel

The ``paper`` preset (widths 32-64-128-256) has exactly **5,602,529** parameters (convolution biases, BN affine
parameters and the transposed convolutions' biases included), the figure SEED_SPECS section 1.2 derives.
The ``lite`` preset has the same topology with widths 8-16-32-64 (351,161 parameters).

Ambiguities of the paper and how they are resolved here (SEED_SPECS section 1.8):

1. Depth: "four levels of downsampling" in the prose vs. the tables' 4 encoder levels with 3 max-pools. The
   tables are followed: 3 pools, a 256-channel bottleneck at 1/8 resolution.
2. Upsampling: ``ConvTranspose3d`` with kernel 2 and stride 2 (with bias).
3. Activation: LeakyReLU with PyTorch's default slope 0.01.
4. Dropout placement: inside every Block between the two convolutions (the formal Block definition), in the
   decoder Blocks too ("similar" Blocks); the prose's "following convolutional blocks" is not followed.
5. Output activation: the paper applies a sigmoid in the network. Here the network returns **logits**; the
   sigmoid belongs to the loss (``baseline_losses.AdvancedComboLoss`` uses BCE-with-logits, which stays finite
   under autocast) and to inference/export.
6. Axis order: the paper's nibabel array is ``[1, 160, 160, 80]`` = (C, X, Y, Z). The network is fully
   convolutional and treats its three spatial axes alike, but trained kernels are tied to the order used in
   training. The project's arrays are (z, y, x), so the tensor layout here is ``(N, 1, Z, Y, X)`` =
   ``(N, 1, 80, 160, 160)``: the same 160 x 160 x 80 grid, transposed. Training and engine must both use it.
7. BN momentum, weight initialisation: PyTorch defaults (the paper states none).

Input contract (``INPUT_CONTRACT``; the engine prepares the input, the network does no scaling):

- the whole CT volume, spacing ignored, clipped to HU [-100, 400], normalised ``x = (HU + 100) / 500`` into
  [0, 1], resampled with ``scipy.ndimage.zoom`` (order 1) to exactly 80 x 160 x 160 (z, y, x) - every axis
  zoomed independently, so the grid is anisotropic and differs per case;
- output: one liver logit per voxel of that grid (liver = LiTS label >= 1, tumour included);
  ``sigmoid > 0.5`` is liver on the resized grid; for native-resolution results resample the probability map
  back to the input grid with order 1 and then threshold (SEED_SPECS section 1.8.5). No post-processing.
- The ``lite`` preset reads a coarser grid, 48 x 96 x 96 (a fifth of the voxels), so that it trains on two CPU
  cores in minutes; its contract (``input_contract``) says so. The ``paper`` preset reads 80 x 160 x 160.

Model summary (``branch_inputs``): the network has one part, ``unet``, and its input is one whole resized
volume ``(1, 1, 80, 160, 160)`` whatever the ``size`` argument of the summary: "FLOPs per slice" in the summary
of this model means FLOPs per resized input volume.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn

from .presets import preset_config

__all__ = ["PRESETS", "UNet3DBlock", "UNet3D"]

#: widths of the four levels (encoder 1..3 and bottleneck); the decoder mirrors them.
PRESETS: Dict[str, dict] = {
    # As published (SEED_SPECS 1.2): 5,602,529 parameters; 874.8 GFLOPs per 80 x 160 x 160 volume.
    "paper": dict(channels=(32, 64, 128, 256), dropout=0.2, shape_zyx=(80, 160, 160)),
    # Same topology, a quarter of the widths, a coarser grid: 351,161 parameters; GFLOPs: `summary --model unet3d`.
    "lite": dict(channels=(8, 16, 32, 64), dropout=0.2, shape_zyx=(48, 96, 96)),
}

_DIVISOR = 8  # three 2x max-pools


class UNet3DBlock(nn.Sequential):
    """Conv3d-BN-LeakyReLU-Dropout3d-Conv3d-BN-LeakyReLU (the paper's ``Block``)."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.2, negative_slope: float = 0.01):
        super().__init__(
            nn.Conv3d(in_ch, out_ch, 3, padding=1),
            nn.BatchNorm3d(out_ch),
            nn.LeakyReLU(negative_slope, inplace=True),
            nn.Dropout3d(dropout),
            nn.Conv3d(out_ch, out_ch, 3, padding=1),
            nn.BatchNorm3d(out_ch),
            nn.LeakyReLU(negative_slope, inplace=True),
        )


class UNet3D(nn.Module):
    """3D U-Net of seed paper 002; ``forward(x)`` with ``x`` (N, 1, Z, Y, X) returns liver logits (N, 1, Z, Y, X).

    Z, Y and X must be multiples of 8 (the contract's 80 x 160 x 160 is).
    """

    #: Engine input contract of the ``paper`` and ``lite`` presets (see the module docstring).
    INPUT_CONTRACT = {
        "kind": "volume_resized",
        "axes": "zyx",
        "shape_zyx": [80, 160, 160],
        "spacing": "ignored: each axis is zoomed to the target shape independently (scipy.ndimage.zoom)",
        "image_interpolation": "linear (zoom order 1)",
        "label_interpolation": "nearest (zoom order 0)",
        "hu_window": [-100, 400],
        "normalise": "(HU+100)/500",
        "intensity": {"shift": 100.0, "scale": 0.002, "offset": 0.0},
        "channels": ["ct"],
        "tensor_layout": "N,C,Z,Y,X",
        "outputs": ["liver"],
        "output_kind": "logits",
        "activation": "sigmoid",
        "thresholds": {"liver": 0.5},
        "output_resampling": "probabilities back to the input grid with order 1, then threshold",
        "postprocess": "none",
    }

    def __init__(self, preset="lite", in_channels: int = 1, out_channels: int = 1):
        super().__init__()
        cfg = preset_config(PRESETS, preset)
        self.preset_name = preset if isinstance(preset, str) else "custom"
        self.config = cfg
        c1, c2, c3, c4 = (int(c) for c in cfg["channels"])
        p = float(cfg.get("dropout", 0.2))
        self.in_channels = int(in_channels)
        self.enc1 = UNet3DBlock(in_channels, c1, p)
        self.enc2 = UNet3DBlock(c1, c2, p)
        self.enc3 = UNet3DBlock(c2, c3, p)
        self.bottleneck = UNet3DBlock(c3, c4, p)
        self.pool = nn.MaxPool3d(2)
        self.up3 = nn.ConvTranspose3d(c4, c3, 2, stride=2)
        self.dec3 = UNet3DBlock(2 * c3, c3, p)
        self.up2 = nn.ConvTranspose3d(c3, c2, 2, stride=2)
        self.dec2 = UNet3DBlock(2 * c2, c2, p)
        self.up1 = nn.ConvTranspose3d(c2, c1, 2, stride=2)
        self.dec1 = UNet3DBlock(2 * c1, c1, p)
        self.head = nn.Conv3d(c1, out_channels, 1)

    @property
    def input_contract(self) -> dict:
        """``INPUT_CONTRACT`` with this preset's grid."""
        return {**self.INPUT_CONTRACT, "shape_zyx": list(self.config.get("shape_zyx", self.INPUT_CONTRACT["shape_zyx"]))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()):
            if x.dim() != 5 or x.shape[1] != self.in_channels:
                raise ValueError(f"expected input of shape (N, {self.in_channels}, Z, Y, X), got {tuple(x.shape)}")
            if any(int(s) % _DIVISOR for s in x.shape[2:]):
                raise ValueError(f"Z, Y and X must be multiples of {_DIVISOR}, got {tuple(x.shape[2:])}")
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        b = self.bottleneck(self.pool(e3))
        d3 = self.dec3(torch.cat([self.up3(b), e3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)

    def branch_inputs(self, size: int = 224) -> Dict[str, Tuple[nn.Module, Tuple[int, ...]]]:
        """``{"unet": (self, (1, 1, 80, 160, 160))}``: one resized volume (the contract grid).

        ``size`` is ignored: the network always reads the fixed 80 x 160 x 160 grid, so the summary's
        "FLOPs per slice" is the cost of one whole input volume for this model.
        """
        shape: Sequence[int] = self.input_contract["shape_zyx"]
        return {"unet": (self, (1, self.in_channels) + tuple(int(s) for s in shape))}
