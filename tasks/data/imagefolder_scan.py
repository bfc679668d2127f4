"""Reading an image folder's classes and splits (no image decoded, no Lightning imported): the
DataModule (:mod:`tasks.data.imagefolder`), the data check before weights are built and the
``task.num_classes`` resolver share it. The layout and the split rule are described in
:mod:`tasks.data.imagefolder`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

# torchvision.datasets.folder.IMG_EXTENSIONS (not imported: torchvision costs seconds to import)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
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
        if len(classes) < 2:
            raise ValueError(f"{root / 'train'}: {len(classes)} class ({', '.join(classes)}); a classifier needs at "
                             f"least two classes")
        if (root / "val").is_dir():
            val, _ = scan_split(root / "val", classes)
        else:
            train, val = split_val(train, classes, val_fraction, root / "train")
        test = scan_split(root / "test", classes)[0] if (root / "test").is_dir() else []
    else:
        if any((root / s).is_dir() for s in ("val", "test")):
            raise ValueError(f"{root} has val/ or test/ but no train/ folder; " + layout_help(root))
        items, classes = scan_split(root)
        if len(classes) < 2:
            raise ValueError(f"{root}: {len(classes)} class ({', '.join(classes)}); a classifier needs at least two "
                             f"classes: " + layout_help(root))
        train, val = split_val(items, classes, val_fraction, root)
        test = []
    from tasks.data.overlap import check_disjoint

    splits = {"train": train, "val": val, "test": test}
    # the same image in two splits inflates every metric measured on it: a user's folder is refused (issue 24)
    check_disjoint({k: [p for p, _ in v] for k, v in splits.items()}, str(root))
    return splits, classes


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
    from tasks.data.vtab_tasks import num_classes as vtab_classes

    return vtab_classes(dataset)
