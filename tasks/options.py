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
OPTIMIZER = {"lr": POSITIVE, "weight_decay": NON_NEGATIVE, "eps": POSITIVE}
SCHEDULER = {"warmup_epochs": NON_NEGATIVE, "min_lr": NON_NEGATIVE, "cosine_epochs": Real(0.0, lo_open=True, optional=True),
             "warmup_lr_init": Real(0.0, optional=True),
             # multistep (AST): decay by gamma every `every` epochs from start_epoch on
             "start_epoch": Int(0), "every": Int(1), "gamma": Real(0.0, lo_open=True)}
# the DataLoader options most DataModules share
LOADER = {"batch_size": Int(1), "eval_batch_size": Int(1), "num_workers": Int(0), "img_size": Int(1)}


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
