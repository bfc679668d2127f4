"""Generated "medical-like" segmentation data, written in the real layouts (offline tests and demos).

Each image is a smooth textured background (low-pass noise + vignette, like a CT/endoscopy field)
with K structures: class 1 a vessel-like tree of thin curves (as in DRIVE), classes >= 2 organ-like
blobs (ellipses with a noisy boundary and their own intensity and texture); then blur and noise.
``style="texture"`` (the quickstart's downstream task) instead draws organ blobs that differ from
the background only by their *texture* (oriented stripes, one orientation per class), at the
background's own mean intensity: a tiny SAM pretrained on the intensity-defined structures of the
default style has not learned to look for that, so the task needs the encoder to adapt.

Nothing here is real patient data; it only has the *shape* of the real layouts.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tasks.data.segmentation_layouts import DEFAULT_PALETTE, save_mask_png


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: coarse random grid upsampled bilinearly."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.random((1, 1, *[max(2, s // scale) for s in shape]), dtype=np.float32))
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(coarse, size=shape, mode=mode, align_corners=False)[0, 0].numpy()


def _blur(a: np.ndarray, k: int = 3) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(a.astype(np.float32))[None, None]
    return F.avg_pool2d(F.pad(t, (k // 2,) * 4, mode="replicate"), k, stride=1)[0, 0].numpy()


STYLES = ("intensity", "texture")


def medical_sample(rng: np.random.Generator, size: int, num_classes: int, vessels: bool = True,
                   style: str = "intensity"):
    """``(image (H, W, 3) float in [0, 1], mask (H, W) int)``."""
    if style not in STYLES:
        raise ValueError(f"unknown generated-data style {style!r}; valid: {', '.join(STYLES)}")
    if style == "texture":
        return texture_sample(rng, size, num_classes)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    bg = 0.25 + 0.35 * _smooth_noise(rng, (size, size), 8) - 0.2 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    mask = np.zeros((size, size), dtype=np.int64)
    img = bg.copy()
    first_blob = 1
    if vessels and num_classes >= 2:
        first_blob = 2
        for _ in range(rng.integers(2, 4)):  # a few random-walk vessels
            p = rng.random(2) * size
            ang = rng.random() * 2 * np.pi
            for _ in range(size * 2):
                ang += rng.normal(0, 0.25)
                p = p + np.array([np.cos(ang), np.sin(ang)])
                y, x = int(p[0]), int(p[1])
                if not (0 <= y < size and 0 <= x < size):
                    break
                mask[max(0, y - 0):y + 1, max(0, x - 1):x + 1] = 1
        img[mask == 1] = img[mask == 1] * 0.4 + 0.05
    for k in range(first_blob, num_classes + 1):
        if rng.random() < 0.15:
            continue  # a class is sometimes absent (empty-mask cases)
        cy, cx = rng.uniform(0.2, 0.8, 2)
        ry, rx = rng.uniform(0.08, 0.22, 2)
        wobble = 0.25 * (_smooth_noise(rng, (size, size), 6) - 0.5)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1 + wobble
        mask[inside] = k
        level = 0.45 + 0.5 * (k - first_blob + 1) / max(1, num_classes - first_blob + 1)
        tex = 0.1 * _smooth_noise(rng, (size, size), 3)
        img[inside] = level + tex[inside]
    img = _blur(img) + rng.normal(0, 0.03, img.shape).astype(np.float32)
    tint = np.array([1.0, 0.85, 0.8], dtype=np.float32)
    return np.clip(img[..., None] * tint, 0, 1), mask


def texture_sample(rng: np.random.Generator, size: int, num_classes: int, period: float = 8.0,
                   amplitude: float = 0.18):
    """Organ blobs defined by texture alone: class k is filled with stripes of orientation
    ``k·180°/K`` (period ``period`` px, random phase) around the local background level, so the
    mean intensity inside and outside a blob is the same. Blobs may overlap (later ones on top)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    bg = 0.35 + 0.3 * _smooth_noise(rng, (size, size), 8) - 0.2 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    img, mask = bg.copy(), np.zeros((size, size), dtype=np.int64)
    py, px = np.mgrid[0:size, 0:size].astype(np.float32)
    for k in range(1, num_classes + 1):
        if rng.random() < 0.15:
            continue
        cy, cx = rng.uniform(0.25, 0.75, 2)
        ry, rx = rng.uniform(0.12, 0.25, 2)
        wobble = 0.25 * (_smooth_noise(rng, (size, size), 6) - 0.5)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1 + wobble
        ang = np.pi * (k - 1) / num_classes + rng.normal(0, 0.1)
        wave = np.sin(2 * np.pi * (px * np.cos(ang) + py * np.sin(ang)) / period + rng.random() * 2 * np.pi)
        mask[inside] = k
        img[inside] = bg[inside] + amplitude * wave[inside]
    img = img + rng.normal(0, 0.03, img.shape).astype(np.float32)
    tint = np.array([1.0, 0.85, 0.8], dtype=np.float32)
    return np.clip(img[..., None] * tint, 0, 1), mask


def _save_rgb(path: Path, image: np.ndarray, fmt: str | None = None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray((image * 255).astype(np.uint8)).save(tmp, format=fmt or path.suffix[1:].upper().replace("JPG", "JPEG").replace("TIF", "TIFF"))
    os.replace(tmp, path)


def make_folder_dataset(root: str | os.PathLike, layout: str = "folder", n: int = 24, size: int = 64,
                        num_classes: int = 3, mask_format: str = "index", seed: int = 0,
                        splits: dict[str, int] | None = None, style: str = "intensity") -> Path:
    """Write a generated dataset in ``layout`` (folder | kvasir | isic | drive) under ``root``.

    ``folder``: ``splits`` (e.g. ``{"train": 16, "val": 8}``) makes ``root/<split>/{images,masks}``;
    without it, one flat ``root/{images,masks}`` of ``n``. ``mask_format=color`` writes RGB masks with
    :data:`DEFAULT_PALETTE` colours. kvasir / isic / drive are binary (one foreground class).
    ``style``: see :func:`medical_sample` (``folder`` only).
    """
    from PIL import Image

    root = Path(root)
    if style != "intensity" and layout != "folder":  # the other layouts draw their own kind of sample
        raise ValueError(f"generated-data style={style!r} applies to layout=folder only (got layout={layout!r})")
    rng = np.random.default_rng(seed)
    if layout == "folder":
        for split, count in (splits or {"": n}).items():
            base = root / split if split else root
            for i in range(count):
                img, mask = medical_sample(rng, size, num_classes, style=style)
                _save_rgb(base / "images" / f"img_{i:03d}.png", img)
                if mask_format == "color":
                    _save_rgb(base / "masks" / f"img_{i:03d}.png",
                              np.array(DEFAULT_PALETTE, dtype=np.float32)[mask] / 255.0)
                else:
                    save_mask_png(base / "masks" / f"img_{i:03d}.png", mask)
        return root
    for split, count in (splits or {"train": n}).items():
        for i in range(count):
            img, mask = medical_sample(rng, size, 1 if layout != "drive" else 2, vessels=layout == "drive")
            fg = ((mask > 0) * 255).astype(np.uint8)
            if layout == "kvasir":
                _save_rgb(root / "images" / f"cju{i:04d}.jpg", img)
                (root / "masks").mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.repeat(fg[..., None], 3, -1)).save(root / "masks" / f"cju{i:04d}.jpg", quality=95)
            elif layout == "isic":
                s = {"train": "Training", "val": "Validation", "test": "Test"}[split]
                _save_rgb(root / f"ISIC2018_Task1-2_{s}_Input" / f"ISIC_{i:07d}.jpg", img)
                out = root / f"ISIC2018_Task1_{s}_GroundTruth"
                out.mkdir(parents=True, exist_ok=True)
                Image.fromarray(fg).save(out / f"ISIC_{i:07d}_segmentation.png")
            elif layout == "drive":
                s = {"train": "training", "test": "test"}[split]
                _save_rgb(root / s / "images" / f"{i + 21:02d}_{s}.tif", img)
                out = root / s / "1st_manual"
                out.mkdir(parents=True, exist_ok=True)
                Image.fromarray(((mask == 1) * 255).astype(np.uint8)).save(out / f"{i + 21:02d}_manual1.gif")
            else:
                raise ValueError(f"unknown layout {layout!r}; valid: folder, kvasir, isic, drive")
    return root


def make_synapse_dataset(root: str | os.PathLike, train_cases: int = 3, test_cases: int = 2, depth: int = 6,
                         size: int = 64, num_classes: int = 3, seed: int = 0) -> Path:
    """Write the SAMed / TransUNet Synapse layout: ``train_npz/caseXXXX_sliceNNN.npz``,
    ``test_vol_h5/caseXXXX.npy.h5`` and ``lists/lists_Synapse/{train.txt, test_vol.txt}``.

    Each case is a stack of slices whose organs (3-D ellipsoids) grow and shrink along z.
    """
    import h5py

    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "train_npz").mkdir(parents=True, exist_ok=True)
    (root / "test_vol_h5").mkdir(parents=True, exist_ok=True)
    lists = root / "lists" / "lists_Synapse"
    lists.mkdir(parents=True, exist_ok=True)
    train_names, test_names = [], []
    for c in range(train_cases + test_cases):
        case = f"case{c + 1:04d}"
        vol, lab = synapse_case(rng, depth, size, num_classes)
        if c < train_cases:
            for z in range(depth):
                name = f"{case}_slice{z:03d}"
                np.savez(root / "train_npz" / f"{name}.npz", image=vol[z], label=lab[z].astype(np.float32))
                train_names.append(name)
        else:
            with h5py.File(root / "test_vol_h5" / f"{case}.npy.h5", "w") as f:
                f["image"], f["label"] = vol, lab.astype(np.float32)
            test_names.append(case)
    (lists / "train.txt").write_text("\n".join(train_names) + "\n")
    (lists / "test_vol.txt").write_text("\n".join(test_names) + "\n")
    return root


def synapse_case(rng: np.random.Generator, depth: int, size: int, num_classes: int):
    zz, yy, xx = np.mgrid[0:depth, 0:size, 0:size].astype(np.float32)
    zz, yy, xx = zz / max(1, depth - 1), yy / size, xx / size
    vol = 0.2 + 0.3 * _smooth_noise(rng, (depth, size, size), 8)
    lab = np.zeros((depth, size, size), dtype=np.int64)
    for k in range(1, num_classes + 1):
        c = rng.uniform([0.2, 0.25, 0.25], [0.8, 0.75, 0.75])
        r = rng.uniform([0.3, 0.08, 0.08], [0.6, 0.2, 0.2])
        inside = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 < 1
        lab[inside] = k
        vol[inside] = 0.4 + 0.55 * k / num_classes + 0.05 * rng.normal(size=int(inside.sum()))
    vol = np.clip(vol + rng.normal(0, 0.02, vol.shape), 0, 1).astype(np.float32)
    return vol, lab
