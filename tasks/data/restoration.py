"""Paired restoration data: six single-degradation tasks in their usual folder layouts, and PROD pairs.

Layouts read (the team spec ``reference/audio_seg_restoration.md`` (internal, not shipped) §3.4), ``<root>`` = ``data.root``:

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
``sr``          SR ×s       ``sr/<split>/hr/<name>.png`` + ``sr/<split>/lr_x<s>/<name>.png`` (or DIV2K's
                            ``<name>x<s>.png``); without ``lr_x<s>/`` the LR image is the HR one
                            bicubic-downsampled on the fly (mod-cropped to a multiple of s)
==============  ==========  ====================================================================

**Super-resolution** (``dataset=sr``, ``scale`` 2 or 4): "bicubic" is MATLAB-style ``imresize``
(Keys a = −0.5, antialiased when shrinking; :func:`tasks.data.degradations.resize`). NAFNet is a
same-size network, so the network input is the LR image **bicubic-upsampled to the HR size** (the
SRCNN/VDSR convention; the CoLoRA and NAFNet references give no SR tail, and a PixelShuffle tail would
change the pretrained architecture). The metric convention for SR is PSNR/SSIM on the Y channel with
``crop_border = scale`` (the task sets it when ``task.metric`` leaves it ``null``).

**SIDD validation blocks**: when ``sidd/test/ValidationNoisyBlocksSrgb.mat`` and
``ValidationGtBlocksSrgb.mat`` exist (the NAFNet/Restormer evaluation files: 40 images × 32 blocks of
256×256×3 uint8, variables named like the files), they are the test split, read with
``scipy.io.loadmat`` (MAT v5; no pickle) or ``h5py`` (MAT v7.3 / HDF5, whose arrays come transposed);
each block is named ``<image>_<block>``. Otherwise ``sidd/test/Data/`` is read like the training split.

Not read: RESIDE's training sets (ITS/OTS), Rain100L's PromptIR ``rainy/``/``gt/`` naming. There is no
validation split in these benchmarks; by default validation uses the test split, as the BasicSR/NAFNet
training configs do (their recipes test the last iteration, ``task.selection=last``).

**Held-out validation** (``val_from_train=K``): K pairs of the *training* split are set aside as the
validation split (a fixed choice, the same for every run seed, so runs of a sweep validate on the same
pairs), and ``num_train`` pairs are drawn from the rest. Validation then shares nothing with the test
split, so the checkpoint can be selected on it (``task.selection=val``).

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
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tasks.data import degradations as D
from tasks.data.overlap import check_disjoint
from tasks.data.procedural import clean_image
from tasks.data.staging import clean_stale, staging_dir
from tasks.options import LOADER, Int, check_options
from zoo.reading import DataFileError, check_unit_range, read_rgb, reading

TASKS = ("denoise", "deblur", "derain", "dehaze", "lowlight", "jpeg", "sr")
IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# ------------------------------------------------------------------------------------ reading
def read_image(path: "str | Path | MatBlock") -> np.ndarray:
    """A float32 H×W×3 RGB array in [0, 1] at the file's real bit depth (8-bit, 16-bit, float in 0..1;
    :func:`zoo.reading.read_rgb`); one clear line if the file is missing, unreadable or out of range."""
    if isinstance(path, MatBlock):
        return path.load()
    return read_rgb(path)


SIDD_MAT = ("ValidationNoisyBlocksSrgb", "ValidationGtBlocksSrgb")
_MAT_CACHE: dict[tuple, np.ndarray] = {}


def load_mat_blocks(path: str | Path, key: str) -> np.ndarray:
    """The array ``key`` of a MATLAB file as ``images × blocks × H × W × C`` (a 4-D array gets one image axis).

    MAT v5 files through ``scipy.io.loadmat`` (which never unpickles), v7.3 (HDF5) through ``h5py``;
    MATLAB stores column-major, so an HDF5 array reads with its axes reversed and is transposed back.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SIDD block file not found: {path}")
    ck = (str(path.resolve()), key, path.stat().st_mtime_ns)
    if ck in _MAT_CACHE:
        return _MAT_CACHE[ck]
    try:
        import h5py
        from scipy.io.matlab import MatReadError
    except ImportError as e:
        raise ImportError(f"reading SIDD's .mat blocks needs scipy and h5py ({e}); pip install -e '.[restore]'") from None

    try:
        with reading(path, "MAT file"):  # OSError, ValueError, KeyError... of a corrupt file: named
            if h5py.is_hdf5(path):
                with h5py.File(path, "r") as f:
                    if key not in f:
                        raise DataFileError(f"{path} has no variable {key!r}; it has {', '.join(sorted(f.keys())) or 'none'}")
                    arr = np.asarray(f[key][()])
                arr = arr.transpose(tuple(range(arr.ndim))[::-1])
            else:
                from scipy.io import loadmat

                mat = loadmat(path, variable_names=[key])
                if key not in mat:
                    raise DataFileError(f"{path} has no variable {key!r}; rename it or use the official SIDD file")
                arr = np.asarray(mat[key])
    except (NotImplementedError, MatReadError) as e:  # unsupported MAT versions
        raise DataFileError(f"{path}: cannot read this MAT file ({type(e).__name__}: {e}); replace it") from None
    if arr.ndim == 4:
        arr = arr[None]
    if arr.ndim != 5 or arr.shape[-1] != 3:
        raise ValueError(f"{path}:{key} has shape {arr.shape}; expected images x blocks x H x W x 3")
    # a pair reads the noisy and the clean file alternately: keep the last two arrays (the real files
    # are ~250 MB each; keeping one reloaded both for every block)
    while len(_MAT_CACHE) >= 2:
        _MAT_CACHE.pop(next(iter(_MAT_CACHE)))
    _MAT_CACHE[ck] = arr
    return arr


class MatBlock:
    """One SIDD validation block: ``(file, variable, image, block)``; read by :func:`read_image`."""

    def __init__(self, path: Path, key: str, image: int, block: int):
        self.path, self.key, self.image, self.block = Path(path), key, int(image), int(block)

    @property
    def stem(self) -> str:
        return f"{self.image:02d}_{self.block:02d}"

    def load(self) -> np.ndarray:
        """uint8 / uint16 blocks scaled by their depth; float blocks must already lie in 0..1 (a float
        block in 0..255 used to be clipped to white) and be finite."""
        a = load_mat_blocks(self.path, self.key)[self.image, self.block]
        if a.dtype == np.uint8:
            return a.astype(np.float32) / 255.0
        if a.dtype == np.uint16:
            return a.astype(np.float32) / 65535.0
        a = a.astype(np.float32)
        return np.clip(check_unit_range(a, repr(self), "pixel values"), 0, 1)

    def __repr__(self) -> str:
        return f"{self.path}:{self.key}[{self.image},{self.block}]"


def pairs_sidd_mat(folder: Path) -> list[tuple[MatBlock, MatBlock]]:
    noisy, gt = (folder / f"{k}.mat" for k in SIDD_MAT)
    a, b = load_mat_blocks(noisy, SIDD_MAT[0]), load_mat_blocks(gt, SIDD_MAT[1])
    if a.shape != b.shape:
        raise ValueError(f"{noisy.name} holds {a.shape} but {gt.name} holds {b.shape}; they must match")
    return [(MatBlock(noisy, SIDD_MAT[0], i, j), MatBlock(gt, SIDD_MAT[1], i, j))
            for i in range(a.shape[0]) for j in range(a.shape[1])]


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
    if split == "test" and any((root / "sidd" / split / f"{k}.mat").is_file() for k in SIDD_MAT):
        return pairs_sidd_mat(root / "sidd" / split)
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


def pairs_sr(root: Path, split: str, scale: int) -> list[tuple[Path | None, Path]]:
    """``[(lr or None, hr), ...]``: ``None`` when there is no ``lr_x<scale>/`` folder (bicubic on the fly)."""
    base = _need_dir(root / "sr" / split, "sr")
    hrs = _images(_need_dir(base / "hr", "sr"))
    if not hrs:
        raise FileNotFoundError(f"sr: no images in {base / 'hr'}")
    lr_dir = base / f"lr_x{scale}"
    if not lr_dir.is_dir():
        return [(None, p) for p in hrs]
    lrs = {p.stem: p for p in _images(lr_dir)}
    out = []
    for hr in hrs:
        lr = lrs.get(hr.stem) or lrs.get(f"{hr.stem}x{scale}")  # ours, or DIV2K's 0001x2.png
        if lr is None:
            raise FileNotFoundError(f"sr: {hr} has no LR image {hr.stem}.png or {hr.stem}x{scale}.png in {lr_dir}; "
                                    f"add it, or remove {lr_dir} to downsample on the fly")
        out.append((lr, hr))
    return out


def find_pairs(task: str, root: str | Path, split: str, jpeg_quality: int = 20,
               scale: int = 2) -> list[tuple[Path, Path]]:
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
    if task == "sr":
        return pairs_sr(root, split, scale)
    return pairs_input_target(root / f"jpeg_q{int(jpeg_quality)}" / split, task)


def shared_files(a: list, b: list) -> set[str]:
    """The files (degraded or clean, SIDD blocks by file and index) that two pair lists share."""
    key = lambda f: repr(f) if isinstance(f, MatBlock) else str(Path(f).resolve())  # noqa: E731
    files = lambda pairs: {key(f) for pair in pairs for f in pair if f is not None}  # noqa: E731
    return files(a) & files(b)


VAL_SEED = 20_240_801  # the held-out validation pairs do not depend on the run seed


def hold_out(pairs: list, k: int | None, seed: int = VAL_SEED) -> tuple[list, list]:
    """``(rest, held_out)``: ``k`` pairs chosen by ``seed`` set aside (none for ``None``), both in file order."""
    if k is None:
        return list(pairs), []
    if not 0 < int(k) < len(pairs):
        raise ValueError(f"data.val_from_train={k}, but only {len(pairs)} training pairs exist (at least one must "
                         f"stay for training); lower it or regenerate the data with more (data.generate_train)")
    held = set(np.random.default_rng(seed).permutation(len(pairs))[: int(k)].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def subset(pairs: list, num: int | None, seed: int) -> list:
    """A seeded random subset of ``num`` items (all of them for ``None``)."""
    if num is None:
        return list(pairs)
    if not 0 < int(num) <= len(pairs):
        raise ValueError(f"num_train={num}, but only {len(pairs)} training pairs exist (after any held-out "
                         f"validation pairs, data.val_from_train); lower task.num_train or regenerate the data "
                         f"with more (data.generate_train)")
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
        return to_tensor(inp), to_tensor(tgt), getattr(inp_path, "stem", None) or Path(inp_path).stem


def upsample_to(lq: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The network input of SR with a same-size restoration net: ``lq`` bicubic-upsampled to ``shape`` (H, W, ...)."""
    return np.clip(D.resize(lq, (shape[1], shape[0])), 0.0, 1.0)


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    h, w = img.shape[:2]
    return img[:h - h % scale, :w - w % scale]


class SRDataset(PairedDataset):
    """``(bicubic-upsampled LR, HR, name)`` for super-resolution by ``scale``.

    The HR image is mod-cropped to a multiple of ``scale``; the LR image is read (it must be exactly
    HR/scale) or, when the pair has none, the HR image bicubic-downsampled. The network input is the
    LR image bicubic-upsampled to the HR size.
    """

    def __init__(self, pairs, scale: int, patch_size: int | None = None, augment: bool = False, seed: int = 0):
        super().__init__(pairs, patch_size, augment, seed)
        self.scale = int(scale)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        lr_path, hr_path = self.pairs[i]
        hr = mod_crop(read_image(hr_path), self.scale)
        size = (hr.shape[1] // self.scale, hr.shape[0] // self.scale)
        if min(size) < 1:
            raise ValueError(f"{hr_path} is smaller than the scale {self.scale}")
        if lr_path is None:
            lr = np.clip(D.resize(hr, size), 0.0, 1.0)
        else:
            lr = read_image(lr_path)
            if (lr.shape[1], lr.shape[0]) != size:
                raise ValueError(f"{lr_path} is {lr.shape[1]}x{lr.shape[0]} but its HR image {hr_path} needs "
                                 f"{size[0]}x{size[1]} at scale {self.scale}; check data.scale / task.scale")
        return upsample_to(lr, hr.shape), hr, Path(hr_path).stem

    def __getitem__(self, i: int):
        inp, tgt, name = self.load(i)
        if self.patch:
            if min(inp.shape[:2]) < self.patch:
                raise ValueError(f"{self.pairs[i][1]} is {inp.shape[1]}x{inp.shape[0]} after the mod-crop, smaller "
                                 f"than patch_size={self.patch}; lower data.patch_size")
            inp, tgt = random_crop([inp, tgt], self.patch, np.random.default_rng([self.seed, self.epoch, i]),
                                   self.augment)
        return to_tensor(inp), to_tensor(tgt), name


class ProdDataset(Dataset):
    """PROD pairs on the fly: clean procedural image ``i`` and its random-order degradation
    (``pipeline=prod``), or BSRGAN's full sequence at scale ``sf`` with the LQ image
    bicubic-upsampled back to the clean size (``pipeline=bsrgan``: NAFNet is a same-size network).

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
        rng = np.random.default_rng([self.seed, self.epoch, i])
        if self.cfg.pipeline == "bsrgan":  # BSRGAN's sequence at sf; the LQ image bicubic-upsampled back
            sf = int(self.cfg.sf)
            if sf != self.cfg.sf or self.size % sf:
                raise ValueError(f"degradation pipeline=bsrgan needs an integer sf dividing data.image_size; "
                                 f"got sf={self.cfg.sf}, image_size={self.size}")
            r = D.bsrgan(clean, rng, self.cfg, sf=sf)
            return to_tensor(upsample_to(r.lq, r.hq.shape)), to_tensor(r.hq), f"{i:05d}_{'+'.join(r.ops)}"
        deg = D.prod(clean, rng, self.cfg)
        # the name (a written prediction's file name) is unique per image: ops alone repeat across images
        return to_tensor(deg.image), to_tensor(clean), f"{i:05d}_{'+'.join(deg.ops)}"


# ------------------------------------------------------------------------------------ generation
def motion_blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    k = D.line_kernel(int(rng.integers(5, 16)), rng.uniform(0, 180))
    return D.filter2d(img, k, mode="reflect")


def real_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    v = 10 ** rng.uniform(2.0, 3.0)
    out = rng.poisson(np.clip(img, 0, 1) * v) / v + rng.normal(0, rng.uniform(5, 15) / 255.0, img.shape)
    return np.clip(out, 0, 1).astype(np.float32)


def degrade_for(task: str, img: np.ndarray, rng: np.random.Generator, cfg: D.DegradationConfig) -> np.ndarray:
    if task == "sr":
        return img  # the LR images are written per scale by generate()
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
    if task == "sr":
        return f"sr/{split}/lr_x2/{i:04d}.png", f"sr/{split}/hr/{i:04d}.png"
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
    clean_stale(root, f".old_{top}_")
    tmp = staging_dir(root, f".tmp_{top}_")
    try:
        for split, n, base in (("train", num_train, 0), ("test", num_test, 500_000)):
            for i in range(n):
                clean = clean_image(seed * 1_000_000 + base + i, size)
                rng = np.random.default_rng([seed, base + i, TASKS.index(task)])
                bad = degrade_for(task, clean, rng, cfg)
                inp_rel, tgt_rel = _layout_paths(task, split, i, jpeg_quality)
                todo = [(inp_rel, bad), (tgt_rel, clean)]
                if task == "sr":  # the paired layout: lr_x2/ and lr_x4/ by bicubic downsampling
                    todo = [(tgt_rel, clean)] + [
                        (inp_rel.replace("lr_x2", f"lr_x{s}"), D.resize(clean, (size // s, size // s))) for s in (2, 4)]
                for rel, img in todo:
                    p = tmp / rel
                    p.parent.mkdir(parents=True, exist_ok=True)
                    pil = D.to_pil(img)
                    if p.suffix == ".jpg":
                        pil.save(p, format="JPEG", quality=jpeg_quality if task == "jpeg" else 95)
                    else:
                        pil.save(p, format="PNG")
        (tmp / top / stamp.name).write_text(settings)
        if (root / top).exists():  # our embedded data with other settings: swap it out
            old = staging_dir(root, f".old_{top}_")
            os.replace(root / top, old / top)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp / top, root / top)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root



# ------------------------------------------------------------------------------------ DataModule
DATASETS = ("prod", *TASKS)


# every numeric option of the restoration data config, checked in RestorationDataModule.__init__
OPTIONS = {**LOADER, "patch_size": Int(1, optional=True), "generate_train": Int(1),
           "generate_test": Int(1), "image_size": Int(8), "jpeg_quality": Int(1, 100), "prod_train": Int(1),
           "prod_val": Int(1), "val_from_train": Int(1, optional=True)}  # scale and num_train: checked below as task.scale / task.num_train


class RestorationDataModule(L.LightningDataModule):
    """``task=restoration``'s data. ``dataset``: ``prod`` (PROD pairs on the fly from ``prod_train``
    clean procedural images, validated and tested on ``prod_val`` fixed ones), one of the six
    single-degradation tasks, or ``sr`` (×``scale``), read from its layout under ``root``
    (``generate=true`` writes the embedded one first). Images stay in [0, 1] (no normalisation, as NAFNet).

    Validation is the test split (the benchmarks' own protocol, tested at the last epoch), or, with
    ``val_from_train=K``, K pairs held out of the training split (see the module docstring)."""

    def __init__(self, root: str, dataset: str = "denoise", num_train: int | None = None, patch_size: int | None = 48,
                 augment: bool = True, batch_size: int = 8, eval_batch_size: int = 1, num_workers: int = 0,
                 generate: bool = False, generate_train: int = 128, generate_test: int = 16, image_size: int = 64,
                 jpeg_quality: int = 20, prod_train: int = 512, prod_val: int = 16,
                 degradation: dict | None = None, scale: int = 2, seed: int = 0, val_from_train: int | None = None):
        super().__init__()
        check_options("data", locals(), OPTIONS)
        if dataset not in DATASETS:
            raise ValueError(f"unknown restoration dataset {dataset!r}; valid: {', '.join(DATASETS)}")
        if isinstance(scale, bool) or int(scale) != scale or int(scale) < 2:
            raise ValueError(f"task.scale={scale!r}: an integer super-resolution factor >= 2 (2 or 4)")
        self.scale = int(scale)
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
        if val_from_train is not None and dataset == "prod":
            raise ValueError("data.val_from_train holds out training pairs of a paired dataset; dataset=prod "
                             "validates on its own fixed pairs (data.prod_val)")
        self.val_from_train = None if val_from_train is None else int(val_from_train)
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
        pool, val = hold_out(find_pairs(self.dataset, self.root, "train", self.jpeg_quality, self.scale),
                             self.val_from_train)
        train = subset(pool, self.num_train, self.seed)
        test = find_pairs(self.dataset, self.root, "test", self.jpeg_quality, self.scale)
        # a training input that is also a test input (the same file, or a byte-identical copy) inflates PSNR/SSIM:
        # the same file is refused, copies are warned about with their count (the benchmarks are used as they ship)
        def inputs(pairs):  # the degraded file (the HR file for SR made on the fly); SIDD's .mat blocks are not files
            return [q for q in (hr if lq is None else lq for lq, hr in pairs) if isinstance(q, (str, os.PathLike))]

        splits = {"train": inputs(train), "test": inputs(test)}
        if val:  # held-out validation pairs: checked against test too
            splits["val"] = inputs(val)
        check_disjoint(splits, f"{self.dataset} under {self.root}",
                       pairs=(("train", "test"), ("val", "test")), identical="warn")
        make = (lambda pairs, *a: SRDataset(pairs, self.scale, *a)) if self.dataset == "sr" else PairedDataset
        self.train_set = make(train, self.patch, self.augment, self.seed)
        self.test_set = make(test)
        # without held-out pairs these benchmarks have no separate val split: validation is the test split
        self.val_set = make(val) if val else self.test_set

    def split_info(self) -> dict:
        """Train pairs, validation pairs (the test pairs, or pairs held out of train) and test pairs."""
        test = "prod_val (fixed PROD pairs)" if self.dataset == "prod" else f"{self.dataset}/test"
        train = "prod (fresh degradations)" if self.dataset == "prod" else f"{self.dataset}/train"
        val = test
        if self.val_from_train:
            val, train = f"{self.dataset}/train (held out)", f"{self.dataset}/train (rest)"
        n = lambda ds: None if ds is None else len(ds)  # noqa: E731
        sets = (self.val_set, self.test_set)
        overlap = sets[0] is sets[1] or (None not in sets and bool(shared_files(sets[0].pairs, sets[1].pairs)))
        return {"train": {"name": train, "size": n(self.train_set)}, "val": {"name": val, "size": n(self.val_set)},
                "test": {"name": test, "size": n(self.test_set)}, "val_overlaps_test": bool(overlap)}

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

