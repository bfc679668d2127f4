"""Downloads into the cache, verified by size and sha256, and re-verification (see :mod:`zoo.hub`)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Iterable

from zoo.hub.registry import (
    _CHUNK, _HTTP_TIMEOUT, ENV_OFFLINE, DownloadError, Entry, FileSpec, IntegrityError, OfflineError, RegistryError,
    _atomic_write_text, _file_url_path, _is_url, _request, cache_dir, check_plain_name, entries, get_entry, is_offline,
)


def _refuse_link(p: Path) -> None:
    if p.is_symlink():
        raise IntegrityError(f"{p} is a symbolic link; the zoo cache holds only plain files and folders it wrote "
                             f"itself (a link could make a download write outside the cache): remove it")


def entry_dir(entry: Entry) -> Path:
    root = (cache_dir() / "entries").resolve()
    d = root / check_plain_name(entry.name) / entry.digest
    _refuse_link(d.parent)
    _refuse_link(d)
    if root not in d.resolve().parents:  # belt and braces: never a folder outside the cache
        raise RegistryError(f"zoo entry {entry.name!r} would be stored outside the cache {root}")
    return d


_STAMP = ".verified.json"  # per entry folder: {file: [size, mtime_ns, inode, ctime_ns, sha256]} of files already hashed


def _stat_key(path: Path) -> list[int]:
    # ctime too: any write (or utime putting the mtime back) sets it, and it cannot be set back by hand
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def check_no_links(entry: Entry, d: Path) -> None:
    """Refuse symbolic links anywhere in the entry's cache folder and at its lock file."""
    _refuse_link(Path(str(d) + ".lock"))
    if d.is_dir():
        for p in d.iterdir():
            _refuse_link(p)


def _read_stamp(d: Path) -> dict[str, list]:
    try:
        data = json.loads((d / _STAMP).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_stamp(d: Path, f: FileSpec) -> None:
    stamp = _read_stamp(d)
    stamp[f.name] = [*_stat_key(d / f.name), f.sha256]
    _atomic_write_text(d / _STAMP, json.dumps(stamp))


def cached_file_ok(d: Path, f: FileSpec, delete: bool = True) -> bool:
    """Whether ``d/f.name`` is the file the registry pins: size, then sha256.

    The sha256 is computed once and remembered with the file's size, mtime and inode, so a warm
    start does not re-hash; any change to the file (same size or not) makes it hash again. A file
    whose hash does not match is deleted (with a warning) so the next download replaces it.
    """
    p = d / f.name
    if p.is_symlink() or not p.is_file():
        return False
    key = _stat_key(p)
    if key[0] != f.size:
        return False
    if _read_stamp(d).get(f.name) == [*key, f.sha256]:
        return True
    sha = sha256_file(p)
    if sha == f.sha256:
        _write_stamp(d, f)
        return True
    if delete:
        p.unlink(missing_ok=True)
        warnings.warn(f"cached {p} does not match its registry sha256 (expected {f.sha256}, got {sha}); deleted "
                      f"so that it is downloaded again", stacklevel=3)
    return False


def is_cached(entry: Entry | str) -> bool:
    """Every file of ``entry`` is in the cache with the pinned size and sha256."""
    entry = get_entry(entry) if isinstance(entry, str) else entry
    try:
        d = entry_dir(entry)
    except IntegrityError:  # a symbolic link in the cache: not cached (download says why)
        return False
    return all(cached_file_ok(d, f) for f in entry.files)


def download(name: str | Entry, force: bool = False, progress: bool | None = None) -> Path:
    """Fetch entry ``name`` into the cache (if needed) and return its folder.

    Safe to call from several processes at once: one downloads, the others wait on the lock and
    then find the files in place. ``progress=None`` shows a bar only on a terminal.
    """
    from filelock import FileLock

    entry = get_entry(name) if isinstance(name, str) else name
    d = entry_dir(entry)
    check_no_links(entry, d)
    if not force and is_cached(entry):
        if entry.kind == "adapter":  # every time, not only after a fresh download
            check_entry_artifact(entry, d)
        return d
    d.mkdir(parents=True, exist_ok=True)
    with FileLock(str(d) + ".lock"):
        check_no_links(entry, d)  # (again, now that we hold the lock)
        for f in entry.files:
            dest = d / f.name
            if not force and cached_file_ok(d, f):
                continue  # another process finished it while we waited for the lock
            _fetch(entry, f, dest, progress)
            _write_stamp(d, f)  # just verified by _fetch
    if entry.kind == "adapter":
        check_entry_artifact(entry, d)
    return d


def _fetch(entry: Entry, f: FileSpec, dest: Path, progress: bool | None) -> None:
    offline = is_offline()
    problems: list[str] = []
    for src in f.sources:
        kind, where = _source(entry, src)
        if offline and kind != "local":
            problems.append(f"{where}: skipped (offline)")
            continue
        try:
            if kind == "local":
                _copy_verified(Path(where), dest, f)
            elif kind == "http":
                _http_download(where, dest, f, progress)
            else:
                _hf_download(src, dest, f)
            return
        except IntegrityError as e:
            problems.append(str(e))
        except DownloadError as e:
            problems.append(f"{where}: {e}")
        except Exception as e:  # hub clients and sockets raise many types; report them plainly
            problems.append(f"{where}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    if offline and all(p.endswith("skipped (offline)") for p in problems):
        raise OfflineError(
            f"zoo entry {entry.name!r} is not in the cache ({entry_dir(entry)}) and offline mode is on "
            f"({ENV_OFFLINE}/HF_HUB_OFFLINE). Unset it to download {f.name} from: "
            + "; ".join(p.rsplit(':', 1)[0] for p in problems)
        )
    err = IntegrityError if any("sha256" in p for p in problems) else DownloadError
    raise err(f"could not fetch {f.name} of zoo entry {entry.name!r}: " + "; ".join(problems))


def _source(entry: Entry, src: dict[str, Any]) -> tuple[str, str]:
    """``(kind, location)`` with relative locations resolved against the registry's own location."""
    if "hf_repo" in src:
        if not src.get("filename"):
            raise RegistryError(f"entry {entry.name!r}: an hf_repo source needs 'filename'")
        rev = f"@{src['revision']}" if src.get("revision") else ""
        return "hf", f"hf://{src['hf_repo']}{rev}/{src['filename']}"
    loc = str(src.get("url") or src.get("path"))
    base = entry.origin
    remote = _is_url(base) and not base.startswith("file:")
    if remote and (loc.startswith("file:") or "path" in src and Path(loc).expanduser().is_absolute()):
        # a registry served over the network names files on its own server, never on this machine
        raise RegistryError(f"entry {entry.name!r} of {base}: the source {loc!r} is a file on this machine; a "
                            "registry read over the network may only name URLs (or paths relative to itself)")
    if _is_url(loc):
        return ("local", _file_url_path(loc)) if loc.startswith("file:") else ("http", loc)
    if "path" in src and Path(loc).expanduser().is_absolute():
        return "local", str(Path(loc).expanduser())
    if remote:
        return "http", urllib.parse.urljoin(base, loc)
    base_dir = Path(_file_url_path(base) if base.startswith("file:") else base).parent if base else Path.cwd()
    return "local", str((base_dir / loc).resolve())


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify_and_commit(tmp: Path, dest: Path, f: FileSpec, source: str) -> None:
    size, sha = tmp.stat().st_size, sha256_file(tmp)
    if size != f.size or sha != f.sha256:
        tmp.unlink(missing_ok=True)
        raise IntegrityError(
            f"{f.name} from {source} does not match the registry and was deleted: "
            f"expected sha256 {f.sha256} ({f.size} bytes), got sha256 {sha} ({size} bytes)"
        )
    os.replace(tmp, dest)


def _copy_verified(src: Path, dest: Path, f: FileSpec) -> None:
    if not src.is_file():
        raise DownloadError(f"file not found: {src}")
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        shutil.copyfile(src, tmp)
        _verify_and_commit(tmp, dest, f, str(src))
    finally:
        tmp.unlink(missing_ok=True)


def _progress_bar(total: int, initial: int, desc: str, enabled: bool | None):
    from tqdm import tqdm  # (tqdm.auto wants ipywidgets inside notebooks)

    disable = None if enabled is None else not enabled  # None: only on a terminal
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=disable, leave=False)


def _http_download(url: str, dest: Path, f: FileSpec, progress: bool | None) -> None:
    """Stream ``url`` to ``dest.part``, resuming a previous partial file with a Range request.

    A resumed file that fails its hash (a stale or corrupt ``.part`` left by an earlier download)
    is deleted and the download starts once more from the beginning, with a warning saying so.
    """
    part = dest.with_name(dest.name + ".part")
    _refuse_link(part)
    resumed = part.is_file() and part.stat().st_size > 0
    try:
        _http_transfer(url, dest, part, f, progress)
    except IntegrityError:
        if not resumed:
            raise
        warnings.warn(f"{part} (a partial file left by an earlier download) did not give the registry's sha256; "
                      f"deleted, and the download started again from the beginning", stacklevel=4)
        part.unlink(missing_ok=True)
        _http_transfer(url, dest, part, f, progress)


def _open_part(part: Path, append: bool):
    """``part`` for writing, never through a symbolic link (O_NOFOLLOW)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(part, flags, 0o644)
    except OSError as e:
        if part.is_symlink():
            _refuse_link(part)
        raise DownloadError(f"cannot write {part}: {e.strerror}") from None
    return os.fdopen(fd, "ab" if append else "wb")


def _http_transfer(url: str, dest: Path, part: Path, f: FileSpec, progress: bool | None) -> None:
    import http.client

    have = part.stat().st_size if part.is_file() else 0
    if have > f.size:  # cannot be a prefix of the right file
        part.unlink()
        have = 0
    if have < f.size:
        headers = {"Range": f"bytes={have}-"} if have else {}
        with urllib.request.urlopen(_request(url, headers), timeout=_HTTP_TIMEOUT) as r:
            if have and r.status != 206:  # the server ignored the Range header: start over
                have = 0
            with _open_part(part, bool(have)) as out, _progress_bar(f.size, have, f.name, progress) as bar:
                while True:
                    try:
                        chunk = r.read(_CHUNK)
                    except http.client.IncompleteRead as e:  # connection dropped: keep what arrived
                        out.write(e.partial)
                        break
                    if not chunk:
                        break
                    out.write(chunk)
                    bar.update(len(chunk))
        got = part.stat().st_size
        if got < f.size:
            raise DownloadError(
                f"transfer ended after {got} of {f.size} bytes; the partial file {part} is kept and the "
                f"next download resumes from it"
            )
    _verify_and_commit(part, dest, f, url)


def _hf_download(src: dict[str, Any], dest: Path, f: FileSpec) -> None:
    """Through huggingface_hub's own cache (so HF tokens, mirrors and HF_HUB_OFFLINE apply), then verified."""
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(repo_id=src["hf_repo"], filename=src["filename"], revision=src.get("revision"),
                           repo_type=src.get("repo_type", "model"))
    _copy_verified(Path(path), dest, f)


def check_entry_artifact(entry: Entry, folder: Path) -> None:
    """The registry's claims (backbone, methods) must agree with the artifact's ``adapter.json``."""
    from zoo.checkpoint import read_adapter_config

    meta = read_adapter_config(folder)
    have = meta.get("backbone", {})
    diffs = [f"backbone.{k}: registry {entry.backbone[k]!r}, artifact {have.get(k)!r}"
             for k in ("family", "model", "weights_tag", "fingerprint") if k in entry.backbone and entry.backbone[k] != have.get(k)]
    want_methods = entry.method_names
    got_methods = [m["name"] for m in meta.get("methods", [])]
    if want_methods and want_methods != got_methods:
        diffs.append(f"method: registry {want_methods}, artifact {got_methods}")
    if diffs:
        raise RegistryError(f"zoo entry {entry.name!r} ({entry.origin}) contradicts its artifact {folder}:\n  " + "\n  ".join(diffs))


def verify(names: Iterable[str] | None = None) -> list[tuple[str, str, bool, str]]:
    """Re-hash the cached files of ``names`` (default: every cached entry).

    Returns ``(entry, file, ok, message)`` rows; a corrupt file is deleted (the next download
    fetches it again).
    """
    rows = []
    all_entries = entries()
    for name in (list(names) if names else sorted(all_entries)):
        entry = get_entry(name)
        d = entry_dir(entry)
        if not d.is_dir():
            if names:
                rows.append((entry.name, "-", False, "not downloaded"))
            continue
        for f in entry.files:
            p = d / f.name
            if not p.is_file():
                rows.append((entry.name, f.name, False, "missing"))
                continue
            sha, size = sha256_file(p), p.stat().st_size
            if sha == f.sha256 and size == f.size:
                _write_stamp(d, f)
                rows.append((entry.name, f.name, True, "ok"))
            else:
                p.unlink()
                rows.append((entry.name, f.name, False,
                             f"deleted: expected sha256 {f.sha256} ({f.size} bytes), got {sha} ({size} bytes)"))
    return rows
