"""PSNR/SSIM conventions (RGB, Y, border crop, 8-bit), losses, tiled inference, PNG output."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from tasks.losses.restoration import restoration_loss
from tasks.metrics.restoration import psnr, rgb_to_y, ssim
from tasks.restoration import save_png, side_by_side, tiled_forward


def ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al.'s SSIM on one channel, written out: 11×11 Gaussian σ 1.5, valid region, K=(0.01, 0.03)."""
    r = np.arange(11) - 5
    g = np.exp(-(r ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()

    def filt(a):
        h, wd = a.shape
        return np.array([[np.sum(a[i:i + 11, j:j + 11] * w) for j in range(wd - 10)] for i in range(h - 10)])

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    return float(np.mean((2 * mx * my + c1) * (2 * sxy + c2) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))))


def test_psnr_known_values_and_quantisation():
    t = torch.zeros(2, 3, 16, 16)
    p = torch.full_like(t, 51 / 255)  # exactly 0.2 on the 8-bit grid: MSE 0.04
    torch.testing.assert_close(psnr(p, t), torch.full((2,), 10 * math.log10(1 / 0.04)))
    # 0.1 is not on the 8-bit grid: measured as 26/255 (BasicSR measures the uint8 image)
    expect_q = 10 * math.log10(1 / (26 / 255) ** 2)
    assert psnr(torch.full_like(t, 0.1), t).mean().item() == pytest.approx(expect_q, abs=1e-4)
    assert psnr(torch.full_like(t, 0.1), t, quantize=False).mean().item() == pytest.approx(20.0, abs=1e-4)
    # per-image PSNR, averaged by the caller (not the PSNR of the pooled MSE)
    p2 = torch.cat([torch.full((1, 3, 16, 16), 51 / 255), torch.full((1, 3, 16, 16), 102 / 255)])
    got = psnr(p2, t).tolist()
    assert got == pytest.approx([10 * math.log10(25), 10 * math.log10(1 / 0.16)], abs=1e-4)


def test_y_channel_and_border_crop():
    white, black = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    assert rgb_to_y(white).flatten()[0].item() == pytest.approx(235 / 255)  # 16 + 65.481+128.553+24.966 = 235
    assert rgb_to_y(black).flatten()[0].item() == pytest.approx(16 / 255)
    t = torch.full((1, 3, 20, 20), 0.4)
    p = t.clone()
    p[..., :2, :] = 1.0  # error only in a 2-pixel top border
    p[..., 5, 5] = 0.4 + 51 / 255  # and one interior pixel, 0.2 off in every channel
    assert psnr(p, t, crop_border=2).item() == pytest.approx(10 * math.log10(1 / (0.04 / 256)), abs=1e-3)
    assert psnr(p, t).item() < 20
    # Y of an error of +0.2 in R only is 0.2·65.481/255
    q = t.clone()
    q[:, 0, 5, 5] += 51 / 255
    dy = 51 / 255 * 65.481 / 255
    expect = 10 * math.log10(1 / (dy ** 2 / 400))
    assert psnr(q, t, y_channel=True, quantize=False).item() == pytest.approx(expect, abs=1e-3)


def test_ssim_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(1, 3, 24, 24, generator=g)
    p = (t + 0.1 * torch.randn(t.shape, generator=g)).clamp(0, 1)
    ref = np.mean([ssim_reference(((p[0, c] * 255).round() / 255).double().numpy(),
                                  ((t[0, c] * 255).round() / 255).double().numpy()) for c in range(3)])
    assert ssim(p, t).item() == pytest.approx(ref, abs=1e-4)
    assert ssim(t, t).item() == pytest.approx(1.0, abs=1e-6)
    # constant images 0.5 vs 0.25: (2·μxμy + C1)/(μx² + μy² + C1), the structure term is 1
    c1 = 1e-4
    expect = (2 * 0.5 * 0.25 + c1) / (0.25 + 0.0625 + c1)
    assert ssim(torch.full((1, 1, 16, 16), 0.5), torch.full((1, 1, 16, 16), 0.25), quantize=False).item() == \
        pytest.approx(expect, abs=1e-5)
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    assert abs(tm_ssim(p, t, data_range=1.0).item() - ssim(p, t, quantize=False).item()) > 1e-3  # not torchmetrics' mean
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(t[..., :12, :12], t[..., :12, :12], crop_border=1)


def test_losses():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(3, 3, 8, 8, generator=g)
    p = t + 0.05 * torch.randn(t.shape, generator=g)
    # NAFNet's PSNRLoss is minus the mean per-image PSNR (no clamp / quantisation)
    mean_psnr = psnr(p.clamp(0, 1), t, quantize=False).mean()
    clamped = restoration_loss("psnr", p.clamp(0, 1), t)
    assert clamped.item() == pytest.approx(-mean_psnr.item(), abs=1e-3)
    assert restoration_loss("l1", p, t).item() == pytest.approx((p - t).abs().mean().item())
    with pytest.raises(ValueError, match="valid: l1, psnr, mse"):
        restoration_loss("ssim", p, t)


def test_tiled_inference_matches_one_pass():
    torch.manual_seed(0)
    # three 3×3 convs: receptive-field radius 3, so 3 pixels of context make every tile exact
    local = torch.nn.Sequential(*[torch.nn.Conv2d(3, 3, 3, padding=1) for _ in range(3)])
    x = torch.rand(1, 3, 50, 37)
    with torch.no_grad():
        full = local(x)
        torch.testing.assert_close(tiled_forward(local, x, tile=16, overlap=3), full)
        assert (tiled_forward(local, x, tile=16, overlap=1) - full).abs().max() > 1e-4  # too little context
        assert torch.equal(tiled_forward(local, x, tile=None), full)
    bb = zoo.create_backbone("nafnet", width=8, layout="tiny")
    with torch.no_grad():
        assert tiled_forward(bb, x, tile=16, overlap=8).shape == x.shape
    with pytest.raises(ValueError, match="overlap=-1"):
        tiled_forward(local, x, tile=16, overlap=-1)


def test_png_round_trip_and_side_by_side(tmp_path):
    img = torch.rand(3, 10, 12)
    path = save_png(img, tmp_path / "pred" / "a.png")
    back = torch.from_numpy(np.asarray(Image.open(path))).permute(2, 0, 1).float() / 255
    assert (back - img).abs().max() <= 0.5 / 255 + 1e-6
    assert not list((tmp_path / "pred").glob(".*tmp"))
    sbs = side_by_side(img, img * 0.5, img, gap=2)
    assert sbs.shape == (3, 10, 3 * 12 + 4)
