"""Losses of the cascaded segmentation network (section 3.2 of the reference paper).

Per branch ``c``::

    L_c = lambda_dice * L_dice(c) + lambda_bce * L_bce(c)
    L_dice(c) = 1 - (2 sum_i p_i t_i + eps) / (sum_i p_i^2 + sum_i t_i^2 + eps)     (squared denominator)
    L_bce(c)  = mean over the field of view of the binary cross-entropy

    L = w_liver * L_liver + w_tumor * L_tumor,  lambda_dice = 0.7, lambda_bce = 0.3, w_liver = 1, w_tumor = 2

Choices:

- The soft Dice is computed **per batch**: the sums run over every voxel of every slice of the batch (one Dice
  per branch and batch, not a mean of per-slice Dice values). Per-slice Dice is undefined/unstable on the many
  slices without tumour; the batch sum keeps the paper's formula and stays well defined.
- ``eps = 1`` by default. It is small relative to the batch sums (a batch holds >= 10^4 voxels) and makes a batch
  without foreground that is predicted without foreground score a Dice loss of ~0 rather than ~1.
- Both terms are computed from logits: BCE with ``binary_cross_entropy_with_logits`` (log-sum-exp stable), Dice
  with ``sigmoid(logits)``. Everything is cast to float32 and autocast is switched off inside the loss, so the
  loss is finite and accurate when the network runs under bfloat16/float16 autocast.
- An optional ``mask`` restricts both terms to the field of view (``Omega`` in the paper), e.g. to exclude
  padding added to reach a multiple of 32.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["soft_dice_loss", "bce_loss", "dice_bce_loss", "CascadeLoss", "targets_from_labels"]


def prep_logits_and_target(logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor]):
    logits = logits.float()
    target = target.to(device=logits.device, dtype=torch.float32)
    if target.dim() == logits.dim() - 1:
        target = target.unsqueeze(1)
    if target.shape != logits.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    if mask is not None:
        mask = mask.to(device=logits.device, dtype=torch.float32)
        if mask.dim() == logits.dim() - 1:
            mask = mask.unsqueeze(1)
        mask = mask.expand_as(logits)
    return logits, target, mask


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None, eps: float = 1.0
) -> torch.Tensor:
    """Batch soft Dice loss with squared terms in the denominator, from logits."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits, target, mask = prep_logits_and_target(logits, target, mask)
        p = torch.sigmoid(logits)
        if mask is not None:
            p = p * mask
            target = target * mask
        inter = (p * target).sum()
        denom = (p * p).sum() + (target * target).sum()
        return 1.0 - (2.0 * inter + eps) / (denom + eps)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean binary cross-entropy over the field of view, from logits."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits, target, mask = prep_logits_and_target(logits, target, mask)
        if mask is None:
            return F.binary_cross_entropy_with_logits(logits, target)
        per_voxel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return (per_voxel * mask).sum() / mask.sum().clamp_min(1.0)


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    lambda_dice: float = 0.7,
    lambda_bce: float = 0.3,
    eps: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(lambda_dice * dice + lambda_bce * bce, dice, bce)``."""
    dice = soft_dice_loss(logits, target, mask, eps)
    bce = bce_loss(logits, target, mask)
    return lambda_dice * dice + lambda_bce * bce, dice, bce


class CascadeLoss(nn.Module):
    """``w_liver * (0.7 Dice + 0.3 BCE)(liver) + w_tumor * (0.7 Dice + 0.3 BCE)(tumour)``.

    ``forward(liver_logit, tumor_logit, liver_target, tumor_target, mask=None)`` returns ``(total, parts)``;
    ``parts`` holds detached scalars ``liver``, ``liver_dice``, ``liver_bce``, ``tumor``, ``tumor_dice``,
    ``tumor_bce``, ``total``. Targets are binary maps (N, 1, H, W) or (N, H, W) of any dtype.
    """

    def __init__(
        self,
        w_liver: float = 1.0,
        w_tumor: float = 2.0,
        lambda_dice: float = 0.7,
        lambda_bce: float = 0.3,
        eps: float = 1.0,
    ):
        super().__init__()
        self.w_liver = float(w_liver)
        self.w_tumor = float(w_tumor)
        self.lambda_dice = float(lambda_dice)
        self.lambda_bce = float(lambda_bce)
        self.eps = float(eps)

    def forward(
        self,
        liver_logit: torch.Tensor,
        tumor_logit: torch.Tensor,
        liver_target: torch.Tensor,
        tumor_target: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        liver, liver_dice, liver_bce = dice_bce_loss(
            liver_logit, liver_target, mask, self.lambda_dice, self.lambda_bce, self.eps
        )
        tumor, tumor_dice, tumor_bce = dice_bce_loss(
            tumor_logit, tumor_target, mask, self.lambda_dice, self.lambda_bce, self.eps
        )
        total = self.w_liver * liver + self.w_tumor * tumor
        parts = {
            "liver": liver.detach(),
            "liver_dice": liver_dice.detach(),
            "liver_bce": liver_bce.detach(),
            "tumor": tumor.detach(),
            "tumor_dice": tumor_dice.detach(),
            "tumor_bce": tumor_bce.detach(),
            "total": total.detach(),
        }
        return total, parts


def targets_from_labels(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """LiTS labels (0 background, 1 liver, 2 tumour) -> float targets ``(liver, tumour)``.

    The liver target is the whole organ including its tumours (label >= 1), as the cascade segments the liver
    first and the tumour inside it.
    """
    return (labels >= 1).float(), (labels == 2).float()
