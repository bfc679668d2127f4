"""Restoration losses: ``l1`` (PromptIR), ``mse`` and ``psnr`` (NAFNet's ``PSNRLoss``:
``10/ln10 · mean_i log(MSE_i + 1e-8)``, i.e. minus the mean PSNR up to the epsilon)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSSES = ("l1", "psnr", "mse")


def restoration_loss(kind: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "psnr":
        mse = (pred - target).pow(2).flatten(1).mean(1)
        return 10.0 / math.log(10.0) * torch.log(mse + 1e-8).mean()
    raise ValueError(f"unknown restoration loss {kind!r}; valid: {', '.join(LOSSES)}")
