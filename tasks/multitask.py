"""Multi-task training then few-shot transfer (the MHR protocol, Caccia et al., NeurIPS 2023).

``python train.py task=multitask adapter=mhr`` runs two stages, each a normal run of
:func:`tasks.runner.train` in its own sub-folder of the output directory:

1. ``multitask/``: one model, a head per task, trained on the union of several VTAB-style tasks.
   Every batch mixes tasks; each sample carries its task id, which the task hands to the adapter
   (``zoo.set_task``) before the forward, so task-routed adapters (MHR) pick that task's routing.
2. ``fewshot/``: a held-out task with ``shots`` training images per class. A fresh model gets the
   adapter in its transfer variant (``task.fewshot.variant``: ``mhr_z`` = a fresh routing row over
   the frozen inventory, ``mhr_mu`` = the averaged adapter, ``mhr`` = routing + inventory) and its
   inventory from stage 1's artifact (:func:`zoo.adapters.mhr.load_inventory`), then trains as a
   plain :class:`~tasks.classification.ClassificationTask` with a new head.

The run's ``metrics.json`` is the few-shot stage's, plus ``multitask/...`` entries of stage 1.
"""
from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch.utilities import rank_zero_only
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

import zoo
from zoo.heads import MultiHeadClassifier
from tasks.base import attach_adapter, create_backbone, register_task
from tasks.classification import ClassificationTask
from tasks.data.vtab import VTABDataModule, num_classes
from tasks.metrics.classification import accuracy


# ---------------------------------------------------------------------- model
def build_multitask_model(backbone: dict, adapter: dict, num_classes: Sequence[int]) -> MultiHeadClassifier:
    model = MultiHeadClassifier(create_backbone(backbone), num_classes)
    adapter = dict(adapter)
    # task-routed adapters (MHR) need one routing row per task
    if "n_tasks" in inspect.signature(zoo.ADAPTERS.get(adapter["name"]).__init__).parameters:
        adapter["n_tasks"] = len(num_classes)
    return attach_adapter(model, adapter)


# ---------------------------------------------------------------------- stage 1
@register_task("multitask_classification")
class MultiTaskClassificationTask(ClassificationTask):
    """Classification on several tasks at once; batches are ``(x, y, task_id)``.

    Reuses :class:`ClassificationTask`'s optimizer (adapter param groups), schedule, adapter
    hooks and adapter-only checkpoints; only the model, the loss over per-task heads and the
    per-task metrics differ. ``val/acc`` is the mean of the tasks' accuracies.
    """

    tiny_overrides = ("experiment=multitask_tiny",)

    def __init__(self, backbone: dict, adapter: dict, datasets: Sequence[str], optimizer: dict | None = None,
                 scheduler: dict | None = None, label_smoothing: float = 0.0, **meta: Any):
        classes = [num_classes(d) for d in datasets]
        self.datasets, self.classes = list(datasets), classes  # read by build_model during super().__init__
        super().__init__(backbone, adapter, max(classes), optimizer, scheduler, label_smoothing, datasets=list(datasets), **meta)
        self.val_task_acc = nn.ModuleList(accuracy(c) for c in classes)
        self.test_task_acc = nn.ModuleList(accuracy(c) for c in classes)

    def build_model(self, backbone: dict, adapter: dict, num_classes: int) -> MultiHeadClassifier:
        return build_multitask_model(backbone, adapter, self.classes)

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the batch, each sample over its own task's classes."""
        loss = logits.new_zeros(())
        for i in t.unique().tolist():
            rows = t == i
            loss = loss + F.cross_entropy(logits[rows, : self.classes[i]], y[rows], label_smoothing=self.label_smoothing,
                                          reduction="sum")
        return loss / y.numel()

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self.model(x, task_ids)

    def batch_loss(self, batch) -> torch.Tensor:
        x, y, t = (v.to(next(self.model.parameters()).device) for v in batch)
        return self.task_loss(self.model(x, t), y, t)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, t = batch
        logits = self.model(x, t)
        loss = self.task_loss(logits, y, t)
        ctx = zoo.StepContext(model=self.model, inputs=x, targets=y, outputs=logits, loss=loss,
                              loss_fn=lambda out, tgt: self.task_loss(out, tgt, t),
                              forward=lambda inp: self.model(inp, t), batch=batch, extras={"task_ids": t})
        extra = zoo.extra_loss(self.model, ctx)
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        if extra is not None:
            self.log("train/extra_loss", extra, on_step=False, on_epoch=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss if extra is None else loss + extra

    def _eval_step(self, batch, metrics: nn.ModuleList, prefix: str) -> None:
        x, y, t = batch
        logits = self.model(x, t)
        for i in t.unique().tolist():
            rows = t == i
            metrics[i].update(logits[rows, : self.model.num_classes[i]], y[rows])
        if prefix == "val":
            self.log("val/loss", self.task_loss(logits, y, t), on_epoch=True, sync_dist=True)

    def _eval_end(self, metrics: nn.ModuleList, prefix: str) -> None:
        accs = []
        for name, m in zip(self.datasets, metrics):
            if m.update_count:  # a task with no samples in this split/rank has nothing to report
                acc = m.compute()
                accs.append(acc)
                self.log(f"{prefix}/acc_{name}", acc, sync_dist=True)
            m.reset()
        if accs:
            self.log(f"{prefix}/acc", torch.stack(accs).mean(), prog_bar=prefix == "val", sync_dist=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_task_acc, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end(self.val_task_acc, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_task_acc, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end(self.test_task_acc, "test")


class TaskTagged(Dataset):
    """``(x, y)`` samples of one task -> ``(x, y, task_id)``."""

    def __init__(self, dataset: Dataset, task_id: int):
        self.dataset, self.task_id = dataset, task_id

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, y, self.task_id


class MultiTaskDataModule(VTABDataModule):
    """The union of several VTAB tasks, each sample tagged with its task's index in ``datasets``.

    Every option is the :class:`VTABDataModule`'s, applied to each task; loaders are its own.
    """

    def __init__(self, datasets: Sequence[str], **kwargs: Any):
        if not datasets:
            raise ValueError("MultiTaskDataModule needs at least one dataset")
        super().__init__(dataset=datasets[0], **kwargs)
        self.parts = [VTABDataModule(dataset=d, **kwargs) for d in datasets]

    def prepare_data(self) -> None:
        for p in self.parts:
            p.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for p in self.parts:
            p.setup(stage)

        def union(split: str):
            sets = [getattr(p, split) for p in self.parts]
            return None if sets[0] is None else ConcatDataset([TaskTagged(s, i) for i, s in enumerate(sets)])

        self.train_set, self.val_set, self.test_set = union("train_set"), union("val_set"), union("test_set")


# ---------------------------------------------------------------------- stage 2
class FewShotTask(ClassificationTask):
    """A :class:`ClassificationTask` whose MHR adapter starts from a multi-task inventory."""

    def __init__(self, backbone: dict, adapter: dict, num_classes: int, inventory: str, **kwargs: Any):
        from zoo.adapters.mhr import load_inventory

        super().__init__(backbone, adapter, num_classes, inventory=inventory, **kwargs)
        load_inventory(self.model, inventory)


class FewShotDataModule(VTABDataModule):
    """A VTAB task with ``shots`` training images per class (the first ones of a seeded shuffle)."""

    def __init__(self, shots: int, **kwargs: Any):
        super().__init__(**kwargs)
        if shots < 1:
            raise ValueError(f"shots must be >= 1, got {shots}")
        self.shots = shots

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        labels = torch.tensor([y for _, y in self.train_set.items])
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        keep = torch.cat([order[labels[order] == c][: self.shots] for c in labels.unique()])
        self.train_set = Subset(self.train_set, sorted(keep.tolist()))


# ---------------------------------------------------------------------- the two-stage run
def _stage(cfg: DictConfig, out_dir: Path, task: dict, data: dict, adapter: dict | None = None) -> DictConfig:
    c = copy.deepcopy(cfg)
    with open_dict(c):
        c.paths.output_dir = str(out_dir)
        c.task = OmegaConf.create(task)
        c.data = OmegaConf.create(data)
        if adapter is not None:
            c.adapter = OmegaConf.create(adapter)
    return c


def run(cfg: DictConfig) -> dict[str, Any]:
    """Stage 1 (multi-task) then stage 2 (few-shot on ``task.heldout``); see the module docstring."""
    from tasks.runner import train, write_metrics

    out = Path(cfg.paths.output_dir)
    t = OmegaConf.to_container(cfg.task, resolve=True)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    fs = t.pop("fewshot")
    heldout = t.pop("heldout")
    t.pop("runner")
    if heldout in t["datasets"]:
        raise ValueError(f"the held-out task {heldout!r} is also a multi-task training task {t['datasets']}")

    stage1 = train(_stage(cfg, out / "multitask", {**t, "_target_": "tasks.multitask.MultiTaskClassificationTask",
                                                    "dataset": "+".join(t["datasets"])},
                          {**data, "_target_": "tasks.multitask.MultiTaskDataModule"}))

    from zoo.adapters.mhr import fewshot_adapter
    from zoo.checkpoint import read_adapter_config

    adapter = fewshot_adapter(OmegaConf.to_container(cfg.adapter, resolve=True), fs.pop("variant"),
                              read_adapter_config(out / "multitask" / "adapter"))
    shots = fs.pop("shots")
    data.pop("datasets")
    task2 = {"_target_": "tasks.multitask.FewShotTask", "name": "fewshot", "dataset": heldout, "protocol": t["protocol"],
             "num_classes": num_classes(heldout), "monitor": t["monitor"], "inventory": str(out / "multitask" / "adapter"),
             **fs}
    stage2 = train(_stage(cfg, out / "fewshot", task2,
                          {**data, "_target_": "tasks.multitask.FewShotDataModule", "dataset": heldout, "shots": shots},
                          adapter))

    schema = ("out_dir", "schema_version", "kind", "columns")  # the run's own, from stage 2
    metrics = {**stage2, **{f"multitask/{k}": v for k, v in stage1.items() if k not in schema}}
    metrics["task"], metrics["out_dir"] = "multitask", str(out)
    if rank_zero_only.rank == 0:
        write_metrics(out / "metrics.json", metrics)
    return metrics
