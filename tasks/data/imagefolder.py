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

import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from tasks.data.vtab import EpochSeededSampler

LAYOUTS = ("vtab", "imagefolder")
SPLITS = ("train", "val", "test")


def layout_help(root: Path) -> str:
    return (f"expected an image folder: {root}/train/<class>/*.jpg (+ optional val/ and test/ with the same class "
            f"folders), or {root}/<class>/*.jpg (validation split off by data.val_fraction); image types: "
            f"{', '.join(IMG_EXTENSIONS)}")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_split(folder: Path, classes: Sequence[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """``(path, label)`` items of one ``<class>/*`` folder and its class names.

    With ``classes`` (the training classes), every one of them must be present with at least one image,
    and no other class may appear.
    """
    dirs = _class_dirs(folder)
    names = [d.name for d in dirs]
    if not dirs:
        raise ValueError(f"{folder} has no class folders; " + layout_help(folder.parent if folder.name in SPLITS else folder))
    if classes is not None:
        extra = sorted(set(names) - set(classes))
        if extra:
            raise ValueError(f"{folder}: class folder(s) {extra} are not training classes ({', '.join(classes)}); "
                             f"add them to train/ or remove them")
        absent = [c for c in classes if c not in names]
        if absent:
            raise ValueError(f"{folder}: class(es) {absent} absent: every training class needs at least one "
                             f"image in {folder.name}/ (its accuracy would be unmeasured)")
    else:
        classes = names
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for d in dirs:
        files = _images(d)
        if not files:
            raise ValueError(f"{d}: the class {d.name!r} has no images ({', '.join(IMG_EXTENSIONS)}); add images or "
                             f"remove the folder")
        items += [(str(f), index[d.name]) for f in files]
    return items, list(classes)


def _hash(path: str) -> str:
    return hashlib.sha1(Path(path).name.encode()).hexdigest()


def split_val(items: list[tuple[str, int]], classes: Sequence[str], val_fraction: float, root: Path
              ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Per class, ``max(1, round(val_fraction · n))`` images (the lowest file-name hashes) for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction}: must be in (0, 1) when {root} has no val/ folder")
    train, val = [], []
    for c, name in enumerate(classes):
        mine = sorted((it for it in items if it[1] == c), key=lambda it: _hash(it[0]))
        n_val = max(1, round(val_fraction * len(mine)))
        if len(mine) - n_val < 1:
            raise ValueError(f"class {name!r} has {len(mine)} image(s) under {root}: with data.val_fraction="
                             f"{val_fraction} none is left for training or validation; add images or a val/ folder")
        val += mine[:n_val]
        train += mine[n_val:]
    return sorted(train), sorted(val)


def read_imagefolder(root: str | Path, val_fraction: float = 0.1) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """``({"train", "val", "test": [(path, label)]}, class names)`` of an image folder (test may be ``[]``)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={root} does not exist; " + layout_help(root))
    if (root / "train").is_dir():
        train, classes = scan_split(root / "train")
        if (root / "val").is_dir():
            val, _ = scan_split(root / "val", classes)
        else:
            train, val = split_val(train, classes, val_fraction, root / "train")
        test = scan_split(root / "test", classes)[0] if (root / "test").is_dir() else []
    else:
        if any((root / s).is_dir() for s in ("val", "test")):
            raise ValueError(f"{root} has val/ or test/ but no train/ folder; " + layout_help(root))
        items, classes = scan_split(root)
        train, val = split_val(items, classes, val_fraction, root)
        test = []
    return {"train": train, "val": val, "test": test}, classes


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
    try:
        with Image.open(path) as im:
            return transform(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL: truncated / not an image / corrupt
        raise ValueError(f"{path}: cannot read this image ({type(e).__name__}: {e})") from None


class ImageFolderDataModule(L.LightningDataModule):
    """Image classification from your own folder (see the module docstring)."""

    def __init__(self, root: str, val_fraction: float = 0.1, batch_size: int = 64, eval_batch_size: int | None = None,
                 num_workers: int = 0, data_config: dict | None = None, img_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, augment: bool = True,
                 seed: int = 0, **unused: Any):
        super().__init__()
        self.root = Path(root).expanduser()
        self.splits, self.class_names = read_imagefolder(self.root, val_fraction)
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


def num_classes(layout: str, dataset: str, root: str) -> int:
    """``task.num_classes`` of image classification: the VTAB task's, or the image folder's class count."""
    if layout == "imagefolder":
        root_p = Path(root).expanduser()
        base = root_p / "train" if (root_p / "train").is_dir() else root_p
        if not base.is_dir():
            raise FileNotFoundError(f"data.root={root_p} does not exist; " + layout_help(root_p))
        n = len(_class_dirs(base))
        if n == 0:
            raise ValueError(f"{base} has no class folders; " + layout_help(root_p))
        return n
    from tasks.data.vtab import num_classes as vtab_classes

    return vtab_classes(dataset)


def dataset_name(layout: str, root: str, default: str) -> str:
    """``task.dataset``: the VTAB task (``default``), or for an image folder the folder's name."""
    return Path(root).expanduser().name if layout == "imagefolder" else default
