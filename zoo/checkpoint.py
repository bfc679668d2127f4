"""Adapter artifacts: ``adapter.safetensors`` (adapter + head tensors) and ``adapter.json``.

The JSON records the methods and their configs, the backbone (family, model, weights tag,
build options and a sha256 fingerprint of the base weights), the head, metrics and the library
version. Loading checks all of it before touching the model and names what differs. Nothing is
ever unpickled.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from zoo.adapters.base import AdapterModule
from zoo.io import (
    atomic_path,
    check_finite,
    clean_stale_temporaries,
    read_json_object,
    safetensors_bytes,
)

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter.json"
FORMAT_VERSION = 1
MAX_VALUE = 1e15  # no trained adapter tensor comes near it (zoo.io.check_finite)


class AdapterMismatchError(ValueError):
    """The artifact does not fit this model; the message names what differs."""


def adapter_state_dict(model: nn.Module, export: bool = True) -> dict[str, torch.Tensor]:
    """Every trainable parameter, plus all tensors that adapter modules own (not their ``base``).

    ``export=True`` lets each adapter transform its tensors for storage (e.g. bit-packing);
    ``export=False`` gives the raw state that ``model.load_state_dict`` accepts.
    """
    from zoo.api import adapters_of

    # trainable parameters by identity, not by name: a module's state-dict hook may store a parameter under
    # another name (ExplicitMultiheadAttention's in_proj.weight is in_proj_weight on disk), and matching
    # named_parameters() names dropped those (full / bitfit on open_clip lost every in_proj tensor)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    keep: set[str] = set()
    for mname, m in model.named_modules():
        if isinstance(m, AdapterModule):
            for k in m.state_dict(keep_vars=True):
                if not (k == "base" or k.startswith("base.")):
                    keep.add(f"{mname}.{k}" if mname else k)
    full = model.state_dict(keep_vars=True)
    state = {k: v.detach() for k, v in full.items() if k in keep or id(v) in trainable}
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
    # the temporaries of these two files that a killed save left (kill -9 in the middle) go first
    clean_stale_temporaries(path, [WEIGHTS_NAME, CONFIG_NAME])
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
    meta = read_json_object(cfg_file, AdapterMismatchError,
                            "the artifact's metadata is corrupt or was edited by hand, save it again")
    check_adapter_meta(meta, cfg_file)
    return meta


# ---------------------------------------------------------------------------- the adapter.json schema
# Every reader of adapter.json (load_adapter, from_zoo, MultiAdapter, predict, publish, eval.py, init_from) goes
# through read_adapter_config, so a corrupt or hand-edited record is one line naming the file and the key here,
# never a KeyError / TypeError later, and a downloaded record can name no code to run.

HYDRA_KEYS = frozenset({"_target_", "_args_", "_partial_", "_recursive_", "_convert_"})
# where a _target_ may appear: the recorded task and data configs (and the copy of the data config a task keeps);
# zoo never builds them, eval.py does, from its own allow-list (tasks.recorded)
RECORDED_TARGETS = ("task.config", "task.data", "task.config.data")
MAX_SIZE = 1 << 16  # no image side, class count or channel count of a real artifact comes near it


class UnsafeArtifactError(AdapterMismatchError):
    """An artifact's recorded config names code to run, or holds an interpolation."""


def check_data_only(node: Any, where: Any, key: str = "", allowed_targets: dict[str, frozenset | None] | None = None
                    ) -> None:
    """Refuse any Hydra key (except an allowed ``_target_``) or ``${`` string in ``node``, naming the key.

    ``allowed_targets`` maps a dotted key (e.g. ``"task.config"``) to the ``_target_`` values allowed
    directly under it (``None``: any class name; whoever builds the config checks it against its own list).
    """
    allowed_targets = allowed_targets or {}
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{key}.{k}" if key else str(k)
            if k in HYDRA_KEYS:
                if not (k == "_target_" and key in allowed_targets):
                    raise UnsafeArtifactError(
                        f"{where}: refusing the key {path!r}: an artifact's recorded config is data, and "
                        f"'{k}' would make it name code to run")
                ok = allowed_targets[key]
                if ok is None and not isinstance(v, str) or ok is not None and v not in ok:
                    raise UnsafeArtifactError(
                        f"{where}: {path}={v!r} is not one of the project's own classes"
                        + (f"; an artifact may only name one of: {', '.join(sorted(ok))}" if ok else ""))
                continue
            check_data_only(v, where, path, allowed_targets)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            check_data_only(v, where, f"{key}[{i}]", allowed_targets)
    elif isinstance(node, str) and "${" in node:
        raise UnsafeArtifactError(f"{where}: refusing {key}={node!r}: an artifact's recorded config is data, "
                                  f"'${{...}}' interpolations are not resolved from it")


@contextmanager
def recorded_key(where: Any, key: str):
    """Building what ``key`` of an artifact's record names (a method, the backbone, the head): an unknown
    name, an unknown or invalid option becomes one :class:`AdapterMismatchError` naming the file and the key
    (an ``UnknownNameError`` is a ``KeyError`` and a bad option a ``TypeError``, which the command lines would
    print as a stack trace)."""
    from zoo.registry import UnknownNameError

    try:
        yield
    except AdapterMismatchError:
        raise
    except (UnknownNameError, TypeError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise AdapterMismatchError(f"{where}: {key}: {msg}") from None


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _is_int(v: Any, lo: int = 1, hi: int = MAX_SIZE) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_num(v: Any) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_adapter_meta(meta: dict[str, Any], where: Any) -> None:
    """The record's structure: the keys the loaders read, with their types and sane sizes; no Hydra key
    outside the recorded task/data configs and no ``${...}`` anywhere. One :class:`AdapterMismatchError`
    naming ``where`` (the file) and the key."""
    def bad(key: str, want: str, got: Any) -> AdapterMismatchError:
        return AdapterMismatchError(f"{where}: {key} must be {want}, got {_short(got)} (the artifact is corrupt "
                                    f"or was edited by hand; save it again)")

    def opt(d: dict, at: str, key: str, types: tuple, want: str) -> Any:
        """``d[key]`` when it is null or of ``types``; ``at`` is where ``d`` is in the record ("" for the top)."""
        v = d.get(key)
        if v is not None and not isinstance(v, types):
            raise bad(f"{at}.{key}" if at else key, want, v)
        return v

    fv = meta.get("format_version")
    if fv is not None and not _is_int(fv, 0, FORMAT_VERSION):
        raise bad("format_version", f"an integer <= {FORMAT_VERSION} (this library's format; a newer one needs a "
                                    f"newer adapter-zoo)", fv)
    methods = meta.get("methods")
    if not isinstance(methods, list) or not methods or not all(isinstance(m, dict) and m.get("name") for m in methods):
        raise AdapterMismatchError(f"{where}: 'methods' must be a non-empty list of {{name, config}} objects, "
                                   f"got {_short(methods)}")
    for i, m in enumerate(methods):
        if not isinstance(m["name"], str):
            raise bad(f"methods[{i}].name", "a method name (string)", m["name"])
        if m.get("config") is not None and not isinstance(m["config"], dict):
            raise bad(f"methods[{i}].config", "an object of options", m["config"])
    bb = meta.get("backbone")
    if not isinstance(bb, dict):
        raise bad("backbone", "an object {family, model, weights_tag, kwargs, fingerprint}", bb)
    for k in ("family", "model"):
        if not isinstance(bb.get(k), str) or not bb[k]:
            raise bad(f"backbone.{k}", "a non-empty string", bb.get(k))
    for k in ("weights_tag", "fingerprint"):
        opt(bb, "backbone", k, (str,), "a string or null")
    opt(bb, "backbone", "kwargs", (dict,), "an object of build options")
    head = meta.get("head")
    if head is not None:
        if not isinstance(head, dict) or not isinstance(head.get("type"), str):
            raise bad("head", "null or an object with a 'type' (string)", head)
        for k in ("num_classes", "in_features", "out_channels", "upsample", "channels"):
            v = head.get(k)
            vs = v if isinstance(v, list) else [v]
            if v is not None and (not vs or not all(_is_int(x) for x in vs)):
                raise bad(f"head.{k}", f"an integer in 1..{MAX_SIZE} (or a list of them)", v)
        if "eps" in head and not (_is_num(head["eps"]) and head["eps"] > 0):  # a LayerNorm's (layernorm_linear)
            raise bad("head.eps", "a positive number", head["eps"])
    pre = opt(meta, "", "preprocessing", (dict,), "an object") or {}
    size = pre.get("input_size")
    if size is not None and (not isinstance(size, list) or not size or not all(_is_int(x) for x in size)):
        raise bad("preprocessing.input_size", f"a list of integers in 1..{MAX_SIZE}", size)
    for k in ("mean", "std"):
        v = pre.get(k)
        if v is not None and (not isinstance(v, list) or not v or not all(_is_num(x) for x in v)
                              or k == "std" and not all(x > 0 for x in v)):
            raise bad(f"preprocessing.{k}", "a list of finite numbers" + (" > 0" if k == "std" else ""), v)
    opt(pre, "preprocessing", "fbank", (dict,), "an object")
    task = opt(meta, "", "task", (dict,), "an object") or {}
    opt(task, "task", "kind", (str,), "a string")
    for k in ("config", "data", "links"):
        opt(task, "task", k, (dict,), "an object")
    names = task.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise bad("task.class_names", "a list of strings", names)
    sha = opt(meta, "", "weights_sha256", (str,), "a sha256 hex string")
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise bad("weights_sha256", "64 lowercase hex digits", sha)
    opt(meta, "", "metrics", (dict,), "an object")
    for k, shape in (opt(meta, "", "tensors", (dict,), "an object {name: shape}") or {}).items():
        if not isinstance(shape, list) or not all(_is_int(x, 0, 1 << 40) for x in shape):
            raise bad(f"tensors[{k!r}]", "a shape (a list of integers >= 0)", shape)
    seed = meta.get("seed")
    if seed is not None and not _is_int(seed, -(1 << 63), (1 << 64) - 1):
        raise bad("seed", "an integer", seed)
    base = opt(meta, "", "base_weights", (dict,), "an object {path, config}") or {}
    opt(base, "base_weights", "path", (str,), "a path (string)")
    check_data_only(meta, where, allowed_targets={k: None for k in RECORDED_TARGETS})


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
    check_finite(state, weights, limit=MAX_VALUE)
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
    methods = meta["methods"]  # checked by read_adapter_config
    state = read_adapter_weights(path, meta, allow_unhashed)
    check_backbone(model, meta, check_fingerprint)

    attached = [a.name for a in adapters_of(model)]
    wanted = [m["name"] for m in methods]
    if attached and attached != wanted:
        raise AdapterMismatchError(f"model has adapters {attached}, the artifact holds {wanted}")
    snap = ModelState(model)
    try:
        if not attached:
            for i, m in enumerate(methods):
                with recorded_key(path / CONFIG_NAME, f"methods[{i}]"):
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
