"""Image classification: a :class:`~tasks.base.ZooTask` that knows nothing about the attached adapter.

It owns the head (``zoo.ImageClassifier``), the loss (cross-entropy with optional label
smoothing) and torchmetrics accuracy; the optimizer, schedule, adapter hooks and adapter-only
checkpoints come from :class:`~tasks.base.ZooTask`. Selection: ``val/acc`` (max).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

import zoo
from tasks.base import Column, ZooTask, attach_adapter, create_backbone, register_task


def build_model(backbone: dict, adapter: dict, num_classes: int) -> torch.nn.Module:
    """Backbone from its config, a linear head, then the adapter (``name`` + its options)."""
    return attach_adapter(zoo.ImageClassifier(create_backbone(backbone), num_classes), adapter)


@register_task("classification")
class ClassificationTask(ZooTask):
    monitor_default = "val/acc"
    mode_default = "max"
    columns = (Column("val/acc", "val acc", "pct"), Column("test/acc", "test acc", "pct"))
    predict_output = "logits"
    tiny_overrides = ("experiment=tiny",)

    def __init__(self, backbone: dict, adapter: dict, num_classes: int, optimizer: dict | None = None,
                 scheduler: dict | None = None, label_smoothing: float = 0.0, monitor: str | None = None,
                 monitor_mode: str | None = None, **meta: Any):
        super().__init__(backbone, adapter, optimizer, scheduler, monitor, monitor_mode, **meta)
        self.save_hyperparameters()
        self.model = self.build_model(backbone, adapter, num_classes)
        self.label_smoothing = label_smoothing
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def build_model(self, backbone: dict, adapter: dict, num_classes: int) -> torch.nn.Module:
        """The model this task trains (subclasses with other heads override it)."""
        return build_model(backbone, adapter, num_classes)

    @classmethod
    def eval_overrides(cls, task_cfg: dict, data_cfg: dict, split: str) -> None:
        """VTAB-style protocols: the test split exists under ``final``, val200 under ``tune``."""
        if "protocol" in data_cfg:
            data_cfg["protocol"] = task_cfg["protocol"] = "final" if split == "test" else "tune"

    # ------------------------------------------------------------------ the problem
    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def update_metrics(self, stage: str, logits: torch.Tensor, y: torch.Tensor) -> None:
        acc = {"train": self.train_acc, "val": self.val_acc, "test": self.test_acc}[stage]
        acc(logits, y)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage != "test")
