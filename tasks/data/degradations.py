"""Synthetic degradations and PROD (pre-training with random-order degradations), plain numpy/torch/PIL.

Images are float32 ``H×W×3`` arrays in [0, 1] (RGB); every random draw comes from the
``numpy.random.Generator`` passed in, so a seed reproduces a degradation exactly.

Sources (the team spec ``reference/audio_seg_restoration.md`` (internal, not shipped) §3.1–3.2):

* **BSRGAN** (Zhang et al., "Designing a Practical Degradation Model for Deep Blind Image
  Super-Resolution", ICCV 2021; cszn/BSRGAN@5ce1a9c ``utils/utils_blindsr.py``) gives the
  parameters used here for blur, Gaussian noise, JPEG and downsampling (``sf`` its scale factor):

  - ``blur``: with p ``p_aniso`` (0.5) an anisotropic Gaussian kernel of size 2·randint(2,11)+3, angle
    U(0, π), covariance eigenvalues U·(4+sf); otherwise an isotropic Gaussian of the same size with
    σ = U·(2 + 0.2·sf). Applied with mirrored borders (BSRGAN's ``add_blur`` convolves with
    ``ndimage`` ``mode='mirror'``, numpy's ``reflect``). *Our choice:* a floor of 0.1 on σ and on the
    eigenvalues keeps the kernel well defined.
  - ``noise`` (Gaussian): σ = randint(2, 25)/255; colour noise with p 0.4, grey with p 0.4,
    channel-correlated with p 0.2: covariance ``|L²·Uᵀ·diag(U(0,1)³)·U|``, U a random orthogonal
    matrix and L the *upper* level 25/255 (BSRGAN's ``add_Gaussian_noise`` uses ``noise_level2`` there,
    not the drawn level).
  - ``noise`` (Poisson, from ``degradation_bsrgan_plus``, with p ``p_poisson``): quantise to 8 bits,
    ``x ~ Poisson(img·v)/v`` with v = 10^U(2, 4), per channel with p 0.5 else on the luma only.
    (The v range is as recalled from the BSRGAN file, not quoted in the reference doc.)
  - ``jpeg``: quality randint(30, 95) (PIL's encoder instead of OpenCV's).
  - ``downsample``: resize by 1/U(1, 2·sf) with a random interpolation (bilinear, bicubic, box ≈
    OpenCV's area), then back to the original size with bicubic: a same-size restoration
    pipeline (BSRGAN's SR setting, which keeps the small image, is not what PROD restores).

  - ``camera`` (BSRGAN's op 6, processed camera sensor noise): BSRGAN's ``isp_model`` is not in its
    public code; :func:`camera` follows the paper's description with Brooks et al.'s unprocessing
    pipeline (see the comment above :data:`XYZ2CAMS`).
  - :func:`bsrgan`: BSRGAN's whole ``degradation_bsrgan`` sequence (sf=4 two-stage downsample, the 7
    ops shuffled with op 2 before op 3, final JPEG, paired LR/HR crop), the SR setting that keeps
    the small image; ``pipeline=bsrgan`` uses it for PROD with the LR image upsampled back.

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
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Rng = np.random.Generator
PIPELINES = ("prod", "bsrgan")


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
    isp_shot_noise: tuple[float, float] = (1e-4, 0.012)  # camera: Brooks et al.'s shot-noise range (log-uniform)
    # BSRGAN's full sequence (``pipeline=bsrgan``, :func:`bsrgan`)
    p_isp: float = 0.25                  # op 6, camera noise
    p_jpeg: float = 0.9                  # op 5
    p_scale2: float = 0.25               # sf=4: a first ×1/2 stage, then the sequence at sf=2
    # PROD
    pipeline: str = "prod"               # prod (same-size, random subset in random order) | bsrgan
    ops: tuple[str, ...] = ("blur", "noise", "jpeg", "downsample", "rain", "haze", "lowlight", "camera")
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
        if cfg.pipeline not in PIPELINES:
            raise ValueError(f"degradation pipeline={cfg.pipeline!r}; valid: {', '.join(PIPELINES)}")
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
    return filter2d(img, k, mode="reflect")


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
        upper = cfg.noise_sigma[1] / 255.0 if sigma is None else level  # BSRGAN: L = noise_level2/255
        cov = np.abs(upper ** 2 * (q.T @ np.diag(rng.random(3)) @ q))
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


# ------------------------------------------------------------------------------------ camera ISP noise
# BSRGAN's op 6 ("processed camera sensor noise") calls an ``isp_model`` that is not in its public code
# (cszn/BSRGAN@5ce1a9c passes ``isp_model=None``). The BSRGAN paper (§3.3) describes it: sRGB -> raw by
# the reverse ISP of Brooks et al., "Unprocessing Images for Learned Raw Denoising" (CVPR 2019), noise
# added to the raw image with Brooks' shot/read model, then the forward ISP (demosaic, exposure and white
# balance, camera -> linear RGB, tone mapping, gamma) back to sRGB. The steps and constants below are
# Brooks' (google-research ``unprocessing/unprocess.py`` and ``process.py``); the forward pipeline adds the
# tone curve and the exposure gain that Brooks' ``process`` leaves out, so that without noise and without
# the Bayer mosaic the round trip is the identity (up to saturated pixels).
XYZ2CAMS = np.array([  # Brooks et al.: XYZ -> camera matrices of four cameras
    [[1.0234, -0.2969, -0.2266], [-0.5625, 1.6328, -0.0469], [-0.0703, 0.2188, 0.6406]],
    [[0.4913, -0.0541, -0.0202], [-0.613, 1.3513, 0.2906], [-0.1564, 0.2151, 0.7183]],
    [[0.838, -0.263, -0.0639], [-0.2887, 1.0725, 0.2496], [-0.0627, 0.1427, 0.5438]],
    [[0.6596, -0.2079, -0.0562], [-0.4782, 1.3016, 0.1933], [-0.097, 0.1581, 0.5181]],
])
RGB2XYZ = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                    [0.0193339, 0.1191920, 0.9503041]])  # linear sRGB (D65) -> XYZ


@dataclass
class ISPParams:
    rgb2cam: np.ndarray   # 3×3, rows sum to 1
    rgb_gain: float       # exposure (brightening) gain
    red_gain: float       # white-balance gains
    blue_gain: float
    shot_noise: float     # raw noise variance = shot·x + read
    read_noise: float


def random_isp(rng: Rng, cfg: "DegradationConfig") -> ISPParams:
    """Brooks et al.'s random metadata: a random convex mix of the 4 XYZ->camera CCMs (weights U(1e-8, 1e8)),
    rows normalised; rgb gain 1/N(0.8, 0.1); red U(1.9, 2.4), blue U(1.5, 1.9); log shot noise
    U(log ``isp_shot_noise``) and log read = 2.18·log shot + 1.20 + N(0, 0.26)."""
    w = rng.uniform(1e-8, 1e8, (len(XYZ2CAMS), 1, 1))
    rgb2cam = (XYZ2CAMS * w).sum(0) / w.sum() @ RGB2XYZ
    rgb2cam = rgb2cam / rgb2cam.sum(-1, keepdims=True)
    rgb_gain = 1.0 / rng.normal(0.8, 0.1)
    red, blue = rng.uniform(1.9, 2.4), rng.uniform(1.5, 1.9)
    log_shot = rng.uniform(np.log(cfg.isp_shot_noise[0]), np.log(cfg.isp_shot_noise[1]))
    log_read = 2.18 * log_shot + 1.20 + rng.normal(0.0, 0.26)
    return ISPParams(rgb2cam, float(rgb_gain), float(red), float(blue), float(np.exp(log_shot)), float(np.exp(log_read)))


def _wb_gains(p: ISPParams) -> np.ndarray:
    return np.array([p.red_gain, 1.0, p.blue_gain]) * p.rgb_gain


def unprocess(img: np.ndarray, p: ISPParams) -> np.ndarray:
    """sRGB -> linear camera RGB (before the mosaic): inverse smoothstep tone curve, gamma 2.2 expansion,
    RGB -> camera CCM, then the gains inverted, kept near 1 for near-white pixels (Brooks' ``safe_invert_gains``)."""
    x = np.clip(img, 0.0, 1.0)
    x = 0.5 - np.sin(np.arcsin(1.0 - 2.0 * x) / 3.0)       # inverse of the smoothstep 3x² − 2x³
    x = np.maximum(x, 1e-8) ** 2.2
    x = x @ p.rgb2cam.T
    gains = 1.0 / _wb_gains(p)
    gray = x.mean(-1, keepdims=True)
    mask = (np.maximum(gray - 0.9, 0.0) / 0.1) ** 2
    return np.clip(x * np.maximum(mask + (1 - mask) * gains, gains), 0.0, 1.0)


def process(raw_rgb: np.ndarray, p: ISPParams) -> np.ndarray:
    """Linear camera RGB -> sRGB: gains, camera -> RGB (the inverse CCM), gamma 1/2.2, smoothstep tone curve."""
    x = np.clip(raw_rgb * _wb_gains(p), 0.0, 1.0)
    x = np.clip(x @ np.linalg.inv(p.rgb2cam).T, 0.0, 1.0)
    x = np.maximum(x, 1e-8) ** (1 / 2.2)
    return x * x * (3.0 - 2.0 * x)


BAYER = np.array([[0, 1], [1, 2]])  # RGGB: the channel each site of a 2×2 cell records


def mosaic(x: np.ndarray) -> np.ndarray:
    """An H×W RGGB Bayer image (one value per pixel) from H×W×3."""
    h, w, _ = x.shape
    idx = np.tile(BAYER, ((h + 1) // 2, (w + 1) // 2))[:h, :w]
    return np.take_along_axis(x, idx[..., None], -1)[..., 0]


def demosaic(bayer: np.ndarray) -> np.ndarray:
    """Bilinear demosaicing of an RGGB image (the interpolation Brooks' ``process.demosaic`` does):
    each channel's samples are spread by the bilinear kernels (R/B: [1 2 1]ᵀ[1 2 1]/4, G: the cross /4)."""
    h, w = bayer.shape
    idx = np.tile(BAYER, ((h + 1) // 2, (w + 1) // 2))[:h, :w]
    planes = np.stack([bayer * (idx == c) for c in range(3)], -1).astype(np.float32)
    k_rb = np.outer([1, 2, 1], [1, 2, 1]).astype(np.float32) / 4
    k_g = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], np.float32) / 4
    # numpy 'reflect' keeps the Bayer parity at the borders (row −1 mirrors row 1)
    out = [filter2d(planes[..., c:c + 1], k_g if c == 1 else k_rb, mode="reflect")[..., 0] for c in range(3)]
    return np.stack(out, -1)


def add_raw_noise(raw: np.ndarray, rng: Rng, shot: float, read: float) -> np.ndarray:
    """Brooks' heteroscedastic raw noise: ``x + N(0, shot·x + read)`` (variance grows with the signal)."""
    return raw + rng.normal(size=raw.shape) * np.sqrt(np.maximum(raw * shot + read, 0.0))


def camera(img: np.ndarray, rng: Rng, cfg: "DegradationConfig", params: ISPParams | None = None,
           use_mosaic: bool = True) -> np.ndarray:
    """BSRGAN op 6, processed camera sensor noise: reverse ISP, RGGB mosaic, raw shot+read noise,
    bilinear demosaic, forward ISP (see the comment above :data:`XYZ2CAMS`)."""
    p = params or random_isp(rng, cfg)
    raw = unprocess(np.asarray(img, np.float64), p)
    if use_mosaic:
        noisy = demosaic(add_raw_noise(mosaic(raw), rng, p.shot_noise, p.read_noise))
    else:
        noisy = add_raw_noise(raw, rng, p.shot_noise, p.read_noise)
    return np.clip(process(noisy, p), 0.0, 1.0).astype(np.float32)


OPS: dict[str, Callable[[np.ndarray, Rng, DegradationConfig], np.ndarray]] = {
    "blur": blur, "noise": noise, "jpeg": jpeg, "downsample": downsample,
    "rain": rain, "haze": haze, "lowlight": lowlight, "camera": camera,
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


# ------------------------------------------------------------------------------------ resizing and BSRGAN
def resize(img: np.ndarray, size: tuple[int, int], interp: int = Image.BICUBIC) -> np.ndarray:
    """``img`` resized to ``size`` = (width, height) per channel in float (PIL mode ``F``, no 8-bit rounding).

    PIL's bicubic is Keys' cubic with a = −0.5 and, when shrinking, a support widened by the factor
    (antialiasing): MATLAB ``imresize``'s kernel, the SR benchmarks' "bicubic". Borders differ slightly
    (PIL renormalises the weights, MATLAB mirrors the image)."""
    w, h = int(size[0]), int(size[1])
    if w < 1 or h < 1:
        raise ValueError(f"cannot resize a {img.shape[1]}x{img.shape[0]} image to {w}x{h}")
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], np.float32), mode="F").resize((w, h), interp))
             for c in range(img.shape[-1])]
    return np.stack(chans, -1).astype(np.float32)


def shift_kernel(k: np.ndarray, sf: int) -> np.ndarray:
    """BSRGAN's ``shift_pixel``: the kernel resampled (bilinearly, clamped at the edges) at ``x + (sf−1)/2``,
    so that nearest subsampling by ``sf`` is centred; renormalised to sum 1."""
    s = (sf - 1) * 0.5
    h, w = k.shape

    def axis(n):
        t = np.clip(np.arange(n) + s, 0, n - 1)
        i0 = np.floor(t).astype(int)
        return i0, np.minimum(i0 + 1, n - 1), t - i0

    y0, y1, wy = axis(h)
    x0, x1, wx = axis(w)
    out = (k[y0][:, x0] * np.outer(1 - wy, 1 - wx) + k[y0][:, x1] * np.outer(1 - wy, wx)
           + k[y1][:, x0] * np.outer(wy, 1 - wx) + k[y1][:, x1] * np.outer(wy, wx))
    return (out / out.sum()).astype(np.float32)


def _random_resize(img: np.ndarray, size: tuple[int, int], rng: Rng) -> np.ndarray:
    # BSRGAN: cv2.resize with a random one of INTER_LINEAR / CUBIC / AREA; PIL's bilinear / bicubic / box here
    return np.clip(resize(img, size, INTERP[int(rng.integers(len(INTERP)))]), 0.0, 1.0)


@dataclass
class BSRGANResult:
    lq: np.ndarray                 # the low-quality image, 1/sf of the (mod-cropped) input
    hq: np.ndarray                 # the high-quality target (mod-cropped input, or its paired crop)
    ops: list[str] = field(default_factory=list)  # the operations that ran, in order


BSRGAN_OPS = ("blur", "blur", "downsample", "resize", "noise", "jpeg", "camera")


def bsrgan(img: np.ndarray, rng: Rng | int, cfg: DegradationConfig | None = None, sf: int = 4,
           lq_patchsize: int | None = None) -> BSRGANResult:
    """BSRGAN's degradation (``degradation_bsrgan`` of cszn/BSRGAN@5ce1a9c ``utils/utils_blindsr.py``):

    1. mod-crop to a multiple of ``sf``; for ``sf=4``, with p ``p_scale2`` (0.25) a first ×1/2 stage
       (a random interpolation with p 0.5, else bicubic) and the rest at sf = 2;
    2. a random permutation of the 7 operations with "downsample" (2) moved before "resize" (3) when
       it comes after it: 0, 1 blur (``blur`` at the current sf), 2 random downsample (p 0.75: by
       1/U(1, 2·sf) with a random interpolation; else a Gaussian kernel of size 25, σ U(0.1, 0.6·sf),
       shifted by (sf−1)/2 px, then nearest subsampling by sf), 3 resize to 1/sf of the image before
       op 2, 4 Gaussian noise, 5 JPEG with p ``p_jpeg`` (0.9), 6 camera-ISP noise with p ``p_isp`` (0.25);
    3. a final JPEG, then (``lq_patchsize``) a paired random crop: ``lq_patchsize`` px of the LQ image
       and the aligned ``lq_patchsize·sf`` px of the HQ one.

    One difference: BSRGAN's ISP model also returns a processed HQ image; ours leaves the HQ image as
    is (without noise and mosaic our ISP round trip is the identity, see :func:`camera`).
    """
    cfg = cfg or DegradationConfig()
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    sf = int(sf)
    if sf < 1:
        raise ValueError(f"bsrgan: sf={sf} must be a positive integer")
    h1, w1 = img.shape[:2]
    img = np.asarray(img, np.float32)[:h1 - h1 % sf, :w1 - w1 % sf]
    h, w = img.shape[:2]
    if lq_patchsize and (h < lq_patchsize * sf or w < lq_patchsize * sf):
        raise ValueError(f"bsrgan: a {w1}x{h1} image is smaller than lq_patchsize*sf = {lq_patchsize * sf}")
    hq, ran = img.copy(), []
    cur = sf
    if sf == 4 and rng.random() < cfg.p_scale2:
        size = (w // 2, h // 2)
        img = _random_resize(img, size, rng) if rng.random() < 0.5 else np.clip(resize(img, size), 0.0, 1.0)
        cur, ran = 2, ["scale2"]
    at = replace(cfg, sf=float(cur))
    order = [int(i) for i in rng.permutation(7)]
    i2, i3 = order.index(2), order.index(3)
    if i2 > i3:
        order[i2], order[i3] = order[i3], order[i2]
    a, b = img.shape[1], img.shape[0]
    for i in order:
        if i in (0, 1):
            img = blur(img, rng, at)
        elif i == 2:
            a, b = img.shape[1], img.shape[0]
            if rng.random() < 0.75:
                f = rng.uniform(1.0, 2.0 * cur)
                img = _random_resize(img, (max(1, int(a / f)), max(1, int(b / f))), rng)
            else:
                k = shift_kernel(gaussian_kernel(25, rng.uniform(0.1, 0.6 * cur)), cur)
                img = np.clip(filter2d(img, k, mode="reflect")[::cur, ::cur], 0.0, 1.0)
        elif i == 3:
            img = _random_resize(img, (max(1, int(a / cur)), max(1, int(b / cur))), rng)
        elif i == 4:
            img = gaussian_noise(img, rng, at)
        elif i == 5:
            if rng.random() >= cfg.p_jpeg:
                continue
            img = jpeg(img, rng, at)
        elif i == 6:
            if rng.random() >= cfg.p_isp:
                continue
            img = camera(img, rng, at)
        ran.append(BSRGAN_OPS[i])
    img = jpeg(img, rng, at)
    ran.append("jpeg")
    if lq_patchsize:
        y = int(rng.integers(0, img.shape[0] - lq_patchsize + 1))
        x = int(rng.integers(0, img.shape[1] - lq_patchsize + 1))
        img = img[y:y + lq_patchsize, x:x + lq_patchsize]
        hq = hq[y * sf:(y + lq_patchsize) * sf, x * sf:(x + lq_patchsize) * sf]
    return BSRGANResult(img.astype(np.float32), hq, ran)


# ------------------------------------------------------------------------------------ conversions
def to_pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8))


def from_pil(pil: Image.Image) -> np.ndarray:
    return np.asarray(pil.convert("RGB"), np.float32) / 255.0
