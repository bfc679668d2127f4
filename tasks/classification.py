"""Image classification as a LightningModule that knows nothing about the attached adapter.

It owns the head (``zoo.ImageClassifier``), the loss, torchmetrics accuracy and the optimizer
(AdamW over the trainable parameters only, in the groups the adapters ask for, with linear
warm-up then cosine decay per step), and calls the adapter hooks: ``extra_loss`` each step,
``before_optimizer_step`` after backward (``prepare`` runs in ``tasks.runner.train``, before ``fit``
builds the optimizer). Checkpoints hold only the
adapter and head tensors (the frozen backbone is rebuilt from its config).
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from torchmetrics.classification import MulticlassAccuracy

import zoo


def build_model(backbone: dict, adapter: dict, num_classes: int) -> torch.nn.Module:
    """Backbone from its config, a linear head, then the adapter (``name`` + its options)."""
    backbone = dict(backbone)
    family = backbone.pop("name")
    kwargs = dict(backbone.pop("kwargs", None) or {})
    model = zoo.ImageClassifier(zoo.create_backbone(family, **backbone, **kwargs), num_classes)
    adapter = dict(adapter)
    name = adapter.pop("name")
    init_from = adapter.pop("init_from", None)
    if init_from:
        from zoo.checkpoint import load_adapter, read_adapter_config

        path = resolve_artifact(init_from)
        methods = [m["name"] for m in read_adapter_config(path)["methods"]]
        if methods[:1] != [name] and name != "from-artifact":
            raise ValueError(f"adapter.init_from={init_from} holds {methods}, but adapter={name}; use adapter={methods[0]}")
        load_adapter(model, path)
    else:
        zoo.apply_adapter(model, name, **adapter)
    return model


def resolve_artifact(spec: str) -> str:
    """``zoo:NAME`` (a model-zoo entry, downloaded and verified) or a path to an artifact folder."""
    from zoo import hub

    return str(hub.resolve_init(spec))


class ClassificationTask(L.LightningModule):
    def __init__(self, backbone: dict, adapter: dict, num_classes: int, optimizer: dict | None = None,
                 scheduler: dict | None = None, label_smoothing: float = 0.0, **meta: Any):
        super().__init__()
        self.save_hyperparameters()
        self.model = self.build_model(backbone, adapter, num_classes)
        self.optim_cfg = {"lr": 1e-3, "weight_decay": 1e-4, "betas": (0.9, 0.999), **(optimizer or {})}
        self.sched_cfg = {"warmup_epochs": 0, "min_lr": 0.0, **(scheduler or {})}
        self.label_smoothing = label_smoothing
        self.meta = meta
        self.strict_loading = False  # checkpoints hold adapter + head only
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def build_model(self, backbone: dict, adapter: dict, num_classes: int) -> torch.nn.Module:
        """The model this task trains (subclasses with other heads override it)."""
        return build_model(backbone, adapter, num_classes)

    # ------------------------------------------------------------------ steps
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        loss = self.loss_fn(logits, y)
        ctx = zoo.StepContext(model=self.model, inputs=x, targets=y, outputs=logits, loss=loss,
                              loss_fn=self.loss_fn, forward=self.model, batch=batch)
        extra = zoo.extra_loss(self.model, ctx)
        total = loss if extra is None else loss + extra
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        if extra is not None:
            self.log("train/extra_loss", extra, on_step=False, on_epoch=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return total

    def on_before_optimizer_step(self, optimizer) -> None:
        zoo.before_optimizer_step(self.model)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        self.val_acc(logits, y)
        self.log("val/loss", self.loss_fn(logits, y), on_epoch=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        self.test_acc(self.model(x), y)
        self.log("test/acc", self.test_acc, on_epoch=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        c = self.optim_cfg
        groups = zoo.param_groups(self.model, c["lr"], c["weight_decay"])
        opt = torch.optim.AdamW(groups, lr=c["lr"], weight_decay=c["weight_decay"], betas=tuple(c["betas"]))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = min(total - 1, int(round(self.sched_cfg["warmup_epochs"] * total / epochs)))
        cosine = CosineAnnealingLR(opt, T_max=max(1, total - warmup), eta_min=self.sched_cfg["min_lr"])
        sched = cosine if warmup <= 0 else SequentialLR(
            opt, [LinearLR(opt, start_factor=1e-3, total_iters=warmup), cosine], milestones=[warmup])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ adapter-only checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {f"model.{k}" for k in zoo.adapter_state_dict(self.model, export=False)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
