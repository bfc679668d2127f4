"""Image classification: a :class:`~tasks.base.ZooTask` that knows nothing about the attached adapter.

It owns the head (``task.head``: ``linear``, ``zoo.ImageClassifier``, or ``layernorm_linear``, AST's
LayerNorm + Linear, ``zoo.LayerNormLinearClassifier``), the loss (cross-entropy with optional label
smoothing) and torchmetrics accuracy; the optimizer, schedule, adapter hooks and adapter-only
checkpoints come from :class:`~tasks.base.ZooTask`. Selection: ``val/acc`` (max).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import zoo
from zoo.adapters.base import check_float
from tasks.base import Column, ZooTask, attach_adapter, create_backbone, register_task
from tasks.metrics.classification import accuracy


def build_model(backbone: dict, adapter: dict, num_classes: int, head: str = "linear") -> torch.nn.Module:
    """Backbone from its config, the classifier head ``head`` (:data:`zoo.heads.CLASSIFIER_HEADS`), then the
    adapter (``name`` + its options)."""
    if head not in zoo.CLASSIFIER_HEADS:  # before the backbone is built (it may download weights)
        raise ValueError(f"task.head={head!r}; valid: {', '.join(zoo.CLASSIFIER_HEADS)}")
    return attach_adapter(zoo.build_classifier(create_backbone(backbone), num_classes, head), adapter)


@register_task("classification")
class ClassificationTask(ZooTask):
    monitor_default = "val/acc"
    mode_default = "max"
    columns = (Column("val/acc", "val acc", "pct"), Column("test/acc", "test acc", "pct"))
    predict_output = "logits"
    tiny_overrides = ("experiment=tiny",)

    def __init__(self, backbone: dict, adapter: dict, num_classes: int, optimizer: dict | None = None,
                 scheduler: dict | None = None, label_smoothing: float = 0.0, monitor: str | None = None,
                 monitor_mode: str | None = None, head: str = "linear", **meta: Any):
        super().__init__(backbone, adapter, optimizer, scheduler, monitor, monitor_mode, **meta)
        self.classifier_head = head  # read by build_model (linear | layernorm_linear)
        self.label_smoothing = check_float("task.label_smoothing", label_smoothing, 0.0, 1.0)
        self.save_hyperparameters()
        self.model = self.build_model(backbone, adapter, num_classes)
        self.train_acc = accuracy(num_classes)
        self.val_acc = accuracy(num_classes)
        self.test_acc = accuracy(num_classes)

    def build_model(self, backbone: dict, adapter: dict, num_classes: int) -> torch.nn.Module:
        """The model this task trains (subclasses with other heads override it)."""
        return build_model(backbone, adapter, num_classes, self.classifier_head)

    @classmethod
    def eval_overrides(cls, task_cfg: dict, data_cfg: dict, split: str) -> None:
        """VTAB-style protocols: the test split exists under ``final``, val200 under ``tune``."""
        if "protocol" in data_cfg:
            data_cfg["protocol"] = task_cfg["protocol"] = "final" if split == "test" else "tune"

    def on_fit_start(self) -> None:
        """A head smaller than the data's classes fails here with one line, not in the loss."""
        head = self.hparams.get("num_classes")
        dm = getattr(self.trainer, "datamodule", None)
        data = getattr(dm, "num_classes", None)
        if isinstance(head, int) and isinstance(data, int) and head < data:
            raise ValueError(f"task.num_classes={head}, but the data ({getattr(dm, 'task', '?')}) has {data} classes "
                             f"(labels 0..{data - 1}); leave task.num_classes at its default or set it to {data}")

    # ------------------------------------------------------------------ the problem
    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def update_metrics(self, stage: str, logits: torch.Tensor, y: torch.Tensor) -> None:
        acc = {"train": self.train_acc, "val": self.val_acc, "test": self.test_acc}[stage]
        acc(logits, y)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage != "test")
