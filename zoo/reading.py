"""Reading data files so that a bad file is one line naming it, never a stack trace or a silent wrong value.

Every reader in ``tasks/data`` and ``zoo.predict`` opens its files inside :func:`reading`: whatever a decoder raises
(PIL's ``OSError`` for a truncated PNG, ``zipfile.BadZipFile`` for a truncated ``.npz``, h5py's
``OSError``/``KeyError``, numpy's ``ValueError``, ``EOFError``, ``UnpicklingError``) becomes a
:class:`DataFileError` whose message starts with the file's path; the runner prints it as one line.

Images are read at their real bit depth (:func:`image_to_unit`): 8-bit modes are divided by 255, 16-bit
modes (``I;16*``, PNG/TIFF) by 65535, and float images (``F``, TIFF) are used as they are when they lie in
0..1 and refused otherwise — converting them with PIL's ``convert("RGB")`` clips 16-bit values to white
and float values to black. :func:`check_finite` refuses NaN/inf in any array, naming the file.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image


class DataFileError(ValueError):
    """A data file that cannot be read or holds unusable values; the message names the file."""


# What decoders raise for a corrupt, truncated or mislabelled file (h5py raises OSError and KeyError).
DECODE_ERRORS = (OSError, KeyError, ValueError, IndexError, TypeError, EOFError, zipfile.BadZipFile,
                 pickle.UnpicklingError, RuntimeError)


@contextmanager
def reading(path: str | os.PathLike, what: str = "file"):
    """Turn any decoding error raised inside the block into a :class:`DataFileError` naming ``path``.

    A missing file stays a ``FileNotFoundError`` (its message already names the path); errors the
    project raised on purpose (:class:`DataFileError`) pass through unchanged.
    """
    try:
        yield
    except (DataFileError, FileNotFoundError):
        raise
    except DECODE_ERRORS as e:
        raise DataFileError(f"{path}: cannot read this {what} ({type(e).__name__}: {e}); "
                            "replace or delete the file") from None


def check_finite(arr: np.ndarray, where: str | os.PathLike, what: str = "values") -> np.ndarray:
    """``arr`` unchanged, or a :class:`DataFileError` naming ``where`` and how many entries are NaN/inf."""
    a = np.asarray(arr)
    if a.dtype.kind in "fc":
        bad = ~np.isfinite(a)
        if bad.any():
            raise DataFileError(f"{where}: {int(bad.sum())} of {a.size} {what} are NaN or inf; "
                                "fix or remove this file")
    return arr


def check_unit_range(arr: np.ndarray, where: str | os.PathLike, what: str = "pixel values") -> np.ndarray:
    """Float data meant to lie in 0..1: refuse NaN/inf and values outside (e.g. a 0..255 array
    that would otherwise be clipped to 1 or fed to the model 255 times too bright)."""
    check_finite(arr, where, what)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise DataFileError(f"{where}: {what} range {lo:g}..{hi:g}, expected 0..1 "
                            "(store floats scaled to 0..1, or integers as uint8 / uint16)")
    return arr


_8BIT = {"1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa", "RGBX"}


def image_to_unit(im: Image.Image, path: str | os.PathLike) -> np.ndarray:
    """An opened PIL image as float32 ``H x W x 3`` in 0..1, at its real bit depth (see the module docstring)."""
    mode = im.mode
    if mode in _8BIT:
        return np.asarray(im.convert("RGB"), np.float32) / 255.0
    a = np.asarray(im)
    if mode.startswith("I;16") or mode == "I":
        if a.min() < 0 or a.max() > 65535:
            raise DataFileError(f"{path}: integer image values {int(a.min())}..{int(a.max())} do not fit 16 bits; "
                                "save it as 8- or 16-bit")
        a = a.astype(np.float32) / 65535.0
    elif mode == "F":
        a = check_unit_range(a.astype(np.float32), path)
    else:
        raise DataFileError(f"{path}: unsupported image mode {mode!r}; save it as 8- or 16-bit RGB or grayscale")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3], dtype=np.float32)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as float32 ``H x W x 3`` in 0..1 (bit depth respected; a bad file named)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with reading(path, "image"), Image.open(path) as im:
        im.load()
        return image_to_unit(im, path)


def read_rgb_pil(path: str | os.PathLike) -> Image.Image:
    """The image at ``path`` as an 8-bit RGB PIL image for PIL-based transforms: 8-bit files are
    converted as PIL does; 16-bit and float files are scaled from their real range (not clipped)."""
    path = Path(path)
    with reading(path, "image"), Image.open(path) as im:
        im.load()
        if im.mode in _8BIT:
            return im.convert("RGB")
        return Image.fromarray((image_to_unit(im, path) * 255.0 + 0.5).astype(np.uint8), "RGB")


def read_text(path: str | os.PathLike, what: str = "text file") -> str:
    """The text of a list / caption / CSV file; a binary or undecodable file is one error naming it
    (``UnicodeDecodeError`` used to surface without the path)."""
    path = Path(path)
    with reading(path, what):
        return path.read_text(encoding="utf-8")
