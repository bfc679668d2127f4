"""Degradations (BSRGAN parameters, PROD random order), embedded paired layouts and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.data import degradations as D
from tasks.data import restoration as R
from tasks.data.procedural import clean_image


def img(seed=0, size=48):
    return clean_image(seed, size)


# ------------------------------------------------------------------------------ degradations
def test_prod_is_reproducible_per_seed_and_applies_the_recorded_order():
    cfg = D.DegradationConfig(max_ops=4)
    x = img()
    a, b = D.prod(x, 7, cfg), D.prod(x, 7, cfg)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.ops == b.ops
    c = D.prod(x, 8, cfg)
    assert c.ops != a.ops or not np.array_equal(c.image, a.image)
    # the same draws by hand: k, then a permutation, then the operations in that order
    for seed in range(5):
        rng = np.random.default_rng(seed)
        k = int(rng.integers(cfg.min_ops, cfg.max_ops + 1))
        order = [cfg.ops[i] for i in rng.permutation(len(cfg.ops))[:k]]
        ref = D.apply(order, x, rng, cfg)
        got = D.prod(x, seed, cfg)
        assert got.ops == order
        np.testing.assert_array_equal(got.image, ref)


def test_prod_order_is_shuffled_and_the_count_varies():
    cfg = D.DegradationConfig(ops=("blur", "noise", "jpeg"), min_ops=1, max_ops=3)
    runs = [tuple(D.prod(img(size=16), s, cfg).ops) for s in range(120)]
    full = {r for r in runs if len(r) == 3}
    assert len(full) == 6  # all 3! orders of the three operations occur
    assert {len(r) for r in runs} == {1, 2, 3}
    assert all(len(set(r)) == len(r) for r in runs)  # drawn without replacement
    # order matters: blur∘noise differs from noise∘blur with the same draws
    x = img()
    assert not np.allclose(D.apply(["blur", "noise"], x, 3), D.apply(["noise", "blur"], x, 3))


def test_bsrgan_parameters():
    cfg = D.DegradationConfig()
    k = D.anisotropic_kernel(21, 0.3, 2.0, 2.0)  # equal eigenvalues: isotropic with σ² = 2
    np.testing.assert_allclose(k, D.gaussian_kernel(21, np.sqrt(2.0)), atol=1e-6)
    assert abs(D.anisotropic_kernel(15, 0.7, 4.0, 0.5).sum() - 1) < 1e-5
    # blur kernel sizes 2·randint(2, 11)+3 ∈ {7, ..., 25}: a constant image stays constant (sum-1 kernel)
    flat = np.full((32, 32, 3), 0.4, np.float32)
    np.testing.assert_allclose(D.blur(flat, np.random.default_rng(0), cfg), flat, atol=1e-5)
    # Gaussian noise of level σ: the noise's standard deviation is σ (mid-grey, no clipping)
    grey = np.full((128, 128, 3), 0.5, np.float32)
    noisy = D.gaussian_noise(grey, np.random.default_rng(0), D.DegradationConfig(p_noise_color=1.0), sigma=10 / 255)
    assert abs((noisy - grey).std() - 10 / 255) < 0.002
    # levels come from randint(2, 25)/255
    rng = np.random.default_rng(1)
    stds = [(D.gaussian_noise(grey, rng, D.DegradationConfig(p_noise_color=1.0)) - grey).std() * 255 for _ in range(30)]
    assert 1.5 < min(stds) and max(stds) < 25.5
    # JPEG: lossy, deterministic for a given quality; lower quality, larger error
    x = img()
    e10 = np.abs(D.jpeg(x, rng, cfg, quality=10) - x).mean()
    e90 = np.abs(D.jpeg(x, rng, cfg, quality=90) - x).mean()
    assert e10 > e90 > 0
    # downsample by 1: (nearly) the identity; by 4: a large error
    assert np.abs(D.downsample(x, rng, cfg, factor=1.0) - x).max() < 2 / 255
    assert np.abs(D.downsample(x, rng, cfg, factor=4.0) - x).mean() > 0.01


def test_weather_and_light_operations_do_what_they_model():
    x, cfg = img(1), D.DegradationConfig()
    rng = np.random.default_rng(0)
    assert (D.rain(x, rng, cfg) >= x - 1e-6).all()  # streaks only add light
    hazy = D.haze(x, rng, cfg)
    assert hazy.std() < x.std() and hazy.mean() > x.mean()  # airlight: lower contrast, brighter
    assert D.lowlight(x, rng, cfg).mean() < 0.8 * x.mean()
    # I = J·t + A(1−t) on a constant J: between J and A
    flat = np.full((16, 16, 3), 0.2, np.float32)
    h = D.haze(flat, np.random.default_rng(2), cfg)
    assert (h >= 0.2 - 1e-6).all() and (h <= 1.0).all()


def test_degradation_config_errors():
    with pytest.raises(ValueError, match="unknown degradation option"):
        D.DegradationConfig.from_dict({"blurr": 1})
    with pytest.raises(ValueError, match="valid: blur, noise, jpeg, downsample, rain, haze, lowlight"):
        D.DegradationConfig.from_dict({"ops": ["snow"]})
    with pytest.raises(ValueError, match="min_ops <= max_ops"):
        D.DegradationConfig.from_dict({"min_ops": 3, "max_ops": 2})
    cfg = D.DegradationConfig.from_dict({"ops": ["blur", "blur", "noise"], "max_ops": 3, "jpeg_quality": [10, 20]})
    assert cfg.jpeg_quality == (10, 20) and cfg.ops == ("blur", "blur", "noise")


# ------------------------------------------------------------------------------ layouts
EXPECTED = {
    "denoise": "sidd/train/Data/0000_001_S6_00100_00060_3200_L/0000_NOISY_SRGB_010.PNG",
    "deblur": "gopro/train/GOPR0000_11_00/blur/000000.png",
    "derain": "rain100l/train/input/000.png",
    "dehaze": "sots/train/hazy/0000_0.8_0.2.jpg",
    "lowlight": "lol/our485/low/0.png",
    "jpeg": "jpeg_q20/train/input/0000.jpg",
    "sr": "sr/train/lr_x2/0000.png",
}


def test_six_tasks_are_written_in_their_layouts_and_read_back(tmp_path):
    for task in R.TASKS:
        R.generate(task, tmp_path, num_train=10, num_test=3, size=24)
        R.generate(task, tmp_path, num_train=10, num_test=3, size=24)  # present: a no-op
        train, test = R.find_pairs(task, tmp_path, "train"), R.find_pairs(task, tmp_path, "test")
        assert (len(train), len(test)) == (10, 3)
        assert str(train[0][0].relative_to(tmp_path)) == EXPECTED[task]
        ds = R.SRDataset(train, 2, patch_size=16, augment=True) if task == "sr" else \
            R.PairedDataset(train, patch_size=16, augment=True)
        x, y, name = ds[0]
        assert x.shape == y.shape == (3, 16, 16) and x.dtype == torch.float32
        assert (x - y).abs().mean() > 0  # degraded
        clean_test = {R.read_image(t).tobytes() for _, t in test}
        assert not clean_test & {R.read_image(t).tobytes() for _, t in train}  # disjoint images
    # the NAFNet form of GoPro (train/{input,target}) is read too
    (tmp_path / "g2" / "gopro" / "train").mkdir(parents=True)
    import shutil

    shutil.copytree(tmp_path / "rain100l" / "train", tmp_path / "g2" / "gopro" / "train", dirs_exist_ok=True)
    assert len(R.find_pairs("deblur", tmp_path / "g2", "train")) == 10


def test_num_train_is_a_seeded_subset(tmp_path):
    R.generate("derain", tmp_path, num_train=20, num_test=2, size=16)
    pairs = R.find_pairs("derain", tmp_path, "train")
    a, b, c = R.subset(pairs, 8, 0), R.subset(pairs, 8, 0), R.subset(pairs, 8, 1)
    assert a == b and len(a) == 8 and a != c and set(a) <= set(pairs)
    with pytest.raises(ValueError, match=r"only 20 training pairs exist \(after any held-out validation pairs, data.val_from_train\); lower task.num_train"):
        R.subset(pairs, 32, 0)


def test_bad_input_gives_one_clear_line(tmp_path):
    R.generate("derain", tmp_path, num_train=3, num_test=2, size=16)
    base = tmp_path / "rain100l" / "train"
    with pytest.raises(FileNotFoundError, match="data.generate=true"):
        R.find_pairs("lowlight", tmp_path, "train")
    with pytest.raises(ValueError, match="valid: denoise, deblur, derain, dehaze, lowlight, jpeg, sr"):
        R.find_pairs("snow", tmp_path, "train")
    (base / "input" / "000.png").write_bytes(b"not a png")
    pairs = R.find_pairs("derain", tmp_path, "train")
    with pytest.raises(ValueError, match="000.png: cannot read this image"):
        R.PairedDataset(pairs)[0]
    D.to_pil(img(size=20)).save(base / "input" / "001.png")  # 20x20 vs a 16x16 target
    with pytest.raises(ValueError, match="paired images must have the same size"):
        R.PairedDataset(pairs)[1]
    with pytest.raises(ValueError, match="smaller than patch_size=32; lower data.patch_size"):
        R.PairedDataset(pairs, patch_size=32)[2]
    (base / "target" / "002.png").unlink()
    with pytest.raises(FileNotFoundError, match="002.png has no pair"):
        R.find_pairs("derain", tmp_path, "train")
    # other settings replace our embedded data; data we did not write is never touched
    R.generate("derain", tmp_path, num_train=5, num_test=2, size=16)
    assert len(R.find_pairs("derain", tmp_path, "train")) == 5
    (tmp_path / "rain100l" / ".embedded").unlink()  # now it looks like a user's real data
    R.generate("derain", tmp_path, num_train=7, num_test=2, size=16)
    assert len(R.find_pairs("derain", tmp_path, "train")) == 5


def test_prod_dataset_is_reproducible_and_varies_by_epoch():
    ds = R.ProdDataset(4, size=24, seed=3)
    x1, y1, ops1 = ds[2]
    x2, _, ops2 = ds[2]
    assert torch.equal(x1, x2) and ops1 == ops2 and ops1
    ds.epoch = 1
    x3, y3, _ = ds[2]
    assert torch.equal(y1, y3) and not torch.equal(x1, x3)


def test_held_out_validation_pairs_come_from_train_never_from_test(tmp_path):
    R.generate("derain", tmp_path, num_train=20, num_test=6, size=16)
    dm = R.RestorationDataModule(tmp_path, "derain", num_train=8, val_from_train=5, patch_size=None, seed=1)
    dm.setup()
    train, val, test = dm.train_set.pairs, dm.val_set.pairs, dm.test_set.pairs
    assert (len(train), len(val), len(test)) == (8, 5, 6)
    all_train = set(R.find_pairs("derain", tmp_path, "train"))
    # validation is drawn from the training split, shares no file with train or test
    assert set(val) <= all_train and not set(val) & set(train)
    assert not R.shared_files(val, test) and not R.shared_files(val, train)
    info = dm.split_info()
    assert info["val_overlaps_test"] is False
    assert info["val"] == {"name": "derain/train (held out)", "size": 5}
    assert info["test"] == {"name": "derain/test", "size": 6}
    # the same validation pairs for every run seed (a sweep's rows validate alike); train varies with the seed
    other = R.RestorationDataModule(tmp_path, "derain", num_train=8, val_from_train=5, patch_size=None, seed=2)
    other.setup()
    assert other.val_set.pairs == val and other.train_set.pairs != train
    assert not set(other.train_set.pairs) & set(val)
    # without it: validation is the test split (the benchmarks' protocol) and says so
    plain = R.RestorationDataModule(tmp_path, "derain", num_train=8, patch_size=None)
    plain.setup()
    assert plain.val_set is plain.test_set and plain.split_info()["val_overlaps_test"] is True


def test_held_out_validation_bad_sizes_give_one_clear_line(tmp_path):
    R.generate("derain", tmp_path, num_train=10, num_test=2, size=16)
    with pytest.raises(ValueError, match=r"val_from_train=10, but only 10 training pairs exist \(at least one"):
        R.RestorationDataModule(tmp_path, "derain", val_from_train=10).setup()
    with pytest.raises(ValueError, match=r"num_train=8, but only 6 training pairs exist \(after any held-out"):
        R.RestorationDataModule(tmp_path, "derain", num_train=8, val_from_train=4).setup()
    with pytest.raises(ValueError, match="dataset=prod validates on its own fixed pairs"):
        R.RestorationDataModule(tmp_path, "prod", val_from_train=4)
    with pytest.raises(ValueError, match="val_from_train"):
        R.RestorationDataModule(tmp_path, "derain", val_from_train=0)
