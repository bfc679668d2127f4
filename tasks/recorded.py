"""Recorded configs are data: what ``eval.py`` may build from an artifact's ``adapter.json``.

An artifact (downloaded from a zoo, received from someone) records its task and data configs so
that it can be evaluated as it was trained. Instantiating those configs the way Hydra does
(recursively, resolving ``${...}``) would run whatever a ``_target_`` anywhere in the file names
(``builtins.open(..., "w")``, ``numpy.load(allow_pickle=True)``...). So an artifact's configs are
checked before anything is built:

* the task's and the data's ``_target_`` must be one of the project's own task / DataModule
  classes (:data:`TASK_TARGETS`, :data:`DATA_TARGETS`), which are then called directly with the
  recorded keys as keyword arguments (never recursively: nested values stay plain data);
* no other key anywhere in the file may be one of Hydra's instantiation keys (:data:`HYDRA_KEYS`:
  ``_target_``, ``_args_``, ``_partial_``...);
* no string anywhere in the file may contain ``${`` (an interpolation or resolver, e.g.
  ``${oc.env:...}``).

Anything else is refused with one line naming the key.
"""
from __future__ import annotations

import importlib
from typing import Any

# the generic check (Hydra keys, ${...}) runs on every read of adapter.json (zoo.checkpoint.read_adapter_config);
# this module adds the allow-lists of the classes eval.py may build
from zoo.checkpoint import HYDRA_KEYS, UnsafeArtifactError, check_data_only  # noqa: F401

# The task classes of conf/task/*.yaml and of the multitask job's two stages (tests check that every
# task config's _target_ is listed here).
TASK_TARGETS = frozenset({
    "tasks.audio.AudioMultiLabelTask",
    "tasks.audio.AudioTask",
    "tasks.captioning.CaptioningTask",
    "tasks.classification.ClassificationTask",
    "tasks.fewshot.FewShotTask",
    "tasks.multitask.FewShotTask",
    "tasks.multitask.MultiTaskClassificationTask",
    "tasks.pde.PDEForecastTask",
    "tasks.regression.DenseRegressionTask",
    "tasks.restoration.RestorationTask",
    "tasks.segmentation.SegmentationTask",
})
DATA_TARGETS = frozenset({
    "tasks.data.audio.AudioDataModule",
    "tasks.data.captioning.CaptionDataModule",
    "tasks.data.depth.DepthDataModule",
    "tasks.data.imagefolder.image_classification_data",  # VTAB lists or an image folder (task=vtab's data)
    "tasks.data.rendered.RenderedDataModule",
    "tasks.data.restoration.RestorationDataModule",
    "tasks.data.segmentation.SegDataModule",
    "tasks.data.vtab.VTABDataModule",
    "tasks.fewshot.FewShotDataModule",
    "tasks.multitask.FewShotDataModule",
    "tasks.multitask.MultiTaskDataModule",
    "tasks.pde.PDEDataModule",
})


# where a _target_ may appear in adapter.json: the task, the data, and the copy of the data config a
# task keeps as a plain dict (task=fewshot's ``data: ${data}``, never instantiated from there)
ALLOWED = {"task.config": TASK_TARGETS, "task.data": DATA_TARGETS, "task.config.data": DATA_TARGETS}


def check_artifact_config(meta: dict[str, Any], where: str) -> None:
    """Check a whole ``adapter.json`` (see the module docstring); raise :class:`UnsafeArtifactError`."""
    check_data_only(meta, where, allowed_targets=ALLOWED)


def construct(cfg: dict[str, Any], allowed: frozenset, what: str, **kwargs: Any) -> Any:
    """``cls(**cfg, **kwargs)`` for the allow-listed ``cfg["_target_"]``: no recursion, no interpolation."""
    cls = recorded_class(cfg, allowed, what)
    check_data_only({k: v for k, v in cfg.items() if k != "_target_"}, what, what, {f"{what}.data": DATA_TARGETS})
    return cls(**{k: v for k, v in cfg.items() if k != "_target_"}, **kwargs)


def recorded_class(cfg: dict[str, Any], allowed: frozenset, what: str) -> Any:
    """The allow-listed class (or DataModule factory) ``cfg["_target_"]`` names, imported only when listed."""
    target = cfg.get("_target_")
    if target not in allowed:
        raise UnsafeArtifactError(f"{what}._target_={target!r} is not one of the project's own classes; "
                                  f"valid: {', '.join(sorted(allowed))}")
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)
