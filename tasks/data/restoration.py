"""Paired restoration data: six single-degradation tasks in their usual folder layouts, and PROD pairs.

Layouts read (``/work/shared/reference/audio_seg_restoration.md`` §3.4), ``<root>`` = ``data.root``:

==============  ==========  ====================================================================
task            dataset     layout (``split`` = train | test)
==============  ==========  ====================================================================
``denoise``     SIDD        ``sidd/<split>/Data/<scene>/<id>_GT_SRGB_<k>.PNG`` + ``..._NOISY_SRGB_<k>.PNG``
``deblur``      GoPro       ``gopro/<split>/<GOPRxxxx_xx_xx>/{blur,sharp}/<frame>.png`` (raw archive) or
                            ``gopro/<split>/{input,target}/`` (NAFNet/Restormer form)
``derain``      Rain100L    ``rain100l/<split>/{input,target}/<name>`` (Restormer form)
``dehaze``      SOTS        ``sots/<split>/{hazy/<id>_<A>_<β>.jpg, clear/<id>.png}`` (pairs by id)
``lowlight``    LOL v1      ``lol/{our485,eval15}/{low,high}/<name>`` (train = our485, test = eval15)
``jpeg``        JPEG AR     ``jpeg_q<Q>/<split>/{input/<name>.jpg, target/<name>.png}``
==============  ==========  ====================================================================

Not read: SIDD's validation ``.mat`` blocks (the embedded SIDD has a ``test/Data`` folder instead),
RESIDE's training sets (ITS/OTS), Rain100L's PromptIR ``rainy/``/``gt/`` naming. There is no
validation split in these benchmarks; validation uses the test split, as the BasicSR/NAFNet
training configs do.

**Embedded data** (:func:`generate`): clean procedural images (:mod:`tasks.data.procedural`)
degraded by one operation per task and written into the layouts above, so the same readers load
the embedded and the real data. The degradation per task: ``denoise`` Poisson (v = 10^U(2, 3))
then Gaussian σ ∈ [5, 15]/255 (signal-dependent, SIDD-like), ``deblur`` a linear motion kernel
(length 5–15 px, any angle, reflect borders), ``derain``/``dehaze``/``lowlight`` the operations of
:mod:`tasks.data.degradations`, ``jpeg`` the input saved as JPEG at quality Q (default 20).

``num_train`` keeps a seeded random subset of that many training pairs (CoLoRA's 16/32/64/128-image
regime). Training samples are paired random crops of ``patch_size`` (with optional flips and
90° rotations); evaluation uses whole images.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from tasks.data import degradations as D
from tasks.data.procedural import clean_image

TASKS = ("denoise", "deblur", "derain", "dehaze", "lowlight", "jpeg")
IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# ------------------------------------------------------------------------------------ reading
def read_image(path: str | Path) -> np.ndarray:
    """A float32 H×W×3 RGB array in [0, 1]; one clear line if the file is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"), np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path} ({type(e).__name__}: {e}); replace or delete the file") from None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMG_EXT) if folder.is_dir() else []


def _need_dir(folder: Path, task: str) -> Path:
    if not folder.is_dir():
        raise FileNotFoundError(f"{task}: folder {folder} not found; generate the embedded data with data.generate=true "
                                f"or point data.root at a folder with the {task} layout (see tasks/data/restoration.py)")
    return folder


def pairs_input_target(folder: Path, task: str, inp: str = "input", tgt: str = "target",
                       match: Callable[[Path], str] | None = None) -> list[tuple[Path, Path]]:
    """``folder/<inp>/X`` paired with ``folder/<tgt>/Y`` where ``match(X) == match(Y)`` (default: the stem)."""
    key = match or (lambda p: p.stem)
    i_dir, t_dir = _need_dir(folder / inp, task), _need_dir(folder / tgt, task)
    targets = {key(p): p for p in _images(t_dir)}
    out = []
    for p in _images(i_dir):
        if key(p) not in targets:
            raise FileNotFoundError(f"{task}: {p} has no pair in {t_dir} (expected a file named like "
                                    f"{key(p)}.*); add it or remove the input")
        out.append((p, targets[key(p)]))
    if not out:
        raise FileNotFoundError(f"{task}: no images in {i_dir}")
    return out


def pairs_sidd(root: Path, split: str) -> list[tuple[Path, Path]]:
    data = _need_dir(root / "sidd" / split / "Data", "denoise")
    out = []
    for gt in sorted(data.glob("*/*_GT_SRGB_*")):
        noisy = gt.with_name(gt.name.replace("_GT_SRGB_", "_NOISY_SRGB_"))
        if not noisy.is_file():
            raise FileNotFoundError(f"denoise: {gt} has no pair {noisy.name}; add it or remove the GT file")
        out.append((noisy, gt))
    if not out:
        raise FileNotFoundError(f"denoise: no *_GT_SRGB_* files under {data}/<scene>/")
    return out


def pairs_gopro(root: Path, split: str) -> list[tuple[Path, Path]]:
    base = _need_dir(root / "gopro" / split, "deblur")
    if (base / "input").is_dir():
        return pairs_input_target(base, "deblur")
    out = []
    for seq in sorted(p for p in base.iterdir() if p.is_dir()):
        out += pairs_input_target(seq, "deblur", "blur", "sharp")
    if not out:
        raise FileNotFoundError(f"deblur: no <sequence>/{{blur,sharp}} folders in {base}")
    return out


def pairs_lol(root: Path, split: str) -> list[tuple[Path, Path]]:
    return pairs_input_target(root / "lol" / ("our485" if split == "train" else "eval15"), "lowlight", "low", "high")


def pairs_sots(root: Path, split: str) -> list[tuple[Path, Path]]:
    return pairs_input_target(root / "sots" / split, "dehaze", "hazy", "clear", match=lambda p: p.stem.split("_")[0])


def find_pairs(task: str, root: str | Path, split: str, jpeg_quality: int = 20) -> list[tuple[Path, Path]]:
    """``[(degraded, clean), ...]`` for ``task`` in its layout under ``root``."""
    root = Path(root)
    if task not in TASKS:
        raise ValueError(f"unknown restoration task {task!r}; valid: {', '.join(TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; valid: train, test")
    if task == "denoise":
        return pairs_sidd(root, split)
    if task == "deblur":
        return pairs_gopro(root, split)
    if task == "derain":
        return pairs_input_target(root / "rain100l" / split, task)
    if task == "dehaze":
        return pairs_sots(root, split)
    if task == "lowlight":
        return pairs_lol(root, split)
    return pairs_input_target(root / f"jpeg_q{int(jpeg_quality)}" / split, task)


def subset(pairs: list, num: int | None, seed: int) -> list:
    """A seeded random subset of ``num`` items (all of them for ``None``)."""
    if num is None:
        return list(pairs)
    if not 0 < int(num) <= len(pairs):
        raise ValueError(f"num_train={num}, but only {len(pairs)} training pairs exist; lower task.num_train "
                         f"or regenerate the data with more (data.generate_train)")
    idx = np.random.default_rng(seed).permutation(len(pairs))[: int(num)]
    return [pairs[i] for i in sorted(idx)]


# ------------------------------------------------------------------------------------ datasets
def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def random_crop(arrays: list[np.ndarray], patch: int, rng: np.random.Generator, augment: bool) -> list[np.ndarray]:
    h, w, _ = arrays[0].shape
    y, x = int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))
    out = [a[y:y + patch, x:x + patch] for a in arrays]
    if augment:  # BasicSR's use_flip / use_rot: hflip, vflip, transpose
        if rng.random() < 0.5:
            out = [a[:, ::-1] for a in out]
        if rng.random() < 0.5:
            out = [a[::-1] for a in out]
        if rng.random() < 0.5:
            out = [a.transpose(1, 0, 2) for a in out]
    return out


class PairedDataset(Dataset):
    """``(degraded, clean, name)`` from a list of file pairs; crops when ``patch_size`` is set."""

    def __init__(self, pairs: list[tuple[Path, Path]], patch_size: int | None = None, augment: bool = False,
                 seed: int = 0):
        self.pairs, self.patch, self.augment, self.seed = list(pairs), patch_size, augment, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        inp_path, tgt_path = self.pairs[i]
        inp, tgt = read_image(inp_path), read_image(tgt_path)
        if inp.shape != tgt.shape:
            raise ValueError(f"{inp_path} is {inp.shape[1]}x{inp.shape[0]} but its target {tgt_path} is "
                             f"{tgt.shape[1]}x{tgt.shape[0]}; paired images must have the same size")
        if self.patch:
            if min(inp.shape[:2]) < self.patch:
                raise ValueError(f"{inp_path} is {inp.shape[1]}x{inp.shape[0]}, smaller than patch_size={self.patch}; "
                                 f"lower data.patch_size")
            rng = np.random.default_rng([self.seed, self.epoch, i])
            inp, tgt = random_crop([inp, tgt], self.patch, rng, self.augment)
        return to_tensor(inp), to_tensor(tgt), Path(inp_path).stem


class ProdDataset(Dataset):
    """PROD pairs on the fly: clean procedural image ``i`` and its random-order degradation.

    Sample ``i`` of epoch ``e`` uses seed ``(seed, e, i)``: reproducible, different every epoch.
    """

    def __init__(self, num_images: int, size: int = 64, cfg: D.DegradationConfig | None = None, seed: int = 0,
                 image_seed_offset: int = 0):
        self.n, self.size, self.cfg, self.seed, self.offset = int(num_images), int(size), cfg or D.DegradationConfig(), seed, image_seed_offset
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        clean = clean_image(self.offset + i, self.size)
        deg = D.prod(clean, np.random.default_rng([self.seed, self.epoch, i]), self.cfg)
        return to_tensor(deg.image), to_tensor(clean), "+".join(deg.ops)


# ------------------------------------------------------------------------------------ generation
def motion_blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    k = D.line_kernel(int(rng.integers(5, 16)), rng.uniform(0, 180))
    return D.filter2d(img, k, mode="reflect")


def real_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    v = 10 ** rng.uniform(2.0, 3.0)
    out = rng.poisson(np.clip(img, 0, 1) * v) / v + rng.normal(0, rng.uniform(5, 15) / 255.0, img.shape)
    return np.clip(out, 0, 1).astype(np.float32)


def degrade_for(task: str, img: np.ndarray, rng: np.random.Generator, cfg: D.DegradationConfig) -> np.ndarray:
    if task == "denoise":
        return real_noise(img, rng)
    if task == "deblur":
        return motion_blur(img, rng)
    if task == "derain":
        return D.rain(img, rng, cfg)
    if task == "dehaze":
        return D.haze(img, rng, cfg)
    if task == "lowlight":
        return D.lowlight(img, rng, cfg)
    return img  # jpeg: the encoder is the degradation (written as .jpg)


def _layout_paths(task: str, split: str, i: int, jpeg_quality: int) -> tuple[str, str]:
    """Relative (degraded, clean) file paths of embedded sample ``i``."""
    if task == "denoise":
        scene = f"sidd/{split}/Data/{i:04d}_001_S6_00100_00060_3200_L"
        return f"{scene}/{i:04d}_NOISY_SRGB_010.PNG", f"{scene}/{i:04d}_GT_SRGB_010.PNG"
    if task == "deblur":
        seq = f"gopro/{split}/GOPR{i // 8:04d}_11_00"
        return f"{seq}/blur/{i:06d}.png", f"{seq}/sharp/{i:06d}.png"
    if task == "derain":
        return f"rain100l/{split}/input/{i:03d}.png", f"rain100l/{split}/target/{i:03d}.png"
    if task == "dehaze":
        return f"sots/{split}/hazy/{i:04d}_0.8_0.2.jpg", f"sots/{split}/clear/{i:04d}.png"
    if task == "lowlight":
        folder = "our485" if split == "train" else "eval15"
        return f"lol/{folder}/low/{i}.png", f"lol/{folder}/high/{i}.png"
    return f"jpeg_q{jpeg_quality}/{split}/input/{i:04d}.jpg", f"jpeg_q{jpeg_quality}/{split}/target/{i:04d}.png"


def generate(task: str, root: str | Path, num_train: int = 128, num_test: int = 16, size: int = 64, seed: int = 0,
             jpeg_quality: int = 20, cfg: D.DegradationConfig | None = None) -> Path:
    """Write the embedded ``task`` into its layout under ``root``, atomically.

    A no-op when the folder holds the embedded data with these settings, or data that this
    generator did not write (real data: read as is). Embedded data with other settings is replaced.
    Clean images: train ``seed·10⁶ + i``, test ``seed·10⁶ + 500 000 + i`` (disjoint).
    """
    if task not in TASKS:
        raise ValueError(f"unknown restoration task {task!r}; valid: {', '.join(TASKS)}")
    root = Path(root)
    top = _layout_paths(task, "train", 0, jpeg_quality)[0].split("/")[0]
    settings = f"{task} train={num_train} test={num_test} size={size} seed={seed} jpeg_quality={jpeg_quality}\n"
    stamp = root / top / ".embedded"
    if (root / top).exists():
        if not stamp.is_file() or stamp.read_text() == settings:
            return root  # real data (never overwritten), or ours already
    cfg = cfg or D.DegradationConfig()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp_{top}_"))
    try:
        for split, n, base in (("train", num_train, 0), ("test", num_test, 500_000)):
            for i in range(n):
                clean = clean_image(seed * 1_000_000 + base + i, size)
                rng = np.random.default_rng([seed, base + i, TASKS.index(task)])
                bad = degrade_for(task, clean, rng, cfg)
                inp_rel, tgt_rel = _layout_paths(task, split, i, jpeg_quality)
                for rel, img in ((inp_rel, bad), (tgt_rel, clean)):
                    p = tmp / rel
                    p.parent.mkdir(parents=True, exist_ok=True)
                    pil = D.to_pil(img)
                    if p.suffix == ".jpg":
                        pil.save(p, format="JPEG", quality=jpeg_quality if task == "jpeg" else 95)
                    else:
                        pil.save(p, format="PNG")
        (tmp / top / stamp.name).write_text(settings)
        if (root / top).exists():  # our embedded data with other settings: swap it out
            old = Path(tempfile.mkdtemp(dir=root, prefix=f".old_{top}_"))
            os.replace(root / top, old / top)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp / top, root / top)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root



# ------------------------------------------------------------------------------------ DataModule
DATASETS = ("prod", *TASKS)


class RestorationDataModule(L.LightningDataModule):
    """``task=restoration``'s data. ``dataset``: ``prod`` (PROD pairs on the fly from ``prod_train``
    clean procedural images, validated and tested on ``prod_val`` fixed ones) or one of the six
    single-degradation tasks read from its layout under ``root`` (``generate=true`` writes the
    embedded one first). Images stay in [0, 1] (no normalisation, as NAFNet)."""

    def __init__(self, root: str, dataset: str = "denoise", num_train: int | None = None, patch_size: int | None = 48,
                 augment: bool = True, batch_size: int = 8, eval_batch_size: int = 1, num_workers: int = 0,
                 generate: bool = False, generate_train: int = 128, generate_test: int = 16, image_size: int = 64,
                 jpeg_quality: int = 20, prod_train: int = 512, prod_val: int = 16,
                 degradation: dict | None = None, seed: int = 0):
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown restoration dataset {dataset!r}; valid: {', '.join(DATASETS)}")
        if num_train is not None and int(num_train) < 1:
            raise ValueError(f"task.num_train={num_train}: a positive number of training pairs (16, 32, 64, 128) or null")
        self.root, self.dataset, self.num_train = Path(root), dataset, num_train
        self.patch, self.augment = patch_size, augment
        self.batch_size, self.eval_batch_size, self.num_workers = int(batch_size), int(eval_batch_size), int(num_workers)
        self.generate, self.gen_train, self.gen_test = bool(generate), int(generate_train), int(generate_test)
        self.image_size, self.jpeg_quality = int(image_size), int(jpeg_quality)
        self.prod_train, self.prod_val = int(prod_train), int(prod_val)
        self.deg_cfg = D.DegradationConfig.from_dict(degradation)
        self.seed = int(seed)
        self.train_set = self.val_set = self.test_set = None

    @property
    def has_val(self) -> bool:
        return True

    def prepare_data(self) -> None:
        if self.generate and self.dataset != "prod":
            generate(self.dataset, self.root, self.gen_train, self.gen_test, self.image_size, 0,
                     self.jpeg_quality, self.deg_cfg)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.dataset == "prod":
            self.train_set = ProdDataset(self.num_train or self.prod_train, self.image_size, self.deg_cfg, self.seed)
            # validation/test: fixed PROD pairs of other clean images (seed 10⁶, epoch 0 always)
            self.val_set = self.test_set = ProdDataset(self.prod_val, self.image_size, self.deg_cfg, 1_000_000,
                                                       image_seed_offset=2_000_000)
            return
        train = subset(find_pairs(self.dataset, self.root, "train", self.jpeg_quality), self.num_train, self.seed)
        test = find_pairs(self.dataset, self.root, "test", self.jpeg_quality)
        self.train_set = PairedDataset(train, self.patch, self.augment, self.seed)
        self.val_set = self.test_set = PairedDataset(test)  # these benchmarks have no separate val split

    def _loader(self, ds, train: bool):
        return DataLoader(ds, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train,
                          num_workers=self.num_workers, drop_last=False,
                          persistent_workers=False)

    def train_dataloader(self):
        return self._loader(self.train_set, True)

    def val_dataloader(self):
        return self._loader(self.val_set, False)

    def test_dataloader(self):
        return self._loader(self.test_set, False)

    def predict_dataloader(self):
        return self._loader(self.test_set, False)

