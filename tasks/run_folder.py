"""A run folder that cannot be written is one line naming it, before Hydra creates anything.

Hydra makes ``hydra.run.dir`` (``hydra.sweep.dir`` for a multirun) and writes ``.hydra/`` and the log
file into it before ``train.py``'s code runs; on a read-only, full or forbidden file system (or under a
path that is a file) that failed inside Hydra with its traceback. :class:`CheckRunFolder` is a Hydra
callback (``conf/hydra/default.yaml``): ``on_run_start`` / ``on_multirun_start`` run after the config is
composed and before the folder is made, so the folder is resolved exactly as Hydra will resolve it.

Plain Python (no torch): Hydra imports it for every command. The reasons in words are
:data:`zoo.errnos.WRITE_ERRNOS`, the table every command line reports write failures with.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from zoo.errnos import in_words  # torch-free, as this module must be

# what the write probe writes: enough that a full disk refuses it (an empty file may still fit in an inode)
PROBE_BYTES = 4096


def _deepest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def writable_folder_error(path: str | os.PathLike, key: str) -> str | None:
    """``None`` when ``path`` (a folder, made later) can be made and written; else the one-line reason.

    The deepest part of ``path`` that exists must be a folder in which a small file can be written
    (then it is removed again): ``os.access`` alone says yes to root on a read-only mount's folders
    and knows nothing of a full disk.
    """
    target = Path(path).absolute()
    where = _deepest_existing(target)
    if not where.is_dir():
        return f"cannot write the run folder {target} ({key}): {where} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=where)
    except OSError as e:
        return _describe(target, key, e)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return _describe(target, key, e)
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    return None


def _describe(target: Path, key: str, e: OSError) -> str:
    return f"cannot write the run folder {target} ({key}): {in_words(e)}; choose a writable place with {key}=<folder>"


def check_writable(path: str | os.PathLike, key: str) -> None:
    """Exit with ``error: cannot write the run folder …`` when ``path`` cannot be made and written."""
    reason = writable_folder_error(path, key)
    if reason is not None:
        # SystemExit, not an Exception: Hydra turns a callback's exceptions into warnings and goes on
        raise SystemExit(f"error: {reason}")


def _resolved(config: Any, key: str) -> str | None:
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(config, key)
    except Exception:  # an interpolation error: Hydra reports it itself, in its own words
        return None
    return None if value is None else str(value)


class CheckRunFolder(Callback):
    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: Any, key: str) -> None:
        path = _resolved(config, key)
        if not path:
            return
        # eval.py writes nothing (run.dir ".", no .hydra/ folder, logs to stdout): an existing folder
        # it only runs in need not be writable
        if key == "hydra.run.dir" and _resolved(config, "hydra.output_subdir") is None and Path(path).is_dir():
            return
        check_writable(path, key)
