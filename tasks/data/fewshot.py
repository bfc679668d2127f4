"""Few-shot image classification data for CLIP: the 11 CoOp datasets and an embedded generated one.

Layouts (see the team spec ``reference/clip_fewshot_captioning.md`` (internal, not shipped) §1.1):

* ``coop`` (CoOp/Dassl): ``$root/<folder>/<image dir>/...`` plus ``$root/<folder>/split_zhou_<Name>.json``
  holding ``{"train"|"val"|"test": [[relpath, label, classname], ...]}`` (paths relative to the image
  dir, labels 0-based). ImageNet: ``imagenet/images/{train,val}/nXXXX/*`` + ``imagenet/classnames.txt``
  (its val is the test set). FGVCAircraft: ``fgvc_aircraft/variants.txt`` and
  ``images_variant_{train,val,test}.txt``.
* ``clip_lora``: the same files under CLIP-LoRA's folder names (``Caltech101/``, ``DTD/``, ``Flower102/``,
  ...); its ImageNet is ``imagenet/{train,val}/nXXXX/*`` without the ``images/`` level.
* ``auto`` tries CoOp's folder name, then CLIP-LoRA's.

K-shot sampling (:func:`sample_fewshot`) follows CoOp/Dassl (``generate_fewshot_dataset``): seed
Python's ``random`` with the run seed; group items by label in first-appearance order;
``random.sample(items, K)`` per class; the train subset first, then val with ``min(K, 4)`` shots.
``sampler=clip_lora`` is CLIP-LoRA's copy: val first, then train, classes short of K filled by
sampling with replacement. The test split is always complete.

Base-to-new (CoCoOp, :func:`subsample_classes`): sorted labels, base = the first ⌈n/2⌉, new = the
rest, each relabelled 0..m-1; training sees base classes only.
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from torch.utils.data import Dataset

from tasks.data.overlap import check_disjoint
from tasks.data.paths import check_inside
from zoo.adapters.base import check_int
from zoo.reading import read_rgb_pil, read_text, reading

log = logging.getLogger(__name__)

Item = tuple[str, int, str]  # (path relative to the image root, label, class name)


@dataclass(frozen=True)
class FewShotDataset:
    name: str                  # Dassl NAME
    coop_dir: str              # folder under $root in CoOp's layout
    clip_lora_dir: str         # folder under $root in CLIP-LoRA's layout
    image_dir: str             # image root inside the folder ("" = the folder itself)
    split_file: str | None     # split_zhou_*.json, or None (ImageNet, FGVCAircraft)
    template: str              # CoOp's CUSTOM_TEMPLATES entry


DATASETS: dict[str, FewShotDataset] = {d.name.lower(): d for d in [
    FewShotDataset("ImageNet", "imagenet", "imagenet", "images", None, "a photo of a {}."),
    FewShotDataset("Caltech101", "caltech-101", "Caltech101", "101_ObjectCategories", "split_zhou_Caltech101.json", "a photo of a {}."),
    FewShotDataset("OxfordPets", "oxford_pets", "OxfordPets", "images", "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet."),
    FewShotDataset("StanfordCars", "stanford_cars", "StanfordCars", "", "split_zhou_StanfordCars.json", "a photo of a {}."),
    FewShotDataset("OxfordFlowers", "oxford_flowers", "Flower102", "jpg", "split_zhou_OxfordFlowers.json", "a photo of a {}, a type of flower."),
    FewShotDataset("Food101", "food-101", "Food101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food."),
    FewShotDataset("FGVCAircraft", "fgvc_aircraft", "fgvc_aircraft", "images", None, "a photo of a {}, a type of aircraft."),
    FewShotDataset("SUN397", "sun397", "SUN397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}."),
    FewShotDataset("DescribableTextures", "dtd", "DTD", "images", "split_zhou_DescribableTextures.json", "{} texture."),
    FewShotDataset("EuroSAT", "eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}."),
    FewShotDataset("UCF101", "ucf101", "UCF101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}."),
    # embedded, generated offline (tasks/data/fewshot_shapes.py): rendered coloured shapes, and two
    # held-out sets for retention (colour only, shape only)
    FewShotDataset("Shapes", "shapes", "shapes", "images", "split_zhou_Shapes.json", "a photo of a {}."),
    FewShotDataset("ShapeColors", "shape_colors", "shape_colors", "images", "split_zhou_ShapeColors.json", "a photo of a {} shape."),
    FewShotDataset("ShapeForms", "shape_forms", "shape_forms", "images", "split_zhou_ShapeForms.json", "a photo of a {}."),
    # the Shapes classes as grainy photos under warm light: a domain shift from the tiny CLIP's pretraining
    FewShotDataset("ShapesGrainy", "shapes_grainy", "shapes_grainy", "images", "split_zhou_ShapesGrainy.json",
                   "a photo of a {}."),
]}
ALIASES = {"flowers102": "oxfordflowers", "dtd": "describabletextures", "pets": "oxfordpets", "cars": "stanfordcars",
           "aircraft": "fgvcaircraft", "sun": "sun397", "caltech": "caltech101", "food": "food101", "ucf": "ucf101"}
COOP_11 = ["imagenet", "caltech101", "oxfordpets", "stanfordcars", "oxfordflowers", "food101", "fgvcaircraft",
           "sun397", "describabletextures", "eurosat", "ucf101"]
EMBEDDED = ("shapes", "shapecolors", "shapeforms", "shapesgrainy")
LAYOUTS = ("auto", "coop", "clip_lora")
SAMPLERS = ("coop", "clip_lora")
SUBSAMPLE = ("all", "base", "new")


def dataset_info(name: str) -> FewShotDataset:
    key = ALIASES.get(name.lower().replace("-", "").replace("_", ""), name.lower().replace("-", "").replace("_", ""))
    if key not in DATASETS:
        raise ValueError(f"unknown few-shot dataset {name!r}; valid: {', '.join(d.name for d in DATASETS.values())}")
    return DATASETS[key]


# ---------------------------------------------------------------------------------------------- class names
CALTECH_RENAME = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")
EUROSAT_RENAME = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
    "SeaLake": "Sea or Lake",
}


def clean_classname(dataset: str, raw: str) -> str:
    """CoOp's class-name cleaning for a raw name (folder, file or meta entry), per dataset (§1.2)."""
    d = dataset_info(dataset).name
    if d == "Caltech101":
        return CALTECH_RENAME.get(raw, raw)
    if d == "EuroSAT":
        return EUROSAT_RENAME.get(raw, raw)
    if d == "OxfordPets":  # breed from an image file name: drop "_<n>" (and the extension), lowercase
        return re.sub(r"_\d+$", "", Path(raw).stem).lower()
    if d == "StanfordCars":  # "Tesla Model S Sedan 2012" -> "2012 Tesla Model S Sedan"
        parts = raw.split(" ")
        return " ".join([parts[-1], *parts[:-1]]) if parts[-1].isdigit() else raw
    if d == "SUN397":  # "/a/apartment_building/outdoor" -> "outdoor apartment_building"
        parts = raw.strip("/").split("/")[1:]
        return " ".join(reversed(parts))
    if d == "UCF101":  # "ApplyEyeMakeup" -> "Apply_Eye_Makeup"
        return "_".join(re.findall(r"[A-Z][^A-Z]*", raw)) or raw
    return raw


# ---------------------------------------------------------------------------------------------- reading
def expected_layout(info: FewShotDataset) -> str:
    img = f"{info.image_dir}/" if info.image_dir else ""
    if info.name == "ImageNet":
        return "imagenet/images/{train,val}/nXXXXXXXX/*.JPEG + imagenet/classnames.txt (CoOp), or imagenet/{train,val}/nXXXXXXXX/* (CLIP-LoRA)"
    if info.name == "FGVCAircraft":
        return "fgvc_aircraft/images/*.jpg + variants.txt + images_variant_{train,val,test}.txt"
    return f"{info.coop_dir}/{img}... + {info.coop_dir}/{info.split_file} (CoOp) or {info.clip_lora_dir}/ (CLIP-LoRA)"


def find_dataset_dir(root: str | Path, info: FewShotDataset, layout: str = "auto") -> Path:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; valid: {', '.join(LAYOUTS)}")
    names = {"coop": [info.coop_dir], "clip_lora": [info.clip_lora_dir]}.get(layout, [info.coop_dir, info.clip_lora_dir])
    for n in names:
        if (Path(root) / n).is_dir():
            return Path(root) / n
    raise FileNotFoundError(f"few-shot dataset {info.name} not found under {root}: expected {expected_layout(info)}")


def read_split(root: str | Path, dataset: str, layout: str = "auto") -> tuple[Path, dict[str, list[Item]]]:
    """``(image root, {"train","val","test": items})`` of ``dataset`` under ``root``; a listed path that
    leaves the dataset folder (absolute, or with ``..``) is refused."""
    info = dataset_info(dataset)
    d = find_dataset_dir(root, info, layout)
    if info.name == "ImageNet":
        return _read_imagenet(d)
    if info.name == "FGVCAircraft":
        return _read_aircraft(d, info)
    path = d / info.split_file
    if not path.is_file():
        raise FileNotFoundError(f"{info.name}: split file {path} is missing; download CoOp's {info.split_file} "
                                f"(see CoOp DATASETS.md); expected {expected_layout(info)}")
    with reading(path, "split file (JSON)"):
        raw = json.loads(read_text(path, "split file (JSON)"))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object with keys train, val, test")
    splits = {}
    for s in ("train", "val", "test"):
        if s not in raw:
            raise ValueError(f"{path}: no {s!r} split (expected keys train, val, test)")
        items = []
        for entry in raw[s]:
            if not isinstance(entry, list) or len(entry) != 3 or not str(entry[2]).strip():
                raise ValueError(f"{path}: {s} entry {entry!r} must be [relpath, label, classname] with a class name")
            if isinstance(entry[1], bool) or not isinstance(entry[1], int) or entry[1] < 0:
                raise ValueError(f"{path}: {s} entry {entry!r}: the label must be an integer >= 0")
            items.append((check_inside(str(entry[0]), f"{path}: {s} entry {entry!r}", d), int(entry[1]), str(entry[2])))
        splits[s] = items
    return d / info.image_dir if info.image_dir else d, splits


def _read_imagenet(d: Path) -> tuple[Path, dict[str, list[Item]]]:
    img = d / "images" if (d / "images" / "train").is_dir() else d
    names: dict[str, str] = {}
    cn = d / "classnames.txt"
    if cn.is_file():
        for line in read_text(cn, "class names file").splitlines():
            if line.strip():
                wnid, name = line.strip().split(" ", 1)
                names[wnid] = name
    else:
        import open_clip

        wnids = sorted(p.name for p in (img / "train").iterdir() if p.is_dir()) if (img / "train").is_dir() else []
        if len(wnids) == len(open_clip.IMAGENET_CLASSNAMES):
            names = dict(zip(wnids, open_clip.IMAGENET_CLASSNAMES))
    if not (img / "train").is_dir() or not names:
        raise FileNotFoundError(f"ImageNet under {d}: expected {expected_layout(DATASETS['imagenet'])}")
    wnids = sorted(names)
    splits = {}
    for split, folder in (("train", "train"), ("test", "val")):
        splits[split] = [(f"{folder}/{w}/{f.name}", i, names[w]) for i, w in enumerate(wnids)
                         for f in sorted((img / folder / w).iterdir())]
    splits["val"] = splits["test"]  # CoOp: ImageNet's val is its test set
    return img, splits


def _read_aircraft(d: Path, info: FewShotDataset) -> tuple[Path, dict[str, list[Item]]]:
    variants = d / "variants.txt"
    if not variants.is_file():
        raise FileNotFoundError(f"FGVCAircraft: {variants} is missing; expected {expected_layout(info)}")
    names = [ln.strip() for ln in read_text(variants, "variants list").splitlines() if ln.strip()]
    label = {n: i for i, n in enumerate(names)}
    splits = {}
    for s in ("train", "val", "test"):
        f = d / f"images_variant_{s}.txt"
        if not f.is_file():
            raise FileNotFoundError(f"FGVCAircraft: {f} is missing; expected {expected_layout(info)}")
        items = []
        for ln in read_text(f, "split list").splitlines():
            if ln.strip():
                img, name = ln.strip().split(" ", 1)
                items.append((check_inside(f"{img}.jpg", f"{f}: line {ln.strip()!r}", d / "images"), label[name], name))
        splits[s] = items
    return d / "images", splits


def classnames_of(items: Sequence[Item]) -> list[str]:
    """Dassl's ``get_lab2cname``: one class name per label, in label order; labels must be 0..n-1."""
    lab2name = {}
    for path, y, c in items:
        if lab2name.setdefault(y, c) != c:  # Dassl keeps the first name; a second one is a broken split file
            raise ValueError(f"label {y} is named both {lab2name[y]!r} and {c!r} (e.g. {path}); "
                             "one class name per label")
    labels = sorted(lab2name)
    if labels != list(range(len(labels))):
        missing = sorted(set(range(max(labels) + 1)) - set(labels))
        raise ValueError(f"class names missing for labels {missing[:10]}: every label 0..{max(labels)} needs a name")
    return [lab2name[y] for y in labels]


# ---------------------------------------------------------------------------------------------- sampling
def _by_label(items: Sequence[Item]) -> dict[int, list[Item]]:
    tracker: dict[int, list[Item]] = defaultdict(list)  # first-appearance order, as Dassl
    for it in items:
        tracker[it[1]].append(it)
    return tracker


def _draw(rng: random.Random, items: Sequence[Item], k: int, repeat: bool, short: str, split: str) -> list[Item]:
    out = []
    for label, group in _by_label(items).items():
        if len(group) >= k:
            out.extend(rng.sample(group, k))
        elif short == "error":
            raise ValueError(f"K={k} shots but class {group[0][2]!r} has only {len(group)} {split} images; "
                             f"use fewer shots, or short_classes=keep (CoOp: keep all) or repeat (CLIP-LoRA)")
        elif repeat or short == "repeat":
            out.extend(rng.choices(group, k=k))
        else:
            out.extend(group)
    return out


def sample_fewshot(train: Sequence[Item], val: Sequence[Item], shots: int, seed: int, sampler: str = "coop",
                   short_classes: str | None = None) -> tuple[list[Item], list[Item]]:
    """K-shot train and ``min(K, 4)``-shot val subsets, deterministic per seed (CoOp's rule by default).

    ``short_classes``: what a class with fewer than K images does -- ``None`` follows the sampler
    (CoOp: keep all it has; CLIP-LoRA: sample with replacement), ``error`` refuses, ``keep``/``repeat``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}; valid: {', '.join(SAMPLERS)}")
    if short_classes not in (None, "error", "keep", "repeat"):
        raise ValueError(f"short_classes={short_classes!r}; valid: error, keep, repeat (or null: the sampler's rule)")
    if shots < 1:
        return list(train), list(val)
    rng = random.Random(seed)  # == random.seed(seed) then random.sample, as Dassl's set_random_seed
    short = short_classes or ("keep" if sampler == "coop" else "repeat")
    repeat = short == "repeat"
    if sampler == "coop":
        tr = _draw(rng, train, shots, repeat, short, "train")
        va = _draw(rng, val, min(shots, 4), repeat, short, "val")
    else:
        va = _draw(rng, val, min(shots, 4), repeat, short, "val")
        tr = _draw(rng, train, shots, repeat, short, "train")
    return tr, va


def subsample_classes(*splits: Sequence[Item], subsample: str = "all") -> list[list[Item]]:
    """CoCoOp's base/new split: base = the first ⌈n/2⌉ sorted labels, new = the rest, relabelled 0..m-1."""
    if subsample not in SUBSAMPLE:
        raise ValueError(f"subsample={subsample!r}; valid: {', '.join(SUBSAMPLE)}")
    if subsample == "all":
        return [list(s) for s in splits]
    labels = sorted({y for s in splits for _, y, _ in s})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(selected)}
    return [[(p, relabel[y], c) for p, y, c in s if y in relabel] for s in splits]


class ImageItems(Dataset):
    def __init__(self, root: Path, items: Sequence[Item], transform: Callable | None = None):
        self.root, self.items, self.transform = Path(root), list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, y, _ = self.items[i]
        if not (self.root / path).is_file():
            raise FileNotFoundError(f"{self.root / path} is listed in the split but does not exist")
        img = read_rgb_pil(self.root / path)
        return (self.transform(img) if self.transform else img), y


@dataclass
class FewShotSplits:
    """What a few-shot run sees: the K-shot train/val subsets, the full test split, class names."""

    image_root: Path
    train: list[Item]
    val: list[Item]
    test: list[Item]
    classnames: list[str]
    template: str


def load_fewshot(root: str | Path, dataset: str, shots: int, seed: int, subsample: str = "all",
                 layout: str = "auto", sampler: str = "coop", short_classes: str | None = None,
                 generate: bool = True) -> FewShotSplits:
    """Read ``dataset``, draw the K-shot subsets (before the base/new split, as CoOp), subsample classes."""
    info = dataset_info(dataset)
    if generate and info.name.lower() in EMBEDDED:
        from tasks.data.fewshot_shapes import ensure_shapes

        ensure_shapes(root)
    shots = check_int("task.shots", shots, 0)
    if shots not in (0, 1, 2, 4, 8, 16):
        log.warning("K=%d: the CoOp protocol uses K in {1, 2, 4, 8, 16}", shots)
    image_root, splits = read_split(root, dataset, layout)
    empty = [s for s in ("train", "test") if not splits[s]]
    if empty:  # an empty test split used to train and report test/acc = null with exit 0
        raise ValueError(f"{info.name} under {image_root}: the {' and the '.join(empty)} split lists no image; "
                         f"a few-shot run trains on train and reports on test")
    names_all = classnames_of(splits["train"] + splits["test"])
    train, val = sample_fewshot(splits["train"], splits["val"], shots, seed, sampler, short_classes)
    train, val, test = subsample_classes(train, val, splits["test"], subsample=subsample)
    # the K-shot training images must not be test images: a file in both is refused; byte-identical copies under
    # other names are warned about (the benchmarks' split files are used as they are). Validation shots drawn
    # from the test set (ImageNet's val folder is its test set, as CoOp) are the selection rule's business: the
    # run records the overlap and refuses task.selection=val (tasks/protocol.py)
    check_disjoint({"train": [image_root / p for p, _, _ in train], "test": [image_root / p for p, _, _ in test]},
                   f"{info.name} under {image_root}", pairs=(("train", "test"),), identical="warn")
    labels = sorted({y for _, y, _ in splits["train"] + splits["test"]})
    m = math.ceil(len(labels) / 2)
    names = {"all": names_all, "base": names_all[:m], "new": names_all[m:]}[subsample]
    return FewShotSplits(image_root, train, val, test, names, info.template)
