"""The peft format, both ways: :func:`export_peft` writes a zoo LoRA as a peft ``LoraConfig`` adapter,
:func:`load_peft` reads a peft LoRA adapter into a zoo model.

The base model is the one each backbone's own library builds (``zoo.export.naming``): timm for ViT and
SAM's image encoder, open_clip for CLIP, Hugging Face ``ASTModel`` for AST. peft's LoRA on a Linear is

    y = W0 x + b + (lora_alpha / r) · B A x          (A: r × d_in, B: d_out × r; ``use_rslora``: alpha / √r)

which is the zoo's LoRA (:mod:`zoo.adapters.lora`) with γ = alpha/r. Each zoo LoRA module maps to its
base module(s) as follows.

* **q and v slices of a fused qkv** (timm ``qkv``, open_clip ``in_proj``). The zoo holds one pair per
  slice, ``ΔW_q = γ B_q A_q`` on the q rows and ``ΔW_v = γ B_v A_v`` on the v rows. peft can only put one
  LoRA on the whole ``qkv`` Linear, and

      ΔW_qkv = [ΔW_q; 0; ΔW_v] = γ · B′ A′,   A′ = [A_q; A_v]  (2r × d_in),
      B′ = [[B_q, 0], [0, 0], [0, B_v]]        (3d × 2r: B_q in the q rows and first r columns, B_v in
                                                the v rows and last r columns, the k rows zero)

  exactly. **The rank doubles** because the two deltas have independent row spaces: ``B′A′`` has
  rank up to 2r, and a rank-r factorisation of ``[ΔW_q; 0; ΔW_v]`` does not exist in general (q and
  v need not share an A). peft's scaling is ``lora_alpha / r′`` with r′ = 2r, so ``lora_alpha`` is
  rescaled to γ · 2r to keep γ (in general: ``lora_alpha = γ · r′`` for every module, through
  ``alpha_pattern`` where modules differ, and ``rank_pattern`` where ranks differ). Targets q, k, v
  give rank 3r in the same way; target ``qkv`` is one pair and keeps rank r.
* **AST**: Hugging Face's ``query`` / ``key`` / ``value`` are separate Linears, so a q slice is simply
  a rank-r LoRA on ``query`` (no doubling); a whole-``qkv`` LoRA becomes three LoRAs sharing ``A``.
* **open_clip**: peft adapts an ``nn.MultiheadAttention`` as one module (``in_proj`` and ``out_proj``
  together, with one rank and alpha). A zoo LoRA on only one of them gets zero factors on the other
  (and the smaller rank is zero-padded), which changes nothing in the function.

The task head goes to ``modules_to_save`` when the base model has that module (timm's ``head`` for a
ViT built with ``num_classes``); otherwise everything of the model outside its backbone (a head the base
model has no module for: CLIP's, AST's heads on the pooled feature -- the Linear, and ``layernorm_linear``'s
LayerNorm and Linear (``head.0.*``, ``head.1.*``; HF's ``ASTForAudioClassification`` has that structure but
takes the backbone's LayerNorm eps, 1e-12, where AST's ``mlp_head`` has 1e-5) --, SAM's prompt encoder and
mask decoder) is written beside the adapter as ``zoo_head.safetensors`` (the model's own state-dict keys). ``zoo_export.json``
records the zoo side (backbone, base-weight fingerprint, methods, head), so :func:`load_peft` can
check the base and rebuild the exact zoo config. The backbone norms an adapter's ``train_also`` trains go to
``modules_to_save`` too, under the base model's names (:func:`zoo.export.naming.norm_index`: HF AST
``layernorm`` / ``encoder.layer.N.layernorm_before|after``, timm ``norm`` / ``blocks.N.norm1|2``); peft
replaces those modules by the trained copies, and :func:`load_peft` reads them back as ``train_also``.

Methods peft expresses: ``lora`` (any targets, ``scaling``, PETL-AST's ``reduction_rate``), and the
methods whose modules are LoRA with other training (``colora``: per-layer ranks -> ``rank_pattern``;
``comp_lora``: its projected factors, as applied; ``eva``: its redistributed ranks -> ``rank_pattern``,
its stacked q / v wrappers on one qkv become one LoRA; ``lora_pro``: a LoRA trained by another
optimizer), ``dylora`` at its evaluation rank ``e`` (the first ``e`` components, ``γ = α/e``), ``lora_ga``
as a rank-2r LoRA that carries its frozen offset (``γ (BA − B0A0) = γ [B, −B0][A; A0]``, see
:func:`lora_pieces`), ``hydra`` (its parallel and sequential branches are one LoRA of rank r_p + r_s
with a bias on B: :func:`hydra_factors`), and ``miss`` / ``shira`` as peft ``MissConfig`` /
``ShiraConfig`` adapters (:mod:`zoo.export.peft_tuners`). :func:`load_peft` rebuilds ``lora``, ``eva``
and ``lora_pro`` as themselves (identical tensors); ``dylora`` / ``lora_ga`` / the others come back as
the plain LoRA with the same function. Every other method is refused naming it; export it merged into
the base weights instead (:func:`zoo.export.export_merged`, ``--merged``).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from zoo.adapters.base import WrappedLayer
from zoo.adapters.lora import LoRALinear
from zoo.backbones.base import Backbone
from zoo.export.naming import (
    AST_PREFIXES,
    BASE_CLASSES,
    EXPORT_FILES,
    ExportError,
    Part,
    check_family,
    installed_ast_names,
    linear_paths,
    norm_index,
    part_index,
    parts,
    site_index,
)
from zoo.export.peft_tuners import PAYLOADS as TUNER_PAYLOADS
from zoo.export.peft_tuners import unstacked_modules
from zoo.io import read_json_object, safetensors_bytes, write_together

TUNER_METHODS = tuple(TUNER_PAYLOADS)  # peft's MissConfig / ShiraConfig (zoo.export.peft_tuners)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
ZOO_META = "zoo_export.json"
ZOO_HEAD = "zoo_head.safetensors"
PREFIX = "base_model.model."
# methods whose modules are all LoRALinear: exported through their factors (lora_pieces)
LORA_METHODS = ("lora", "colora", "comp_lora", "eva", "lora_pro", "lora_ga", "dylora")
# Hydra's two branches are one LoRA of rank r_p + r_s with a bias on B (peft's ``lora_bias``), see hydra_factors
PEFT_METHODS = (*LORA_METHODS, "hydra", *TUNER_METHODS)
# methods load_peft rebuilds as themselves from the recorded config (their modules are plain LoRALinear,
# so the file's factors fill them exactly); the others come back as the plain LoRA of the same function
RELOADABLE = ("lora", "eva", "lora_pro")
# peft options a zoo LoRA has no counterpart for: load_peft refuses an adapter that sets them
UNSUPPORTED = {"use_dora": False, "lora_bias": False, "layer_replication": None, "target_parameters": None,
               "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None}


# --------------------------------------------------------------------------- helpers
def lora_modules(bb: Backbone) -> list[tuple[str, list[LoRALinear]]]:
    """``(path without wrappers, chain)`` for every Linear under LoRA wrappers inside ``bb.model``; ``chain``
    lists the LoRA wrappers on that Linear from the outside in (EVA stacks one per q / v slice, each with
    its own rank). Their deltas add, so together they are one peft LoRA (:func:`chain_pieces`)."""
    out, inner = [], set()
    for name, m in bb.model.named_modules():
        if not isinstance(m, LoRALinear) or id(m) in inner:
            continue
        chain, cur = [m], m.base
        while isinstance(cur, LoRALinear):
            chain.append(cur)
            inner.add(id(cur))
            cur = cur.base
        if isinstance(cur, WrappedLayer) or ".base." in f".{name}.":
            raise ExportError(f"{name}: a LoRA stacked with another kind of adapter on one Linear has no peft "
                              "equivalent; export them merged (--merged)")
        out.append((name, chain))
    return out


def _rows(s: slice | None, n: int) -> tuple[int, int]:
    return (0, n) if s is None else (s.start, s.stop)


def lora_pieces(w: LoRALinear) -> list[tuple[slice | None, torch.Tensor, torch.Tensor, float]]:
    """``(output rows, A (r′ × d_in), B (rows × r′), γ)`` per slice of ``w``, with ``ΔW[rows] = γ B A``.

    * a LoRA (and the methods whose modules are one: ``eva``, ``lora_pro``, ``colora``, ``comp_lora``): its
      factors as applied (``effective_A`` / ``effective_B``), γ its scaling;
    * DyLoRA (:class:`~zoo.adapters.dylora.DyLoRALinear`): truncated to its evaluation rank ``e`` (the first
      ``e`` components), ``γ = α/e`` (the ``r/e`` rescaling of ``α/r``): what ``eval()`` and ``merge`` compute;
    * LoRA-GA (:class:`~zoo.adapters.lora_ga.LoRAGALinear`): ``ΔW = γ (B A − B0 A0) = γ [B, −B0] [A; A0]``, a
      LoRA of rank 2r (the frozen offset rides in the factors; peft's own conversion of a LoRA-GA/PiSSA
      adapter to plain LoRA, ``save_pretrained(path_initial_model_for_weight_conversion=...)``, does the same).
    """
    from zoo.adapters.dylora import DyLoRALinear
    from zoo.adapters.lora_ga import LoRAGALinear

    r, n_out, out = w.rank, w.linear().out_features, []
    if isinstance(w, DyLoRALinear):
        e = w.eval_rank
        for i, (k, s) in enumerate(w.slices.items()):
            out.append((s, w.lora_A[i * r:i * r + e].detach(), w.lora_B[k][:, :e].detach(), float(w.scaling) * r / e))
        return out
    a_all = w.effective_A().detach()
    for i, (k, s) in enumerate(w.slices.items()):
        a, b = a_all[i * r:(i + 1) * r], w.effective_B(k).detach()
        if isinstance(w, LoRAGALinear):
            lo, hi = _rows(s, n_out)
            a = torch.cat([a, w.init_A[i * r:(i + 1) * r]], 0)
            b = torch.cat([b, -w.init_Bt[i * r:(i + 1) * r, lo:hi].t()], 1)
        out.append((s, a, b, float(w.scaling)))
    return out


def chain_pieces(chain: list[LoRALinear]) -> list[tuple[LoRALinear, int, str, slice | None]]:
    """``(wrapper, slice index, slice name, rows)`` over a chain, in the order of the rows (q before v),
    the layout of A′'s row blocks / B′'s column blocks in :func:`part_factors` and :func:`_fill`."""
    items = [(w, i, k, s) for w in chain for i, (k, s) in enumerate(w.slices.items()) if w.rank > 0]
    n = chain[0].linear().out_features
    return sorted(items, key=lambda t: _rows(t[3], n)[0])


def part_factors(chain: list[LoRALinear], rows: slice | None) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(A′, B′, γ)`` of the LoRA wrappers ``chain`` on one Linear restricted to output ``rows`` (see the
    module docstring), or ``None`` when no slice touches those rows. A piece with another γ has it folded
    into its B columns (exact up to rounding)."""
    n_out = chain[0].linear().out_features
    lo, hi = _rows(rows, n_out)
    by = {(id(w), i): p for w in chain if w.rank > 0 for i, p in enumerate(lora_pieces(w))}
    a_blocks, b_cols, gamma = [], [], None
    for w, i, _, s in chain_pieces(chain):
        _, a_p, b_p, g = by[(id(w), i)]
        s0, s1 = _rows(s, n_out)
        x0, x1 = max(lo, s0), min(hi, s1)
        if x0 >= x1:
            continue
        gamma = g if gamma is None else gamma
        col = a_p.new_zeros(hi - lo, a_p.shape[0])
        col[x0 - lo:x1 - lo] = b_p[x0 - s0:x1 - s0] * (g / gamma) if g != gamma else b_p[x0 - s0:x1 - s0]
        a_blocks.append(a_p)
        b_cols.append(col)
    if not a_blocks:
        return None
    return torch.cat(a_blocks, 0), torch.cat(b_cols, 1), gamma


def _pattern_key(module: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key that matches exactly ``module`` (peft matches keys as
    regexes against the end of a module name, so ``transformer.x`` would also match ``visual.transformer.x``)."""
    return "^" + re.escape(module)


def _pattern_value(patterns: dict, module: str, default):
    """peft's ``get_pattern_key`` lookup: the first key that matches the end of ``module``."""
    for key, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return v
    return default


def head_target(model: nn.Module, family: str) -> tuple[str, nn.Module] | None:
    """``(base-model module name, zoo head module)`` when the base model has the head's module."""
    from zoo.heads import ImageClassifier

    if family == "vit" and type(model) is ImageClassifier:
        return "head", model.head
    return None


def _meta(model: nn.Module, bb: Backbone, load_as: dict | None, head_where: str | None) -> dict[str, Any]:
    from zoo.checkpoint import describe

    d = describe(model)
    return {"format": "peft", "zoo_version": d["library"]["version"], "backbone": d["backbone"],
            "methods": d["methods"], "load_as": load_as, "head": d["head"], "head_location": head_where,
            "base": base_recipe(bb)}


def base_recipe(bb: Backbone) -> dict[str, Any]:
    """How to build the base model in its own library (for the docs / the record, never executed)."""
    from zoo.backbones.base import _jsonable

    kw = _jsonable(bb.build_kwargs)
    if bb.family in ("vit", "sam"):
        return {"library": "timm", "call": f"timm.create_model({bb.model_name!r}, **kwargs)", "kwargs": kw}
    if bb.family == "clip":
        return {"library": "open_clip", "call": f"open_clip.create_model({bb.model_name!r}, **kwargs)", "kwargs": kw}
    return {"library": "transformers", "call": "transformers.ASTModel.from_pretrained(...)",
            "note": "the Hugging Face AST checkpoint the zoo AST was built from (weights_tag), or the base written by "
                    "`python -m zoo export --format merged` of the plain backbone"}


# --------------------------------------------------------------------------- export
def export_peft(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write ``model``'s adapter as ``adapter_config.json`` + ``adapter_model.safetensors`` for peft (a
    ``LoraConfig``, or ``MissConfig`` / ``ShiraConfig`` for MiSS / SHiRA).

    Load it with ``peft.PeftModel.from_pretrained(base, out_dir)`` onto the base model built the usual
    way (see the module docstring). Raises :class:`ExportError` (one line, naming the method) for a
    method peft cannot express.
    """
    from zoo.api import find_backbone

    bb = find_backbone(model)
    family = check_family(bb)
    methods = [a.name for a in bb.adapters]
    if not methods:
        raise ExportError("the model has no adapter to export (attach one, or export the plain backbone with --format merged)")
    bad = [m for m in methods if m not in PEFT_METHODS]
    if bad:
        from zoo.adapters import ADAPTERS

        how = ("export it merged into the base weights with --merged" if all(ADAPTERS.get(m).mergeable for m in bad)
               else "it is not mergeable either, so only the zoo artifact or --format merged --keep-modules can carry it")
        raise ExportError(f"method {bad[0]!r} has no peft equivalent (peft expresses {', '.join(PEFT_METHODS)}); {how}")
    if any(a.merged for a in bb.adapters):
        raise ExportError("the adapters are merged into the base weights; unmerge them (zoo.unmerge_adapters) before export_peft")
    for a in bb.adapters:
        if a.name == "eva" and a.train_biases:
            raise ExportError("eva with train_biases=true also changes the backbone's biases, which a peft LoRA does not "
                              "carry; export it merged (--merged)")
    names = installed_ast_names()
    tuners = [m for m in methods if m in TUNER_METHODS]
    if tuners:
        if len(methods) != 1:
            raise ExportError(f"{tuners[0]} together with {[m for m in methods if m != tuners[0]]} is more than one peft "
                              "adapter; export them merged (--merged)")
        tensors, cfg, targets = TUNER_PAYLOADS[tuners[0]](bb, names)
        cfg = {"task_type": None, "base_model_name_or_path": None, "inference_mode": True, **cfg,
               "target_modules": sorted(targets)}
        counted = len(_adapter_modules_inside(bb))
    else:
        tensors, cfg, counted = _lora_payload(bb, methods, names)
    if sum(len(a.modules) for a in bb.adapters) != counted:
        raise ExportError("some adapter modules live outside the backbone's own model (SAM's mask decoder, tower=decoder): "
                          "peft's base is the image encoder only; export the model merged (--merged) instead")
    head = head_target(model, family)
    head_where = None
    if head is not None:
        for k, v in head[1].state_dict().items():
            tensors[f"{PREFIX}{head[0]}.{k}"] = v.detach()
        head_where = f"modules_to_save:{head[0]}"
    norms = trained_norms(bb, names)  # train_also: the backbone norms that trained, as peft modules_to_save
    for base_name, (_, m) in norms.items():
        for k, v in m.state_dict().items():
            tensors[f"{PREFIX}{base_name}.{k}"] = v.detach()
    saved = ([head[0]] if head else []) + sorted(norms)
    cfg.update({"modules_to_save": saved or None,
                "auto_mapping": {"base_model_class": BASE_CLASSES[family][0]}})
    files = {WEIGHTS: safetensors_bytes({k: v.contiguous().cpu().clone() for k, v in tensors.items()}, {"format": "pt"})}
    rest = outside_backbone(model, bb)
    if head is None and rest:
        files[ZOO_HEAD] = safetensors_bytes({k: v.detach().contiguous().cpu().clone() for k, v in rest.items()},
                                            {"format": "pt"})
        head_where = ZOO_HEAD
    load_as = ({"name": methods[0], "config": dict(bb.adapters[0].config)}
               if len(methods) == 1 and methods[0] in RELOADABLE else None)
    files[ZOO_META] = (json.dumps(_meta(model, bb, load_as, head_where), indent=2) + "\n").encode()
    files[CONFIG] = (json.dumps(cfg, indent=2) + "\n").encode()
    # one set, adapter_config.json last: a failed write leaves the previous export as it was, a crash
    # between the renames a folder without adapter_config.json (no adapter to peft or load_peft), never a
    # config beside another export's weights; the files of an earlier export this one does not write go
    # (a zoo_head.safetensors, a merged export's config.json and weights: naming.EXPORT_FILES)
    return write_together(out_dir, files, last=CONFIG, stale=EXPORT_FILES)


def trained_norms(bb: Backbone, ast_names: str = "legacy", ast_prefix: str = "") -> dict[str, tuple[str, nn.Module]]:
    """``base-model name -> (train_also name, module)`` of the norms the adapters' ``train_also`` trains
    (peft carries them as ``modules_to_save``: their whole trained tensors)."""
    want = {id(m) for a in bb.adapters for m in a.train_also_modules()}
    out = {k: v for k, v in norm_index(bb, ast_names, ast_prefix).items() if id(v[1]) in want}
    if len(out) != len(want):
        raise ExportError("some train_also norms have no name in the base model; export the model merged (--merged)")
    return out


def _adapter_modules_inside(bb: Backbone) -> list[nn.Module]:
    from zoo.adapters.base import AdapterModule

    return [m for m in bb.model.modules() if isinstance(m, AdapterModule)]


def _lora_payload(bb: Backbone, methods: list[str], names: str) -> tuple[dict, dict, int]:
    """``(tensors, LoraConfig fields, number of adapter modules inside bb.model)``."""
    mods, hydras = lora_modules(bb), hydra_modules(bb)
    if not mods and not hydras:
        raise ExportError(f"the adapters {methods} hold no LoRA modules yet (colora allocates its ranks in prepare); "
                          "export after training")
    factors = _export_factors(bb, mods, names) if mods else {}
    biases = {}
    for key, (module, a, b, gamma, bias) in hydra_factors(bb, hydras, names).items():
        if key in factors:
            raise ExportError(f"{key}: a LoRA and a Hydra on one Linear have no single peft LoRA; export them merged (--merged)")
        factors[key], biases[key] = (module, a, b, gamma), bias
    tensors, rank_of, alpha_of = {}, {}, {}
    for key, (module, a, b, gamma) in factors.items():
        tensors[f"{PREFIX}{key}.lora_A.weight"] = a
        tensors[f"{PREFIX}{key}.lora_B.weight"] = b
        if hydras:  # lora_bias is one switch for every target: the LoRA modules get a zero bias
            tensors[f"{PREFIX}{key}.lora_B.bias"] = biases.get(key, b.new_zeros(b.shape[0]))
        rank_of[module], alpha_of[module] = a.shape[0], gamma * a.shape[0]
    r, alpha = Counter(zip(rank_of.values(), alpha_of.values())).most_common(1)[0][0]
    if any(k.endswith(".base_layer.out_proj") and f[2].any() for k, f in factors.items()):
        import warnings

        warnings.warn("this CLIP LoRA changes attention out_proj: peft <= 0.21's MultiheadAttention.merge (also run by "
                      "its forward) adds that delta twice (huggingface/peft PR #3774); the exported factors are the "
                      "correct ones, peft's outputs match once the fix is released", UserWarning, stacklevel=3)
    cfg = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": int(r), "lora_alpha": float(alpha), "lora_dropout": float(bb.adapters[0].config.get("dropout", 0.0) or 0.0),
        "target_modules": sorted(rank_of), "bias": "none", "use_rslora": False, "use_dora": False,
        "lora_bias": bool(hydras), "init_lora_weights": True, "fan_in_fan_out": False,
        "rank_pattern": {_pattern_key(m): int(v) for m, v in sorted(rank_of.items()) if v != r},
        "alpha_pattern": {_pattern_key(m): float(alpha_of[m]) for m in sorted(rank_of) if alpha_of[m] != alpha},
    }
    return tensors, cfg, sum(len(c) for _, c in mods) + len(hydras)


def _export_factors(bb: Backbone, mods, ast_names: str, ast_prefix: str = "") -> dict[str, tuple]:
    """``key -> (peft module, A′, B′, γ)`` for every base piece the zoo LoRA modules touch."""
    out: dict[str, tuple[str, torch.Tensor, torch.Tensor, float]] = {}
    for path, chain in mods:
        if all(w.rank == 0 for w in chain):  # no delta (colora may allocate rank 0 to a layer)
            continue
        for p in parts(bb, path, chain[0].linear().out_features, ast_names, ast_prefix):
            f = part_factors(chain, p.rows)
            if f is not None:
                out[p.key] = (p.module, *f)
    if bb.family == "clip":
        _complete_mha(bb, out)
    return out


def hydra_modules(bb: Backbone) -> list:
    """``(path without wrappers, module)`` of every Hydra wrapper inside ``bb.model``."""
    from zoo.adapters.hydra import HydraLinear

    return unstacked_modules(bb, HydraLinear)


def hydra_factors(bb: Backbone, mods, ast_names: str) -> dict[str, tuple]:
    """``key -> (peft module, A′, B′, s, c)``: Hydra as one LoRA with a bias on B (Kim et al., see
    :mod:`zoo.adapters.hydra`). With ``y0 = W0 x + b0`` the layer is

        y0 + s·[B_p (A_p x + d_p) + u_p] + s·[B_s (A_s y0 + d_s) + u_s]
          = y0 + s·(B′ A′ x + c),   A′ = [A_p; A_s W0],  B′ = [B_p, B_s],
                                    c = B_p d_p + u_p + B_s (A_s b0 + d_s) + u_s

    exactly: the sequential branch reads a linear function of x, so it is a low-rank delta of rank
    r_s on the input (``A_s W0``: the base weight folded in, fixed because the base is frozen). peft
    computes ``lora_B(lora_A(x)) · lora_alpha / r`` with a bias on ``lora_B`` when ``lora_bias=True``.
    Only the function carries over: Hydra's dropout sits between down and up, peft's on the input."""
    out = {}
    for path, w in mods:
        lin = w.linear()
        if bb.family == "clip" and path.endswith((".attn.in_proj", ".attn.out_proj")):
            raise ExportError(f"{path}: peft's MultiheadAttention LoRA has no lora_bias; a Hydra there has no peft "
                              "equivalent (export it merged with --merged)")
        w0 = lin.weight.detach()
        b0 = lin.bias.detach() if lin.bias is not None else w0.new_zeros(w0.shape[0])
        par, seq = w.par, w.seq
        a = torch.cat([par.down.weight.detach(), seq.down.weight.detach() @ w0], 0)
        b = torch.cat([par.up.weight.detach(), seq.up.weight.detach()], 1)
        c = seq.up.weight.detach() @ (seq.down.weight.detach() @ b0)
        for t in (par.bias_term(), seq.bias_term()):
            if t is not None:
                c = c + t.detach()
        for p in parts(bb, path, lin.out_features, ast_names):
            rows = slice(None) if p.rows is None else p.rows
            out[p.key] = (p.module, a, b[rows].contiguous(), float(w.scale), c[rows].contiguous())
    return out


def _complete_mha(bb: Backbone, out: dict) -> None:
    """peft adapts a MultiheadAttention's in_proj and out_proj together with one rank and alpha: give the
    missing one zero factors, zero-pad the smaller rank, and fold a differing γ into B (exact)."""
    lins = linear_paths(bb)
    for module in sorted({m for m, *_ in out.values() if m.endswith(".attn")}):
        keys = {"in_proj": module, "out_proj": f"{module}.base_layer.out_proj"}
        have = {n: out[k] for n, k in keys.items() if k in out}
        r = max(v[1].shape[0] for v in have.values())
        gamma = next(iter(have.values()))[3]
        for name, key in keys.items():
            lin = lins[f"{module}.{name}"]
            a = torch.zeros(r, lin.in_features, dtype=lin.weight.dtype)
            b = torch.zeros(lin.out_features, r, dtype=lin.weight.dtype)
            if name in have:
                _, a0, b0, g0 = have[name]
                a[:a0.shape[0]] = a0
                b[:, :b0.shape[1]] = b0 if g0 == gamma else b0 * (g0 / gamma)
            out[key] = (module, a, b, gamma)


# --------------------------------------------------------------------------- import
def read_peft(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict | None]:
    """``(adapter_config, tensors without the base_model.model. prefix, zoo_export.json or None)``; a file that
    is not what it should be is one :class:`ExportError` naming it (JSON, safetensors, NaN/inf, dtype)."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} is not a peft adapter folder: expected {CONFIG} and {WEIGHTS}")
    cfg = _read_json_object(path / CONFIG)
    raw = _read_tensors(path / WEIGHTS)
    tensors = {(k.removeprefix(PREFIX)): v for k, v in raw.items()}
    meta = _read_json_object(path / ZOO_META) if (path / ZOO_META).is_file() else None
    if meta is not None:
        _check_zoo_meta(meta, path / ZOO_META)
    return cfg, tensors, meta


def _read_json_object(file: Path) -> dict[str, Any]:
    return read_json_object(file, ExportError, "the adapter is corrupt or was edited by hand")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A peft / zoo-head safetensors file: floating-point tensors, all finite (half precision is fine: it
    widens exactly; :func:`_check_dtypes` refuses what the model would narrow)."""
    from zoo.checkpoint import MAX_VALUE
    from zoo.io import check_finite

    try:
        state = load_file(str(file))
    except Exception as e:  # truncated / not a safetensors file
        raise ExportError(f"{file} cannot be read as safetensors ({type(e).__name__}: {e})") from None
    ints = [f"{k} ({v.dtype})" for k, v in state.items() if not v.is_floating_point()]
    if ints:
        raise ExportError(f"{file}: {len(ints)} tensor(s) are not floating point, e.g. {ints[:3]}; LoRA factors and "
                          "head weights are floats")
    try:
        check_finite(state, file, limit=MAX_VALUE)
    except ValueError as e:
        raise ExportError(str(e)) from None
    return state


def _check_dtypes(file: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Refuse tensors the model's ``dtype`` cannot hold exactly (fp64 into fp32): loading them would round
    every factor without a word. Narrower floats (fp16, bf16 — peft often saves them) widen exactly."""
    wide = [f"{k} ({v.dtype})" for k, v in tensors.items() if torch.finfo(v.dtype).bits > torch.finfo(dtype).bits]
    if wide:
        raise ExportError(f"{file}: {len(wide)} tensor(s) are wider than the model's {dtype}, e.g. {wide[:3]}; "
                          f"loading them would round them: convert the model (or the file) to one dtype first")


def _check_zoo_meta(meta: dict[str, Any], file: Path) -> None:
    """``zoo_export.json`` is data: its ``load_as`` may only name a method :func:`load_peft` rebuilds as itself,
    with plain options (it is checked again against the tensors by :func:`_fill`)."""
    from zoo.checkpoint import UnsafeArtifactError, check_data_only

    try:
        check_data_only(meta, file)
    except UnsafeArtifactError as e:
        raise ExportError(str(e)) from None
    if not isinstance(meta.get("backbone") or {}, dict):
        raise ExportError(f"{file}: backbone must be an object, got {meta['backbone']!r}")
    load_as = meta.get("load_as")
    if load_as is None:
        return
    if not isinstance(load_as, dict) or load_as.get("name") not in RELOADABLE or \
            not isinstance(load_as.get("config"), dict) or set(load_as) - {"name", "config"}:
        raise ExportError(f"{file}: load_as must be {{name, config}} with name one of {', '.join(RELOADABLE)} "
                          f"and config an object, got {str(load_as)[:120]}")
    methods = meta.get("methods")
    names = [m.get("name") for m in methods if isinstance(m, dict)] if isinstance(methods, list) else None
    if names is not None and names != [load_as["name"]]:
        raise ExportError(f"{file}: load_as names {load_as['name']!r} but the recorded methods are {names}")


def _check_config(cfg: dict[str, Any], family: str, where: Any = CONFIG) -> None:
    import numbers

    def number(v: Any) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    if cfg.get("peft_type") != "LORA":
        raise ExportError(f"peft method {cfg.get('peft_type')!r} has no zoo counterpart here; load_peft reads LoRA adapters")
    for k, ok in UNSUPPORTED.items():
        if cfg.get(k) not in (ok, None, [], {}):
            raise ExportError(f"peft option {k}={cfg[k]!r} has no zoo LoRA counterpart")
    # the options the zoo config is derived from (or that peft would read): numbers of the right range
    for key, ok, want in (("r", lambda v: number(v) and v >= 1 and int(v) == v, "an integer >= 1"),
                          ("lora_alpha", lambda v: number(v) and v > 0, "a finite number > 0"),
                          ("lora_dropout", lambda v: number(v) and 0 <= v < 1, "a number in [0, 1)"),
                          ("use_rslora", lambda v: isinstance(v, bool), "true or false")):
        if cfg.get(key) is not None and not ok(cfg[key]):
            raise ExportError(f"{where}: {key} must be {want}, got {cfg[key]!r}")
    for key, ok in (("rank_pattern", lambda v: number(v) and v >= 1), ("alpha_pattern", lambda v: number(v) and v > 0)):
        pat = cfg.get(key)
        if pat is not None and (not isinstance(pat, dict) or not all(ok(v) for v in pat.values())):
            raise ExportError(f"{where}: {key} must map module patterns to positive numbers, got {pat!r}")
    cls = (cfg.get("auto_mapping") or {}).get("base_model_class")
    if cls and cls not in BASE_CLASSES[family]:
        raise ExportError(f"the adapter was made for a {cls}, this model's base is a {' / '.join(BASE_CLASSES[family])} "
                          f"({family}); load it into a model with that base")


def _ast_layout(keys) -> tuple[str, str]:
    """``(names, prefix)`` of a Hugging Face AST adapter: ``legacy`` (``encoder.layer.N``, transformers 4)
    or ``v5`` (``layers.N``), on ``ASTModel`` (no prefix) or ``ASTForAudioClassification``."""
    prefix = AST_PREFIXES[1] if any(k.startswith(AST_PREFIXES[1]) for k in keys) else ""
    names = "v5" if any(k[len(prefix):].startswith("layers.") for k in keys) else "legacy"
    return names, prefix


def load_peft(model: nn.Module, path: str | os.PathLike, check_fingerprint: bool = True) -> nn.Module:
    """Load the peft LoRA adapter at ``path`` into ``model`` (a zoo backbone, or a head around one).

    Works for adapters trained with peft on the base models of :mod:`zoo.export.naming` (target names
    timm ``qkv`` / ``proj`` / ``fc1``, open_clip ``attn`` (its ``in_proj`` and ``out_proj``) / ``c_fc``,
    HF AST ``query`` / ``key`` / ``value`` / ``dense``) and for :func:`export_peft`'s output. The zoo LoRA
    config is the recorded one (``zoo_export.json``) or is derived from the tensors: the site kinds and
    layers the adapter touches (the same kinds in every adapted layer), its rank and γ.

    The head comes from ``modules_to_save`` (timm's ``head``) or, for a model with a ``head``, from the
    ``zoo_head.safetensors`` :func:`export_peft` writes for heads the base model has no module for.

    Everything is checked before the model changes: the base (``auto_mapping``, tensor shapes, the
    base-weight fingerprint when ``zoo_export.json`` records one), and that the zoo LoRA reproduces every
    tensor of the file exactly; on failure the model is left as it was.
    """
    from zoo.api import ModelState, apply_adapter, find_backbone

    bb = find_backbone(model)
    family = check_family(bb)
    cfg, tensors, meta = read_peft(path)
    _check_config(cfg, family, Path(path) / CONFIG)
    if bb.adapters:
        raise ExportError(f"the model already has adapters {[a.name for a in bb.adapters]}; load a peft adapter into a plain model")
    _check_dtypes(Path(path) / WEIGHTS, tensors, next(bb.parameters()).dtype)
    names, prefix = _ast_layout(tensors) if family == "ast" else ("legacy", "")
    index = part_index(bb, names, prefix)
    lora, head_t, norm_t = {}, {}, {}
    saved = set(cfg.get("modules_to_save") or [])
    norms = norm_index(bb, names, prefix)
    for k, v in tensors.items():
        m = re.match(r"^(.*)\.lora_([AB])\.weight$", k)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = v
        elif "." in k and k.rsplit(".", 1)[0] in norms and k.rsplit(".", 1)[0] in saved:
            norm_t.setdefault(k.rsplit(".", 1)[0], {})[k.rsplit(".", 1)[1]] = v
        elif k.split(".", 1)[0] in saved or any(k.startswith(f"{s}.") for s in saved):
            head_t[k] = v
        else:
            raise ExportError(f"tensor {k!r} is neither a LoRA factor nor in modules_to_save; a zoo LoRA cannot hold it")
    unknown = sorted(k for k in lora if k not in index)
    if unknown:
        raise ExportError(f"the adapter targets {unknown[:4]}{'…' if len(unknown) > 4 else ''}, which this {family} model "
                          f"({bb.model_name}) does not have as Linear sites")
    for k, ab in lora.items():
        _, part, lin = index[k]
        rows = lin.out_features if part.rows is None else part.rows.stop - part.rows.start
        if set(ab) != {"A", "B"} or ab["A"].ndim != 2 or ab["A"].shape[1] != lin.in_features or \
                tuple(ab["B"].shape) != (rows, ab["A"].shape[0]):
            got = {n: tuple(t.shape) for n, t in ab.items()}
            raise ExportError(f"{k}: LoRA factors {got} do not fit this model's Linear ({lin.in_features} -> {rows}); "
                              "the adapter was trained on a base of another size")
    _head_for(model, family, head_t)  # modules_to_save: timm's head is the zoo ImageClassifier's 'head'
    if not head_t and (Path(path) / ZOO_HEAD).is_file() and outside_backbone(model, bb):
        head_t = _zoo_head(Path(path) / ZOO_HEAD, outside_backbone(model, bb))
    if meta is not None:
        want = meta.get("backbone", {})
        diffs = [f"{k}: adapter {want.get(k)!r}, model {v!r}" for k, v in
                 (("family", bb.family), ("model", bb.model_name)) if want.get(k) not in (None, v)]
        if not diffs and check_fingerprint and want.get("fingerprint") and want["fingerprint"] != bb.fingerprint():
            diffs.append(f"base-weight fingerprint: adapter {want['fingerprint'][:12]}…, model {bb.fingerprint()[:12]}…")
        if diffs:
            raise ExportError("the peft adapter was made for another base: " + "; ".join(diffs))
        head = meta.get("head")  # e.g. AST's layernorm_linear vs a Linear, or another LayerNorm eps: same tensors or not
        if head and hasattr(model, "head_spec") and model.head_spec() != head:
            raise ExportError(f"the peft adapter's head is {head}, the model's {model.head_spec()}; build the model "
                              f"with the recorded head (zoo.heads.build_head_model)")
    lora_cfg = (meta or {}).get("load_as") or _derive_config(bb, cfg, lora, index)
    train_also = _norms_config(norms, norm_t)
    if (meta or {}).get("load_as"):
        if sorted(lora_cfg["config"].get("train_also") or []) != sorted(train_also):
            raise ExportError(f"zoo_export.json records train_also={lora_cfg['config'].get('train_also')}, the file's "
                              f"modules_to_save hold {train_also}; the export was edited by hand")
    elif train_also:
        lora_cfg = {**lora_cfg, "config": {**lora_cfg["config"], "train_also": train_also}}
    snap = ModelState(model)
    full = model.state_dict()
    head_before = {k: full[k].detach().clone() for k in head_t}
    norms_before = {k: {n: t.detach().clone() for n, t in norms[k][1].state_dict().items()} for k in norm_t}
    try:
        apply_adapter(model, lora_cfg["name"], **lora_cfg["config"])
        _fill(bb, lora, index, names, prefix)
        model.load_state_dict(head_t, strict=False)  # keys checked: exactly the head's
        for k, state in norm_t.items():  # keys and shapes checked by _norms_config
            norms[k][1].load_state_dict(state)
    except BaseException:
        snap.restore(model)
        model.load_state_dict(head_before, strict=False)
        for k, state in norms_before.items():
            norms[k][1].load_state_dict(state)
        raise
    snap.match_mode(model)
    return model


def _norms_config(norms: dict[str, tuple[str, nn.Module]], norm_t: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """The zoo ``train_also`` that trains exactly the norms of the file's ``modules_to_save``: each named
    kind in every block (a zoo adapter trains a block norm everywhere or nowhere), tensors of the model's shapes."""
    from zoo.adapters.base import TRAIN_ALSO

    for k, state in norm_t.items():
        own = {n: tuple(t.shape) for n, t in norms[k][1].state_dict().items()}
        got = {n: tuple(t.shape) for n, t in state.items()}
        if own != got:
            raise ExportError(f"modules_to_save {k!r}: tensors {got} do not fit the model's norm {own}")
    kinds = []
    for kind in TRAIN_ALSO:
        every = sorted(k for k, (kd, _) in norms.items() if kd == kind)
        have = [k for k in every if k in norm_t]
        if have and have != every:
            raise ExportError(f"modules_to_save holds {len(have)} of the {len(every)} {kind} norms (e.g. no "
                              f"{min(set(every) - set(have))!r}); a zoo adapter's train_also trains one in every block")
        if have:
            kinds.append(kind)
    return kinds


def _head_for(model: nn.Module, family: str, head_t: dict[str, torch.Tensor]):
    if not head_t:
        return None
    target = head_target(model, family)
    names = sorted({k.rsplit(".", 1)[0] for k in head_t})
    if target is None or names != [target[0]]:
        raise ExportError(f"the adapter saves modules {names} (modules_to_save), which this model has no place for "
                          f"(a zoo.ImageClassifier on a ViT takes timm's 'head')")
    own = {f"{target[0]}.{k}": tuple(v.shape) for k, v in target[1].state_dict().items()}  # same names in both
    got = {k: tuple(v.shape) for k, v in head_t.items()}
    if own != got:
        raise ExportError(f"head tensors {got} do not fit the model's head {own} (another number of classes?)")
    return target


def outside_backbone(model: nn.Module, bb: Backbone) -> dict[str, torch.Tensor]:
    """``model``'s tensors outside its backbone (a head, SAM's prompt encoder and mask decoder)."""
    if model is bb:
        return {}
    name = next(n for n, m in model.named_modules() if m is bb)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(f"{name}.")}


def _zoo_head(file: Path, head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head :func:`export_peft` wrote beside the adapter, checked against the model's head."""
    state = _read_tensors(file)
    _check_dtypes(file, state, next(iter(head.values())).dtype)
    own = {k: tuple(v.shape) for k, v in head.items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if own != got:
        raise ExportError(f"{file.name} holds a head {got} that does not fit the model's head {own}")
    return state


def _scale(cfg: dict, module: str, r: int) -> float:
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _derive_config(bb: Backbone, cfg: dict, lora: dict, index: dict) -> dict[str, Any]:
    """The zoo ``lora`` config whose modules have exactly the file's LoRA pieces."""
    sites = site_index(bb)
    where, ranks, gammas = set(), set(), set()
    for k, ab in lora.items():
        _, part, lin = index[k]
        rows = None if part.rows is None else (part.rows.start, part.rows.stop)
        site = sites.get((id(lin), rows))
        if site is None:
            raise ExportError(f"{k} is not at a zoo site (q k v qkv o fc1 fc2 of a block); a zoo LoRA cannot hold it")
        where.add(site)
        r = ab["A"].shape[0]
        ranks.add(r)
        gammas.add(_scale(cfg, part.module, r))
    if len(ranks) != 1 or len(gammas) != 1:
        raise ExportError(f"the adapter's modules have different ranks {sorted(ranks)} / scalings {sorted(gammas)}; "
                          "a zoo LoRA has one rank and alpha (rank_pattern / alpha_pattern are not expressible)")
    towers = sorted({t for t, _, _ in where}, key=str)
    kinds = [k for k in ("q", "k", "v", "qkv", "o", "fc1", "fc2") if any(s[2] == k for s in where)]
    per_tower = {t: sorted({i for tt, i, _ in where if tt == t}) for t in towers}
    every = all(per_tower[t] == list(range(len(bb.tower_blocks(t)[0]))) for t in towers)  # towers may differ in depth
    layers = "all" if every else per_tower[towers[0]]
    full = {(t, i, k) for t in towers for i in (range(len(bb.tower_blocks(t)[0])) if every else layers) for k in kinds}
    if full != where:
        missing = sorted(full - where, key=str)[:3]
        raise ExportError(f"the adapter does not adapt the same sites in every adapted layer (e.g. no {missing}); "
                          "a zoo LoRA adapts kinds × layers")
    r, gamma = ranks.pop(), gammas.pop()
    rslora = bool(cfg.get("use_rslora"))
    conf: dict[str, Any] = {"rank": r, "alpha": gamma * (math.sqrt(r) if rslora else r), "targets": kinds,
                            "layers": layers, "dropout": float(cfg.get("lora_dropout") or 0.0),
                            "scaling": "rslora" if rslora else "standard"}
    if towers != [None] and towers != [bb.towers[0]]:
        conf["tower"] = towers[0] if len(towers) == 1 else "both"
    return {"name": "lora", "config": conf}


def _fill(bb: Backbone, lora: dict, index: dict, names: str, prefix: str) -> None:
    """Put the file's factors into the freshly attached zoo LoRA modules (the inverse of
    :func:`part_factors`), then check that exporting them gives back every tensor exactly."""
    mods = lora_modules(bb)
    pieces: dict[str, list[Part]] = {}
    for key, (path, part, _) in index.items():
        pieces.setdefault(path, []).append(part)
    with torch.no_grad():
        for path, chain in mods:
            n_out = chain[0].linear().out_features
            for part in pieces.get(path, []):
                if part.key not in lora:
                    continue
                a, b = lora[part.key]["A"], lora[part.key]["B"]
                lo, hi = _rows(part.rows, n_out)
                m = 0  # the next row block of A′ (column block of B′)
                for w, i, k, s in chain_pieces(chain):
                    r = w.rank
                    s0, s1 = _rows(s, n_out)
                    x0, x1 = max(lo, s0), min(hi, s1)
                    if x0 >= x1:
                        continue
                    if m + r > a.shape[0]:
                        raise ExportError(f"{part.key}: rank {a.shape[0]} is smaller than the zoo config needs "
                                          f"({sum(c.rank * len(c.slices) for c in chain)})")
                    w.lora_A[i * r:(i + 1) * r] = a[m:m + r]
                    w.lora_B[k][x0 - s0:x1 - s0] = b[x0 - lo:x1 - lo, m:m + r]
                    m += r
    again = _export_factors(bb, mods, names, prefix)
    for key, ab in lora.items():
        got = again.get(key)
        if got is None:
            if (ab["B"].double() @ ab["A"].double()).any():
                raise ExportError(f"{key}: a nonzero delta the zoo config does not adapt")
            continue
        if not (torch.equal(got[1], ab["A"].to(got[1].dtype)) and torch.equal(got[2], ab["B"].to(got[2].dtype))):
            raise ExportError(f"{key}: the delta is not a zoo LoRA of this config (e.g. nonzero k rows of a q,v LoRA)")
