"""Classification metrics: top-1 accuracy as torchmetrics computes it."""
from __future__ import annotations

from torchmetrics.classification import MulticlassAccuracy


def accuracy(num_classes: int) -> MulticlassAccuracy:
    """Top-1 accuracy, the fraction of correctly classified samples (``average="micro"``: torchmetrics'
    default ``macro`` would average per-class recalls instead, which is not what VTAB or CoOp report)."""
    return MulticlassAccuracy(num_classes, average="micro")
