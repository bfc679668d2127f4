"""An embedded dense-regression task: the depth map of a rendered pseudo-3D scene.

Each image is a CLEVR-like scene (``tasks.data.synthetic.render_clevr``'s floor and objects):
objects further away sit higher and are smaller. The target is a per-pixel depth map in [0, 1]
(0 = nearest): the floor's depth falls linearly from the top of the image to the bottom, and each
object has the constant depth of its centre, painted far to near as the image is. Images and maps
are rendered deterministically per (split, index), so every process and ``eval.py`` see the same
data with no files on disk.
"""
from __future__ import annotations

import math
from typing import Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tasks.data.synthetic import COLOURS, RES, SS, _Y, shape_mask
from tasks.data.vtab import EpochSeededSampler

SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def render_depth(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(image (RES, RES, 3) float32 in [0, 1], depth (RES, RES) float32 in [0, 1])``."""
    floor = np.clip(1.0 - _Y, 0.0, 1.0)  # top of the image far (1), bottom near (0)
    depth = floor.copy()
    img = np.empty((RES * SS, RES * SS, 3), np.float32)
    img[:] = (0.35 + 0.4 * _Y)[..., None] * rng.uniform(0.8, 1.2, 3).astype(np.float32)
    for d in np.sort(rng.uniform(0.05, 0.95, int(rng.integers(1, 5))))[::-1]:  # far to near
        size = 0.05 + 0.1 * (1 - d)
        y = 0.3 + 0.6 * (1 - d)
        mask = shape_mask(["circle", "square"][rng.integers(2)], rng.uniform(0.1, 0.9), y, size,
                          rng.uniform(0, math.pi / 2))
        img[mask] = COLOURS[rng.integers(8)]
        depth[mask] = d
    img = img.reshape(RES, SS, RES, SS, 3).mean(axis=(1, 3))
    depth = depth.reshape(RES, SS, RES, SS).mean(axis=(1, 3))
    return np.clip(img, 0, 1).astype(np.float32), depth.astype(np.float32)


def render_split(split: str, n: int, img_size: int, mean: Sequence[float] | None,
                 std: Sequence[float] | None) -> TensorDataset:
    """``n`` (image, depth) pairs of ``split`` as tensors ``(3, S, S)`` and ``(1, S, S)``."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLIT_SEEDS)}")
    pairs = [render_depth(np.random.default_rng([21, SPLIT_SEEDS[split], i])) for i in range(n)]
    x = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
    if img_size != RES:
        x = F.interpolate(x, size=(img_size, img_size), mode="bicubic", align_corners=False).clamp(0, 1)
        y = F.interpolate(y, size=(img_size, img_size), mode="bilinear", align_corners=False)
    if mean is not None and std is not None:
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return TensorDataset(x, y)


class DepthDataModule(L.LightningDataModule):
    """Rendered scenes and their depth maps: ``n_train`` / ``n_val`` / ``n_test`` pairs."""

    def __init__(self, n_train: int = 800, n_val: int = 200, n_test: int = 200, batch_size: int = 32,
                 eval_batch_size: int | None = None, num_workers: int = 0, img_size: int = 32,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, seed: int = 0, **_: object):
        super().__init__()
        for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if int(n) < 0 or (name == "n_train" and int(n) == 0):
                raise ValueError(f"data.{name}={n}: must be a positive number of images")
        self.sizes = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.img_size, self.mean, self.std, self.seed = num_workers, img_size, mean, std, seed
        self.train_set = self.val_set = self.test_set = None

    @property
    def has_val(self) -> bool:
        return self.sizes["val"] > 0

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            sets = {s: render_split(s, n, self.img_size, self.mean, self.std) if n else None for s, n in self.sizes.items()}
            self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]

    def split_info(self) -> dict:
        """Three independently rendered splits (their own seeds): never overlapping."""
        return {s: {"name": s, "size": n} if n else None for s, n in self.sizes.items()} | {"val_overlaps_test": False}

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size if train else self.eval_batch_size,
                          sampler=EpochSeededSampler(len(ds), self.seed) if train else None,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self):
        return self._loader(self.val_set, False) if self.val_set is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)
