"""How a run was evaluated: its splits, how its checkpoint was selected, and the rule that keeps the test
set out of selection.

**The rule** (one for every task kind, applied by the runner before training): when the validation split
*is* the test split, or shares items with it, selecting the checkpoint on validation would select on the
test set, so the run is refused with one line naming both splits, unless the recipe says how it selects
without a validation split:

``task.selection``
    ``val`` (default)   the checkpoint with the best validation score (the monitor) is tested;
    ``last``            the last epoch's weights are tested (a fixed schedule: the published protocol of
                        NAFNet, CoOp and SAMed); validation, if any, is only logged;
    ``val_is_test``     select on a validation split that is the test split, asked for knowingly (the
                        numbers are then optimistic, and the record says so). Asked for on data whose
                        validation split is separate from test, it selects as ``val`` (nothing of test
                        validates) and says so in one warning line naming both splits: the request is
                        harmless there (a sweep over datasets, some with a validation split, still runs),
                        but the record says ``val``, not what was asked.

A run without a validation split selects nothing: its selection is recorded as ``last``.

An **evaluate-only** run (``train=false``, or a trainer that takes no step: ``trainer.max_epochs=0``,
``trainer.max_steps=0``, ``trainer.limit_train_batches=0``) selects nothing either: the weights it was given
(a released checkpoint, the base model) are evaluated as they are, and its selection is recorded as
``none`` (:data:`EVALUATE_ONLY`); validation is only reported, so a validation split that is the test split
is not refused there.

**DataModules** describe their splits with ``split_info()``::

    {"train": {"name": "train800", "size": 800}, "val": {"name": ..., "size": ...} | None,
     "test": {...} | None, "val_overlaps_test": bool}

(:func:`describe_splits` falls back to the ``train_set`` / ``val_set`` / ``test_set`` attributes, and
counts a validation set that *is* the test set as overlapping.)

**The record** (``metrics.json``'s ``protocol``, see :func:`protocol_record`): the recipe's protocol
name, the splits with their sizes, the selection and the split that validated, and what the task kind
adds (:meth:`tasks.base.ZooTask.protocol_details`: the metric backend, the axes a metric averages over,
the rollout horizon, the normalisation). ``tasks.report`` and ``bench.vtab`` compare and average only
runs whose records agree (:func:`comparable_key`).
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

SELECTIONS = ("val", "last", "val_is_test")
EVALUATE_ONLY = "none"  # the recorded selection of a run that trains nothing (not a task.selection value)
SPLITS = ("train", "val", "test")


def _size(ds: Any) -> int | None:
    if ds is None or isinstance(ds, (bool, str)):
        return None
    try:
        return len(ds)
    except TypeError:
        return None


def describe_splits(dm: Any) -> dict[str, Any]:
    """The DataModule's ``split_info()``, or what its ``*_set`` attributes show (after ``setup``)."""
    if hasattr(dm, "split_info"):
        info = dict(dm.split_info())
    else:
        info = {}
        for s in SPLITS:
            ds = getattr(dm, f"{s}_set", None)
            info[s] = None if ds is None or ds is False else {"name": s, "size": _size(ds)}
        val, test = getattr(dm, "val_set", None), getattr(dm, "test_set", None)
        info["val_overlaps_test"] = val is not None and val is test
    if not getattr(dm, "has_val", True):
        info["val"] = None
    for s in SPLITS:
        info.setdefault(s, None)
    info["val_overlaps_test"] = bool(info.get("val_overlaps_test")) and info["val"] is not None
    return info


def overlaps(a, b) -> bool:
    """Two item lists share an item (items compared by their first element: a path or an id)."""
    key = lambda it: it[0] if isinstance(it, (tuple, list)) else it  # noqa: E731
    return bool(a) and bool(b) and not {key(i) for i in a}.isdisjoint(key(i) for i in b)


def trains(cfg: Any) -> bool:
    """Whether a run's config takes any training step (``train=false`` or a trainer limited to no step: not)."""
    if not cfg.get("train", True):
        return False
    tr = cfg.get("trainer") or {}
    return not any(tr.get(k) is not None and float(tr.get(k)) == 0
                   for k in ("max_epochs", "max_steps", "limit_train_batches"))


def resolve_selection(requested: str | None, splits: dict[str, Any], trains: bool = True) -> str:
    """The run's selection under the rule above; raises ``ValueError`` (one line) when it would select on test.
    A run that trains nothing (``trains=False``) selects nothing: :data:`EVALUATE_ONLY`."""
    requested = requested or "val"
    if requested not in SELECTIONS:
        raise ValueError(f"task.selection={requested!r}; valid: {', '.join(SELECTIONS)}")
    if not trains:
        return EVALUATE_ONLY
    val, test = splits.get("val"), splits.get("test")
    if val is None:
        return "last"  # nothing validates: the last epoch's weights are what is tested
    if not splits.get("val_overlaps_test"):
        if requested == "val_is_test":
            where = f"the test split ({test.get('name')})" if test else "the test split (none here)"
            log.warning("task.selection=val_is_test, but the validation split (%s) is separate from %s: selecting on "
                        "%s as task.selection=val, and recording selection=val", val.get("name"), where, val.get("name"))
            return "val"
        return requested
    if requested == "val":
        same = "is" if val.get("name") == (test or {}).get("name") else "overlaps"
        raise ValueError(
            f"the validation split ({val.get('name')}) {same} the test split ({(test or {}).get('name')}): selecting "
            f"the checkpoint on it would select on the test set; use task.selection=last (test the last epoch, as "
            f"NAFNet, CoOp and SAMed do), give the data a separate validation split, or knowingly "
            f"task.selection=val_is_test")
    return requested


def protocol_record(name: Any, splits: dict[str, Any], selection: str, details: dict[str, Any] | None = None) -> dict:
    """``metrics.json``'s ``protocol``: how the run's numbers were made (see the module docstring)."""
    return {
        "name": name,
        "splits": {s: splits.get(s) for s in SPLITS},
        "selection": selection,
        "validated_on": (splits.get("val") or {}).get("name"),
        "val_overlaps_test": bool(splits.get("val_overlaps_test")),
        **(details or {}),
    }


def protocol_name(m: dict[str, Any]) -> Any:
    """The recipe's protocol name of a ``metrics.json`` (``final``, ``tune``, ``fold1``, ...): the record's
    ``name``, or the plain string that files written before the record held."""
    p = m.get("protocol")
    return p.get("name") if isinstance(p, dict) else p


FROM_TRAIN = "train split"  # a normalisation's source when its statistics are computed from the run's own training data


def comparable_record(p: dict[str, Any], ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """The part of a protocol record that two runs must share: without the ``ignore``d keys, and with a
    normalisation computed from the run's own training split (``source: "train split"``, e.g. audio
    without published statistics) reduced to that rule: each fold's or dataset's training split gives
    its own mean and std, a difference of data, not of protocol."""
    out = {k: v for k, v in p.items() if k not in ignore}
    norm = out.get("normalisation")
    if isinstance(norm, dict) and norm.get("source") == FROM_TRAIN:
        out["normalisation"] = {k: v for k, v in norm.items() if k not in ("mean", "std")}
    return out


def comparable_key(m: dict[str, Any], ignore: tuple[str, ...] = ()) -> tuple:
    """What two runs must share to be averaged or compared: their :func:`comparable_record`, as a hashable
    tuple. Files written before the record give their protocol name."""
    import json

    p = m.get("protocol")
    if not isinstance(p, dict):
        return (p,)
    return (json.dumps(comparable_record(p, ignore), sort_keys=True, default=str),)
