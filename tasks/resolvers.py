"""The OmegaConf resolvers the configs use, registered without importing Lightning or torch.

``train.py`` / ``eval.py`` register them before Hydra composes: a config mistake or ``--help`` then
answers without loading the training stack (each resolver imports what it needs when it runs).
"""
from __future__ import annotations

from omegaconf import OmegaConf


def _vtab_classes(name: str) -> int:
    from tasks.data.vtab_tasks import num_classes

    return num_classes(name)


def _image_classes(layout: str, dataset: str, root: str) -> int:
    from tasks.data.imagefolder_scan import num_classes

    return num_classes(layout, dataset, root)


def _image_dataset(layout: str, root: str, default: str) -> str:
    from pathlib import Path

    return Path(root).expanduser().name if layout == "imagefolder" else default


def _mixed_precision(precision: str, accelerator: str = "auto") -> str:
    from tasks.trainer.perf import mixed_precision

    return mixed_precision(precision, accelerator)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("vtab_classes", _vtab_classes, replace=True)
    OmegaConf.register_new_resolver("image_classes", _image_classes, replace=True)  # VTAB task or image folder
    OmegaConf.register_new_resolver("image_dataset", _image_dataset, replace=True)  # image folder: its name
    OmegaConf.register_new_resolver("multiply", lambda a, b: int(a) * int(b), replace=True)  # e.g. 500 x K steps
    OmegaConf.register_new_resolver("mixed_precision", _mixed_precision, replace=True)  # 16-mixed on a GPU, else 32
