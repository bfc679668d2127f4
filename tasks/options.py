"""Range checks of the numeric options of task and data configs, one declaration per config.

Adapters check their options in ``__init__`` with :func:`zoo.adapters.base.int_option` /
``float_option``; task and data configs do the same here. Each config declares its numeric options
once, as a table ``{name: Int(lo, hi) | Real(lo, hi, ...)}``, and calls :func:`check_options` at the
top of its ``__init__``: a value out of range or of the wrong type (``optimizer.lr="abc"``,
``task.shots=2.5``, ``data.mixup=2``) is one ``ValueError`` naming ``<prefix>.<option>``, its valid
range and the value, before any data is read or any step is trained. ``None`` is accepted for options
whose default is ``None`` (``Int(..., optional=True)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from zoo.adapters.base import check_float, check_int


@dataclass(frozen=True)
class Int:
    lo: int | None = 0
    hi: int | None = None
    optional: bool = False

    def check(self, label: str, value: Any) -> Any:
        return value if value is None and self.optional else check_int(label, value, self.lo, self.hi)


@dataclass(frozen=True)
class Real:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    optional: bool = False

    def check(self, label: str, value: Any) -> Any:
        if value is None and self.optional:
            return value
        return check_float(label, value, self.lo, self.hi, self.lo_open, self.hi_open)


POSITIVE = Real(0.0, lo_open=True)
NON_NEGATIVE = Real(0.0)
FRACTION = Real(0.0, 1.0)  # a probability or share, ends included

# the optimizer and scheduler every task kind takes (tasks.base.ZooTask)
OPTIMIZER = {"lr": POSITIVE, "weight_decay": NON_NEGATIVE, "eps": POSITIVE, "encoder_lr": Real(0.0, lo_open=True, optional=True)}
SCHEDULER = {"warmup_epochs": NON_NEGATIVE, "min_lr": NON_NEGATIVE, "cosine_epochs": Real(0.0, lo_open=True, optional=True),
             "warmup_lr_init": Real(0.0, optional=True),
             # poly (segmentation, SAMed) and plateau (PDE, MORPH's ReduceLROnPlateau) schedules
             "warmup_iters": Int(0), "power": POSITIVE, "factor": Real(0.0, 1.0, lo_open=True, hi_open=True),
             "patience": Int(0),
             # multistep (AST): decay by gamma every `every` epochs from start_epoch on
             "start_epoch": Int(0), "every": Int(1), "gamma": Real(0.0, lo_open=True)}
# captioning's decoding (task.generation; open_clip's CoCa.generate): beams, sampling and lengths
GENERATION = {"seq_len": Int(1), "min_seq_len": Int(0), "num_beams": Int(1), "num_beam_groups": Int(1), "top_k": Int(1),
              "top_p": Real(0.0, 1.0, lo_open=True), "temperature": POSITIVE, "repetition_penalty": POSITIVE}
# the DataLoader options most DataModules share
LOADER = {"batch_size": Int(1), "eval_batch_size": Int(1), "num_workers": Int(0), "img_size": Int(1)}


# the top-level options of train.py / eval.py (conf/train.yaml): numpy's generators take seeds in 0..2**32-1
RUN = {"seed": Int(0, 2**32 - 1), "publish_seed": Int(0, 2**32 - 1, optional=True)}


# the Trainer options a recipe or the command line sets (conf/trainer/*.yaml); Lightning's own checks are a
# traceback (limit_train_batches=-1), an overflow (max_epochs=-1 without max_steps) or nothing (gradient_clip_val=-1)
TRAINER = {"max_epochs": Int(-1, optional=True), "max_steps": Int(-1, optional=True),
           "accumulate_grad_batches": Int(1), "gradient_clip_val": Real(0.0, optional=True),
           "log_every_n_steps": Int(1), "num_sanity_val_steps": Int(-1), "check_val_every_n_epoch": Int(1, optional=True),
           "progress_every_s": Real(0.0, lo_open=True, optional=True)}
LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")
TESTS = ("auto", True, False)


def check_limit(label: str, value: Any) -> None:
    """Lightning's ``limit_*_batches``: null (all), a share in [0, 1] (a float) or a number of batches >= 0."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return
    raise ValueError(f"{label} must be null, a share of the batches in [0.0, 1.0] or a number of batches >= 0, "
                     f"got {value!r}")


def check_run_options(cfg: Mapping[str, Any]) -> None:
    """The top-level options of a run, named as on the command line (``seed must be an integer in
    0..4294967295``, ``trainer.max_epochs …``, ``test='maybe'; valid: auto, true, false``)."""
    for name, rule in RUN.items():
        if name in cfg:
            rule.check(name, cfg[name])
    if "test" in cfg and cfg["test"] not in TESTS:
        raise ValueError(f"test={cfg['test']!r}; valid: auto (only when the protocol has a test split), true, false")
    trainer = cfg.get("trainer") or {}
    checked = check_options("trainer", trainer, TRAINER)
    for name in LIMITS:
        if name in trainer:
            check_limit(f"trainer.{name}", trainer[name])
    if checked.get("max_epochs") == -1 and not (checked.get("max_steps") or 0) >= 1:
        raise ValueError("trainer.max_epochs=-1 (task.max_epochs: no limit on epochs) needs trainer.max_steps >= 1 "
                         "(task.max_steps), or the run never ends")


def check_options(prefix: str, values: Mapping[str, Any], spec: Mapping[str, Int | Real]) -> dict[str, Any]:
    """Check every option of ``spec`` present in ``values``; returns the checked values (ints as int)."""
    out = {}
    for name, rule in spec.items():
        if name in values:
            out[name] = rule.check(f"{prefix}.{name}", values[name])
    return out


def check_betas(prefix: str, betas: Any) -> None:
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ValueError(f"{prefix}.betas must be two numbers in [0, 1), got {betas!r}")
    for i, b in enumerate(betas):
        check_float(f"{prefix}.betas[{i}]", b, 0.0, 1.0, hi_open=True)
