"""Segmentation metrics: Dice and IoU (torchmetrics), HD95 (medpy), per class and mean.

* Dice / IoU: ``torchmetrics.functional.segmentation.dice_score`` / ``mean_iou`` on index maps,
  per sample (an image, or a whole volume ``(D, H, W)``) and per foreground class.
* HD95: ``medpy.metric.binary.hd95`` -- the 95th percentile of the *pooled* surface distances of
  both directions, in pixel/voxel units (``voxelspacing=None``), as SAMed reports it. (MONAI's
  ``HausdorffDistanceMetric(percentile=95)`` takes the max of the two directed 95th percentiles
  instead and gives other numbers; we use medpy.)

Empty masks, per (sample, class):

==============  ==========================  =====================================
gt / pred        ``standard``                ``samed`` (SAMed ``calculate_metric_percase``)
==============  ==========================  =====================================
both non-empty   Dice, IoU, HD95             medpy ``dc``, ``hd95``
gt empty only    Dice 0, IoU 0, HD95 nan     Dice 1, HD95 0
pred empty only  Dice 0, IoU 0, HD95 nan     Dice 0, HD95 0
both empty       nan (not counted)           Dice 0, HD95 0
==============  ==========================  =====================================

``nan`` entries are left out of means (``nanmean``); SAMed's table averages every case.
"""
from __future__ import annotations

import math

import numpy as np
import torch

CONVENTIONS = ("standard", "samed")


def _medpy():
    try:
        from medpy.metric.binary import dc, hd95
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise ImportError("HD95 uses medpy: pip install -e '.[seg]' (or pip install medpy scipy)") from e
    return dc, hd95


def dice_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-foreground-class Dice and IoU ``(N, K)`` from index maps ``(N, ...)``.

    ``num_classes`` = K foreground classes (labels 0..K). Both-empty entries are ``nan``.
    """
    from torchmetrics.functional.segmentation import dice_score, mean_iou

    pred, target = pred.long(), target.long()
    d = dice_score(pred, target, num_classes=num_classes + 1, include_background=False, average="none",
                   input_format="index")
    iou = mean_iou(pred, target, num_classes=num_classes + 1, include_background=False, per_class=True,
                   input_format="index").float()
    iou[iou < 0] = float("nan")  # torchmetrics marks both-empty with -1
    return d.reshape(pred.shape[0], num_classes).float(), iou.reshape(pred.shape[0], num_classes)


def hd95_binary(pred: np.ndarray, gt: np.ndarray, convention: str = "standard") -> float:
    """HD95 (medpy, pixel units) of two binary masks with the empty-mask ``convention``."""
    _, hd95 = _medpy()
    p, g = bool(pred.any()), bool(gt.any())
    if p and g:
        return float(hd95(pred, gt))
    if convention == "samed":
        return 0.0
    return float("nan")


def samed_case(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """SAMed's ``calculate_metric_percase``: ``(dice, hd95)`` of binary masks, its quirks included."""
    dc, hd95 = _medpy()
    p, g = pred.sum() > 0, gt.sum() > 0
    if p and g:
        return float(dc(pred, gt)), float(hd95(pred, gt))
    if p and not g:
        return 1.0, 0.0
    return 0.0, 0.0


def per_class_scores(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     convention: str = "standard", hd95: bool = True) -> dict[str, torch.Tensor]:
    """``dice``, ``iou``, ``hd95`` as ``(N, K)`` tensors for index maps ``(N, H, W)`` or ``(N, D, H, W)``."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown metric convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    dice, iou = dice_iou(pred, target, num_classes)
    hd = torch.full_like(dice, float("nan"))
    p_np, t_np = pred.cpu().numpy(), target.cpu().numpy()
    for n in range(pred.shape[0]):
        for k in range(1, num_classes + 1):
            pk, tk = p_np[n] == k, t_np[n] == k
            if convention == "samed":
                dice[n, k - 1], hd[n, k - 1] = samed_case(pk, tk)
            elif hd95:
                hd[n, k - 1] = hd95_binary(pk, tk)
            if convention == "standard" and not tk.any() and pk.any():
                dice[n, k - 1] = 0.0  # torchmetrics already gives 0 here; kept explicit
    return {"dice": dice, "iou": iou, "hd95": hd}


def summarize(scores: dict[str, torch.Tensor], class_names: list[str] | None = None) -> dict[str, float]:
    """Means over samples per class (``dice/<name>``) and over classes (``dice``), ignoring nan."""
    out: dict[str, float] = {}
    for metric, t in scores.items():
        per_class = torch.nanmean(t.float(), dim=0) if t.numel() else t.new_zeros(0)
        names = class_names or [str(k + 1) for k in range(t.shape[1])]
        for name, v in zip(names, per_class.tolist()):
            out[f"{metric}/{name}"] = v
        vals = [v for v in per_class.tolist() if not math.isnan(v)]
        out[metric] = sum(vals) / len(vals) if vals else float("nan")
    return out
