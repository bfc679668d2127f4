"""Clean procedural images (gradients, textures, shapes) for the embedded restoration data.

Each image is a deterministic function of its seed: a colour gradient (linear or radial)
background, one texture layer blended in (sinusoidal grating, checkerboard or smooth 1/f-like
noise), then 3–8 filled shapes (ellipses, rectangles, polygons, lines) with random colours. This
gives what restoration needs to be measurable: flat regions (noise shows), sharp edges (blur and
JPEG show) and fine periodic detail (downsampling shows). No external images are used (the
scikit-image / imageio sample images are not bundled: neither package is a dependency here).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def _gradient(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    c0, c1 = rng.random(3), rng.random(3)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    if rng.random() < 0.5:
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * xx + np.sin(a) * yy
    else:
        cy, cx = rng.random(2)
        t = np.hypot(xx - cx, yy - cy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return c0 + (c1 - c0) * t[..., None]


def _texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    kind = rng.integers(3)
    if kind == 0:  # grating
        f, a = rng.uniform(0.05, 0.35), rng.uniform(0, np.pi)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * f * (np.cos(a) * xx + np.sin(a) * yy))
    elif kind == 1:  # checkerboard
        s = int(rng.integers(3, 12))
        t = ((xx // s + yy // s) % 2).astype(np.float64)
    else:  # 1/f-like noise: sum of upsampled random grids
        t = np.zeros((h, w))
        for octave in range(1, 5):
            n = 2 ** (octave + 1)
            g = Image.fromarray((rng.random((n, n)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
            t += np.asarray(g, np.float64) / 255.0 / octave
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return t[..., None] * rng.random(3) + (1 - t[..., None]) * rng.random(3)


def clean_image(seed: int, size: int | tuple[int, int] = 64) -> np.ndarray:
    """A float32 ``H×W×3`` image in [0, 1], determined by ``seed``."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    base = _gradient(h, w, rng)
    alpha = rng.uniform(0.2, 0.7)
    base = (1 - alpha) * base + alpha * _texture(h, w, rng)
    pil = Image.fromarray(np.clip(base * 255, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(3, 9))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(4, max(5, w // 2)), y0 + rng.integers(4, max(5, h // 2))
        kind = rng.integers(4)
        if kind == 0:
            draw.ellipse([int(x0), int(y0), int(x1), int(y1)], fill=colour)
        elif kind == 1:
            draw.rectangle([int(x0), int(y0), int(x1), int(y1)], fill=colour)
        elif kind == 2:
            pts = [(int(x), int(y)) for x, y in zip(rng.integers(0, w, 5), rng.integers(0, h, 5))]
            draw.polygon(pts, fill=colour)
        else:
            draw.line([int(x0), int(y0), int(x1), int(y1)], fill=colour, width=int(rng.integers(1, 4)))
    return np.asarray(pil, np.float32) / 255.0
