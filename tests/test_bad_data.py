"""Bad data in every modality's reader (issue 24): each case is one error naming the file (or the option), or
the right values, never a stack trace or a silently wrong result. docs/what-happens-when.md lists the same cases.

Every test here failed before its fix (checked against main at 0344906); errors are matched as ``ValueError``
(the project's ``DataFileError`` is one) so that a missing fix fails the assertion, not the import.
"""
from __future__ import annotations

import csv
import re
import json
import pickle
import warnings
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import zoo

from .conftest import tiny_vit


# ------------------------------------------------------------------------------------------- helpers
def gray16(path: Path, value: int = 20000, size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint16)).save(path)
    return path


def float_tiff(path: Path, value: float, size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.float32)).save(path)
    return path


def png(path: Path, seed: int = 0, size=(12, 10), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (*size, 3) if mode == "RGB" else size
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)
    return path


def truncated(path: Path, like: Path) -> Path:
    path.write_bytes(like.read_bytes()[: len(like.read_bytes()) // 2])
    return path


def wav(path: Path, data: np.ndarray | None = None, seed: int = 0, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = np.random.default_rng(seed).standard_normal(4000).astype(np.float32) * 0.1
    sf.write(str(path), data, sr, subtype="FLOAT")
    return path


# ------------------------------------------------------------------------------------------- pixel depth
def test_16bit_and_float_images_keep_their_values_in_segmentation_and_restoration(tmp_path):
    from tasks.data.restoration import read_image as restoration_image
    from tasks.data.segmentation_layouts import read_image as seg_image

    for read in (seg_image, restoration_image):
        a = read(gray16(tmp_path / "g16.png", 20000))  # was all white: I;16 clipped to 255 by convert("RGB")
        np.testing.assert_allclose(a, 20000 / 65535, atol=1e-6)
        a = read(gray16(tmp_path / "g16.tif", 1000))
        np.testing.assert_allclose(a, 1000 / 65535, atol=1e-6)
        a = read(float_tiff(tmp_path / "f.tif", 0.25))  # was all black
        assert a.shape == (12, 10, 3)
        np.testing.assert_allclose(a, 0.25, atol=1e-6)
        with pytest.raises(ValueError, match=r"f255.tif: pixel values range 200..200, expected 0..1"):
            read(float_tiff(tmp_path / "f255.tif", 200.0))
        with pytest.raises(ValueError, match=r"nan.tif: .*NaN or inf"):
            read(float_tiff(tmp_path / "nan.tif", float("nan")))


def test_16bit_image_in_a_vtab_list_is_not_white(tmp_path):
    from tasks.data.vtab import FileListDataset, make_transform

    gray16(tmp_path / "images" / "a.png", 16384)
    png(tmp_path / "images" / "b.png")
    (tmp_path / "train800.txt").write_text("images/a.png 0\nimages/b.png 1\n")
    ds = FileListDataset(tmp_path, "train800", make_transform(8, None, None), num_classes=2)
    x, y = ds[0]
    assert y == 0 and abs(float(x.mean()) - 16384 / 65535) < 2 / 255  # was 1.0 everywhere


def _sidd_mats(folder: Path, noisy: np.ndarray, gt: np.ndarray) -> None:
    from scipy.io import savemat

    folder.mkdir(parents=True, exist_ok=True)
    savemat(folder / "ValidationNoisyBlocksSrgb.mat", {"ValidationNoisyBlocksSrgb": noisy})
    savemat(folder / "ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": gt})


def test_float_sidd_blocks_in_0_255_or_with_nan_are_refused(tmp_path):
    from tasks.data.restoration import _MAT_CACHE, pairs_sidd_mat, read_image

    good = np.random.default_rng(0).random((1, 2, 8, 8, 3)).astype(np.float32)
    _sidd_mats(tmp_path / "ok", good, good)
    noisy, clean = pairs_sidd_mat(tmp_path / "ok")[1]
    np.testing.assert_allclose(read_image(noisy), good[0, 1], atol=1e-6)
    _sidd_mats(tmp_path / "b255", good * 255, good * 255)  # was clipped to 1: a white image
    _MAT_CACHE.clear()
    with pytest.raises(ValueError, match=r"ValidationNoisyBlocksSrgb.mat:ValidationNoisyBlocksSrgb\[0,0\]: pixel values range"):
        read_image(pairs_sidd_mat(tmp_path / "b255")[0][0])
    bad = good.copy()
    bad[0, 0, 3, 3, 0] = np.nan
    _sidd_mats(tmp_path / "nan", bad, good)
    _MAT_CACHE.clear()
    with pytest.raises(ValueError, match=r"\[0,0\]: 1 of 192 pixel values are NaN or inf"):
        read_image(pairs_sidd_mat(tmp_path / "nan")[0][0])


def _synapse(root: Path, image: np.ndarray, label: np.ndarray | None = None, name="case0001_slice000"):
    (root / "train_npz").mkdir(parents=True, exist_ok=True)
    label = np.zeros(image.shape, np.uint8) if label is None else label
    np.savez(root / "train_npz" / f"{name}.npz", image=image, label=label)
    return root


def test_synapse_slices_in_0_255_or_with_nan_are_refused(tmp_path):
    from tasks.data.segmentation_layouts import SynapseSlices

    img = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    ds = SynapseSlices(_synapse(tmp_path / "ok", img), ["case0001_slice000"], 8, 16)
    torch.testing.assert_close(ds[0][0][0], torch.from_numpy(img))
    ds = SynapseSlices(_synapse(tmp_path / "u8", img * 255), ["case0001_slice000"], 8, 16)
    with pytest.raises(ValueError, match=r"case0001_slice000.npz: image values range .*\.\.2\d\d.*, expected 0..1"):
        ds[0]
    nan = img.copy()
    nan[2, 2] = np.nan
    ds = SynapseSlices(_synapse(tmp_path / "nan", nan), ["case0001_slice000"], 8, 16)
    with pytest.raises(ValueError, match=r"case0001_slice000.npz: 1 of 256 image values are NaN or inf"):
        ds[0]


# ------------------------------------------------------------------------------------------- labels, pairing
def test_negative_mask_label_is_refused(tmp_path):
    from tasks.data.segmentation_layouts import read_mask

    p = tmp_path / "m.tif"
    Image.fromarray(np.array([[0, 1], [-1, 2]], np.int32)).save(p)  # mode I
    with pytest.raises(ValueError, match=r"m.tif: label -1 is negative"):
        read_mask(p, "index", 3, None)


def test_isic_pairs_by_stem_not_by_sorted_position(tmp_path):
    from tasks.data.segmentation_layouts import layout_pairs

    ims, mks = tmp_path / "ISIC2018_Task1-2_Training_Input", tmp_path / "ISIC2018_Task1_Training_GroundTruth"
    for i in (1, 2, 3):
        png(ims / f"ISIC_000000{i}.jpg".replace(".jpg", ".png"))
    for i in (1, 3, 2):
        png(mks / f"ISIC_000000{i}_segmentation.png", mode="L")
    pairs = layout_pairs(tmp_path, "isic", "train")
    assert [(a.stem, b.stem) for a, b in pairs] == [(f"ISIC_000000{i}", f"ISIC_000000{i}_segmentation") for i in (1, 2, 3)]
    (mks / "ISIC_0000002_segmentation.png").rename(mks / "ISIC_0000004_segmentation.png")  # same count, shifted
    with pytest.raises(ValueError, match=r"do not pair by file name; images without a mask: \['ISIC_0000002'\]"):
        layout_pairs(tmp_path, "isic", "train")


def test_two_class_names_for_one_label_are_refused(tmp_path):
    from tasks.data.audio import read_esc50, esc50_classes
    from tasks.data.fewshot import classnames_of

    with pytest.raises(ValueError, match=r"label 0 is named both 'cat' and 'dog' \(e.g. b.jpg\)"):
        classnames_of([("a.jpg", 0, "cat"), ("b.jpg", 0, "dog"), ("c.jpg", 1, "cow")])
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "esc50.csv").write_text("filename,fold,target,category\na.wav,1,0,dog\nb.wav,1,0,cat\nc.wav,2,1,cow\n")
    with pytest.raises(ValueError, match=r"esc50.csv: target 0 is named both 'dog' and 'cat'"):
        esc50_classes(read_esc50(tmp_path), tmp_path / "meta" / "esc50.csv")


# ------------------------------------------------------------------------------------------- NaN / inf in audio
@pytest.mark.parametrize("bad, match", [(np.nan, "1 of 4000 samples are NaN or inf"),
                                        (np.inf, "1 of 4000 samples are NaN or inf"),
                                        (1e30, "samples reach 1e\\+30, but audio must lie in -1..1")])
def test_nan_inf_and_huge_audio_samples_name_the_file(tmp_path, bad, match):
    from zoo.audio import FrontEnd

    data = np.random.default_rng(0).standard_normal(4000).astype(np.float32) * 0.1
    data[100] = bad
    p = wav(tmp_path / "clip.wav", data)
    with pytest.raises(ValueError, match=f"clip.wav: {match}"):
        FrontEnd(max_length=16).load(p)


# ------------------------------------------------------------------------------------------- dropped or reused data
def test_pde_file_with_four_fields_is_refused_not_cut_to_two(tmp_path):
    from tasks.data.pde import Trajectories

    p = tmp_path / "cfd.hdf5"
    rng = np.random.default_rng(0)
    with h5py.File(p, "w") as f:
        for k in ("density", "pressure", "energy", "temperature"):
            f.create_dataset(k, data=rng.standard_normal((3, 4, 8)).astype(np.float32))
    with pytest.raises(ValueError, match=r"cfd.hdf5 holds 4 fields \(density, pressure, energy, temperature\); "
                                         r"MORPH takes at most 3: choose them with data.fields"):
        Trajectories(p)
    assert Trajectories(p, fields=["energy", "density", "temperature"]).read(0).shape[1] == 3
    p3 = tmp_path / "three.hdf5"
    with h5py.File(p3, "w") as f:
        for k in ("density", "pressure", "energy"):
            f.create_dataset(k, data=rng.standard_normal((3, 4, 8)).astype(np.float32))
    assert Trajectories(p3).read(0).shape[1] == 3  # energy was left out: only the CFD names were read


def test_segmentation_data_generated_with_other_options_is_generated_again(tmp_path):
    from tasks.data.segmentation import SegDataModule

    def module(n):
        return SegDataModule(layout="folder", root="generated", num_classes=n, img_size=32, data_dir=str(tmp_path),
                             generate={"size": 32, "splits": {"train": 4, "val": 2, "test": 2}})

    module(1).prepare_data()
    mask_dir = tmp_path / "seg" / "folder" / "train" / "masks"
    assert max(int(np.asarray(Image.open(m)).max()) for m in mask_dir.iterdir()) <= 1
    dm = module(3)
    dm.prepare_data()  # was: the 1-class data reused for a 3-class run
    assert json.loads((tmp_path / "seg" / "folder" / ".generated").read_text())["num_classes"] == 3
    assert max(int(np.asarray(Image.open(m)).max()) for m in mask_dir.iterdir()) > 1


def test_audio_set_generated_with_other_options_is_generated_again(tmp_path):
    from tasks.data.audio import read_esc50, write_generated

    from tasks.data.audio import GENERATED_CLASSES

    n = len(GENERATED_CLASSES)
    write_generated(tmp_path / "g", clips_per_class=5, seconds=0.1)
    assert len(read_esc50(tmp_path / "g")) == 5 * n
    write_generated(tmp_path / "g", clips_per_class=10, seconds=0.1)
    assert len(read_esc50(tmp_path / "g")) == 10 * n  # was 5 * n: the old set reused
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    from tasks.data.audio import read_multilabel, write_generated_multilabel

    write_generated_multilabel(tmp_path / "ml", clips=5, seconds=0.1)
    assert len(read_multilabel(tmp_path / "ml")[0]["train"]) == 3  # 60 / 20 / 20 by clip index
    write_generated_multilabel(tmp_path / "ml", clips=10, seconds=0.1)
    assert len(read_multilabel(tmp_path / "ml")[0]["train"]) == 6  # was 3: the 5-clip set reused


# ------------------------------------------------------------------------------------------- option ranges
def _seg(**kw):
    from tasks.data.segmentation import SegDataModule
    return SegDataModule(**kw)


def _audio(**kw):
    from tasks.data.audio import AudioDataModule
    return AudioDataModule(root="/nonexistent", generate=False, **kw)


def _restoration(**kw):
    from tasks.data.restoration import RestorationDataModule
    return RestorationDataModule(root="/nonexistent", **kw)


def _fewshot(**kw):
    from tasks.fewshot import FewShotDataModule
    return FewShotDataModule(root="/nonexistent", dataset="dtd", **kw)


def _classification(**kw):
    from tasks.classification import ClassificationTask
    return ClassificationTask(backbone={"family": "none"}, adapter={"name": "none"}, num_classes=3, **kw)


def _task(kind):
    def build(**kw):  # the option checks run before the backbone is built: no model needed
        import importlib

        module, cls = {"seg": ("segmentation", "SegmentationTask"), "caption": ("captioning", "CaptioningTask"),
                       "pde": ("pde", "PDEForecastTask"), "restoration": ("restoration", "RestorationTask"),
                       "fewshot": ("fewshot", "FewShotTask")}[kind]
        extra = {"data": {"root": "/nonexistent", "dataset": "dtd"}} if kind == "fewshot" else {}
        return getattr(importlib.import_module(f"tasks.{module}"), cls)(backbone={"family": "none"},
                                                                        adapter={"name": "none"}, **extra, **kw)
    return build


def _pde_data(**kw):
    from tasks.pde import PDEDataModule
    return PDEDataModule(generate="burgers", **kw)


def _pde_generate(**kw):
    from tasks.data.pde_solvers import generate
    return generate("burgers", "/nonexistent", **kw)


def _lora(**kw):
    m = zoo.ImageClassifier(tiny_vit(), 3)
    zoo.apply_adapter(m, "lora", **{"rank": 2, **kw})


@pytest.mark.parametrize("build, kw, match", [
    (_audio, {"mixup": 2}, r"data.mixup must be a finite number in \[0.0, 1.0\], got 2"),
    (_audio, {"freqm": -5}, r"data.freqm must be an integer >= 0, got -5"),
    (_audio, {"sample_rate": 0}, r"data.sample_rate must be an integer >= 1, got 0"),
    (_lora, {"alpha": -5}, r"adapter 'lora': alpha must be a finite number in \(0.0, inf\), got -5"),
    (_lora, {"targets": []}, r"adapter 'lora': targets=\[\] selects no site"),
    (_classification, {"scheduler": {"warmup_epochs": -3}}, r"task.scheduler.warmup_epochs must be a finite number in \[0.0, inf\), got -3"),
    (_classification, {"optimizer": {"lr": 0}}, r"task.optimizer.lr must be a finite number in \(0.0, inf\), got 0"),
    (_classification, {"optimizer": {"lr": "abc"}}, r"task.optimizer.lr must be a finite number .*got 'abc'"),
    (_classification, {"label_smoothing": 2.0}, r"task.label_smoothing must be a finite number in \[0.0, 1.0\], got 2.0"),
    (_fewshot, {"shots": -3}, r"task.shots must be an integer >= 1, got -3"),
    (_fewshot, {"shots": 2.5}, r"task.shots must be an integer >= 1, got 2.5"),
    (_seg, {"val_fraction": -0.5}, r"data.val_fraction must be a finite number in \(0.0, 1.0\), got -0.5"),
    (_seg, {"val_cases": -1}, r"data.val_cases must be an integer >= 0, got -1"),
    (_restoration, {"patch_size": 0}, r"data.patch_size must be an integer >= 1, got 0"),
    # the re-probe (each was a traceback, or trained on without a word)
    (_task("caption"), {"generation": {"num_beams": 0}}, r"task.generation.num_beams must be an integer >= 1, got 0"),
    (_task("caption"), {"generation": {"temperature": 0}}, r"task.generation.temperature must be a finite number in \(0.0, inf\), got 0"),
    (_task("caption"), {"generation": {"top_p": 1.5}}, r"task.generation.top_p must be a finite number in \(0.0, 1.0\], got 1.5"),
    (_task("seg"), {"scheduler": {"name": "poly", "power": -1}}, r"task.scheduler.power must be a finite number in \(0.0, inf\), got -1"),
    (_task("seg"), {"scheduler": {"name": "poly", "warmup_iters": -5}}, r"task.scheduler.warmup_iters must be an integer >= 0, got -5"),
    (_task("seg"), {"overlays": -1}, r"task.overlays must be an integer >= 0, got -1"),
    (_task("seg"), {"prompt_jitter": -3}, r"task.prompt_jitter must be an integer >= 0, got -3"),
    (_task("pde"), {"scheduler": {"factor": 2}}, r"task.scheduler.factor must be a finite number in \(0.0, 1.0\), got 2"),
    (_task("pde"), {"scheduler": {"patience": -1}}, r"task.scheduler.patience must be an integer >= 0, got -1"),
    (_task("pde"), {"rollout_horizon": "abc"}, r"task.rollout_horizon='abc': a number of steps >= 1, or full"),
    (_pde_data, {"fit": "bogus"}, r"data.fit='bogus'; valid: pad, crop"),
    (_pde_generate, {"n": 0}, r"data.generate_options.n must be an integer >= 1, got 0"),
    (_task("restoration"), {"tile": 0}, r"task.tile must be an integer >= 1, got 0"),
    (_task("restoration"), {"log_images": -1}, r"task.log_images must be an integer >= 0, got -1"),
    (_task("restoration"), {"metric": {"crop_border": -1}}, r"task.metric.crop_border must be an integer >= 0, got -1"),
    (_task("fewshot"), {"logit_scale": -1}, r"task.logit_scale must be a finite number in \(0.0, inf\), got -1"),
    (_task("fewshot"), {"templates": []}, r"task.templates=\[\]: give a non-empty list of prompt templates"),
])
def test_out_of_range_options_are_one_line_naming_the_option(build, kw, match):
    with pytest.raises(ValueError, match=match):
        build(**kw)


# ------------------------------------------------------------------------------------------- split overlap
@pytest.mark.parametrize("seed, match", [(-1, r"seed must be an integer in 0\.\.4294967295, got -1"),
                                         (2.5, r"seed must be an integer in 0\.\.4294967295, got 2\.5"),
                                         ("abc", r"seed must be an integer in 0\.\.4294967295, got 'abc'"),
                                         (2**32, r"seed must be an integer in 0\.\.4294967295, got 4294967296")])
def test_a_seed_out_of_numpy_range_is_one_line_naming_seed(tmp_path, seed, match):
    """It used to be numpy's "-1 is not in bounds, numpy accepts from 0 to 4294967295" (no option named),
    and seed=2.5 was truncated to 2 without a word."""
    from tests.helpers import run_train

    with pytest.raises(ValueError, match=match):
        run_train(["experiment=tiny", "adapter=lora", f"seed={seed}", f"paths.data_dir={tmp_path / 'data'}"], tmp_path)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()  # refused before anything


def _ml(root: Path, rows):
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("file", "labels", "split"))
        w.writerows(rows)


def _listed_clips(root: Path, rows):
    """A labels.csv of ``rows`` and, for each ``<i>.wav`` it names, a clip of its own (seed ``i``)."""
    for name in dict.fromkeys(row[0] for row in rows):
        wav(root / name, seed=int(Path(name).stem))
    _ml(root, rows)


def test_audio_multilabel_overlap_is_refused(tmp_path):
    from tasks.data.audio import read_multilabel

    _listed_clips(tmp_path, [["0.wav", "dog", "train"], ["1.wav", "cat", "train"], ["0.wav", "dog", "val"], ["2.wav", "cat", "test"]])
    with pytest.raises(ValueError, match=r"labels.csv: 1 file\(s\) are in both the train and the val split \(e.g. .*0.wav\)"):
        read_multilabel(tmp_path)
    (tmp_path / "3.wav").write_bytes((tmp_path / "0.wav").read_bytes())  # a copy under another name
    _ml(tmp_path, [["0.wav", "dog", "train"], ["1.wav", "cat", "train"], ["3.wav", "dog", "val"], ["2.wav", "cat", "test"]])
    with pytest.raises(ValueError, match=r"1 val file\(s\) are byte-identical to train files \(e.g. .*3.wav = .*0.wav\)"):
        read_multilabel(tmp_path)


@pytest.mark.parametrize("bad", ["/etc/outside.wav", "../outside.wav", "audio/../../outside.wav", "..\\outside.wav"])
def test_audio_list_paths_that_leave_the_data_root_are_refused(tmp_path, bad):
    """labels.csv used to read absolute paths (and '..') as given; ESC-50's filename column joined them."""
    from tasks.data.audio import read_esc50, read_multilabel

    root = tmp_path / "set"
    root.mkdir()
    wav(tmp_path / "outside.wav")
    wav(root / "a.wav")
    _ml(root, [["a.wav", "dog", "train"], [bad, "cat", "train"]])
    with pytest.raises(ValueError, match=rf"{re.escape(str(root / 'labels.csv'))}, line 3: the path '.*outside.wav' "
                                         rf"leaves {re.escape(str(root))}: list paths must be relative"):
        read_multilabel(root)
    (root / "meta").mkdir()
    (root / "meta" / "esc50.csv").write_text(f"filename,fold,target,category\na.wav,1,0,dog\n{bad},2,1,cat\n")
    with pytest.raises(ValueError, match=rf"esc50.csv, line 3: the path '.*outside.wav' leaves "
                                         rf"{re.escape(str(root / 'audio'))}"):
        read_esc50(root)


def _msrvtt(root: Path, videos, sentences) -> Path:
    p = root / "m.json"
    p.write_text(json.dumps({"videos": videos, "sentences": sentences}))
    return p


def test_captioning_val_equal_to_train_is_refused_and_empty_captions_are_dropped(tmp_path, caplog):
    from tasks.data.captioning import load_msrvtt

    vids = [{"video_id": "v0", "split": "train"}, {"video_id": "v1", "split": "validate"}, {"video_id": "v0", "split": "validate"}]
    sents = [{"video_id": "v0", "caption": "a"}, {"video_id": "v1", "caption": "b"}]
    with pytest.raises(ValueError, match=r"m.json: 1 video\(s\) are in both the train and the val split, e.g. 'v0'"):
        load_msrvtt(_msrvtt(tmp_path, vids, sents), tmp_path)
    sents = [{"video_id": "v0", "caption": "a"}, {"video_id": "v0", "caption": "  "}, {"video_id": "v1", "caption": "b"}]
    with caplog.at_level("WARNING"):
        ann = load_msrvtt(_msrvtt(tmp_path, vids[:2], sents), tmp_path)
    assert ann.captions["v0"] == ["a"] and "1 empty caption(s) dropped" in caplog.text


def test_fewshot_test_images_that_are_training_images_are_refused(tmp_path):
    from tasks.data.fewshot import load_fewshot

    d = tmp_path / "oxford_pets"
    split = {"train": [[f"c{y}/tr{i}.jpg", y, f"class {y}"] for y in range(2) for i in range(2)],
             "val": [[f"c{y}/va.jpg", y, f"class {y}"] for y in range(2)],
             "test": [[f"c{y}/te.jpg", y, f"class {y}"] for y in range(2)]}
    for s in split.values():
        for rel, _, _ in s:
            png(d / "images" / rel, seed=zlib.crc32(rel.encode()))
    (d / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    assert len(load_fewshot(tmp_path, "oxford_pets", 1, 1).test) == 2
    split["test"].append(split["train"][0])  # test = train
    (d / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match=r"1 file\(s\) are in both the train and the test split"):
        load_fewshot(tmp_path, "oxford_pets", 2, 1)


def _vtab(root: Path, train: str, val: str) -> Path:
    d = root / "dtd"
    for i in range(3):
        png(d / "images" / f"{i}.png", seed=i)
    (d / "train800.txt").write_text(train)
    (d / "val200.txt").write_text(val)
    return root


def test_vtab_lists_that_share_files_are_refused_copies_warned(tmp_path):
    from tasks.data.vtab import VTABDataModule

    root = _vtab(tmp_path, "images/0.png 0\nimages/1.png 1\n", "images/1.png 1\n")
    with pytest.raises(ValueError, match=r"1 file\(s\) are in both the train and the val split \(e.g. .*1.png\)"):
        VTABDataModule(str(root), "dtd", num_workers=0).setup()
    (root / "dtd" / "images" / "c.png").write_bytes((root / "dtd" / "images" / "0.png").read_bytes())
    _vtab(tmp_path, "images/0.png 0\nimages/1.png 1\n", "images/c.png 0\nimages/2.png 1\n")
    with pytest.warns(UserWarning, match=r"1 val file\(s\) are byte-identical to train files"):
        VTABDataModule(str(root), "dtd", num_workers=0).setup()


@pytest.mark.parametrize("protocol, lists", [("tune", ("train800", "val200")), ("final", ("train800val200", "test"))])
def test_each_vtab_protocol_reads_its_own_list_files(tmp_path, protocol, lists):
    from tasks.data.vtab import VTABDataModule

    d = tmp_path / "dtd"
    for i in range(4):
        png(d / "images" / f"{i}.png", seed=i)
    for k, name in enumerate(("train800", "val200", "train800val200", "test")):
        (d / f"{name}.txt").write_text(f"images/{k}.png {k}\n")  # a different image and label per list
    dm = VTABDataModule(str(tmp_path), "dtd", protocol=protocol, num_workers=0)
    dm.setup()
    held = dm.val_set if protocol == "tune" else dm.test_set
    assert dm.train_set.items == [(f"images/{('train800', 'val200', 'train800val200', 'test').index(lists[0])}.png",
                                   ("train800", "val200", "train800val200", "test").index(lists[0]))]
    assert held.items[0][0] == f"images/{('train800', 'val200', 'train800val200', 'test').index(lists[1])}.png"
    assert (dm.val_set is None) == (protocol == "final") and (dm.test_set is None) == (protocol == "tune")
    assert {r for r, _ in dm.train_set.items}.isdisjoint(r for r, _ in held.items)


# ------------------------------------------------------------------------------------------- corrupt files
def test_truncated_and_fake_images_and_masks_name_the_file(tmp_path):
    from tasks.data.segmentation_layouts import read_image, read_mask

    good = png(tmp_path / "good.png")
    for bad in (truncated(tmp_path / "trunc.png", good), tmp_path / "fake.png"):
        if bad.name == "fake.png":
            bad.write_text("not an image")
        with pytest.raises(ValueError, match=rf"{bad.name}: cannot read this image"):
            read_image(bad)
        with pytest.raises(ValueError, match=rf"{bad.name}: cannot read this mask"):
            read_mask(bad, "index", 2, None)


def test_truncated_npz_and_corrupt_h5_volume_name_the_file(tmp_path):
    from tasks.data.segmentation_layouts import SynapseSlices, read_volume

    root = _synapse(tmp_path, np.random.default_rng(0).random((16, 16)).astype(np.float32))
    p = root / "train_npz" / "case0001_slice000.npz"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"case0001_slice000.npz: cannot read this Synapse slice"):
        SynapseSlices(root, ["case0001_slice000"], 8, 16)[0]
    (root / "test_vol_h5").mkdir()
    (root / "test_vol_h5" / "case0002.npy.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ValueError, match=r"case0002.npy.h5: cannot read this Synapse volume"):
        read_volume(root, "case0002", 8)


def test_corrupt_pde_files_name_the_file(tmp_path):
    from tasks.data.pde import Trajectories

    (tmp_path / "junk.hdf5").write_bytes(b"junk" * 10)
    with pytest.raises(ValueError, match=r"junk.hdf5 is not an HDF5 file"):
        Trajectories(tmp_path / "junk.hdf5")
    np.save(tmp_path / "u.npy", np.zeros((2, 3, 8), np.float32))
    with pytest.raises(ValueError, match=r"u.npy is not an HDF5 file.*a .npy/.npz array has no field names"):
        Trajectories(tmp_path / "u.npy")
    good = tmp_path / "t.hdf5"
    with h5py.File(good, "w") as f:
        f.create_dataset("tensor", data=np.zeros((4, 5, 8), np.float32))
    cut = tmp_path / "cut.hdf5"
    cut.write_bytes(good.read_bytes()[:1200])
    with pytest.raises(ValueError, match=r"cut.hdf5: cannot read this PDE data file"):
        Trajectories(cut).read(0)


def test_per_seed_pde_files_with_mixed_shapes_are_refused(tmp_path):
    from tasks.data.pde import Trajectories

    p = tmp_path / "seeds.h5"
    with h5py.File(p, "w") as f:
        for k, shape in (("0000", (5, 8, 8, 1)), ("0001", (5, 8, 8, 1)), ("0002", (5, 16, 8, 1))):
            f.create_group(k).create_dataset("data", data=np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match=r"seeds.h5: per-seed groups have different shapes: 0000/data is "
                                         r"\(5, 8, 8, 1\) but 0002/data is \(5, 16, 8, 1\)"):
        Trajectories(p)


def test_the_well_file_with_no_trajectory_is_refused(tmp_path):
    from tasks.data.pde import Trajectories

    p = tmp_path / "empty.hdf5"
    with h5py.File(p, "w") as f:
        f.attrs["n_spatial_dims"] = 2
        g = f.create_group("t0_fields")
        g.attrs["field_names"] = ["A"]
        g.create_dataset("A", data=np.zeros((0, 5, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"empty.hdf5: 0 trajectories of 5 frames"):
        Trajectories(p)


def test_corrupt_caption_frame_and_truncated_msvd_pickle_name_the_file(tmp_path):
    from tasks.data.captioning import read_frames, read_msvd_captions

    frames = tmp_path / "v0"
    for i in range(3):
        png(frames / f"{i:03d}.png", seed=i)
    truncated(frames / "001.png", png(tmp_path / "src.png"))
    with pytest.raises(ValueError, match=r"001.png: cannot read this image"):
        read_frames(frames, 3)
    p = tmp_path / "raw-captions.pkl"
    p.write_bytes(pickle.dumps({"v0": [["a", "dog"]], "v1": [["a", "cat"]]})[:-10])
    with pytest.raises(ValueError, match=r"raw-captions.pkl: cannot read this caption pickle"):
        read_msvd_captions(p)


# ------------------------------------------------------------------------------------------- vague messages
def test_audio_statistics_pass_honours_bad_files_and_names_the_folder(tmp_path):
    from tasks.data.audio import AudioDataModule

    root = tmp_path / "clips"
    for c in ("a", "b"):
        for i in range(10):
            wav(root / c / f"{i}.wav", seed=zlib.crc32(f"{c}{i}".encode()))
    bad = sorted((root / "a").iterdir())[0]
    bad.write_bytes(b"RIFF nonsense " + bad.name.encode())
    with pytest.raises(ValueError, match=rf"{bad.name}: cannot decode audio"):
        AudioDataModule("folder", str(root), max_length=16, num_mel_bins=16)
    dm = AudioDataModule("folder", str(root), max_length=16, num_mel_bins=16, bad_files="skip")  # was: raised here
    assert np.isfinite(dm.mean) and dm.std > 0
    for f in root.rglob("*.wav"):
        f.write_bytes(b"RIFF nonsense " + str(f).encode())
    with pytest.raises(ValueError, match=r"clips: all \d+ training clips failed to load \(bad_files=skip skipped them\)"):
        AudioDataModule("folder", str(root), max_length=16, num_mel_bins=16, bad_files="skip")


def test_negative_esc50_target_and_one_class_folder_are_named(tmp_path):
    from tasks.data.audio import read_esc50, read_folder

    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "esc50.csv").write_text("filename,fold,target,category\na.wav,1,0,dog\nb.wav,2,-1,cat\n")
    with pytest.raises(ValueError, match=r"esc50.csv, line 3: target -1 is negative"):
        read_esc50(tmp_path)
    for i in range(3):
        wav(tmp_path / "one" / "dog" / f"{i}.wav", seed=i)
    with pytest.raises(ValueError, match=r"one: 1 class \(dog\); a classifier needs at least two classes"):
        read_folder(tmp_path / "one")


@pytest.mark.parametrize("entry, where", [("videos", r"videos\[1\] has no 'video_id' key"),
                                          ("sentences", r"sentences\[0\] has no 'caption' key")])
def test_captioning_missing_keys_name_file_and_key(tmp_path, entry, where):
    from tasks.data.captioning import load_msrvtt

    vids = [{"video_id": "v0"}, {"id": "v1"}] if entry == "videos" else [{"video_id": "v0"}]
    sents = [{"video_id": "v0", "text": "a"}] if entry == "sentences" else [{"video_id": "v0", "caption": "a"}]
    with pytest.raises(ValueError, match=rf"m.json: {where}"):
        load_msrvtt(_msrvtt(tmp_path, vids, sents), tmp_path)


def test_malformed_fewshot_split_json_names_the_file(tmp_path):
    from tasks.data.fewshot import read_split

    d = tmp_path / "oxford_pets"
    (d / "images").mkdir(parents=True)
    (d / "split_zhou_OxfordPets.json").write_text('{"train": [["a.jpg", 0, "cat"]')
    with pytest.raises(ValueError, match=r"split_zhou_OxfordPets.json: cannot read this split file \(JSON\)"):
        read_split(tmp_path, "oxford_pets")


def test_binary_list_and_csv_files_name_the_file(tmp_path):
    from tasks.data.audio import read_esc50
    from tasks.data.vtab import read_list

    (tmp_path / "train800.txt").write_bytes(b"\xff\xfe\x00\x81 images/a.png 0\n")
    with pytest.raises(ValueError, match=r"train800.txt: cannot read this list file \(UnicodeDecodeError"):
        read_list(tmp_path / "train800.txt")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "esc50.csv").write_bytes(b"filename,fold,target\n\xff\xfe,1,0\n")
    with pytest.raises(ValueError, match=r"esc50.csv: cannot read this CSV file"):
        read_esc50(tmp_path)


# ------------------------------------------------------------------------------------------- the re-probe (issue 24)
def test_synapse_list_names_that_leave_the_folder_are_refused(tmp_path):
    """A train.txt / test_vol.txt line '../../x' used to be joined to train_npz/ and read if it existed."""
    from tasks.data.segmentation_layouts import read_list

    outside = _synapse(tmp_path / "outside", np.zeros((4, 4), np.float32), name="secret")  # a readable slice
    lst = tmp_path / "syn" / "lists" / "lists_Synapse" / "train.txt"
    lst.parent.mkdir(parents=True)
    for bad in ("../../outside/train_npz/secret", "/etc/hosts"):
        lst.write_text(f"case0001_slice000\n{bad}\n")
        with pytest.raises(ValueError, match=rf"train.txt:2: the path '{re.escape(bad)}' leaves the Synapse folder"):
            read_list(lst)
    assert (outside / "train_npz" / "secret.npz").is_file()


@pytest.mark.parametrize("fold", [0, 6, 7])
def test_an_esc50_fold_outside_1_to_5_is_refused(tmp_path, fold):
    """A row of fold 7 used to train in every fold's run while the record named the 5-fold cycle."""
    from tasks.data.audio import read_esc50

    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "esc50.csv").write_text(f"filename,fold,target,category\na.wav,1,0,dog\nb.wav,{fold},1,cat\n")
    with pytest.raises(ValueError, match=rf"esc50.csv, line 3: fold {fold}; the ESC-50 layout has folds 1..5"):
        read_esc50(tmp_path)


def test_a_clip_listed_twice_in_one_multilabel_split_is_refused(tmp_path):
    """It used to train on the clip twice without a word (only a clip in two splits was refused)."""
    from tasks.data.audio import read_multilabel

    _listed_clips(tmp_path, [["0.wav", "dog", "train"], ["1.wav", "cat", "train"], ["0.wav", "cat", "train"], ["2.wav", "cat", "test"]])
    with pytest.raises(ValueError, match=r"labels.csv, line 4: '0.wav' is listed again \(first on line 2\)"):
        read_multilabel(tmp_path)


def test_an_audio_split_without_clips_names_the_split_and_the_folder(tmp_path):
    from tasks.data.audio import AudioDataModule

    _listed_clips(tmp_path, [["0.wav", "dog", "train"], ["1.wav", "cat", "train"], ["2.wav", "cat", "train"], ["3.wav", "dog", "train"]])
    dm = AudioDataModule(dataset="multilabel", root=str(tmp_path), multilabel=True, generate=False, mean=0.0, std=1.0)
    with pytest.raises(ValueError, match=rf"multilabel at {re.escape(str(tmp_path))}: the val split has no clips"):
        dm.val_dataloader()  # it used to be "no audio clips in this split"


def test_a_fewshot_split_file_with_an_empty_test_split_is_refused(tmp_path):
    """It used to train and write test/acc = null with exit 0."""
    from tasks.data.fewshot import load_fewshot

    d = tmp_path / "oxford_pets"
    split = {"train": [[f"c{y}/tr{i}.jpg", y, f"class {y}"] for y in range(2) for i in range(2)], "val": [], "test": []}
    for rel, _, _ in split["train"]:
        png(d / "images" / rel, seed=zlib.crc32(rel.encode()))
    (d / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match=r"OxfordPets under .*: the test split lists no image"):
        load_fewshot(tmp_path, "oxford_pets", 1, 1)


def _seg_folder(root: Path, n: int = 3) -> None:
    for split in ("train", "val", "test"):
        for i in range(n):
            png(root / split / "images" / f"{split}{i}.png", seed=zlib.crc32(f"{split}{i}".encode()), size=(16, 16))
            Image.fromarray(np.zeros((16, 16), np.uint8)).save(
                (root / split / "masks").mkdir(parents=True, exist_ok=True) or root / split / "masks" / f"{split}{i}.png")


def test_a_segmentation_image_copied_into_another_split_is_refused(tmp_path):
    """A byte-identical copy of a training image in val or test used to be scored as unseen."""
    import shutil

    from tasks.data.segmentation import SegDataModule

    _seg_folder(tmp_path)
    dm = SegDataModule(layout="folder", root=str(tmp_path), num_classes=1, img_size=16)
    dm.setup("fit")
    assert len(dm.train_set) == 3 and len(dm.test_set) == 3
    shutil.copy(tmp_path / "train/images/train0.png", tmp_path / "test/images/copy.png")
    shutil.copy(tmp_path / "train/masks/train0.png", tmp_path / "test/masks/copy.png")
    dm = SegDataModule(layout="folder", root=str(tmp_path), num_classes=1, img_size=16)
    with pytest.raises(ValueError, match=r"1 test file\(s\) are byte-identical to train files \(e.g. .*copy.png = "
                                         r".*train0.png\); remove the copies"):
        dm.setup("fit")


def test_a_restoration_test_input_copied_from_training_is_warned_about(tmp_path):
    """Benchmarks are used as they ship: a copy is counted in a warning (it used to pass unnoticed)."""
    import shutil

    from tasks.data.restoration import RestorationDataModule

    for split in ("train", "test"):
        for i in range(2):
            for side in ("input", "target"):
                png(tmp_path / "rain100l" / split / side / f"{split}{i}.png", seed=zlib.crc32(f"{split}{i}{side}".encode()),
                    size=(16, 16))
    shutil.copy(tmp_path / "rain100l/train/input/train0.png", tmp_path / "rain100l/test/input/test0.png")
    dm = RestorationDataModule(root=str(tmp_path), dataset="derain", generate=False, patch_size=8)
    with pytest.warns(UserWarning, match=r"derain under .*: 1 test file\(s\) are byte-identical to train files"):
        dm.setup("fit")


def test_an_audio_cache_folder_under_a_file_is_one_line(tmp_path):
    """ENOTDIR was not one of the environment's write errors: a traceback."""
    import zoo.io  # noqa: F401 (train.py has it imported: the runner writes through it)
    from tasks.errors import user_errors
    from zoo.audio import FrontEnd

    wav(tmp_path / "a.wav")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e, user_errors():
        FrontEnd(max_length=100, cache_dir=tmp_path / "file" / "cache")(tmp_path / "a.wav")
    assert str(e.value.code).startswith(f"error: cannot access {tmp_path / 'file' / 'cache'}") \
        and "a part of this path is a file, not a folder" in e.value.code


@pytest.mark.parametrize("override, match", [
    ("publish=../../escape", r"publish must be a plain name \(letters, digits, '.', '_', '-', not starting with '.' "
                             r"and without '..'\), got '../../escape'"),
    ('final_overrides=["task.nothere=1"]', r"final_overrides=\['task.nothere=1'\]: 'task.nothere' is not a key of the "
                                           r"composed config \(Key 'nothere' is not in struct\)$"),
    ("test=maybe", r"test='maybe'; valid: auto \(only when the protocol has a test split\), true, false"),
    ("task.max_epochs=-1", r"trainer.max_epochs=-1 \(task.max_epochs: no limit on epochs\) needs trainer.max_steps >= 1"),
    ("task.max_epochs=2.5", r"trainer.max_epochs must be an integer >= -1, got 2.5"),
    ("trainer.limit_train_batches=-1", r"trainer.limit_train_batches must be null, a share of the batches in \[0.0, 1.0\] "
                                       r"or a number of batches >= 0, got -1"),
    ("+trainer.gradient_clip_val=-1", r"trainer.gradient_clip_val must be a finite number in \[0.0, inf\), got -1"),
])
def test_run_and_trainer_options_are_checked_before_anything_runs(tmp_path, override, match):
    """test=maybe and gradient_clip_val=-1 used to run on as if valid; max_epochs=-1 / 2.5 and
    limit_train_batches=-1 were tracebacks from Lightning or the scheduler; a bad publish name was refused
    only after the whole run had trained."""
    from tests.helpers import run_train
    from zoo.hub import HubError

    with pytest.raises((ValueError, HubError), match=match):
        run_train(["experiment=tiny", "adapter=lora", override, f"paths.data_dir={tmp_path / 'data'}"], tmp_path)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
