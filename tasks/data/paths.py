"""Paths read from data lists (VTAB lists, few-shot split files, caption ids) stay inside the data root.

A list file is data: a line such as ``../../home/user/.ssh/id_rsa 0`` or an absolute path must not
make a reader open a file outside the dataset's folder. The check is on the text (an absolute path
or a ``..`` component), so a dataset folder that is itself a symbolic link keeps working.
"""
from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath


def check_inside(rel: str, where: str, root: object = "the data folder") -> str:
    """``rel`` if it is a relative path without ``..``; else a ValueError naming ``where`` (file:line)."""
    text = str(rel)
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if not text or PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() or ".." in parts:
        raise ValueError(f"{where}: the path {text!r} leaves {root}: list paths must be relative to it, "
                         f"without '..'")
    return text
