"""Build everything a Hydra config names, train, evaluate, and write the run's outputs.

Task-agnostic: what differs between kinds of problem comes from the task's declaration
(:mod:`tasks.base`). A run's output directory holds ``checkpoints/`` (adapter-only Lightning
checkpoints, ``last.ckpt``), ``csv/metrics.csv`` (or TensorBoard logs), ``adapter/`` (the artifact:
adapter.safetensors + adapter.json, which records the task kind and its configs) and
``metrics.json`` (schema 2)::

    {"schema_version": 2, "kind": "classification",
     "monitor": {"name": "val/acc", "mode": "max", "value": 0.41},
     "columns": [{"key": "val/acc", "header": "val acc", "fmt": "pct"}, ...],
     "adapter", "adapter_config", "backbone", "task", "dataset", "seed",
     "protocol": {"name", "splits", "selection", "validated_on", ... (tasks/protocol.py)},
     "selection": "val" | "last" | "val_is_test" | "none" (evaluate-only), "validated_on": <the validation split's name or null>,
     "trainable_params", "trainable_params_with_head", "backbone_params", "artifact_bytes", "step_ms",
     "report": {"baseline", "metric", "reference"} (the sweep's caption settings, tasks/report.py),
     "config_id": <hash of the resolved config but for seed / fold: which runs are replicates of one row>,
     "published": <the zoo name this run was published under, or null (publish / publish_seed)>,
     <every column's key: "val/acc", "test/acc", ...>, "train_loss_first", "train_loss_last"}
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager, nullcontext
import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

import zoo
from tasks.base import METRICS_SCHEMA_VERSION, number
from tasks.options import check_run_options
from tasks.protocol import EVALUATE_ONLY, describe_splits, protocol_record, resolve_selection, trains

log = logging.getLogger("adapter_zoo")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


from tasks.errors import USER_ERRORS, user_error_of, user_errors  # noqa: E402,F401 (re-exported)


class _DropAdverts(logging.Filter):
    # Lightning's "💡 Tip: ... try installing [litmodels] / [litlogger]" lines (one per fit)
    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("💡 Tip") or "litmodels" in msg or "litlogger" in msg)


LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


def one_console() -> None:
    """Each log line on the console once, when the root logger has a handler (Hydra's console + file).

    ``import lightning`` gives the ``lightning`` logger a console handler of its own (``INFO: ...``) and
    lets records propagate to the root too, so every Lightning line was printed twice; imported before
    any root handler, ``lightning.pytorch`` / ``lightning.fabric`` also keep theirs and stop propagating
    (then Hydra's file log lacks them). With a root handler present, Lightning's own console handlers
    go and everything propagates: one line on the console, every line in the run's log file. Without
    one (a plain script), Lightning's handlers stay: its messages are still shown.
    """
    if not logging.getLogger().handlers:
        return
    for name in LIGHTNING_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if type(h) is logging.StreamHandler:  # a console handler (not a file handler, a subclass)
                lg.removeHandler(h)
        lg.propagate = True


def quiet_logs() -> None:
    """No third-party advertisement tip on every run, each line once on the console (:func:`one_console`),
    and no warnings the project cannot act on: the DataLoader-workers hint (the tiny / eval configs use
    ``num_workers=0`` on purpose) and Lightning's own use of a deprecated torch ``_pytree`` API."""
    import warnings

    one_console()
    lg = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdverts) for f in lg.filters):
        lg.addFilter(_DropAdverts())
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # ddp_spawn's processes start a fresh interpreter: they inherit filters only through the environment
    # (PYTHONWARNINGS: comma-separated, the message a literal prefix, so it stops before the message's comma)
    leaf = "ignore:`isinstance(treespec:FutureWarning"
    have = os.environ.get("PYTHONWARNINGS", "")
    if leaf not in have.split(","):
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [have, leaf]))


def register_resolvers() -> None:
    from tasks.resolvers import register_resolvers as register

    register()


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else copy.deepcopy(node)


def build_task(cfg: DictConfig, recorded: bool = False) -> L.LightningModule:
    """The task of ``cfg.task``; ``recorded=True`` (an artifact's config): only an allow-listed
    class, called directly (:mod:`tasks.recorded`)."""
    task_cfg = _plain(cfg.task)
    if recorded:
        from tasks.recorded import TASK_TARGETS, construct

        return construct(task_cfg, TASK_TARGETS, "task", backbone=_plain(cfg.backbone), adapter=_plain(cfg.adapter))
    return instantiate(task_cfg, backbone=_plain(cfg.backbone), adapter=_plain(cfg.adapter), _convert_="all", _recursive_=False)


def check_data(cfg: DictConfig) -> None:
    """Check the data on disk before the task builds (or downloads) any weights.

    The DataModule's ``check_data`` (a function attribute of its ``_target_``), called with the data
    config's keys it takes, looks only at folders and list files: a missing dataset fails in a second,
    naming where to get it and the layout expected, not after a weights download.
    """
    from hydra.utils import get_method

    data_cfg = _plain(cfg.data)
    target = data_cfg.pop("_target_", None)
    check = getattr(get_method(target), "check_data", None) if target else None
    if check is None:
        return
    import inspect

    params = inspect.signature(check).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        data_cfg = {k: v for k, v in data_cfg.items() if k in params}
    check(**data_cfg)


def build_datamodule(cfg: DictConfig, task: L.LightningModule, recorded: bool = False) -> L.LightningDataModule:
    """The DataModule of ``cfg.data`` with the run's seed; image DataModules (a ``normalize`` key)
    also get the normalisation's mean and std, and the backbone's data config (timm's input size,
    interpolation, crop) when they take one (``data_config``, the image-folder layout).
    ``recorded=True`` (an artifact's config): only an allow-listed class, called directly, never
    recursively (:mod:`tasks.recorded`)."""
    data_cfg = _plain(cfg.data)
    if recorded:
        from tasks.recorded import DATA_TARGETS, construct

        make = lambda c, **kw: construct(c, DATA_TARGETS, "data", **kw)
    else:
        make = lambda c, **kw: instantiate(c, _convert_="all", **kw)
    if "normalize" not in data_cfg:
        return make(data_cfg, seed=cfg.seed)
    norm = data_cfg.pop("normalize")
    dc = dict(zoo.find_backbone(task.model).data_config)
    if data_cfg.get("layout") == "imagefolder":
        data_cfg["data_config"] = dc
    if norm == "backbone":
        mean, std = dc.get("mean"), dc.get("std")
    elif norm == "imagenet":
        mean, std = IMAGENET
    elif norm in (None, "none"):
        mean = std = None
    else:
        raise ValueError(f"data.normalize={norm!r}; valid: backbone, imagenet, none")
    dm = make(data_cfg, mean=mean, std=std, seed=cfg.seed)
    # recorded in metrics.json's protocol: the statistics the inputs were normalised with
    dm.normalisation = {"name": norm, "mean": None if mean is None else [float(v) for v in mean],
                        "std": None if std is None else [float(v) for v in std]}
    return dm


def build_trainer(cfg: DictConfig, has_val: bool, task: L.LightningModule | None = None, select_on_val: bool = True,
                  **overrides: Any) -> L.Trainer:
    """The Lightning Trainer of ``cfg.trainer`` with the configured callbacks and loggers.

    The checkpoint callback monitors what the task declares (``task.monitor`` / ``monitor_mode``), unless
    the run does not select on validation (``select_on_val=False``: ``task.selection=last``).
    """
    from tasks.trainer.perf import StepTimer, perf_callbacks

    quiet_logs()
    trainer_cfg = _plain(cfg.trainer)
    trainer_cfg.update(overrides)
    from tasks.trainer.progress import ProgressLines

    callbacks = perf_callbacks(trainer_cfg) + [StepTimer()]  # trainer.compile / trainer.checkpoint_blocks; step_ms
    callbacks.append(ProgressLines(trainer_cfg.pop("progress_every_s", None) or 30))  # a line every 30 s, any output mode
    for name, cb in (_plain(cfg.get("callbacks")) or {}).items():
        if not cb or (name.endswith("progress_bar") and not trainer_cfg.get("enable_progress_bar", True)):
            continue
        if name == "model_checkpoint":
            if not has_val or not select_on_val:  # selection=last: keep the latest checkpoint, not the best
                cb["monitor"] = None
            elif task is not None:
                cb["monitor"], cb["mode"] = task.monitor, task.monitor_mode
        callbacks.append(instantiate(cb))
    loggers = [instantiate(lg) for lg in (_plain(cfg.get("logger")) or {}).values() if lg]
    if not has_val:
        trainer_cfg["limit_val_batches"] = 0
    from tasks.trainer.checkpoint_io import AtomicCheckpointIO

    plugins = list(trainer_cfg.pop("plugins", None) or []) + [AtomicCheckpointIO()]
    return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=plugins)


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
    from tasks.trainer.checkpoint_io import load_checkpoint

    ckpt = load_checkpoint(path)
    state = ckpt["state_dict"]
    missing = set(state) - set(task.state_dict())
    if missing:
        raise RuntimeError(f"{path} holds tensors this model lacks: {sorted(missing)[:5]}")
    task.load_state_dict(state, strict=False)
    for cb_state in (ckpt.get("callbacks") or {}).values():
        if isinstance(cb_state, dict) and cb_state.get("best_model_score") is not None:
            return _num(cb_state["best_model_score"])
    return None


# task keys that say which problem a checkpoint was trained on (not how long or with which optimiser)
RESUME_TASK_KEYS = ("name", "dataset", "protocol", "num_classes", "fold", "val_fold", "shots", "subsample",
                    "heldout", "datasets", "class_names", "head", "context", "scale", "data_dir")


# data keys that say only how the data is loaded, not which data: a resume may change them (a smaller batch to fit)
DATA_LOADING_KEYS = ("batch_size", "eval_batch_size", "num_workers", "cache_dir", "bad_files", "persistent_workers",
                     "pin_memory")


def data_identity(cfg: DictConfig) -> dict[str, Any]:
    """The data config without its loading keys: written into every checkpoint (``zoo_data``) and compared
    on resume, so another data root, file, generated set or split rule is named, not trained on silently."""
    data = _plain(cfg.data) if cfg.get("data") is not None else {}
    return {k: v for k, v in data.items() if k not in DATA_LOADING_KEYS}


def check_resume(cfg: DictConfig, ckpt: str, out_dir: Path) -> tuple[list[dict], int] | None:
    """Refuse to resume from a checkpoint of another adapter/backbone config or another problem
    (task.dataset, protocol, classes...: :data:`RESUME_TASK_KEYS`), naming what differs,
    before any training; returns the CSV log rows to keep (those before the checkpoint's step)."""
    from tasks.trainer.checkpoint_io import load_checkpoint

    state = load_checkpoint(ckpt)
    hp = state.get("hyper_parameters") or {}
    diffs = []
    for group in ("adapter", "backbone"):
        if group not in hp:
            continue
        was, now = hp[group] or {}, _plain(cfg[group])
        was = {k: v for k, v in was.items() if k != "init_from"}
        now = {k: v for k, v in now.items() if k != "init_from"}
        for k in sorted(set(was) | set(now)):
            if was.get(k) != now.get(k):
                diffs.append(f"{group}.{k}: checkpoint {was.get(k)!r}, now {now.get(k)!r}")
    # the problem itself: resuming on another dataset (or split, class count...) would mix two trainings
    task_hp = {**(hp.get("meta") or {}), **hp}
    task_now = _plain(cfg.task)
    for k in RESUME_TASK_KEYS:
        if k in task_hp and k in task_now and task_hp[k] != task_now[k]:
            diffs.append(f"task.{k}: checkpoint {task_hp[k]!r}, now {task_now[k]!r}")
    was_data = state.get("zoo_data")  # checkpoints written before it was recorded: not compared
    if isinstance(was_data, dict):
        now_data = data_identity(cfg)
        for k in sorted(set(was_data) | set(now_data)):
            if was_data.get(k) != now_data.get(k):
                diffs.append(f"data.{k}: checkpoint {was_data.get(k)!r}, now {now_data.get(k)!r}")
    if diffs:
        raise ValueError(f"cannot resume from {ckpt}: it was trained with another config:\n  " + "\n  ".join(diffs)
                         + "\nresume with the run's own overrides, or start a new run (without ckpt_path)")
    f = out_dir / "csv" / "metrics.csv"
    if not f.is_file():
        return None
    step = int(state.get("global_step") or 0)
    rows = [r for r in _csv_rows(f) if r.get("step") not in (None, "") and int(float(r["step"])) < step]
    return rows, step


def _csv_rows(f: Path) -> list[dict]:
    """The rows of a CSV log (the file closed again; [] when it does not exist)."""
    if not f.is_file():
        return []
    with f.open() as fh:
        return list(csv.DictReader(fh))


def restore_csv_history(out_dir: Path, rows: list[dict], step: int) -> None:
    """Lightning's CSVLogger starts ``metrics.csv`` afresh on resume: put the rows logged before
    the checkpoint's step back in front of the resumed run's rows (atomically)."""
    import io

    from zoo.io import atomic_write_text

    f = out_dir / "csv" / "metrics.csv"
    new = _csv_rows(f)
    allrows = rows + new
    fields = list(dict.fromkeys(k for r in allrows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(allrows)
    atomic_write_text(f, buf.getvalue())


@contextmanager
def resuming_in(out_dir: Path):
    """A resume, silent about the run's own folder. Lightning warns that ``csv/`` ("Experiment logs
    directory") and ``checkpoints/`` ("Checkpoint directory") exist and are not empty: a resume
    continues in them on purpose (:func:`restore_csv_history` puts the CSV rows before the checkpoint
    back; the checkpoints are the run's own), so for this run's folder, during the resumed fit only,
    those two say nothing the user must act on. Every other warning is kept.

    ``ddp_spawn``'s ranks (``trainer=ddp_cpu``) are fresh interpreters, where the warnings are raised and
    this process's filters do not reach: they get the same two through ``PYTHONWARNINGS`` (as
    :func:`quiet_logs` passes its own), for this fit only. Its fields are literal message prefixes
    split at ``,`` and ``:``, so a run folder whose path holds one of those keeps the warnings there."""
    import re
    import warnings

    folder = str(out_dir).rstrip(os.sep) + os.sep
    spawned = [f"ignore:{what} directory {folder}" for what in ("Experiment logs", "Checkpoint")]
    have = os.environ.get("PYTHONWARNINGS")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(Experiment logs|Checkpoint) directory " + re.escape(str(out_dir))
                                + r".* exists and is not empty")
        if not any(c in folder for c in ",:"):
            os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [have, *spawned]))
        try:
            yield
        finally:
            if have is None:
                os.environ.pop("PYTHONWARNINGS", None)
            else:
                os.environ["PYTHONWARNINGS"] = have


@contextmanager
def keep_csv_history(trainer: L.Trainer, out_dir: Path):
    """Keep ``csv/metrics.csv``'s rows across a ``trainer.validate`` / ``trainer.test`` call.

    Under ``ddp_spawn`` every call runs in fresh processes with a fresh copy of the CSV logger, which
    rewrites the file with only its own rows (the training curve, and ``train_loss_first/last`` read
    from it, would be lost); in-process strategies append, and the file is left as it is.
    """
    f = out_dir / "csv" / "metrics.csv"
    before = _csv_rows(f) if trainer.is_global_zero else []
    try:
        yield
    finally:
        if before and f.is_file():
            now = _csv_rows(f)
            kept = len(now) >= len(before) and all(all(n.get(k, "") == v for k, v in b.items())
                                                   for n, b in zip(now, before))
            if not kept:
                restore_csv_history(out_dir, before, 0)


def train_losses(out_dir: Path) -> tuple[float | None, float | None]:
    """First and last logged per-step training loss, from the CSV log."""
    f = out_dir / "csv" / "metrics.csv"
    if not f.is_file():
        return None, None
    vals = [float(r["train/loss_step"]) for r in _csv_rows(f) if r.get("train/loss_step")]
    return (vals[0], vals[-1]) if vals else (None, None)


_num = number


@contextmanager
def naming_the_folder(folder: Path):
    """A write error of the environment that names no file (a logger's ``write()`` on a full disk)
    names the run's folder instead, so the one error line says where."""
    from zoo.io import is_environment_error

    try:
        yield
    except OSError as e:
        if is_environment_error(e) and not e.filename:
            raise OSError(e.errno, e.strerror, f"{folder} (the run's folder)") from e
        raise


def train(cfg: DictConfig) -> dict[str, Any]:
    """The whole job for one config; returns the metrics also written to ``metrics.json``."""
    with naming_the_folder(Path(cfg.paths.output_dir)):
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, Any]:
    """The whole job for one config; returns the metrics also written to ``metrics.json``.

    Everything task-specific comes from the task's declaration (:class:`tasks.base.ZooTask`):
    the monitor and its mode select the checkpoint, the declared columns fill ``metrics.json``.
    """
    cfg = apply_final_overrides(cfg)
    check_run_options(cfg)
    if cfg.get("publish"):  # the zoo's name rule, checked before training (it used to refuse after the whole run)
        from zoo.hub.registry import check_plain_name

        check_plain_name(cfg.publish, "publish")
    if cfg.task.get("runner"):  # a task with a job of its own (several stages, e.g. task=multitask)
        from hydra.utils import get_method

        return get_method(cfg.task.runner)(cfg)
    import time

    t0 = time.monotonic()
    quiet_logs()  # before the first Lightning line (the seed's)
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    # a resume from a checkpoint of another config (adapter, backbone, problem, data) is refused before any
    # data is generated or read
    ckpt = resolve_ckpt(cfg.get("ckpt_path"), out_dir) if cfg.get("train", True) else None
    history = check_resume(cfg, ckpt, out_dir) if ckpt else None
    check_data(cfg)  # cheap, before the task builds or downloads weights
    task = build_task(cfg)
    dm = build_datamodule(cfg, task)
    dm.prepare_data()
    dm.setup("fit")
    # never select on the test set (tasks/protocol.py): refused before any training
    splits = describe_splits(dm)
    selection = resolve_selection(cfg.task.get("selection"), splits, trains=trains(cfg))
    has_val = getattr(dm, "has_val", True)
    trainer = build_trainer(cfg, has_val, task=task, select_on_val=selection not in ("last", EVALUATE_ONLY))
    if cfg.get("train", True):
        # Data-driven adapter stages (CoLoRA) add parameters, so they run here, in the main
        # process, before fit builds the optimizer and wraps DDP (ddp_spawn children receive
        # this model). Also on resume, so the checkpoint's tensors have a place (prepare is seeded).
        check_splits = getattr(dm, "check_splits", None)
        if callable(check_splits):  # before training: a missing split must not cost a whole run
            check_splits(test=_tests_at_end(cfg, dm, known_only=True))
        zoo.prepare_adapters(task.model, dm.train_dataloader(), loss_fn=task.batch_loss)
        check_training_steps(trainer, dm, task)
    bb = zoo.find_backbone(task.model)
    trainable, total = zoo.count_parameters(task.model)
    bb_trainable, bb_params = zoo.count_parameters(bb)
    log.info("adapter %s: %s", cfg.adapter.name, describe_params(bb_trainable, bb_params, trainable - bb_trainable))

    if cfg.get("train", True):
        task.data_identity = data_identity(cfg)  # into each checkpoint (ZooTask.on_save_checkpoint)
        try:
            with resuming_in(out_dir) if history is not None else nullcontext():
                trainer.fit(task, datamodule=dm, ckpt_path=ckpt, weights_only=True)
        finally:
            if history is not None and trainer.is_global_zero:
                restore_csv_history(out_dir, *history)
        # (ddp_spawn trains in child processes and does not carry global_step back: the check before
        # training covers it)
        if trainer.global_step == 0 and _trains(task) and not _spawned(trainer):
            raise ValueError("training took no optimisation step (the training split gave no batch, or every batch "
                             "was skipped): the adapter would be saved untrained, so nothing was saved; check "
                             "data.* and task.max_epochs")

    decl = task.declaration()
    metrics: dict[str, Any] = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "kind": decl["kind"],
        "monitor": {**decl["monitor"], "value": None},
        "columns": decl["columns"],
        "adapter": cfg.adapter.name,
        "adapter_config": _plain(cfg.adapter),
        "backbone": cfg.backbone.model,
        "backbone_config": _plain(cfg.backbone),  # its weights and options: bench.vtab groups by them
        "task": cfg.task.get("name"),
        "dataset": getattr(dm, "dataset_name", None) or cfg.task.get("dataset"),  # an image folder: its name
        "protocol": protocol_record(cfg.task.get("protocol"), splits, selection, protocol_details(cfg, task, dm)),
        "selection": selection,
        "validated_on": (splits.get("val") or {}).get("name"),
        "seed": cfg.seed,
        "fold": cfg.task.get("fold"),  # with the seed, what pairs runs of different rows (tasks.report)
        "label": run_label(cfg),  # the summary table's row
        "report": report_record(cfg),  # the sweep's caption settings: python -m tasks.demos recomputes it
        "config_id": config_id(cfg),  # the resolved config but for seed / fold: tables average only equal ones
        "trainable_params": bb_trainable,  # the adapter's own (head excluded)
        "trainable_params_with_head": trainable,
        "backbone_params": bb_params,
        "step_ms": _step_ms(trainer),  # mean training step wall time of this run (None: no step timed)
        **{c["key"]: None for c in decl["columns"]},
    }
    ckpt_cb = trainer.checkpoint_callback
    if has_val and selection == EVALUATE_ONLY:  # the given weights as they are: validation is only reported
        with keep_csv_history(trainer, out_dir):
            res = trainer.validate(task, datamodule=dm, verbose=False)
        metrics.update({c["key"]: _num(res[0].get(c["key"])) for c in decl["columns"]
                        if c["key"].startswith("val/")} if res else {})
        metrics["monitor"]["value"] = metrics.get(task.monitor)
    elif has_val and selection == "last":  # the last epoch's weights: its validation values are only reported
        metrics["monitor"]["value"] = _num(trainer.callback_metrics.get(task.monitor))
        metrics.update({c["key"]: _num(trainer.callback_metrics.get(c["key"])) for c in decl["columns"]
                        if c["key"].startswith("val/") and c["key"] != task.monitor})
    elif has_val and ckpt_cb is not None and ckpt_cb.best_model_path:
        # select on validation, never on test
        score = load_adapter_checkpoint(task, ckpt_cb.best_model_path)
        if ckpt_cb.monitor == task.monitor:
            metrics["monitor"]["value"] = _num(ckpt_cb.best_model_score if ckpt_cb.best_model_score is not None else score)
        # Without a checkpoint callback that monitors the task's metric (callbacks=none: Lightning's default one
        # keeps the last weights), the selection metric is measured on the kept weights with the others.
        selected = metrics["monitor"]["value"] is not None
        others = [c["key"] for c in decl["columns"] if c["key"].startswith("val/") and (c["key"] != task.monitor or not selected)]
        if not selected and task.monitor not in others:
            others.append(task.monitor)
        if others:  # the selected weights' other validation metrics
            with keep_csv_history(trainer, out_dir):
                res = trainer.validate(task, datamodule=dm, verbose=False)
            metrics.update({k: _num(res[0].get(k)) for k in others} if res else {})
        if not selected:
            metrics["monitor"]["value"] = metrics.get(task.monitor)
    elif has_val:
        metrics["monitor"]["value"] = _num(trainer.callback_metrics.get(task.monitor))
        if metrics.get("selection") == "val":  # no checkpoint was kept to select: these are the last weights
            metrics["selection"] = "last"
            if isinstance(metrics.get("protocol"), dict):
                metrics["protocol"]["selection"] = "last"
    metrics[task.monitor] = metrics["monitor"]["value"]

    if _tests_at_end(cfg, dm):
        with keep_csv_history(trainer, out_dir):
            res = trainer.test(task, datamodule=dm, verbose=False)
        for c in decl["columns"]:
            if c["key"].startswith("test/"):
                metrics[c["key"]] = _num(res[0].get(c["key"])) if res else None
    metrics.update(task.run_metrics(trainer, dm))

    if trainer.is_global_zero:
        metrics["train_loss_first"], metrics["train_loss_last"] = train_losses(out_dir)
        metrics["wall_time_s"] = round(time.monotonic() - t0, 1)  # this run, weights and data included
        record = {**decl, "name": metrics["task"], "dataset": metrics["dataset"], "protocol": metrics["protocol"],
                  "config": _plain(cfg.task), "data": _plain(cfg.data), "links": task_links(cfg)}
        classes = class_names(dm)
        if classes is not None:
            record["class_names"] = classes  # python -m zoo predict labels with them
        extra = {"task": record, "preprocessing": {**task.preprocessing(), **data_preprocessing(dm)},
                 "seed": cfg.seed}  # rebuilds randomly initialised base weights (pretrained=false)
        if cfg.backbone.get("weights"):  # local base weights: where they were, and the backbone config that named them
            extra["base_weights"] = {"path": str(Path(cfg.backbone.weights).expanduser().resolve()),
                                     "config": hydra_choice("backbone")}
        art = zoo.save_adapter(task.model, out_dir / "adapter",
                               metrics={c["key"]: metrics.get(c["key"]) for c in decl["columns"]}, extra=extra)
        metrics["artifact_bytes"] = sum(f.stat().st_size for f in art.iterdir() if f.is_file())
        metrics["published"] = publish_name(cfg)  # the zoo entry this run becomes (null: none)
        write_metrics(out_dir / "metrics.json", metrics)
        if cfg.get("export_backbone"):
            export_backbone(task.model, Path(cfg.export_backbone))
        if metrics["published"]:
            publish(cfg, task.model, out_dir)
        elif cfg.get("publish"):
            log.info("not published as %s: seed %s (publish_seed=%s: only that seed's run publishes)",
                     cfg.publish, cfg.seed, cfg.publish_seed)
        log.info("metrics: %s", json.dumps({k: metrics.get(k) for k in ("adapter", "dataset", *(c["key"] for c in decl["columns"]))}))
        from tasks.trainer.progress import fmt_seconds

        log.info("wall time: %s", fmt_seconds(metrics["wall_time_s"]))
    metrics["out_dir"] = str(out_dir)
    return metrics


def protocol_details(cfg: DictConfig, task, dm) -> dict[str, Any]:
    """What the task kind adds to the protocol record, and the recipe's ``task.differs_from_paper`` (how it
    departs from the paper whose numbers it would sit beside; ``null``: it does not) where the task has one."""
    details = dict(task.protocol_details(dm))
    if "differs_from_paper" in cfg.task:
        details["differs_from_paper"] = cfg.task.differs_from_paper
    return details


def _spawned(trainer: L.Trainer) -> bool:
    """Whether fit ran in spawned processes (``ddp_spawn``), whose state stays there."""
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


def _trains(task: L.LightningModule) -> bool:
    """Whether the task has anything to train (the frozen baseline, e.g. adapter=linear on a
    captioner, evaluates only: no optimisation step is right for it)."""
    return any(p.requires_grad for p in task.parameters())


def check_training_steps(trainer: L.Trainer, dm: L.LightningDataModule, task: L.LightningModule) -> None:
    """Refuse, before training, a run that would take no optimisation step (and so save an
    untrained adapter with exit code 0): zero epochs or steps, no training batches."""
    if not _trains(task):
        return
    why = None
    if trainer.max_epochs == 0:
        why = "trainer.max_epochs=0 (task.max_epochs)"
    elif trainer.max_steps == 0:
        why = "trainer.max_steps=0"
    elif trainer.limit_train_batches == 0:
        why = "trainer.limit_train_batches=0"
    else:
        try:
            n = len(dm.train_dataloader())
        except TypeError:  # an iterable without a length: the post-fit check catches an empty one
            n = None
        if n == 0:
            ds = getattr(dm, "train_set", None)
            size = f"{len(ds)} samples" if ds is not None and hasattr(ds, "__len__") else "no samples"
            why = f"the training split gives no batch ({size}; every sample skipped, or fewer than one batch dropped)"
    if why:
        raise ValueError(f"{why}: this run would take no optimisation step and save an untrained adapter; "
                         f"nothing was trained or saved")


def _tests_at_end(cfg: DictConfig, dm: L.LightningDataModule, known_only: bool = False) -> bool:
    """Whether the run evaluates the test split after training: ``test=true``, or ``test=auto``
    with a test split or ``task.protocol=final``. ``known_only``: the rules known before training
    (test=true, protocol=final), for checking the split up front."""
    run_test = cfg.get("test", "auto")
    return run_test is True or (run_test == "auto" and cfg.task.get("protocol") == "final") or \
        (not known_only and run_test == "auto" and getattr(dm, "test_set", None) is not None)


def _step_ms(trainer: L.Trainer) -> float | None:
    from tasks.trainer.perf import StepTimer

    timer = next((c for c in trainer.callbacks if isinstance(c, StepTimer)), None)
    return None if timer is None else timer.mean_ms()


def describe_params(adapter: int, backbone: int, head: int) -> str:
    """The one wording of parameter counts (run log; the summary table's columns are the same numbers):
    the adapter's trainable parameters inside the backbone, head excluded, as a share of the backbone."""
    from tasks.report import PARAMS_NOTE

    return (f"{adapter:,} trainable parameters ({100 * adapter / max(1, backbone):.2f}% of the backbone's {backbone:,}, adapter included); "
            f"+ {head:,} in the task head. {PARAMS_NOTE}")


def hydra_choice(group: str) -> str | None:
    """The config group option this run composed (``backbone=ast_demo`` -> ``ast_demo``); None outside a Hydra run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get(group)
    except Exception:  # composed without a Hydra run (tests, notebooks)
        return None


def class_names(dm: L.LightningDataModule) -> list[str] | None:
    """The DataModule's class names (``class_names``, or the audio sets' ``classes``), if it has them."""
    names = getattr(dm, "class_names", None) or getattr(dm, "classes", None)
    return [str(n) for n in names] if isinstance(names, (list, tuple)) and names else None


def data_preprocessing(dm: L.LightningDataModule) -> dict[str, Any]:
    """What the DataModule adds to the artifact's preprocessing record (e.g. audio: the fbank
    normalisation), so that inference outside Lightning (``python -m zoo predict``) reproduces it."""
    rec = getattr(dm, "preprocessing", None)
    return dict(rec()) if callable(rec) else {}


def run_label(cfg: DictConfig) -> str:
    """The run's row in a summary table: ``report.label``, else the adapter config as chosen
    (``adapter=coca_decoder_lora``: two configs may build the same method), else the method's name."""
    label = (cfg.get("report") or {}).get("label")
    if label:
        return str(label)
    return hydra_choice("adapter") or cfg.adapter.name


# what differs between a sweep's replicates, or never changes a result: left out of config_id
REPLICATE_KEYS = ("seed",)
NOT_RESULT_KEYS = ("paths", "publish", "publish_seed", "publish_registry", "ckpt_path", "report")


def config_id(cfg: DictConfig) -> str | None:
    """A short hash of the run's resolved config with the seed and fold set aside (their interpolations,
    e.g. a data seed or an output folder, included): two runs of one row share it exactly when they differ
    only by seed / fold. :func:`tasks.report.group_runs` averages only runs that share it."""
    import hashlib

    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key in REPLICATE_KEYS:
        if key in c:
            c[key] = None
    if "task" in c and "fold" in c.task:
        c.task.fold = None
    if "paths" in c:
        c.paths.output_dir = "<output_dir>"  # a ${hydra:...} per job; logger / checkpoint folders interpolate it
    try:
        plain = OmegaConf.to_container(c, resolve=True)
    except Exception as e:  # a finished run is never lost to its hash: its rows then group by label alone
        log.warning("config_id: the config does not resolve outside the run (%s); recorded as null", e)
        return None
    for key in NOT_RESULT_KEYS:
        plain.pop(key, None)
    text = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def report_record(cfg: DictConfig) -> dict[str, Any]:
    """The sweep's caption settings (``report.baseline``, ``metric``, ``reference``), kept with each run so that
    a table over several sweeps (``python -m tasks.demos``) computes each sweep's own caption."""
    report = cfg.get("report") or {}
    return {k: None if report.get(k) is None else str(report.get(k)) for k in ("baseline", "metric", "reference")}


def apply_final_overrides(cfg: DictConfig) -> DictConfig:
    """``cfg`` with its ``final_overrides`` (``["backbone.weights=null", ...]``) applied last.

    A config group file (a sweep's row, conf/adapter/baseline/*) is merged before the experiment, so
    the values an experiment sets win over it; these dotted overrides come after everything."""
    ovs = list(cfg.get("final_overrides") or [])
    if not ovs:
        return cfg
    bad = [o for o in ovs if not isinstance(o, str) or "=" not in o]
    if bad:
        raise ValueError(f"final_overrides: expected 'key=value' strings, got {bad}")
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(ovs))
    except OmegaConfBaseException as e:  # a key the config does not have: one line naming it, not OmegaConf's three
        key = getattr(e, "full_key", None) or "?"
        raise ValueError(f"final_overrides={ovs}: {key!r} is not a key of the composed config "
                         f"({str(e).splitlines()[0]})") from None


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """``metrics.json``, written atomically (a crash never leaves half a file)."""
    from zoo.io import atomic_write_text

    atomic_write_text(path, json.dumps({k: v for k, v in metrics.items() if k != "out_dir"}, indent=2) + "\n")


def publish_name(cfg: DictConfig) -> str | None:
    """The zoo name this run publishes under: ``publish``, unless ``publish_seed`` names another seed (in a
    seed sweep only that seed's run publishes, so each entry is one run chosen before any result)."""
    name, seed = cfg.get("publish"), cfg.get("publish_seed")
    if not name or (seed is not None and int(cfg.seed) != int(seed)):
        return None
    return str(name)


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
    from zoo.io import atomic_path

    with atomic_path(path) as tmp:  # a unique temporary name: parallel exports do not collide
        save_file(state, str(tmp))
    log.info("backbone weights written to %s", path)


def evaluate(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluate a saved adapter artifact on a split (``val`` or ``test``) of its task.

    The artifact records the run's task kind with its task and data configs; they are used as
    recorded, with the command line's ``task.*`` / ``data.*`` overrides (``overrides``) on top,
    and the task kind's ``eval_overrides`` selecting the split. Artifacts written before the task
    contract (no recorded config) use the composed ``task`` group (VTAB classification).
    """
    from omegaconf import open_dict

    from zoo.checkpoint import read_adapter_config

    if cfg.split not in ("val", "test"):
        raise ValueError(f"split={cfg.split!r}; valid: val, test")
    artifact = Path(cfg.artifact)
    meta = read_adapter_config(artifact)
    from tasks.recorded import TASK_TARGETS, check_artifact_config, recorded_class

    check_artifact_config(meta, str(artifact))  # recorded configs are data: no _target_ to run, no ${...}
    bmeta = meta["backbone"]
    tag = bmeta.get("weights_tag") or ""
    if tag.startswith("file:") and not cfg.backbone.get("weights"):
        from zoo.hub.load import local_weights_hint, recorded_weights

        found = recorded_weights(meta.get("base_weights"), artifact)
        if found is None:
            raise ValueError(local_weights_hint(bmeta, meta.get("base_weights"), artifact))
        with open_dict(cfg):
            cfg.backbone.weights = str(found)  # the file the run read (the fingerprint check guards it)
        print(f"base weights: {found} (recorded by the run)", file=sys.stderr)
    record = meta.get("task") or {}
    recorded = record.get("config") is not None
    if recorded:
        task_cfg, data_cfg = copy.deepcopy(record["config"]), copy.deepcopy(record.get("data") or {})
        task_cfg.pop("runner", None)
        _apply_overrides(task_cfg, data_cfg, overrides or [], record.get("links"))
    else:  # a pre-contract artifact: VTAB classification
        task_cfg, data_cfg = _plain(cfg.task), _plain(cfg.data)
        if task_cfg.get("dataset") == "auto":
            task_cfg["dataset"] = data_cfg["dataset"] = record.get("dataset") or "cifar"
        task_cfg["num_classes"] = meta["head"]["num_classes"]
    task_cls = recorded_class(task_cfg, TASK_TARGETS, "task") if recorded else get_class(task_cfg["_target_"])
    task_cls.eval_overrides(task_cfg, data_cfg, cfg.split)
    with open_dict(cfg):
        cfg.backbone.name = bmeta["family"]
        cfg.backbone.model = bmeta["model"]
        cfg.backbone.kwargs = bmeta.get("kwargs") or {}
        if not tag:  # trained on randomly initialised weights (reproduced by the seed)
            cfg.backbone.pretrained = False if bmeta["family"] != "clip" else None
        cfg.backbone.pop("img_size", None)
        # image backbones record an input size; others (MORPH: any UPTF-7 shape) have none
        size = (bmeta.get("kwargs") or {}).get("img_size", (meta.get("preprocessing") or {}).get("input_size", [None])[-1])
        if size is not None:
            cfg.backbone.img_size = size
        cfg.backbone.kwargs.pop("img_size", None)
        cfg.task = OmegaConf.create(task_cfg)
        cfg.data = OmegaConf.create(data_cfg)
        cfg.adapter = {"name": meta["methods"][0]["name"], "init_from": str(artifact)}
        cfg.logger = None
        cfg.callbacks = None
    check_run_options(cfg)
    quiet_logs()  # before the first Lightning line (the seed's)
    L.seed_everything(cfg.seed)
    check_data(cfg)  # cheap, before the base weights are built (the data _target_ is allow-listed above)
    task = build_task(cfg, recorded=recorded)
    dm = build_datamodule(cfg, task, recorded=recorded)
    check = getattr(dm, "check_recorded", None)
    if callable(check):  # data of another kind than the artifact was trained on (a 2-D file for a 1-D run)
        check(meta.get("preprocessing") or {})
    trainer = build_trainer(cfg, has_val=True, enable_checkpointing=False)
    if cfg.split == "test":
        res = trainer.test(task, datamodule=dm, verbose=False)[0]
    else:
        res = trainer.validate(task, datamodule=dm, verbose=False)[0]
    prefix = f"{cfg.split}/"
    metrics = {k: _num(v) for k, v in sorted(res.items()) if k.startswith(prefix)}
    if cfg.get("predict"):  # +predict=DIR: the split's files through python -m zoo predict's code path
        from zoo.predict import predict

        if not callable(getattr(dm, "split_files", None)):
            raise ValueError(f"+predict: the {task.kind} data has no per-file inputs to predict on "
                             f"(it writes CSVs for images and audio clips, mask PNGs for segmentation)")
        dest = predict(artifact, dm.split_files(cfg.split), cfg.predict, weights=cfg.backbone.get("weights"))
        print(f"predictions: {dest}", file=sys.stderr)
    out = {"artifact": str(artifact), "kind": task.kind, "dataset": task_cfg.get("dataset"), "split": cfg.split,
           **({"monitor": {"name": task.monitor, "mode": task.monitor_mode, "value": metrics.get(task.monitor)}}
              if cfg.split == "val" else {}),
           **metrics}
    print(json.dumps(out, indent=2))
    return out


def task_links(cfg: DictConfig) -> dict[str, str]:
    """``{data key: task key}`` for the data keys the config sets to exactly ``${task.K}`` (e.g.
    audio's ``data.root: ${task.data_dir}``), recorded in the artifact so that ``eval.py
    task.K=...`` changes the data key too."""
    import re

    raw = OmegaConf.to_container(cfg.data, resolve=False) if isinstance(cfg.get("data"), DictConfig) else {}
    out = {}
    for k, v in (raw or {}).items():
        m = re.fullmatch(r"\$\{task\.([A-Za-z0-9_]+)\}", v) if isinstance(v, str) else None
        if m:
            out[str(k)] = m.group(1)
    return out


def _apply_overrides(task_cfg: dict, data_cfg: dict, overrides: list[str], links: dict[str, str] | None = None) -> None:
    """Apply ``task.K=V`` / ``data.K=V`` command-line overrides to the recorded configs.

    A ``task.K`` also reaches the data key of the same name and those linked to it (``links``,
    recorded at training: the keys the config set to ``${task.K}``); for artifacts written before
    links were recorded, the data keys with the same recorded value (``data.root`` = ``task.data_dir``).
    """
    for ov in overrides:
        key, _, value = ov.lstrip("+~").partition("=")
        group, _, rest = key.partition(".")
        if group not in ("task", "data") or not rest:
            continue
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"{rest}={value}"]), resolve=True)
        if group == "data":
            _merge_into(data_cfg, parsed)
            continue
        top = rest.split(".")[0]
        old = task_cfg.get(top)
        linked = [dk for dk, v in data_cfg.items() if dk == top or
                  (dk in links and links[dk] == top if links is not None else isinstance(old, str) and v == old)]
        if "." not in rest:
            for dk in linked:
                data_cfg[dk] = copy.deepcopy(parsed[top])
        elif top in linked:  # a nested key of a same-named dict
            _merge_into(data_cfg, parsed)
        _merge_into(task_cfg, parsed)


def _merge_into(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge_into(dst[k], v)
        else:
            dst[k] = v
