"""Temporary folders of data generation, and cleaning up the ones a killed run left behind.

Generators write into a hidden temporary folder beside the final one and rename it into place, so
a reader never sees half a dataset. A run killed meanwhile (``kill -9``, out of memory, a cluster
time limit) leaves that folder behind; the next generation in the same place removes the stale
ones. A folder is stale when the process that made it (its name records the pid and host) is gone
from this host, or, for folders of another host or older names without a pid, when it has not
changed for :data:`STALE_AFTER_S` seconds.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

STALE_AFTER_S = 6 * 3600
_OWNER = re.compile(r"^(\d+)@([A-Za-z0-9_.-]+)~")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def is_stale(folder: Path, prefix: str, now: float | None = None) -> bool:
    m = _OWNER.match(folder.name[len(prefix):])
    if m and m.group(2) == _host():
        return not _alive(int(m.group(1)))
    try:
        age = (now or time.time()) - folder.stat().st_mtime
    except OSError:
        return False
    return age > STALE_AFTER_S


def clean_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove the stale ``parent/<prefix>*`` folders (see the module docstring); returns them."""
    removed = []
    if not Path(parent).is_dir():
        return removed
    for p in Path(parent).glob(glob_escape(prefix) + "*"):
        if p.is_dir() and not p.is_symlink() and is_stale(p, prefix):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def staging_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new temporary folder ``parent/<prefix><pid>@<host>~<random>``, after removing stale ones."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(parent, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}@{_host()}~", dir=parent))
