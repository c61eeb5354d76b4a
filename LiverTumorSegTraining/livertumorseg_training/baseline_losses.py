"""Losses of the three seed baselines (SEED_SPECS sections 1.3, 2.3 and 3.4), all computed from logits.

Every loss casts its inputs to float32 and switches autocast off inside, so it is finite and accurate when the
network runs under bfloat16/float16 autocast; probabilities are ``sigmoid``/``softmax`` of the logits and
cross-entropies use the log-sum-exp-stable ``*_with_logits`` forms.

3D U-Net (seed 002), :class:`AdvancedComboLoss`::

    L = 0.3 L_Dice + 0.3 L_BCE + 0.4 L_FT
    L_Dice = 1 - (2 sum pg + s) / (sum p + sum g + s),                              s = 1
    L_BCE  = mean over voxels of BCE-with-logits
    TI     = (sum pg + s) / (sum pg + alpha sum (1-p) g + beta sum p (1-g) + s),    alpha = 0.7 (FN), beta = 0.3 (FP)
    L_FT   = (1 - TI)^(1/gamma),                                                    gamma = 4/3 (exponent 0.75)

  The paper gives only the weights; the component formulas and alpha, beta, gamma, s are SEED_SPECS' [S] choices
  (Abraham & Khan 2019 for the focal Tversky loss). The sums run over the whole batch (the paper trains with one
  volume per batch, so this is the per-volume soft Dice / Tversky index). ``1 - TI`` is clamped to >= 1e-7
  before the power, whose derivative is infinite at 0.

H-DenseUNet (seed 004), :func:`weighted_cross_entropy` and :class:`HDenseUNetLoss`::

    L = -(1/N) sum_i w_{y_i} log softmax(logits_i)_{y_i},     w = (0.78, 0.65, 8.57) for (background, liver, tumour)

  N is the number of voxels (the official code's mean over all voxels, *not* PyTorch's weight-normalised mean).
  Phases: ``"2d"`` ``L(y, y_2d)`` on 2D slices; ``"3d"`` ``L(y, y_H)``; ``"joint"`` ``0.5 L(y, y'_2d) + L(y, y_H)``.
  On slabs the loss skips ``z_margin`` = 1 slice at each end (the official hybrid loss scores the central 6 of 8
  slices; the border slices have replicated neighbours in the 2D branch and padding in the 3D one).

E2Net (seed 003), :class:`E2NetStage1Loss` and :class:`E2NetStage2Loss`::

    stage 1:  IoU(g, s) + BCE(g, s)
    stage 2:  IoU(g_m, s1) + BCE(g_m, s1) + IoU(g_m, s2) + BCE(g_m, s2) + 4 BCE(g_e, e)
    IoU(g, p) = 1 - (sum gp + s) / (sum (g + p - gp) + s)      per image and channel, then averaged; s = 1
    BCE       = mean over pixels (the paper's Eq. 1 sums; the sum would swamp the [0, 1] IoU term)

  Choices: the IoU smoothing ``s = 1`` is not in the paper; without it a slice without tumour scores an IoU loss
  of 1 however small the predicted tumour probabilities are. The edge term is reported as
  ``BCE(g_e, e) - H(g_e)`` (the binary cross-entropy minus the entropy of the soft target, i.e. the Bernoulli
  KL divergence): its gradient is exactly the paper's BCE gradient, and its value is 0 for a perfect prediction
  instead of the target's entropy. The baseline configuration (no edge branch) uses ``IoU + BCE`` of its single
  output. Targets: :func:`e2net_targets` (masks and edge-distance maps of a LiTS label slice).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .losses import prep_logits_and_target

__all__ = [
    "soft_dice_loss",
    "bce_loss",
    "focal_tversky_loss",
    "AdvancedComboLoss",
    "HDENSEUNET_CLASS_WEIGHTS",
    "weighted_cross_entropy",
    "HDenseUNetLoss",
    "iou_loss",
    "soft_bce_excess",
    "E2NetStage1Loss",
    "E2NetStage2Loss",
    "edge_map",
    "edge_distance_map",
    "e2net_targets",
]


def _prep(logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits and a float32 target of the same shape (the cascade loss's check, without a mask)."""
    logits, target, _ = prep_logits_and_target(logits, target, None)
    return logits, target


def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


# ---------------------------------------------------------------------------------------------- seed 002
def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum pg + s) / (sum p + sum g + s)`` over the whole batch, ``p = sigmoid(logits)``."""
    with _no_autocast(logits):
        logits, target = _prep(logits, target)
        p = torch.sigmoid(logits)
        return 1.0 - (2.0 * (p * target).sum() + smooth) / (p.sum() + target.sum() + smooth)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over all elements."""
    with _no_autocast(logits):
        logits, target = _prep(logits, target)
        return F.binary_cross_entropy_with_logits(logits, target)


def focal_tversky_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.7, beta: float = 0.3,
                       gamma: float = 4.0 / 3.0, smooth: float = 1.0) -> torch.Tensor:
    """``(1 - TI)^(1/gamma)``; ``alpha`` weighs false negatives, ``beta`` false positives (batch sums)."""
    with _no_autocast(logits):
        logits, target = _prep(logits, target)
        p = torch.sigmoid(logits)
        tp = (p * target).sum()
        fn = ((1.0 - p) * target).sum()
        fp = (p * (1.0 - target)).sum()
        ti = (tp + smooth) / (tp + alpha * fn + beta * fp + smooth)
        return (1.0 - ti).clamp_min(1e-7) ** (1.0 / gamma)


class AdvancedComboLoss(nn.Module):
    """``0.3 Dice + 0.3 BCE + 0.4 focal Tversky`` of seed paper 002, from logits.

    ``forward(logits, target)`` with logits (N, 1, Z, Y, X) and a binary target of the same shape (or without the
    channel axis) returns ``(total, parts)``; ``parts`` holds detached ``dice``, ``bce``, ``focal_tversky`` and
    ``total``.
    """

    def __init__(self, w_dice: float = 0.3, w_bce: float = 0.3, w_ft: float = 0.4, alpha: float = 0.7,
                 beta: float = 0.3, gamma: float = 4.0 / 3.0, smooth: float = 1.0):
        super().__init__()
        self.w_dice, self.w_bce, self.w_ft = float(w_dice), float(w_bce), float(w_ft)
        self.alpha, self.beta, self.gamma, self.smooth = float(alpha), float(beta), float(gamma), float(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        dice = soft_dice_loss(logits, target, self.smooth)
        bce = bce_loss(logits, target)
        ft = focal_tversky_loss(logits, target, self.alpha, self.beta, self.gamma, self.smooth)
        total = self.w_dice * dice + self.w_bce * bce + self.w_ft * ft
        parts = {"dice": dice.detach(), "bce": bce.detach(), "focal_tversky": ft.detach(), "total": total.detach()}
        return total, parts


# ---------------------------------------------------------------------------------------------- seed 004
#: class weights of the official H-DenseUNet code (background, liver, tumour)
HDENSEUNET_CLASS_WEIGHTS: Tuple[float, float, float] = (0.78, 0.65, 8.57)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                           weights: Sequence[float] = HDENSEUNET_CLASS_WEIGHTS) -> torch.Tensor:
    """``-(1/N) sum_i w_{y_i} log softmax(logits_i)_{y_i}`` over all N voxels.

    ``logits`` (B, C, ...) and integer ``labels`` (B, ...) or (B, 1, ...) with values 0..C-1.
    """
    with _no_autocast(logits):
        logits = logits.float()
        labels = labels.to(device=logits.device)
        if labels.dim() == logits.dim() and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}")
        w = torch.as_tensor(list(weights), dtype=torch.float32, device=logits.device)
        if w.numel() != logits.shape[1]:
            raise ValueError(f"{w.numel()} class weights for {logits.shape[1]} classes")
        per_voxel = F.cross_entropy(logits, labels.long(), weight=w, reduction="none")
        return per_voxel.mean()


class HDenseUNetLoss(nn.Module):
    """Weighted cross-entropy of the three H-DenseUNet training phases.

    ``forward(output, labels)``:

    - phase ``"2d"``: ``output`` = 2D logits (B, 3, H, W) of ``HDenseUNet.forward_2d``, ``labels`` (B, H, W);
    - phase ``"3d"``: ``output`` = ``(hybrid_logits, logits_2d)`` or ``hybrid_logits`` (N, 3, Z, H, W),
      ``labels`` (N, Z, H, W); loss ``L(y, y_H)``;
    - phase ``"joint"``: ``output`` = ``(hybrid_logits, logits_2d)``; loss ``lam * L(y, y'_2d) + L(y, y_H)``.

    Returns ``(total, parts)`` with detached ``hybrid``, ``2d`` (when computed) and ``total``.
    """

    def __init__(self, phase: str = "joint", weights: Sequence[float] = HDENSEUNET_CLASS_WEIGHTS,
                 lam: float = 0.5, z_margin: int = 1):
        super().__init__()
        if phase not in ("2d", "3d", "joint"):
            raise ValueError(f"phase must be '2d', '3d' or 'joint', got {phase!r}")
        self.phase = phase
        self.weights = tuple(float(w) for w in weights)
        self.lam = float(lam)
        self.z_margin = int(z_margin)

    def _crop(self, t: torch.Tensor, z_axis: int) -> torch.Tensor:
        m = self.z_margin
        if m <= 0:
            return t
        z = t.shape[z_axis]
        if z <= 2 * m:
            raise ValueError(f"a slab of {z} slices has nothing left after dropping {m} at each end")
        return t.narrow(z_axis, m, z - 2 * m)

    def _slab_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.dim() == logits.dim():
            labels = labels[:, 0]
        return weighted_cross_entropy(self._crop(logits, 2), self._crop(labels, 1), self.weights)

    def forward(self, output: Union[torch.Tensor, Tuple[torch.Tensor, ...]], labels: torch.Tensor
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if self.phase == "2d":
            logits = output[1] if isinstance(output, (tuple, list)) else output
            loss = weighted_cross_entropy(logits, labels, self.weights)
            return loss, {"2d": loss.detach(), "total": loss.detach()}
        if isinstance(output, (tuple, list)):
            hybrid, logits2d = output[0], output[1]
        else:
            hybrid, logits2d = output, None
        l_h = self._slab_loss(hybrid, labels)
        parts = {"hybrid": l_h.detach()}
        total = l_h
        if self.phase == "joint":
            if logits2d is None:
                raise ValueError("the joint phase needs (hybrid_logits, logits_2d)")
            l_2d = self._slab_loss(logits2d, labels)
            parts["2d"] = l_2d.detach()
            total = self.lam * l_2d + l_h
        parts["total"] = total.detach()
        return total, parts


# ---------------------------------------------------------------------------------------------- seed 003
def iou_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (sum gp + s) / (sum (g + p - gp) + s)`` per image and channel, averaged; ``p = sigmoid(logits)``."""
    with _no_autocast(logits):
        logits, target = _prep(logits, target)
        p = torch.sigmoid(logits)
        dims = tuple(range(2, p.dim()))
        inter = (p * target).sum(dims)
        union = (p + target - p * target).sum(dims)
        return (1.0 - (inter + smooth) / (union + smooth)).mean()


def soft_bce_excess(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean(BCE(g, sigmoid(logits)) - H(g))`` for soft targets ``g`` in [0, 1]: the BCE gradient, minimum 0."""
    with _no_autocast(logits):
        logits, target = _prep(logits, target)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        entropy = -(torch.xlogy(target, target) + torch.xlogy(1.0 - target, 1.0 - target))
        return (bce - entropy).mean()


class E2NetStage1Loss(nn.Module):
    """``IoU(g, s) + BCE(g, s)`` of the stage-1 liver output (logits (N, 1, H, W), target (N, [1,] H, W))."""

    def __init__(self, smooth: float = 1.0):
        super().__init__()
        self.smooth = float(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        iou = iou_loss(logits, target, self.smooth)
        bce = bce_loss(logits, target)
        total = iou + bce
        return total, {"iou": iou.detach(), "bce": bce.detach(), "total": total.detach()}


class E2NetStage2Loss(nn.Module):
    """Eq. 3: ``IoU+BCE(g_m, s1) + IoU+BCE(g_m, s2) + 4 BCE(g_e, e)``.

    ``forward(outputs, masks, edge_targets)``: ``outputs = (s2, s1, e)`` from ``E2Net``; ``masks`` and
    ``edge_targets`` (N, 2, H, W) with channels (liver, tumour). With ``e is None`` (baseline configuration) the
    loss is ``IoU + BCE`` of the single output.
    """

    def __init__(self, edge_weight: float = 4.0, smooth: float = 1.0):
        super().__init__()
        self.edge_weight = float(edge_weight)
        self.smooth = float(smooth)

    def forward(self, outputs: Sequence[Optional[torch.Tensor]], masks: torch.Tensor,
                edge_targets: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        s2, s1, e = outputs
        seg1 = iou_loss(s1, masks, self.smooth) + bce_loss(s1, masks)
        if e is None:
            return seg1, {"seg": seg1.detach(), "total": seg1.detach()}
        if edge_targets is None:
            raise ValueError("edge_targets are needed when the network has an edge branch")
        seg2 = iou_loss(s2, masks, self.smooth) + bce_loss(s2, masks)
        edge = soft_bce_excess(e, edge_targets)
        total = seg1 + seg2 + self.edge_weight * edge
        parts = {"seg": seg1.detach(), "fused": seg2.detach(), "edge": edge.detach(), "total": total.detach()}
        return total, parts


def edge_map(mask: np.ndarray) -> np.ndarray:
    """Inner 1-pixel boundary of a 2D binary mask: ``M XOR erode(M)`` (4-connected; the image border counts as
    outside). Returns bool."""
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    return m & ~ndimage.binary_erosion(m)


def edge_distance_map(mask: np.ndarray) -> np.ndarray:
    """Edge-distance target of E2Net: ``M * (1 - D / max_M D)`` with ``D`` the Euclidean distance to the nearest
    edge pixel (:func:`edge_map`); 1 on the boundary, falling to 0 at the pixel deepest inside, 0 outside
    (and everywhere when the mask is empty). float32."""
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return np.zeros(m.shape, dtype=np.float32)
    edge = edge_map(m)
    dist = ndimage.distance_transform_edt(~edge)
    top = float(dist[m].max())
    if top <= 0.0:
        return m.astype(np.float32)
    return np.where(m, 1.0 - dist / top, 0.0).astype(np.float32)


def e2net_targets(labels: np.ndarray, target: str = "distance") -> Tuple[np.ndarray, np.ndarray]:
    """Stage-2 targets of LiTS label slices ``(..., H, W)`` (0 background, 1 liver, 2 tumour).

    Returns ``(masks, edges)``, both float32 ``(..., 2, H, W)`` with channels (liver = label >= 1,
    tumour = label == 2). ``target="distance"`` gives the edge-distance maps (E2Net), ``"edge"`` the binary edge
    maps (the paper's "+edge" ablation). Computed per slice and per class.
    """
    if target not in ("distance", "edge"):
        raise ValueError(f"target must be 'distance' or 'edge', got {target!r}")
    lab = np.asarray(labels)
    if lab.ndim < 2:
        raise ValueError("labels must have at least two dimensions (H, W)")
    flat = lab.reshape((-1,) + lab.shape[-2:])
    masks = np.zeros((flat.shape[0], 2) + lab.shape[-2:], dtype=np.float32)
    edges = np.zeros_like(masks)
    fn = edge_distance_map if target == "distance" else (lambda m: edge_map(m).astype(np.float32))
    for i, sl in enumerate(flat):
        for c, m in enumerate((sl >= 1, sl == 2)):
            masks[i, c] = m
            edges[i, c] = fn(m)
    shape = lab.shape[:-2] + (2,) + lab.shape[-2:]
    return masks.reshape(shape), edges.reshape(shape)
