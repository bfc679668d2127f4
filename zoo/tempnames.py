"""Temporary names that say who made them, and removing the ones a killed writer left behind.

A writer puts its work in a hidden temporary file or folder beside the destination and renames it into
place (:mod:`zoo.io`, the data generators' ``tasks.data.staging``). A writer killed meanwhile (``kill -9``,
out of memory, a cluster time limit) leaves that temporary behind, and nothing else ever removes it. Its
name is ``<prefix><pid>@<host>~<random>``, so the next writer in the same place can tell: a temporary is
stale when the process that made it is gone from this host; one of another host, or with an older name
that records no owner, when it has not changed for :data:`STALE_AFTER_S` seconds (the writer may still
be running elsewhere). Torch-free (``tasks.data.staging`` imports it).
"""
from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

STALE_AFTER_S = 6 * 3600
_OWNER = re.compile(r"^(\d+)@([A-Za-z0-9_.-]+)~")


def host() -> str:
    """This host's name with only ``[A-Za-z0-9_.-]`` (it goes into file names)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def owner_tag() -> str:
    """``<pid>@<host>~``: what a temporary name records after its prefix."""
    return f"{os.getpid()}@{host()}~"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def is_stale(path: Path, prefix: str, now: float | None = None) -> bool:
    """Whether the temporary ``path`` (named ``<prefix>...``) was left by a writer that is gone (module docstring)."""
    m = _OWNER.match(path.name[len(prefix):])
    if m and m.group(2) == host():
        return not alive(int(m.group(1)))
    try:
        age = (now or time.time()) - path.lstat().st_mtime
    except OSError:
        return False
    return age > STALE_AFTER_S
