"""Super-resolution data (paired lr_x<s>/ + hr/ or HR-only with on-the-fly bicubic; bicubic-upsampled
network input; SR metric convention) and SIDD's .mat validation blocks (MAT v5 and v7.3/HDF5)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.data import degradations as D
from tasks.data import restoration as R
from tasks.data.procedural import clean_image
from tasks.restoration import metric_convention


def test_bicubic_resize_matches_torch_antialiased_bicubic():
    """PIL's bicubic (a = −0.5, antialiased): torch's ``antialias=True`` bicubic is the external oracle."""
    x = clean_image(2, 48)
    for s in (2, 4):
        ours = D.resize(x, (48 // s, 48 // s))
        ref = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], scale_factor=1 / s, mode="bicubic",
                            antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours[2:-2, 2:-2], ref[2:-2, 2:-2], atol=2e-4)  # borders: renormalised weights


@pytest.mark.parametrize("scale", [2, 4])
def test_sr_paired_and_on_the_fly_layouts(tmp_path, scale):
    R.generate("sr", tmp_path, num_train=4, num_test=2, size=40)
    pairs = R.find_pairs("sr", tmp_path, "train", scale=scale)
    assert [str(p[0].relative_to(tmp_path)) for p in pairs][:1] == [f"sr/train/lr_x{scale}/0000.png"]
    x, y, name = R.SRDataset(pairs, scale)[0]
    assert x.shape == y.shape == (3, 40, 40) and name == "0000"  # 40 is a multiple of 2 and 4
    # the input is the LR image bicubic-upsampled to the HR size
    lr = R.read_image(pairs[0][0])
    assert lr.shape == (40 // scale, 40 // scale, 3)
    np.testing.assert_allclose(x.numpy().transpose(1, 2, 0), R.upsample_to(lr, (40, 40)), atol=1e-6)
    # HR-only: the LR image is made on the fly by the same bicubic (the files are 8-bit: within 1/255)
    (tmp_path / "sr" / "train" / f"lr_x{scale}").rename(tmp_path / "elsewhere")
    hr_only = R.find_pairs("sr", tmp_path, "train", scale=scale)
    assert hr_only[0][0] is None
    x2, y2, _ = R.SRDataset(hr_only, scale)[0]
    assert torch.equal(y, y2) and (x - x2).abs().max() <= 1.5 / 255
    # crops keep input and target aligned
    xc, yc, _ = R.SRDataset(hr_only, scale, patch_size=16)[1]
    assert xc.shape == yc.shape == (3, 16, 16)


def test_sr_mod_crop_div2k_names_and_bad_input(tmp_path):
    hr_dir, lr_dir = tmp_path / "sr" / "train" / "hr", tmp_path / "sr" / "train" / "lr_x4"
    hr_dir.mkdir(parents=True), lr_dir.mkdir(parents=True)
    D.to_pil(clean_image(0, 42)).save(hr_dir / "0001.png")              # 42 -> mod-cropped to 40
    D.to_pil(D.resize(clean_image(0, 42)[:40, :40], (10, 10))).save(lr_dir / "0001x4.png")  # DIV2K's naming
    pairs = R.find_pairs("sr", tmp_path, "train", scale=4)
    x, y, _ = R.SRDataset(pairs, 4)[0]
    assert x.shape == y.shape == (3, 40, 40)
    D.to_pil(clean_image(0, 12)).save(lr_dir / "0001x4.png")            # wrong LR size
    with pytest.raises(ValueError, match="needs 10x10 at scale 4"):
        R.SRDataset(pairs, 4)[0]
    D.to_pil(clean_image(1, 40)).save(hr_dir / "0002.png")
    with pytest.raises(FileNotFoundError, match="0002.png has no LR image"):
        R.find_pairs("sr", tmp_path, "train", scale=4)
    with pytest.raises(ValueError, match="task.scale=1"):
        R.RestorationDataModule(str(tmp_path), dataset="sr", scale=1)


def test_sr_metric_convention():
    base = {"crop_border": None, "y_channel": None, "quantize": True}
    assert metric_convention(base, "sr", 4) == {"crop_border": 4, "y_channel": True, "quantize": True}
    assert metric_convention(base, "derain", 4) == {"crop_border": 0, "y_channel": False, "quantize": True}
    assert metric_convention({**base, "crop_border": 0}, "sr", 2)["crop_border"] == 0  # explicit values win


def _blocks(rng, n_img=2, n_blk=3, size=16):
    return rng.integers(0, 256, (n_img, n_blk, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_sidd_mat_validation_blocks(tmp_path, fmt):
    rng = np.random.default_rng(0)
    noisy, gt = _blocks(rng), _blocks(rng)
    folder = tmp_path / "sidd" / "test"
    folder.mkdir(parents=True)
    for key, arr in zip(R.SIDD_MAT, (noisy, gt)):
        path = folder / f"{key}.mat"
        if fmt == "v5":
            from scipy.io import savemat

            savemat(path, {key: arr})
        else:  # MATLAB -v7.3 writes HDF5, column-major: h5py sees the axes reversed
            import h5py

            with h5py.File(path, "w") as f:
                f.create_dataset(key, data=arr.transpose(4, 3, 2, 1, 0))
    R._MAT_CACHE.clear()
    pairs = R.find_pairs("denoise", tmp_path, "test")
    assert len(pairs) == 2 * 3
    ds = R.PairedDataset(pairs)
    x, y, name = ds[4]  # image 1, block 1
    assert name == "01_01" and x.shape == (3, 16, 16)
    np.testing.assert_array_equal((x.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8), noisy[1, 1])
    np.testing.assert_array_equal((y.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8), gt[1, 1])
    # a pair reads the noisy and the clean file alternately: both stay cached (no reload per block)
    assert {k[1] for k in R._MAT_CACHE} == set(R.SIDD_MAT)
    cached = {k: id(v) for k, v in R._MAT_CACHE.items()}
    for i in range(len(ds)):
        ds[i]
    assert {k: id(v) for k, v in R._MAT_CACHE.items()} == cached


def test_sidd_mat_bad_input(tmp_path):
    from scipy.io import savemat

    folder = tmp_path / "sidd" / "test"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    savemat(folder / f"{R.SIDD_MAT[0]}.mat", {R.SIDD_MAT[0]: _blocks(rng)})
    with pytest.raises(FileNotFoundError, match="ValidationGtBlocksSrgb.mat"):
        R.find_pairs("denoise", tmp_path, "test")
    savemat(folder / f"{R.SIDD_MAT[1]}.mat", {"other": _blocks(rng)})
    with pytest.raises(ValueError, match="has no variable 'ValidationGtBlocksSrgb'"):
        R.find_pairs("denoise", tmp_path, "test")
    savemat(folder / f"{R.SIDD_MAT[1]}.mat", {R.SIDD_MAT[1]: _blocks(rng, n_blk=2)})
    with pytest.raises(ValueError, match="they must match"):
        R.find_pairs("denoise", tmp_path, "test")
    (folder / f"{R.SIDD_MAT[1]}.mat").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="ValidationGtBlocksSrgb.mat: cannot read this MAT file"):
        R.find_pairs("denoise", tmp_path, "test")
