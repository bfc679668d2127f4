"""Segmentation losses built from segmentation_models_pytorch (smp) pieces.

* ``samed``: ``(1 - w)·CE + w·Dice`` with ``w = dice_weight`` = 0.8 (SAMed ``trainer.py``,
  ``--dice_param 0.8``) on the low-res logits. ``dice="samed"`` is SAMed's own soft Dice (softmax,
  one-hot over K+1 classes *including* background, per class ``1 - (2Σpt + 1e-5)/(Σp² + Σt² + 1e-5)``
  over the whole batch, mean over classes); ``dice="smp"`` is ``smp.losses.DiceLoss('multiclass')``
  (``Σp + Σt`` denominator, classes absent from the batch's target do not count).
* ``focal_dice`` (SALT, ``SALT_config.yml``: focal + Dice): ``smp.losses.FocalLoss('multiclass',
  gamma=2)`` + ``smp.losses.DiceLoss('multiclass')``, weights ``focal_weight``/``dice_weight``
  (the config does not give weights: 1 and 1 here, a reconstruction).
* prompted mode (per-class binary logits, :mod:`zoo.backbones.sam_decoder`): the same pairs in smp's
  ``multilabel`` mode over the classes that were prompted.

Logits and targets must have the same spatial size: the task resizes the target (nearest) to the
logits (SAMed's low-res label).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("samed", "focal_dice", "ce")
DICE_KINDS = ("smp", "samed")


def samed_dice(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """SAMed's ``DiceLoss(num_classes)(logits, target, softmax=True)``, classes incl. background."""
    p = logits.softmax(1)
    t = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).float()
    smooth = 1e-5
    inter = (p * t).sum(dim=(0, 2, 3))
    den = (p * p).sum(dim=(0, 2, 3)) + (t * t).sum(dim=(0, 2, 3))
    return (1 - (2 * inter + smooth) / (den + smooth)).mean()


class SegLoss(nn.Module):
    """``loss(logits (B, C, h, w), target (B, h, w))``; ``C`` = K+1 (semantic) or K (``prompted``)."""

    def __init__(self, kind: str = "samed", dice_weight: float | None = None, focal_weight: float = 1.0,
                 dice: str = "smp", prompted: bool = False, focal_gamma: float = 2.0,
                 focal_alpha: float | None = None):
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"unknown segmentation loss {kind!r}; valid: {', '.join(LOSSES)}")
        if dice not in DICE_KINDS:
            raise ValueError(f"unknown dice {dice!r}; valid: {', '.join(DICE_KINDS)}")
        if dice_weight is None:  # SAMed's 0.8; SALT's focal + Dice adds them (1 : 1)
            dice_weight = 0.8 if kind == "samed" else 1.0
        if not 0.0 <= float(dice_weight):
            raise ValueError(f"dice_weight must be >= 0 (got {dice_weight})")
        if focal_alpha is not None and not 0.0 <= float(focal_alpha) <= 1.0:
            raise ValueError(f"focal_alpha must be in [0, 1] or null (got {focal_alpha})")
        import segmentation_models_pytorch as smp

        self.kind, self.dice_kind, self.prompted = kind, dice, bool(prompted)
        self.dice_weight, self.focal_weight = float(dice_weight), float(focal_weight)
        mode = smp.losses.MULTILABEL_MODE if prompted else smp.losses.MULTICLASS_MODE
        self.dice = smp.losses.DiceLoss(mode, from_logits=True)
        # focal_alpha weighs the positive term α, the negative 1 − α (SALT's reference: α 0.75, γ 3)
        self.focal = smp.losses.FocalLoss(mode, alpha=focal_alpha, gamma=focal_gamma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != target.shape[-2:]:
            raise ValueError(f"logits {tuple(logits.shape[-2:])} and target {tuple(target.shape[-2:])} differ in size")
        if self.prompted:
            return self._prompted(logits, target)
        C = logits.shape[1]
        if self.kind == "ce":
            return F.cross_entropy(logits, target.long())
        if self.kind == "samed":
            dice = samed_dice(logits, target, C) if self.dice_kind == "samed" else self.dice(logits, target.long())
            return (1 - self.dice_weight) * F.cross_entropy(logits, target.long()) + self.dice_weight * dice
        return self.focal_weight * self.focal(logits, target.long()) + self.dice_weight * self.dice(logits, target.long())

    def _prompted(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Binary per class: class k's logit against ``target == k+1`` (multilabel), all classes."""
        K = logits.shape[1]
        t = F.one_hot(target.long(), K + 1)[..., 1:].permute(0, 3, 1, 2).float()
        if self.kind == "focal_dice":
            return self.focal_weight * self.focal(logits, t) + self.dice_weight * self.dice(logits, t)
        bce = F.binary_cross_entropy_with_logits(logits, t)
        return (1 - self.dice_weight) * bce + self.dice_weight * self.dice(logits, t)
