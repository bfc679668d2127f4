"""peft's non-LoRA tuners the zoo also has: a zoo MiSS as a peft ``MissConfig`` adapter, a zoo SHiRA as a
peft ``ShiraConfig`` adapter (export only; :func:`zoo.export.peft.export_peft` calls :func:`tuner_payload`).

peft puts one MiSS / SHiRA on each target module: the whole fused ``qkv`` of timm (ViT, SAM), Hugging
Face AST's separate ``query`` / ``key`` / ``value``. The zoo puts one per targeted row slice (q, v), so
each peft module gets the zoo slices inside its rows:

* **MiSS** (:mod:`zoo.adapters.miss`). ``balance``: ``ΔW = Dᵀ`` tiled over the input columns, so the q and
  v shards side by side, zero in the k columns (``_shard_full``), are exactly peft's one shard ``(r, 3d)``
  on the whole qkv. ``bat``: block row ``i`` of ``W0`` changes by ``W_ij D_i + D_i``; ``D_i = 0`` leaves a
  block unchanged, so the slices' blocks with zero blocks for k are exactly peft's ``(3d/r, r, r)``.
  ``mini``: peft's one ``(r, mini_r)`` shard is tiled over *all* the module's rows, so it expresses a zoo
  shard only when one zoo slice covers the module (target ``qkv``, or AST's separate projections);
  otherwise refused.
* **SHiRA** (:mod:`zoo.adapters.shira`). peft saves the mask (``shira_indices``) with the weights and
  loads it back, so any zoo mask (random or ``weight``) carries over; the values are stored times the
  zoo's ``scale`` (peft's scale is 1). peft's count per module is ``r′ (d_in + d_out)`` with one ``r′``
  for every module; the zoo's q and v masks on a fused qkv have ``2 r (d_in + d)`` entries, so the
  smallest ``r′`` that holds them is used and the rest of the module's entries are padded with zeros at
  positions outside the zoo mask (the function is the same; those entries would train if peft trains
  the adapter further).

Anything peft cannot hold (CLIP's attention: peft's MultiheadAttention layer has neither tuner, a
stacked adapter, modules with different ``r′``) is refused in one line.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from zoo.backbones.base import Backbone
from zoo.export.naming import ExportError, parts

PREFIX = "base_model.model."


def unstacked_modules(bb: Backbone, cls) -> list[tuple[str, Any]]:
    """``(path, module)`` of every ``cls`` wrapper inside ``bb.model``; one stacked with another adapter on
    the same Linear is refused (a peft module holds one tuner)."""
    from zoo.adapters.base import WrappedLayer

    out = []
    for name, m in bb.model.named_modules():
        if isinstance(m, cls):
            if isinstance(m.base, WrappedLayer) or ".base." in f".{name}.":
                raise ExportError(f"{name}: stacked adapters on one Linear have no peft equivalent; export them merged (--merged)")
            out.append((name, m))
    return out


def _span(s, n: int) -> tuple[int, int]:
    return (0, n) if s is None else (s.start, s.stop)


def _inside(w, lo: int, hi: int) -> list[tuple[str, int, int]]:
    """``(slice name, start, stop)`` of ``w``'s slices overlapping rows ``[lo, hi)``."""
    n = w.linear().out_features
    return [(k, *_span(s, n)) for k, s in w.slices.items() if max(lo, _span(s, n)[0]) < min(hi, _span(s, n)[1])]


def _module_parts(bb, path, w, ast_names):
    parts_ = parts(bb, path, w.linear().out_features, ast_names)
    if bb.family == "clip" and any(p.module.endswith(".attn") for p in parts_):
        raise ExportError(f"{path}: peft's MultiheadAttention layer (open_clip attention) has no MiSS / SHiRA; "
                          "target CLIP's MLP (fc1, fc2) or export merged (--merged)")
    return parts_


def miss_payload(bb: Backbone, ast_names: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """``(tensors, MissConfig fields, target modules)`` of the model's MiSS adapter."""
    from zoo.adapters.miss import MiSSLinear

    mods = unstacked_modules(bb, MiSSLinear)
    tensors, targets, kinds = {}, [], set()
    for path, w in mods:
        n = w.linear().out_features
        for p in _module_parts(bb, path, w, ast_names):
            lo, hi = _span(p.rows, n)
            inside = _inside(w, lo, hi)
            if not inside:
                continue
            with torch.no_grad():
                if w.variant == "balance":
                    d = w._shard_full()[:, lo:hi]
                elif w.variant == "bat":
                    r = w.rank
                    if lo % r or hi % r:
                        raise ExportError(f"{p.key}: MiSS bat blocks of {r} rows do not split at the peft module's rows {lo}:{hi}")
                    full = w.miss_block[inside[0][0]].new_zeros(n // r, r, r)
                    for k, s0, s1 in inside:
                        full[s0 // r:s1 // r] = w.miss_block[k]
                    d = full[lo // r:hi // r]
                else:  # mini: one shard tiled over the module's rows
                    (k, s0, s1), = inside if len(inside) == 1 else [(None, 0, 0)]
                    if k is None or s0 > lo or s1 < hi or (lo - s0) % w.mini_r or (hi - lo) % w.mini_r:
                        raise ExportError(f"{p.key}: peft's MiSS mini tiles one (r, mini_r) shard over all the module's rows, "
                                          "which does not hold the zoo's per-slice shards (q, v of a fused qkv); target "
                                          "'qkv', use variant balance or bat, or export merged (--merged)")
                    d = w.miss_block[k]
            tensors[f"{PREFIX}{p.key}.miss_block"] = d.detach().contiguous().clone()
            targets.append(p.module)
            kinds.add((w.rank, w.variant, w.mini_r, float(w.dropout.p) if hasattr(w.dropout, "p") else 0.0))
    if len(kinds) != 1:
        raise ExportError(f"the MiSS modules differ in (rank, variant, mini_r, dropout) {sorted(kinds)}; a peft MissConfig has one")
    r, variant, mini_r, dropout = kinds.pop()
    cfg = {"peft_type": "MISS", "r": int(r), "mini_r": int(mini_r), "miss_dropout": dropout,
           "init_weights": {"balance": True, "bat": "bat", "mini": "mini"}[variant], "bias": "none"}
    return tensors, cfg, targets


def shira_payload(bb: Backbone, ast_names: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """``(tensors, ShiraConfig fields, target modules)`` of the model's SHiRA adapter (mask saved, zero-padded
    to peft's ``r′ (d_in + d_out)`` entries per module)."""
    from zoo.adapters.shira import SHiRALinear

    mods = unstacked_modules(bb, SHiRALinear)
    found = []  # (key, module, indices (2, n) in the module's rows, values, d_in, rows)
    for path, w in mods:
        lin = w.linear()
        for p in _module_parts(bb, path, w, ast_names):
            lo, hi = _span(p.rows, lin.out_features)
            inside = _inside(w, lo, hi)
            if not inside:
                continue
            idx = torch.cat([getattr(w, f"indices_{k}").long().cpu() for k, _, _ in inside], 1)
            vals = torch.cat([w.shira_weight[k].detach().cpu() * w.scale for k, _, _ in inside])
            keep = (idx[0] >= lo) & (idx[0] < hi)  # a whole-qkv mask split over AST's query / key / value
            idx, vals = idx[:, keep] - torch.tensor([[lo], [0]]), vals[keep]
            found.append((p.key, p.module, idx, vals, lin.in_features, hi - lo))
    # one r′ for every module (ShiraConfig has no rank_pattern): the largest any module needs
    r = max(math.ceil(idx.shape[1] / (d_in + rows)) for _, _, idx, _, d_in, rows in found)
    tensors, targets = {}, []
    for key, module, idx, vals, d_in, rows in found:
        n = r * (d_in + rows)
        if n > d_in * rows:
            raise ExportError(f"{key}: peft's SHiRA needs r·(d_in+d_out) = {n} entries, more than the weight has")
        taken = torch.zeros(rows, d_in, dtype=torch.bool)
        taken[idx[0], idx[1]] = True
        pad = torch.stack(torch.where(~taken))[:, :n - idx.shape[1]]  # the first free positions, row-major
        order = torch.cat([idx, pad], 1)
        values = torch.cat([vals, vals.new_zeros(pad.shape[1])])
        perm = (order[0] * d_in + order[1]).argsort()  # row-major, as peft's torch.where(mask)
        tensors[f"{PREFIX}{key}.shira_weight"] = values[perm].contiguous()
        tensors[f"{PREFIX}{key}.shira_indices"] = order[:, perm].to(torch.int32).contiguous()
        targets.append(module)
    cfg = {"peft_type": "SHIRA", "r": int(r), "mask_type": "random", "random_seed": None, "fan_in_fan_out": False,
           "init_weights": True}
    return tensors, cfg, targets


PAYLOADS = {"miss": miss_payload, "shira": shira_payload}
