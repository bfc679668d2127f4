"""Sweep folders: a failed multirun leaves no empty ``logs/multiruns/<date>/`` behind.

Hydra creates the sweep folder (with ``multirun.yaml``) before the first job starts; when every job
fails before writing its own folder (a config mistake), the folder would stay, empty. The callback
remembers the folder; :func:`remove_if_empty` (``train.py`` calls it on the way out, success or
failure) deletes it when it holds no job folder, and says so.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

_sweep_dirs: list[Path] = []


class RememberSweepDir(Callback):
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        _sweep_dirs.append(Path(str(config.hydra.sweep.dir)))


def remove_if_empty() -> list[Path]:
    """Delete the remembered sweep folders that hold no job folder; returns them."""
    gone = []
    while _sweep_dirs:
        d = _sweep_dirs.pop()
        if d.is_dir() and not any(p.is_dir() for p in d.iterdir()):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
            print(f"removed the empty sweep folder {d} (no job started)", file=sys.stderr)
    return gone
