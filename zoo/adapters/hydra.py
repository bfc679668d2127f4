"""Hydra: multi-head low-rank adaptation (Kim, Yang, Kim, Hong, Park, "Hydra: Multi-head Low-rank
Adaptation for Parameter Efficient Fine-tuning", arXiv 2309.06922; code: github.com/extremebird/Hydra).

A frozen Linear ``y0 = W0 x + b0`` gets two low-rank branches, one *parallel* (reads the layer's
input, like LoRA) and one *sequential* (reads the layer's output, a linear combination of the
pre-trained features)::

    P(x)  = B_p (A_p x + d_p) + u_p          A_p ∈ R^{r_p×d_in},  B_p ∈ R^{d_out×r_p}
    S(y0) = B_s (A_s y0 + d_s) + u_s         A_s ∈ R^{r_s×d_out}, B_s ∈ R^{d_out×r_s}
    y     = y0 + s·P(x) + s·S(y0)

(in the reference each branch is ``up(dropout(down(·)))·s`` with biased ``down``/``up``; no
non-linearity, so the layer is a reparameterisation of the weights). Merged form::

    W = W0 + s·(B_p A_p + B_s A_s W0)
    b = b0 + s·(B_s A_s b0 + B_p d_p + u_p + B_s d_s + u_s)

``merge`` implements these formulas. The reference's ``set_hydraWeight`` folds the attention
projection with ``mlp.fc2``'s weights (a bug: the shapes do not even match); we do not copy it.
``unmerge`` restores a copy of (W0, b0) kept at merge time, so it is exact (no inversion of
``I + s·B_s A_s``).

Defaults follow the VTAB code (``method=hydra_both``): branches on the attention output
projection (site ``o``) and the MLP's second Linear (``fc2``) of every block, rank 2 per branch,
``down`` Xavier-uniform, ``up`` zero, all biases zero, so the model is unchanged at init. The
scale ``s`` is a fixed float shared by both branches (1.0 in the module's signature; the VTAB
per-dataset values live in ``conf/experiment/hydra_vtab/``). Other settings of the paper:
``init=normal`` (N(0, 0.02) down, the CLIP/ELEVATER code), ``init=kaiming`` with ``bias=false``
and ``par_rank=4, seq_rank=8`` (the RoBERTa NLU code). Nothing here is a reconstruction.

Training runs the layer as one fused autograd op (``zoo.adapters.lowrank.hydra_linear``: the same
function and dropout masks, fewer full-width passes, ``y0`` not saved) when the base is a plain frozen
``nn.Linear``; ``fused=False`` on a :class:`HydraLinear` forces the composition above.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import inner_layer, Adapter, WrappedLayer, dropout_option, int_option
from zoo.adapters.lowrank import fusable, hydra_linear
from zoo.sites import LINEAR_SITES, SiteError

INITS = ("xavier", "normal", "kaiming")


class LowRankBranch(nn.Module):
    """``up(dropout(down(z)))`` (the scale is applied by the owner)."""

    def __init__(self, d_in: int, d_out: int, rank: int, dropout: float, bias: bool, init: str,
                 device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(rank, d_out, bias=bias, device=device, dtype=dtype)
        if init == "xavier":  # VTAB reference
            nn.init.xavier_uniform_(self.down.weight)
        elif init == "normal":  # CLIP / ELEVATER reference
            nn.init.normal_(self.down.weight, std=0.02)
        else:  # 'kaiming': NLU reference / AdaptFormer-style
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)  # zero up-projection: the branch outputs zero at init
        for lin in (self.down, self.up):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.down(z)))

    def weight(self) -> torch.Tensor:
        """``B A`` (d_out × d_in)."""
        return self.up.weight @ self.down.weight

    def bias_term(self) -> torch.Tensor | None:
        """``B d + u``: the branch's output for a zero input (None without biases)."""
        if self.down.bias is None:
            return None
        return self.up.weight @ self.down.bias + self.up.bias


class HydraLinear(WrappedLayer):
    """``y = y0 + s·par(x) + s·seq(y0)`` with ``y0 = base(x)``; mergeable into the base Linear."""

    def __init__(self, base: nn.Module, par_rank: int = 2, seq_rank: int = 2, scale: float = 1.0,
                 dropout: float = 0.0, bias: bool = True, init: str = "xavier"):
        super().__init__(base)
        lin = _inner_linear(base)
        kw = dict(device=lin.weight.device, dtype=lin.weight.dtype)
        self.scale = float(scale)
        self.par = LowRankBranch(lin.in_features, lin.out_features, par_rank, dropout, bias, init, **kw)
        self.seq = LowRankBranch(lin.out_features, lin.out_features, seq_rank, dropout, bias, init, **kw)
        self.fused = True  # zoo.adapters.lowrank.hydra_linear when it applies (False: the composition)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged and self.fused and self._fusable(x):
            return hydra_linear(x, self.base, self.par, self.seq, self.scale, self._masks(x))
        y0 = self.base(x)
        if self.merged:
            return y0
        return y0 + self.scale * (self.par(x) + self.seq(y0))

    def _fusable(self, x: torch.Tensor) -> bool:
        """A plain frozen Linear (the fused op does not form its weight gradient), no hooks on the
        branches' Linears (they would be skipped)."""
        lin = self.base
        return (fusable(lin, x) and not lin.weight.requires_grad and (lin.bias is None or not lin.bias.requires_grad)
                and all(type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
                        for m in (self.par.down, self.par.up, self.seq.down, self.seq.up)))

    def _masks(self, x: torch.Tensor):
        """The branches' dropout masks (scaled by 1/(1-p)), drawn par then seq on the ``(..., r)``
        shapes the composition drops, so a fixed RNG gives the same masks on both paths."""
        drop = self.par.dropout
        if not isinstance(drop, nn.Dropout) or not drop.training or drop.p == 0:
            return None
        lead = x.shape[:-1]
        ones = x.new_ones(*lead, self.par.down.out_features), x.new_ones(*lead, self.seq.down.out_features)
        return tuple(torch.nn.functional.dropout(o, drop.p, True) for o in ones)

    def merged_weight_and_bias(self, w0: torch.Tensor, b0: torch.Tensor | None):
        """The merge formulas of the module docstring, in float32 or wider."""
        s, dt = self.scale, w0.dtype
        wp, ws = self.par.weight().to(dt), self.seq.weight().to(dt)
        w = w0 + s * (wp + ws @ w0)
        b = torch.zeros(w0.shape[0], dtype=w0.dtype, device=w0.device) if b0 is None else b0.clone()
        if b0 is not None:
            b = b + s * (ws @ b0)
        for t in (self.par.bias_term(), self.seq.bias_term()):
            if t is not None:
                b = b + s * t.to(dt)
        has_bias = b0 is not None or self.par.bias_term() is not None
        return w, (b if has_bias else None)

    def merge_into_base(self) -> None:
        lin = _linear_for_merge(self)
        w0, b0 = lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()
        self._orig = (w0, b0)  # exact unmerge: restore, do not invert I + s·B_s A_s
        calc = torch.promote_types(w0.dtype, torch.float32)
        w, b = self.merged_weight_and_bias(w0.to(calc), None if b0 is None else b0.to(calc))
        lin.weight.copy_(w.to(w0.dtype))
        if b is not None:
            if lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros_like(w0[:, 0]), requires_grad=False)
            lin.bias.copy_(b.to(lin.bias.dtype))

    def unmerge_from_base(self) -> None:
        lin = _inner_linear(self.base)
        w0, b0 = self._orig
        lin.weight.copy_(w0)
        if b0 is None:
            lin.bias = None
        else:
            lin.bias.copy_(b0)
        del self._orig




def _linear_for_merge(wrapper: WrappedLayer) -> nn.Linear:
    """The Linear under ``wrapper``; every adapter in between must already be merged.

    Hydra's sequential branch reads the output of what it wraps, so folding it into the Linear
    is only correct when the wrappers below compute exactly that Linear (i.e. are merged).
    """
    m = wrapper.base
    while isinstance(m, WrappedLayer):
        if not m.merged:
            raise RuntimeError(
                f"cannot merge Hydra over an unmerged {type(m).__name__}: merge the adapters applied "
                "before it first (zoo.merge_adapters merges all of them in order)"
            )
        m = m.base
    return _inner_linear(m)


@register_adapter("hydra")
class Hydra(Adapter):
    """Hydra on Linear sites (default: ``o`` and ``fc2`` of every block, as the VTAB code)."""

    mergeable = True
    paper = "Kim et al., Hydra: Multi-head Low-rank Adaptation, arXiv 2309.06922"

    def __init__(self, par_rank: int = 2, seq_rank: int = 2, scale: float = 1.0, dropout: float = 0.0,
                 bias: bool = True, init: str = "xavier", targets: list[str] = ("o", "fc2"), layers="all"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown Hydra init {init!r}; valid options: {', '.join(INITS)}")
        self.par_rank, self.seq_rank = int_option("hydra", "par_rank", par_rank), int_option("hydra", "seq_rank", seq_rank)
        dropout_option("hydra", dropout)
        self.scale, self.dropout, self.bias, self.init = float(scale), float(dropout), bool(bias), init
        self.targets, self.layers = list(targets), layers

    def attach(self, backbone) -> None:
        bad = [t for t in self.targets if t not in LINEAR_SITES or t in ("q", "k", "v")]
        if bad:
            raise SiteError(f"Hydra attaches to whole Linear sites (qkv, o, fc1, fc2), not {bad}")
        for site in self.sites(self.targets, self.layers):
            self.replace(site, HydraLinear(site.module, self.par_rank, self.seq_rank, self.scale,
                                           self.dropout, self.bias, self.init))


def _inner_linear(module: nn.Module) -> nn.Linear:
    return inner_layer(module, nn.Linear, "Hydra")
