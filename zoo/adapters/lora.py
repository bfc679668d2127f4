"""LoRA: Low-Rank Adaptation (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022).

For a frozen Linear ``y = W0 x + b``:

    y = W0 x + b + γ · B A dropout(x),     A ∈ R^{r×d_in} (Kaiming-uniform), B ∈ R^{d_out×r} (zeros)

so the model is unchanged at init. ``scaling`` picks γ: ``standard`` γ = alpha/r (Hu et al.) or
``rslora`` γ = alpha/√r (Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with
LoRA", arXiv 2312.03732; the scale CLIP-LoRA's ``loralib/layers.py`` uses). Dropout acts on the
LoRA branch's input only (peft, CLIP-LoRA). On a fused ``qkv`` projection the delta can be restricted to
the q, k and/or v row blocks (litgpt's ``LoRAQKVLinear``): one wrapper holds one (A, B) pair per
slice, and ``A`` for all slices is applied in a single matmul. The delta runs on activations
(``x -> A -> B``); ``W0 + BA`` is only formed by ``merge``.

PETL-AST (Cappellazzo et al., MLSP 2024) parameterises LoRA by a reduction rate RR instead of a rank:
``reduction_rate=RR`` gives ``r = round(d_in / RR)`` and scaling ``alpha / RR``; its code also mirrors the
init (``init=mirrored``: A = 0, B Kaiming-uniform), which still starts at ΔW = 0.

:class:`LoRAConv2d` is the same delta for a convolution (used by CoLoRA): the kernel is factored
as a ``C_out × (C_in·k·k)`` matrix, ``A`` runs as a conv with r output channels, ``B`` as a 1×1 conv.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, WrappedLayer, dropout_option, float_option, int_option, rank_fits
from zoo.adapters.lowrank import fusable, lowrank_linear
from zoo.sites import CONV_SITES, LINEAR_SITES, SITE_KINDS, SiteError, unwrap


class LoRALinear(WrappedLayer):
    """A frozen Linear plus low-rank deltas on chosen output row slices (``None`` = all rows)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 slices: dict[str, slice | None] | None = None, scaling: str = "standard"):
        super().__init__(base)
        linear = self.linear()
        for k, s in (slices or {"all": None}).items():  # rank <= min(d_in, d_out) of every delta
            rank_fits(type(self).__name__, "rank", rank, linear.in_features, _rows(s, linear.out_features), k)
        self.rank, self.scaling = rank, lora_scaling(alpha, rank, scaling)
        self.slices = dict(slices or {"all": None})
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        n = len(self.slices)
        self.fused = True  # use zoo.adapters.lowrank when it applies (False: the plain composition)
        self.lora_A = nn.Parameter(torch.empty(n * rank, linear.in_features, device=linear.weight.device, dtype=linear.weight.dtype))
        self.lora_B = nn.ParameterDict({
            k: nn.Parameter(torch.zeros(_rows(s, linear.out_features), rank, device=linear.weight.device, dtype=linear.weight.dtype))
            for k, s in self.slices.items()
        })
        for i in range(n):  # peft / the paper's reference: Kaiming-uniform A per slice, zero B
            nn.init.kaiming_uniform_(self.lora_A[i * rank:(i + 1) * rank], a=math.sqrt(5))

    # The factors as applied. Subclasses may transform them (Comp-LoRA projects them onto a
    # subspace); forward, delta_weight and merge all go through these two methods.
    def effective_A(self) -> torch.Tensor:
        """All slices' A stacked, ``(n·r, d_in)``."""
        return self.lora_A

    def effective_B(self, key: str) -> torch.Tensor:
        return self.lora_B[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.fused and fusable(self.base, x):
            # the same function in one autograd op: no full-width add forward (nor backward without
            # dropout); with dropout the branch reads dropout(x) and the base x, as in the composition
            xb = None if isinstance(self.dropout, nn.Identity) else self.dropout(x)
            return lowrank_linear(x, self.base, self.effective_A(), self.stacked_B_t(), self.scaling, xb)
        out = self.base(x)
        # (..., n*r): every slice's A in one matmul; the scaling goes on these r-wide activations
        # rather than on the d_out-wide delta. Then one matmul with all slices' B^T stacked into
        # an (n*r, d_out) matrix that is zero outside each slice's rows: no in-place slice writes
        # into ``out`` (whose backward copies and zero-fills the full output gradient).
        h = (self.dropout(x) @ self.effective_A().t()) * self.scaling
        return out + h @ self.stacked_B_t()

    def stacked_B_t(self) -> torch.Tensor:
        """All slices' ``B^T`` in one contiguous ``(n*r, d_out)`` matrix (zeros off-slice).

        Contiguous on purpose: through a transposed view of B, autograd computes dB as g^T·h on
        column-major operands, which CPU BLAS runs 5-30x slower than the h^T·g used here.
        """
        if list(self.slices.values()) == [None]:  # one delta on every row
            return self.effective_B(next(iter(self.slices))).t().contiguous()
        r, lin = self.rank, self.linear()
        bt = self.lora_A.new_zeros(len(self.slices) * r, lin.out_features)
        for i, (k, s) in enumerate(self.slices.items()):
            bt[i * r:(i + 1) * r, slice(None) if s is None else s] = self.effective_B(k).t()
        return bt

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (alpha/r) · B A scattered into the full weight's rows."""
        lin = self.linear()
        dw = torch.zeros_like(lin.weight)
        r = self.rank
        a = self.effective_A()
        for i, (k, s) in enumerate(self.slices.items()):
            d = self.scaling * self.effective_B(k) @ a[i * r:(i + 1) * r]
            if s is None:
                dw += d
            else:
                dw[s] += d
        return dw

    def merge_into_base(self) -> None:
        self.linear().weight += self.delta_weight()

    def unmerge_from_base(self) -> None:
        self.linear().weight -= self.delta_weight()


class LoRAConv2d(WrappedLayer):
    """A frozen Conv2d plus a low-rank delta on its kernel reshaped as ``C_out × (C_in·kh·kw)``.

    ``A`` (r × C_in × kh × kw) runs as a convolution with r output channels and the base conv's
    stride / padding / dilation; ``B`` (C_out × r) as a 1×1 convolution on its output, so

        y = conv(x; W0) + b + (alpha / r) · B ⊛ conv(x; A),   ΔW = (alpha/r) · (B · A.flatten(1)).view_as(W0).

    Kaiming-uniform ``A`` (as nn.Conv2d initialises its kernel) and zero ``B``: unchanged at init.

    Grouped (e.g. depthwise) convolutions: the kernel ``(C_out, C_in/g, kh, kw)`` is factored as a
    ``C_out × (C_in/g·kh·kw)`` matrix (for a depthwise 3×3: ``C × 9``, so r ≤ 9 is meaningful) and the
    delta runs as ``conv(x; ΔW, groups=g)``. This materialises ΔW, which for a grouped conv is
    cheaper than the activation path (that would need g·r intermediate maps; ΔW has only C_out·C_in/g·k²
    entries). A reconstruction (LoRA papers do not treat grouped convs); ``grouped=False`` refuses them.
    """

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0, grouped: bool = True):
        super().__init__(base)
        conv = unwrap(base)
        if not isinstance(conv, nn.Conv2d):
            raise SiteError(f"LoRAConv2d needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1 and not grouped:
            raise SiteError(f"LoRAConv2d: a Conv2d with groups={conv.groups} (grouped/depthwise) is refused here")
        w = conv.weight
        rank_fits(type(self).__name__, "rank", rank, w[0].numel(), w.shape[0], "conv")
        self.rank, self.scaling = rank, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(rank, *w.shape[1:], device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def conv(self) -> nn.Conv2d:
        return unwrap(self.base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        conv = self.conv()
        if conv.groups != 1:  # see the class docstring: a small kernel, cheaper than g·r maps
            return out + conv._conv_forward(self.dropout(x), self.delta_weight(), None)
        # the base conv's own _conv_forward applies its padding mode, stride and dilation to A
        h = conv._conv_forward(self.dropout(x), self.lora_A, None)
        return out + F.conv2d(h, self.lora_B[:, :, None, None]) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.scaling * self.lora_B @ self.lora_A.flatten(1)).view(self.conv().weight.shape)

    def merge_into_base(self) -> None:
        self.conv().weight += self.delta_weight()

    def unmerge_from_base(self) -> None:
        self.conv().weight -= self.delta_weight()


SCALINGS = ("standard", "rslora")


def lora_scaling(alpha: float, rank: int, scaling: str = "standard") -> float:
    """γ = alpha / r (``standard``) or alpha / √r (``rslora``)."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling={scaling!r}; valid: {', '.join(SCALINGS)} (alpha/r or alpha/sqrt(r))")
    return alpha / rank if scaling == "standard" else alpha / math.sqrt(rank)


def _rows(s: slice | None, n: int) -> int:
    return n if s is None else len(range(*s.indices(n)))


def group_by_module(sites):
    """Sites on the same Linear (q and v of one fused qkv) -> one entry with several slices."""
    groups: dict[tuple[int, str], list] = defaultdict(list)
    for s in sites:
        groups[(id(s.parent), s.attr)].append(s)
    return list(groups.values())


@register_adapter("lora")
class LoRA(Adapter):
    """LoRA on any Linear site (default q and v of every block, as in the paper).

    On a convolutional backbone (NAFNet) the sites are Conv2d layers and get :class:`LoRAConv2d`,
    e.g. ``targets=[conv_pw, o, fc1, fc2]`` (the 1×1 convs) or with ``conv_dw`` (depthwise 3×3).
    """

    mergeable = True
    supports_slices = True
    paper = "Hu et al., LoRA, ICLR 2022"

    INITS = ("lora", "mirrored")

    def __init__(self, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 targets: list[str] = ("q", "v"), layers="all", scaling: str = "standard",
                 reduction_rate: float | None = None, init: str = "lora"):
        super().__init__()
        self.rank = int_option("lora", "rank", rank)
        self.alpha = float_option("lora", "alpha", alpha, lo=0.0, lo_open=True)  # a negative alpha flips ΔW's sign
        self.dropout = dropout_option("lora", dropout)
        lora_scaling(1.0, 1, scaling)  # validates the name
        self.scaling = scaling
        if reduction_rate is not None:  # PETL-AST: rank = round(d_in / RR)
            float_option("lora", "reduction_rate", reduction_rate, lo=0.0, lo_open=True)
        if init not in self.INITS:
            raise ValueError(f"unknown LoRA init {init!r}; valid: {', '.join(self.INITS)} (mirrored: A=0, B Kaiming, PETL-AST)")
        self.targets, self.layers = list(targets), layers
        self.reduction_rate, self.init = (None if reduction_rate is None else float(reduction_rate)), init

    def attach(self, backbone) -> None:
        sites = self.sites(self.targets, self.layers)
        valid = LINEAR_SITES + CONV_SITES
        bad = [t for t in self.targets if t in SITE_KINDS and t not in valid]  # backbone kinds: checked per layer
        if bad:
            raise SiteError(f"LoRA attaches to Linear and convolution sites {valid}, not {bad}")
        for group in group_by_module(sites):
            base = unwrap(group[0].module)
            if isinstance(base, nn.Conv2d):  # a CNN's site (NAFNet): conv LoRA on the whole kernel
                self.replace(group[0], LoRAConv2d(group[0].module, self.rank, self.alpha, self.dropout))
                continue
            if not isinstance(base, nn.Linear):
                raise SiteError(f"LoRA adapts Linear and Conv2d layers; {group[0].path} is a {type(base).__name__}")
            slices = {s.kind: s.out_slice for s in group}
            rank = self.rank
            if self.reduction_rate is not None:  # PETL-AST: r = round(d_in / RR), scaling alpha / RR
                rank = max(1, round(unwrap(group[0].module).in_features / self.reduction_rate))
            w = self.replace(group[0], LoRALinear(group[0].module, rank, self.alpha, self.dropout, slices, self.scaling))
            if self.reduction_rate is not None:
                w.scaling = self.alpha / self.reduction_rate
            if self.init == "mirrored":
                with torch.no_grad():
                    w.lora_A.zero_()
                    for b in w.lora_B.values():
                        nn.init.kaiming_uniform_(b, a=math.sqrt(5))

