"""The task contract: what a kind of problem declares, so that one runner serves them all.

A **task kind** is one LightningModule subclass of :class:`ZooTask` (plus its DataModule and a
``conf/task/<name>.yaml``), registered with :func:`register_task`. It declares:

========================  ====================================================================
``kind``                  its registered name; recorded in ``metrics.json`` and ``adapter.json``
``monitor``, ``mode``     the validation metric that selects the checkpoint and whether lower
                          or higher is better (``val/acc`` max, ``val/mse`` min, ...);
                          ``task.monitor`` / ``task.monitor_mode`` in the config override them
``columns``               the metrics written to ``metrics.json``, as :class:`Column` (key,
                          header, format): they are also the summary table's columns
``build_model``           backbone + head + adapter; the head is a :mod:`zoo.heads` head, so
                          its ``head_spec()`` goes to ``adapter.json`` and ``from_spec`` rebuilds
                          it on load (``zoo.from_zoo``, ``eval.py``)
``preprocessing()``       the input preprocessing record of the artifact
``predict_output``        what ``predict_step`` returns under that key (``logits``, ``masks``,
                          ``fields``, ``images``, ``captions``, ...)
``eval_overrides``        how ``eval.py`` selects a split (``val`` / ``test``) in the recorded
                          task and data configs
``tiny_overrides``        the overrides of a seconds-long run (the conformance tests use them)
========================  ====================================================================

and implements the problem itself: :meth:`loss_fn`, :meth:`update_metrics` (and, when the
batch is not ``(inputs, targets, ...)``, :meth:`split_batch`). Everything else every kind shares
lives here: the training step with the adapter hooks (``on_train_step``, ``extra_loss``,
``before_optimizer_step``), AdamW (or the optimizer an adapter supplies: ``make_optimizer``) over the adapters' parameter groups with linear warm-up then cosine decay per step, and
adapter-only checkpoints.

The runner (``tasks/runner.py``), ``eval.py``, ``tasks.report``, ``bench.vtab`` and the model zoo
read only these declarations and the ``metrics.json`` they produce (:func:`read_metrics`).
"""
from __future__ import annotations

import importlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

import zoo
from zoo.api import OPTIMIZERS
from zoo.registry import Registry

from tasks.options import OPTIMIZER, SCHEDULER, check_betas, check_options

BASE_SCHEDULES = ("cosine", "multistep")

METRICS_SCHEMA_VERSION = 2

TASK_KINDS: Registry = Registry("task kind")

# Modules that define task kinds; :func:`task_kinds` imports them all (a new kind adds its module).
TASK_MODULES: list[str] = ["tasks.classification", "tasks.multitask", "tasks.regression", "tasks.fewshot", "tasks.segmentation",
                          "tasks.pde", "tasks.audio",
                          "tasks.restoration", "tasks.captioning"]


def register_task(name: str):
    """Class decorator: ``@register_task("dense_regression")`` on a :class:`ZooTask` subclass."""

    def deco(cls):
        cls.kind = name
        return TASK_KINDS.register(name)(cls)

    return deco


def task_kinds() -> dict[str, type["ZooTask"]]:
    """Every registered task kind (imports :data:`TASK_MODULES`)."""
    for mod in TASK_MODULES:
        importlib.import_module(mod)
    return {n: TASK_KINDS.get(n) for n in TASK_KINDS.names()}


@dataclass(frozen=True)
class Column:
    """A metric a task writes to ``metrics.json`` and shows in the summary table.

    ``fmt``: ``pct`` (a fraction shown ×100 with one decimal), ``float`` (4 significant digits)
    or ``int``.
    """

    key: str
    header: str
    fmt: str = "float"

    def format(self, v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        if self.fmt == "pct":
            return f"{100 * float(v):.1f}"
        if self.fmt == "int":
            return f"{int(v):,}"
        return f"{float(v):.4g}"


MODES = ("min", "max")


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite; the run stops before saving anything."""


class ZooTask(L.LightningModule):
    """Base class of every task kind; see the module docstring for what a subclass declares."""

    kind: ClassVar[str] = ""
    monitor_default: ClassVar[str] = "val/acc"
    mode_default: ClassVar[str] = "max"
    columns: ClassVar[tuple[Column, ...]] = ()
    predict_output: ClassVar[str] = "outputs"
    tiny_overrides: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backbone: dict, adapter: dict, optimizer: dict | None = None, scheduler: dict | None = None,
                 monitor: str | None = None, monitor_mode: str | None = None, **meta: Any):
        super().__init__()
        self.monitor = monitor or self.monitor_default
        self.monitor_mode = monitor_mode or self.mode_default
        if self.monitor_mode not in MODES:
            raise ValueError(f"task.monitor_mode={self.monitor_mode!r}; valid: {', '.join(MODES)}")
        if not self.monitor.startswith("val/"):
            raise ValueError(f"task.monitor={self.monitor!r}: the monitor must be a validation metric (val/...)")
        self.optim_cfg = {"lr": 1e-3, "weight_decay": 1e-4, "betas": (0.9, 0.999), **(optimizer or {})}
        self.sched_cfg = {"warmup_epochs": 0, "min_lr": 0.0, "cosine_epochs": None, "warmup_lr_init": None,
                          **(scheduler or {})}
        self.optim_cfg.update(check_options("task.optimizer", self.optim_cfg, OPTIMIZER))
        if (self.optim_cfg.get("name") or "adamw") not in OPTIMIZERS:
            raise ValueError(f"task.optimizer.name={self.optim_cfg['name']!r}; valid: {', '.join(OPTIMIZERS)}")
        check_betas("task.optimizer", self.optim_cfg["betas"])
        self.sched_cfg.update(check_options("task.scheduler", self.sched_cfg, SCHEDULER))
        self.meta = meta
        self.strict_loading = False  # checkpoints hold adapter + head only

    # ------------------------------------------------------------------ declarations
    @classmethod
    def metric_columns(cls) -> tuple[Column, ...]:
        return cls.columns

    def declaration(self) -> dict[str, Any]:
        """What ``metrics.json`` and ``adapter.json`` record about the task kind."""
        return {"kind": self.kind, "target": f"{type(self).__module__}.{type(self).__qualname__}",
                "monitor": {"name": self.monitor, "mode": self.monitor_mode},
                "columns": [asdict(c) for c in self.metric_columns()], "predict_output": self.predict_output}

    def preprocessing(self) -> dict[str, Any]:
        """The input preprocessing record of the artifact (default: the backbone's data config)."""
        bb = zoo.find_backbone(self.model)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in bb.data_config.items()
                if k in ("input_size", "mean", "std", "interpolation", "crop_pct")}

    @classmethod
    def eval_overrides(cls, task_cfg: dict, data_cfg: dict, split: str) -> None:
        """Adjust the run's recorded task/data configs (in place) so that ``split`` is evaluated."""

    def protocol_details(self, datamodule: L.LightningDataModule) -> dict[str, Any]:
        """What ``metrics.json``'s ``protocol`` record adds for this kind (:mod:`tasks.protocol`): the metric's
        backend and the axes it averages over, the horizon, the normalisation. Default: the input normalisation
        (the DataModule's ``normalisation``, which the runner sets for image DataModules)."""
        return {"normalisation": getattr(datamodule, "normalisation", None)}

    def run_metrics(self, trainer: L.Trainer, datamodule: L.LightningDataModule) -> dict[str, Any]:
        """Metrics computed once after training and testing (e.g. retention); default none."""
        return {}

    # ------------------------------------------------------------------ the problem (subclasses)
    def split_batch(self, batch) -> tuple[Any, Any]:
        """``(inputs, targets)`` of a batch; the default reads ``batch[0], batch[1]``."""
        return batch[0], batch[1]

    def forward(self, x):
        return self.model(x)

    def loss_fn(self, outputs, targets) -> torch.Tensor:
        raise NotImplementedError

    def update_metrics(self, stage: str, outputs, targets) -> None:
        """Update and log the ``stage`` (``train`` | ``val`` | ``test``) metrics of one batch."""
        raise NotImplementedError

    # ------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = self.split_batch(batch)
        outputs = self(x)
        loss = self.loss_fn(outputs, y)
        ctx = zoo.StepContext(model=self.model, inputs=x, targets=y, outputs=outputs, loss=loss,
                              loss_fn=self.loss_fn, forward=self.model, batch=batch)
        extra = zoo.extra_loss(self.model, ctx)
        # sync_dist: under DDP the logged step loss is the mean over ranks, i.e. the global batch's loss
        # (what one process with the global batch logs), not rank 0's share
        # the batch size named: Lightning cannot tell it from a batch of several differently sized parts
        # (a caption batch: frames and strings) and warned on every run
        n = len(y) if torch.is_tensor(y) else None
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=n)
        if extra is not None:
            self.log("train/extra_loss", extra, on_step=False, on_epoch=True, batch_size=n)
        self.update_metrics("train", outputs.detach() if torch.is_tensor(outputs) else outputs, y)
        return loss if extra is None else loss + extra

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """The one finite-loss check of every task kind: Lightning calls this for every loss a
        ``training_step`` returns (whichever kind wrote it), before its backward pass."""
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"the training loss became {float(loss.detach().float().mean())} at step {self.global_step} (epoch "
                f"{self.current_epoch}): most likely the learning rate is too high for this "
                f"adapter (task.optimizer.lr={self.optim_cfg['lr']}; try 10x lower). Training stopped; "
                + ("the last good checkpoint is kept in the run's checkpoints/ folder" if self.current_epoch
                   else "no epoch had finished, so no checkpoint was written")
                + " and nothing was saved or published")

    def on_before_optimizer_step(self, optimizer) -> None:
        zoo.before_optimizer_step(self.model)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # the optimizer-step count: every micro-batch of one accumulated step, every DDP rank and a
        # resumed run see the same value (DyLoRA's rank sampler is a function of it)
        zoo.on_train_step(self.model, self.global_step)

    def batch_loss(self, batch) -> torch.Tensor:
        """The training loss of one batch, without logging: what data-driven adapter stages
        (``zoo.prepare_adapters(..., loss_fn=task.batch_loss)``, e.g. LoRA-GA's gradient pass) use."""
        x, y = self.split_batch(batch)
        dev = next(self.model.parameters()).device
        move = lambda t: t.to(dev) if torch.is_tensor(t) else t  # noqa: E731
        return self.loss_fn(self(move(x)), move(y))

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = self.split_batch(batch)
        outputs = self(x)
        self.log("val/loss", self.loss_fn(outputs, y), on_epoch=True, sync_dist=True)
        self.update_metrics("val", outputs, y)

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = self.split_batch(batch)
        self.update_metrics("test", self(x), y)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        x = self.split_batch(batch)[0] if isinstance(batch, (list, tuple)) else batch
        return {self.predict_output: self(x)}

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """The optimizer's groups: ``task.optimizer.encoder_lr`` (default: ``lr``) for the trainable parameters
        inside the backbone (its adapters; every weight under ``adapter=full``), ``lr`` for the rest (the task
        head, decoders). A new, randomly initialised head then learns at its own rate while the pretrained body
        moves slowly (discriminative fine-tuning: Howard & Ruder, ACL 2018; Kumar et al., ICLR 2022, on how a
        random head distorts pretrained features). The papers of most methods use one lr for all."""
        # task.optimizer.decay_1d: biases and norms decay too (AST / PETL-AST decay every trainable parameter)
        groups = zoo.param_groups(self.model, lr, weight_decay, decay_1d=bool(self.optim_cfg.get("decay_1d", False)))
        enc_lr = self.optim_cfg.get("encoder_lr")
        if enc_lr is None or float(enc_lr) == float(lr):
            return groups
        if not float(lr) > 0:
            raise ValueError(f"task.optimizer.lr must be > 0 with encoder_lr set (got {lr})")
        body = getattr(self.model, "backbone", None)
        enc = {id(p) for p in (body if isinstance(body, torch.nn.Module) else zoo.find_backbone(self.model)).parameters()}
        scale, out = float(enc_lr) / float(lr), []
        for g in groups:
            inside = [p for p in g["params"] if id(p) in enc]
            outside = [p for p in g["params"] if id(p) not in enc]
            if inside:
                out.append({**g, "params": inside, "lr": g["lr"] * scale})
            if outside:
                out.append({**g, "params": outside})
        return out

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over :meth:`param_groups`, or the optimizer an adapter replaces it with
        (``Adapter.make_optimizer``: GaLore, LoRA-Pro)."""
        c = self.optim_cfg
        return zoo.build_optimizer(self.model, self.param_groups(c["lr"], c["weight_decay"]), c["lr"],
                                   c["weight_decay"], tuple(c["betas"]), float(c.get("eps", 1e-8)),
                                   name=c.get("name") or "adamw")

    def configure_optimizers(self):
        """``task.scheduler.name``: ``cosine`` (default: linear warm-up over ``warmup_epochs``, then cosine to
        ``min_lr``, per step; timm's form with ``cosine_epochs``) or ``multistep``: the learning rate times
        ``gamma`` after every ``every`` epochs from epoch ``start_epoch`` on, i.e. AST's
        ``MultiStepLR(range(lrscheduler_start, 1000, lrscheduler_step), gamma=lrscheduler_decay)``, stepped
        once per epoch. (Tasks with schedules of their own, SAMed's ``poly`` and MORPH's ``plateau``, handle
        those names before calling this.)"""
        opt = self.build_optimizer()
        name = self.sched_cfg.get("name") or "cosine"
        if name not in BASE_SCHEDULES:
            raise ValueError(f"task.scheduler.name={name!r}; valid here: {', '.join(BASE_SCHEDULES)}")
        if name == "multistep":
            c = self.sched_cfg
            milestones = list(range(int(c.get("start_epoch", 5)), 1000, int(c.get("every", 1))))
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=float(c.get("gamma", 0.85)))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        if self.sched_cfg.get("cosine_epochs"):
            return {"optimizer": opt, "lr_scheduler": {"scheduler": self._timm_cosine(opt, total / epochs), "interval": "step"}}
        warmup = min(total - 1, int(round(self.sched_cfg["warmup_epochs"] * total / epochs)))
        cosine = CosineAnnealingLR(opt, T_max=max(1, total - warmup), eta_min=self.sched_cfg["min_lr"])
        sched = cosine if warmup <= 0 else SequentialLR(
            opt, [LinearLR(opt, start_factor=1e-3, total_iters=warmup), cosine], milestones=[warmup])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _timm_cosine(self, opt, steps_per_epoch: float):
        """timm's ``CosineLRScheduler(t_initial=cosine_epochs, warmup_t=warmup_epochs, lr_min=min_lr,
        warmup_lr_init=...)`` per step: the cosine runs over ``cosine_epochs`` (it may be longer than the
        run: Hydra's VTAB schedule, t_initial=500 over 100 epochs, stays near the peak), with the
        warm-up counted inside it (timm's ``warmup_prefix=False``)::

            t < warmup:  lr = w0 + t (lr0 − w0) / warmup
            else:        lr = lr_min + ½ (lr0 − lr_min)(1 + cos(π t / T))
        """
        from torch.optim.lr_scheduler import LambdaLR

        c = self.sched_cfg
        T, warm, lr_min = float(c["cosine_epochs"]), float(c["warmup_epochs"] or 0), float(c["min_lr"])
        w0 = float(c["warmup_lr_init"] if c.get("warmup_lr_init") is not None else lr_min)
        if T <= 0:
            raise ValueError(f"task.scheduler.cosine_epochs must be > 0 (or null), got {T}")

        def factor(base: float):
            def f(step: int) -> float:
                t = step / steps_per_epoch
                lr = w0 + t * (base - w0) / warm if t < warm else lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * t / T))
                return lr / base if base else 0.0
            return f

        return LambdaLR(opt, [factor(g["lr"]) for g in opt.param_groups])

    # ------------------------------------------------------------------ adapter-only checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {f"model.{k}" for k in zoo.adapter_state_dict(self.model, export=False)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        if getattr(self, "data_identity", None) is not None:  # which data (plain values): compared on resume
            checkpoint["zoo_data"] = self.data_identity


# ---------------------------------------------------------------------- building the model
def create_backbone(backbone: dict) -> zoo.Backbone:
    """A backbone from its config group (``name``, ``model``, ..., ``kwargs``)."""
    backbone = dict(backbone)
    family = backbone.pop("name")
    kwargs = dict(backbone.pop("kwargs", None) or {})
    return zoo.create_backbone(family, **backbone, **kwargs)


def attach_adapter(model: torch.nn.Module, adapter: dict) -> torch.nn.Module:
    """Apply the adapter config (``name`` + options) to ``model``, or load ``init_from``
    (``zoo:NAME`` or an artifact folder) when given."""
    adapter = dict(adapter)
    name = adapter.pop("name")
    init_from = adapter.pop("init_from", None)
    if init_from:
        from zoo import hub
        from zoo.checkpoint import load_adapter, read_adapter_config

        path = str(hub.resolve_init(init_from))
        methods = [m["name"] for m in read_adapter_config(path)["methods"]]
        if methods[:1] != [name] and name != "from-artifact":
            raise ValueError(f"adapter.init_from={init_from} holds {methods}, but adapter={name}; use adapter={methods[0]}")
        load_adapter(model, path)
    else:
        zoo.apply_adapter(model, name, **adapter)
    return model


# ---------------------------------------------------------------------- metrics.json
LEGACY_COLUMNS = (Column("val/acc", "val acc", "pct"), Column("test/acc", "test acc", "pct"))


def read_metrics(path: str | Path) -> dict[str, Any]:
    """A run's ``metrics.json``, upgraded to the current schema.

    Files written before the contract (no ``schema_version``) were image classification
    selected on ``val/acc``; they read as such.
    """
    m = json.loads(Path(path).read_text())
    if not isinstance(m, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return upgrade_metrics(m)


def upgrade_metrics(m: dict[str, Any]) -> dict[str, Any]:
    if m.get("schema_version") is None:
        m = {**m, "schema_version": 1}
        m.setdefault("kind", "classification")
        m.setdefault("monitor", {"name": "val/acc", "mode": "max", "value": m.get("val/acc")})
        m.setdefault("columns", [asdict(c) for c in LEGACY_COLUMNS])
    return m


def columns_of(m: dict[str, Any]) -> list[Column]:
    return [Column(**c) for c in (m.get("columns") or [])]


def monitor_value(m: dict[str, Any]) -> float | None:
    return (m.get("monitor") or {}).get("value")


def better(a: float, b: float, mode: str) -> bool:
    """``a`` is better than ``b`` under ``mode`` (``min`` | ``max``)."""
    return a < b if mode == "min" else a > b


def number(x) -> float | None:
    """A plain float from a tensor / number; ``None`` for missing or NaN."""
    if x is None:
        return None
    v = float(x.item() if hasattr(x, "item") else x)
    return None if math.isnan(v) else v
