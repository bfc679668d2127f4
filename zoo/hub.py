"""The model zoo: named, hash-pinned adapters and backbone weights, and how to fetch them.

A **registry** is a JSON file (local path or URL)::

    {"format": 1,
     "entries": {
       "vit-demo-lora": {
         "kind": "adapter",                       # or "backbone" (upstream weights)
         "backbone": {"family": "vit", "model": "vit_tiny_patch16_224",
                      "weights_tag": "file:vit_demo.safetensors", "kwargs": {...}, "fingerprint": "..."},
         "method": [{"name": "lora", "config": {"rank": 8, ...}}],
         "task": {"name": "dsprites_loc"}, "metrics": {"val/acc": 0.91}, "licence": "Apache-2.0",
         "files": [{"name": "adapter.safetensors", "sha256": "<64 hex>", "size": 12345,
                    "sources": [{"hf_repo": "org/repo", "filename": "x/adapter.safetensors", "revision": "main"},
                                {"url": "https://example.org/zoo/x/adapter.safetensors"},
                                {"path": "zoo/x/adapter.safetensors"}]}, ...]}}}

Sources are tried in order. ``url`` may be ``http(s)://``, ``file://`` or relative to the registry's
own location (so a lab can serve ``registry.json`` next to its artifacts from any static server);
``path`` is a local path relative to the registry file.

Registries read, later ones overriding earlier names: the project's ``checkpoints/registry.json``,
the quickstart's ``checkpoints/local_registry.json`` (written by ``make demo``), every location in
``$ADAPTERZOO_REGISTRY`` (separated by ``:``/``;``/``,``; URLs allowed) and those added with
:func:`add_registry`.

Downloads go to ``$ADAPTERZOO_HOME`` (default: the user cache dir, e.g. ``~/.cache/adapterzoo``) as
``entries/<name>/<digest>/<files>``. Each file is streamed to a ``.part`` file (resumed with an HTTP
``Range`` request after an interrupted download), its size and sha256 are checked, and only then is
it renamed into place; a per-entry file lock lets several processes (DDP ranks) ask for the same
entry at once. A file whose hash does not match is deleted and the error shows both hashes.
``ADAPTERZOO_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` forbid network access (local sources still work).
Nothing is ever unpickled: adapters are safetensors, upstream weights safetensors or
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

REGISTRY_FORMAT = 1
KINDS = ("adapter", "backbone")
ENV_HOME = "ADAPTERZOO_HOME"
ENV_OFFLINE = "ADAPTERZOO_OFFLINE"
ENV_REGISTRY = "ADAPTERZOO_REGISTRY"
REPO_ROOT = Path(__file__).resolve().parents[1]
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
        if not isinstance(d, dict):
            raise RegistryError(f"{where}: expected an object, got {type(d).__name__}")
        kind = d.get("kind")
        if kind not in KINDS:
            raise RegistryError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
        bb = d.get("backbone")
        if not isinstance(bb, dict) or not bb.get("family") or not bb.get("model"):
            raise RegistryError(f"{where}: 'backbone' needs at least 'family' and 'model'")
        files = []
        for i, f in enumerate(d.get("files") or []):
            fname, sha, size, sources = f.get("name"), str(f.get("sha256", "")).lower(), f.get("size"), f.get("sources")
            if not fname or "/" in fname or "\\" in fname or fname.startswith("."):
                raise RegistryError(f"{where}: file #{i} needs a plain file name, got {fname!r}")
            if not _HEX64.match(sha):
                raise RegistryError(f"{where}: file {fname!r} needs a full 64-hex sha256, got {sha!r}")
            if not isinstance(size, int) or size < 0:
                raise RegistryError(f"{where}: file {fname!r} needs an integer size in bytes, got {size!r}")
            if not sources or not all(isinstance(s, dict) and ({"url", "path", "hf_repo"} & set(s)) for s in sources):
                raise RegistryError(f"{where}: file {fname!r} needs sources, each with 'url', 'path' or 'hf_repo'+'filename'")
            files.append(FileSpec(fname, sha, size, list(sources)))
        if not files:
            raise RegistryError(f"{where}: no files")
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
    return {name: Entry.from_dict(name, d, origin) for name, d in data.get("entries", {}).items()}


registry_errors: dict[str, str] = {}  # location -> why it could not be read (filled by entries())


def entries(refresh: bool = False) -> dict[str, Entry]:
    """Every entry of every registry (later registries override earlier names).

    Local registry files are read on every call; remote ones once per process unless ``refresh``.
    """
    out: dict[str, Entry] = {}
    registry_errors.clear()
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


# ---------------------------------------------------------------------------- downloads
def entry_dir(entry: Entry) -> Path:
    return cache_dir() / "entries" / entry.name / entry.digest


def is_cached(entry: Entry | str) -> bool:
    entry = get_entry(entry) if isinstance(entry, str) else entry
    d = entry_dir(entry)
    return all((d / f.name).is_file() and (d / f.name).stat().st_size == f.size for f in entry.files)


def download(name: str | Entry, force: bool = False, progress: bool | None = None) -> Path:
    """Fetch entry ``name`` into the cache (if needed) and return its folder.

    Safe to call from several processes at once: one downloads, the others wait on the lock and
    then find the files in place. ``progress=None`` shows a bar only on a terminal.
    """
    from filelock import FileLock

    entry = get_entry(name) if isinstance(name, str) else name
    d = entry_dir(entry)
    if not force and is_cached(entry):
        return d
    d.mkdir(parents=True, exist_ok=True)
    with FileLock(str(d) + ".lock"):
        for f in entry.files:
            dest = d / f.name
            if not force and dest.is_file() and dest.stat().st_size == f.size:
                continue  # another process finished it while we waited for the lock
            _fetch(entry, f, dest, progress)
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
    raise err(f"could not fetch {f.name} of zoo entry {entry.name!r}:\n  " + "\n  ".join(problems))


def _source(entry: Entry, src: dict[str, Any]) -> tuple[str, str]:
    """``(kind, location)`` with relative locations resolved against the registry's own location."""
    if "hf_repo" in src:
        if not src.get("filename"):
            raise RegistryError(f"entry {entry.name!r}: an hf_repo source needs 'filename'")
        rev = f"@{src['revision']}" if src.get("revision") else ""
        return "hf", f"hf://{src['hf_repo']}{rev}/{src['filename']}"
    loc = str(src.get("url") or src.get("path"))
    base = entry.origin
    if _is_url(loc):
        return ("local", _file_url_path(loc)) if loc.startswith("file:") else ("http", loc)
    if "path" in src and Path(loc).expanduser().is_absolute():
        return "local", str(Path(loc).expanduser())
    if _is_url(base) and not base.startswith("file:"):
        return "http", urllib.parse.urljoin(base, loc)
    base_dir = Path(_file_url_path(base) if base.startswith("file:") else base).parent if base else Path.cwd()
    return "local", str((base_dir / loc).resolve())


def _file_url_path(url: str) -> str:
    return urllib.request.url2pathname(urllib.parse.urlparse(url).path)


def _request(url: str, headers: dict[str, str] | None = None) -> urllib.request.Request:
    from zoo import __version__

    return urllib.request.Request(url, headers={"User-Agent": f"adapter-zoo/{__version__}", **(headers or {})})


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
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    _verify_and_commit(tmp, dest, f, str(src))


def _progress_bar(total: int, initial: int, desc: str, enabled: bool | None):
    from tqdm import tqdm  # (tqdm.auto wants ipywidgets inside notebooks)

    disable = None if enabled is None else not enabled  # None: only on a terminal
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=disable, leave=False)


def _http_download(url: str, dest: Path, f: FileSpec, progress: bool | None) -> None:
    """Stream ``url`` to ``dest.part``, resuming a previous partial file with a Range request."""
    import http.client

    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if have > f.size:  # cannot be a prefix of the right file
        part.unlink()
        have = 0
    if have < f.size:
        headers = {"Range": f"bytes={have}-"} if have else {}
        with urllib.request.urlopen(_request(url, headers), timeout=_HTTP_TIMEOUT) as r:
            if have and r.status != 206:  # the server ignored the Range header: start over
                have = 0
            with open(part, "ab" if have else "wb") as out, _progress_bar(f.size, have, f.name, progress) as bar:
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
                rows.append((entry.name, f.name, True, "ok"))
            else:
                p.unlink()
                rows.append((entry.name, f.name, False,
                             f"deleted: expected sha256 {f.sha256} ({f.size} bytes), got {sha} ({size} bytes)"))
    return rows


# ---------------------------------------------------------------------------- resolving and loading
def resolve(spec: str | os.PathLike) -> Path:
    """An artifact folder from ``zoo:NAME``, a registry name, or a local artifact folder."""
    s = str(spec)
    if s.startswith(ZOO_PREFIX):
        return download(s[len(ZOO_PREFIX):])
    p = Path(s).expanduser()
    if p.is_dir():
        if not (p / "adapter.json").is_file():
            raise FileNotFoundError(f"{p} is not an adapter artifact folder (no adapter.json)")
        return p
    if p.is_file() and p.name == "adapter.json":
        return p.parent
    try:
        return download(s)
    except EntryNotFoundError as e:
        raise EntryNotFoundError(f"{s!r} is neither a local artifact folder nor a zoo entry: {e}") from None


resolve_init = resolve  # ``adapter.init_from=zoo:NAME`` in train.py


def find_backbone_entry(spec: dict[str, Any]) -> Entry:
    """The ``backbone`` entry that provides the weights an adapter artifact was trained on."""
    cands = [e for e in entries().values() if e.kind == "backbone"
             and all(e.backbone.get(k) == spec.get(k) for k in ("family", "model", "weights_tag"))]
    if spec.get("fingerprint"):
        exact = [e for e in cands if e.backbone.get("fingerprint") == spec["fingerprint"]]
        cands = exact or [e for e in cands if not e.backbone.get("fingerprint")]
    if not cands:
        raise EntryNotFoundError(
            f"no zoo backbone entry provides weights {spec.get('weights_tag')!r} for {spec.get('family')}/{spec.get('model')}"
            f" (fingerprint {str(spec.get('fingerprint'))[:12]}…); pass weights=/path/to/file, or publish them with "
            f"zoo.hub.publish_backbone"
        )
    return cands[-1]


def weights_file(folder: Path) -> Path:
    files = [p for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".pt", ".pth", ".bin")]
    if not files:
        raise FileNotFoundError(f"no weights file in {folder}")
    return files[0]


def build_backbone(spec: dict[str, Any], weights: str | os.PathLike | None = None):
    """Rebuild the backbone an artifact records (family, model, weights, build options)."""
    import zoo

    tag = spec.get("weights_tag")
    kw = dict(spec.get("kwargs") or {})
    family, model = spec["family"], spec["model"]
    if weights is None and tag and str(tag).startswith("file:"):
        weights = weights_file(download(find_backbone_entry(spec)))
    if weights is not None:
        return zoo.create_backbone(family, model=model, pretrained=None, weights=str(weights), **kw)
    if tag is None:
        return zoo.create_backbone(family, model=model, pretrained=None, **kw)
    return zoo.create_backbone(family, model=model, pretrained=tag if family == "clip" else True, **kw)


def from_zoo(name: str, weights: str | os.PathLike | None = None, check_fingerprint: bool = True):
    """Build backbone + adapter + the recorded head (:func:`zoo.heads.build_head_model`: any
    registered head type) from a zoo entry, in eval mode.

    A ``backbone`` entry gives the plain backbone with its weights.
    """
    import zoo  # noqa: F401
    from zoo.checkpoint import read_adapter_config
    from zoo.heads import build_head_model

    s = str(name)
    local = Path(s).expanduser()
    if not s.startswith(ZOO_PREFIX) and local.is_dir():
        folder = local
    else:
        entry = get_entry(s)
        if entry.kind == "backbone":
            w = weights or weights_file(download(entry))
            return build_backbone({**entry.backbone, "weights_tag": None}, weights=w).eval()
        folder = download(entry)
    meta = read_adapter_config(folder)
    bb = build_backbone(meta["backbone"], weights)
    try:
        model = build_head_model(bb, meta.get("head"))  # the head the task kind recorded
    except KeyError as e:
        raise HubError(f"{name}: {e}") from None
    zoo.load_adapter(model, folder, check_fingerprint=check_fingerprint)
    return model.eval()


# ---------------------------------------------------------------------------- publishing
def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def _file_entry(path: Path, sources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": path.name, "sha256": sha256_file(path), "size": path.stat().st_size, "sources": sources}


def _sources_for(path: Path, registry: Path | None, url_base: str | None, hf_repo: str | None,
                 hf_subfolder: str | None) -> list[dict[str, Any]]:
    sources: list[dict[str, Any]] = []
    if hf_repo:
        fn = f"{hf_subfolder.strip('/')}/{path.name}" if hf_subfolder else path.name
        sources.append({"hf_repo": hf_repo, "filename": fn})
    if url_base:
        sources.append({"url": url_base.rstrip("/") + "/" + path.name})
    if not sources:  # a local zoo: relative to the registry when possible, so the folder can move
        if registry is not None:
            try:
                sources.append({"path": os.path.relpath(path.resolve(), registry.resolve().parent)})
            except ValueError:  # another drive (Windows)
                sources.append({"url": path.resolve().as_uri()})
        else:
            sources.append({"url": path.resolve().as_uri()})
    return sources


def add_entry(registry: str | os.PathLike, name: str, entry: dict[str, Any]) -> Path:
    """Add or replace ``name`` in a local registry file (created if missing), under a lock."""
    from filelock import FileLock

    registry = Path(registry)
    Entry.from_dict(name, entry, str(registry))  # validate before writing
    registry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(registry) + ".lock"):
        data = json.loads(registry.read_text()) if registry.is_file() else {"format": REGISTRY_FORMAT, "entries": {}}
        data.setdefault("entries", {})[name] = entry
        _atomic_write_text(registry, json.dumps(data, indent=2) + "\n")
    return registry


def _numbers(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def publish_run(run_dir: str | os.PathLike, name: str, registry: str | os.PathLike | None = None,
                out_dir: str | os.PathLike | None = None, *, url_base: str | None = None,
                hf_repo: str | None = None, hf_subfolder: str | None = None, licence: str | None = None,
                task: str | dict | None = None, description: str = "") -> dict[str, Any]:
    """Package a finished run (``run_dir/adapter/`` + ``run_dir/metrics.json``) as zoo entry ``name``.

    Copies the artifact to ``out_dir`` (default ``checkpoints/zoo/<name>``), writes a model card
    ``README.md`` there, and returns the registry entry (file sizes and sha256). With ``registry``
    the entry is also added to that registry file. Sources: ``url_base``/``hf_repo`` when given
    (where you will upload the folder), otherwise the local folder (relative to ``registry``).
    """
    from zoo.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config

    run_dir = Path(run_dir)
    art = run_dir / "adapter"
    if not (art / WEIGHTS_NAME).is_file() or not (art / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run: expected {art}/{WEIGHTS_NAME} and {CONFIG_NAME}")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", name):
        raise ValueError(f"zoo entry names use letters, digits, '.', '_' and '-', got {name!r}")
    meta = read_adapter_config(art)
    metrics = {}
    if (run_dir / "metrics.json").is_file():
        run_metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics = {k: v for k, v in _numbers(run_metrics).items() if k != "schema_version"}
        if task is None and (run_metrics.get("task") or run_metrics.get("dataset")):
            task = {k: run_metrics[k] for k in ("name", "task", "kind", "dataset", "protocol", "monitor")
                    if run_metrics.get(k) is not None}
            if "task" in task:
                task["name"] = task.pop("task")
    metrics = {**_numbers(meta.get("metrics") or {}), **metrics}
    task = task or meta.get("task")
    out = Path(out_dir) if out_dir is not None else REPO_ROOT / "checkpoints" / "zoo" / name
    out.mkdir(parents=True, exist_ok=True)
    _atomic_copy(art / WEIGHTS_NAME, out / WEIGHTS_NAME)
    _atomic_copy(art / CONFIG_NAME, out / CONFIG_NAME)
    n_params = sum(_numel(s) for s in (meta.get("tensors") or {}).values())
    bb = {k: meta["backbone"].get(k) for k in ("family", "model", "weights_tag", "kwargs", "fingerprint")}
    entry: dict[str, Any] = {
        "kind": "adapter",
        "description": description,
        "backbone": bb,
        "method": meta.get("methods", []),
        "head": meta.get("head"),
        "task": task,
        "metrics": metrics,
        "stored_parameters": n_params,
        "licence": licence,
        "library": meta.get("library"),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    _atomic_write_text(out / "README.md", model_card(name, entry, meta))
    reg = Path(registry) if registry is not None else None
    entry["files"] = [_file_entry(out / fn, _sources_for(out / fn, reg, url_base, hf_repo, hf_subfolder))
                      for fn in (WEIGHTS_NAME, CONFIG_NAME, "README.md")]
    if reg is not None:
        add_entry(reg, name, entry)
    return entry


def publish_backbone(weights: str | os.PathLike, name: str, family: str, model: str,
                     kwargs: dict[str, Any] | None = None, registry: str | os.PathLike | None = None,
                     out_dir: str | os.PathLike | None = None, *, url_base: str | None = None,
                     hf_repo: str | None = None, hf_subfolder: str | None = None, licence: str | None = None,
                     description: str = "") -> dict[str, Any]:
    """Register upstream weights as a ``backbone`` entry (the weights an adapter entry needs).

    The backbone is built once from the file, which checks that the weights fit and records the
    same fingerprint adapters trained on it carry. ``out_dir``: copy the file there first.
    """
    import zoo

    weights = Path(weights)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        dest = Path(out_dir) / weights.name
        if dest.resolve() != weights.resolve():
            _atomic_copy(weights, dest)
        weights = dest
    bb = zoo.create_backbone(family, model=model, pretrained=None, weights=str(weights), **(kwargs or {}))
    desc = bb.describe()
    reg = Path(registry) if registry is not None else None
    entry = {
        "kind": "backbone",
        "description": description,
        "backbone": {k: desc[k] for k in ("family", "model", "weights_tag", "kwargs", "fingerprint")},
        "licence": licence,
        "files": [_file_entry(weights, _sources_for(weights, reg, url_base, hf_repo, hf_subfolder))],
    }
    if reg is not None:
        add_entry(reg, name, entry)
    return entry


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def model_card(name: str, entry: dict[str, Any], meta: dict[str, Any]) -> str:
    bb = entry["backbone"]
    methods = "\n".join(f"- **{m['name']}**: `{json.dumps(m.get('config', {}), sort_keys=True)}`" for m in entry["method"]) or "- (none)"
    metrics = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in entry["metrics"].items())
    task = entry["task"] if not isinstance(entry["task"], dict) else " / ".join(f"{k}: {v}" for k, v in entry["task"].items())
    pre = meta.get("preprocessing") or {}
    return f"""# {name}

{entry.get('description') or 'An adapter trained with Adapter Zoo.'}

| | |
|---|---|
| kind | adapter |
| backbone | `{bb['family']}` / `{bb['model']}` (weights `{bb.get('weights_tag')}`) |
| backbone options | `{json.dumps(bb.get('kwargs') or {}, sort_keys=True)}` |
| base-weight fingerprint | `{bb.get('fingerprint')}` |
| head | `{json.dumps(entry.get('head'), sort_keys=True)}` |
| task | {task or 'unspecified'} |
| stored parameters | {entry['stored_parameters']:,} |
| licence | {entry.get('licence') or 'unspecified'} |
| library | adapter-zoo {(entry.get('library') or {}).get('version', '?')} |

## Methods

{methods}

## Metrics

| metric | value |
|---|---|
{metrics or '| (none) | |'}

## Preprocessing

`{json.dumps(pre, sort_keys=True)}`

## Use

```python
import zoo
model = zoo.from_zoo("{name}")          # backbone + adapter + head, eval mode
# or continue training:  python train.py ... adapter.init_from=zoo:{name}
```

Files: `adapter.safetensors` (adapter and head tensors only, safetensors), `adapter.json` (config).
"""


__all__ = [
    "Entry", "FileSpec", "HubError", "EntryNotFoundError", "RegistryError", "OfflineError", "DownloadError",
    "IntegrityError", "add_entry", "add_registry", "build_backbone", "cache_dir", "download", "entries",
    "entry_dir", "find_backbone_entry", "from_zoo", "get_entry", "is_cached", "is_offline", "list_entries",
    "load_registry", "publish_backbone", "publish_run", "registry_locations", "resolve", "resolve_init",
    "sha256_file", "verify",
]
