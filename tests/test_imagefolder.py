"""Your own images: the image-folder layout, its errors, timm's preprocessing, and predict from the command line."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tasks.data.imagefolder import ImageFiles, ImageFolderDataModule, read_imagefolder
from tasks.data.imagefolder_scan import num_classes
from tests.image_folder_helpers import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([PY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[:3]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_train_then_predict_from_the_command_line(tmp_path):
    """train.py on a folder of JPEGs, then ``python -m zoo predict``: the CSV's accuracy on test/ is the
    test accuracy the run measured (same model, same eval transform, outside Lightning)."""
    data = write_image_folder(tmp_path / "mycats")
    run = tmp_path / "run"
    _run(["train.py", "experiment=tiny", "adapter=lora", "data.layout=imagefolder", f"data.root={data}",
          "data.batch_size=8", f"hydra.run.dir={run}"])
    m = json.loads((run / "metrics.json").read_text())
    assert m["dataset"] == "mycats" and m["test/acc"] is not None and m["validated_on"] == "val"
    meta = json.loads((run / "adapter" / "adapter.json").read_text())
    assert meta["task"]["class_names"] == ["cats", "dogs"]
    assert meta["preprocessing"]["crop_pct"] == pytest.approx(0.9)  # timm's resolved config of the backbone

    out = tmp_path / "pred"
    _run(["-m", "zoo", "predict", str(run / "adapter"), str(data / "test"), "--out", str(out)])
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 8 and set(rows[0]) == {"file", "label", "score"}
    assert all(0.0 < float(r["score"]) <= 1.0 for r in rows)
    correct = [r["label"] == Path(r["file"]).parent.name for r in rows]
    assert sum(correct) / len(rows) == pytest.approx(m["test/acc"])
    assert m["test/acc"] >= 0.75  # two colours: the run learnt them


def test_folder_errors_are_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; expected an image folder"):
        read_imagefolder(tmp_path / "nope")
    root = write_image_folder(tmp_path / "a", {"train": 3, "val": 1})
    (root / "train" / "birds").mkdir()
    with pytest.raises(ValueError, match=r"birds.*has no images"):
        read_imagefolder(root)
    (root / "train" / "birds").rmdir()
    for f in (root / "val" / "dogs").iterdir():
        f.unlink()
    (root / "val" / "dogs").rmdir()
    with pytest.raises(ValueError, match=r"class\(es\) \['dogs'\] absent"):
        read_imagefolder(root)
    (root / "val" / "dogs").mkdir()
    (root / "val" / "fish").mkdir()
    with pytest.raises(ValueError, match=r"\['fish'\] are not training classes"):
        read_imagefolder(root)
    single = write_image_folder(tmp_path / "b", {"": 1})  # one image per class: none left after the split
    with pytest.raises(ValueError, match="none is left for training or validation"):
        read_imagefolder(single, 0.2)


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg: cannot read this image"):
        ImageFiles([(str(bad), 0)], lambda im: im)[0]


def test_one_folder_split_is_stratified_and_fixed_by_file_names(tmp_path):
    root = write_image_folder(tmp_path / "one", {"": 10})
    splits, classes = read_imagefolder(root, 0.2)
    assert classes == ["cats", "dogs"] and splits["test"] == []
    assert [sum(1 for _, y in splits["val"] if y == c) for c in (0, 1)] == [2, 2]
    assert not {p for p, _ in splits["val"]} & {p for p, _ in splits["train"]}
    # more images: the earlier validation images stay where they were unless a new name hashes lower
    write_image_folder(tmp_path / "one", {"": 30}, seed=1)
    again, _ = read_imagefolder(root, 0.2)
    assert [sum(1 for _, y in again["val"] if y == c) for c in (0, 1)] == [6, 6]
    assert read_imagefolder(root, 0.2)[0] == again  # deterministic
    assert num_classes("imagefolder", "ignored", str(root)) == 2
    dm = ImageFolderDataModule(str(root), val_fraction=0.2, img_size=32)
    info = dm.split_info()
    assert info["val"] == {"name": "0.2 of each class (file-name hash)", "size": 12} and info["test"] is None


def test_transforms_are_timms_for_the_backbone(tmp_path):
    """Eval: exactly timm's ``create_transform(resolve_data_config(model))``; train: timm's augmentation."""
    import timm
    from timm.data import create_transform, resolve_data_config

    from tests.conftest import tiny_vit

    bb = tiny_vit()
    root = write_image_folder(tmp_path / "f", {"train": 2, "val": 1})
    dm = ImageFolderDataModule(str(root), data_config=bb.data_config, batch_size=2)
    timm_cfg = resolve_data_config({}, model=bb.model)  # the model's pretrained config (224) at its real size (32)
    oracle = create_transform(**{**timm_cfg, "input_size": (3, 32, 32)}, is_training=False)
    with Image.open(dm.splits["val"][0][0]) as im:
        im = im.convert("RGB")
        assert torch.equal(dm.eval_transform(im), oracle(im))
    names = [type(t).__name__ for t in dm.train_transform.transforms]
    assert isinstance(dm.train_transform.transforms[0], timm.data.transforms.RandomResizedCropAndInterpolation)
    assert "RandomHorizontalFlip" in names
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32) and y.tolist() in ([0, 1], [1, 0], [0, 0], [1, 1])


def test_vtab_names_are_exact_never_aliases(tmp_path):
    from tasks.data.vtab import canonical_task, find_task_dir

    assert canonical_task("oxford_iiit_pet") == "oxford_iiit_pet"
    for name in ("pets", "pet", "Oxford_IIIT_Pet", "mycats"):
        with pytest.raises(ValueError, match="unknown VTAB task .*data.layout=imagefolder data.root=DIR"):
            canonical_task(name)
    (tmp_path / "pets").mkdir()  # other repositories' folder names still find the canonical task's files
    (tmp_path / "pets" / "train800.txt").write_text("a.jpg 0\n")
    assert find_task_dir(tmp_path, "oxford_iiit_pet") == tmp_path / "pets"
