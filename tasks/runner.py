"""Build everything a Hydra config names, train, evaluate, and write the run's outputs.

A run's output directory holds ``checkpoints/`` (adapter-only Lightning checkpoints, ``last.ckpt``),
``csv/metrics.csv`` (or TensorBoard logs), ``adapter/`` (the artifact: adapter.safetensors +
adapter.json) and ``metrics.json``::

    {"adapter", "backbone", "task", "dataset", "protocol", "seed", "trainable_params",
     "backbone_params", "artifact_bytes", "val/acc", "test/acc", "train_loss_first", "train_loss_last"}
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager
import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import zoo

log = logging.getLogger("adapter_zoo")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# Errors that mean "the config or the data is wrong", each raised with a message that says what
# to change: the command line shows that message, not a stack trace (ZOO_DEBUG=1 shows it).
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError)


@contextmanager
def user_errors():
    try:
        yield
    except Exception as e:
        cause = e
        while cause.__cause__ is not None or (cause.__context__ is not None and not isinstance(cause, USER_ERRORS)):
            cause = cause.__cause__ or cause.__context__
        if os.environ.get("ZOO_DEBUG") or not isinstance(cause, USER_ERRORS):
            raise
        raise SystemExit(f"error: {cause}") from None


def register_resolvers() -> None:
    from tasks.data.vtab import num_classes

    OmegaConf.register_new_resolver("vtab_classes", num_classes, replace=True)


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else copy.deepcopy(node)


def build_task(cfg: DictConfig) -> L.LightningModule:
    task_cfg = _plain(cfg.task)
    return instantiate(task_cfg, backbone=_plain(cfg.backbone), adapter=_plain(cfg.adapter), _convert_="all", _recursive_=False)


def build_datamodule(cfg: DictConfig, task: L.LightningModule) -> L.LightningDataModule:
    data_cfg = _plain(cfg.data)
    norm = data_cfg.pop("normalize", "backbone")
    if norm == "backbone":
        dc = zoo.find_backbone(task.model).data_config
        mean, std = dc.get("mean"), dc.get("std")
    elif norm == "imagenet":
        mean, std = IMAGENET
    elif norm in (None, "none"):
        mean = std = None
    else:
        raise ValueError(f"data.normalize={norm!r}; valid: backbone, imagenet, none")
    return instantiate(data_cfg, mean=mean, std=std, seed=cfg.seed, _convert_="all")


def build_trainer(cfg: DictConfig, has_val: bool, **overrides: Any) -> L.Trainer:
    from tasks.perf import perf_callbacks

    trainer_cfg = _plain(cfg.trainer)
    trainer_cfg.update(overrides)
    callbacks = perf_callbacks(trainer_cfg)  # trainer.compile / trainer.checkpoint_blocks
    for name, cb in (_plain(cfg.get("callbacks")) or {}).items():
        if not cb or (name.endswith("progress_bar") and not trainer_cfg.get("enable_progress_bar", True)):
            continue
        if name == "model_checkpoint" and not has_val:
            cb["monitor"] = None
        callbacks.append(instantiate(cb))
    loggers = [instantiate(lg) for lg in (_plain(cfg.get("logger")) or {}).values() if lg]
    if not has_val:
        trainer_cfg["limit_val_batches"] = 0
    return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)


def resolve_ckpt(ckpt_path: str | None, out_dir: Path) -> str | None:
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        last = out_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"ckpt_path=last but {last} does not exist; pass hydra.run.dir=<the run's folder>")
        return str(last)
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    return ckpt_path


def load_adapter_checkpoint(task: L.LightningModule, path: str) -> float | None:
    """Put the adapter + head tensors of a (our, adapter-only) Lightning checkpoint into ``task``.

    Returns the checkpoint's monitored score (``ddp_spawn`` does not carry it back to the parent).
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    missing = set(state) - set(task.state_dict())
    if missing:
        raise RuntimeError(f"{path} holds tensors this model lacks: {sorted(missing)[:5]}")
    task.load_state_dict(state, strict=False)
    for cb_state in (ckpt.get("callbacks") or {}).values():
        if isinstance(cb_state, dict) and cb_state.get("best_model_score") is not None:
            return _num(cb_state["best_model_score"])
    return None


def train_losses(out_dir: Path) -> tuple[float | None, float | None]:
    """First and last logged per-step training loss, from the CSV log."""
    f = out_dir / "csv" / "metrics.csv"
    if not f.is_file():
        return None, None
    vals = [float(r["train/loss_step"]) for r in csv.DictReader(f.open()) if r.get("train/loss_step")]
    return (vals[0], vals[-1]) if vals else (None, None)


def _num(x) -> float | None:
    if x is None:
        return None
    v = float(x.item() if hasattr(x, "item") else x)
    return None if math.isnan(v) else v


def train(cfg: DictConfig) -> dict[str, Any]:
    """The whole job for one config; returns the metrics also written to ``metrics.json``."""
    if cfg.task.get("runner"):  # a task with a job of its own (several stages, e.g. task=multitask)
        from hydra.utils import get_method

        return get_method(cfg.task.runner)(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    task = build_task(cfg)
    dm = build_datamodule(cfg, task)
    has_val = getattr(dm, "has_val", True)
    trainer = build_trainer(cfg, has_val)
    if cfg.get("train", True):
        # Data-driven adapter stages (CoLoRA) add parameters, so they run here, in the main
        # process, before fit builds the optimizer and wraps DDP (ddp_spawn children receive
        # this model). Also on resume, so the checkpoint's tensors have a place (prepare is seeded).
        dm.prepare_data()
        dm.setup("fit")
        zoo.prepare_adapters(task.model, dm.train_dataloader())
    trainable, total = zoo.count_parameters(task.model)
    bb_params = zoo.count_parameters(zoo.find_backbone(task.model))[1]
    log.info("adapter %s: %s trainable of %s parameters (%.3f%% of the backbone)",
             cfg.adapter.name, f"{trainable:,}", f"{total:,}", 100 * trainable / max(1, bb_params))

    if cfg.get("train", True):
        trainer.fit(task, datamodule=dm, ckpt_path=resolve_ckpt(cfg.get("ckpt_path"), out_dir))

    metrics: dict[str, Any] = {
        "adapter": cfg.adapter.name,
        "adapter_config": _plain(cfg.adapter),
        "backbone": cfg.backbone.model,
        "task": cfg.task.get("name"),
        "dataset": cfg.task.get("dataset"),
        "protocol": cfg.task.get("protocol"),
        "seed": cfg.seed,
        "trainable_params": trainable - sum(p.numel() for p in task.model.head.parameters() if p.requires_grad) if hasattr(task.model, "head") else trainable,
        "trainable_params_with_head": trainable,
        "backbone_params": bb_params,
        "val/acc": None,
        "test/acc": None,
    }
    ckpt_cb = trainer.checkpoint_callback
    if has_val and ckpt_cb is not None and ckpt_cb.best_model_path:
        # select on validation, never on test
        score = load_adapter_checkpoint(task, ckpt_cb.best_model_path)
        metrics["val/acc"] = _num(ckpt_cb.best_model_score if ckpt_cb.best_model_score is not None else score)
    elif has_val:
        metrics["val/acc"] = _num(trainer.callback_metrics.get("val/acc"))

    run_test = cfg.get("test", "auto")
    if run_test is True or (run_test == "auto" and getattr(dm, "test_set", None) is not None) or \
            (run_test == "auto" and cfg.task.get("protocol") == "final"):
        res = trainer.test(task, datamodule=dm, verbose=False)
        metrics["test/acc"] = _num(res[0].get("test/acc")) if res else None

    if trainer.is_global_zero:
        metrics["train_loss_first"], metrics["train_loss_last"] = train_losses(out_dir)
        art = zoo.save_adapter(task.model, out_dir / "adapter", metrics={k: metrics[k] for k in ("val/acc", "test/acc")},
                               extra={"task": {"name": metrics["task"], "dataset": metrics["dataset"], "protocol": metrics["protocol"]}})
        metrics["artifact_bytes"] = sum(f.stat().st_size for f in art.iterdir() if f.is_file())
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if cfg.get("export_backbone"):
            export_backbone(task.model, Path(cfg.export_backbone))
        if cfg.get("publish"):
            publish(cfg, task.model, out_dir)
        log.info("metrics: %s", json.dumps({k: metrics[k] for k in ("adapter", "dataset", "val/acc", "test/acc")}))
    metrics["out_dir"] = str(out_dir)
    return metrics


def publish(cfg: DictConfig, model: torch.nn.Module, out_dir: Path) -> None:
    """Add this run to the local model-zoo registry (``python -m zoo list`` shows it)."""
    from zoo import hub

    registry = Path(cfg.publish_registry)
    if cfg.get("export_backbone"):
        bb = zoo.find_backbone(model)
        entry = hub.publish_backbone(cfg.export_backbone, cfg.publish, bb.family, bb.model_name,
                                     kwargs=bb.build_kwargs, registry=registry,
                                     description="demo ViT pretrained on rendered upstream images")
    else:
        entry = hub.publish_run(out_dir, cfg.publish, registry=registry,
                                out_dir=Path(cfg.paths.checkpoint_dir) / "zoo" / cfg.publish)
    log.info("published %s to %s (%s)", cfg.publish, registry, entry["kind"])


def export_backbone(model: torch.nn.Module, path: Path) -> None:
    """Save the backbone's weights (adapters merged in, no head) as safetensors."""
    from safetensors.torch import save_file

    m = copy.deepcopy(model)
    zoo.merge_adapters(m, unload=True)
    state = {k: v.contiguous() for k, v in zoo.find_backbone(m).model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    log.info("backbone weights written to %s", path)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate a saved adapter artifact on a split (``test`` or ``val``) of its task."""
    from omegaconf import open_dict

    from zoo.checkpoint import read_adapter_config

    artifact = Path(cfg.artifact)
    meta = read_adapter_config(artifact)
    bmeta = meta["backbone"]
    tag = bmeta.get("weights_tag") or ""
    if tag.startswith("file:") and not cfg.backbone.get("weights"):
        raise ValueError(f"the artifact was trained on base weights from a local file ({tag[5:]}); "
                         f"pass backbone.weights=/path/to/{tag[5:]} (e.g. backbone=vit_demo)")
    with open_dict(cfg):
        cfg.backbone.name = bmeta["family"]
        cfg.backbone.model = bmeta["model"]
        cfg.backbone.kwargs = bmeta.get("kwargs") or {}
        if not tag:  # trained on randomly initialised weights (reproduced by the seed)
            cfg.backbone.pretrained = False if bmeta["family"] != "clip" else None
        cfg.backbone.pop("img_size", None)
        cfg.backbone.img_size = (bmeta.get("kwargs") or {}).get("img_size", meta["preprocessing"]["input_size"][-1])
        cfg.backbone.kwargs.pop("img_size", None)
        if cfg.task.dataset == "auto":
            cfg.task.dataset = (meta.get("task") or {}).get("dataset") or "cifar"
        cfg.task.protocol = "final" if cfg.split == "test" else "tune"
        cfg.task.num_classes = meta["head"]["num_classes"]
        cfg.adapter = {"name": meta["methods"][0]["name"], "init_from": str(artifact)}
        cfg.logger = None
        cfg.callbacks = None
    L.seed_everything(cfg.seed)
    task = build_task(cfg)
    dm = build_datamodule(cfg, task)
    trainer = build_trainer(cfg, has_val=True, enable_checkpointing=False)
    if cfg.split == "test":
        res = trainer.test(task, datamodule=dm, verbose=False)[0]
        metrics = {"test/acc": _num(res.get("test/acc"))}
    else:
        res = trainer.validate(task, datamodule=dm, verbose=False)[0]
        metrics = {"val/acc": _num(res.get("val/acc"))}
    out = {"artifact": str(artifact), "dataset": cfg.task.dataset, **metrics}
    print(json.dumps(out, indent=2))
    return out
