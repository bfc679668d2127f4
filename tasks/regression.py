"""Dense regression: predict a map per pixel (depth, blur, ...) with a light decoder on a backbone.

The smallest task kind beyond classification and the worked example of the README's "Adding a
task": it declares its monitor (``val/mse``, lower is better), its columns, its head
(``zoo.heads.DenseRegressor``, rebuilt from ``adapter.json`` by ``zoo.from_zoo``) and what
``predict_step`` returns (``maps``); :class:`~tasks.base.ZooTask` does the rest.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanSquaredError

from tasks.base import Column, ZooTask, attach_adapter, create_backbone, register_task
from zoo.heads import DenseRegressor

LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}


@register_task("dense_regression")
class DenseRegressionTask(ZooTask):
    monitor_default = "val/mse"
    mode_default = "min"
    columns = (Column("val/mse", "val MSE", "float"), Column("test/mse", "test MSE", "float"))
    predict_output = "maps"
    tiny_overrides = ("experiment=tiny_depth",)

    def __init__(self, backbone: dict, adapter: dict, out_channels: int = 1, loss: str = "mse",
                 optimizer: dict | None = None, scheduler: dict | None = None, monitor: str | None = None,
                 monitor_mode: str | None = None, **meta: Any):
        super().__init__(backbone, adapter, optimizer, scheduler, monitor, monitor_mode, **meta)
        if loss not in LOSSES:
            raise ValueError(f"task.loss={loss!r}; valid: {', '.join(LOSSES)}")
        self.save_hyperparameters()
        self.model = attach_adapter(DenseRegressor(create_backbone(backbone), out_channels), adapter)
        self.loss_name = loss
        self.train_mse, self.val_mse, self.test_mse = MeanSquaredError(), MeanSquaredError(), MeanSquaredError()

    def loss_fn(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LOSSES[self.loss_name](pred, target)

    def update_metrics(self, stage: str, pred: torch.Tensor, target: torch.Tensor) -> None:
        m = {"train": self.train_mse, "val": self.val_mse, "test": self.test_mse}[stage]
        m(pred, target)
        self.log(f"{stage}/mse", m, on_step=False, on_epoch=True, prog_bar=stage == "val")
