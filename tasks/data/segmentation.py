"""DataModule of ``task=segmentation``: the layouts of :mod:`tasks.data.segmentation_layouts` (2-D folders, Synapse).

Batches are ``(image (B, 3, S, S), mask (B, S, S))`` for 2-D data and Synapse training slices; the
Synapse validation/test sets yield whole volumes, one per batch, as ``{"volume": (D, H, W) float,
"label": (D, H, W) long, "case": name}`` (SAMed evaluates per volume at the original slice size).

``root: generated`` writes the embedded generated data (:mod:`tasks.data.segmentation_generate`, options in
``generate``) under ``<data_dir>/seg/<generated_name or layout>`` first, so every layout runs offline.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tasks.data.overlap import check_disjoint
from tasks.options import LOADER, Int, Real, check_options
from tasks.data.segmentation_layouts import (
    FolderSegDataset, LAYOUTS, SynapseSlices, has_split, layout_pairs, read_list, read_slice, read_volume, synapse_list,
)


class Normalize:
    def __init__(self, mean, std):
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mean is None else (x - self.mean.to(x.device)) / self.std.to(x.device)


class _Normed(Dataset):
    def __init__(self, ds: Dataset, norm: Normalize):
        self.ds, self.norm = ds, norm

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return self.norm(x), y

    def set_epoch(self, epoch: int) -> None:
        self.ds.epoch = epoch


log = logging.getLogger(__name__)


class OriginalSize(Dataset):
    """Evaluation pairs at each image's own size, not normalised (``data.eval_pipeline``): the task resizes,
    normalises and pads each image itself through a SAM predictor pipeline (``task.sam.pipeline``) and scores
    the prediction at the image's size. Items: ``{"image": (3, H, W) in [0, 1], "mask": (H, W), "mean", "std"}``."""

    def __init__(self, ds: FolderSegDataset, norm: Normalize):
        self.ds, self.norm = ds, norm

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        image, mask = self.ds.load(i)
        flat = lambda t: None if t is None else t.flatten().tolist()  # noqa: E731
        return {"image": image, "mask": mask, "mean": flat(self.norm.mean), "std": flat(self.norm.std)}


class VolumeSet(Dataset):
    """Synapse volumes: ``test_vol_h5/<case>.npy.h5`` (``source=h5``) or held-out training cases
    stacked from their ``train_npz`` slices (``source=npz``, slices sorted by their number)."""

    def __init__(self, root: Path, cases: list[str], num_classes: int, source: str, slices: dict[str, list[str]] | None = None,
                 norm: Normalize | None = None):
        self.root, self.cases, self.num_classes, self.source, self.slices = root, cases, num_classes, source, slices or {}
        self.norm = norm or Normalize(None, None)

    def __len__(self):
        return len(self.cases)

    def __getitem__(self, i):
        case = self.cases[i]
        if self.source == "h5":
            vol, lab = read_volume(self.root, case, self.num_classes)
        else:
            ims, labs = [], []
            for name in self.slices[case]:
                image, label = read_slice(self.root / "train_npz" / f"{name}.npz")
                ims.append(image)
                labs.append(label)
            vol, lab = np.stack(ims), np.stack(labs)
        return {"volume": torch.from_numpy(vol), "label": torch.from_numpy(lab), "case": case, "norm": self.norm}


# every numeric option of the segmentation data config, checked in SegDataModule.__init__
OPTIONS = {**LOADER, "num_classes": Int(1), "val_fraction": Real(0.0, 1.0, lo_open=True, hi_open=True), "val_cases": Int(0)}


def _first(batch):
    return batch[0]


class SegDataModule(L.LightningDataModule):
    def __init__(self, layout: str = "folder", root: str = "generated", num_classes: int = 3, img_size: int = 1024,
                 mask_format: str = "index", palette: Sequence[Sequence[int]] | None = None, val_fraction: float = 0.2,
                 val_cases: int = 1, batch_size: int = 8, eval_batch_size: int = 8, num_workers: int = 0,
                 augment: bool = True, generate: dict | None = None, generated_name: str | None = None, mean=None,
                 std=None, seed: int = 0, data_dir: str = "data", eval_pipeline: str | None = None):
        super().__init__()
        check_options("data", locals(), OPTIONS)
        if layout not in LAYOUTS:
            raise ValueError(f"data.layout={layout!r}; valid: {', '.join(LAYOUTS)}")
        from zoo.backbones.sam_transforms import PIPELINES

        if eval_pipeline is not None and eval_pipeline not in PIPELINES:
            raise ValueError(f"data.eval_pipeline={eval_pipeline!r}; valid: null, {', '.join(PIPELINES)}")
        if eval_pipeline is not None and layout == "synapse":
            raise ValueError("task.sam.pipeline applies to 2-D images; Synapse volumes are evaluated slice by slice "
                             "(task.volume_input_size): leave task.sam.pipeline=null")
        # val / test at each image's own size for the task's SAM predictor pipeline (null: square inputs at img_size)
        self.eval_pipeline = eval_pipeline
        self.layout, self.num_classes, self.img_size = layout, int(num_classes), int(img_size)
        self.mask_format, self.palette = mask_format, palette
        self.val_fraction, self.val_cases = float(val_fraction), int(val_cases)
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.augment, self.seed = bool(augment), seed
        self.generate = dict(generate or {})
        self.norm = Normalize(mean, std)
        self.root = Path(data_dir) / "seg" / (generated_name or layout) if root in (None, "generated") else Path(root)
        self.generated = root in (None, "generated")
        self.train_set = self.val_set = self.test_set = None

    # ------------------------------------------------------------------ data on disk
    def prepare_data(self) -> None:
        if not self.generated:
            if not self.root.exists():
                raise FileNotFoundError(f"data.root={self.root} does not exist; point it at the dataset, or use "
                                        f"data.root=generated for the embedded generated data")
            return
        from tasks.data.segmentation_generate import make_folder_dataset, make_synapse_dataset

        g = {"size": 64, "seed": 0, **self.generate}
        if self.layout == "folder":
            g.setdefault("splits", {"train": 48, "val": 16, "test": 16})
            g.setdefault("mask_format", self.mask_format)
        elif self.layout != "synapse":
            g.setdefault("splits", {"train": 24, "val": 8, "test": 8} if self.layout == "isic" else
                         ({"train": 24, "test": 8} if self.layout == "drive" else None))
        # the marker records the options the data was generated with: other options generate it again
        # (it used to be reused whatever data.generate / num_classes said)
        settings = json.dumps({"layout": self.layout, "num_classes": self.num_classes, **g}, sort_keys=True) + "\n"
        marker = self.root / ".generated"
        if marker.is_file():
            if marker.read_text() == settings:
                return
            log.warning("%s was generated with other options; generating it again with %s", self.root, settings.strip())
            shutil.rmtree(self.root)  # ours: the marker is only ever written by this method
        if self.layout == "synapse":
            make_synapse_dataset(self.root, num_classes=self.num_classes, **g)
        else:
            make_folder_dataset(self.root, layout=self.layout, num_classes=self.num_classes, **g)
        marker.write_text(settings)

    # ------------------------------------------------------------------ splits
    @property
    def has_val(self) -> bool:
        return self.layout != "synapse" or self.val_cases > 0  # SAMed trains on all 18 cases (val_cases=0)

    def split_info(self) -> dict:
        """Synapse: training slices of the cases in ``train.txt`` (``val_cases`` of them held out as volumes),
        ``test_vol.txt``'s volumes; folder layouts: their train / val (or a held-out fraction of train) / test."""
        n = lambda ds: None if ds is None else len(ds)  # noqa: E731
        syn = self.layout == "synapse"
        val_name = "last train.txt cases" if syn else ("val" if has_split(self.root, self.layout, "val")
                                                           else f"{self.val_fraction:g} of train")
        return {"train": {"name": "train.txt slices" if syn else "train", "size": n(self.train_set)},
                "val": {"name": val_name, "size": n(self.val_set)} if self.has_val and n(self.val_set) else None,
                "test": {"name": "test_vol.txt" if syn else "test", "size": n(self.test_set)}
                if self.test_set is not None else None, "val_overlaps_test": False}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.layout == "synapse":
            return self._setup_synapse()
        fmt = self.mask_format if self.layout == "folder" else "binary"
        make = lambda pairs, aug: _Normed(FolderSegDataset(pairs, self.num_classes, self.img_size, fmt, self.palette,  # noqa: E731
                                                           self.layout, aug, self.seed), self.norm)
        train = layout_pairs(self.root, self.layout, "train")
        if has_split(self.root, self.layout, "val"):
            val = layout_pairs(self.root, self.layout, "val")
        else:  # a deterministic held-out fraction of train
            rng = np.random.default_rng(self.seed)
            idx = rng.permutation(len(train))
            n_val = max(1, int(round(self.val_fraction * len(train))))
            if len(train) - n_val < 1:
                raise ValueError(f"{self.root}: {len(train)} training pairs are too few to hold out a validation split")
            val, train = [train[i] for i in sorted(idx[:n_val])], [train[i] for i in sorted(idx[n_val:])]
        evaluate = make if self.eval_pipeline is None else (  # noqa: E731
            lambda pairs, aug: OriginalSize(FolderSegDataset(pairs, self.num_classes, self.img_size, fmt, self.palette,
                                                             self.layout, False, self.seed), self.norm))
        test = layout_pairs(self.root, self.layout, "test") if has_split(self.root, self.layout, "test") else None
        # the same image in two splits inflates every score measured on it: refused in your own folders, warned
        # about (with the count) in the benchmarks' layouts, which are used as they ship
        check_disjoint({"train": [i for i, _ in train], "val": [i for i, _ in val], "test": [i for i, _ in test or []]},
                       str(self.root), identical="refuse" if self.layout == "folder" else "warn")
        self.train_set, self.val_set = make(train, self.augment), evaluate(val, False)
        if test is not None:
            self.test_set = evaluate(test, False)

    def check_splits(self, test: bool) -> None:
        """Called by the runner after ``setup("fit")``, before training: a run that tests at the end
        needs a test split (found now, not after the whole training)."""
        if test and self.test_set is None:
            where = ("lists/lists_Synapse/test_vol.txt" if self.layout == "synapse"
                     else "test/images + test/masks" if self.layout == "folder" else f"the {self.layout} test folders")
            raise ValueError(f"{self.root} has no test split (expected {where}), and this run tests at the end "
                             f"(task.protocol=final): add a test split, or run with test=false to train and "
                             f"select on validation only")

    def _setup_synapse(self) -> None:
        names = read_list(synapse_list(self.root, "train.txt"))
        by_case: dict[str, list[str]] = {}
        for n in names:
            by_case.setdefault(re.sub(r"_slice\d+$", "", n), []).append(n)
        for case in by_case:
            by_case[case].sort(key=lambda n: int(re.findall(r"\d+$", n)[0]) if re.findall(r"\d+$", n) else 0)
        cases = sorted(by_case)
        if self.val_cases >= len(cases):
            raise ValueError(f"data.val_cases={self.val_cases} leaves no training case (the list has {len(cases)} cases)")
        val_cases = cases[len(cases) - self.val_cases:] if self.val_cases > 0 else []
        train_names = [n for c in cases if c not in val_cases for n in by_case[c]]
        self.train_set = _Normed(SynapseSlices(self.root, train_names, self.num_classes, self.img_size, self.augment,
                                               self.seed), self.norm)
        self.val_set = VolumeSet(self.root, val_cases, self.num_classes, "npz", by_case, self.norm)
        test_list = synapse_list(self.root, "test_vol.txt")
        if test_list.is_file():
            self.test_set = VolumeSet(self.root, read_list(test_list), self.num_classes, "h5", norm=self.norm)

    # ------------------------------------------------------------------ loaders
    def _loader(self, ds, train: bool) -> DataLoader:
        if isinstance(ds, (VolumeSet, OriginalSize)):  # one volume / one image of its own size per batch
            return DataLoader(ds, batch_size=1, shuffle=False, num_workers=self.num_workers, collate_fn=_first)
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(ds, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train,
                          num_workers=self.num_workers, generator=g if train else None, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise ValueError(f"{self.root} has no test split")
        return self._loader(self.test_set, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set if self.test_set is not None else self.val_set, False)

    def split_files(self, split: str) -> list[str]:
        """The image files of ``split`` (2-D layouts), for ``eval.py +predict=DIR``."""
        self.setup()
        ds = self.split_set(split)
        pairs = getattr(getattr(ds, "ds", None), "pairs", None)
        if pairs is None:
            raise ValueError(f"+predict writes masks for 2-D image layouts; data.layout={self.layout} has volumes or "
                             f"no {split} split")
        return [str(img) for img, _ in pairs]

    def preprocessing(self) -> dict:
        """The input normalisation this data applied (recorded in the artifact for ``zoo predict``)."""
        m, s = self.norm.mean, self.norm.std
        return {"mean": None if m is None else m.flatten().tolist(), "std": None if s is None else s.flatten().tolist(),
                "input_size": [3, self.img_size, self.img_size]}

    def split_set(self, split: str):
        return {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
