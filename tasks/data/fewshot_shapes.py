"""The embedded few-shot datasets: rendered coloured shapes with real class names, in CoOp's layout.

* ``Shapes`` (24 classes, "red circle", "blue star", ...: 6 colours × 4 forms; base/new = 12/12):
  16 train, 4 val, 10 test images per class;
* ``ShapesGrainy``: the same 24 classes as grainy photos under warm light (:func:`render` with
  ``shift=DOMAIN``), a domain shift from the pretraining renderer; 16 train, 4 val, 40 test per class;
* ``ShapeColors`` (6 classes, "red", ...; template "a photo of a {} shape.") and ``ShapeForms``
  (4 classes, "circle", ...): held-out sets for zero-shot retention.

Each is written once (fixed seeds) as ``<root>/<folder>/images/*.png`` + ``split_zhou_<Name>.json``,
read by the same code as the real CoOp datasets. :func:`render` also feeds the tiny CLIP's
pretraining (``tasks/pretrain/clip.py``) with captioned images.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tasks.data.staging import staging_dir

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 220, 50),
          "purple": (150, 60, 200), "orange": (245, 140, 30)}
FORMS = ("circle", "square", "triangle", "star")
RES = 32
SIZES = {"Shapes": (16, 4, 10), "ShapeColors": (8, 4, 12), "ShapeForms": (8, 4, 16), "ShapesGrainy": (16, 4, 40)}
FOLDERS = {"Shapes": "shapes", "ShapeColors": "shape_colors", "ShapeForms": "shape_forms",
           "ShapesGrainy": "shapes_grainy"}
SEEDS = {"Shapes": 10, "ShapeColors": 11, "ShapeForms": 12, "ShapesGrainy": 13}


def _polygon(form: str, cx: float, cy: float, r: float, a: float) -> list[tuple[float, float]]:
    if form == "square":
        pts = [(a + math.pi / 4 + k * math.pi / 2, r) for k in range(4)]
    elif form == "triangle":
        pts = [(a + k * 2 * math.pi / 3, r * 1.15) for k in range(3)]
    else:  # star: 5 points
        pts = [(a + k * math.pi / 5, r * 1.2 if k % 2 == 0 else r * 0.5) for k in range(10)]
    return [(cx + rr * math.cos(t), cy + rr * math.sin(t)) for t, rr in pts]


# Components of a domain shift from :func:`render` (``render(..., shift=...)``); ``python -m
# tasks.pretrain.clip_shift`` measures what each does to the tiny CLIP (tabled in the README). ``ShapesGrainy``
# (the quickstart's downstream set) uses DOMAIN: warm, dim light and sensor noise -- zero-shot drops,
# 16 shots recover much of it.
SHIFT = ("outline", "texture", "small", "blur", "noise", "cast")
DOMAIN = ("cast", "noise")
NOISE_STD = 12.0  # σ of the additive pixel noise, in 0-255 units
# warm, dim light (an old photo): red and orange, yellow and orange, blue and purple move closer
CAST = np.array([1.1, 0.9, 0.55], dtype=np.float32)


def _texture(rng: np.random.Generator, n: int) -> np.ndarray:
    """A light, low-saturation striped background (pretraining backgrounds are dark, flat grey)."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    t = rng.uniform(0, math.pi)
    period = rng.uniform(0.15, 0.35) * n
    wave = np.sin(2 * math.pi * (xx * math.cos(t) + yy * math.sin(t)) / period + rng.uniform(0, 2 * math.pi))
    tint = rng.uniform(150, 215) + rng.normal(0, 12, 3)            # light paper, slightly tinted
    img = tint[None, None, :] + 25 * wave[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def render(color: str, form: str, rng: np.random.Generator, res: int = RES, shift: tuple[str, ...] = ()) -> Image.Image:
    """One ``color`` ``form`` on a noisy grey background (random position, size, rotation, tint): the
    pretraining renderer. ``shift`` draws it unlike that (any subset of :data:`SHIFT`): ``outline`` (a
    coloured contour, no fill), ``texture`` (light striped background), ``small`` (half the radius),
    ``blur`` (Gaussian blur), ``noise`` (additive Gaussian pixel noise, σ :data:`NOISE_STD`), ``cast`` (a
    warm colour cast, :data:`CAST`); ``ShapesGrainy`` uses :data:`DOMAIN`."""
    unknown = set(shift) - set(SHIFT)
    if unknown:
        raise ValueError(f"unknown shift components {sorted(unknown)}; valid: {', '.join(SHIFT)}")
    ss = 4
    n = res * ss
    if "texture" in shift:
        img = Image.fromarray(_texture(rng, res)).resize((n, n), Image.BILINEAR)
    else:
        bg = rng.uniform(40, 110)
        base = np.clip(bg + rng.normal(0, 12, (res, res, 1)), 0, 255).repeat(3, 2).astype(np.uint8)
        img = Image.fromarray(base).resize((n, n), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.12, 0.2) * n if "small" in shift else rng.uniform(0.22, 0.36) * n
    m = r * 1.2 if shift else r  # shifted renderings keep a margin (outlines stay inside the frame)
    cx, cy = rng.uniform(m, n - m), rng.uniform(m, n - m)
    rgb = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255)) for c in COLORS[color])
    width = int(rng.integers(ss * 1, ss * 2 + 1)) if "outline" in shift else 0
    style = dict(outline=rgb, width=width) if width else dict(fill=rgb)
    if form == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], **style)
    else:
        pts = _polygon(form, cx, cy, r, rng.uniform(0, 2 * math.pi))
        if width:  # a closed polyline with round joints: the contour of the filled polygon
            draw.line(pts + pts[:1], fill=rgb, width=width, joint="curve")
        else:
            draw.polygon(pts, fill=rgb)
    img = img.resize((res, res), Image.LANCZOS)
    if "blur" in shift:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 0.9)))
    if "cast" not in shift and "noise" not in shift:
        return img
    arr = np.asarray(img).astype(np.float32)
    if "cast" in shift:
        arr = arr * CAST + 20
    if "noise" in shift:
        arr = arr + rng.normal(0, NOISE_STD, (res, res, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _classes(name: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """``[(class name, [(colour, form) choices])]``."""
    if name in ("Shapes", "ShapesGrainy"):
        return [(f"{c} {f}", [(c, f)]) for c in COLORS for f in FORMS]
    if name == "ShapeColors":
        return [(c, [(c, f) for f in FORMS]) for c in COLORS]
    return [(f, [(c, f) for c in COLORS]) for f in FORMS]


def write_dataset(root: str | Path, name: str) -> Path:
    """Render ``name`` into ``root/<folder>`` atomically (a temp folder, then a rename)."""
    root = Path(root)
    final = root / FOLDERS[name]
    root.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(root, f".{FOLDERS[name]}-")
    (tmp / "images").mkdir()
    rng = np.random.default_rng(SEEDS[name])
    shift = DOMAIN if name == "ShapesGrainy" else ()
    split = {"train": [], "val": [], "test": []}
    for label, (cname, choices) in enumerate(_classes(name)):
        for s, n in zip(("train", "val", "test"), SIZES[name]):
            for i in range(n):
                c, f = choices[rng.integers(len(choices))]
                rel = f"{cname.replace(' ', '_')}_{s}_{i}.png"
                render(c, f, rng, shift=shift).save(tmp / "images" / rel)
                split[s].append([rel, label, cname])
    (tmp / f"split_zhou_{name}.json").write_text(json.dumps(split))
    try:
        os.replace(tmp, final)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_shapes(root: str | Path) -> None:
    """Write the four embedded datasets under ``root`` if they are missing."""
    for name, folder in FOLDERS.items():
        if not (Path(root) / folder / f"split_zhou_{name}.json").is_file():
            write_dataset(root, name)
