"""Segmentation data: 2-D folder layouts, the Synapse (TransUNet / SAMed) layout, joint augmentation,
mask PNGs, and generated "medical-like" data so everything runs offline.

Layouts (``layout=``):

* ``folder``   ``root/[split/]images/*`` + ``root/[split/]masks/*`` paired by file stem;
* ``kvasir``   ``root/images/*.jpg`` + ``root/masks/*.jpg`` (Kvasir-SEG; masks are binarised: mean
  over RGB >= 128, the JPEG masks are near 0/255);
* ``isic``     ``root/ISIC2018_Task1-2_{Training,Validation,Test}_Input/*.jpg`` +
  ``root/ISIC2018_Task1_{...}_GroundTruth/*.png`` (paired by stem: ``ISIC_0000000.jpg`` with
  ``ISIC_0000000_segmentation.png``; binary);
* ``drive``    ``root/{training,test}/images/*.tif`` + ``root/{training,test}/1st_manual/*.gif`` (gt > 0);
* ``synapse``  ``root/train_npz/<slice>.npz`` (``image``, ``label``) listed in
  ``root/lists/lists_Synapse/train.txt``; ``root/test_vol_h5/<case>.npy.h5`` (``image``, ``label``
  ``(D, H, W)``) listed in ``test_vol.txt``. Evaluation is per volume (slices stacked).

Masks (``mask_format=``): ``index`` (pixel value = class id, PNG ``L``/``P``), ``binary`` (> 0 -> 1,
or the layout's rule) or ``color`` (RGB looked up in ``palette``: a list of K+1 ``[r, g, b]``).
Images are returned as float ``(3, S, S)`` in [0, 1] (grey repeated, as SAMed) and masks as long
``(S, S)``; normalisation is the model's business.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from tasks.data.paths import check_inside
from zoo.reading import DataFileError, check_finite, check_unit_range, read_rgb, read_text, reading

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
LAYOUTS = ("folder", "kvasir", "isic", "drive", "synapse")
MASK_FORMATS = ("index", "binary", "color")
ISIC_SPLITS = {"train": "Training", "val": "Validation", "test": "Test"}
DRIVE_SPLITS = {"train": "training", "val": "training", "test": "test"}


# ---------------------------------------------------------------------- pairing files
def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXT)


def pair_by_stem(images: list[Path], masks: list[Path], where: str) -> list[tuple[Path, Path]]:
    """Pair images and masks by stem (a mask stem may add ``_mask``/``_segmentation``/``_manual1``)."""
    def key(p: Path) -> str:
        s = p.stem
        for suffix in ("_segmentation", "_manual1", "_mask", "_gt"):
            if s.endswith(suffix):
                s = s[: -len(suffix)]
        return s.replace("_training", "").replace("_test", "")

    im = {key(p): p for p in images}
    mk = {key(p): p for p in masks}
    lone_i, lone_m = sorted(set(im) - set(mk)), sorted(set(mk) - set(im))
    if lone_i or lone_m or not im:
        raise ValueError(
            f"{where}: {len(images)} images and {len(masks)} masks do not pair by file name"
            + (f"; images without a mask: {lone_i[:5]}" if lone_i else "")
            + (f"; masks without an image: {lone_m[:5]}" if lone_m else "")
            + ("; no images found" if not im else "")
        )
    return [(im[k], mk[k]) for k in sorted(im)]


def layout_pairs(root: str | os.PathLike, layout: str, split: str) -> list[tuple[Path, Path]]:
    """(image, mask) files of ``split`` (train | val | test) in ``layout``."""
    root = Path(root)
    if layout not in LAYOUTS or layout == "synapse":
        raise ValueError(f"unknown 2-D layout {layout!r}; valid: folder, kvasir, isic, drive (synapse has its own reader)")
    if layout == "folder":
        base = root / split if (root / split / "images").is_dir() else root
        return pair_by_stem(_files(base / "images"), _files(base / "masks"), str(base))
    if layout == "kvasir":
        return pair_by_stem(_files(root / "images"), _files(root / "masks"), str(root))
    if layout == "isic":
        s = ISIC_SPLITS.get(split, split)
        # by stem, not by sorted position: one missing or extra file would shift every later pair
        return pair_by_stem(_files(root / f"ISIC2018_Task1-2_{s}_Input"),
                            _files(root / f"ISIC2018_Task1_{s}_GroundTruth"), f"{root} (ISIC {s})")
    s = DRIVE_SPLITS.get(split, split)
    return pair_by_stem(_files(root / s / "images"), _files(root / s / "1st_manual"), str(root / s))


def has_split(root: str | os.PathLike, layout: str, split: str) -> bool:
    root = Path(root)
    if layout == "folder":
        return (root / split / "images").is_dir()
    if layout == "isic":
        return (root / f"ISIC2018_Task1-2_{ISIC_SPLITS.get(split, split)}_Input").is_dir()
    if layout == "drive":
        return split != "val" and (root / DRIVE_SPLITS.get(split, split) / "images").is_dir()
    return False


# ---------------------------------------------------------------------- reading masks
def read_mask(path: Path, mask_format: str, num_classes: int, palette: Sequence[Sequence[int]] | None,
              layout: str = "folder") -> np.ndarray:
    """An ``(H, W)`` int64 class map; raises naming the file for bad values (unreadable, negative or
    too large labels, colours outside the palette)."""
    from PIL import Image

    if mask_format not in MASK_FORMATS:
        raise ValueError(f"unknown mask_format {mask_format!r}; valid: {', '.join(MASK_FORMATS)}")
    with reading(path, "mask"), Image.open(path) as im:
        im.load()
        img = im.copy()
    if mask_format == "color":
        if not palette:
            raise ValueError(f"mask_format=color needs a palette (K+1 [r, g, b] colours, background first) for {path}")
        rgb = np.asarray(img.convert("RGB")).astype(np.int64)
        code = rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]
        lut = {int(r) * 65536 + int(g) * 256 + int(b): i for i, (r, g, b) in enumerate(palette)}
        out = np.full(code.shape, -1, dtype=np.int64)
        for c, i in lut.items():
            out[code == c] = i
        if (out < 0).any():
            bad = np.unique(rgb[out < 0].reshape(-1, 3), axis=0)[:3].tolist()
            raise ValueError(f"{path}: colours {bad} are not in the palette {list(map(list, palette))}")
        return out
    if mask_format == "binary":
        a = np.asarray(img.convert("RGB") if layout == "kvasir" else img)
        a = a.mean(-1) >= 128 if layout == "kvasir" else (a.max(-1) if a.ndim == 3 else a) > 0
        return a.astype(np.int64)
    if img.mode not in ("L", "P", "I", "1") and not img.mode.startswith("I;16"):
        raise ValueError(f"{path}: an index mask must be single-channel (mode L/P), got {img.mode}; "
                         f"use mask_format=color with a palette for RGB masks")
    a = np.asarray(img).astype(np.int64)
    if a.min() < 0:
        raise ValueError(f"{path}: label {int(a.min())} is negative (labels must be 0..K)")
    if a.max() > num_classes:
        raise ValueError(f"{path}: label {int(a.max())} is above num_classes={num_classes} "
                         f"(labels must be 0..K); set task.num_classes or use mask_format=binary")
    return a


def read_image(path: Path) -> np.ndarray:
    """``(H, W, 3)`` float32 in 0..1 at the file's real bit depth (16-bit / float TIFFs included)."""
    return read_rgb(path)


# ---------------------------------------------------------------------- joint augmentation
@dataclass
class JointAugment:
    """SAMed's ``RandomGenerator``, on tensors: with p 0.5 a random 90° rotation (k ∈ 0..3) and a
    flip along a random axis; otherwise with p 0.5 (so 0.25 overall) a rotation by an integer angle in
    [-20, 20) with nearest sampling for image and mask (SAMed uses order 0 for both)."""

    enabled: bool = True

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.enabled:
            return image, mask
        if rng.random() > 0.5:
            k = rng.randint(0, 3)
            image, mask = torch.rot90(image, k, (-2, -1)), torch.rot90(mask, k, (-2, -1))
            axis = rng.randint(0, 1)
            image, mask = image.flip(-1 - axis), mask.flip(-1 - axis)
        elif rng.random() > 0.5:
            from torchvision.transforms.v2.functional import InterpolationMode, rotate

            angle = float(rng.randint(-20, 19))
            image = rotate(image, angle, interpolation=InterpolationMode.NEAREST)
            mask = rotate(mask[None], angle, interpolation=InterpolationMode.NEAREST)[0]
        return image.contiguous(), mask.contiguous()


def resize_pair(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image bicubic (SAMed zooms with order 3), mask nearest."""
    if image.shape[-1] != size or image.shape[-2] != size:
        image = F.interpolate(image[None], size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    if mask.shape[-1] != size or mask.shape[-2] != size:
        mask = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
    return image, mask


def resize_labels(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W)`` labels to ``size`` with nearest sampling (SAMed's low-res label)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


class FolderSegDataset(Dataset):
    """2-D image/mask pairs of one layout and split, resized to ``img_size``."""

    def __init__(self, pairs: list[tuple[Path, Path]], num_classes: int, img_size: int, mask_format: str = "index",
                 palette=None, layout: str = "folder", augment: bool = False, seed: int = 0):
        self.pairs, self.num_classes, self.img_size = pairs, int(num_classes), int(img_size)
        self.mask_format, self.palette, self.layout = mask_format, palette, layout
        self.augment, self.seed, self.epoch = JointAugment(augment), seed, 0

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ip, mp = self.pairs[i]
        image = read_image(ip)
        mask = read_mask(mp, self.mask_format, self.num_classes, self.palette, self.layout)
        if image.shape[:2] != mask.shape:
            raise ValueError(f"image {ip.name} is {image.shape[1]}x{image.shape[0]} but its mask {mp.name} is "
                             f"{mask.shape[1]}x{mask.shape[0]}: image and mask must have the same size")
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(mask)

    def __getitem__(self, i: int):
        image, mask = self.load(i)
        image, mask = resize_pair(image, mask, self.img_size)
        image, mask = self.augment(image, mask, random.Random(hash((self.seed, self.epoch, i))))
        return image, mask


# ---------------------------------------------------------------------- Synapse
def read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"list file not found: {path} (the Synapse layout needs lists/lists_Synapse/"
                                f"train.txt and test_vol.txt, one slice / case name per line)")
    # a list is data: a name with '..' or an absolute one must not make a reader open a file outside the folder
    return [check_inside(ln.strip(), f"{path}:{i}", "the Synapse folder") for i, ln in
            enumerate(read_text(path, "list file").splitlines(), start=1) if ln.strip()]


def synapse_list(root: Path, name: str) -> Path:
    for cand in (root / "lists" / "lists_Synapse" / name, root / "lists" / name, root / name):
        if cand.is_file():
            return cand
    return root / "lists" / "lists_Synapse" / name


class SynapseSlices(Dataset):
    """``train_npz/<name>.npz`` slices (grey ``image`` in [0, 1], ``label``) listed in ``list_file``."""

    def __init__(self, root: str | os.PathLike, names: list[str], num_classes: int, img_size: int,
                 augment: bool = False, seed: int = 0):
        self.root, self.names = Path(root), names
        self.num_classes, self.img_size = int(num_classes), int(img_size)
        self.augment, self.seed, self.epoch = JointAugment(augment), seed, 0

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        path = self.root / "train_npz" / f"{self.names[i]}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed but missing")
        image, label = read_slice(path)
        check_labels(label, self.num_classes, path)
        img = torch.from_numpy(image)[None].repeat(3, 1, 1)
        img, mask = resize_pair(img, torch.from_numpy(label), self.img_size)
        return self.augment(img, mask, random.Random(hash((self.seed, self.epoch, i))))


def read_slice(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A Synapse ``.npz`` slice: (image float32 in 0..1, label int64); a corrupt file, a missing key,
    NaN/inf or an image outside 0..1 (TransUNet's slices are normalised; 0..255 would be silently
    255 times too bright) is one error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed but missing")
    with reading(path, "Synapse slice (.npz with 'image' and 'label')"), np.load(path, allow_pickle=False) as z:
        image, label = z["image"].astype(np.float32), z["label"]
    check_unit_range(image, path, "image values")
    return image, integer_labels(label, path)


def integer_labels(label: np.ndarray, where) -> np.ndarray:
    """``label`` as int64; NaN/inf or fractional labels are refused (a cast would truncate them)."""
    if label.dtype.kind == "f":
        check_finite(label, where, "labels")
        if not np.array_equal(label, np.round(label)):
            raise DataFileError(f"{where}: labels must be integers, found fractional values")
    return label.astype(np.int64)


def check_labels(label: np.ndarray, num_classes: int, where) -> None:
    if label.size and (label.max() > num_classes or label.min() < 0):
        raise ValueError(f"{where}: labels {int(label.min())}..{int(label.max())} are outside 0..{num_classes} "
                         f"(num_classes={num_classes} foreground classes)")


def read_volume(root: str | os.PathLike, case: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``test_vol_h5/<case>.npy.h5`` -> (image, label) ``(D, H, W)``."""
    import h5py

    path = Path(root) / "test_vol_h5" / f"{case}.npy.h5"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed but missing")
    with reading(path, "Synapse volume (.h5 with 'image' and 'label')"), h5py.File(path, "r") as f:
        image, label = f["image"][:].astype(np.float32), f["label"][:]
    check_unit_range(image, path, "image values")
    label = integer_labels(label, path)
    if image.shape != label.shape or image.ndim != 3:
        raise ValueError(f"{path}: image {image.shape} and label {label.shape} must both be (D, H, W)")
    check_labels(label, num_classes, path)
    return image, label


@torch.no_grad()
def samed_round_trip(slices: np.ndarray, input_size: int, img_size: int) -> np.ndarray:
    """SAMed ``test_single_volume`` with ``--input_size`` (224) and ``--img_size`` (512): every ``(H, W)`` slice is
    zoomed to ``input_size`` then to ``img_size`` (``scipy.ndimage.zoom``, order 3, each step only when the size
    differs), so a 512-pixel CT slice reaches the model through a 224-pixel bottleneck."""
    from scipy.ndimage import zoom

    out = []
    for sl in slices:
        x, y = sl.shape
        if (x, y) != (input_size, input_size):
            sl = zoom(sl, (input_size / x, input_size / y), order=3)
        if sl.shape != (img_size, img_size):
            sl = zoom(sl, (img_size / sl.shape[0], img_size / sl.shape[1]), order=3)
        out.append(sl)
    return np.stack(out).astype(np.float32)


def predict_volume(predict_slices, image: np.ndarray, img_size: int, batch: int = 8,
                   label: np.ndarray | None = None, input_size: int | None = None) -> np.ndarray:
    """SAMed ``test_single_volume``: each slice resized to ``img_size`` (bicubic), repeated to 3
    channels, ``predict_slices(x) -> (b, h, w)`` labels, resized back (nearest) and stacked ``(D, H, W)``.

    With ``label`` (the volume's ground truth, for prompted mode) it is ``predict_slices(x, y)``, ``y``
    the same slices' labels resized to ``img_size`` (nearest), as the 2-D path builds its prompts
    from the mask at the input size.

    ``input_size`` (the SAMed recipe: 224) reproduces SAMed's round trip through that size
    (:func:`samed_round_trip`) instead of the single bicubic resize."""
    D, H, W = image.shape
    if label is not None and label.shape != image.shape:
        raise ValueError(f"volume label {label.shape} and image {image.shape} differ in shape")
    out = np.zeros((D, H, W), dtype=np.int64)
    for s in range(0, D, batch):
        if input_size:
            x = torch.from_numpy(samed_round_trip(np.asarray(image[s:s + batch]), int(input_size), img_size))[:, None]
            x = x.repeat(1, 3, 1, 1)
        else:
            x = torch.from_numpy(image[s:s + batch])[:, None].repeat(1, 3, 1, 1)
            x = F.interpolate(x, size=(img_size, img_size), mode="bicubic", align_corners=False) if H != img_size or W != img_size else x
        if label is None:
            lab = predict_slices(x)
        else:
            lab = predict_slices(x, resize_labels(torch.from_numpy(np.asarray(label[s:s + batch])).long(),
                                                  (img_size, img_size)))
        lab = resize_labels(lab.cpu(), (H, W))
        out[s:s + batch] = lab.numpy()
    return out


# ---------------------------------------------------------------------- writing masks
DEFAULT_PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                   (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60)]


def save_mask_png(path: str | os.PathLike, labels: np.ndarray, palette=None) -> None:
    """An index PNG (mode P with a palette, so it reads back as class ids and views in colour)."""
    from PIL import Image

    pal = [c for rgb in (palette or DEFAULT_PALETTE) for c in rgb]
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(pal + [0] * (768 - len(pal)))
    _save_atomic(img, Path(path))


def save_overlay_png(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray, alpha: float = 0.45,
                     palette=None) -> None:
    """Image ``(H, W, 3)`` in [0, 1] with the classes blended in colour (:func:`overlay`)."""
    from PIL import Image

    _save_atomic(Image.fromarray((overlay(image, labels, alpha, palette) * 255).astype(np.uint8)), Path(path))


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45, palette=None) -> np.ndarray:
    """``(H, W, 3)`` in [0, 1]: the image with each class ``k > 0`` blended in ``palette[k]``."""
    pal = np.array(palette or DEFAULT_PALETTE, dtype=np.float32) / 255.0
    col = pal[labels % len(pal)]
    a = np.where(labels[..., None] > 0, alpha, 0.0)
    return (image * (1 - a) + col * a).clip(0, 1)


def _save_atomic(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
