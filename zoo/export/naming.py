"""Where a zoo backbone's Linear layers live in the model its own library builds.

A zoo backbone wraps the library's model (``backbone.model``), so a Linear's path inside it is
the library's path, except where the zoo restructured the model:

* ``vit`` / ``sam`` (timm ``VisionTransformer`` / ``VisionTransformerSAM``): the same paths (timm ``qkv``);
* ``clip`` (open_clip): the zoo's ``attn.in_proj`` / ``attn.out_proj`` Linears are
  ``nn.MultiheadAttention``'s ``in_proj_weight`` / ``out_proj`` there, which peft adapts as one
  module ``attn`` (its LoRA tensors at ``attn.lora_*`` and ``attn.base_layer.out_proj.lora_*``);
* ``ast``: the zoo's AST is a timm DeiT; Hugging Face's ``ASTModel`` has separate ``query`` /
  ``key`` / ``value`` Linears (the fused ``qkv``'s row blocks) and its own layer names.

:func:`parts` gives, for one zoo Linear, the base-model pieces it maps to: a :class:`Part` is a
peft target module, the key prefix of its tensors, and the rows of the zoo Linear it covers.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from zoo.backbones.base import Backbone

FAMILIES = ("vit", "sam", "clip", "ast")

# the model class each family's peft adapter is made for (peft records it as auto_mapping.base_model_class)
BASE_CLASSES = {"vit": ("VisionTransformer",), "sam": ("VisionTransformerSAM",), "clip": ("CLIP", "CustomTextCLIP"),
                "ast": ("ASTModel", "ASTForAudioClassification")}

# zoo (timm) names inside one AST block -> HF names (transformers 4.x; transformers 5 in HF_AST_V5)
_AST_LAYER = {"attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
_AST_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_AST_LAYER_V5 = {"attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_AST_QKV_V5 = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
AST_PREFIXES = ("", "audio_spectrogram_transformer.")  # ASTModel, ASTForAudioClassification
# an adapter's train_also norms (timm names) -> HF AST names: norm1 / norm2 in every layer, the final norm
_AST_NORMS = {"norm1": "layernorm_before", "norm2": "layernorm_after"}

# the files a folder export writes (zoo.export.peft / zoo.export.merged; zoo_export.json is each one's record).
# An export removes those of an earlier export of another kind it does not write itself: peft's
# adapter_config.json beside merged weights is an adapter to transformers' from_pretrained, an old
# config.json beside open_clip files a timm model, and zoo_export.json describes one export only
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "zoo_head.safetensors", "zoo_export.json")
MERGED_FILES = ("config.json", "model.safetensors", "open_clip_config.json", "open_clip_model.safetensors",
                "head.safetensors", "zoo_export.json")
EXPORT_FILES = tuple(dict.fromkeys(PEFT_FILES + MERGED_FILES))


class ExportError(ValueError):
    """An export or import that cannot be done faithfully; the message says why (one line)."""


@dataclass(frozen=True)
class Part:
    """One piece of the base model a zoo Linear maps to.

    ``module``: the peft target module name; ``key``: the prefix of its LoRA tensors in
    ``adapter_model.safetensors`` (differs from ``module`` for MultiheadAttention's out_proj);
    ``rows``: the zoo Linear's output rows it covers (``None``: all).
    """

    module: str
    key: str
    rows: slice | None = None


def check_family(bb: Backbone) -> str:
    if bb.family not in FAMILIES:
        raise ExportError(f"backbone {bb.family!r} has no peft / library export; supported: {', '.join(FAMILIES)}")
    return bb.family


def parts(bb: Backbone, path: str, out_features: int, ast_names: str = "legacy", ast_prefix: str = "") -> list[Part]:
    """The base-model pieces of the zoo Linear at ``path`` (relative to ``bb.model``)."""
    family = check_family(bb)
    if family in ("vit", "sam"):
        return [Part(path, path)]
    if family == "clip":
        if path.endswith(".attn.in_proj"):
            mha = path[: -len(".in_proj")]
            return [Part(mha, mha)]
        if path.endswith(".attn.out_proj"):
            mha = path[: -len(".out_proj")]
            return [Part(mha, f"{mha}.base_layer.out_proj")]
        return [Part(path, path)]
    # ast: blocks.N.<rel> -> encoder.layer.N.<hf> (or layers.N.<hf> in transformers 5)
    head, layer, qkv = (("encoder.layer.", _AST_LAYER, _AST_QKV) if ast_names == "legacy"
                        else ("layers.", _AST_LAYER_V5, _AST_QKV_V5))
    bits = path.split(".", 2)
    if len(bits) != 3 or bits[0] != "blocks":
        raise ExportError(f"AST Linear {path!r} is outside the transformer blocks; it has no Hugging Face counterpart")
    i, rel = bits[1], bits[2]
    stem = f"{ast_prefix}{head}{i}."
    if rel == "attn.qkv":
        d = out_features // 3
        return [Part(stem + name, stem + name, slice(j * d, (j + 1) * d)) for j, name in enumerate(qkv)]
    if rel in layer:
        return [Part(stem + layer[rel], stem + layer[rel])]
    raise ExportError(f"AST Linear {path!r} has no Hugging Face counterpart")


def norm_name(bb: Backbone, path: str, kind: str, ast_names: str = "legacy", ast_prefix: str = "") -> str:
    """The base model's name of the norm at ``path`` (relative to ``bb.model``; ``kind``: its ``train_also``
    name): the same path, except on AST (timm ``norm`` -> HF ``layernorm``, ``blocks.N.norm1`` / ``norm2`` ->
    ``encoder.layer.N.layernorm_before`` / ``layernorm_after``, ``layers.N.`` in transformers 5)."""
    if check_family(bb) != "ast":
        return path
    if kind == "final_norm":
        return f"{ast_prefix}layernorm"
    i = path.split(".")[1]
    return f"{ast_prefix}{'encoder.layer.' if ast_names == 'legacy' else 'layers.'}{i}.{_AST_NORMS[kind]}"


def norm_index(bb: Backbone, ast_names: str = "legacy", ast_prefix: str = "") -> dict[str, tuple[str, nn.Module]]:
    """``base-model module name -> (train_also name, zoo module)`` for every norm an adapter's ``train_also``
    can name on ``bb`` (every block's ``norm1`` / ``norm2`` of every tower, the ``final_norm``)."""
    from zoo.adapters.base import TRAIN_ALSO
    from zoo.sites import SiteError, find_sites, unwrap

    paths: dict[int, str] = {}
    for name, m in bb.model.named_modules():  # the path without adapter wrappers (x.base -> x)
        paths.setdefault(id(unwrap(m)), ".".join(p for p in name.split(".") if p != "base"))
    found = []
    for kind in TRAIN_ALSO[:2]:
        try:
            found += [(kind, s.base_module) for s in find_sites(bb, kind, "all", "all" if bb.towers else None)]
        except SiteError:
            pass
    final = bb.final_norm()
    if final is not None:
        found.append(("final_norm", unwrap(final)))
    return {norm_name(bb, paths[id(m)], kind, ast_names, ast_prefix): (kind, m) for kind, m in found if id(m) in paths}


def installed_ast_names() -> str:
    """``legacy`` (``encoder.layer.N.attention.attention.query``, transformers 4) or ``v5``."""
    try:
        import transformers
    except ImportError:
        return "legacy"
    return "legacy" if int(transformers.__version__.split(".")[0]) < 5 else "v5"


def linear_paths(bb: Backbone) -> dict[str, nn.Linear]:
    """Every Linear of ``bb.model`` by its path with adapter wrappers removed (``x.base`` -> ``x``)."""
    from zoo.sites import unwrap

    out: dict[str, nn.Linear] = {}
    for name, m in bb.model.named_modules():
        clean = ".".join(p for p in name.split(".") if p != "base")
        if clean in out:
            continue
        inner = unwrap(m)
        if isinstance(inner, nn.Linear):
            out[clean] = inner
    return out


def part_index(bb: Backbone, ast_names: str = "legacy", ast_prefix: str = "") -> dict[str, tuple[str, Part, nn.Linear]]:
    """``tensor key prefix -> (zoo path, Part, zoo Linear)`` for every Linear that has a base counterpart."""
    index = {}
    for path, lin in linear_paths(bb).items():
        try:
            ps = parts(bb, path, lin.out_features, ast_names, ast_prefix)
        except ExportError:
            continue
        for p in ps:
            index[p.key] = (path, p, lin)
    return index


def site_index(bb: Backbone) -> dict[tuple[int, object], tuple[str | None, int, str]]:
    """``(id of the zoo Linear, (start, stop) rows or None) -> (tower, block, site kind)`` for Linear sites."""
    from zoo.sites import LINEAR_SITES, unwrap

    towers = list(bb.available_towers()) if bb.towers else [None]
    out = {}
    for t in towers:
        n = len(bb.tower_blocks(t)[0])
        for i in range(n):
            table = bb.block_sites(i, t) if t is not None else bb.block_sites(i)
            for kind in LINEAR_SITES:
                entry = table.get(kind)
                if entry is None:
                    continue
                for parent, attr, sl, _ in entry if isinstance(entry, list) else [entry]:
                    m = unwrap(getattr(parent, attr))
                    out[(id(m), None if sl is None else (sl.start, sl.stop))] = (t, i, kind)
    return out
