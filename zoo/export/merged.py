"""Merged export: the adapted backbone (+ head) as plain weights its own library loads, without zoo.

The adapters are merged into the base weights (``zoo.merge_adapters``, on a copy: the model passed in
is not changed), so the result is the library's own model with new numbers:

* ``vit`` (timm): ``config.json`` (``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``)
  + ``model.safetensors`` with timm keys, the zoo's Linear head as timm's ``head``. Load with
  ``timm.create_model("local-dir:DIR", pretrained=True)`` (timm's local-folder source; the same
  files as a Hub repo), or ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file":
  "DIR/model.safetensors"}, num_classes=C, **model_args)``.
* ``clip`` (open_clip): ``open_clip_config.json`` (``model_cfg`` as open_clip resolved it, ``preprocess_cfg``)
  + ``open_clip_model.safetensors`` (open_clip's own keys: ``in_proj_weight`` of ``nn.MultiheadAttention``).
  Load with ``open_clip.create_model("local-dir:DIR")``.
* ``ast`` (transformers): ``config.json`` (``ASTConfig``) + ``model.safetensors`` with ``ASTModel`` keys
  (``q k v`` split back out of the fused ``qkv``). Load with ``transformers.ASTModel.from_pretrained(DIR)``;
  ``pooler_output`` is the zoo's ``cls_dist`` pooling.

A head the library's model has no module for (a Linear on CLIP's image embedding or on AST's pooled
feature; AST's ``layernorm_linear`` head, LayerNorm then Linear: HF's ``ASTForAudioClassification`` has
that structure but takes the backbone's LayerNorm eps (1e-12) for it, AST's ``mlp_head`` 1e-5; CLIP's
zero-shot classifier) goes to ``head.safetensors`` (its ``state_dict``: ``0.*`` the LayerNorm, ``1.*`` the
Linear for ``layernorm_linear``); ``zoo_export.json`` says what it is (``head``, with the eps) and how it is
applied. A method that is not a reparameterisation of the weights (prompts, bottleneck
adapters, ...) cannot be merged and is refused with the reason; ``keep_modules=True`` instead writes
the adapted model's whole ``state_dict`` (``model.safetensors``: base + adapter modules, no pickled
code, no TorchScript), which the zoo rebuilds from ``zoo_export.json``.

The files are written as one set (:func:`zoo.io.write_together`), the file without which the library
refuses the folder renamed in last (timm's ``config.json``, ``open_clip_config.json``, transformers'
``model.safetensors``: it loads a folder without ``config.json`` with the default ``ASTConfig``;
``zoo_export.json`` for ``keep_modules``): a failed write leaves the previous export whole, a crash
between the renames a folder the library refuses, never an old config beside new weights. The files of
an earlier export of another kind (``naming.EXPORT_FILES``: a peft adapter, another family's config)
are removed.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.backbones.base import Backbone
from zoo.export.naming import (
    EXPORT_FILES,
    ExportError,
    check_family,
    installed_ast_names,
)
from zoo.io import safetensors_bytes, write_together

ZOO_META = "zoo_export.json"
# the file without which each library refuses the folder, written last (write_together): timm's and open_clip's
# "local-dir:" need their config; transformers' from_pretrained does not (a folder without config.json loads
# with ASTConfig's defaults, a wrong model when the sizes fit), only its weights
LAST_FILE = {"vit": "config.json", "clip": "open_clip_config.json", "ast": "model.safetensors"}


def _weights(state: dict[str, torch.Tensor]) -> bytes:
    return safetensors_bytes({k: v.detach().contiguous().cpu().clone() for k, v in state.items()}, {"format": "pt"})


def _json(obj: Any, **kw) -> bytes:
    return (json.dumps(obj, indent=2, **kw) + "\n").encode()


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every adapter merged and unloaded; refuses a method that cannot merge."""
    from zoo.adapters import ADAPTERS
    from zoo.api import find_backbone, merge_adapters

    bb = find_backbone(model)
    for a in bb.adapters:
        if not a.mergeable:
            what = next((ln.strip() for ln in (type(a).__doc__ or "").splitlines() if ln.strip()), "")
            raise ExportError(
                f"method {a.name!r} cannot be merged into the base weights: it is not a reparameterisation of them "
                f"({what.rstrip('.')}); --keep-modules exports the adapted model's state dict instead "
                f"(mergeable: {', '.join(n for n in ADAPTERS.names() if ADAPTERS.get(n).mergeable)})")
    out = copy.deepcopy(model)
    merge_adapters(out, unload=True)
    return out.eval()


def export_merged(model: nn.Module, out_dir: str | os.PathLike, keep_modules: bool = False) -> Path:
    """Write the merged backbone (+ head) in its library's format (module docstring); returns ``out_dir``."""
    from zoo.api import find_backbone
    from zoo.checkpoint import describe

    out = Path(out_dir)
    meta: dict[str, Any] = {"format": "keep_modules" if keep_modules else "merged", **describe(model)}
    if keep_modules:
        meta["load"] = ("zoo: build the backbone and head from this record, zoo.apply_adapter each method with its "
                        "config, then model.load_state_dict(safetensors.torch.load_file('model.safetensors'))")
        # zoo_export.json last: the zoo rebuilds the model from it before it reads the weights
        return write_together(out, {"model.safetensors": _weights(model.state_dict()), ZOO_META: _json(meta)},
                              last=ZOO_META, stale=EXPORT_FILES)
    bb0 = find_backbone(model)
    family = check_family(bb0)
    if family == "sam":
        raise ExportError("SAM's merged library export is not supported: timm's samvit config cannot carry SAM's "
                          "LayerNorm eps (1e-6) and the mask decoder is segment_anything's; use --format onnx or --keep-modules")
    merged = merged_copy(model)
    bb = find_backbone(merged)
    head = getattr(merged, "head", None) if merged is not bb else None
    head_in_model = False
    if family == "vit":
        files, head_in_model = _timm_files(bb, merged)
    elif family == "clip":
        files = _open_clip_files(bb)
    else:
        files = _hf_ast_files(bb)
    if head is not None and not head_in_model:
        files["head.safetensors"] = _weights(head.state_dict())
        meta["head_file"] = "head.safetensors"
    meta["methods_merged"] = meta.pop("methods")
    files[ZOO_META] = _json(meta)
    # renamed in last: a crash leaves a folder the library refuses, never an old config beside new weights
    return write_together(out, files, last=LAST_FILE[family], stale=EXPORT_FILES)


# --------------------------------------------------------------------------- timm
def _timm_files(bb: Backbone, model: nn.Module) -> tuple[dict[str, bytes], bool]:
    from zoo.heads import ImageClassifier

    net = bb.model
    state = dict(net.state_dict())
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    num_classes, head_in_model = 0, False
    if type(model) is ImageClassifier:
        state["head.weight"], state["head.bias"] = model.head.weight, model.head.bias
        num_classes, head_in_model = model.num_classes, True
    arch = bb.model_name.split(".")[0]
    args = {k: v for k, v in bb.build_kwargs.items() if k != "num_classes"}
    cfg = dict(getattr(net, "pretrained_cfg", {}) or {})
    cfg = {k: v for k, v in cfg.items() if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
    cfg.update(input_size=list(bb.data_config.get("input_size", cfg.get("input_size", (3, 224, 224)))),
               num_classes=num_classes)
    for k in ("hf_hub_id", "url", "file", "source", "tag"):
        cfg.pop(k, None)
    return {"config.json": _json({"architecture": arch, "num_classes": num_classes, "num_features": int(net.num_features),
                                  "model_args": args, "pretrained_cfg": cfg}, default=list),
            "model.safetensors": _weights(state)}, head_in_model


# --------------------------------------------------------------------------- open_clip
def open_clip_model_cfg(bb: Backbone) -> dict[str, Any]:
    """The model config ``open_clip.create_model(bb.model_name, **build_kwargs)`` resolved (its own rules:
    the named config, ``force_*`` options, then the other keyword arguments replacing top-level keys)."""
    import open_clip

    kw = dict(bb.build_kwargs)
    kw.pop("towers", None)
    cfg = open_clip.get_model_config(bb.model_name)
    if cfg is None:
        raise ExportError(f"open_clip has no config named {bb.model_name!r}")
    if kw.pop("force_quick_gelu", False):
        cfg["quick_gelu"] = True
    for opt, (tower, key) in {"force_image_size": ("vision_cfg", "image_size"), "force_patch_dropout": ("vision_cfg", "patch_dropout"),
                              "force_context_length": ("text_cfg", "context_length")}.items():
        if kw.get(opt) is not None:
            cfg[tower][key] = kw.pop(opt)
        kw.pop(opt, None)
    cfg.update(kw)
    return cfg


def _open_clip_files(bb: Backbone) -> dict[str, bytes]:
    if tuple(bb.available_towers()) != ("visual", "text"):
        raise ExportError("an open_clip model has both towers; this CLIP backbone was built visual-only "
                          "(towers=[visual]), so open_clip could not load it: rebuild it with both towers")
    dc = bb.data_config
    pre = {"size": list(dc["input_size"][1:]), "mean": list(dc["mean"]), "std": list(dc["std"]),
           "interpolation": dc.get("interpolation", "bicubic")}
    return {"open_clip_config.json": _json({"model_cfg": open_clip_model_cfg(bb), "preprocess_cfg": pre}),
            "open_clip_model.safetensors": _weights(bb.model.state_dict())}


# --------------------------------------------------------------------------- transformers AST
def ast_to_hf_state_dict(state: dict[str, torch.Tensor], names: str = "legacy") -> dict[str, torch.Tensor]:
    """The zoo AST's timm keys -> ``transformers.ASTModel`` keys (the inverse of
    :func:`zoo.backbones.ast.convert_hf_state_dict`): the fused ``qkv`` split into query / key / value."""
    from zoo.export.naming import _AST_LAYER, _AST_LAYER_V5, _AST_QKV, _AST_QKV_V5

    head, layer, qkv = (("encoder.layer.", _AST_LAYER, _AST_QKV) if names == "legacy"
                        else ("layers.", _AST_LAYER_V5, _AST_QKV_V5))
    simple = {"cls_token": "embeddings.cls_token", "dist_token": "embeddings.distillation_token",
              "pos_embed": "embeddings.position_embeddings",
              "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
              "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
              "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    rules = {**layer, "norm1": "layernorm_before", "norm2": "layernorm_after"}
    out = {}
    for k, v in state.items():
        if k.startswith(("head.", "head_dist.")):
            continue
        if k in simple:
            out[simple[k]] = v
            continue
        _, i, rest = k.split(".", 2)
        sub, kind = rest.rsplit(".", 1)
        if sub == "attn.qkv":
            for name, part in zip(qkv, v.chunk(3, dim=0)):
                out[f"{head}{i}.{name}.{kind}"] = part
        elif sub in rules:
            out[f"{head}{i}.{rules[sub]}.{kind}"] = v
        else:
            raise ExportError(f"AST tensor {k!r} has no Hugging Face counterpart")
    return out


def ast_config(bb: Backbone) -> dict[str, Any]:
    """``transformers.ASTConfig`` fields of the zoo AST ``bb`` (as a JSON dict, no transformers import)."""
    net = bb.model
    blk = net.blocks[0]
    if bb.pooling != "cls_dist":
        raise ExportError(f"AST pooling {bb.pooling!r}: Hugging Face's ASTModel pools (CLS + DIST) / 2 only "
                          "(pooling=cls_dist); its last_hidden_state would still match")
    return {"model_type": "audio-spectrogram-transformer", "architectures": ["ASTModel"],
            "hidden_size": net.embed_dim, "num_hidden_layers": len(net.blocks), "num_attention_heads": blk.attn.num_heads,
            "intermediate_size": blk.mlp.fc1.out_features, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": float(blk.norm1.eps),
            "patch_size": bb.patch_size, "qkv_bias": blk.attn.qkv.bias is not None,
            "frequency_stride": int(net.patch_embed.proj.stride[0]), "time_stride": int(net.patch_embed.proj.stride[1]),
            "max_length": bb.max_length, "num_mel_bins": bb.num_mel_bins, "torch_dtype": "float32"}


def _hf_ast_files(bb: Backbone) -> dict[str, bytes]:
    cfg = ast_config(bb)
    return {"config.json": _json(cfg),
            "model.safetensors": _weights(ast_to_hf_state_dict(bb.model.state_dict(), installed_ast_names()))}
