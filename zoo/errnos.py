"""The errors of the environment rather than of the code (a full disk, a quota, ``ulimit -f``, a read-only or
forbidden folder), in words: one table for every command line that reports them as one line naming the path
(:func:`zoo.io.describe_os_error`, ``tasks.runner.user_errors``, ``python -m zoo``, and the run-folder check
``tasks.run_folder`` that Hydra imports for every command).

Plain Python, no torch: ``tasks.run_folder`` imports it before anything else has been decided, and ``zoo``'s
``__init__`` imports its submodules only on first use, so ``import zoo.errnos`` stays light.
"""
from __future__ import annotations

import errno

WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file size limit such as `ulimit -f` is reached)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
}


def is_environment_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in WRITE_ERRNOS


def in_words(e: OSError) -> str:
    """The reason in words: the table's for an error of the environment, else the system's own message."""
    return WRITE_ERRNOS.get(e.errno, e.strerror or str(e))
