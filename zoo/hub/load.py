"""Resolving an artifact or entry name and rebuilding backbone + adapter + head from it (see :mod:`zoo.hub`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from zoo.hub.fetch import download
from zoo.hub.registry import ZOO_PREFIX, Entry, EntryNotFoundError, cache_dir, entries, get_entry


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


def is_downloaded(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` lies in the zoo's download cache (``$ADAPTERZOO_HOME/entries``)."""
    root = (cache_dir() / "entries").resolve()
    return Path(folder).resolve().is_relative_to(root)


def recorded_weights(base: dict[str, Any] | None, folder: str | os.PathLike) -> Path | None:
    """The base-weights file a run recorded (``adapter.json``'s ``base_weights.path``), if it is still there.

    Honoured only for a local run's artifact: the record of a downloaded zoo entry (``folder`` in the
    cache) was written on someone else's machine, and must not make the loader read a path of this one."""
    path = (base or {}).get("path")
    if not path or is_downloaded(folder):
        return None
    return Path(path) if Path(path).is_file() else None


def local_weights_hint(spec: dict[str, Any], base: dict[str, Any] | None, folder: str | os.PathLike) -> str:
    """What to pass for an artifact trained on base weights from a local file."""
    tag = str(spec.get("weights_tag") or "")[5:]
    base = base or {}
    where = ""
    if base.get("path"):
        where = f"; the run read {base['path']}" + (" (a downloaded artifact's recorded path is not read)"
                                                     if is_downloaded(folder) else
                                                     "" if recorded_weights(base, folder) else " (not on this machine)")
    cfg = f" (backbone={base['config']} backbone.weights=/path/to/{tag} in eval.py)" if base.get("config") else ""
    return (f"the artifact was trained on base weights from a local file, {tag}{where}: pass weights=/path/to/{tag}"
            f"{cfg}, or publish them with the adapter (python -m zoo publish registers them)")


def build_backbone(spec: dict[str, Any], weights: str | os.PathLike | None = None, base: dict[str, Any] | None = None,
                   folder: str | os.PathLike | None = None):
    """Rebuild the backbone an artifact records (family, model, weights, build options).

    Local base weights (a ``file:`` tag) come from ``weights``, else the file the run recorded
    (``base``: ``adapter.json``'s ``base_weights`` of the artifact ``folder``) when it still exists and the
    artifact is a local run's (:func:`recorded_weights`), else the zoo backbone entry
    that provides them; the base-weight fingerprint check on loading catches a wrong file.
    """
    import zoo

    tag = spec.get("weights_tag")
    kw = dict(spec.get("kwargs") or {})
    family, model = spec["family"], spec["model"]
    if weights is None and tag and str(tag).startswith("file:"):
        weights = recorded_weights(base, folder) if folder is not None else None
        if weights is None:
            try:
                weights = weights_file(download(find_backbone_entry(spec)))
            except EntryNotFoundError as e:
                raise EntryNotFoundError(local_weights_hint(spec, base, folder) if base and folder is not None
                                         else str(e)) from None
    if weights is not None:
        return zoo.create_backbone(family, model=model, pretrained=None, weights=str(weights), **kw)
    if tag is None:
        return zoo.create_backbone(family, model=model, pretrained=None, **kw)
    return zoo.create_backbone(family, model=model, pretrained=tag if family == "clip" else True, **kw)


def artifact_backbone(meta: dict[str, Any], folder: str | os.PathLike, weights: str | os.PathLike | None = None):
    """The base backbone the artifact at ``folder`` (its record ``meta``) was trained on: :func:`build_backbone`
    with the recorded base-weights file (a local run's only), and randomly initialised weights rebuilt from the
    run's seed. An unknown family or build option is one line naming ``adapter.json`` and ``backbone``."""
    from zoo.checkpoint import CONFIG_NAME, recorded_key

    with recorded_key(Path(folder) / CONFIG_NAME, "backbone"):
        if meta["backbone"].get("weights_tag") is None and meta.get("seed") is not None and weights is None:
            import torch

            with torch.random.fork_rng(devices=[]):  # randomly initialised base weights: the run's seed rebuilds them
                torch.manual_seed(int(meta["seed"]))
                return build_backbone(meta["backbone"], weights, meta.get("base_weights"), folder)
        return build_backbone(meta["backbone"], weights, meta.get("base_weights"), folder)


def artifact_head_model(bb, meta: dict[str, Any], folder: str | os.PathLike):
    """``bb`` inside the head the artifact records (:func:`zoo.heads.build_head_model`); an unknown head type or
    a missing key is one line naming ``adapter.json`` and ``head``."""
    from zoo.checkpoint import CONFIG_NAME, AdapterMismatchError, recorded_key
    from zoo.heads import build_head_model

    try:
        with recorded_key(Path(folder) / CONFIG_NAME, "head"):
            return build_head_model(bb, meta.get("head"))
    except KeyError as e:  # from_spec reading a key the record lacks
        raise AdapterMismatchError(f"{Path(folder) / CONFIG_NAME}: head: the record {meta.get('head')} has no key "
                                   f"{e.args[0]!r}") from None


def from_zoo(name: str, weights: str | os.PathLike | None = None, check_fingerprint: bool = True):
    """Build backbone + adapter + the recorded head (:func:`zoo.heads.build_head_model`: any
    registered head type) from a zoo entry, in eval mode.

    A ``backbone`` entry gives the plain backbone with its weights.
    """
    import zoo  # noqa: F401
    from zoo.checkpoint import read_adapter_config

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
    bb = artifact_backbone(meta, folder, weights)
    model = artifact_head_model(bb, meta, folder)  # the head the task kind recorded
    zoo.load_adapter(model, folder, check_fingerprint=check_fingerprint)
    return model.eval()
