"""LoLDU: Low-rank adaptation via Lower-Diag-Upper decomposition.

Shi, Zhang, Zhang et al., "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for
Parameter-Efficient Fine-Tuning", arXiv 2410.13618; reference: github.com/SKDDJ/LoLDU
(``minloldu/loldu.py``: ``ldu_decomposition``, ``LoLDUParametrization``). Not in peft.

For a frozen Linear ``y = W0 x + b`` (``W0 ∈ R^{d_out×d_in}``, ``k = min(d_out, d_in)``)::

    P, L, U' = lu(W0)                 (partial pivoting; P ∈ R^{d_out×d_out}, L ∈ R^{d_out×k}, U' ∈ R^{k×d_in})
    D = diag(U'),  U = U' / D         (U row-normalised to a unit diagonal: W0 = P L diag(D) U)
    L_r = L[:, :r],  U_r = U[:r],  z0 = D[:r]
    W   = W_res + σ P L_r diag(z) U_r,     W_res = W0 − σ P L_r diag(z0) U_r,     σ = alpha / r

and only ``z ∈ R^r`` trains (``r`` numbers per layer). We keep ``W0`` as it is and apply the same
weight as ``W0 + σ (P L_r) diag(z − z0) U_r`` (identical algebra; the base layer stays untouched, and
with ``init=lu`` the model is exactly the pretrained one at step 0). ``P`` is folded into ``L_r``
(``P L_r`` is ``d_out×r``): no dense ``d_out×d_out`` permutation is stored, as the spec advises. The
frozen factors are recomputed from ``W0`` at attach (LU in float64 on the CPU, so every machine gets
the same factors; they are non-persistent buffers) and the artifact holds only ``z``: ``r`` numbers
per adapted projection.

The layer runs the low-rank path ``base(x) + σ ((x U_rᵀ) ⊙ (z − z0)) (P L_r)ᵀ`` when it is cheaper, and
otherwise (full rank, many tokens: LoLDU's default) one GEMM with the materialised ``W0 + ΔW``, as the
reference's ``torch.nn.utils.parametrize`` does. Mergeable (merge adds ΔW, unmerge subtracts it).

Options from the reference: ``rank`` (its default config: full rank, ``rank=768`` on a 768-wide
model; here ``null`` = ``min(d_out, d_in)``), ``alpha`` (``from_linear``'s ``lora_alpha=1``, so
σ = 1/r), ``init`` of ``z``: ``lu`` (= z0, default), ``uniform`` (U(±mean(z0)/2)), ``normal``
(N(mean(z0), std(z0))), ``constant`` (mean(z0)), ``ones``, ``zeros``, ``s_uniform`` (U(−1, 1)),
``s_normal`` (N(0, 1)) — all but ``lu`` change the model at init, as in the reference.
``train_scale=true`` also trains σ: the reference registers it as a Parameter but its released
helper trains ``z`` only (that path is commented out there), so it is off by default. The pivot
order is not an importance ranking: for ``r < k`` the "top-r" rows are the first r pivots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, WrappedLayer, float_option, int_option
from zoo.adapters.linear_sites import linear_site_groups
from zoo.adapters.lora import _rows

INITS = ("lu", "uniform", "normal", "constant", "ones", "zeros", "s_uniform", "s_normal")


def ldu(weight: torch.Tensor, rank: int):
    """``(P L_r, z0, U_r)`` of ``weight`` (float64 on the CPU): ``weight = P L diag(D) U``."""
    w = weight.detach().to("cpu", torch.float64)
    p, lower, upper = torch.linalg.lu(w)
    d = torch.diagonal(upper)
    if (d[:rank] == 0).any():
        raise ValueError("LoLDU: the LU factorisation of this weight has a zero pivot among the first "
                         f"{rank} (a singular leading block); choose a smaller rank")
    upper = upper / d.unsqueeze(-1)
    return p @ lower[:, :rank], d[:rank].clone(), upper[:rank]


def init_z(z0: torch.Tensor, init: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """The reference's ``init_method`` for ``vector_z`` (float64, from ``z0``)."""
    z = z0.clone()
    mean = float(z0.mean())
    if init == "uniform":
        a = abs(mean) / 2
        z.uniform_(-a, a, generator=generator)
    elif init == "normal":
        z.normal_(mean, float(z0.std()) if z0.numel() > 1 else 0.0, generator=generator)
    elif init == "constant":
        z.fill_(mean)
    elif init == "ones":
        z.fill_(1.0)
    elif init == "zeros":
        z.zero_()
    elif init == "s_uniform":
        z.uniform_(-1, 1, generator=generator)
    elif init == "s_normal":
        z.normal_(0, 1, generator=generator)
    return z


class LoLDULinear(WrappedLayer):
    """A frozen Linear plus ``σ P L_r diag(z − z0) U_r`` on chosen output row slices (``None`` = all)."""

    def __init__(self, base: nn.Module, rank: int | None = None, alpha: float = 1.0, init: str = "lu",
                 slices: dict[str, slice | None] | None = None, train_scale: bool = False, where: str = ""):
        super().__init__(base)
        lin = self.linear()
        w = lin.weight
        self.slices = dict(slices or {"all": None})
        self.vector_z = nn.ParameterDict()
        self.ranks: dict[str, int] = {}
        self.dense: bool | None = None  # None: pick the cheaper path per call; True/False force one
        for k, s in self.slices.items():
            rows = _rows(s, lin.out_features)
            full = min(rows, lin.in_features)
            r = full if rank is None else rank
            if r > full:
                raise ValueError(f"LoLDU: rank={r} exceeds min(d_out, d_in) = min({rows}, {lin.in_features}) = {full}"
                                 f"{' at ' + where if where else ''}")
            pl, z0, u = ldu(w if s is None else w[s], r)
            self.ranks[k] = r
            self.register_buffer(f"pl_{k}", pl.to(w.device, w.dtype), persistent=False)
            self.register_buffer(f"u_{k}", u.to(w.device, w.dtype), persistent=False)
            self.register_buffer(f"z0_{k}", z0.to(w.device, w.dtype), persistent=False)
            self.vector_z[k] = nn.Parameter(init_z(z0, init).to(w.device, w.dtype))
        # σ = alpha / r per adapted projection (a slice of a fused qkv is its own projection)
        scales = {k: torch.tensor(float(alpha) / r, device=w.device, dtype=w.dtype) for k, r in self.ranks.items()}
        if train_scale:
            self.scaling = nn.ParameterDict({k: nn.Parameter(v) for k, v in scales.items()})
            for k, v in scales.items():  # σ0: the residual W0 − σ0 P L_r diag(z0) U_r keeps the initial scale
                self.register_buffer(f"scale0_{k}", v.clone(), persistent=False)
        else:
            for k, v in scales.items():
                self.register_buffer(f"scale_{k}", v, persistent=False)
        self.train_scale = bool(train_scale)

    def _factors(self, k: str):
        """``(P L_r, U_r, σ z − σ0 z0)`` of slice ``k``: the reference's ``W_res + σ P L_r diag(z) U_r`` with
        ``W_res = W0 − σ0 P L_r diag(z0) U_r`` computed once at the initial scale σ0 (= σ while σ is frozen)."""
        z, z0 = self.vector_z[k], getattr(self, f"z0_{k}")
        if self.train_scale:
            return getattr(self, f"pl_{k}"), getattr(self, f"u_{k}"), self.scaling[k] * z - getattr(self, f"scale0_{k}") * z0
        return getattr(self, f"pl_{k}"), getattr(self, f"u_{k}"), getattr(self, f"scale_{k}") * (z - z0)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (P L_r) diag(σ z − σ0 z0) U_r (σ0 = σ unless ``train_scale``), scattered into the slices' rows."""
        lin = self.linear()
        dw = torch.zeros_like(lin.weight)
        for k, s in self.slices.items():
            pl, u, dz = self._factors(k)
            d = (pl * dz) @ u
            dw = dw + d if s is None else dw.index_put((torch.arange(dw.shape[0], device=dw.device)[s],), d, accumulate=True)
        return dw

    def _use_dense(self, x: torch.Tensor) -> bool:
        if type(self.base) is not nn.Linear:  # over another wrapper: always base(x) + delta
            return False
        if self.dense is not None:
            return self.dense
        lin = self.linear()
        tokens = x.numel() // lin.in_features
        r = sum(self.ranks.values())
        # materialising ΔW costs d_out·r·d_in once; the low-rank path T·r·(d_in + d_out)
        return lin.out_features * lin.in_features < tokens * (lin.in_features + lin.out_features) and r > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self._use_dense(x):
            return F.linear(x, self.base.weight + self.delta_weight(), self.base.bias)
        out = self.base(x)
        if list(self.slices.values()) == [None]:
            pl, u, dz = self._factors(next(iter(self.slices)))  # 'all', or the kind of a separate q/v Linear
            return out + ((x @ u.t()) * dz) @ pl.t()
        # every slice's U_r in one matmul, then one matmul with the stacked (P L_r)ᵀ, zero off-slice
        lin = self.linear()
        factors = [self._factors(k) for k in self.slices]
        h = torch.cat([(x @ u.t()) * dz for _, u, dz in factors], -1)
        plt = x.new_zeros(h.shape[-1], lin.out_features)
        i = 0
        for (pl, _, _), s in zip(factors, self.slices.values()):
            plt[i:i + pl.shape[1], slice(None) if s is None else s] = pl.t()
            i += pl.shape[1]
        return out + h @ plt

    def merge_into_base(self) -> None:
        self.linear().weight += self.delta_weight()

    def unmerge_from_base(self) -> None:
        self.linear().weight -= self.delta_weight()


@register_adapter("loldu")
class LoLDU(Adapter):
    """LoLDU on Linear sites: train the diagonal of W0's LDU factorisation (default q and v, full rank)."""

    mergeable = True
    supports_slices = True
    paper = "Shi et al., LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition, arXiv 2410.13618"

    def __init__(self, rank: int | None = None, alpha: float = 1.0, init: str = "lu", train_scale: bool = False,
                 targets: list[str] = ("q", "v"), layers="all"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown LoLDU init {init!r}; valid: {', '.join(INITS)}")
        self.rank = None if rank is None else int_option("loldu", "rank", rank)
        self.alpha = float_option("loldu", "alpha", alpha)
        self.init, self.train_scale = init, bool(train_scale)
        self.targets, self.layers = list(targets), layers

    def attach(self, backbone) -> None:
        for site, slices in linear_site_groups(self, "LoLDU"):
            self.replace(site, LoLDULinear(site.module, self.rank, self.alpha, self.init, slices, self.train_scale,
                                           site.path))
