"""E2Net: two-stage edge-enhanced 2D liver and tumour segmentation (seed paper 003, Tang et al.;
SEED_SPECS section 2).

Stage 1, ``R2UNet`` (coarse liver, one output channel):

- backbone Res2Net-50 v1b 26w x 4s (deep stem 3x3 convs 32-32-64, Bottle2neck blocks 3/4/6/3, average-pool
  shortcuts), whose module names match the official ``res2net50_v1b_26w_4s`` so ImageNet weights load directly
  (:meth:`Res2NetBackbone.load_imagenet`); features ``F^1..F^5`` at H/2 .. H/32 with 64/256/512/1024/2048 channels
  (``F^1`` is the stem after BN-ReLU, before the max-pool);
- compression of every ``F^i`` to 32 channels: Conv1x1-BN-ReLU then Conv3x3-BN-ReLU;
- UNet decoder with 32 kernels everywhere: ``d5 = F^5c``; ``d_i = [Conv3x3(32)-BN-ReLU] x 2 (cat(up2(d_{i+1}),
  F^ic))`` for i = 4..1 (bilinear upsampling); head 1x1 conv at H/2, then bilinear x2 to H x W.

Stage 2, ``E2Net`` (liver and tumour, two output channels each), three configurations of the paper's Fig. 2:

- ``edge_branch=False`` - (a) baseline: one R2UNet with two outputs;
- ``edge_branch=True, dcff=False`` - (b) two R2UNets (segmentation and edge branch, separate encoders and
  decoders); their final 32-channel decoder maps are concatenated and fused (Conv3x3(32)-BN-ReLU, Conv1x1(2),
  bilinear x2) into the final segmentation ``s2``;
- ``edge_branch=True, dcff=True`` (default) - (c) E2Net: (b) plus the deep cross feature fusion (DCFF) between
  the compressed features and the decoders.

DCFF (SEED_SPECS 2.2): with ``F1^i`` (segmentation) and ``F2^i`` (edge) the compressed features, for every level
i and every level j >= i of the other branch::

    segmentation: G_j = phi_j(cat[R_j(F1^i), F2^j]); H_5 = G_5; H_j = psi_j(cat[up(H_{j+1}), G_j]); F1'^i = F1^i + H_i
    edge:         G_j = phi_j(R_j(F2^i) * F1^j);     H_5 = G_5; H_j = psi_j(up(H_{j+1}) * G_j);     F2'^i = F2^i + H_i

15 refinement paths per branch, all computed from the unrefined features; ``phi`` and ``psi`` are unshared
Conv3x3(32)-BN-ReLU; ``R_j`` is area downsampling (average pooling by ``2^(j-i)``), ``up`` bilinear.

``E2Net.forward(x)`` returns ``(s2, s1, e)``: logits of the final fused segmentation, of the segmentation branch
and of the edge branch (edge-distance maps), each ``(N, 2, H, W)`` with channels (liver, tumour). The baseline
configuration returns ``(s1, s1, None)``. The model registered as ``e2net`` (:class:`E2NetModel`) holds both
stages: ``model.stage1`` and ``model.stage2``; ``model(x, stage=1)`` / ``model(x, stage=2)``.

Parameter counts (measured): ``paper`` stage 1 23,952,137 (backbone 23,669,352 = Res2Net-50 v1b without its
classifier; SEED_SPECS estimates about 25M), stage 2 48,617,302 (two R2UNet encoders and decoders, DCFF 694,400,
fusion 18,562; SEED_SPECS about 50M); 72,569,439 in all. FLOPs: stage 1 54.1 G per 512 x 512 slice, stage 2
30.9 G per 256 x 256 crop. ``lite`` stage 1 544,018, stage 2 1,267,144 (1,811,162 in all); 2.9 GFLOPs per
512 x 512 slice (stage 1), 2.4 GFLOPs per 256 x 256 crop (stage 2).

Ambiguities and how they are resolved (SEED_SPECS section 2.8):

1. Edge-distance target (background = 1 if read literally): ``g_e = M * (1 - D / max_M D)``, computed in
   ``baseline_losses.edge_distance_map``.
2. The edge branch has its own Res2Net-50 encoder ("same architecture as R2UNet", separate feature sets).
3. Input: one native slice, replicated to the backbone's 3 channels *inside* the network (so ImageNet weights
   apply unchanged and the engine feeds one channel); no 2.5D stacking (the paper claims pure 2D).
   ImageNet initialisation is the recommended start (:meth:`Res2NetBackbone.load_imagenet`, weights from a
   local file; nothing is downloaded).
4. Channel semantics: multi-label sigmoid, channel 0 liver = label >= 1 (tumour included), channel 1
   tumour = label 2. The networks return logits; the sigmoid belongs to the losses and to inference.
5. Decoder and compression convolutions are Conv-BN-ReLU (bias-free); heads are 1x1 convs with bias; the
   final upsampling to full resolution is bilinear x2 after the 1x1 head.
6. Fusion of (b)/(c): concatenation of the two final decoder maps (H/2, 32 + 32 channels), Conv3x3(32)-BN-ReLU,
   Conv1x1(2), bilinear x2.
7. DCFF: the paper's "F1 + F2" motivation is not followed; the described mechanism (concatenation for the
   segmentation branch, multiplication for the edge branch, residual sum) is. ``R_j`` = average pooling.
8. Stage 1 is R2UNet (not E2Net), as the paper used; stage-1 and stage-2 weights are not shared.
9. Initialisation without ImageNet weights: Kaiming-normal (fan-out) convolutions, unit BN, zero biases (the
   official Res2Net initialisation).

Input contract (``INPUT_CONTRACT``): native axial slices (no resampling in z or in-plane), HU clipped to
[-100, 240], ``x = 2 (HU + 100) / 340 - 1`` in [-1, 1]. Stage 1 reads whole slices (512 x 512; 448 x 448 random
crops in training); stage 2 reads, per slice, the stage-1 liver bounding box plus a 35 px margin resized to
256 x 256 (training: the ground-truth box plus a random 10-60 px margin). H and W must be multiples of 32.

Model summary (``branch_inputs``): parts ``stage1`` and ``stage2``, each fed one ``size x size`` slice
``(1, 1, size, size)``: "FLOPs per slice" means per slice of that size (the natural sizes are 512 for stage 1
and 256 for stage 2).
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .presets import preset_config

__all__ = [
    "PRESETS",
    "Bottle2neck",
    "Res2NetBackbone",
    "R2UNetEncoder",
    "R2UNetDecoder",
    "R2UNet",
    "DCFF",
    "E2Net",
    "E2NetModel",
]

#: Res2Net depth/width and the compressed/decoder width ``channels``.
PRESETS: Dict[str, dict] = {
    # As published: Res2Net-50 v1b 26w x 4s, 32-channel compression and decoders.
    "paper": dict(layers=(3, 4, 6, 3), planes=(64, 128, 256, 512), stem=(32, 32, 64), base_width=26, scale=4,
                  channels=32),
    # Same topology, one Bottle2neck per stage, a quarter of the widths, 16-channel decoders.
    "lite": dict(layers=(1, 1, 1, 1), planes=(16, 32, 64, 128), stem=(8, 8, 16), base_width=26, scale=4,
                 channels=16),
}

_DIVISOR = 32


def _cbr(in_ch: int, out_ch: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


def _up(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)  # symbolic when traced for ONNX


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Bottle2neck(nn.Module):
    """Res2Net bottleneck (official parameter names): 1x1 -> ``scale`` splits of ``width`` with hierarchical
    3x3 convs -> 1x1 (x4), residual (average-pool + 1x1 shortcut when the shape changes)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 base_width: int = 26, scale: int = 4, stype: str = "normal"):
        super().__init__()
        width = int(math.floor(planes * (base_width / 64.0)))
        self.conv1 = nn.Conv2d(inplanes, width * scale, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.nums = 1 if scale == 1 else scale - 1
        if stype == "stage":
            self.pool = nn.AvgPool2d(3, stride=stride, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
                                   for _ in range(self.nums))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(self.nums))
        self.conv3 = nn.Conv2d(width * scale, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample
        self.stype = stype
        self.scale = scale
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        spx = torch.split(out, self.width, 1)
        parts: List[torch.Tensor] = []
        sp = spx[0]
        for i in range(self.nums):
            sp = spx[i] if (i == 0 or self.stype == "stage") else sp + spx[i]
            sp = F.relu(self.bns[i](self.convs[i](sp)))
            parts.append(sp)
        if self.scale != 1:
            parts.append(self.pool(spx[self.nums]) if self.stype == "stage" else spx[self.nums])
        out = self.bn3(self.conv3(torch.cat(parts, 1)))
        residual = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + residual)


class Res2NetBackbone(nn.Module):
    """Res2Net v1b feature extractor; ``forward(x)`` -> ``[F1, F2, F3, F4, F5]`` at H/2 .. H/32."""

    def __init__(self, layers: Sequence[int], planes: Sequence[int], stem: Sequence[int], base_width: int = 26,
                 scale: int = 4, in_channels: int = 3):
        super().__init__()
        s1, s2, s3 = (int(c) for c in stem)
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, s1, 3, 2, 1, bias=False), nn.BatchNorm2d(s1), nn.ReLU(inplace=True),
            nn.Conv2d(s1, s2, 3, 1, 1, bias=False), nn.BatchNorm2d(s2), nn.ReLU(inplace=True),
            nn.Conv2d(s2, s3, 3, 1, 1, bias=False),
        )
        self.bn1 = nn.BatchNorm2d(s3)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.base_width = int(base_width)
        self.scale = int(scale)
        self.inplanes = s3
        self.out_channels: List[int] = [s3]
        for i, (n, p) in enumerate(zip(layers, planes)):
            self.add_module(f"layer{i + 1}", self._make_layer(int(p), int(n), stride=1 if i == 0 else 2))
            self.out_channels.append(int(p) * Bottle2neck.expansion)
        _init(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottle2neck.expansion:
            downsample = nn.Sequential(
                nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(self.inplanes, planes * Bottle2neck.expansion, 1, stride=1, bias=False),
                nn.BatchNorm2d(planes * Bottle2neck.expansion),
            )
        layers = [Bottle2neck(self.inplanes, planes, stride, downsample, self.base_width, self.scale, "stage")]
        self.inplanes = planes * Bottle2neck.expansion
        layers += [Bottle2neck(self.inplanes, planes, base_width=self.base_width, scale=self.scale)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        f1 = F.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(f1)
        f2 = self.layer1(x)
        f3 = self.layer2(f2)
        f4 = self.layer3(f3)
        f5 = self.layer4(f4)
        return [f1, f2, f3, f4, f5]

    def load_imagenet(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Loads the official ``res2net50_v1b_26w_4s`` ImageNet ``state_dict`` (its ``fc`` is ignored)."""
        own = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        missing, unexpected = self.load_state_dict(own, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"Res2Net weights do not fit the backbone: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")


class R2UNetEncoder(nn.Module):
    """Res2Net backbone + compression of every level to ``channels`` (Conv1x1-BN-ReLU, Conv3x3-BN-ReLU)."""

    def __init__(self, cfg: Mapping):
        super().__init__()
        c = int(cfg["channels"])
        self.backbone = Res2NetBackbone(cfg["layers"], cfg["planes"], cfg["stem"], cfg["base_width"], cfg["scale"])
        self.compress = nn.ModuleList(nn.Sequential(_cbr(ch, c, 1), _cbr(c, c, 3))
                                      for ch in self.backbone.out_channels)
        _init(self.compress)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if x.shape[1] == 1:  # one CT slice -> the backbone's three channels
            x = torch.cat([x, x, x], 1)
        return [m(f) for m, f in zip(self.compress, self.backbone(x))]


class R2UNetDecoder(nn.Module):
    """UNet decoder on the five compressed levels; returns the H/2 map ``d1`` (``channels`` wide)."""

    def __init__(self, channels: int):
        super().__init__()
        c = int(channels)
        self.blocks = nn.ModuleList(nn.Sequential(_cbr(2 * c, c, 3), _cbr(c, c, 3)) for _ in range(4))
        _init(self)

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        d = feats[4]
        for i in range(3, -1, -1):  # levels 4..1 (0-based 3..0)
            d = self.blocks[i](torch.cat([_up(d, feats[i].shape[-2:]), feats[i]], 1))
        return d


def _check_input(x: torch.Tensor) -> None:
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected slices of shape (N, 1, H, W), got {tuple(x.shape)}")
    if x.shape[-2] % _DIVISOR or x.shape[-1] % _DIVISOR:
        raise ValueError(f"height and width must be multiples of {_DIVISOR}, got {tuple(x.shape[-2:])}")


class R2UNet(nn.Module):
    """Stage-1 network (and the building block of stage 2): ``forward(x)`` (N, 1, H, W) -> logits (N, out, H, W)."""

    def __init__(self, preset="lite", out_channels: int = 1):
        super().__init__()
        cfg = preset_config(PRESETS, preset)
        self.config = cfg
        self.encoder = R2UNetEncoder(cfg)
        self.decoder = R2UNetDecoder(cfg["channels"])
        self.head = nn.Conv2d(int(cfg["channels"]), out_channels, 1)
        _init(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x)
        return _up(self.head(self.decoder(self.encoder(x))), x.shape[-2:])


class DCFF(nn.Module):
    """Deep cross feature fusion of two 5-level feature sets (see the module docstring)."""

    def __init__(self, channels: int, levels: int = 5):
        super().__init__()
        c = int(channels)
        self.levels = int(levels)
        L = self.levels

        def paths(in_ch: int, count) -> nn.ModuleList:
            return nn.ModuleList(nn.ModuleList(_cbr(in_ch, c, 3) for _ in range(count(i))) for i in range(L))

        self.phi_seg = paths(2 * c, lambda i: L - i)
        self.psi_seg = paths(2 * c, lambda i: L - 1 - i)
        self.phi_edge = paths(c, lambda i: L - i)
        self.psi_edge = paths(c, lambda i: L - 1 - i)
        _init(self)

    @staticmethod
    def _down(x: torch.Tensor, factor: int, size: Sequence[int]) -> torch.Tensor:
        if factor == 1:
            return x
        if x.shape[-2] == size[-2] * factor and x.shape[-1] == size[-1] * factor:
            return F.avg_pool2d(x, factor)
        return F.adaptive_avg_pool2d(x, tuple(int(s) for s in size))

    def _refine(self, x: torch.Tensor, i: int, other: List[torch.Tensor], phis: nn.ModuleList,
                psis: nn.ModuleList, concat: bool) -> torch.Tensor:
        gs: List[torch.Tensor] = []
        for j in range(i, self.levels):
            r = self._down(x, 2 ** (j - i), other[j].shape[-2:])
            gs.append(phis[j - i](torch.cat([r, other[j]], 1) if concat else r * other[j]))
        h = gs[-1]
        for j in range(self.levels - 2, i - 1, -1):
            g = gs[j - i]
            u = _up(h, g.shape[-2:])
            h = psis[j - i](torch.cat([u, g], 1) if concat else u * g)
        return x + h

    def forward(self, f_seg: List[torch.Tensor], f_edge: List[torch.Tensor]
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        seg = [self._refine(f_seg[i], i, f_edge, self.phi_seg[i], self.psi_seg[i], True)
               for i in range(self.levels)]
        edge = [self._refine(f_edge[i], i, f_seg, self.phi_edge[i], self.psi_edge[i], False)
                for i in range(self.levels)]
        return seg, edge


class E2Net(nn.Module):
    """Stage-2 network. ``forward(x)`` (N, 1, H, W) -> ``(s2, s1, e)`` logits (N, 2, H, W); see the module doc."""

    def __init__(self, preset="lite", edge_branch: bool = True, dcff: bool = True, out_channels: int = 2):
        super().__init__()
        cfg = preset_config(PRESETS, preset)
        if dcff and not edge_branch:
            raise ValueError("dcff=True needs edge_branch=True (DCFF fuses the segmentation and edge branches)")
        self.config = cfg
        self.edge_branch = bool(edge_branch)
        self.use_dcff = bool(dcff)
        c = int(cfg["channels"])
        self.seg_encoder = R2UNetEncoder(cfg)
        self.seg_decoder = R2UNetDecoder(c)
        self.seg_head = nn.Conv2d(c, out_channels, 1)
        if self.edge_branch:
            self.edge_encoder = R2UNetEncoder(cfg)
            self.edge_decoder = R2UNetDecoder(c)
            self.edge_head = nn.Conv2d(c, out_channels, 1)
            self.dcff = DCFF(c) if self.use_dcff else None
            self.fusion = nn.Sequential(_cbr(2 * c, c, 3), nn.Conv2d(c, out_channels, 1))
        for m in (self.seg_head, getattr(self, "edge_head", None), getattr(self, "fusion", None)):
            if m is not None:
                _init(m)

    def forward(self, x: torch.Tensor):
        _check_input(x)
        size = x.shape[-2:]
        f_seg = self.seg_encoder(x)
        if not self.edge_branch:
            s1 = _up(self.seg_head(self.seg_decoder(f_seg)), size)
            return s1, s1, None
        f_edge = self.edge_encoder(x)
        if self.dcff is not None:
            f_seg, f_edge = self.dcff(f_seg, f_edge)
        d_seg = self.seg_decoder(f_seg)
        d_edge = self.edge_decoder(f_edge)
        s1 = _up(self.seg_head(d_seg), size)
        e = _up(self.edge_head(d_edge), size)
        s2 = _up(self.fusion(torch.cat([d_seg, d_edge], 1)), size)
        return s2, s1, e


class E2NetModel(nn.Module):
    """The two stages of seed paper 003: ``stage1`` (R2UNet, liver) and ``stage2`` (E2Net, liver + tumour).

    ``forward(x, stage=2)`` runs one stage on slices (N, 1, H, W). Flags ``edge_branch`` / ``dcff`` select the
    stage-2 configuration of the paper's ablation (Table 3).
    """

    #: Engine input contract of both presets (see the module docstring).
    INPUT_CONTRACT = {
        "kind": "slice_2d",
        "axes": "zyx",
        "spacing": "native (no resampling)",
        "hu_window": [-100, 240],
        "normalise": "2*(HU+100)/340-1",
        "intensity": {"shift": 100.0, "scale": 2.0 / 340.0, "offset": -1.0},
        "channels": ["ct"],
        "tensor_layout": "N,C,Y,X",
        "size_multiple_yx": [32, 32],
        "stages": {
            "stage1": {
                "input": "whole axial slice (512x512 native; 448x448 random crops in training)",
                "outputs": ["liver"],
                "output_kind": "logits",
                "activation": "sigmoid",
                "thresholds": {"liver": 0.5},
                "postprocess": "optional: largest 3D connected component of the stacked liver mask",
            },
            "stage2": {
                "input": "per slice: stage-1 liver bounding box + 35 px margin, resized (bilinear) to 256x256; "
                         "slices without stage-1 liver are background",
                "shape_yx": [256, 256],
                "outputs": ["liver", "tumour"],
                "final_output": "s2 (first element of the output tuple)",
                "output_kind": "logits",
                "activation": "sigmoid (multi-label)",
                "thresholds": {"liver": 0.5, "tumour": 0.5},
                "output_resampling": "probabilities resized back to the box (bilinear), then thresholded and "
                                     "pasted into the slice",
                "label_rule": "liver where P(liver) > 0.5; tumour where P(tumour) > 0.5 inside the liver",
            },
        },
        "stage2_shape_yx": [256, 256],
        "box_margin_px": 35,
        "thresholds": {"stage1_liver": 0.5, "liver": 0.5, "tumour": 0.5},
        "outputs": ["liver", "tumour"],
        "postprocess": "largest 3D component of the stage-1 liver (the contract's optional step, taken); "
                       "then none (stack the slices into the volume)",
    }

    def __init__(self, preset="lite", edge_branch: bool = True, dcff: bool = True):
        super().__init__()
        self.preset_name = preset if isinstance(preset, str) else "custom"
        self.flags = dict(edge_branch=edge_branch, dcff=dcff)
        self.stage1 = R2UNet(preset, out_channels=1)
        self.stage2 = E2Net(preset, edge_branch=edge_branch, dcff=dcff)

    @property
    def input_contract(self) -> dict:
        return dict(self.INPUT_CONTRACT)

    def forward(self, x: torch.Tensor, stage: int = 2):
        if stage == 1:
            return self.stage1(x)
        if stage == 2:
            return self.stage2(x)
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")

    def branch_inputs(self, size: int = 224) -> Dict[str, Tuple[nn.Module, Tuple[int, ...]]]:
        """``stage1`` and ``stage2``, each on one ``(1, 1, size, size)`` slice ("per slice" = one slice of that
        size; the natural sizes are 512 for stage 1 and 256 for stage 2)."""
        return {"stage1": (self.stage1, (1, 1, size, size)), "stage2": (self.stage2, (1, 1, size, size))}
