"""Synthetic degradations and PROD (pre-training with random-order degradations), plain numpy/torch/PIL.

Images are float32 ``H×W×3`` arrays in [0, 1] (RGB); every random draw comes from the
``numpy.random.Generator`` passed in, so a seed reproduces a degradation exactly.

Sources (``/work/shared/reference/audio_seg_restoration.md`` §3.1–3.2):

* **BSRGAN** (Zhang et al., "Designing a Practical Degradation Model for Deep Blind Image
  Super-Resolution", ICCV 2021; cszn/BSRGAN@5ce1a9c ``utils/utils_blindsr.py``) gives the
  parameters used here for blur, Gaussian noise, JPEG and downsampling (``sf`` its scale factor):

  - ``blur``: with p ``p_aniso`` (0.5) an anisotropic Gaussian kernel of size 2·randint(2,11)+3, angle
    U(0, π), covariance eigenvalues U·(4+sf); otherwise an isotropic Gaussian of the same size with
    σ = U·(2 + 0.2·sf). Applied with wrap-around borders (BSRGAN's ``mode='wrap'``). *Our choice:* a
    floor of 0.1 on σ and on the eigenvalues keeps the kernel well defined.
  - ``noise`` (Gaussian): σ = randint(2, 25)/255; colour noise with p 0.4, grey with p 0.4,
    channel-correlated (covariance Uᵀ·diag(U(0,1)³)·U·σ², U a random orthogonal matrix) with p 0.2.
  - ``noise`` (Poisson, from ``degradation_bsrgan_plus``, with p ``p_poisson``): quantise to 8 bits,
    ``x ~ Poisson(img·v)/v`` with v = 10^U(2, 4), per channel with p 0.5 else on the luma only.
    (The v range is as recalled from the BSRGAN file, not quoted in the reference doc.)
  - ``jpeg``: quality randint(30, 95) (PIL's encoder instead of OpenCV's).
  - ``downsample``: resize by 1/U(1, 2·sf) with a random interpolation (bilinear, bicubic, box ≈
    OpenCV's area), then back to the original size with bicubic: a same-size restoration
    pipeline (BSRGAN's SR setting, which keeps the small image, is not what PROD restores).

* **Not in BSRGAN; reconstructions, every range an option** (the reference doc says the PROD
  list, probabilities and ranges were not found):

  - ``rain``: sparse seeds (density U(0.002, 0.01)) smeared along a line kernel (length
    randint(10, 25) px scaled to the image, angle ±U(0, 30°) from vertical), brightness U(0.6, 1.0),
    added and clipped (Rain100L-like streaks).
  - ``haze``: the atmospheric scattering model ``I = J·t + A·(1−t)``, ``t = exp(−β·d)`` with A ∈
    U(0.7, 1.0) and β ∈ U(0.6, 1.8) (the ranges RESIDE is commonly cited with) and a synthetic
    depth ``d`` ∈ [0, 1]: a random linear ramp plus smooth noise.
  - ``lowlight``: ``I = s·J^γ`` with γ ∈ U(1.5, 3.0) and s ∈ U(0.3, 0.8), then Gaussian noise
    σ ∈ U(0, 0.02) (the usual synthetic LOL-style darkening).

**PROD** (CoLoRA, arXiv 2408.01099): "clean images paired with synthetic degraded images, where the
degradations are applied in random order". :func:`prod` draws a number of operations k ∈
[``min_ops``, ``max_ops``], picks k of ``ops`` without replacement and applies them in a random
(shuffled) order; ``ops`` may repeat a name (BSRGAN applies ``blur`` twice). The paper's N and
per-operation probabilities are not published; the defaults below are our choice.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Rng = np.random.Generator


@dataclass
class DegradationConfig:
    """Every parameter of every operation (``task.degradation.*`` in the configs)."""

    sf: float = 2.0                      # BSRGAN scale factor: sets the blur and downsample ranges
    p_aniso: float = 0.5                 # blur: anisotropic with this probability, else isotropic
    blur_ksize: tuple[int, int] = (2, 11)  # kernel size 2·randint(a, b)+3
    noise_sigma: tuple[int, int] = (2, 25)  # Gaussian noise level randint(a, b)/255
    p_noise_color: float = 0.4
    p_noise_gray: float = 0.4            # (the rest, 0.2: channel-correlated)
    p_poisson: float = 0.1               # noise op: Poisson instead of Gaussian
    poisson_log10: tuple[float, float] = (2.0, 4.0)
    jpeg_quality: tuple[int, int] = (30, 95)
    rain_density: tuple[float, float] = (0.002, 0.01)
    rain_length: tuple[int, int] = (10, 25)
    rain_angle: float = 30.0
    rain_brightness: tuple[float, float] = (0.6, 1.0)
    haze_A: tuple[float, float] = (0.7, 1.0)
    haze_beta: tuple[float, float] = (0.6, 1.8)
    lowlight_gamma: tuple[float, float] = (1.5, 3.0)
    lowlight_scale: tuple[float, float] = (0.3, 0.8)
    lowlight_noise: tuple[float, float] = (0.0, 0.02)
    # PROD
    ops: tuple[str, ...] = ("blur", "noise", "jpeg", "downsample", "rain", "haze", "lowlight")
    min_ops: int = 1
    max_ops: int = 3

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "DegradationConfig":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown degradation option(s) {unknown}; valid: {', '.join(sorted(names))}")
        cfg = cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()})
        bad = [o for o in cfg.ops if o not in OPS]
        if bad:
            raise ValueError(f"unknown degradation(s) {bad}; valid: {', '.join(OPS)}")
        if not 1 <= cfg.min_ops <= cfg.max_ops <= len(cfg.ops):
            raise ValueError(f"need 1 <= min_ops <= max_ops <= len(ops)={len(cfg.ops)}, "
                             f"got min_ops={cfg.min_ops}, max_ops={cfg.max_ops}")
        return cfg


# ------------------------------------------------------------------------------------ kernels
def _grid(ksize: int) -> tuple[np.ndarray, np.ndarray]:
    r = (ksize - 1) / 2.0
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return x, y


def gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
    """Isotropic Gaussian, normalised to sum 1."""
    x, y = _grid(ksize)
    k = np.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))
    return (k / k.sum()).astype(np.float32)


def anisotropic_kernel(ksize: int, theta: float, l1: float, l2: float) -> np.ndarray:
    """Gaussian with covariance ``R(θ)·diag(l1, l2)·R(θ)ᵀ`` (BSRGAN's ``anisotropic_Gaussian``)."""
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    inv = np.linalg.inv(rot @ np.diag([l1, l2]) @ rot.T)
    x, y = _grid(ksize)
    pts = np.stack([x, y], -1)
    k = np.exp(-0.5 * np.einsum("...i,ij,...j->...", pts, inv, pts))
    return (k / k.sum()).astype(np.float32)


def line_kernel(length: int, angle_deg: float) -> np.ndarray:
    """A normalised straight line of ``length`` px at ``angle_deg`` from vertical (motion / rain streaks)."""
    size = length if length % 2 else length + 1
    k = np.zeros((size, size), np.float32)
    c, a = (size - 1) / 2, np.deg2rad(angle_deg)
    for t in np.linspace(-(length - 1) / 2, (length - 1) / 2, 4 * length):
        x, y = c + t * np.sin(a), c + t * np.cos(a)
        k[int(round(y)), int(round(x))] = 1.0
    return k / k.sum()


def filter2d(img: np.ndarray, kernel: np.ndarray, mode: str = "wrap") -> np.ndarray:
    """Convolve every channel with ``kernel`` (borders padded by numpy ``mode``)."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    padded = np.pad(img, ((ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)), mode=mode)
    x = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))[None]
    k = torch.from_numpy(kernel[::-1, ::-1].copy())[None, None].expand(x.shape[1], 1, kh, kw)
    return F.conv2d(x, k, groups=x.shape[1])[0].numpy().transpose(1, 2, 0)


# ------------------------------------------------------------------------------------ operations
def blur(img: np.ndarray, rng: Rng, cfg: DegradationConfig, kind: str | None = None) -> np.ndarray:
    """``kind``: 'aniso' | 'iso' | None (aniso with p ``p_aniso``)."""
    ksize = 2 * int(rng.integers(cfg.blur_ksize[0], cfg.blur_ksize[1] + 1)) + 3
    if kind is None:
        kind = "aniso" if rng.random() < cfg.p_aniso else "iso"
    if kind == "aniso":
        wd2 = 4.0 + cfg.sf
        k = anisotropic_kernel(ksize, rng.random() * np.pi, max(wd2 * rng.random(), 0.1), max(wd2 * rng.random(), 0.1))
    else:
        k = gaussian_kernel(ksize, max((2.0 + 0.2 * cfg.sf) * rng.random(), 0.1))
    return filter2d(img, k)


def gaussian_noise(img: np.ndarray, rng: Rng, cfg: DegradationConfig, sigma: float | None = None) -> np.ndarray:
    level = sigma if sigma is not None else rng.integers(cfg.noise_sigma[0], cfg.noise_sigma[1] + 1) / 255.0
    u = rng.random()
    h, w, _ = img.shape
    if u < cfg.p_noise_color:
        noise = rng.normal(0.0, level, img.shape)
    elif u < cfg.p_noise_color + cfg.p_noise_gray:
        noise = rng.normal(0.0, level, (h, w, 1))
    else:
        q, _ = np.linalg.qr(rng.random((3, 3)))
        cov = np.abs(level ** 2 * (q.T @ np.diag(rng.random(3)) @ q))
        noise = rng.multivariate_normal(np.zeros(3), cov, (h, w))
    return np.clip(img + noise, 0.0, 1.0).astype(np.float32)


def poisson_noise(img: np.ndarray, rng: Rng, cfg: DegradationConfig) -> np.ndarray:
    img = np.clip(np.round(img * 255.0), 0, 255) / 255.0
    vals = 10 ** rng.uniform(*cfg.poisson_log10)
    if rng.random() < 0.5:
        out = rng.poisson(img * vals) / vals
    else:
        gray = np.clip(np.round(img @ np.array([0.299, 0.587, 0.114]) * 255.0), 0, 255) / 255.0
        out = img + (rng.poisson(gray * vals) / vals - gray)[..., None]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def noise(img: np.ndarray, rng: Rng, cfg: DegradationConfig) -> np.ndarray:
    return poisson_noise(img, rng, cfg) if rng.random() < cfg.p_poisson else gaussian_noise(img, rng, cfg)


def jpeg(img: np.ndarray, rng: Rng, cfg: DegradationConfig, quality: int | None = None) -> np.ndarray:
    q = int(quality if quality is not None else rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
    buf = io.BytesIO()
    to_pil(img).save(buf, format="JPEG", quality=q)
    buf.seek(0)
    return from_pil(Image.open(buf))


INTERP = (Image.BILINEAR, Image.BICUBIC, Image.BOX)


def downsample(img: np.ndarray, rng: Rng, cfg: DegradationConfig, factor: float | None = None) -> np.ndarray:
    h, w, _ = img.shape
    f = factor if factor is not None else rng.uniform(1.0, 2.0 * cfg.sf)
    small = (max(1, round(w / f)), max(1, round(h / f)))
    pil = to_pil(img).resize(small, INTERP[int(rng.integers(len(INTERP)))])
    return from_pil(pil.resize((w, h), Image.BICUBIC))


def rain(img: np.ndarray, rng: Rng, cfg: DegradationConfig) -> np.ndarray:
    h, w, _ = img.shape
    seeds = (rng.random((h, w)) < rng.uniform(*cfg.rain_density)).astype(np.float32)
    length = max(3, int(rng.integers(cfg.rain_length[0], cfg.rain_length[1] + 1) * min(h, w) / 128))
    k = line_kernel(length, rng.uniform(-cfg.rain_angle, cfg.rain_angle))
    streaks = filter2d(seeds[..., None], k)[..., 0] * length  # a seed becomes a streak of height ~1
    streaks = np.clip(streaks, 0, 1) * rng.uniform(*cfg.rain_brightness)
    return np.clip(img + streaks[..., None], 0.0, 1.0).astype(np.float32)


def smooth_noise(h: int, w: int, rng: Rng, cells: int = 4) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a ``cells×cells`` random grid upsampled bicubically."""
    g = torch.from_numpy(rng.random((1, 1, cells, cells)).astype(np.float32))
    out = F.interpolate(g, size=(h, w), mode="bicubic", align_corners=True)[0, 0].numpy()
    return (out - out.min()) / max(float(out.max() - out.min()), 1e-6)


def haze(img: np.ndarray, rng: Rng, cfg: DegradationConfig) -> np.ndarray:
    h, w, _ = img.shape
    a = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    ramp = np.cos(a) * xx + np.sin(a) * yy
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    depth = 0.7 * ramp + 0.3 * smooth_noise(h, w, rng)
    t = np.exp(-rng.uniform(*cfg.haze_beta) * depth)[..., None]
    A = rng.uniform(*cfg.haze_A)
    return np.clip(img * t + A * (1 - t), 0.0, 1.0).astype(np.float32)


def lowlight(img: np.ndarray, rng: Rng, cfg: DegradationConfig) -> np.ndarray:
    dark = rng.uniform(*cfg.lowlight_scale) * np.power(img, rng.uniform(*cfg.lowlight_gamma))
    dark = dark + rng.normal(0.0, rng.uniform(*cfg.lowlight_noise), img.shape)
    return np.clip(dark, 0.0, 1.0).astype(np.float32)


OPS: dict[str, Callable[[np.ndarray, Rng, DegradationConfig], np.ndarray]] = {
    "blur": blur, "noise": noise, "jpeg": jpeg, "downsample": downsample,
    "rain": rain, "haze": haze, "lowlight": lowlight,
}


@dataclass
class Degraded:
    image: np.ndarray
    ops: list[str] = field(default_factory=list)  # in the order applied


def prod(img: np.ndarray, rng: Rng | int, cfg: DegradationConfig | None = None) -> Degraded:
    """PROD: k ∈ [min_ops, max_ops] operations of ``cfg.ops``, drawn without replacement, in random order."""
    cfg = cfg or DegradationConfig()
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    k = int(rng.integers(cfg.min_ops, cfg.max_ops + 1))
    order = [cfg.ops[i] for i in rng.permutation(len(cfg.ops))[:k]]
    out = np.asarray(img, np.float32)
    for name in order:
        out = OPS[name](out, rng, cfg)
    return Degraded(out, order)


def apply(names: list[str], img: np.ndarray, rng: Rng | int, cfg: DegradationConfig | None = None) -> np.ndarray:
    """Apply the operations ``names`` in the given order (one single-degradation task = one name)."""
    cfg = cfg or DegradationConfig()
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    out = np.asarray(img, np.float32)
    for n in names:
        if n not in OPS:
            raise ValueError(f"unknown degradation {n!r}; valid: {', '.join(OPS)}")
        out = OPS[n](out, rng, cfg)
    return out


# ------------------------------------------------------------------------------------ conversions
def to_pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8))


def from_pil(pil: Image.Image) -> np.ndarray:
    return np.asarray(pil.convert("RGB"), np.float32) / 255.0
