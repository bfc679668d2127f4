"""MoSA: Mixture of Sparse Adapters — "Split & Merge: Unlocking the Potential of Visual Adapters
via Sparse Training" (Zhang, Zou, An, Liu, Zhang; arXiv 2312.02923, first titled "MoSA: Mixture
of Sparse Adapters for Visual Efficient Tuning"). Reference code: github.com/Theia-4869/MoSA.

Base adapter (AdaptFormer style, parallel to the MLP, reading the residual stream ``h`` that
enters the MLP's LayerNorm)::

    out = h + MLP(LN2(h)) + s · Up( Dropout( GELU( Down( LN_a(h) ) ) ) ),   s = 0.1, p = 0.1

with a new trainable LayerNorm ``LN_a``, Down ~ Kaiming-uniform(a=√5), Up = 0, zero biases.

**Split.** The entries of a projection ``W ∈ R^{o×i}`` are split into N disjoint random sets of
(almost) equal size, masks ``M_1 … M_N`` with ``Σ_k M_k = 1``. Expert k is the full-size
projection ``W0 + M_k ⊙ Δ``: it only ever changes its own entries, the others keep the shared
initial value ``W0`` (0 for the up-projection). Each expert has a private, dense bias ``b_k``.
``share`` picks what is split: ``down`` (default; the down-projection is one dense Linear
trained every step and only Up is split), ``up`` (the reverse) or ``none`` (both).

**Sparse training.** Each forward of each block draws its expert ``k ~ U{1..N}`` (for a split
down and up projection independently), the same for the whole batch. The forward uses
``W0 + M_k ⊙ Δ`` — the mask is applied *in the forward*, so autograd's gradient on ``Δ`` is
exactly the reference's masked gradient ``p.grad *= p.mask``: zero outside ``M_k``. No gradient
surgery in ``before_optimizer_step`` is needed.

**Merge.** At evaluation the merged adapter is used (reference ``merge(mode="add")``)::

    W_merge = W0 + (1/N) Σ_k M_k ⊙ Δ = W0 + Δ / N,     b_merge = (1/N) Σ_k b_k

For a split up-projection (``share=down``) this is exactly the expectation of the training-time
output over the expert draw (Up is linear and follows the non-linearity). For a split
down-projection it is the reference's weight average, not an expectation of outputs.
:func:`export_plain_adapter` turns a trained MoSA model into an ordinary ``adapter``
(``style=adaptformer``) of the original size with identical evaluation outputs: no extra
parameters or FLOPs at inference.

**Consistency.** ``extra_loss`` runs a second stochastic forward ``z2`` (different experts) and
returns ``λ · ½[KL(sg(p2) ‖ p1) + KL(sg(p1) ‖ p2)]`` (``batchmean``; λ = ``consistency_weight``
= 1.0) plus ``ce2_weight · CE(z2, y)`` (the reference's ADD_WEIGHT, 0 in all its scripts, so the
second pass' CE is *not* added by default).

**Storage of the experts.** One tensor ``Δ`` per split projection plus a partition index
(``partition[o, i] = k``) instead of N full copies: the same function with 1/N of the memory.
The partition is a non-persistent buffer derived from ``mask_seed`` (in the config) and the
layer, so it is reproducible and identical on every DDP rank without being stored.

**DDP and unused experts.** Every parameter takes part in every forward: ``Δ`` is used densely
(masked), ``bias[k]`` indexes one tensor. Each step therefore gives every parameter a gradient
(zero outside the active partitions), so DDP needs no ``find_unused_parameters``; ranks draw
experts independently and the all-reduce averages their masked gradients.

Reconstructed / differing from the reference (options where it matters):

* ``share`` ∈ {down, up, none} is our **[reading]** of the paper's "hierarchical sparse
  strategy" (sparsify one level of the adapter, keep the other dense); unverified.
* The reference draws experts with Python ``random``; we use torch's global generator.
* The reference keeps N separate Linear copies: inactive copies have ``grad=None`` (AdamW skips
  them) or a zero gradient (momentum keeps moving them), depending on how gradients are zeroed.
  Here every partition gets a zero gradient when inactive, i.e. the second behaviour: with AdamW an
  expert's entries are untouched until it is first drawn, then keep moving for steps after it was
  active (its first moment decays by β1 per step but is not zero), unlike the reference's skipped
  ``grad=None`` copies (``test_sparse_update_with_adamw_and_what_momentum_does`` pins this). Decoupled
  weight decay acts on ``Δ`` (towards ``W0``), not on ``W0`` itself as it does on the reference's
  frozen entries of a split *down* copy.
* The Pfeiffer/Houlsby styles, the "row"/"column" partition modes and DEEPREG are not included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.adapter import Bottleneck, InputTap, ParallelAdapter, site_dim
from zoo.adapters.base import Adapter, AdapterModule, StepContext, dropout_option, int_option

SHARE = ("down", "up", "none")


def random_partition(shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    """A random partition of a tensor's entries into ``n`` disjoint sets of (almost) equal size.

    Returns ``part`` (uint8, ``shape``) with ``part[idx] = k`` for the k-th set: the entries are
    ranked by a random permutation and cut at the k/n quantiles, as the reference's
    ``Pruner.divide(mode="all")`` does with a uniform score and ``kthvalue``.
    """
    numel = 1
    for s in shape:
        numel *= s
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(numel, generator=g)
    part = torch.empty(numel, dtype=torch.uint8)
    part[perm] = (torch.arange(numel) * n // numel).to(torch.uint8)
    return part.view(shape)


class SplitLinear(AdapterModule):
    """N sparse experts of one Linear: expert k is ``W0 + M_k ⊙ Δ`` with a private bias ``b_k``.

    Training: one expert per forward (``active`` forces one, for tests and analysis; the drawn
    one is kept in ``last_expert``). Evaluation: the merged Linear ``W0 + Δ/N``, ``mean_k b_k``.
    """

    def __init__(self, linear: nn.Linear, experts: int, seed: int):
        super().__init__()
        w = linear.weight.detach()
        self.experts = experts
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # W0, the shared initial value of every expert; an all-zero W0 (the up-projection) is
        # not stored at all.
        if torch.count_nonzero(w):
            self.register_buffer("weight0", w.clone())
        else:
            self.weight0 = None
        self.delta = nn.Parameter(torch.zeros_like(w))
        b = linear.bias.detach() if linear.bias is not None else torch.zeros(self.out_features, device=w.device, dtype=w.dtype)
        self.bias = nn.Parameter(b.unsqueeze(0).repeat(experts, 1))
        self.register_buffer("partition", random_partition(tuple(w.shape), experts, seed).to(w.device), persistent=False)
        self.active: int | None = None
        self.last_expert: int | None = None

    def mask(self, k: int) -> torch.Tensor:
        return self.partition == k

    def expert_weight(self, k: int) -> torch.Tensor:
        w = self.delta * self.mask(k)
        return w if self.weight0 is None else w + self.weight0

    def merged_weight(self) -> torch.Tensor:
        # (1/N) Σ_k (W0 + M_k ⊙ Δ) = W0 + Δ/N because the masks partition the entries
        w = self.delta / self.experts
        return w if self.weight0 is None else w + self.weight0

    def merged_bias(self) -> torch.Tensor:
        return self.bias.mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            k = self.active if self.active is not None else int(torch.randint(self.experts, ()).item())
            self.last_expert = k
            return F.linear(x, self.expert_weight(k), self.bias[k])
        return F.linear(x, self.merged_weight(), self.merged_bias())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, experts={self.experts}"


class MoSABottleneck(Bottleneck):
    """AdaptFormer bottleneck (LN, GELU, dropout, scale) with its non-shared projection(s) split."""

    def __init__(self, dim: int, bottleneck: int, experts: int, share: str, scale: float,
                 dropout: float, seed: int):
        super().__init__(dim, bottleneck, act="gelu", scale=scale, dropout=dropout, layernorm=True, init="lora")
        if share in ("up", "none"):
            self.down = SplitLinear(self.down, experts, seed * 2)
        if share in ("down", "none"):
            self.up = SplitLinear(self.up, experts, seed * 2 + 1)

    def split_layers(self) -> list[SplitLinear]:
        return [m for m in (self.down, self.up) if isinstance(m, SplitLinear)]


@register_adapter("mosa")
class MoSA(Adapter):
    """Mixture of Sparse Adapters on the MLP of every chosen block (AdaptFormer placement)."""

    paper = "Zhang et al., Split & Merge / MoSA, arXiv 2312.02923"

    def __init__(self, bottleneck: int = 64, experts: int = 4, share: str = "down", scale: float = 0.1,
                 dropout: float = 0.1, consistency_weight: float = 1.0, ce2_weight: float = 0.0,
                 mask_seed: int = 0, layers="all"):
        super().__init__()
        share = "none" if share is None else str(share)
        if share not in SHARE:
            raise ValueError(f"unknown share {share!r}; valid options: {', '.join(SHARE)}")
        int_option("mosa", "experts", experts, 1, 255)
        int_option("mosa", "bottleneck", bottleneck)
        dropout_option("mosa", dropout)
        self.bottleneck, self.experts, self.share = int(bottleneck), int(experts), share
        self.scale, self.dropout = float(scale), float(dropout)
        self.consistency_weight, self.ce2_weight = float(consistency_weight), float(ce2_weight)
        self.mask_seed, self.layers = int(mask_seed), layers

    def attach(self, backbone) -> None:
        mlps, norms = self.sites("mlp", self.layers), self.sites("norm2", self.layers)
        for mlp, norm in zip(mlps, norms):
            p = next(mlp.base_module.parameters())
            # one seed per (config seed, block): partitions are reproducible and rank-independent
            seed = self.mask_seed * 100_003 + mlp.layer
            bott = MoSABottleneck(site_dim(mlp.module), self.bottleneck, self.experts, self.share,
                                  self.scale, self.dropout, seed)
            tap = self.replace(norm, InputTap(norm.module))
            self.replace(mlp, ParallelAdapter(mlp.module, bott.to(p.device, p.dtype), tap))

    def bottlenecks(self) -> list[MoSABottleneck]:
        return [m.adapter for m in self.modules if isinstance(m, ParallelAdapter)]

    def split_layers(self) -> list[SplitLinear]:
        return [s for b in self.bottlenecks() for s in b.split_layers()]

    # ------------------------------------------------------------------ training hooks
    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        """Second stochastic pass + symmetric KL (+ optional CE on the second pass)."""
        if not ctx.model.training or (self.consistency_weight == 0 and self.ce2_weight == 0):
            return None
        if ctx.forward is None:
            raise ValueError("MoSA's consistency loss needs ctx.forward to re-run the model")
        z1, z2 = ctx.outputs, ctx.forward(ctx.inputs)
        loss = self.consistency_weight * symmetric_kl(z1, z2)
        if self.ce2_weight:
            loss = loss + self.ce2_weight * ctx.loss_fn(z2, ctx.targets)
        return loss

    def export(self, model: nn.Module) -> nn.Module:
        return export_plain_adapter(model)


def symmetric_kl(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``½[KL(sg(p2) ‖ p1) + KL(sg(p1) ‖ p2)]`` over classes (dim 1), ``batchmean`` reduction."""
    lp1, lp2 = F.log_softmax(z1.float(), dim=1), F.log_softmax(z2.float(), dim=1)
    kl_21 = F.kl_div(lp1, lp2.detach(), reduction="batchmean", log_target=True)
    kl_12 = F.kl_div(lp2, lp1.detach(), reduction="batchmean", log_target=True)
    return 0.5 * (kl_21 + kl_12)


@torch.no_grad()
def export_plain_adapter(model: nn.Module) -> nn.Module:
    """Replace the MoSA adapter of ``model`` by an ordinary ``adapter`` (``style=adaptformer``).

    The new adapter holds the merged weights (``W0 + Δ/N``, mean bias), so its outputs equal the
    MoSA model's evaluation outputs and it has exactly a plain AdaptFormer adapter's parameters.
    In place; returns ``model``. MoSA must be the only adapter attached.
    """
    from zoo.api import adapters_of, apply_adapter, remove_adapters

    attached = adapters_of(model)
    if len(attached) != 1 or not isinstance(attached[0], MoSA):
        raise ValueError(f"export_plain_adapter needs exactly one MoSA adapter attached, found {[a.name for a in attached]}")
    mosa = attached[0]
    merged = []
    for b in mosa.bottlenecks():
        lin = {}
        for name in ("down", "up"):
            m = getattr(b, name)
            lin[name] = ((m.merged_weight(), m.merged_bias()) if isinstance(m, SplitLinear)
                         else (m.weight.clone(), m.bias.clone()))
        merged.append((b.norm.state_dict(), lin))
    remove_adapters(model)
    apply_adapter(model, "adapter", style="adaptformer", bottleneck=mosa.bottleneck, act="gelu",
                  scale=mosa.scale, dropout=mosa.dropout, layernorm=True, adapter_input="block",
                  layers=mosa.layers)
    plain = [m.adapter for m in adapters_of(model)[0].modules if isinstance(m, ParallelAdapter)]
    assert len(plain) == len(merged)
    for b, (norm, lin) in zip(plain, merged):
        b.norm.load_state_dict(norm)
        for name, (w, bias) in lin.items():
            getattr(b, name).weight.copy_(w)
            getattr(b, name).bias.copy_(bias)
    return model
