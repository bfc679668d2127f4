"""Temporary folders of data generation, and cleaning up the ones a killed run left behind.

Generators write into a hidden temporary folder beside the final one and rename it into place, so
a reader never sees half a dataset. A run killed meanwhile (``kill -9``, out of memory, a cluster
time limit) leaves that folder behind; the next generation in the same place removes the stale
ones. A folder is stale when the process that made it (its name records the pid and host) is gone
from this host, or, for folders of another host or older names without a pid, when it has not
changed for :data:`STALE_AFTER_S` seconds.
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
from pathlib import Path

# the owner-recording names and the staleness rule are zoo's (zoo.io's temporary files follow them too)
from zoo.tempnames import STALE_AFTER_S, is_stale, owner_tag  # noqa: F401
from zoo.tempnames import host as _host  # noqa: F401


def clean_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove the stale ``parent/<prefix>*`` folders (see the module docstring); returns them."""
    removed = []
    if not Path(parent).is_dir():
        return removed
    for p in Path(parent).glob(glob.escape(prefix) + "*"):
        if p.is_dir() and not p.is_symlink() and is_stale(p, prefix):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def staging_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new temporary folder ``parent/<prefix><pid>@<host>~<random>``, after removing stale ones."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(parent, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{owner_tag()}", dir=parent))
