"""Adapter artifacts: ``adapter.safetensors`` (adapter + head tensors) and ``adapter.json``.

The JSON records the methods and their configs, the backbone (family, model, weights tag,
build options and a sha256 fingerprint of the base weights), the head, metrics and the library
version. Loading checks all of it before touching the model and names what differs. Nothing is
ever unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from zoo.adapters.base import AdapterModule
from zoo.io import atomic_path, check_finite, safetensors_bytes

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter.json"
FORMAT_VERSION = 1


class AdapterMismatchError(ValueError):
    """The artifact does not fit this model; the message names what differs."""


def adapter_state_dict(model: nn.Module, export: bool = True) -> dict[str, torch.Tensor]:
    """Every trainable parameter, plus all tensors that adapter modules own (not their ``base``).

    ``export=True`` lets each adapter transform its tensors for storage (e.g. bit-packing);
    ``export=False`` gives the raw state that ``model.load_state_dict`` accepts.
    """
    from zoo.api import adapters_of

    keep: set[str] = {n for n, p in model.named_parameters() if p.requires_grad}
    for mname, m in model.named_modules():
        if isinstance(m, AdapterModule):
            for k in m.state_dict(keep_vars=True):
                if not (k == "base" or k.startswith("base.")):
                    keep.add(f"{mname}.{k}" if mname else k)
    full = model.state_dict(keep_vars=True)
    state = {k: full[k].detach() for k in full if k in keep}
    if export:
        for a in adapters_of(model):
            state = a.export_state(state)
    return state


def describe(model: nn.Module) -> dict[str, Any]:
    from zoo import __version__
    from zoo.api import adapters_of, find_backbone

    bb = find_backbone(model)
    head = model.head_spec() if hasattr(model, "head_spec") else None
    return {
        "format_version": FORMAT_VERSION,
        "library": {"name": "adapter-zoo", "version": __version__},
        "methods": [{"name": a.name, "config": a.config} for a in adapters_of(model)],
        "backbone": bb.describe(),
        "head": head,
        "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in bb.data_config.items()
                          if k in ("input_size", "mean", "std", "interpolation", "crop_pct")},
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, metrics: dict | None = None,
                 extra: dict | None = None) -> Path:
    """Write the artifact folder ``path`` and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu().clone() for k, v in adapter_state_dict(model).items()}
    meta = describe(model)
    meta["metrics"] = metrics or {}
    meta["tensors"] = {k: list(v.shape) for k, v in state.items()}
    if extra:
        meta.update(extra)
    # The artifact is a pair: both files are written to temporary files first (a failure there
    # leaves the previous artifact intact), then renamed into place. The json records the
    # weights' sha256, so a pair torn by a crash between the two renames is detected on load.
    with atomic_path(path / WEIGHTS_NAME) as wtmp:
        # sorted metadata: equal tensors give byte-identical files (see zoo.io.safetensors_bytes)
        wtmp.write_bytes(safetensors_bytes(state, {"format": "pt", "adapter_zoo": str(FORMAT_VERSION)}))
        meta["weights_sha256"] = _sha256(wtmp)
        with atomic_path(path / CONFIG_NAME) as ctmp:
            ctmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return path


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    cfg_file = path / CONFIG_NAME if path.is_dir() else path
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: expected an artifact folder with {WEIGHTS_NAME} and {CONFIG_NAME}")
    try:
        meta = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise AdapterMismatchError(f"{cfg_file}: not valid JSON ({e}); the artifact is corrupt or was edited by hand, "
                                   f"save it again") from None
    if not isinstance(meta, dict):
        raise AdapterMismatchError(f"{cfg_file}: expected a JSON object (the artifact's metadata), got {type(meta).__name__}")
    return meta


def read_adapter_weights(path: str | os.PathLike, meta: dict[str, Any], allow_unhashed: bool = False) -> dict[str, torch.Tensor]:
    """The artifact's tensors, after checking them against the json's ``weights_sha256`` (required
    unless ``allow_unhashed``) and refusing NaN/inf."""
    path = Path(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    if not meta.get("weights_sha256") and not allow_unhashed:
        raise AdapterMismatchError(
            f"{path / CONFIG_NAME} records no weights_sha256, so edited or swapped weights cannot be detected. If this is "
            f"an older artifact you trust, load it once with zoo.load_adapter(model, path, allow_unhashed=True) and "
            f"re-save it with zoo.save_adapter(model, path) (which records the hash)")
    if meta.get("weights_sha256") and _sha256(weights) != meta["weights_sha256"]:
        raise AdapterMismatchError(
            f"{weights} is not the file {CONFIG_NAME} was written with (sha256 differs): the pair was torn by an "
            f"interrupted save or edited by hand; save the artifact again")
    try:
        state = load_file(str(weights))
    except Exception as e:  # truncated / not a safetensors file
        raise AdapterMismatchError(f"{weights} cannot be read as safetensors ({type(e).__name__}: {e})") from None
    check_finite(state, weights)
    return state


def check_backbone(model: nn.Module, meta: dict[str, Any], check_fingerprint: bool = True) -> None:
    """Raise :class:`AdapterMismatchError` naming every field where artifact and model differ."""
    from zoo.api import find_backbone

    bb = find_backbone(model)
    want = meta.get("backbone", {})
    have = {"family": bb.family, "model": bb.model_name, "weights_tag": bb.weights_tag}
    diffs = [f"{k}: artifact has {want.get(k)!r}, model has {v!r}" for k, v in have.items() if want.get(k) != v]
    if check_fingerprint and not diffs and not want.get("fingerprint"):
        # every artifact this library writes records one: without it nothing ties the adapter to its base weights
        diffs.append("the artifact records no base-weight fingerprint (backbone.fingerprint), so it cannot be "
                     "checked against this model's weights; pass check_fingerprint=False only if you know they match")
    elif check_fingerprint and not diffs and want["fingerprint"] != bb.fingerprint():
        diffs.append(f"base-weight fingerprint: artifact {want['fingerprint'][:12]}…, model {bb.fingerprint()[:12]}…")
    head = meta.get("head")
    if head and hasattr(model, "head_spec") and model.head_spec() != head:
        diffs.append(f"head: artifact {head}, model {model.head_spec()}")
    if head and not hasattr(model, "head_spec"):
        diffs.append(f"head: the artifact has a head {head}, the model has none (wrap it in zoo.ImageClassifier)")
    if diffs:
        raise AdapterMismatchError("adapter artifact does not fit this model:\n  " + "\n  ".join(diffs))


def load_adapter(model: nn.Module, path: str | os.PathLike, check_fingerprint: bool = True,
                 allow_unhashed: bool = False) -> nn.Module:
    """Attach the artifact's adapters (unless already attached) and load its tensors.

    Everything is checked first; on any failure the model is left exactly as it was (its
    adapters, ``requires_grad`` flags and modules). New modules follow the model's train/eval mode.
    The weights must match the ``weights_sha256`` the json records; ``allow_unhashed=True``
    accepts an older artifact written before the hash was recorded (then re-save it).
    Every tensor must have the model's dtype for it.
    """
    from zoo.api import ModelState, adapters_of, apply_adapter

    path = Path(path)
    meta = read_adapter_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    methods = meta.get("methods")
    if not isinstance(methods, list) or not methods or not all(isinstance(m, dict) and m.get("name") for m in methods):
        raise AdapterMismatchError(f"{path / CONFIG_NAME}: 'methods' must be a non-empty list of {{name, config}} "
                                   f"objects, got {methods!r}")
    state = read_adapter_weights(path, meta, allow_unhashed)
    check_backbone(model, meta, check_fingerprint)

    attached = [a.name for a in adapters_of(model)]
    wanted = [m["name"] for m in methods]
    if attached and attached != wanted:
        raise AdapterMismatchError(f"model has adapters {attached}, the artifact holds {wanted}")
    snap = ModelState(model)
    try:
        if not attached:
            for m in methods:
                apply_adapter(model, m["name"], **(m.get("config") or {}))
        for a in adapters_of(model):
            state = a.import_state(state)
        own = adapter_state_dict(model, export=False)
        expected = {k: tuple(v.shape) for k, v in own.items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = [f"{k}: artifact {tuple(state[k].shape)}, model {expected[k]}" for k in expected
                  if k in state and tuple(state[k].shape) != expected[k]]
        dtypes = [f"{k}: artifact {state[k].dtype}, model {own[k].dtype}" for k in expected
                  if k in state and state[k].dtype != own[k].dtype]
        if missing or unexpected or shapes or dtypes:
            raise AdapterMismatchError(
                "adapter tensors do not fit this model:"
                + (f"\n  missing in artifact: {missing[:10]}" if missing else "")
                + (f"\n  not in model: {unexpected[:10]}" if unexpected else "")
                + ("\n  shape: " + "; ".join(shapes[:10]) if shapes else "")
                + ("\n  dtype: " + "; ".join(dtypes[:10]) if dtypes else "")
            )
        model.load_state_dict(state, strict=False)
        for a in adapters_of(model):
            a.after_load()
    except BaseException:
        snap.restore(model)
        raise
    snap.match_mode(model)
    return model
