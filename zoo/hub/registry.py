"""Registries: the entry format, where registries are read from, and looking entries up (see :mod:`zoo.hub`)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGISTRY_FORMAT = 1
KINDS = ("adapter", "backbone")
ENV_HOME = "ADAPTERZOO_HOME"
ENV_OFFLINE = "ADAPTERZOO_OFFLINE"
ENV_REGISTRY = "ADAPTERZOO_REGISTRY"
REPO_ROOT = Path(__file__).resolve().parents[2]
PROJECT_REGISTRY = REPO_ROOT / "checkpoints" / "registry.json"
LOCAL_REGISTRY = REPO_ROOT / "checkpoints" / "local_registry.json"
ZOO_PREFIX = "zoo:"
_CHUNK = 1 << 20
_HTTP_TIMEOUT = 60.0


# ---------------------------------------------------------------------------- errors
class HubError(RuntimeError):
    """Base class of every model-zoo error."""


class EntryNotFoundError(HubError, KeyError):
    """No registry has this name; the message lists the names that exist."""

    def __str__(self) -> str:
        return str(self.args[0])


class RegistryError(HubError):
    """A registry file is malformed, or an entry contradicts the artifact it points to."""


class OfflineError(HubError):
    """Offline mode is on and the entry is not in the cache."""


class DownloadError(HubError):
    """No source could deliver a file (network failure, truncated transfer, missing file)."""


class IntegrityError(DownloadError):
    """A downloaded or cached file does not have the size/sha256 the registry pins."""


# ---------------------------------------------------------------------------- entries
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Entry and file names become path components under the cache (entries/<name>/<digest>/<file>) and
# the lock file next to it: only plain names, so a registry cannot write outside $ADAPTERZOO_HOME.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_plain_name(name: Any, what: str = "zoo entry name") -> str:
    """``name`` if it is a plain file/folder name (letters, digits, ``.``, ``_``, ``-``; no path parts)."""
    if not isinstance(name, str) or not _PLAIN_NAME.match(name) or ".." in name:
        raise RegistryError(f"{what} must be a plain name (letters, digits, '.', '_', '-', not starting "
                            f"with '.' and without '..'), got {name!r}")
    return name


@dataclass
class FileSpec:
    name: str
    sha256: str
    size: int
    sources: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "size": self.size, "sources": self.sources}


@dataclass
class Entry:
    name: str
    kind: str
    backbone: dict[str, Any]
    files: list[FileSpec]
    method: list[dict[str, Any]] = field(default_factory=list)
    task: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    licence: str | None = None
    description: str = ""
    origin: str = ""  # the registry location it came from (relative sources resolve against it)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Identifies the exact file set: a changed hash in the registry means a new cache folder."""
        h = hashlib.sha256("".join(f"{f.name}:{f.sha256}\n" for f in sorted(self.files, key=lambda f: f.name)).encode())
        return h.hexdigest()[:16]

    @property
    def task_name(self) -> str:
        if isinstance(self.task, dict):
            return "/".join(str(self.task[k]) for k in ("name", "dataset") if self.task.get(k))
        return str(self.task or "")

    @property
    def method_names(self) -> list[str]:
        return [m.get("name", "?") for m in self.method]

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any], origin: str = "") -> "Entry":
        where = f"entry {name!r} in {origin or 'registry'}"
        check_plain_name(name, f"{where}: the entry name")
        if not isinstance(d, dict):
            raise RegistryError(f"{where}: expected an object, got {type(d).__name__}")
        kind = d.get("kind")
        if kind not in KINDS:
            raise RegistryError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
        bb = d.get("backbone")
        if not isinstance(bb, dict) or not bb.get("family") or not bb.get("model"):
            raise RegistryError(f"{where}: 'backbone' needs at least 'family' and 'model'")
        files = []
        raw_files = d.get("files") or []
        if not isinstance(raw_files, list):
            raise RegistryError(f"{where}: 'files' must be a list of {{name, sha256, size, sources}} objects, "
                                f"got {type(raw_files).__name__}")
        for i, f in enumerate(raw_files):
            if not isinstance(f, dict):
                raise RegistryError(f"{where}: file #{i} must be an object with name, sha256, size, sources, got {f!r}")
            fname, sha, size, sources = f.get("name"), str(f.get("sha256", "")).lower(), f.get("size"), f.get("sources")
            check_plain_name(fname, f"{where}: file #{i} name")
            if not _HEX64.match(sha):
                raise RegistryError(f"{where}: file {fname!r} needs a full 64-hex sha256, got {sha!r}")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise RegistryError(f"{where}: file {fname!r} needs an integer size in bytes, got {size!r}")
            if not isinstance(sources, list) or not sources or \
                    not all(isinstance(s, dict) and ({"url", "path", "hf_repo"} & set(s)) for s in sources):
                raise RegistryError(f"{where}: file {fname!r} needs sources, each with 'url', 'path' or 'hf_repo'+'filename'")
            if any(g.name == fname for g in files):  # two pins for one cache file: each would delete the other
                raise RegistryError(f"{where}: file {fname!r} is listed twice")
            files.append(FileSpec(fname, sha, size, list(sources)))
        if not files:
            raise RegistryError(f"{where}: no files")
        for key, typ in (("method", list), ("metrics", dict)):
            if d.get(key) is not None and not isinstance(d[key], typ):
                raise RegistryError(f"{where}: {key!r} must be a {typ.__name__}, got {type(d[key]).__name__}")
        if not all(isinstance(m, dict) for m in d.get("method") or []):
            raise RegistryError(f"{where}: each 'method' item must be an object {{name, config}}")
        names = [f.name for f in files]
        if kind == "adapter" and not {"adapter.safetensors", "adapter.json"} <= set(names):
            raise RegistryError(f"{where}: an adapter entry needs adapter.safetensors and adapter.json, has {names}")
        if kind == "backbone" and not any(n.endswith((".safetensors", ".pt", ".pth", ".bin")) for n in names):
            raise RegistryError(f"{where}: a backbone entry needs a weights file, has {names}")
        return cls(name=name, kind=kind, backbone=dict(bb), files=files, method=list(d.get("method") or []),
                   task=d.get("task"), metrics=dict(d.get("metrics") or {}), licence=d.get("licence") or d.get("license"),
                   description=d.get("description", ""), origin=origin, raw=d)


# ---------------------------------------------------------------------------- environment
def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() not in ("", "0", "false", "no", "off")


def is_offline() -> bool:
    return _truthy(os.environ.get(ENV_OFFLINE)) or _truthy(os.environ.get("HF_HUB_OFFLINE"))


def cache_dir() -> Path:
    """``$ADAPTERZOO_HOME``, else the platform's user cache dir (``~/.cache/adapterzoo`` on Linux)."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("adapterzoo", appauthor=False))
    except ImportError:  # pragma: no cover - platformdirs ships with our dependencies
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adapterzoo"


_EXTRA_REGISTRIES: list[str] = []


def add_registry(location: str | os.PathLike) -> None:
    """Read ``location`` (a path or URL) too, after the configured registries."""
    loc = str(location)
    if loc not in _EXTRA_REGISTRIES:
        _EXTRA_REGISTRIES.append(loc)


def _split_locations(value: str) -> list[str]:
    """Split ``$ADAPTERZOO_REGISTRY``: ``,``/``;``/whitespace always separate, ``:`` too outside URLs."""
    if os.pathsep == ";":  # Windows: drive letters contain ':'
        return [p for p in re.split(r"[;,\s]+", value) if p]
    url = r"(?:https?|file)://[^\s,;:]*(?::\d+)?[^\s,;:]*"
    return re.findall(rf"{url}|[^:;,\s]+", value)


def registry_locations() -> list[str]:
    locs = [str(PROJECT_REGISTRY)]
    if LOCAL_REGISTRY.is_file():
        locs.append(str(LOCAL_REGISTRY))
    locs += _split_locations(os.environ.get(ENV_REGISTRY, ""))
    locs += _EXTRA_REGISTRIES
    seen, out = set(), []
    for loc in locs:
        if loc not in seen:
            seen.add(loc)
            out.append(loc)
    return out


def _is_url(loc: str) -> bool:
    return urllib.parse.urlparse(loc).scheme in ("http", "https", "file")


_REMOTE_TEXT: dict[str, str] = {}  # remote registries are fetched once per process (entries(refresh=True) re-reads)


def _read_registry_text(loc: str) -> str:
    if not _is_url(loc):
        return Path(loc).expanduser().read_text()
    if loc.startswith("file:"):
        return Path(_file_url_path(loc)).read_text()
    if loc in _REMOTE_TEXT:
        return _REMOTE_TEXT[loc]
    cached = cache_dir() / "registries" / (hashlib.sha256(loc.encode()).hexdigest()[:16] + ".json")
    if is_offline():
        if cached.is_file():
            return cached.read_text()
        raise OfflineError(f"registry {loc} is not cached and offline mode is on")
    try:
        with urllib.request.urlopen(_request(loc), timeout=_HTTP_TIMEOUT) as r:
            text = r.read().decode()
    except Exception as e:
        if cached.is_file():
            warnings.warn(f"could not fetch registry {loc} ({e}); using the cached copy", stacklevel=3)
            return cached.read_text()
        raise
    cached.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(cached, text)
    _REMOTE_TEXT[loc] = text
    return text


def load_registry(loc: str | os.PathLike) -> dict[str, Entry]:
    """Parse one registry; a missing local file is an empty registry."""
    loc = str(loc)
    if not _is_url(loc) and not Path(loc).expanduser().exists():
        return {}
    try:
        data = json.loads(_read_registry_text(loc))
    except json.JSONDecodeError as e:
        raise RegistryError(f"registry {loc} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries", {}), dict):
        raise RegistryError(f"registry {loc}: expected {{'format': {REGISTRY_FORMAT}, 'entries': {{name: entry}}}}")
    if data.get("format", REGISTRY_FORMAT) > REGISTRY_FORMAT:
        raise RegistryError(f"registry {loc} has format {data['format']}; this library reads format {REGISTRY_FORMAT}: upgrade adapter-zoo")
    origin = loc if _is_url(loc) else str(Path(loc).expanduser().resolve())
    out: dict[str, Entry] = {}
    for name, d in data.get("entries", {}).items():
        try:  # one bad entry skips itself, not its whole registry
            out[name] = Entry.from_dict(name, d, origin)
        except RegistryError as e:
            entry_errors[f"{loc}#{name}"] = str(e)
            warnings.warn(f"skipping zoo entry: {e}", stacklevel=2)
    return out


registry_errors: dict[str, str] = {}  # location -> why it could not be read (filled by entries())
entry_errors: dict[str, str] = {}  # "location#name" -> why that entry was skipped


def entries(refresh: bool = False) -> dict[str, Entry]:
    """Every entry of every registry (later registries override earlier names).

    Local registry files are read on every call; remote ones once per process unless ``refresh``.
    """
    out: dict[str, Entry] = {}
    registry_errors.clear()
    entry_errors.clear()
    if refresh:
        _REMOTE_TEXT.clear()
    for loc in registry_locations():
        try:
            out.update(load_registry(loc))
        except Exception as e:  # one broken registry must not hide the others
            registry_errors[loc] = f"{type(e).__name__}: {e}"
            warnings.warn(f"skipping registry {loc}: {e}", stacklevel=2)
    return out


def get_entry(name: str) -> Entry:
    if name.startswith(ZOO_PREFIX):
        name = name[len(ZOO_PREFIX):]
    all_entries = entries()
    if name not in all_entries:
        valid = ", ".join(sorted(all_entries)) or "(none: run `make demo` or set ADAPTERZOO_REGISTRY)"
        extra = "".join(f"\n  (registry {k} could not be read: {v})" for k, v in registry_errors.items())
        extra += "".join(f"\n  (entry {k} was skipped: {v})" for k, v in entry_errors.items()
                         if k.rsplit("#", 1)[-1] == name)
        raise EntryNotFoundError(f"no zoo entry {name!r}; known entries: {valid}{extra}")
    return all_entries[name]


def list_entries(backbone: str | None = None, adapter: str | None = None, task: str | None = None,
                 kind: str | None = None) -> list[Entry]:
    """Entries filtered by backbone (family or model substring), adapter method, task substring, kind."""
    out = []
    for e in entries().values():
        if kind and e.kind != kind:
            continue
        if backbone and backbone not in e.backbone.get("family", "") and backbone not in e.backbone.get("model", ""):
            continue
        if adapter and adapter not in e.method_names:
            continue
        if task and task not in e.task_name:
            continue
        out.append(e)
    return sorted(out, key=lambda e: (e.kind, e.name))


def _file_url_path(url: str) -> str:
    return urllib.request.url2pathname(urllib.parse.urlparse(url).path)


def _request(url: str, headers: dict[str, str] | None = None) -> urllib.request.Request:
    from zoo import __version__

    return urllib.request.Request(url, headers={"User-Agent": f"adapter-zoo/{__version__}", **(headers or {})})


def _atomic_write_text(path: Path, text: str) -> None:
    from zoo.io import atomic_write_text

    atomic_write_text(path, text)
