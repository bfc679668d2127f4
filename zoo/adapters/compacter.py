"""Compacter and Compacter++: low-rank hypercomplex adapters.

Karimi Mahabadi, Henderson, Ruder, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers",
NeurIPS 2021 (arXiv 2106.04647); reference: github.com/rabeehk/compacter
(``seq2seq/hypercomplex/layers.py::PHMLinear``, ``seq2seq/adapters/adapter_modeling.py::HyperComplexAdapter``,
``seq2seq/configs/compacter{,++}.json``). Not in peft.

A Houlsby bottleneck ``h ← h + U(GELU(D(h)))`` whose down- and up-projections are PHM layers
(parameterised hypercomplex multiplication)::

    PHM(x) = x H + b,     H = Σ_{i=1..n} C_i ⊗ W_i ∈ R^{d_in×d_out},     W_i = s_i t_iᵀ ∈ R^{(d_in/n)×(d_out/n)}

``C_i ∈ R^{n×n}`` are the "slow" rule matrices, **shared by every PHM layer of the model**
(``shared_phm_rule``), ``s_i ∈ R^{d_in/n × k}``, ``t_i ∈ R^{k × d_out/n}`` the "fast" per-layer rank-``k``
factors (``factorized_phm``, ``phm_rank`` k = 1). Per adapter of width ``d`` and bottleneck ``m`` that is
``2k(d + m) + m + d`` parameters, plus ``n³`` shared once.

Reference defaults (``compacter.json``): ``n`` (``hypercomplex_division``) = 4, reduction factor 32
(``m = d // 32``: 24 on ViT-B), ``gelu_new`` (tanh GELU), ``s_i``/``t_i`` Glorot-uniform (gain √2, per i:
the config's ``hypercomplex_nonlinearity: glorot-uniform``), biases zero, and the LayerNorms train
(``unfreeze_layer_norms: true``: here ``train_norms``, the blocks' ``norm1``/``norm2``). Both factors are
random, so the adapter's output is **not** zero at init (the model changes slightly at step 0; the paper's
init, kept). ``variant``: ``compacter`` puts an adapter after the attention and after the MLP of every
block; ``compacter++`` after the MLP only (``add_adapter_in_self_attention: false``).

Reconstructions, exposed as options: the shared rule's init, ``rule_init_std`` (N(0, 0.01) as the spec
reads the config; the per-layer rule of the code draws N(0, 0.02)); and the bottleneck on widths the
reference cannot take: ``m`` must be a multiple of ``n`` for a PHM layer, so ``d // 32`` is rounded up to
one (exact on ViT-B/L, CLIP, AST; tiny test models only). Not mergeable: the bottleneck is non-linear.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.adapter import BottleneckAdapter
from zoo.adapters.base import AdapterModule, float_option, int_option

VARIANTS = {"compacter": "houlsby", "compacter++": "pfeiffer"}


class PHMRule(AdapterModule):
    """The ``n`` rule matrices ``C ∈ R^{n×n×n}`` shared by every PHM layer of one adapter."""

    def __init__(self, n: int, std: float = 0.01):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n, n) * std)


def phm_weight(rule: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``H = Σ_i C_i ⊗ (s_i t_i)`` (``d_in × d_out``); ``left``: (n, d_in/n, k), ``right``: (n, k, d_out/n)."""
    w = torch.bmm(left, right)  # (n, d_in/n, d_out/n)
    n, a, b = w.shape
    # kron(C_i, W_i)[p·a + q, r·b + s] = C_i[p, r] · W_i[q, s], summed over i
    return torch.einsum("ipr,iqs->pqrs", rule, w).reshape(n * a, n * b)


class PHMLinear(AdapterModule):
    """``y = x H + b`` with ``H`` from :func:`phm_weight`; the rule is read from a shared :class:`PHMRule`."""

    def __init__(self, d_in: int, d_out: int, n: int, rule: PHMRule, rank: int = 1):
        super().__init__()
        if d_in % n or d_out % n:
            raise ValueError(f"Compacter: a PHM layer needs n={n} to divide its widths, got {d_in} -> {d_out}")
        self.__dict__["rule"] = rule  # shared: a reference, registered once (in the first adapter)
        self.left = nn.Parameter(torch.empty(n, d_in // n, rank))
        self.right = nn.Parameter(torch.empty(n, rank, d_out // n))
        self.bias = nn.Parameter(torch.zeros(d_out))
        for i in range(n):  # the reference's glorot_uniform: Xavier-uniform with gain sqrt(2), per i
            nn.init.xavier_uniform_(self.left.data[i], gain=math.sqrt(2))
            nn.init.xavier_uniform_(self.right.data[i], gain=math.sqrt(2))

    def weight(self) -> torch.Tensor:
        return phm_weight(self.rule.weight, self.left, self.right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight().to(x.dtype) + self.bias


class PHMBottleneck(AdapterModule):
    """``x -> PHM down -> gelu_new -> PHM up`` (added to ``x`` by the sequential wrapper)."""

    def __init__(self, dim: int, inner: int, n: int, rule: PHMRule, rank: int = 1, own_rule: bool = False):
        super().__init__()
        if own_rule:
            self.rule = rule  # the first adapter holds the shared rule in the module tree
        self.down = PHMLinear(dim, inner, n, rule, rank)
        self.act = nn.GELU(approximate="tanh")
        self.up = PHMLinear(inner, dim, n, rule, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


@register_adapter("compacter")
class Compacter(BottleneckAdapter):
    """Compacter / Compacter++: Houlsby / Pfeiffer bottleneck adapters with shared-rule PHM projections."""

    paper = "Karimi Mahabadi et al., Compacter: Efficient Low-Rank Hypercomplex Adapter Layers, NeurIPS 2021"

    def __init__(self, variant: str = "compacter", n: int = 4, reduction_factor: int = 32, phm_rank: int = 1,
                 rule_init_std: float = 0.01, train_norms: bool = True, layers="all"):
        if variant not in VARIANTS:
            raise ValueError(f"unknown Compacter variant {variant!r}; valid: {', '.join(VARIANTS)}")
        super().__init__(style=VARIANTS[variant], layers=layers, train_norms=train_norms)
        self.variant = variant
        self.n = int_option("compacter", "n", n)
        self.reduction_factor = int_option("compacter", "reduction_factor", reduction_factor)
        self.phm_rank = int_option("compacter", "phm_rank", phm_rank)
        self.rule_init_std = float_option("compacter", "rule_init_std", rule_init_std, 0.0)
        self._rule: PHMRule | None = None

    def inner_dim(self, dim: int) -> int:
        """``dim // reduction_factor`` rounded up to a multiple of ``n`` (a PHM layer's widths divide by n)."""
        m = dim // self.reduction_factor
        return max(self.n, -(-m // self.n) * self.n)

    def make_module(self, dim: int) -> nn.Module:
        if dim % self.n:
            from zoo.sites import SiteError

            raise SiteError(f"Compacter: the block width {dim} is not divisible by n={self.n} (PHM layers split "
                            "their widths into n parts); choose n dividing it")
        own = self._rule is None
        if own:
            self._rule = PHMRule(self.n, self.rule_init_std)
        return PHMBottleneck(dim, self.inner_dim(dim), self.n, self._rule, self.phm_rank, own_rule=own)

    def attach(self, backbone) -> None:
        self._rule = None  # one shared rule per attach
        super().attach(backbone)

    def phm_rule(self) -> torch.Tensor:
        """The shared rule matrices ``C`` (``n × n × n``)."""
        return self._rule.weight
