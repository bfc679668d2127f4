"""Restoration metrics, losses, tiled inference and PNG output (plain torch + torchmetrics).

**Metric convention** (``/work/shared/reference/audio_seg_restoration.md`` §3.5, BasicSR
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

**Losses**: ``l1`` (PromptIR) and ``psnr`` (NAFNet's ``PSNRLoss``: ``10/ln10 · mean_i log(MSE_i + 1e-8)``,
i.e. minus the mean PSNR up to the epsilon).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

LOSSES = ("l1", "psnr", "mse")


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


def restoration_loss(kind: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "psnr":
        mse = (pred - target).pow(2).flatten(1).mean(1)
        return 10.0 / math.log(10.0) * torch.log(mse + 1e-8).mean()
    raise ValueError(f"unknown restoration loss {kind!r}; valid: {', '.join(LOSSES)}")


@torch.no_grad()
def tiled_forward(model, x: torch.Tensor, tile: int | None = 256, overlap: int = 32) -> torch.Tensor:
    """``model(x)`` computed tile by tile, for images too large for one pass (Real-ESRGAN's ``tile``/``tile_pad``).

    The image is cut into ``tile×tile`` cores; each core is run with ``overlap`` extra pixels of
    context on every side (clipped at the image border) and only the core of the output is kept.
    For a model whose receptive-field radius is at most ``overlap`` the result equals the one-pass
    output exactly. NAFNet's channel attention pools over the whole input, so its tiled output is
    close to, not equal to, the one-pass one (NAFNet's TLC variant addresses this; not built here).
    ``tile=None`` or an image no larger than ``tile`` runs in one pass.
    """
    n, c, h, w = x.shape
    if tile is None or (h <= tile and w <= tile):
        return model(x)
    if int(tile) < 1 or int(overlap) < 0:
        raise ValueError(f"tile={tile} must be >= 1 and overlap={overlap} >= 0")
    out = None
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            py0, px0 = max(y0 - overlap, 0), max(x0 - overlap, 0)
            py1, px1 = min(y1 + overlap, h), min(x1 + overlap, w)
            pred = model(x[..., py0:py1, px0:px1])
            if out is None:
                out = x.new_zeros(n, pred.shape[1], h, w)
            out[..., y0:y1, x0:x1] = pred[..., y0 - py0:y1 - py0, x0 - px0:x1 - px0]
    return out


def save_png(img: torch.Tensor, path: str | Path) -> Path:
    """Write a ``3×H×W`` (or ``1×H×W``) tensor in [0, 1] as an 8-bit PNG, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (img.detach().float().clamp(0, 1).cpu() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else np.ascontiguousarray(arr))
    tmp = path.with_name(f".{path.name}.tmp")
    pil.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def side_by_side(inp: torch.Tensor, out: torch.Tensor, target: torch.Tensor, gap: int = 2) -> torch.Tensor:
    """``[input | output | target]`` of one ``3×H×W`` image, with a white gap, for logging."""
    pad = torch.ones(inp.shape[0], inp.shape[1], gap, dtype=inp.dtype, device=inp.device)
    return torch.cat([inp.clamp(0, 1), pad, out.clamp(0, 1), pad, target.clamp(0, 1)], dim=-1)
