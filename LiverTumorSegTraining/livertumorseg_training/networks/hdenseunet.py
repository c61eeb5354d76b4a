"""H-DenseUNet: hybrid densely connected U-Net (seed paper 004, Li et al., IEEE TMI 2018; SEED_SPECS section 3).

The network reads a slab of ``Z`` = 12 axial slices of ``224 x 224`` (tensor ``(N, 1, Z, H, W)``) and has three
parts:

``dense2d`` - 2D DenseUNet-167 (``f_2d`` + ``f_2dcls``), run on every slice of the slab as a 3-slice stack
(the slice and its two neighbours; the two border slices of the slab repeat themselves: ``(s0, s0, s1)`` and
``(s_{Z-2}, s_{Z-1}, s_{Z-1})``). Encoder = DenseNet-161 (pre-activation BN-ReLU-Conv dense layers,
bottleneck ``1x1 -> 4k``, ``3x3 -> k``, growth ``k = 48``, blocks 6/12/36/24, stem 96, compression 0.5); the
module names match torchvision's ``densenet161().features`` so ImageNet weights load directly
(:meth:`DenseUNet2D.load_imagenet_encoder`; the blocks are in :mod:`.densenet`). Decoder (Table I), *sum, then conv*::

    up1  14^2   bilinear x2(BN-ReLU(db4): 2208) + line0(db3: 2112 -> 2208, 1x1 conv)  -> 3x3 conv 768 -BN-ReLU
    up2  28^2   bilinear x2(768) + db2 (768)                                          -> 3x3 conv 384 -BN-ReLU
    up3  56^2   bilinear x2(384) + db1 (384)                                          -> 3x3 conv  96 -BN-ReLU
    up4 112^2   bilinear x2(96)  + conv1 (96, the stem's BN-ReLU output)              -> 3x3 conv  96 -BN-ReLU
    up5 224^2   bilinear x2(96)                           -> 3x3 conv 64 - Dropout(0.3) - BN-ReLU = X_2d (64 ch)
    cls         1x1 conv 64 -> 3                                                      = logits of y_2d

``dense3d`` - 3D DenseUNet-65 (``f_3d``) on ``I (+) y'_2d``: the slab concatenated with the 2D branch's softmax
probabilities restacked into a volume (4 input channels). Encoder: stem ``7x7x7`` conv 96 stride 2 (z too), ``3x3x3``
max-pool stride 2, dense blocks 3/4/12/8 with ``k = 32`` and bottleneck ``1x1x1 -> 128``, transitions with
compression 0.5 and ``2x2x1`` average pooling (z is never pooled after the stem: 12 -> 6 -> 3 -> 3 -> 3 -> 3).
Decoder, *conv, then sum* (see resolution 3 below)::

    up1  14x14x3    3x3x3 conv(bilinear x2(BN-ReLU(db4): 504)) -> 504 -BN-ReLU + line0(db3: 496 -> 504)
    up2  28x28x3    3x3x3 conv(x2) -> 224 -BN-ReLU + db2 (224)
    up3  56x56x3    3x3x3 conv(x2) -> 192 -BN-ReLU + db1 (192)
    up4 112x112x6   3x3x3 conv(x2 in x, y and z) -> 96 -BN-ReLU + conv1 (96)
    up5 224x224x12  3x3x3 conv(x2 in x, y and z) -> 64 -BN-ReLU = X_3d (64 ch)
    cls             1x1x1 conv 64 -> 3 (used when the 3D DenseUNet is trained alone; ignored by the hybrid)

``hff`` - hybrid feature fusion: ``Z = X_3d + X'_2d``; ``H = f_HFF(Z)`` = 3x3x3 conv 64 - Dropout(0.3) - BN - ReLU;
``y_H = f_HFFcls(H)`` = 1x1x1 conv 64 -> 3 (the official code's layers).

``forward(slab)`` returns ``(hybrid_logits, logits_2d)``, both ``(N, 3, Z, H, W)`` (classes background, liver,
tumour; softmax over dim 1): ``y_H`` and the restacked ``y'_2d``. The losses of the three training phases are in
``baseline_losses.HDenseUNetLoss``; :meth:`HDenseUNet.set_phase` freezes the right parts
(``"2d"``: train ``dense2d`` alone on 3-slice stacks through :meth:`HDenseUNet.forward_2d`; ``"3d"``: ``dense2d``
frozen and kept in eval mode, ``dense3d`` + ``hff`` trained; ``"joint"``: everything trained with
``0.5 * L(y, y'_2d) + L(y, y_H)``). :meth:`DenseUNet2D.set_unet_connections` switches the 2D decoder's skip sums
off for the warm-up the paper describes and back on for fine-tuning.

Parameter counts (measured): ``paper`` 2D DenseUNet-167 49,527,843 (encoder 26,472,000 = DenseNet-161
features; the paper's "around 40M" is contradicted by its own Table I, SEED_SPECS derives about 49.5M), 3D
DenseUNet-65 16,227,955 (SEED_SPECS derives about 16.2M), HFF 110,979 (about 111k); total 65,866,777;
931 GFLOPs per 12 x 224 x 224 slab (2D 446, 3D 352, HFF 133).
``lite`` 2D 86,037, 3D 143,059, HFF 1,779; total 230,875; 11.2 GFLOPs per slab.

Ambiguities and how they are resolved (SEED_SPECS section 3.8):

1. Skip-sum channel mismatch at dense block 3 (2D: 2112 vs 2208; 3D: 496 vs 504): a 1x1 projection conv with
   bias (``line0`` in the official code) on the skip. Both decoders have their UNet skip sums, as in the paper
   (the stored ``hybridnet.py`` leaves them out).
2. Parameter counts: the derived counts above are reported, not the paper's "about 40M each".
3. 3D decoder bookkeeping: Table I's 3D widths (504, 224, 192, 96, 64) only line up with the skips
   (db3 496->504, db2 224, db1 192, conv1 96) if each 3D up-stage convolves the upsampled feature first and adds
   the skip to the stage's BN-ReLU output; that reading needs a single projection, which gives exactly the 65
   layers the name counts. The 2D decoder sums first and convolves after (official ``denseunet.py``), which is
   what its widths (768 = db2, 384 = db1, 96 = conv1) require.
4. Input depth: the paper's 12 slices (the code's 8 also work: Z must be a multiple of 4, and H, W multiples
   of 32). With 12 slices z goes 12 -> 6 -> 3 and stays 3.
5. What the 3D branch receives: softmax probabilities of the 2D branch scaled by ``prob_scale`` = 250 (the code
   scales its logits by 250 so that they live on the HU scale of the image channel; probabilities are what the
   paper's text says). The gradient of the hybrid loss flows through them into the 2D branch in the joint phase.
6. Upsampling: bilinear / trilinear (``align_corners=False``) as the paper says; the code's ``UpSampling`` is
   nearest. Upsampling targets the size of the skip it meets, so odd intermediate sizes still line up.
7. Dropout: the 2D decoder keeps the official 2D model's Dropout(0.3) before its last BN; f_HFF has Dropout(0.3)
   between its conv and BN; dropout is element-wise as in Keras.
8. Unstated initialisation: Kaiming-normal (fan-out) convolutions, unit BN, zero biases. BN epsilon 1.1e-5 as
   the official DenseNet port.
9. The coarse liver ResNet that provides the ROI is not part of this model (SEED_SPECS 3.8.7: any 2D liver
   network). Our bundles ship, as component ``coarse_liver``, a frozen copy of this model's own 2D DenseUNet as
   it is after its 2D training phase (trained partly on crops anywhere in the volume), run on whole native
   slices; the engine takes the ROI from it (``LiverTumorSegLib.baseline_networks``).
10. The 3D DenseUNet-65 keeps its own 1x1x1 classifier (Table I counts it) but the hybrid does not use it, so
    :meth:`HDenseUNet.set_phase` keeps it frozen: every trainable parameter then gets a gradient, as
    DistributedDataParallel requires. During the 2D warm-up without UNet connections ``line0`` receives no
    gradient (use ``find_unused_parameters=True`` under DDP for those iterations).

Input contract (``INPUT_CONTRACT``): native resolution (no resampling); HU clipped to [-200, 250], minus 48
(the code's mean, no scaling); inside the coarse liver ROI, in-plane crops/tiles padded to a multiple of 32
(training uses 224 x 224 crops), slabs of 12 consecutive native slices; outputs are 3-class logits (softmax).
``INPUT_CONTRACT`` also carries the inference recipe of the official code (liver threshold 0.5 on
``P(liver) + P(tumour)`` - our reading, the code's exact channel arithmetic is not in the paper -, tumour
threshold 0.9, a z-window of 12 with stride 3 whose outer slice on each side is dropped before averaging - the
code's 8/2/1 scaled to 12 slices -, largest liver component, hole filling, tumour confined to the liver).

Model summary (``branch_inputs``): every part is fed one slab of ``12 x size x size`` (batch of 12 stacks for
``dense2d``), so "FLOPs per slice" in the summary means FLOPs per 12-slice slab of ``size x size``.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .densenet import DenseEncoder, batch_norm, conv_bn_relu, init_weights, resize
from .presets import preset_config

__all__ = [
    "PRESETS",
    "DenseUNet2D",
    "DenseUNet3D",
    "HybridFeatureFusion",
    "HDenseUNet",
    "slab_to_stacks",
    "stacks_to_slab",
]

#: ``dense2d`` / ``dense3d``: stem width, growth rate, dense-block sizes, bottleneck factor, compression;
#: ``up4_channels`` is the width of the 2D decoder's 112^2 stage (its other widths follow from the skips);
#: ``feature_channels`` is the width of X_2d, X_3d and f_HFF; ``slices`` the slab depth.
PRESETS: Dict[str, dict] = {
    # As published (Table I): 2D DenseUNet-167 (DenseNet-161 encoder) + 3D DenseUNet-65 + HFF; 65.87 M parameters.
    "paper": dict(
        dense2d=dict(stem=96, growth=48, blocks=(6, 12, 36, 24), bn_size=4, compression=0.5, up4_channels=96),
        dense3d=dict(stem=96, growth=32, blocks=(3, 4, 12, 8), bn_size=4, compression=0.5),
        feature_channels=64,
        num_classes=3,
        slices=12,
        prob_scale=250.0,
        dropout=0.3,
    ),
    # Same topology and slab, narrow and shallow: 0.23 M parameters, 11.2 GFLOPs per 12 x 224 x 224 slab.
    "lite": dict(
        dense2d=dict(stem=16, growth=8, blocks=(2, 3, 4, 3), bn_size=4, compression=0.5, up4_channels=16),
        dense3d=dict(stem=8, growth=8, blocks=(1, 2, 3, 2), bn_size=4, compression=0.5),
        feature_channels=8,
        num_classes=3,
        slices=12,
        prob_scale=250.0,
        dropout=0.3,
    ),
}



#: torchvision's published DenseNet files name dense-layer parameters "norm.1.weight" instead of "norm1.weight"
_TV_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


class DenseUNet2D(nn.Module):
    """2D DenseUNet (``f_2d`` + ``f_2dcls``). ``forward(x)``, ``x`` (B, 3, H, W) -> ``(X_2d, logits)``.

    H and W must be multiples of 32. ``set_unet_connections(False)`` drops the skip sums (warm-up phase).
    """

    def __init__(self, cfg: Mapping, feature_channels: int, num_classes: int = 3, in_channels: int = 3,
                 dropout: float = 0.3):
        super().__init__()
        self.in_channels = int(in_channels)
        self.features = DenseEncoder(2, in_channels, cfg["stem"], cfg["growth"], cfg["blocks"], cfg["bn_size"],
                                     cfg["compression"])
        stem_ch, db1, db2, db3 = self.features.skip_channels
        top = self.features.out_channels
        widths = (db2, db1, stem_ch, int(cfg["up4_channels"]), int(feature_channels))
        self.decoder_channels = widths
        self.line0 = nn.Conv2d(db3, top, 1)
        self.conv_up0 = conv_bn_relu(2, top, widths[0])
        self.conv_up1 = conv_bn_relu(2, widths[0], widths[1])
        self.conv_up2 = conv_bn_relu(2, widths[1], widths[2])
        self.conv_up3 = conv_bn_relu(2, widths[2], widths[3])
        self.conv_up4 = nn.Sequential(
            nn.Conv2d(widths[3], widths[4], 3, padding=1),
            nn.Dropout(dropout),
            batch_norm(2, widths[4]),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(widths[4], num_classes, 1)
        self.unet_connections = True
        init_weights(self)

    def set_unet_connections(self, enabled: bool) -> None:
        """Switches the decoder's skip sums on or off (off for the paper's warm-up iterations)."""
        self.unet_connections = bool(enabled)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        skips, d = self.features(x)
        stem, db1, db2, db3 = skips
        use = self.unet_connections
        d = resize(d, db3.shape[-2:])
        d = self.conv_up0(d + self.line0(db3) if use else d)
        d = resize(d, db2.shape[-2:])
        d = self.conv_up1(d + db2 if use else d)
        d = resize(d, db1.shape[-2:])
        d = self.conv_up2(d + db1 if use else d)
        d = resize(d, stem.shape[-2:])
        d = self.conv_up3(d + stem if use else d)
        feat = self.conv_up4(resize(d, x.shape[-2:]))
        return feat, self.classifier(feat)

    def load_imagenet_encoder(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Loads a torchvision DenseNet-161 ImageNet ``state_dict`` into the encoder (classifier ignored).

        Accepts both the current key style and the old ``norm.1`` style of torchvision's published file.
        The decoder keeps its random initialisation (SEED_SPECS 3.4).
        """
        own: Dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            m = _TV_OLD_KEY.match(key)
            if m:
                key = m.group(1) + m.group(2)
            if key.startswith("features."):
                own[key[len("features."):]] = value
        missing, unexpected = self.features.load_state_dict(own, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"DenseNet-161 weights do not fit the encoder: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")


class DenseUNet3D(nn.Module):
    """3D DenseUNet-65 (``f_3d``). ``forward(x)``, ``x`` (N, C, Z, H, W) -> ``(X_3d, logits)``.

    Z must be a multiple of 4, H and W multiples of 32.
    """

    def __init__(self, cfg: Mapping, feature_channels: int, num_classes: int = 3, in_channels: int = 4):
        super().__init__()
        self.in_channels = int(in_channels)
        self.features = DenseEncoder(3, in_channels, cfg["stem"], cfg["growth"], cfg["blocks"], cfg["bn_size"],
                                     cfg["compression"])
        stem_ch, db1, db2, db3 = self.features.skip_channels
        top = self.features.out_channels
        widths = (top, db2, db1, stem_ch, int(feature_channels))
        self.decoder_channels = widths
        self.line0 = nn.Conv3d(db3, widths[0], 1)
        self.conv_up0 = conv_bn_relu(3, top, widths[0])
        self.conv_up1 = conv_bn_relu(3, widths[0], widths[1])
        self.conv_up2 = conv_bn_relu(3, widths[1], widths[2])
        self.conv_up3 = conv_bn_relu(3, widths[2], widths[3])
        self.conv_up4 = conv_bn_relu(3, widths[3], widths[4])
        self.classifier = nn.Conv3d(widths[4], num_classes, 1)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        skips, d = self.features(x)
        stem, db1, db2, db3 = skips
        d = self.conv_up0(resize(d, db3.shape[-3:])) + self.line0(db3)
        d = self.conv_up1(resize(d, db2.shape[-3:])) + db2
        d = self.conv_up2(resize(d, db1.shape[-3:])) + db1
        d = self.conv_up3(resize(d, stem.shape[-3:])) + stem
        feat = self.conv_up4(resize(d, x.shape[-3:]))
        return feat, self.classifier(feat)


class HybridFeatureFusion(nn.Module):
    """``f_HFF`` + ``f_HFFcls``: 3x3x3 conv - Dropout(0.3) - BN - ReLU, then a 1x1x1 conv to the classes."""

    def __init__(self, channels: int, num_classes: int = 3, dropout: float = 0.3):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.norm = batch_norm(3, channels)
        self.classifier = nn.Conv3d(channels, num_classes, 1)
        init_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.relu(self.norm(self.drop(self.conv(z)))))


def slab_to_stacks(slab: torch.Tensor) -> torch.Tensor:
    """``F``: (N, 1, Z, H, W) -> (N*Z, 3, H, W), slice ``z`` with its neighbours; border slices repeat themselves."""
    n, _, z, h, w = slab.shape
    padded = torch.cat([slab[:, :, :1], slab, slab[:, :, -1:]], 2)[:, 0]  # (N, Z+2, H, W)
    stacks = torch.stack([padded[:, 0:z], padded[:, 1:z + 1], padded[:, 2:z + 2]], 2)  # (N, Z, 3, H, W)
    return stacks.reshape(n * z, 3, h, w)


def stacks_to_slab(x: torch.Tensor, n: int, z: int) -> torch.Tensor:
    """``F^-1``: (N*Z, C, H, W) -> (N, C, Z, H, W)."""
    c, h, w = x.shape[1:]
    return x.reshape(n, z, c, h, w).permute(0, 2, 1, 3, 4)


class HDenseUNet(nn.Module):
    """H-DenseUNet of seed paper 004. ``forward(slab)`` -> ``(hybrid_logits, logits_2d)``, each (N, 3, Z, H, W).

    Args:
        preset: ``"paper"``, ``"lite"`` or a dict shaped like :data:`PRESETS` entries.
        unet_connections: initial state of the 2D decoder's skip sums (``False`` for the warm-up).
        phase: ``"2d"``, ``"3d"`` or ``"joint"`` (see :meth:`set_phase`).
    """

    #: Engine input contract of both presets (see the module docstring).
    INPUT_CONTRACT = {
        "kind": "slab_2_5d",
        "axes": "zyx",
        "slices": 12,
        "shape_zyx": [12, 224, 224],
        "spacing": "native (no resampling)",
        "hu_window": [-200, 250],
        "normalise": "HU-48",
        "intensity": {"shift": -48.0, "scale": 1.0, "offset": 0.0},
        "channels": ["ct"],
        "tensor_layout": "N,C,Z,Y,X",
        "size_multiple_zyx": [4, 32, 32],
        "roi": "coarse liver mask (the bundle's coarse_liver 2D network on native slices), largest 3D "
               "component, bounding box dilated by 1 voxel in-plane and -5/+10 slices in z",
        "roi_margin": [5, 10, 1],  # slices below (lower index), slices above, pixels in-plane
        "tiling": {"in_plane": "the ROI padded to a multiple of 32 (224x224 crops in training)",
                   "z_window": 12, "z_stride": 3, "z_drop": 1, "merge": "mean of the kept slices' probabilities"},
        "outputs": ["background", "liver", "tumour"],
        "output_kind": "logits",
        "activation": "softmax",
        "thresholds": {"liver": 0.5, "tumour": 0.9},
        "label_rule": "liver = P(liver)+P(tumour) > 0.5; tumour = P(tumour) > 0.9, inside the liver",
        "postprocess": "largest connected component of the liver, binary_fill_holes on liver and tumour, "
                       "tumour outside the final liver removed",
    }

    def __init__(self, preset="lite", unet_connections: bool = True, phase: str = "joint"):
        super().__init__()
        cfg = preset_config(PRESETS, preset)
        self.preset_name = preset if isinstance(preset, str) else "custom"
        self.config = cfg
        feat = int(cfg["feature_channels"])
        classes = int(cfg.get("num_classes", 3))
        dropout = float(cfg.get("dropout", 0.3))
        self.slices = int(cfg.get("slices", 12))
        self.prob_scale = float(cfg.get("prob_scale", 250.0))
        self.num_classes = classes
        self.dense2d = DenseUNet2D(cfg["dense2d"], feat, classes, in_channels=3, dropout=dropout)
        self.dense3d = DenseUNet3D(cfg["dense3d"], feat, classes, in_channels=1 + classes)
        self.hff = HybridFeatureFusion(feat, classes, dropout)
        self.dense2d.set_unet_connections(unet_connections)
        self.phase = "joint"
        self.set_phase(phase)

    @property
    def input_contract(self) -> dict:
        return dict(self.INPUT_CONTRACT)

    # ------------------------------------------------------------------ training phases
    def set_phase(self, phase: str) -> None:
        """``"2d"``: only ``dense2d`` trainable; ``"3d"``: ``dense2d`` frozen (and held in eval mode);
        ``"joint"``: everything trainable. ``dense3d.classifier`` (unused by the hybrid) is always frozen."""
        if phase not in ("2d", "3d", "joint"):
            raise ValueError(f"phase must be '2d', '3d' or 'joint', got {phase!r}")
        self.phase = phase
        for p in self.dense2d.parameters():
            p.requires_grad_(phase != "3d")
        for part in (self.dense3d, self.hff):
            for p in part.parameters():
                p.requires_grad_(phase != "2d")
        # the 3D DenseUNet's own classifier is not used by the hybrid (y_H comes from f_HFFcls): keep it frozen so
        # that every trainable parameter receives a gradient (DistributedDataParallel requires it)
        for p in self.dense3d.classifier.parameters():
            p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "phase", "joint") == "3d":
            self.dense2d.eval()
        return self

    # ------------------------------------------------------------------ forward
    def forward_2d(self, stacks: torch.Tensor) -> torch.Tensor:
        """2D branch alone on 3-slice stacks (B, 3, H, W) -> logits (B, 3, H, W) (phase ``"2d"``)."""
        return self.dense2d(stacks)[1]

    def forward(self, slab: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()):
            if slab.dim() != 5 or slab.shape[1] != 1:
                raise ValueError(f"expected a slab of shape (N, 1, Z, H, W), got {tuple(slab.shape)}")
            z, h, w = (int(s) for s in slab.shape[2:])
            if z % 4 or h % 32 or w % 32:
                raise ValueError(f"Z must be a multiple of 4 and H, W multiples of 32, got {(z, h, w)}")
        n, z = slab.shape[0], slab.shape[2]
        feat2d, logits2d = self.dense2d(slab_to_stacks(slab))
        feat2d = stacks_to_slab(feat2d, n, z)
        logits2d = stacks_to_slab(logits2d, n, z)
        prob2d = torch.softmax(logits2d, 1) * self.prob_scale
        feat3d, _ = self.dense3d(torch.cat([slab, prob2d.to(slab.dtype)], 1))
        return self.hff(feat3d + feat2d), logits2d

    def branch_inputs(self, size: int = 224) -> Dict[str, Tuple[nn.Module, Tuple[int, ...]]]:
        """Parts and inputs for the summary: one slab of ``slices x size x size`` through every part.

        ``dense2d`` reads the slab's ``slices`` 3-slice stacks ``(12, 3, size, size)``, ``dense3d`` the slab with
        the 2D probabilities ``(1, 4, 12, size, size)``, ``hff`` the fused features ``(1, 64, 12, size, size)``.
        "FLOPs per slice" of this model is therefore FLOPs per 12-slice slab.
        """
        z, feat = self.slices, int(self.config["feature_channels"])
        return {
            "dense2d": (self.dense2d, (z, 3, size, size)),
            "dense3d": (self.dense3d, (1, 1 + self.num_classes, z, size, size)),
            "hff": (self.hff, (1, feat, z, size, size)),
        }
