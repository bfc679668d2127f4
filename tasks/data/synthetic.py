"""Procedurally generated VTAB-structured tasks, so the project runs with no downloads.

Downstream tasks mirror VTAB-1k's Structured group, with VTAB's class counts:

* ``dsprites_loc`` (16 classes): horizontal position of a white sprite (square, ellipse or arrow),
* ``dsprites_ori`` (16 classes): orientation of a white arrow,
* ``clevr_count`` (8 classes): number of objects in a pseudo-3D scene (3..10),
* ``clevr_dist`` (6 classes): depth of the closest object (near objects sit lower and larger).

They are written once, with fixed seeds, in the VTAB-1k file-list layout
(``<root>/<task>/{train800,val200,train800val200,test}.txt``, lines ``images/... label``) and read
by the same DataModule as real VTAB data.

The upstream task ``shapes`` (12 classes: shape × colour of the largest object on a textured
background) is different on purpose: it pretrains the demo ViT, rendered on the fly
(:class:`RenderedDataset`), so that downstream adaptation has something worth adapting.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tasks.data.staging import staging_dir

RES = 32  # rendered image size (pixels); supersampled 2x for anti-aliasing
SS = 2
SPLITS = {"train800val200": 1000, "test": 500}


def _grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32)
    return (xx + 0.5) / res, (yy + 0.5) / res


_X, _Y = _grid(RES * SS)


def shape_mask(kind: str, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    """Boolean mask of a shape centred at (cx, cy) (fractions of the image), rotated by ``angle``."""
    dx, dy = _X - cx, _Y - cy
    c, s = math.cos(angle), math.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) < size * 0.85
    if kind == "ellipse":
        return (u / size) ** 2 + (v / (0.55 * size)) ** 2 < 1
    if kind == "circle":
        return (u / size) ** 2 + (v / size) ** 2 < 1
    if kind == "arrow":  # isosceles triangle pointing along +u: no rotational symmetry
        t = (u + size) / (2 * size)
        return (t >= 0) & (t <= 1) & (np.abs(v) < 0.55 * size * (1 - t))
    raise ValueError(kind)


def _finish(img: np.ndarray) -> np.ndarray:
    """Downsample the supersampled float image to uint8 RGB."""
    img = img.reshape(RES, SS, RES, SS, 3).mean(axis=(1, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _paint(img: np.ndarray, mask: np.ndarray, colour) -> None:
    img[mask] = colour


def render_dsprites(rng: np.random.Generator, task: str) -> tuple[np.ndarray, int]:
    kind = "arrow" if task == "dsprites_ori" else ["square", "ellipse", "arrow"][rng.integers(3)]
    label = int(rng.integers(16))
    size = rng.uniform(0.09, 0.15)
    x, y = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85)
    angle = rng.uniform(0, 2 * math.pi)
    if task == "dsprites_loc":
        x = 0.15 + (label + rng.uniform()) * 0.7 / 16
    else:
        angle = (label + rng.uniform()) * 2 * math.pi / 16
    img = np.zeros((RES * SS, RES * SS, 3), np.float32)
    _paint(img, shape_mask(kind, x, y, size, angle), (1.0, 1.0, 1.0))
    return _finish(img), label


COLOURS = np.array([(0.9, 0.2, 0.2), (0.2, 0.8, 0.3), (0.25, 0.35, 0.95), (0.95, 0.85, 0.2),
                    (0.8, 0.3, 0.9), (0.2, 0.85, 0.9), (0.95, 0.55, 0.15), (0.6, 0.6, 0.6)], np.float32)


def render_clevr(rng: np.random.Generator, task: str) -> tuple[np.ndarray, int]:
    if task == "clevr_count":
        label = int(rng.integers(8))
        n = label + 3
        depths = rng.uniform(0, 1, n)
    else:  # clevr_dist: depth of the closest object, 6 bins
        label = int(rng.integers(6))
        n = int(rng.integers(3, 8))
        dmin = (label + rng.uniform()) / 6
        depths = np.concatenate([[dmin], rng.uniform(dmin, 1, n - 1) if dmin < 1 else np.ones(n - 1)])
    img = np.empty((RES * SS, RES * SS, 3), np.float32)
    img[:] = (0.45 + 0.25 * _Y)[..., None]  # floor shading
    for d in np.sort(depths)[::-1]:  # far to near (painter's algorithm)
        size = 0.04 + 0.06 * (1 - d)
        y = 0.35 + 0.55 * (1 - d)
        x = rng.uniform(0.08, 0.92)
        kind = ["circle", "square"][rng.integers(2)]
        _paint(img, shape_mask(kind, x, y, size, rng.uniform(0, math.pi / 2)), COLOURS[rng.integers(8)])
    return _finish(img), label


UPSTREAM_SHAPES = ("circle", "square", "arrow")


def render_shapes(rng: np.random.Generator, task: str = "shapes") -> tuple[np.ndarray, int]:
    """Upstream task: shape × colour (3 × 4 = 12 classes) of the largest of 1-3 objects."""
    low = rng.uniform(0.0, 0.5, (4, 4, 3)).astype(np.float32)
    img = np.kron(low, np.ones((RES * SS // 4, RES * SS // 4, 1), np.float32))  # blocky texture
    n = int(rng.integers(1, 4))
    sizes = np.sort(rng.uniform(0.07, 0.2, n))  # largest painted last
    label = 0
    for size in sizes:
        k, c = int(rng.integers(3)), int(rng.integers(4))
        x, y = rng.uniform(0.2, 0.8, 2)
        _paint(img, shape_mask(UPSTREAM_SHAPES[k], x, y, size, rng.uniform(0, 2 * math.pi)), COLOURS[c])
        label = k * 4 + c
    return _finish(img), label


RENDERERS: dict[str, tuple[Callable, int]] = {
    "dsprites_loc": (render_dsprites, 16),
    "dsprites_ori": (render_dsprites, 16),
    "clevr_count": (render_clevr, 8),
    "clevr_dist": (render_clevr, 6),
    "shapes": (render_shapes, 12),
}
SEEDS = {"dsprites_loc": 11, "dsprites_ori": 12, "clevr_count": 13, "clevr_dist": 14, "shapes": 15}
DOWNSTREAM = ("dsprites_loc", "dsprites_ori", "clevr_count", "clevr_dist")


def render(task: str, index: int, split: str = "train") -> tuple[np.ndarray, int]:
    """Image ``index`` of ``task``/``split``: deterministic, independent of everything else."""
    fn, _ = RENDERERS[task]
    rng = np.random.default_rng([SEEDS[task], {"train": 0, "test": 1}[split], index])
    return fn(rng, task)


def write_task(root: str | os.PathLike, task: str) -> Path:
    """Write ``task`` in the VTAB-1k layout under ``root/task`` (atomically) and return the folder."""
    root = Path(root)
    final = root / task
    if (final / "test.txt").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(root, f".{task}-")
    try:
        lists: dict[str, list[str]] = {}
        for split, n in SPLITS.items():
            (tmp / "images" / split).mkdir(parents=True)
            lines = []
            for i in range(n):
                img, label = render(task, i, "test" if split == "test" else "train")
                rel = f"images/{split}/{i:06d}.png"
                Image.fromarray(img).save(tmp / rel)
                lines.append(f"{rel} {label}")
            lists[split] = lines
        lists["train800"] = lists["train800val200"][:800]
        lists["val200"] = lists["train800val200"][800:]
        for name, lines in lists.items():
            (tmp / f"{name}.txt").write_text("\n".join(lines) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class RenderedDataset(Dataset):
    """``n`` images of ``task`` rendered on the fly (for upstream pretraining: no files)."""

    def __init__(self, task: str, n: int, split: str = "train", transform: Callable | None = None):
        if task not in RENDERERS:
            raise ValueError(f"unknown synthetic task {task!r}; valid: {', '.join(RENDERERS)}")
        self.task, self.n, self.split, self.transform = task, n, split, transform
        self.num_classes = RENDERERS[task][1]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        img, label = render(self.task, i, self.split)
        x = Image.fromarray(img)
        return (self.transform(x) if self.transform else x), label


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="write the embedded VTAB-layout tasks")
    p.add_argument("--root", default="data/synthetic")
    p.add_argument("--tasks", nargs="*", default=list(DOWNSTREAM))
    a = p.parse_args()
    for t in a.tasks:
        print(write_task(a.root, t))
