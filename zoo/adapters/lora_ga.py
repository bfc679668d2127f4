"""LoRA-GA: LoRA initialised from the SVD of the full-weight gradient (Wang et al., "LoRA-GA: Low-Rank
Adaptation with Gradient Approximation", NeurIPS 2024; reference ``Outsider565/LoRA-GA``
``peft/src/peft/tuners/lora/layer.py::lora_ga_init``; peft ``init_lora_weights="lora_ga"``).

Before training, ``prepare`` averages the task-loss gradient of each target weight over ``batches``
batches (gradients enabled on the target weights only), ``G = mean ∂L/∂W0``, then per target::

    U, S, V = svd_lowrank(G, q = min(4r, min(G.shape)), niter = 4)
    direction ArB2r (default):  A0 = V[:, :r]ᵀ,  B0 = U[:, r:2r]        (ArBr: odd/even, A2rBr: swapped halves)
    variant=reference:  A0, B0 ×= d_out^{1/4} / √γ                       (scale "stable", γ = stable_gamma)
    variant=peft:       B0 = U[:, r:2r] diag(S[r:2r]) · d_out^{1/4} / √γ,  A0 unscaled
    (scale "gd_scale": A0, B0 /= s;  "unit": no scale;  "weight_svd" (peft): B0 ×= σ1(W0) / S_B[0])

and the layer computes ``W0 x + s (B A − B0 A0) x`` with ``A, B`` trained from ``A0, B0``: unchanged at
step 0, with the first step aligned with full fine-tuning's. peft and the reference subtract ``s B0 A0``
from ``W0`` in place; here ``A0, B0`` are kept as frozen buffers of the wrapper (the same function), so the
backbone's weights — and its fingerprint — stay the pretrained ones and the artifact is self-contained
(it stores ``A, B, A0, B0``; ``merge`` folds ``s (B A − B0 A0)``).

The training-loop hook: ``prepare(model, dataloader, loss_fn)`` — tasks pass their training loss on a
batch (``zoo.prepare_adapters(..., loss_fn=task.batch_loss)``; plain callers get cross-entropy / MSE).
The SVD runs under ``seed`` so a resumed run re-derives the same initial factors. Trainable parameters:
LoRA's, ``r (d_in + d_out)`` per layer. Defaults: r = 8, α = 16, 64 batches (the reference: 64 batches of 2).
"""
from __future__ import annotations

from itertools import cycle

import torch
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, dropout_option, float_option, int_option
from zoo.adapters.linear_sites import linear_site_groups
from zoo.adapters.lora import LoRALinear, lora_scaling

DIRECTIONS = ("ArB2r", "ArBr", "A2rBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")
VARIANTS = ("reference", "peft")


class LoRAGALinear(LoRALinear):
    """:class:`LoRALinear` minus the frozen initial delta ``s B0 A0`` (buffers; zero until initialised)."""

    def __init__(self, base, rank, alpha, dropout=0.0, slices=None, scaling="standard"):
        super().__init__(base, rank, alpha, dropout, slices, scaling)
        lin = self.linear()
        self.register_buffer("init_A", torch.zeros_like(self.lora_A))
        self.register_buffer("init_Bt", torch.zeros(len(self.slices) * rank, lin.out_features,
                                                    dtype=lin.weight.dtype, device=lin.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.merged:
            return out
        return out - ((x @ self.init_A.t()) * self.scaling) @ self.init_Bt

    def delta_weight(self) -> torch.Tensor:
        return super().delta_weight() - self.scaling * self.init_Bt.t() @ self.init_A

    @torch.no_grad()
    def set_init(self, i: int, key: str, A0: torch.Tensor, B0: torch.Tensor) -> None:
        """Slice ``i`` (``key``) starts at ``A = A0``, ``B = B0`` with the offset ``s B0 A0`` removed."""
        r, s = self.rank, self.slices[key]
        self.lora_A[i * r:(i + 1) * r] = A0.to(self.lora_A.dtype)
        self.lora_B[key].copy_(B0.to(self.lora_B[key].dtype))
        self.init_A[i * r:(i + 1) * r] = A0.to(self.init_A.dtype)
        self.init_Bt[i * r:(i + 1) * r].zero_()
        self.init_Bt[i * r:(i + 1) * r, slice(None) if s is None else s] = B0.t().to(self.init_Bt.dtype)


def lora_ga_factors(G: torch.Tensor, rank: int, scaling: float, direction: str = "ArB2r", scale: str = "stable",
                    stable_gamma: float = 16.0, variant: str = "reference", weight: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A0, B0)`` from the averaged gradient ``G`` (d_out × d_in); see the module docstring."""
    G = G.float()
    U, S, V = torch.svd_lowrank(G, q=min(4 * rank, min(G.shape)), niter=4)
    Vh, r = V.t(), rank
    U, S, Vh = U[:, :2 * r], S[:2 * r], Vh[:2 * r]
    if direction == "ArBr":
        ia, ib = slice(1, 2 * r, 2), slice(0, 2 * r, 2)
    elif direction == "A2rBr":
        ia, ib = slice(r, 2 * r), slice(None, r)
    elif direction == "ArB2r":
        ia, ib = slice(None, r), slice(r, 2 * r)
    else:  # random: the same r indices for both (peft)
        ia = ib = torch.randperm(2 * r)[:r]
    A0, B0, S_B = Vh[ia], U[:, ib], S[ib]
    if variant == "peft":
        B0 = B0 @ torch.diag(S_B)
    d_out = G.shape[0]
    if scale == "stable":
        f = d_out ** 0.25 / stable_gamma ** 0.5
        B0 = B0 * f
        if variant == "reference":
            A0 = A0 * f
    elif scale == "weight_svd":
        _, wS, _ = torch.svd_lowrank(weight.float(), q=r, niter=4)
        if S_B[0] > 0:
            B0 = B0 * (wS[0] / S_B[0])
    elif scale == "gd_scale":
        A0, B0 = A0 / scaling, B0 / scaling
    return A0, B0


@register_adapter("lora_ga")
class LoRAGA(Adapter):
    """LoRA-GA: LoRA initialised from the SVD of the averaged full-weight gradient (one pass before training)."""

    mergeable = True
    supports_slices = True
    paper = "Wang et al., LoRA-GA, NeurIPS 2024"

    def __init__(self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets: list[str] = ("q", "v"),
                 layers="all", scaling: str = "standard", batches: int = 64, direction: str = "ArB2r",
                 scale: str = "stable", stable_gamma: float = 16.0, variant: str = "reference", seed: int = 0):
        super().__init__()
        self.rank = int_option("lora_ga", "rank", rank)
        self.alpha = float_option("lora_ga", "alpha", alpha)
        self.dropout = dropout_option("lora_ga", dropout)
        lora_scaling(1.0, 1, scaling)
        self.batches = int_option("lora_ga", "batches", batches)
        self.stable_gamma = float_option("lora_ga", "stable_gamma", stable_gamma, lo=0.0, lo_open=True)
        for name, v, valid in (("direction", direction, DIRECTIONS), ("scale", scale, SCALES),
                               ("variant", variant, VARIANTS)):
            if v not in valid:
                raise ValueError(f"adapter 'lora_ga': {name}={v!r}; valid: {', '.join(valid)}")
        self.scaling, self.direction, self.scale, self.variant = scaling, direction, scale, variant
        self.seed = int_option("lora_ga", "seed", seed, lo=0)
        self.targets, self.layers = list(targets), layers
        self.initialized = False

    def attach(self, backbone) -> None:
        for site, slices in linear_site_groups(self, "LoRA-GA"):
            self.replace(site, LoRAGALinear(site.module, self.rank, self.alpha, self.dropout, slices,
                                                self.scaling))

    def prepare(self, model: nn.Module, dataloader, loss_fn=None) -> None:
        if self.initialized or any(m.init_A.any() for m in self.modules):
            return  # initialised before, or loaded from an artifact / checkpoint
        grads = self.estimate_gradients(model, dataloader, loss_fn)
        self.init_from_gradients(grads)

    def estimate_gradients(self, model: nn.Module, dataloader, loss_fn) -> list[torch.Tensor]:
        """``G`` per wrapper: the target weight's gradient averaged over ``batches`` backward passes."""
        from zoo.adapters.base import default_batch_loss

        loss_fn = loss_fn or default_batch_loss(model)
        weights = [m.linear().weight for m in self.modules]
        flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
        for p, _ in flags.values():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        was_training = model.training
        model.train()
        try:
            with torch.enable_grad():
                for _, batch in zip(range(self.batches), cycle(dataloader)):
                    loss_fn(batch).backward()
            grads = [w.grad.detach() / self.batches for w in weights]
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                for g in grads:  # every rank starts from the same factors
                    torch.distributed.all_reduce(g)
                    g /= torch.distributed.get_world_size()
        finally:
            for w in weights:
                w.grad = None
            for p, flag in flags.values():
                p.requires_grad_(flag)
            model.train(was_training)
        return grads

    @torch.no_grad()
    def init_from_gradients(self, grads: list[torch.Tensor]) -> None:
        """Set every wrapper's ``A, B, A0, B0`` from its averaged weight gradient (``grads[i]`` of ``self.modules[i]``)."""
        cuda = sorted({g.device.index or 0 for g in grads if g.is_cuda})
        with torch.random.fork_rng(devices=cuda):  # seeded here, the caller's RNG streams untouched
            torch.manual_seed(self.seed)
            for m, G in zip(self.modules, grads):
                lin = m.linear()
                for i, (key, s) in enumerate(m.slices.items()):
                    rows = slice(None) if s is None else s
                    A0, B0 = lora_ga_factors(G[rows], m.rank, m.scaling, self.direction, self.scale,
                                             self.stable_gamma, self.variant, lin.weight[rows])
                    m.set_init(i, key, A0, B0)
        self.initialized = True
