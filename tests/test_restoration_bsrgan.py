"""BSRGAN's full degradation sequence (sf=4 two-stage downsample, op order, paired crop) and its op 6,
camera-ISP noise (Brooks et al.'s unprocess -> raw shot/read noise -> process)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.data import degradations as D
from tasks.data.procedural import clean_image


def test_camera_noise_is_reproducible_and_keeps_shape():
    cfg = D.DegradationConfig()
    x = clean_image(3, 33)[:, :30]  # odd height: the Bayer mosaic needs no even size
    a, b = D.camera(x, np.random.default_rng(5), cfg), D.camera(x, np.random.default_rng(5), cfg)
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert not np.array_equal(a, D.camera(x, np.random.default_rng(6), cfg))
    assert np.abs(a - x).mean() > 1e-3  # it degrades


def test_isp_round_trip_without_noise_is_the_identity():
    rng = np.random.default_rng(0)
    x = 0.05 + 0.75 * clean_image(1, 24)  # away from saturation (Brooks' safe gains act near white)
    for _ in range(5):
        p = D.random_isp(rng, D.DegradationConfig())
        np.testing.assert_allclose(p.rgb2cam.sum(1), 1.0, atol=1e-12)  # normalised CCM rows
        assert 1.9 <= p.red_gain <= 2.4 and 1.5 <= p.blue_gain <= 1.9
        assert 1e-4 <= p.shot_noise <= 0.012
        np.testing.assert_allclose(D.process(D.unprocess(x, p), p), x, atol=1e-5)
        # smoothstep tone curve: unprocess inverts 3x² − 2x³
        t = np.linspace(0, 1, 11)
        np.testing.assert_allclose(0.5 - np.sin(np.arcsin(1 - 2 * (3 * t**2 - 2 * t**3)) / 3), t, atol=1e-9)


def test_raw_noise_variance_grows_with_the_signal():
    """Brooks' model: Var = shot·x + read, so brighter raw pixels are noisier (Poisson-like)."""
    rng = np.random.default_rng(0)
    shot, read = 0.01, 1e-4
    for level in (0.05, 0.3, 0.8):
        raw = np.full((256, 256), level)
        var = (D.add_raw_noise(raw, rng, shot, read) - raw).var()
        assert var == pytest.approx(shot * level + read, rel=0.05)
    # the whole op: the noise in the camera's raw space grows with the brightness of the input
    cfg = D.DegradationConfig(isp_shot_noise=(0.01, 0.01))
    p = D.random_isp(np.random.default_rng(1), cfg)
    dark, bright = np.full((128, 128, 3), 0.15), np.full((128, 128, 3), 0.7)
    v = [(D.unprocess(D.camera(im, np.random.default_rng(2), cfg, params=p, use_mosaic=False), p)
          - D.unprocess(im, p)).var() for im in (dark, bright)]
    assert v[1] > 2 * v[0]


def test_bayer_mosaic_and_bilinear_demosaic():
    x = np.random.default_rng(0).random((6, 8, 3))
    m = D.mosaic(x)
    assert m[0, 0] == x[0, 0, 0] and m[0, 1] == x[0, 1, 1] and m[1, 0] == x[1, 0, 1] and m[1, 1] == x[1, 1, 2]
    flat = np.full((10, 12, 3), [0.2, 0.5, 0.7])
    np.testing.assert_allclose(D.demosaic(D.mosaic(flat)), flat, atol=1e-6)  # constants survive demosaicing


def test_bsrgan_shapes_crop_and_reproducibility():
    cfg = D.DegradationConfig()
    x = clean_image(0, 66)  # mod-cropped to 64 (sf 4) / 66 (sf 2)
    for sf in (2, 4):
        r = D.bsrgan(x, 3, cfg, sf=sf)
        h = 66 - 66 % sf
        assert r.hq.shape == (h, h, 3) and r.lq.shape == (h // sf, h // sf, 3)
        r2 = D.bsrgan(x, 3, cfg, sf=sf)
        np.testing.assert_array_equal(r.lq, r2.lq)
        assert r.ops == r2.ops and r.ops[-1] == "jpeg"  # the final JPEG always runs
    r = D.bsrgan(x, 4, cfg, sf=4, lq_patchsize=8)
    assert r.lq.shape == (8, 8, 3) and r.hq.shape == (32, 32, 3)
    with pytest.raises(ValueError, match="smaller than lq_patchsize"):
        D.bsrgan(x, 0, cfg, sf=4, lq_patchsize=20)


def test_bsrgan_order_and_the_sf4_two_stage_downsample():
    cfg = D.DegradationConfig(p_isp=0.0)
    x = clean_image(1, 32)
    runs = [D.bsrgan(x, s, cfg, sf=4).ops for s in range(40)]
    for ops in runs:
        assert ops.index("downsample") < ops.index("resize")  # op 2 always before op 3
        assert ops.count("blur") == 2 and "camera" not in ops
    firsts = {ops[0] for ops in runs}
    assert len(firsts) >= 4  # the order is shuffled
    n2 = sum(ops[0] == "scale2" for ops in runs)
    assert 3 <= n2 <= 18  # p_scale2 = 0.25 of 40
    assert not any("scale2" in D.bsrgan(x, s, cfg, sf=2).ops for s in range(10))  # only for sf = 4
    always = D.DegradationConfig(p_scale2=1.0, p_isp=1.0)
    ops = D.bsrgan(x, 0, always, sf=4).ops
    assert ops[0] == "scale2" and "camera" in ops


def test_shift_kernel_and_bicubic_resize():
    k = D.gaussian_kernel(25, 1.5)
    np.testing.assert_allclose(D.shift_kernel(k, 1), k, atol=1e-7)
    s = D.shift_kernel(k, 3)  # sampled at x + 1: the centre moves 1 px up-left
    yy, xx = np.mgrid[:25, :25]
    assert (s * xx).sum() == pytest.approx(11.0, abs=1e-3) and (s * yy).sum() == pytest.approx(11.0, abs=1e-3)
    flat = np.full((16, 20, 3), 0.3, np.float32)
    small = D.resize(flat, (10, 8))
    assert small.shape == (8, 10, 3)
    np.testing.assert_allclose(small, 0.3, atol=1e-6)
    with pytest.raises(ValueError, match="cannot resize"):
        D.resize(flat, (0, 8))


def test_prod_dataset_with_the_bsrgan_pipeline():
    from tasks.data import restoration as R

    cfg = D.DegradationConfig.from_dict({"pipeline": "bsrgan", "sf": 4})
    ds = R.ProdDataset(3, size=32, cfg=cfg, seed=1)
    x, y, ops = ds[0]
    assert x.shape == y.shape == (3, 32, 32) and ops.endswith("jpeg")  # the LQ image upsampled back to 32 px
    assert torch.equal(x, ds[0][0])  # reproducible
    with pytest.raises(ValueError, match="integer sf dividing data.image_size"):
        R.ProdDataset(1, size=30, cfg=cfg)[0]
    with pytest.raises(ValueError, match="valid: prod, bsrgan"):
        D.DegradationConfig.from_dict({"pipeline": "realesrgan"})
