"""VTAB-1k in the file-list layout of NOAH / FacT / V-PETL Bench.

    <root>/<task>/train800.txt         lines: images/<split>/<id>.jpg <label>
    <root>/<task>/val200.txt
    <root>/<task>/train800val200.txt
    <root>/<task>/test.txt
    <root>/<task>/images/...

Protocols: ``tune`` trains on train800 and validates (selects) on val200; ``final`` trains on
train800val200 and evaluates test once at the end. Test is never used for selection.
Images are resized to the backbone's input size (no crop) and normalised, as in NOAH/FacT.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from tasks.data.overlap import check_disjoint
from tasks.data.paths import check_inside
from tasks.data.vtab_tasks import GROUPS, VTAB_TASKS, canonical_task, num_classes  # noqa: F401 (re-exported)
from tasks.options import LOADER, Int, check_options
from zoo.reading import read_rgb_pil, read_text

SPLIT_FILES = {"tune": ("train800", "val200", None), "final": ("train800val200", None, "test")}


def layout_help(root: Path, task: str) -> str:
    return (
        f"VTAB-1k data for task {task!r} not found under {root}.\n"
        f"Expected layout (NOAH / FacT / V-PETL file lists):\n"
        f"  {root}/{task}/train800.txt, val200.txt, train800val200.txt, test.txt  (lines: images/<split>/<id>.jpg <label>)\n"
        f"  {root}/{task}/images/...\n"
        f"Point to your copy with data.root=/path/to/vtab-1k (folder aliases such as "
        f"{', '.join(VTAB_TASKS[task][2][:2]) or task} are accepted; train.py and eval.py both take it). "
        f"To try the embedded tasks instead: python train.py experiment=quickstart (a train.py option)."
    )


def find_task_dir(root: Path, task: str) -> Path | None:
    canon = canonical_task(task)
    for name in (canon, *VTAB_TASKS[canon][2]):
        if (root / name / "train800.txt").is_file():
            return root / name
    return None


def check_data(root: str | Path, dataset: str, generate: bool = False) -> None:
    """The task's folder and list files exist (or will be generated): cheap, before any weights are built."""
    from tasks.data.synthetic import DOWNSTREAM

    task, root = canonical_task(dataset), Path(root).expanduser()
    if generate and task in DOWNSTREAM:
        return
    folder = find_task_dir(root, task)
    if folder is None:
        raise FileNotFoundError(layout_help(root, task))


def read_list(path: Path, num_classes: int | None = None) -> list[tuple[str, int]]:
    """``(image path, label)`` rows of a VTAB list file; every problem is one error naming file:line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (expected '<image path> <label>' lines)")
    items = []
    for ln, line in enumerate(read_text(path, "list file").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{ln}: expected '<image path> <label>', got {line!r}")
        try:
            label = int(parts[1])
        except ValueError:
            raise ValueError(f"{path}:{ln}: the label {parts[1]!r} is not an integer class index") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise ValueError(f"{path}:{ln}: label {label} is out of range for {num_classes} classes (0..{(num_classes or 1) - 1})")
        items.append((check_inside(parts[0], f"{path}:{ln}", path.parent), label))
    if not items:
        raise ValueError(f"{path} lists no images: a split needs at least one '<image path> <label>' line")
    return items


class FileListDataset(Dataset):
    """Images listed in a VTAB file list; ``cache=True`` keeps the transformed tensors in memory."""

    def __init__(self, folder: Path, list_name: str, transform: Callable, cache: bool = False,
                 num_classes: int | None = None):
        self.folder, self.transform = folder, transform
        self.items = read_list(folder / f"{list_name}.txt", num_classes)
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        rel, label = self.items[i]
        if self._cache is not None and i in self._cache:
            return self._cache[i], label
        path = self.folder / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path} (listed in {self.folder}) does not exist")
        x = self.transform(read_rgb_pil(path))  # 16-bit / float images scaled from their real range, not clipped
        if self._cache is not None:
            self._cache[i] = x
        return x, label


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch): a resumed run sees the same order.

    Lightning calls ``set_epoch`` on the sampler each epoch (as for DistributedSampler).
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def make_transform(img_size: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> Callable:
    ops = [T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor()]
    if mean is not None and std is not None:
        ops.append(T.Normalize(tuple(mean), tuple(std)))
    return T.Compose(ops)


class VTABDataModule(L.LightningDataModule):
    """One VTAB-1k task. ``generate=True`` writes the embedded synthetic task if it is missing."""

    def __init__(self, root: str, dataset: str, protocol: str = "tune", batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int = 4, img_size: int = 224,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 generate: bool = False, cache: bool = False, seed: int = 0):
        super().__init__()
        check_options("data", locals(), {**LOADER, "eval_batch_size": Int(1, optional=True)})
        if protocol not in SPLIT_FILES:
            raise ValueError(f"unknown protocol {protocol!r}; valid: tune (train800 / val200), final (train800val200 / test)")
        self.root, self.task = Path(root).expanduser(), canonical_task(dataset)
        self.protocol, self.batch_size = protocol, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.generate, self.cache, self.seed = num_workers, generate, cache, seed
        self.transform = make_transform(img_size, mean, std)
        self.num_classes = VTAB_TASKS[self.task][1]
        self.train_set = self.val_set = self.test_set = None

    @property
    def has_val(self) -> bool:
        return SPLIT_FILES[self.protocol][1] is not None

    def prepare_data(self) -> None:
        if self.generate and find_task_dir(self.root, self.task) is None:
            from tasks.data.synthetic import DOWNSTREAM, write_task

            if self.task not in DOWNSTREAM:
                raise FileNotFoundError(f"{self.task!r} is not an embedded task (embedded: {', '.join(DOWNSTREAM)})\n"
                                        + layout_help(self.root, self.task))
            write_task(self.root, self.task)

    def setup(self, stage: str | None = None) -> None:
        folder = find_task_dir(self.root, self.task)
        if folder is None:
            raise FileNotFoundError(layout_help(self.root, self.task))
        train, val, test = SPLIT_FILES[self.protocol]
        n = self.num_classes
        self.train_set = FileListDataset(folder, train, self.transform, self.cache, n)
        self.val_set = FileListDataset(folder, val, self.transform, self.cache, n) if val else None
        self.test_set = FileListDataset(folder, test, self.transform, self.cache, n) if test else None
        # a file listed in two splits is refused; byte-identical copies are warned about with their count
        # (the benchmark's own lists are used as they are)
        files = lambda ds: [folder / rel for rel, _ in ds.items] if ds is not None else []  # noqa: E731
        check_disjoint({"train": files(self.train_set), "val": files(self.val_set), "test": files(self.test_set)},
                       f"{folder} ({train}.txt / {val or test}.txt)", identical="warn")

    def split_files(self, split: str) -> list[str]:
        """The image files of ``split`` (``eval.py +predict=DIR``)."""
        self.setup()
        ds = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        if ds is None:
            raise ValueError(f"protocol={self.protocol} has no {split} split")
        return [str(ds.folder / rel) for rel, _ in ds.items]

    def split_info(self) -> dict:
        """The split files (``train800`` / ``val200`` or ``train800val200`` / ``test``) and their sizes."""
        sets = dict(zip(("train", "val", "test"), SPLIT_FILES[self.protocol]))
        return {s: None if f is None else {"name": f, "size": len(getattr(self, f"{s}_set")) if getattr(self, f"{s}_set", None)
                                           is not None else None} for s, f in sets.items()} | {"val_overlaps_test": False}

    def _loader(self, ds, train: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=EpochSeededSampler(len(ds), self.seed) if train else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self):
        return self._loader(self.val_set, False) if self.val_set is not None else []

    def test_dataloader(self):
        if self.test_set is None:
            raise RuntimeError("protocol=tune has no test split (test is never used for selection); use task.protocol=final")
        return self._loader(self.test_set, False)
