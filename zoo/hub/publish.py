"""Publishing: a finished run or upstream weights as a registry entry with a model card (see :mod:`zoo.hub`)."""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from zoo.hub.cards import model_card
from zoo.hub.fetch import sha256_file
from zoo.hub.registry import (
    REGISTRY_FORMAT,
    REPO_ROOT,
    Entry,
    RegistryError,
    _atomic_write_text,
)


def _atomic_copy(src: Path, dest: Path) -> None:
    from zoo.io import atomic_path

    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


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
    lock = Path(str(registry) + ".lock")
    if lock.is_symlink():  # taking the lock would create or truncate the file it points to
        raise RegistryError(f"{lock} is a symbolic link; a registry's lock file must be a plain file: remove it")
    with FileLock(str(lock)):
        data = _read_json_object(registry, "registry") if registry.is_file() else {"format": REGISTRY_FORMAT, "entries": {}}
        if not isinstance(data.get("entries", {}), dict):
            raise RegistryError(f"{registry}: 'entries' must be an object; fix or move the file (it was left as it is)")
        data.setdefault("entries", {})[name] = entry
        _atomic_write_text(registry, json.dumps(data, indent=2) + "\n")
    return registry


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    from zoo.io import read_json_object  # lazily, as above: zoo.io imports torch

    return read_json_object(path, RegistryError, f"fix or move this {what} file (it was left as it is)")


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
        run_metrics = _read_json_object(run_dir / "metrics.json", "run's metrics")
        metrics = {k: v for k, v in _numbers(run_metrics).items() if k != "schema_version"}
        if task is None and (run_metrics.get("task") or run_metrics.get("dataset")):
            task = {k: run_metrics[k] for k in ("name", "task", "kind", "dataset", "protocol", "monitor")
                    if run_metrics.get(k) is not None}
            if "task" in task:
                task["name"] = task.pop("task")
    metrics = {**_numbers(meta.get("metrics") or {}), **metrics}
    task = task or meta.get("task")
    check_publishable(art)
    out = Path(out_dir) if out_dir is not None else REPO_ROOT / "checkpoints" / "zoo" / name
    out.mkdir(parents=True, exist_ok=True)
    reg = Path(registry) if registry is not None else None
    previous = _keep_previous(reg, name, out) if reg is not None else None
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
    entry["files"] = [_file_entry(out / fn, _sources_for(out / fn, reg, url_base, hf_repo, hf_subfolder))
                      for fn in (WEIGHTS_NAME, CONFIG_NAME, "README.md")]
    base = _publish_base(meta, art, name, out, reg, url_base=url_base, hf_repo=hf_repo, hf_subfolder=hf_subfolder,
                         licence=licence)
    if base is not None:
        entry["base_entry"] = base
    if reg is not None:
        add_entry(reg, name, entry)  # the switch: from here on the registry names the new files
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return entry


_PREVIOUS = ".previous"  # <out>/.previous/: the registered version's files while a re-publish replaces them


def _keep_previous(registry: Path, name: str, out: Path) -> Path | None:
    """Before a re-publish overwrites ``out``: keep the registered version's files beside them.

    The files the registry entry ``name`` pins are hard-linked (or copied) into ``out/.previous/``
    and the entry gets those copies as extra sources, so that at every moment of the re-publish
    (new files half written, registry not yet switched) the registered entry still downloads and
    verifies. The new entry is registered without them and the folder is removed afterwards; a
    re-publish killed before that leaves it, and the next one replaces it.
    """
    from zoo.hub.registry import load_registry

    keep = out / _PREVIOUS
    shutil.rmtree(keep, ignore_errors=True)
    try:
        old = load_registry(registry).get(name)
    except RegistryError:
        old = None
    if old is None:
        return None
    raw = json.loads(json.dumps(old.raw))
    kept = False
    for spec, f in zip(raw.get("files") or [], old.files):
        src = out / f.name
        if not src.is_file() or src.is_symlink() or src.stat().st_size != f.size or sha256_file(src) != f.sha256:
            continue  # not the registered bytes: nothing worth keeping
        keep.mkdir(exist_ok=True)
        try:
            os.link(src, keep / f.name)  # the same bytes, no copy; the new file replaces src's name only
        except OSError:
            shutil.copyfile(src, keep / f.name)
        spec["sources"] = list(spec.get("sources") or []) + _sources_for(keep / f.name, registry, None, None, None)
        kept = True
    if not kept:
        return None
    add_entry(registry, name, raw)
    return keep


def _publish_base(meta: dict[str, Any], art: Path, name: str, out: Path, reg: Path | None, **where: Any) -> str | None:
    """Local base weights (a ``file:`` tag) travel with the adapter: unless a zoo backbone entry already
    provides them, the file the run read (``adapter.json``'s ``base_weights``) is copied to ``out/base/``
    and registered as the backbone entry ``<name>-base``, which ``from_zoo`` then finds by fingerprint."""
    from zoo.hub.load import find_backbone_entry, recorded_weights
    from zoo.hub.registry import EntryNotFoundError

    spec = meta.get("backbone") or {}
    if not str(spec.get("weights_tag") or "").startswith("file:"):
        return None
    try:
        return find_backbone_entry(spec).name
    except EntryNotFoundError:
        pass
    path = recorded_weights(meta.get("base_weights"), art)  # a downloaded artifact's record is not followed
    if path is None:  # nothing to copy: from_zoo will need weights= (its error says so)
        return None
    base_name = f"{name}-base"
    publish_backbone(path, base_name, spec["family"], spec["model"], kwargs=spec.get("kwargs"), registry=reg,
                     out_dir=out / "base", description=f"the base weights {name} was trained on",
                     fingerprint=spec.get("fingerprint"), **where)
    return base_name


def publish_backbone(weights: str | os.PathLike, name: str, family: str, model: str,
                     kwargs: dict[str, Any] | None = None, registry: str | os.PathLike | None = None,
                     out_dir: str | os.PathLike | None = None, *, url_base: str | None = None,
                     hf_repo: str | None = None, hf_subfolder: str | None = None, licence: str | None = None,
                     description: str = "", fingerprint: str | None = None) -> dict[str, Any]:
    """Register upstream weights as a ``backbone`` entry (the weights an adapter entry needs).

    The backbone is built once from the file, which checks that the weights fit and records the
    same fingerprint adapters trained on it carry (``fingerprint``: the one they must have). ``out_dir``:
    then copy the file there.
    """
    import zoo

    weights = Path(weights)
    # built (checked) from where the file is, before anything is copied: a file that is not these weights (a
    # recorded path naming something else) never lands in a folder that will be served
    bb = zoo.create_backbone(family, model=model, pretrained=None, weights=str(weights), **(kwargs or {}))
    if fingerprint is not None and bb.fingerprint() != fingerprint:
        raise ValueError(f"{weights} are not the base weights the adapter was trained on (fingerprint "
                         f"{bb.fingerprint()[:12]}…, the artifact records {fingerprint[:12]}…); nothing was copied")
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        dest = Path(out_dir) / weights.name
        if dest.resolve() != weights.resolve():
            _atomic_copy(weights, dest)
        weights = dest
    desc = bb.describe()
    desc["weights_tag"] = f"file:{weights.name}"
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


def check_publishable(art: Path) -> None:
    """Refuse an artifact whose tensors hold NaN/inf (a diverged run) or that fails its own hash."""
    from zoo.checkpoint import read_adapter_config, read_adapter_weights

    read_adapter_weights(art, read_adapter_config(art))


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
