"""A DataModule over images rendered on the fly (upstream pretraining of the demo backbone)."""
from __future__ import annotations

from typing import Sequence

import lightning as L
from torch.utils.data import DataLoader

from tasks.data.synthetic import RENDERERS, RenderedDataset
from tasks.data.vtab import EpochSeededSampler, make_transform


class RenderedDataModule(L.LightningDataModule):
    def __init__(self, dataset: str = "shapes", n_train: int = 8000, n_val: int = 500, batch_size: int = 64,
                 num_workers: int = 0, img_size: int = 32, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, seed: int = 0, **_: object):
        super().__init__()
        self.task, self.n_train, self.n_val = dataset, n_train, n_val
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.transform = make_transform(img_size, mean, std)
        self.num_classes = RENDERERS[dataset][1]
        self.has_val = n_val > 0

    def setup(self, stage: str | None = None) -> None:
        self.train_set = RenderedDataset(self.task, self.n_train, "train", self.transform)
        self.val_set = RenderedDataset(self.task, self.n_val, "test", self.transform)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers,
                          sampler=EpochSeededSampler(self.n_train, self.seed), persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
