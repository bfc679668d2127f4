"""Comp-LoRA: LoRA in the complement of the pretrained weight's principal subspace.

Wang, Dai, Li, Li, Guo, Xiang, "Complementary Subspace Low-Rank Adaptation of Vision-Language
Models for Few-Shot Classification", arXiv 2501.15040 (2025). No public code was found; the
paper body was not available. What the abstract states: LoRA "interferes with the most
informative direction of the pretrained weight matrix", so the low-rank matrix is optimised "in
the complementary subspace", with no extra parameters. **Everything below the abstract is a
reconstruction** (see the team spec ``methods/comp_lora.md`` (internal, not shipped) §3.2) and its uncertain choices are
options.

For each adapted weight ``W0 = U Σ Vᵀ`` (each of q, k, v separately when they are slices of a
fused projection) keep the top-k singular vectors ``U_k`` (d_out×k) and ``V_k`` (d_in×k) and
project the LoRA update away from them::

    P_L = I − U_k U_kᵀ,   P_R = I − V_k V_kᵀ
    two_sided (default):  ΔW = (α/r) · P_L B A P_R      ⇒  U_kᵀ ΔW = 0  and  ΔW V_k = 0
    left:                 ΔW = (α/r) · P_L B A          ⇒  U_kᵀ ΔW = 0
    right:                ΔW = (α/r) · B A P_R          ⇒  ΔW V_k = 0
    penalty:              ΔW = (α/r) · B A,  loss += λ ‖(α/r) U_kᵀ B A V_k‖²_F           (penalty=core)
                                             or λ (‖(α/r) U_kᵀ B A‖²_F + ‖(α/r) B A V_k‖²_F) (penalty=sides)

In ``two_sided`` mode ``W0 + ΔW`` is block-diagonal in the bases (U_k, U_⊥) × (V_k, V_⊥), so the
top-k singular triplets of ``W0`` stay singular triplets of the adapted weight (not only to
first order, ``δσ_i = u_iᵀ ΔW v_i = 0``).

Factored form, no d×d projector is ever built: the applied factors are

    Â = A − (A V_k) V_kᵀ   (r×d_in),      B̂ = B − U_k (U_kᵀ B)   (d_out×r),

costing O(r·k·d) per step, independent of the number of tokens, and the forward is LoRA's
``x → Â → B̂`` on activations. Gradients reach only the complement components of A and B. This is
the spec's parametrisation ``B = U_⊥ B̃, A = Ã V_⊥ᵀ`` with the same trainable count as LoRA.

``k`` is the number of protected directions (an int) or, as a float in (0, 1), the smallest k
whose singular values hold that fraction of ``‖W0‖²_F`` (chosen per matrix). ``U_k``/``V_k`` are
non-persistent buffers recomputed by SVD (in float64) from the base weights at attach, so the
artifact holds only A and B; the projectors ``U_k U_kᵀ`` are unique whenever σ_k > σ_{k+1}, so
they do not depend on the SVD's sign conventions.

Defaults follow the likely baseline, CLIP-LoRA (Zanella & Ben Ayed, 2024): q, k, v of every
block, r=2, α=1, dropout 0.25 (CLIP-LoRA adapts both encoders: ``tower=both`` on ``backbone=clip``). ``k=8`` is a guess (the spec suggests a sweep over {8, 16, 32, 64}).
"""
from __future__ import annotations

import torch
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, StepContext, dropout_option, float_option, int_option
from zoo.adapters.lora import LoRALinear, group_by_module, lora_scaling
from zoo.sites import LINEAR_SITES, SiteError

MODES = ("two_sided", "left", "right", "penalty")
PENALTIES = ("core", "sides")


def protected_rank(k: int | float, singular_values: torch.Tensor) -> int:
    """``k`` directions (int) or the smallest k holding an energy fraction ``k`` ∈ (0, 1) of Σσ²."""
    n = singular_values.numel()  # = min(d_out, d_in)
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"k={k!r}: expected an int >= 0 (protected directions) or a float in (0, 1) (energy fraction)")
    if isinstance(k, int):
        if not 0 <= k < n:
            raise ValueError(f"k={k} protected directions: must be in 0..{n - 1} for a weight of rank <= {n} "
                             "(at least one complementary direction must remain)")
        return k
    if not 0.0 < k < 1.0:
        raise ValueError(f"k={k}: a float k is an energy fraction and must lie in (0, 1); use an int for a count")
    energy = torch.cumsum(singular_values.double() ** 2, 0)
    kk = int(torch.searchsorted(energy / energy[-1], torch.tensor(k, dtype=energy.dtype)).item()) + 1
    return min(kk, n - 1)  # keep a complement even for (numerically) low-rank weights


class CompLoRALinear(LoRALinear):
    """:class:`LoRALinear` whose factors are projected off each slice's top-k singular subspace."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 slices: dict[str, slice | None] | None = None, k: int | float = 8, mode: str = "two_sided",
                 scaling: str = "standard"):
        super().__init__(base, rank, alpha, dropout, slices, scaling)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; valid modes: {', '.join(MODES)}")
        self.mode = mode
        self.k: dict[str, int] = {}
        weight = self.linear().weight.detach()
        for name, s in self.slices.items():
            w = weight if s is None else weight[s]
            u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
            kk = protected_rank(k, sv)
            self.k[name] = kk
            # non-persistent: recomputed from the (fingerprinted) base weights, never saved
            self.register_buffer(f"U_{name}", u[:, :kk].to(w.dtype).contiguous(), persistent=False)
            self.register_buffer(f"V_{name}", vh[:kk].t().to(w.dtype).contiguous(), persistent=False)

    def U(self, name: str) -> torch.Tensor:
        return getattr(self, f"U_{name}")

    def V(self, name: str) -> torch.Tensor:
        return getattr(self, f"V_{name}")

    def effective_A(self) -> torch.Tensor:
        if self.mode not in ("two_sided", "right"):
            return self.lora_A
        r = self.rank
        parts = []
        for i, name in enumerate(self.slices):
            a, v = self.lora_A[i * r:(i + 1) * r], self.V(name)
            parts.append(a - (a @ v) @ v.t())  # A P_R without forming P_R
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def effective_B(self, key: str) -> torch.Tensor:
        b = self.lora_B[key]
        if self.mode in ("two_sided", "left"):
            u = self.U(key)
            b = b - u @ (u.t() @ b)  # P_L B without forming P_L
        return b

    def penalty(self, form: str = "core") -> torch.Tensor:
        """The soft constraint of ``mode=penalty`` on ΔW = (α/r) B A, summed over slices."""
        r, total = self.rank, self.lora_A.new_zeros(())
        for i, name in enumerate(self.slices):
            a, b = self.lora_A[i * r:(i + 1) * r], self.lora_B[name]
            utb = self.scaling * (self.U(name).t() @ b)  # (k, r)
            av = a @ self.V(name)  # (r, k)
            if form == "core":
                total = total + (utb @ av).square().sum()  # ‖U_kᵀ ΔW V_k‖²
            else:
                total = total + (utb @ a).square().sum() + (self.scaling * b @ av).square().sum()
        return total


@register_adapter("comp_lora")
class CompLoRA(Adapter):
    """Comp-LoRA on Linear sites (default: q, k, v of every block, as CLIP-LoRA)."""

    mergeable = True
    supports_slices = True
    paper = "Wang et al., Comp-LoRA, arXiv 2501.15040 (2025)"

    def __init__(self, rank: int = 2, alpha: float = 1.0, dropout: float = 0.25, k: int | float = 8,
                 mode: str = "two_sided", penalty: str = "core", penalty_weight: float = 1.0,
                 targets: list[str] = ("q", "k", "v"), layers="all", scaling: str = "standard"):
        super().__init__()
        lora_scaling(1.0, 1, scaling)  # validates the name: standard (alpha/r) | rslora (alpha/sqrt r)
        self.scaling = scaling
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; valid modes: {', '.join(MODES)}")
        if penalty not in PENALTIES:
            raise ValueError(f"penalty={penalty!r}; valid penalties: {', '.join(PENALTIES)}")
        if isinstance(k, float) and k.is_integer() and k >= 1:
            k = int(k)  # 16.0 from a YAML/CLI override means 16 directions
        if isinstance(k, bool) or not isinstance(k, (int, float)) or k < 0 or (isinstance(k, float) and not 0 < k < 1):
            raise ValueError(f"adapter 'comp_lora': k must be an integer >= 0 (directions) or an energy fraction in (0, 1), got {k!r}")
        self.rank, self.dropout, self.k = int_option("comp_lora", "rank", rank), dropout_option("comp_lora", dropout), k
        self.alpha = float_option("comp_lora", "alpha", alpha, lo=0.0, lo_open=True)
        self.mode, self.penalty, self.penalty_weight = mode, penalty, float(penalty_weight)
        self.targets, self.layers = list(targets), layers

    def attach(self, backbone) -> None:
        bad = [t for t in self.targets if t not in LINEAR_SITES]
        if bad:
            raise SiteError(f"Comp-LoRA attaches to Linear sites {LINEAR_SITES}, not {bad}")
        for group in group_by_module(self.sites(self.targets, self.layers)):
            slices = {s.kind: s.out_slice for s in group}
            self.replace(group[0], CompLoRALinear(group[0].module, self.rank, self.alpha, self.dropout,
                                                  slices, self.k, self.mode, self.scaling))

    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        if self.mode != "penalty" or self.merged or not self.modules:
            return None
        return self.penalty_weight * sum(m.penalty(self.penalty) for m in self.modules)
