"""Few-shot data: CoOp/Dassl K-shot rule, class-name cleaning, base/new, layouts, bad input."""
from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import pytest

from tasks.data.fewshot import (
    clean_classname,
    classnames_of,
    load_fewshot,
    read_split,
    sample_fewshot,
    subsample_classes,
)

ROOT = Path(__file__).resolve().parents[1]


def dassl_generate_fewshot(data_source, num_shots, repeat=False):
    """Dassl ``DatasetBase.generate_fewshot_dataset`` + ``split_dataset_by_label``, transcribed (the oracle)."""
    tracker = defaultdict(list)
    for item in data_source:
        tracker[item[1]].append(item)
    dataset = []
    for label, items in tracker.items():
        if len(items) >= num_shots:
            sampled = random.sample(items, num_shots)
        else:
            sampled = random.choices(items, k=num_shots) if repeat else items
        dataset.extend(sampled)
    return dataset


def toy_split(n_classes=5, per_class=(9, 6, 3)):
    split = {"train": [], "val": [], "test": []}
    order = [3, 0, 4, 1, 2][:n_classes]  # labels first appear out of order, as in real split files
    for s, n in zip(split, per_class):
        for i in range(n):
            for y in order:
                split[s].append([f"c{y}/{s}_{i}.jpg", y, f"class_{y}"])
    return split


def write_coop(root: Path, name="OxfordPets", folder="oxford_pets", split=None):
    d = root / folder
    (d / "images").mkdir(parents=True)
    (d / f"split_zhou_{name}.json").write_text(json.dumps(split or toy_split()))
    return d


@pytest.mark.parametrize("shots", [1, 2, 4, 8])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kshot_sampler_follows_coop_rule_and_is_deterministic(tmp_path, shots, seed):
    split = toy_split()
    train = [tuple(x) for x in split["train"]]
    val = [tuple(x) for x in split["val"]]
    random.seed(seed)  # Dassl: set_random_seed(cfg.SEED) before the dataset is built
    ref_train = dassl_generate_fewshot(train, shots)
    ref_val = dassl_generate_fewshot(val, min(shots, 4))
    tr, va = sample_fewshot(train, val, shots, seed)
    assert tr == ref_train and va == ref_val
    assert sample_fewshot(train, val, shots, seed) == (tr, va)
    counts = defaultdict(int)
    for _, y, _ in va:
        counts[y] += 1
    assert set(counts.values()) == {min(shots, 4)}


def test_seeds_differ_and_clip_lora_sampler_draws_val_first_with_replacement():
    split = toy_split(per_class=(3, 6, 3))
    train, val = [tuple(x) for x in split["train"]], [tuple(x) for x in split["val"]]
    assert sample_fewshot(train, val, 2, 1) != sample_fewshot(train, val, 2, 2)
    random.seed(1)
    ref_val = dassl_generate_fewshot(val, 4, repeat=True)
    ref_train = dassl_generate_fewshot(train, 4, repeat=True)
    assert sample_fewshot(train, val, 4, 1, sampler="clip_lora") == (ref_train, ref_val)
    tr, _ = sample_fewshot(train, val, 4, 1)  # CoOp keeps the 3 images of a short class
    assert len(tr) == 5 * 3
    with pytest.raises(ValueError, match="K=4 shots but class 'class_3' has only 3 train images; .*short_classes=keep"):
        sample_fewshot(train, val, 4, 1, short_classes="error")


def test_class_name_cleaning_on_reference_examples():
    assert clean_classname("Caltech101", "airplanes") == "airplane"
    assert clean_classname("Caltech101", "Faces") == "face"
    assert clean_classname("Caltech101", "Leopards") == "leopard"
    assert clean_classname("Caltech101", "Motorbikes") == "motorbike"
    assert clean_classname("EuroSAT", "AnnualCrop") == "Annual Crop Land"
    assert clean_classname("EuroSAT", "SeaLake") == "Sea or Lake"
    assert clean_classname("EuroSAT", "Forest") == "Forest"
    assert clean_classname("OxfordPets", "american_bulldog_12.jpg") == "american_bulldog"
    assert clean_classname("OxfordPets", "Abyssinian_1") == "abyssinian"
    assert clean_classname("StanfordCars", "Tesla Model S Sedan 2012") == "2012 Tesla Model S Sedan"
    assert clean_classname("SUN397", "/a/apartment_building/outdoor") == "outdoor apartment_building"
    assert clean_classname("SUN397", "/a/abbey") == "abbey"
    assert clean_classname("UCF101", "ApplyEyeMakeup") == "Apply_Eye_Makeup"
    from zoo.zeroshot import class_prompts

    class _B:  # prompt-time cleaning: "_" -> " "
        adapters = []

    assert class_prompts(_B(), ["Apply_Eye_Makeup"], ["a photo of a person doing {}."]) == [
        ["a photo of a person doing Apply Eye Makeup."]]


def test_base_new_split_relabels_and_never_leaks_new_classes():
    split = toy_split()
    items = {s: [tuple(x) for x in v] for s, v in split.items()}
    base = subsample_classes(items["train"], items["test"], subsample="base")
    new = subsample_classes(items["train"], items["test"], subsample="new")
    assert {y for _, y, _ in base[0]} == {0, 1, 2}  # ceil(5/2) = 3 base classes, relabelled 0..2
    assert {c for _, _, c in base[0]} == {"class_0", "class_1", "class_2"}
    assert {c for _, _, c in new[1]} == {"class_3", "class_4"} and {y for _, y, _ in new[1]} == {0, 1}


def test_load_fewshot_base_classes_only_in_training(tmp_path):
    write_coop(tmp_path)
    s = load_fewshot(tmp_path, "OxfordPets", 2, 1, subsample="base")
    assert s.classnames == ["class_0", "class_1", "class_2"]
    assert {c for _, _, c in s.train + s.val + s.test} <= set(s.classnames)
    assert len(s.train) == 3 * 2 and s.template == "a photo of a {}, a type of pet."
    assert s.image_root == tmp_path / "oxford_pets" / "images"


def test_clip_lora_layout_is_found(tmp_path):
    write_coop(tmp_path, "OxfordFlowers", "Flower102")
    root, splits = read_split(tmp_path, "flowers102")
    assert root == tmp_path / "Flower102" / "jpg" and len(splits["test"]) == 15
    with pytest.raises(FileNotFoundError, match="OxfordFlowers not found .*oxford_flowers/jpg/"):
        read_split(tmp_path, "flowers102", layout="coop")


def test_bad_input_is_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match="unknown few-shot dataset 'mnist'; valid: ImageNet, Caltech101"):
        load_fewshot(tmp_path, "mnist", 1, 1)
    with pytest.raises(FileNotFoundError, match="not found under .*expected dtd/images/... \\+ dtd/split_zhou_"):
        load_fewshot(tmp_path, "dtd", 1, 1)
    (tmp_path / "eurosat").mkdir()
    with pytest.raises(FileNotFoundError, match="split file .*split_zhou_EuroSAT.json is missing"):
        load_fewshot(tmp_path, "eurosat", 1, 1)
    bad = toy_split()
    bad["train"][0][2] = ""
    write_coop(tmp_path, split=bad)
    with pytest.raises(ValueError, match="must be \\[relpath, label, classname\\] with a class name"):
        load_fewshot(tmp_path, "oxford_pets", 1, 1)
    with pytest.raises(ValueError, match="class names missing for labels \\[1\\]"):
        classnames_of([("a", 0, "x"), ("b", 2, "z")])
    with pytest.raises(ValueError, match="subsample='half'; valid: all, base, new"):
        subsample_classes([], subsample="half")


def test_embedded_shapes_dataset_in_coop_layout():
    root = ROOT / "data" / "fewshot"
    s = load_fewshot(root, "shapes", 16, 1, subsample="all")
    assert len(s.classnames) == 24 and "red circle" in s.classnames and "blue star" in s.classnames
    assert len(s.train) == 24 * 16 and len(s.val) == 24 * 4 and len(s.test) == 24 * 10
    assert (s.image_root / s.train[0][0]).is_file()
    assert len(load_fewshot(root, "shapes", 16, 1, subsample="new").classnames) == 12
    assert load_fewshot(root, "shapecolors", 1, 1).classnames == ["red", "green", "blue", "yellow", "purple", "orange"]


def test_shapes_grainy_are_the_shapes_classes_in_another_domain(tmp_path):
    """ShapesGrainy (the quickstart's downstream set): Shapes' classes and order, a 40-image-per-class test
    split, the same bytes from the same seed, and images that really differ from the pretraining renderer."""
    import hashlib

    import numpy as np
    from PIL import Image

    from tasks.data.fewshot_shapes import render, write_dataset

    root = ROOT / "data" / "fewshot"
    s = load_fewshot(root, "shapesgrainy", 16, 1, subsample="all")
    shapes = load_fewshot(root, "shapes", 16, 1, subsample="all")
    assert s.classnames == shapes.classnames and s.template == shapes.template
    assert len(s.train) == 24 * 16 and len(s.val) == 24 * 4 and len(s.test) == 24 * 40
    base = load_fewshot(root, "shapesgrainy", 16, 1, subsample="base")
    assert base.classnames == shapes.classnames[:12] and len(base.test) == 12 * 40

    def digest(folder):
        files = sorted((folder / "images").iterdir()) + [folder / "split_zhou_ShapesGrainy.json"]
        return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()

    assert digest(write_dataset(tmp_path, "ShapesGrainy")) == digest(s.image_root.parent)

    # the shift, measured on the background (the image border): pretraining backgrounds are flat grey
    # (R = G = B), ShapesGrainy's are warm (R - B > 0, the colour cast) and grainy (|R - G| > 0: the noise)
    def border_stats(split):
        out = []
        for p, _, _ in split.test[:200]:
            a = np.asarray(Image.open(split.image_root / p), dtype=np.float32)
            b = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
            # medians: a shape may touch the border
            out.append((np.median(b[:, 0] - b[:, 2]), np.median(np.abs(b[:, 0] - b[:, 1]))))
        return np.array(out)

    orig, grainy = border_stats(shapes), border_stats(s)
    assert np.abs(orig[:, 0]).max() < 1 and grainy[:, 0].min() > 15   # the warm cast
    assert orig[:, 1].max() < 1 and grainy[:, 1].min() > 5            # the grain
    with pytest.raises(ValueError, match="unknown shift components \\['fog'\\]; valid: outline, texture, small"):
        render("red", "star", np.random.default_rng(0), shift=("outline", "fog"))
