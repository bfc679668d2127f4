"""Atomic file writes (a reader, or a crashed writer, never sees a half-written file) and reading a JSON
object file with one error naming it.

Every file the project writes goes through :func:`atomic_path`: the content is written to a
uniquely named temporary file in the destination's own folder (same filesystem, so the final
``os.replace`` is atomic), flushed to disk, and only then renamed over the destination. On any
error the temporary file is removed and the previous file, if any, is untouched. A temporary's name,
``.<name>.<pid>@<host>~<random>.tmp``, records its writer (:mod:`zoo.tempnames`), so the one a killed
writer left behind is removed by the next :func:`write_together` of that name (:func:`clean_stale_temporaries`).
"""
from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

# the errors of the environment in words: a torch-free module (tasks.run_folder needs them before torch);
# is_environment_error is re-exported for the callers that have always found it here
from zoo.errnos import WRITE_ERRNOS, in_words, is_environment_error  # noqa: F401
from zoo.tempnames import is_stale, owner_tag


@contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on a clean exit it replaces ``dest`` atomically."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(dest.name) + owner_tag(), suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            yield tmp
        except OSError as e:
            if e.errno is not None and e.filename is None:  # a failed write() names no file: name the destination
                raise OSError(e.errno, e.strerror, str(dest)) from e
            raise
        _fsync(tmp)
        # mkstemp creates 0600; the file gets the mode open() would give it (0666 less the umask), so a
        # published zoo folder can be served by a web server and shared within a lab
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json_object(file: str | os.PathLike, error: type[Exception], hint: str) -> dict[str, Any]:
    """The JSON object in ``file``; anything else (not UTF-8, not JSON, not an object) is one ``error``
    naming the file, ending with ``hint`` (what to do about it). The file is left as it is."""
    file = Path(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise error(f"{file}: not valid JSON ({type(e).__name__}: {e}); {hint}") from None
    if not isinstance(data, dict):
        raise error(f"{file}: expected a JSON object, got {type(data).__name__}; {hint}")
    return data


def describe_os_error(e: OSError) -> str:
    """``cannot write <path>: no space left on the device`` (the path when the error names one)."""
    verb = "cannot access" if e.errno in (errno.EACCES, errno.EPERM, errno.ENOTDIR) else "cannot write"
    why = in_words(e)
    where = f" {e.filename}" if e.filename else ""
    return f"{verb}{where}: {why}" + ("; the files already there are left as they were" if e.errno in WRITE_ERRNOS else "")


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide, and threads may be creating files)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries (its renames and removals), to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems do not support fsync; the rename is still atomic
        pass


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _temp_prefix(name: str) -> str:
    return f".{name}."


def clean_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Remove the temporaries of ``names`` in ``folder`` that a killed writer left (:func:`atomic_path`'s
    files, :func:`write_together`'s folders); returns them.

    Only names of exactly that form, ``.<name>.[<pid>@<host>~]<8 random characters>.tmp`` (the older
    ones without an owner too), and only stale ones (:func:`zoo.tempnames.is_stale`: the writer's process
    is gone from this host; else unchanged for hours): a writer still at work, or any other file, stays.
    """
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for name in dict.fromkeys(names):
        prefix = _temp_prefix(name)
        ours = re.compile(re.escape(prefix) + r"(?:\d+@[A-Za-z0-9_.-]+~)?[a-z0-9_]{8}\.tmp")  # mkstemp's 8 characters
        for p in folder.glob(glob.escape(prefix) + "*.tmp"):
            if not ours.fullmatch(p.name) or not is_stale(p, prefix):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_together(folder: str | os.PathLike, files: dict[str, bytes | Callable[[Path], Any]], last: str,
                   stale: Iterable[str] = ()) -> Path:
    """Write ``files`` into ``folder`` as one set: a reader never finds new files beside old ones.

    ``files`` maps a name to its bytes, or to a function that writes the file at the path it is given (and
    may write files beside it, e.g. ONNX's external ``model.onnx.data``: they are part of the set).
    ``last`` names the file whose presence makes the folder what it is (peft's ``adapter_config.json``: peft
    takes a folder without it for no adapter). Every file is first written in full to a temporary folder
    inside ``folder`` (same file system, fsynced): a failure there (a full disk, ``ulimit -f``) leaves
    ``folder`` as it was. Then the old ``last`` and the ``stale`` names this set does not write (files of
    an earlier set of another kind) are removed, the other files renamed into place, and ``last`` renamed
    in at the end: a crash in between leaves a folder without ``last``, which its readers refuse, never a
    ``last`` that describes other files. Stale temporaries of these names that a killed writer left are
    removed first (:func:`clean_stale_temporaries`). Returns ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(folder, [*files, last, *stale])
    name = ""  # what a failure names: the folder, until a file is being written
    try:
        stage = Path(tempfile.mkdtemp(prefix=_temp_prefix(last) + owner_tag(), suffix=".tmp", dir=folder))
        try:
            for name, data in files.items():
                if callable(data):
                    data(stage / name)
                else:
                    atomic_write_bytes(stage / name, data)  # fsynced
            written = sorted(p.name for p in stage.iterdir())
            for f in written:
                if callable(files.get(f)) or f not in files:  # a writer function's files (and what it wrote beside)
                    _fsync(stage / f)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    except OSError as e:  # name the file the caller asked for, not its temporary copy
        raise OSError(e.errno, e.strerror, str(folder / name)) from e
    if last not in written:
        shutil.rmtree(stage, ignore_errors=True)
        raise ValueError(f"write_together: the set written to {folder} has no {last!r} (it has {written})")
    try:
        for name in (last, *(n for n in stale if n not in written)):
            (folder / name).unlink(missing_ok=True)
        for name in written:
            if name != last:
                os.replace(stage / name, folder / name)
        _fsync(folder)  # the removals and renames reach the disk before `last` does
        os.replace(stage / last, folder / last)
    except OSError as e:  # errno None: not "the files already there are left as they were" (describe_os_error)
        raise OSError(None, f"{e.strerror or e}; {folder} is left without {last}, an incomplete set that readers "
                            f"refuse: write it again", e.filename) from e
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return folder


def check_finite(state: dict[str, torch.Tensor], where: str | os.PathLike, limit: float | None = None) -> None:
    """Refuse tensors with NaN/inf (a diverged run's artifact, a corrupt file), naming the file; with ``limit``
    also finite values beyond ±limit (no trained adapter comes near 1e15; such values overflow to inf/NaN in
    the first matrix product, so the model would only ever output NaN)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{where}: {len(bad)} tensor(s) contain NaN or inf, e.g. {bad[:5]} "
                         f"(the run that wrote it diverged, or the file is corrupt); refusing to load it")
    if limit is not None:
        huge = [k for k, v in state.items() if v.is_floating_point() and v.numel() and float(v.abs().max()) > limit]
        if huge:
            raise ValueError(f"{where}: {len(huge)} tensor(s) hold values beyond ±{limit:g}, e.g. {huge[:5]} (the run "
                             f"that wrote it diverged, or the file is corrupt); refusing to load it")


def safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """``safetensors.torch.save`` with the ``__metadata__`` entries in sorted order.

    safetensors keeps the metadata in a Rust ``HashMap``, so with two or more entries their order
    in the header (and so the file's bytes and sha256) changes from one save to the next even for
    equal tensors. The header is rewritten with the entries sorted (same length, same tensors), so
    equal states give byte-identical files (``make demo`` twice gives the same artifacts).
    """
    import json

    from safetensors.torch import save

    data = save(state, metadata=metadata)
    if not metadata or len(metadata) < 2:
        return data
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps({"__metadata__": header.pop("__metadata__"), **header}, separators=(",", ":"),
                      ensure_ascii=False).encode()
    if len(text) > n:  # cannot happen for the same entries; keep safetensors' own bytes then
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n:]
