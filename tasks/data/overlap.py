"""Train / val / test overlap: the same file in two splits inflates every metric measured on it.

:func:`check_disjoint` compares the files of the splits a reader built: one file listed in two splits
(the same resolved path) is always refused; byte-identical files under different names are refused too,
except where the benchmark itself ships such copies (``identical="warn"``: a warning with the count).
Only files of equal size are hashed, so the check reads little beyond the file sizes.
"""
from __future__ import annotations

import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from zoo.hub import sha256_file
from zoo.reading import DataFileError

PAIRS = (("train", "val"), ("train", "test"))


def _example(a: Iterable[Path]) -> str:
    items = sorted(map(str, a))
    return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")


def check_disjoint(splits: Mapping[str, Sequence[str | os.PathLike]], where: str,
                   pairs: Sequence[tuple[str, str]] = PAIRS, identical: str = "refuse") -> dict[tuple[str, str], int]:
    """Refuse files shared by the splits of each pair; returns ``{pair: number of identical files}``.

    ``splits`` maps a split name to its file paths (missing files are ignored here: the reader names
    them when it reads them). ``identical``: ``refuse`` or ``warn`` for byte-identical files under
    different paths.
    """
    if identical not in ("refuse", "warn"):
        raise ValueError(f"identical={identical!r}; valid: refuse, warn")
    files = {k: {Path(os.path.realpath(p)) for p in v} for k, v in splits.items()}
    sizes: dict[Path, int] = {}
    for fs in files.values():
        for p in fs:
            if p not in sizes:
                try:  # folders (frame folders) and missing files are compared by path only
                    sizes[p] = p.stat().st_size if p.is_file() else -1
                except OSError:
                    sizes[p] = -1
    digests: dict[Path, str] = {}
    counts = {}
    for a, b in pairs:
        if a not in files or b not in files or files[a] is files[b]:
            continue
        same = files[a] & files[b]
        if same:
            raise DataFileError(f"{where}: {len(same)} file(s) are in both the {a} and the {b} split "
                                f"(e.g. {_example(same)}); a file may be in one split only")
        by_size = defaultdict(list)
        for p in files[a]:
            if sizes[p] >= 0:
                by_size[sizes[p]].append(p)
        cand_b = [p for p in files[b] if sizes[p] in by_size]
        if not cand_b:
            counts[(a, b)] = 0
            continue
        for p in cand_b + [q for p in cand_b for q in by_size[sizes[p]]]:
            if p not in digests:
                digests[p] = sha256_file(p)
        in_a = {digests[q]: q for p in cand_b for q in by_size[sizes[p]]}
        dup = [(in_a[digests[p]], p) for p in cand_b if digests[p] in in_a]
        counts[(a, b)] = len(dup)
        if dup:
            msg = (f"{where}: {len(dup)} {b} file(s) are byte-identical to {a} files "
                   f"(e.g. {dup[0][1]} = {dup[0][0]})")
            if identical == "refuse":
                raise DataFileError(msg + "; remove the copies so the splits are disjoint")
            warnings.warn(msg + " (the benchmark ships them so; its numbers are reported as is)", stacklevel=2)
    return counts
