"""LoRA-Pro: LoRA whose factor gradients are adjusted so that the low-rank step is the closest one to
full fine-tuning (Wang & Liang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?",
ICLR 2025; reference ``mrflogs/LoRA-Pro``, ``deepspeed/runtime/zero/stage_1_and_2.py``
``lorapro_full_adjustment``).

A LoRA layer ``W = W0 + s B A`` (``A`` Kaiming-uniform, ``B = 0``) takes, under a step on its factors, the
full-weight step of the *equivalent gradient* ``g̃ = s (B g_A + g_B A)``. With the raw factor gradients
``g_A^ℓ = s Bᵀ g`` and ``g_B^ℓ = s g Aᵀ`` of the full gradient ``g``, the adjusted gradients that make
``g̃`` the closest such matrix to ``g`` are::

    g_A = (1/s²) (BᵀB)⁻¹ g_A^ℓ + X A
    g_B = (1/s²) [I − B (BᵀB)⁻¹ Bᵀ] g_B^ℓ (AAᵀ)⁻¹ − B X
    X : BᵀB X + X AAᵀ = −(1/s²) (BᵀB)⁻¹ g_A^ℓ Aᵀ          (Sylvester; keeps g_A, g_B near the raw ones)

and then ``g̃ = P_B g + (I − P_B) g P_A`` (``P_B = B(BᵀB)⁻¹Bᵀ``, ``P_A = Aᵀ(AAᵀ)⁻¹A``). At the first step
(``B = 0``): ``g_A = g_A^ℓ``, ``g_B = (1/s²) g_B^ℓ (AAᵀ)⁻¹``. Inverses are ``pinv(M + 1e-8 I)`` in fp32.

The optimizer (the reference's "full" mode): per layer, Adam moments of the **d_out × d_in** equivalent
gradient ``g̃`` (β = 0.9/0.999, bias-corrected, ``Ĝ = m̂ / (√v̂ + ε)``), projected back
(``g_A^ℓ' = s Bᵀ Ĝ``, ``g_B^ℓ' = s Ĝ Aᵀ``), adjusted again with a fresh Sylvester solve, and applied by plain
SGD (``p ← p − η (g + λ p)``: the reference trains with ``optim="sgd"``). Memory: two full-size moments per
adapted layer, as full fine-tuning of those layers.

Differences from the reference, each a numerical choice, not a different method: the Sylvester equation is
solved with real eigendecompositions of the symmetric ``BᵀB`` and ``AAᵀ`` (the reference: complex
``torch.linalg.eig``, real part); ``v`` is accumulated in the parameter dtype (the reference rounds ``g̃²``
to bf16); ``s`` is each layer's own scaling (the reference hard-codes 16/8 = 2). Trainable parameters that
are not LoRA factors (the task head) get AdamW in the same optimizer (``others=adamw``, a reconstruction:
under the reference's ``optim="sgd"`` they would get plain SGD, ``others=sgd``).

The training-loop hook: :meth:`LoRAPro.make_optimizer` (``zoo.build_optimizer``, used by every task)
returns :class:`LoRAProOptimizer`; the moments live in the optimizer state of each layer's ``B`` factor,
so a Lightning checkpoint resumes them exactly. Trainable parameters: LoRA's, ``r (d_in + d_out)`` per layer.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, dropout_option, float_option, int_option
from zoo.adapters.linear_sites import linear_site_groups
from zoo.adapters.lora import LoRALinear, lora_scaling

JITTER = 1e-8


def _inv(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.pinv(m.float() + JITTER * torch.eye(m.shape[0], device=m.device))


def solve_sylvester(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``X`` with ``P X + X Q = C`` for symmetric ``P`` (r×r) and ``Q`` (r×r), via their eigenbases."""
    lp, up = torch.linalg.eigh(P.double())
    lq, uq = torch.linalg.eigh(Q.double())
    f = up.t() @ C.double() @ uq
    return (up @ (f / (lp[:, None] + lq[None, :])) @ uq.t()).to(C.dtype)


@torch.no_grad()
def adjust(A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, s: float,
           first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's optimal factor gradients (module docstring) from the raw ``gA`` (r×d_in), ``gB`` (d_out×r)."""
    A32, B32, gA32, gB32 = A.float(), B.float(), gA.float(), gB.float()
    aat_inv = _inv(A32 @ A32.t())
    if first:
        return gA32, (gB32 @ aat_inv) / s ** 2
    btb = B32.t() @ B32
    btb_inv = _inv(btb)
    X = solve_sylvester(btb, A32 @ A32.t(), -(btb_inv @ gA32) @ A32.t() / s ** 2)
    proj = torch.eye(B.shape[0], device=B.device) - B32 @ btb_inv @ B32.t()
    return (btb_inv @ gA32) / s ** 2 + X @ A32, (proj @ (gB32 @ aat_inv)) / s ** 2 - B32 @ X


class LoRAProOptimizer(torch.optim.Optimizer):
    """SGD on LoRA-Pro-adjusted factor gradients with full-size Adam on the equivalent gradient; AdamW
    (``others="adamw"``) or SGD for every other parameter.

    ``pairs``: ``(A, rows, B, s)`` per adapted weight: ``A[rows]`` and ``B`` are its factors (a fused qkv's
    q and v slices share one stacked ``A``). State of ``B``: ``step``, ``exp_avg``, ``exp_avg_sq`` (d_out×d_in).
    """

    def __init__(self, params, pairs, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 others: str = "adamw"):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.pairs = pairs
        self.others = others
        self._factor_ids = {id(p) for a, _, b, _ in pairs for p in (a, b)}

    @torch.no_grad()
    def adjust_gradients(self) -> None:
        """Replace the factors' ``.grad`` by LoRA-Pro's update direction (Adam on ``g̃``, adjusted)."""
        beta1, beta2 = self.defaults["betas"]
        eps = self.defaults["eps"]
        for A, rows, B, s in self.pairs:
            if A.grad is None or B.grad is None:
                continue
            a, ga = A[rows], A.grad[rows]
            st = self.state[B]
            first = st.get("step", 0) == 0
            adj_a, adj_b = adjust(a, B, ga, B.grad, s, first)
            equiv = s * (B.float() @ adj_a + adj_b @ a.float())
            if first:
                st["exp_avg"] = torch.zeros_like(equiv, dtype=B.dtype)
                st["exp_avg_sq"] = torch.zeros_like(equiv, dtype=B.dtype)
            st["step"] = st.get("step", 0) + 1
            t = st["step"]
            st["exp_avg"].lerp_(equiv.to(B.dtype), 1 - beta1)
            st["exp_avg_sq"].mul_(beta2).addcmul_(equiv.to(B.dtype), equiv.to(B.dtype), value=1 - beta2)
            denom = (st["exp_avg_sq"].float().sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
            g = (st["exp_avg"].float() / (1 - beta1 ** t)) / denom
            new_a, new_b = adjust(a, B, s * B.float().t() @ g, s * g @ a.float().t(), s, first)
            A.grad[rows] = new_a.to(A.dtype)
            B.grad.copy_(new_b.to(B.dtype))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adjust_gradients()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if id(p) in self._factor_ids or self.others == "sgd":  # torch.optim.SGD without momentum
                    p.add_(p.grad + wd * p if wd else p.grad, alpha=-lr)
                    continue
                st = self.state[p]  # torch.optim.AdamW's step
                if "step" not in st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["step"]
                p.mul_(1 - lr * wd)
                st["exp_avg"].lerp_(p.grad, 1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
                p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - beta1 ** t))
        return loss


@register_adapter("lora_pro")
class LoRAPro(Adapter):
    """LoRA-Pro: LoRA trained with gradients adjusted towards full fine-tuning's (its own optimizer)."""

    mergeable = True
    supports_slices = True
    paper = "Wang et al., LoRA-Pro, ICLR 2025"
    OTHERS = ("adamw", "sgd")

    def __init__(self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets: list[str] = ("q", "v"),
                 layers="all", scaling: str = "standard", others: str = "adamw"):
        super().__init__()
        self.rank = int_option("lora_pro", "rank", rank)
        self.alpha = float_option("lora_pro", "alpha", alpha)
        self.dropout = dropout_option("lora_pro", dropout)
        lora_scaling(1.0, 1, scaling)
        if others not in self.OTHERS:
            raise ValueError(f"adapter 'lora_pro': others={others!r}; valid: {', '.join(self.OTHERS)}")
        self.scaling, self.others = scaling, others
        self.targets, self.layers = list(targets), layers

    def attach(self, backbone) -> None:
        for site, slices in linear_site_groups(self, "LoRA-Pro"):
            self.replace(site, LoRALinear(site.module, self.rank, self.alpha, self.dropout, slices, self.scaling))

    def pairs(self) -> list[tuple[nn.Parameter, slice, nn.Parameter, float]]:
        out = []
        for m in self.modules:
            r = m.rank
            for i, key in enumerate(m.slices):
                out.append((m.lora_A, slice(i * r, (i + 1) * r), m.lora_B[key], float(m.scaling)))
        return out

    def make_optimizer(self, groups, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
        return LoRAProOptimizer(groups, self.pairs(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                others=self.others)
