"""Your own images: torchvision's image-folder layout for classification (``data.layout=imagefolder``).

    <root>/train/<class>/*.jpg        <root>/val/<class>/*   <root>/test/<class>/*   (val, test optional)
or  <root>/<class>/*.jpg              (one folder: validation split off by ``val_fraction``)

Class names are the sorted folder names of ``train/`` (or of ``root``); labels are their indices, as
``torchvision.datasets.ImageFolder``. Without a ``val/`` folder each class gives
``max(1, round(val_fraction · n))`` of its images to validation, chosen by a hash of the file name: the
split is the same on every machine and every seed, and adding images does not move the others.

Preprocessing is the backbone's own, through timm: ``timm.data.resolve_data_config`` of the backbone's
data config, then ``timm.data.create_transform(**config, is_training=True)`` (timm's training
augmentation: random resized crop, flip, colour jitter) for training and the eval transform (resize by
``crop_pct``, centre crop, normalise) otherwise. The artifact records that config, so
``python -m zoo predict`` rebuilds the same eval transform (:mod:`zoo.predict`).

Errors (one line each, before any weights are built: :func:`check_data`): a missing root, no class
folders, a class folder without images, a class absent from ``val/`` or ``test/`` (or left without a
validation image by the split), a ``val/`` class that ``train/`` lacks; at load time an unreadable
image names its file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
from torch.utils.data import DataLoader, Dataset

from tasks.data.imagefolder_scan import LAYOUTS, layout_help, read_imagefolder  # noqa: F401 (re-exported)
from tasks.data.vtab import EpochSeededSampler
from zoo.reading import read_rgb_pil


def resolved_config(data_config: dict[str, Any] | None, img_size: int | None = None, mean=None, std=None
                    ) -> dict[str, Any]:
    """timm's ``resolve_data_config`` of the backbone's data config (``input_size``, ``interpolation``,
    ``mean``, ``std``, ``crop_pct``); ``img_size``, ``mean`` and ``std`` (when given) override it."""
    from timm.data import resolve_data_config

    args = dict(data_config or {})
    if img_size is not None:
        args["input_size"] = (3, int(img_size), int(img_size))
    if mean is not None and std is not None:
        args["mean"], args["std"] = tuple(mean), tuple(std)
    cfg = resolve_data_config(args)
    return {k: list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]
            for k in ("input_size", "interpolation", "mean", "std", "crop_pct") if k in cfg}


def timm_transforms(config: dict[str, Any], augment: bool = True) -> tuple[Callable, Callable]:
    """``(train, eval)``: timm's ``create_transform`` of a resolved config (training: timm's augmentation)."""
    from timm.data import create_transform

    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    evaluate = create_transform(**cfg, is_training=False)
    return (create_transform(**cfg, is_training=True) if augment else evaluate), evaluate


class ImageFiles(Dataset):
    """``(path, label)`` items read with PIL (RGB) and transformed; an unreadable file is named."""

    def __init__(self, items: list[tuple[str, int]], transform: Callable):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return load_image(path, self.transform), label


def load_image(path: str | Path, transform: Callable):
    """The transformed image at ``path``, read at its real bit depth (:func:`zoo.reading.read_rgb_pil`: a
    16-bit PNG is scaled, not clipped to white); a missing or unreadable file is one line naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return transform(read_rgb_pil(path))


class ImageFolderDataModule(L.LightningDataModule):
    """Image classification from your own folder (see the module docstring)."""

    def __init__(self, root: str, val_fraction: float = 0.1, batch_size: int = 64, eval_batch_size: int | None = None,
                 num_workers: int = 0, data_config: dict | None = None, img_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, augment: bool = True,
                 seed: int = 0, **unused: Any):
        super().__init__()
        self.root = Path(root).expanduser()
        self.splits, self.class_names = read_imagefolder(self.root, val_fraction)
        self.val_fraction = float(val_fraction)
        self.num_classes = len(self.class_names)
        self.task = self.dataset_name = self.root.name  # the run's dataset name (metrics.json, the artifact)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.transform_config = resolved_config(data_config, img_size, mean, std)
        self.train_transform, self.eval_transform = timm_transforms(self.transform_config, augment)
        self.train_set = ImageFiles(self.splits["train"], self.train_transform)
        self.val_set = ImageFiles(self.splits["val"], self.eval_transform)
        self.test_set = ImageFiles(self.splits["test"], self.eval_transform) if self.splits["test"] else None

    has_val = True

    def preprocessing(self) -> dict[str, Any]:
        """The eval transform's resolved timm config (recorded in the artifact for ``zoo predict``)."""
        return dict(self.transform_config)

    def split_files(self, split: str) -> list[str]:
        """The image files of ``split`` (``eval.py +predict=DIR``)."""
        return [p for p, _ in self.splits[split]]

    def split_info(self) -> dict:
        """The protocol record's splits: the folders, or the validation share split off ``train/``."""
        own_val = (self.root / "val").is_dir()
        names = {"train": "train" if own_val or not (self.root / "train").is_dir() else "train (rest)",
                 "val": "val" if own_val else f"{self.val_fraction:g} of each class (file-name hash)", "test": "test"}
        return {s: {"name": names[s], "size": len(self.splits[s])} if self.splits[s] else None
                for s in ("train", "val", "test")} | {"val_overlaps_test": False}

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size if train else self.eval_batch_size,
                          sampler=EpochSeededSampler(len(ds), self.seed) if train else None,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise FileNotFoundError(f"{self.root} has no test/ folder: evaluate split=val, or add test/<class>/*")
        return self._loader(self.test_set, False)


def image_classification_data(layout: str = "vtab", **kw: Any) -> L.LightningDataModule:
    """The DataModule of ``data.layout``: ``vtab`` (:class:`~tasks.data.vtab.VTABDataModule`) or
    ``imagefolder`` (:class:`ImageFolderDataModule`)."""
    if layout == "imagefolder":
        return ImageFolderDataModule(**{k: v for k, v in kw.items() if k not in ("dataset", "protocol", "generate", "cache")})
    if layout == "vtab":
        from tasks.data.vtab import VTABDataModule

        kw.pop("data_config", None), kw.pop("val_fraction", None), kw.pop("augment", None)
        return VTABDataModule(**kw)
    raise ValueError(f"data.layout={layout!r}; valid: {', '.join(LAYOUTS)}")


def check_data(layout: str = "vtab", root: str = "", dataset: str = "", generate: bool = False,
               val_fraction: float = 0.1, **_: Any) -> None:
    """Check the data on disk (cheap: folders and lists, no image decoded) before weights are built."""
    if layout == "imagefolder":
        read_imagefolder(root, val_fraction)
    elif layout == "vtab":
        from tasks.data.vtab import check_data as check_vtab

        check_vtab(root, dataset, generate)
    else:
        raise ValueError(f"data.layout={layout!r}; valid: {', '.join(LAYOUTS)}")


image_classification_data.check_data = check_data
