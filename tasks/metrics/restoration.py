"""Restoration metrics: PSNR and SSIM as BasicSR computes them (plain torch + torchmetrics).

**Metric convention** (the team spec ``reference/audio_seg_restoration.md`` (internal, not shipped) §3.5, BasicSR
``basicsr/metrics/psnr_ssim.py`` as NAFNet uses it):

* images in [0, 1], **quantised to 8 bits** first (``quantize=True``: BasicSR measures the saved
  uint8 image; the doc notes this matches the papers more closely), peak 1 (= 255 on the uint8 scale);
* ``crop_border`` pixels removed on every side (NAFNet GoPro/SIDD: 0; SR papers: the scale);
* ``y_channel=True``: BT.601 luma of BasicSR's ``bgr2ycbcr(y_only=True)``,
  ``Y = (16 + 65.481·R + 128.553·G + 24.966·B) / 255`` ∈ [16/255, 235/255] (Restormer's deraining
  numbers use Y; NAFNet's use RGB);
* PSNR per image, ``10·log10(1 / MSE)``, averaged over images;
* SSIM per image with torchmetrics (Gaussian window 11, σ 1.5, K = (0.01, 0.03), data range 1),
  averaged over the **valid region** (5 px inside every border, as BasicSR's ``_ssim``: torchmetrics
  alone would average its reflect-padded map over the whole image), the channels and the images. Small differences from MATLAB remain
  (MATLAB ``rgb2ycbcr`` rounding), as the doc says.

Losses: :mod:`tasks.losses.restoration`; tiled inference and PNG output: :mod:`tasks.restoration`.
"""
from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of an ``N×3×H×W`` RGB batch in [0, 1], as ``N×1×H×W`` in [16/255, 235/255]."""
    w = x.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1)
    return (16.0 + (x * w).sum(1, keepdim=True)) / 255.0


def prepare_for_metric(pred: torch.Tensor, target: torch.Tensor, crop_border: int = 0, y_channel: bool = False,
                       quantize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred, target = pred.float().clamp(0, 1), target.float().clamp(0, 1)
    if quantize:
        pred, target = (pred * 255).round() / 255, (target * 255).round() / 255
    if crop_border:
        c = int(crop_border)
        pred, target = pred[..., c:-c, c:-c], target[..., c:-c, c:-c]
    if y_channel:
        pred, target = rgb_to_y(pred), rgb_to_y(target)
    return pred, target


def psnr(pred: torch.Tensor, target: torch.Tensor, crop_border: int = 0, y_channel: bool = False,
         quantize: bool = True) -> torch.Tensor:
    """Per-image PSNR (dB), shape ``(N,)``; see the module docstring for the convention."""
    p, t = prepare_for_metric(pred, target, crop_border, y_channel, quantize)
    return peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(pred: torch.Tensor, target: torch.Tensor, crop_border: int = 0, y_channel: bool = False,
         quantize: bool = True) -> torch.Tensor:
    """Per-image SSIM, shape ``(N,)``."""
    p, t = prepare_for_metric(pred, target, crop_border, y_channel, quantize)
    if min(p.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 after the border crop, got {tuple(p.shape[-2:])}")
    # torchmetrics reflect-pads and averages the whole map; BasicSR averages the valid region only
    _, ssim_map = structural_similarity_index_measure(p, t, gaussian_kernel=True, sigma=1.5, kernel_size=11,
                                                      data_range=1.0, k1=0.01, k2=0.03, reduction="none",
                                                      return_full_image=True)
    return ssim_map[..., 5:-5, 5:-5].flatten(1).mean(1)
