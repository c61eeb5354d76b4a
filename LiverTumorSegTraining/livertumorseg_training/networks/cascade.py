"""Cascaded 2.5D attention dense U-Net (liver branch -> tumour branch).

The network of section 3.1 of the reference paper: two branches of the same design; the liver branch reads a
three-slice stack ``X_z = [I_{z-1}, I_z, I_{z+1}]`` and the tumour branch reads ``[X_z, p_liver]``.

Branch topology (shapes for a 224 x 224 input; any height and width that are multiples of 32 work):

Encoder (DenseNet-169 style, pre-activation dense layers)::

    stem     7x7 conv stride 2 + BN + ReLU                         224 -> 112
             3x3 max-pool stride 2                                 112 -> 56
    block 1  6 dense layers  (BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k)), k = 32      at 56   -> E56
    trans 1  BN-ReLU | Conv1x1 (compression 0.5) + 2x2 avg-pool    56 -> 28
    block 2  12 dense layers                                                          at 28   -> E28
    trans 2                                                        28 -> 14
    block 3  32 dense layers                                                          at 14   -> E14
    trans 3                                                        14 -> 7
    block 4  24 dense layers + BN-ReLU                                                at 7    -> E7

``E56``, ``E28``, ``E14`` are the BN-ReLU activations at the start of each transition layer (the normalised
dense-block outputs), ``E7`` the normalised output of block 4. They are the skip features of the four scales.

Bottleneck: ``G7 = ReLU(BN(Conv1x1(E7)))`` (a 1x1 projection of the deepest encoder features). ``G7`` is the
gating signal of the 7x7 attention gate, which has no coarser decoder feature to be gated by; the 7x7 gate is
therefore a learned spatial self-gating of the deepest encoder features.

Attention gates (Oktay et al. 2018, 2D form) on every skip, at 7, 14, 28 and 56 (for a 224 input)::

    alpha = sigmoid(psi^T ReLU(W_x x + W_g g + b)),   gated = alpha * x

``W_x``, ``W_g`` and ``psi`` are 1x1 convolutions (``b`` is the bias of ``W_g``; ``psi`` has its own scalar
bias); ``W_g g`` is computed at the resolution of ``g`` and resampled bilinearly to the size of ``x``. The
gating signal ``g`` of the skip at scale ``s`` is the decoder feature of the next coarser scale
(``D7`` gates ``E14``, ``D14`` gates ``E28``, ``D28`` gates ``E56``) and ``G7`` gates ``E7``. Each gated skip
is then compressed by Conv1x1-BN-ReLU to a small skip width: ``P_s = proj_s(alpha_s * E_s)``. The compression
is what keeps a dense-skip decoder on top of a DenseNet-169 encoder near the paper's 12 M parameters (the raw
encoder features have 256 / 512 / 1280 / 1408 channels).

Decoder (symmetric, four upsampling stages 7 -> 14 -> 28 -> 56 -> 112, then a final x2 to 224)::

    D7   = fuse(G7, P7)
    D14  = fuse(up(D7),  P14, [bilinear(P7)])
    D28  = fuse(up(D14), P28, [bilinear(P14), bilinear(P7)])
    D56  = fuse(up(D28), P56, [bilinear(P28), bilinear(P14), bilinear(P7)])
    D112 = conv(up(D56))
    out  = head(up(D112))          # 1x1 conv to one logit channel, no sigmoid

``up`` is a sub-pixel convolution (Shi et al. 2016): 3x3 conv to ``C_out * 4`` channels, PixelShuffle(2), BN,
ReLU, initialised with ICNR (Aitken et al. 2017) so that it starts as nearest upsampling + conv and is free of
checkerboard artefacts at initialisation. ``fuse`` is concatenation followed by a 3x3 conv (+BN+ReLU), then
``convs_per_stage - 1`` further 3x3 conv-BN-ReLU layers.

How the paper's dense-skip sentence is read. The paper says: "Each encoder level not only forwards features to
its corresponding decoder level but also generates intermediately upsampled versions that are fused (via
concatenation followed by 3x3 convolution) into multiple deeper decoder stages." Here "deeper decoder stages" is
read as the decoder stages further along the decoding path, i.e. at the finer scales. So the decoder stage at
scale ``s`` (7, 14, 28, 56 for a 224 input) concatenates (a) the upsampled decoder feature, (b) the
attention-gated encoder feature of scale ``s`` and (c) bilinearly upsampled copies of the attention-gated
encoder features of *all coarser* scales, and fuses them with one 3x3 convolution. Every skip pathway,
including its upsampled copies, carries the gate of its own level (the copies are made after gating). The
stage at 112 and the final 224 step receive no encoder skip: the paper places gates at 56, 28, 14 and 7 only and
puts a gate "into every skip pathway", so there are exactly four skip levels. This is a UNet++-flavoured
"full-scale" skip pattern rather than UNet++'s nested intermediate convolution nodes; the paper describes the
fusion, not nested nodes.

Input contract: float32 intensities in [0, 255] (the engine's 8-bit preprocessed slices). Each branch scales its
input channels inside the module (``InputScale``) so that exported graphs take the raw stacks: image channels
are multiplied by 1/255, the liver-probability channel of the tumour branch is used as is (it is already in
[0, 1]). Outputs are logits; the sigmoid belongs to the loss and to the ONNX export.

Ablation flags (section 4 of the paper): ``dense_skips=False`` gives plain U-Net skips (each stage receives only
its own level), ``subpixel=False`` replaces sub-pixel convolution with bilinear x2 upsampling + 3x3 conv,
``attention=False`` removes the gates (ungated skips). All three off is the "baseline cascaded U-Net".
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cascade_layers import (AttentionGate, BilinearUp, DenseBlock, InputScale, SubPixelUp,
                             Transition, conv_bn_relu, conv_stage, icnr_)

__all__ = [
    "PRESETS",
    "InputScale",
    "DenseBlock",
    "Transition",
    "AttentionGate",
    "SubPixelUp",
    "BilinearUp",
    "AttentionDenseUNet",
    "CascadeNet",
]

#: Network presets. Channel tuples are ordered from coarse to fine:
#: ``decoder_channels`` at scales (7, 14, 28, 56, 112, 224) of a 224 input, ``skip_channels`` and
#: ``gate_channels`` at the four skip scales (7, 14, 28, 56).
PRESETS: Dict[str, dict] = {
    # As published: DenseNet-169-style encoder 6/12/32/24, growth 32, compression 0.5;
    # decoder widths chosen so that one branch has about 12 M parameters: measured 11.91 M (liver branch),
    # of which 10.60 M are the encoder; about 8.2 GFLOPs per 224 x 224 slice.
    "paper": dict(
        block_config=(6, 12, 32, 24),
        growth_rate=32,
        bn_size=4,
        stem_channels=64,
        compression=0.5,
        decoder_channels=(96, 64, 48, 32, 24, 16),
        skip_channels=(64, 32, 24, 16),
        gate_channels=(32, 16, 16, 8),
        convs_per_stage=2,
    ),
    # Same topology, smaller depth and width: trains on 2 CPU cores.
    # Measured: 0.92 M parameters and 1.19 GFLOPs per 224 x 224 slice (liver branch).
    "lite": dict(
        block_config=(4, 8, 16, 12),
        growth_rate=12,
        bn_size=4,
        stem_channels=24,
        compression=0.5,
        decoder_channels=(48, 40, 32, 24, 16, 8),
        skip_channels=(32, 24, 16, 12),
        gate_channels=(16, 12, 8, 8),
        convs_per_stage=2,
    ),
}

_DIVISOR = 32  # total downsampling factor of the encoder


class AttentionDenseUNet(nn.Module):
    """One branch of the cascade: 2.5D attention dense U-Net returning logits (N, 1, H, W).

    Args:
        in_channels: 3 for the liver branch (slice stack), 4 for the tumour branch (stack + liver probability).
        preset: a key of :data:`PRESETS` or a dict with the same keys.
        dense_skips: UNet++-style dense skips (False: plain U-Net skips).
        subpixel: sub-pixel upsampling (False: bilinear x2 + 3x3 conv).
        attention: attention gates on every skip (False: ungated skips).
        input_scale: per-channel multipliers applied to the raw input inside the module; default 1/255 for
            every channel. ``CascadeNet`` passes (1/255, 1/255, 1/255, 1) for the tumour branch.

    Height and width must be multiples of 32.
    """

    def __init__(
        self,
        in_channels: int,
        preset="lite",
        dense_skips: bool = True,
        subpixel: bool = True,
        attention: bool = True,
        input_scale: Optional[Sequence[float]] = None,
        prior_probability: float = 0.5,
    ):
        super().__init__()
        self.prior_probability = float(prior_probability)
        cfg = dict(PRESETS[preset]) if isinstance(preset, str) else dict(preset)
        self.preset_name = preset if isinstance(preset, str) else "custom"
        self.config = cfg
        self.in_channels = int(in_channels)
        self.dense_skips = bool(dense_skips)
        self.subpixel = bool(subpixel)
        self.attention = bool(attention)

        if input_scale is None:
            input_scale = [1.0 / 255.0] * self.in_channels
        if len(input_scale) != self.in_channels:
            raise ValueError(f"input_scale has {len(input_scale)} entries, expected {self.in_channels}")
        self.input_scale = InputScale(input_scale)

        k, bn_size = cfg["growth_rate"], cfg["bn_size"]
        blocks = cfg["block_config"]
        if len(blocks) != 4:
            raise ValueError("block_config must have 4 dense blocks")
        dec_ch = tuple(cfg["decoder_channels"])  # 7, 14, 28, 56, 112, 224
        skip_ch = tuple(cfg["skip_channels"])  # 7, 14, 28, 56
        gate_ch = tuple(cfg["gate_channels"])  # 7, 14, 28, 56
        n_convs = int(cfg.get("convs_per_stage", 2))

        # ---- encoder
        stem = cfg["stem_channels"]
        self.stem = nn.Sequential(
            nn.Conv2d(self.in_channels, stem, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        ch = stem
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        enc_ch: List[int] = []  # fine -> coarse: 56, 28, 14, 7
        for i, n in enumerate(blocks):
            block = DenseBlock(n, ch, k, bn_size)
            self.blocks.append(block)
            ch = block.out_channels
            enc_ch.append(ch)
            if i < 3:
                out = int(math.floor(ch * cfg["compression"]))
                self.transitions.append(Transition(ch, out))
                ch = out
        self.final_norm = nn.BatchNorm2d(ch)
        enc_ch = enc_ch[::-1]  # coarse -> fine: 7, 14, 28, 56

        # ---- bottleneck projection (gating signal of the 7x7 gate)
        self.center = conv_bn_relu(enc_ch[0], dec_ch[0], 1)

        # ---- attention gates and skip projections, coarse -> fine
        self.gates = nn.ModuleList()
        self.skip_proj = nn.ModuleList()
        for lvl in range(4):
            gating_ch = dec_ch[0] if lvl == 0 else dec_ch[lvl - 1]
            if self.attention:
                self.gates.append(AttentionGate(enc_ch[lvl], gating_ch, gate_ch[lvl]))
            else:
                self.gates.append(nn.Identity())
            self.skip_proj.append(conv_bn_relu(enc_ch[lvl], skip_ch[lvl], 1))

        # ---- decoder
        Up = SubPixelUp if self.subpixel else BilinearUp
        self.ups = nn.ModuleList()  # 7->14, 14->28, 28->56, 56->112, 112->224
        self.stages = nn.ModuleList()  # fusion at 7, 14, 28, 56; then conv at 112
        for lvl in range(4):
            if lvl > 0:
                self.ups.append(Up(dec_ch[lvl - 1], dec_ch[lvl]))
            incoming = dec_ch[lvl] + skip_ch[lvl]
            if self.dense_skips:
                incoming += sum(skip_ch[:lvl])
            self.stages.append(conv_stage(incoming, dec_ch[lvl], n_convs))
        self.ups.append(Up(dec_ch[3], dec_ch[4]))
        self.stages.append(conv_stage(dec_ch[4], dec_ch[4], n_convs))
        self.ups.append(Up(dec_ch[4], dec_ch[5]))
        self.head = nn.Conv2d(dec_ch[5], 1, 1)

        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # ICNR after the generic pass
            if isinstance(m, SubPixelUp):
                icnr_(m.conv.weight, 2)
        # The head keeps PyTorch's default weight scale (a tiny one makes the logits grow by only ~lr per step:
        # thousands of steps before any pixel is confidently classified), and its output starts at the
        # class's prior probability (Lin et al., focal loss) instead of p = 0.5 everywhere.
        p = self.prior_probability
        nn.init.constant_(self.head.bias, math.log(p / (1.0 - p)))

    # ------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Encoder features coarse -> fine: [E7, E14, E28, E56] (for a 224 input)."""
        x = self.stem(x)
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < 3:
                skip, x = self.transitions[i](x)
                feats.append(skip)
        feats.append(F.relu(self.final_norm(x)))
        return feats[::-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()):
            if x.dim() != 4 or x.shape[1] != self.in_channels:
                raise ValueError(
                    f"expected input of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
                )
            if x.shape[-2] % _DIVISOR or x.shape[-1] % _DIVISOR:
                raise ValueError(
                    f"height and width must be multiples of {_DIVISOR}, got {tuple(x.shape[-2:])}; "
                    "pad the crop to the next multiple"
                )
        return self._run(x, None)

    def attention_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Attention coefficients alpha of the four gates, coarse -> fine (empty without attention)."""
        maps: List[torch.Tensor] = []
        if self.attention:
            self._run(x, maps)
        return maps

    def _run(self, x: torch.Tensor, maps: Optional[List[torch.Tensor]]) -> torch.Tensor:
        enc = self.encode(self.input_scale(x))
        gate_signal = self.center(enc[0])  # G7: gating signal of the 7x7 gate
        d = gate_signal
        skips: List[torch.Tensor] = []  # projected gated skips P7, P14, ...
        for lvl in range(4):
            e = enc[lvl]
            if self.attention:
                gate = self.gates[lvl]
                alpha = gate.coefficients(e, gate_signal)
                if maps is not None:
                    maps.append(alpha)
                e = e * alpha
            p = self.skip_proj[lvl](e)
            parts = [d, p] if lvl == 0 else [self.ups[lvl - 1](d), p]
            if self.dense_skips:
                for j, s in enumerate(skips):
                    factor = float(2 ** (lvl - j))
                    parts.append(F.interpolate(s, scale_factor=factor, mode="bilinear", align_corners=False))
            skips.append(p)
            d = self.stages[lvl](torch.cat(parts, 1))
            gate_signal = d  # the decoder feature at this scale gates the next finer skip
        d = self.stages[4](self.ups[3](d))  # 112
        return self.head(self.ups[4](d))  # 224: one logit channel


class CoarseBranch(nn.Module):
    """A branch that works at 1/``scale`` of its input's in-plane resolution and answers on the input's grid.

    2×2 (for ``scale`` 2) average pooling, the network, bilinear upsampling of its logit back to the input's size.
    On a slice of the same pixel count the network sees ``scale``× the field of view in millimetres: the liver branch
    needs the whole abdomen (liver against spleen, stomach and heart), not a 224 mm tile of it.
    """

    def __init__(self, net: AttentionDenseUNet, scale: int):
        super().__init__()
        self.net, self.scale = net, int(scale)

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    @property
    def input_scale(self) -> InputScale:
        return self.net.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = self.net(F.avg_pool2d(x, self.scale))
        return F.interpolate(logit, scale_factor=float(self.scale), mode="bilinear", align_corners=False)


class CascadeNet(nn.Module):
    """Liver branch on the 3-slice stack, tumour branch on [stack, sigmoid(liver logit)].

    ``forward(stack)`` with ``stack`` float (N, 3, H, W) in [0, 255] returns ``(liver_logit, tumour_logit)``.
    The liver probability is passed to the tumour branch without detaching, so the cascade is trained end to end
    as in the paper.

    ``liver_scale`` > 1 runs the liver branch at that many times the processing grid's spacing
    (:class:`CoarseBranch`). In training the stack is then a window ``liver_scale`` times the tile's size: the liver
    logit covers the whole window (N, 1, H, W), the tumour branch runs on its central tile
    (N, 1, H / liver_scale, W / liver_scale), as at inference the tumour branch runs on the liver's box only.
    """

    def __init__(self, preset="lite", dense_skips: bool = True, subpixel: bool = True, attention: bool = True,
                 liver_scale: int = 1):
        super().__init__()
        flags = dict(dense_skips=dense_skips, subpixel=subpixel, attention=attention)
        self.preset_name = preset if isinstance(preset, str) else "custom"
        self.flags = flags
        self.liver_scale = int(liver_scale)
        # Priors: the liver fills about a tenth of a training tile, tumour about a hundredth.
        liver = AttentionDenseUNet(3, preset, input_scale=(1 / 255.0,) * 3, prior_probability=0.1, **flags)
        self.liver = CoarseBranch(liver, self.liver_scale) if self.liver_scale > 1 else liver
        self.tumor = AttentionDenseUNet(4, preset, input_scale=(1 / 255.0,) * 3 + (1.0,), prior_probability=0.01, **flags)

    def forward(self, stack: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        liver_logit = self.liver(stack)
        liver_prob = torch.sigmoid(liver_logit).to(stack.dtype)
        tumour_input = torch.cat([stack, liver_prob], 1)
        if self.liver_scale > 1:
            height, width = stack.shape[-2] // self.liver_scale, stack.shape[-1] // self.liver_scale
            y0, x0 = (stack.shape[-2] - height) // 2, (stack.shape[-1] - width) // 2
            tumour_input = tumour_input[..., y0 : y0 + height, x0 : x0 + width]
        return liver_logit, self.tumor(tumour_input)

    def branches(self) -> Dict[str, nn.Module]:
        return {"liver": self.liver, "tumor": self.tumor}

    def branch_inputs(self, size: int = 224) -> Dict[str, Tuple[nn.Module, Tuple[int, ...]]]:
        """Per-branch module and the input shape of one slice (used by the model summary)."""
        liver_size = size * self.liver_scale
        return {
            "liver": (self.liver, (1, 3, liver_size, liver_size)),
            "tumor": (self.tumor, (1, 4, size, size)),
        }
