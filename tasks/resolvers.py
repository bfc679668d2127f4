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


# task=audio's class counts of the named sets; ``folder`` counts its class folders (``task.num_classes`` overrides)
AUDIO_CLASSES = {"generated": 10, "generated_upstream": 12, "generated_multilabel": 10, "esc50": 50,
                 "speechcommands": 35, "speechcommands12": 12}


def _audio_classes(dataset: str, data_dir: str) -> int | None:
    """``task.num_classes`` of ``task=audio``: the named set's, or the class folders of ``task.dataset=folder``
    (``DIR/<class>/`` or ``DIR/train/<class>/``); None where only the data can say (multilabel: set it)."""
    if dataset != "folder":
        return AUDIO_CLASSES.get(dataset)
    from pathlib import Path

    root = Path(data_dir).expanduser()
    base = root / "train" if (root / "train").is_dir() else root
    if not base.is_dir():
        return None  # the data check names the missing folder
    return len([p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]) or None


def _mixed_precision(precision: str, accelerator: str = "auto") -> str:
    from tasks.trainer.perf import mixed_precision

    return mixed_precision(precision, accelerator)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("vtab_classes", _vtab_classes, replace=True)
    OmegaConf.register_new_resolver("image_classes", _image_classes, replace=True)  # VTAB task or image folder
    OmegaConf.register_new_resolver("image_dataset", _image_dataset, replace=True)  # image folder: its name
    OmegaConf.register_new_resolver("audio_classes", _audio_classes, replace=True)  # named set or class folders
    OmegaConf.register_new_resolver("multiply", lambda a, b: int(a) * int(b), replace=True)  # e.g. 500 x K steps
    OmegaConf.register_new_resolver("mixed_precision", _mixed_precision, replace=True)  # 16-mixed on a GPU, else 32
