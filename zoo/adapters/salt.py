"""SALT: Singular value Adaptation with Low-rank Transformation (Elsayed, Hashmi, Elseiagy, Wang,
Yaqub, Almakky, "SALT: Singular Value Adaptation with Low-Rank Transformation", arXiv 2503.16055,
BMVC 2025; code: github.com/BioMedIA-MBZUAI/SALT, SAM2 version ``Adapters/SALT.py``).

For a frozen Linear with weight ``W ∈ R^{d_out×d_in}`` take the thin SVD ``W = U diag(σ) Vᵀ``
(``k = min(d_out, d_in)``, σ descending) and split it at rank ``r``:

* top r singular values are scaled and shifted: ``σ'_i = a_i σ_i + b_i``  (a = 1, b = 0 at init);
* the remaining (k−r)×(k−r) block gets a LoRA *inside the singular basis*:
  ``Σ'_res = diag(σ_{r+1..k}) + X Y``,  ``X ∈ R^{(k−r)×r_L}`` (Kaiming-uniform), ``Y ∈ R^{r_L×(k−r)}`` (zero);
* ``Σ' = blockdiag(diag(σ'_top), Σ'_res)``, ReLU elementwise on all of Σ', and
  ``W' = U · ReLU(Σ') · Vᵀ``,  ``y = x W'ᵀ + b`` (the bias stays frozen).

Regulariser (per layer, summed, times ``reg_multiplier``, returned by :meth:`SALT.extra_loss`)::

    R = ‖a ⊙ σ_top + b − σ_top‖₂ + ‖X Y‖_F

Trainable parameters per layer: ``2r + 2(k−r)·r_L``. The rank is ``rank`` when given (the SAM v1
code), else ``max(1, int(k·ratio))`` (the SAM2 code). Init is the SAM2 one (Y = 0, X Kaiming-
uniform with ``a=√20, fan_in, relu``), so the model starts exactly at W.

U, σ and Vᵀ are frozen. They are computed when the adapter attaches, i.e. after the base weights
are loaded (the reference recomputes them lazily at the first forward for the same reason), and
kept as non-persistent buffers: the artifact holds only a, b, X, Y and :func:`zoo.load_adapter`
recomputes the SVD from the base weights. Singular vectors are defined up to a sign per pair
(u_i, v_i); the off-diagonal entries of XY depend on it, so we fix each pair's sign (largest-
magnitude entry of u_i positive) to make the basis the same on every LAPACK backend. Call
:meth:`SALTLinear.recompute_svd` if you change the base weights after attaching.

**Training forward: two exact forms, the cheaper one per call.** Because ``U diag(σ) Vᵀ = W``
exactly, the adapted layer is ``W' = W + U Δ Vᵀ`` with::

    Δ = blockdiag(diag(ReLU(σ'_top) − σ_top),  ReLU(Σ'_res) − diag(σ_res))

* *factored* (:meth:`SALTLinear.factored_forward`): ``y = base(x) + ((x V) · Δ) Uᵀ``, the
  correction computed on activations (``x → Vᵀ``, k values per token, an elementwise product for
  the top block, a (k−r)×(k−r) matmul for the residual block, then ``U``); W' is never formed.
  Extra multiply-adds per step ≈ ``T·(2k(d_in + d_out) + 3(k−r)²)`` for T tokens.
* *weight*: ``y = x (W + U Δ Vᵀ)ᵀ + b``. Extra ≈ ``T·d_in·d_out`` (the gradient of W', which a
  frozen layer does not need) ``+ 3(k·d_out·d_in + (k−r)²·d_in)`` (forming ``U Δ Vᵀ`` and its
  backward), independent of T beyond the first term.

:meth:`SALTLinear.weight_path_cheaper` compares the two counts for the call's token count
(weight wins when T is larger than about k: a ViT-S/16 batch of 8 at 224 px has T = 1576 > k = 384;
the 64 px quick bench at batch 32 has T = 544). Both are exact at init (Δ is exactly zero, so
the output is bit-identical to the frozen layer; ``U diag(σ) Vᵀ x`` would differ from ``W x`` by
the SVD's round-off) and keep the frozen W at its own precision. Either way a SALT step costs
more than the frozen floor by the method's own arithmetic: the gradient of Σ' needs either the
projections of every token onto the singular bases or a weight-sized gradient (as full
fine-tuning has), and ``ReLU(Σ'_res)`` has no low-rank form (the ReLU acts elementwise on
``diag + XY``). ``python -m bench.adapters`` prints the counted FLOPs next to the times.

**Eval forward: the floor's cost.** In eval mode without gradients (``model.eval()`` + ``no_grad``
or ``inference_mode``) the layer runs ``F.linear(x, W')`` with W' formed once and cached
(:meth:`SALTLinear.cached_weight`; one extra d_out×d_in copy per layer). The cache is dropped by
``.train()``/``.eval()`` and re-formed when any tensor it depends on changes: a, b, X, Y, the
SVD buffers or the base weight (checked by identity and in-place version counter, so optimizer
steps, ``load_state_dict`` and in-place edits all invalidate it).

Differences from the reference, by choice: the reference also trains every LayerNorm, the
positional embedding and its text-prompt affine (combine SALT with those yourself); only Linear
sites are covered (``SALTConv2d`` for SAM's neck is not ported); ``reg_multiplier`` defaults to 0,
the value in the released ``SALT_config.yml`` (``train.py``'s argument default is 0.01). Defaults
``ratio=0.1, r_lora=256`` are the SAM2 code's globals; on ViT-B that trains ~20% of the weights;
``r_lora≈50`` gives the paper's ~4%.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import inner_layer, Adapter, StepContext, WrappedLayer, int_option
from zoo.sites import SiteError




def canonical_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float32 (or wider) with each (u_i, v_i) sign fixed: largest |u_i| entry > 0."""
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    idx = U.abs().argmax(dim=0)
    sign = torch.sign(U.gather(0, idx[None]).squeeze(0))
    sign[sign == 0] = 1
    return U * sign, S, Vh * sign[:, None]


class SALTLinear(WrappedLayer):
    """A frozen Linear with SALT's singular-value adaptation (see the module docstring)."""

    def __init__(self, base: nn.Module, rank: int | None = None, ratio: float = 0.1, r_lora: int = 256):
        super().__init__(base)
        lin = _inner_linear(base)
        k = min(lin.in_features, lin.out_features)
        r = int(rank) if rank is not None else max(1, int(k * ratio))
        if not 1 <= r <= k:
            raise ValueError(f"SALT rank must be in 1..{k} for a {lin.out_features}×{lin.in_features} layer, got {r}")
        self.k, self.rank, self.r_lora = k, r, int(r_lora)
        kw = dict(device=lin.weight.device, dtype=lin.weight.dtype)
        for name in ("U", "S", "Vh"):  # frozen, recomputed from the base weights: never saved
            self.register_buffer(name, torch.empty(0, **kw), persistent=False)
        self.recompute_svd()
        self.scale = nn.Parameter(torch.ones(r, **kw))
        self.shift = nn.Parameter(torch.zeros(r, **kw))
        self.X = nn.Parameter(torch.empty(k - r, self.r_lora, **kw))
        self.Y = nn.Parameter(torch.zeros(self.r_lora, k - r, **kw))
        # SAM2 reference init (a=√20 is ignored by torch for nonlinearity='relu'; kept as written)
        nn.init.kaiming_uniform_(self.X, a=math.sqrt(20), mode="fan_in", nonlinearity="relu")
        self.fast_path = True  # False: always the factored training forward (see forward)
        self._w_cache: tuple | None = None  # (key, W') for eval, see cached_weight

    @torch.no_grad()
    def recompute_svd(self) -> None:
        """(Re)take the SVD of the current base weight (call after changing the base weights)."""
        lin = _inner_linear(self.base)
        U, S, Vh = canonical_svd(lin.weight)
        dt = lin.weight.dtype
        self.U, self.S, self.Vh = U.to(dt), S.to(dt), Vh.to(dt)
        self._w_cache = None

    # --------------------------------------------------------------- the singular-value map
    def top_delta(self) -> torch.Tensor:
        """``ReLU(a σ_top + b) − σ_top`` (r,)."""
        s = self.S[: self.rank]
        return F.relu(self.scale * s + self.shift) - s

    def residual_delta(self) -> torch.Tensor:
        """``ReLU(diag(σ_res) + X Y) − diag(σ_res)`` ((k−r)×(k−r))."""
        d = torch.diag(self.S[self.rank:])
        return F.relu(d + self.X @ self.Y) - d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        lin = self.base if isinstance(self.base, nn.Linear) else None  # W' paths need W itself
        if lin is not None and not self.training and not self._needs_grad():
            return F.linear(x, self.cached_weight(), lin.bias)  # eval: the floor's cost
        if lin is not None and self.fast_path and self.weight_path_cheaper(x.numel() // x.shape[-1]):
            return F.linear(x, lin.weight + self.delta_weight(), lin.bias)
        return self.factored_forward(x)

    def factored_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + ((x V) Δ) Uᵀ``: the correction on activations, W' never formed."""
        y = self.base(x)
        r = self.rank
        h = F.linear(x, self.Vh)  # (..., k): coordinates in the right singular basis
        g = h[..., :r] * self.top_delta()
        if self.k > r:
            g = torch.cat([g, h[..., r:] @ self.residual_delta().t()], dim=-1)
        return y + F.linear(g, self.U)

    # --------------------------------------------------------------- cost model and caches
    def step_macs(self, tokens: int) -> tuple[int, int]:
        """Extra multiply-adds of one training step (forward + backward) over the frozen layer:
        ``(factored, weight)`` for ``tokens`` rows of input.

        factored: per token ``k·d_in + (k−r)² + k·d_out`` forward, the same again for the input
        gradient, ``(k−r)²`` for the gradient of the residual block.
        weight: forming ``W + U Δ Vᵀ`` (``k·d_out·d_in + (k−r)²·d_in``) and its backward (×2), plus
        the weight-sized gradient ``tokens·d_out·d_in`` that the frozen layer does not need.
        """
        lin = _inner_linear(self.base)
        d_in, d_out, k, res = lin.in_features, lin.out_features, self.k, self.k - self.rank
        factored = tokens * (2 * k * (d_in + d_out) + 3 * res * res)
        weight = tokens * d_in * d_out + 3 * (k * d_out * d_in + res * res * d_in)
        return factored, weight

    def weight_path_cheaper(self, tokens: int) -> bool:
        factored, weight = self.step_macs(tokens)
        return weight < factored

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self._cache_inputs()
                                               if isinstance(p, nn.Parameter))

    def _cache_inputs(self) -> list[torch.Tensor]:
        lin = _inner_linear(self.base)
        return [self.scale, self.shift, self.X, self.Y, self.U, self.S, self.Vh, lin.weight]

    def _cache_key(self) -> tuple:
        # identity + in-place version counter of every tensor W' depends on: an optimizer step,
        # load_state_dict, copy_ or re-assignment changes the key
        return tuple((id(t), t._version, t.dtype, t.device) for t in self._cache_inputs())

    def cached_weight(self) -> torch.Tensor:
        """``W' = W + U Δ Vᵀ`` for eval, formed once and reused until a parameter changes or
        the module goes back to ``.train()``."""
        key = self._cache_key()
        if self._w_cache is None or self._w_cache[0] != key:
            with torch.no_grad():
                w = _inner_linear(self.base).weight
                self._w_cache = (key, (w + self.delta_weight()).detach())
        return self._w_cache[1]

    def clear_cache(self) -> None:
        self._w_cache = None

    def train(self, mode: bool = True):
        self.clear_cache()  # also on .eval(): the next eval forward forms W' from the current weights
        return super().train(mode)

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = W' − W = U Δ Vᵀ`` (materialises d_out×d_in: merge / inspection only)."""
        r = self.rank
        out = (self.U[:, :r] * self.top_delta()) @ self.Vh[:r]
        if self.k > r:
            out = out + self.U[:, r:] @ self.residual_delta() @ self.Vh[r:]
        return out

    def adapted_weight(self) -> torch.Tensor:
        """``W' = U ReLU(Σ') Vᵀ`` computed as the paper writes it (for tests and inspection)."""
        r = self.rank
        sig = torch.diag(self.S).clone()
        sig[:r, :r] = torch.diag(self.scale * self.S[:r] + self.shift)
        sig[r:, r:] = sig[r:, r:] + self.X @ self.Y
        return self.U @ F.relu(sig) @ self.Vh

    def regulariser(self) -> torch.Tensor:
        """``‖a σ_top + b − σ_top‖₂ + ‖X Y‖_F`` with ``‖XY‖_F² = Σ (XᵀX) ⊙ (Y Yᵀ)`` (r_L×r_L only)."""
        s = self.S[: self.rank]
        top = torch.linalg.vector_norm(self.scale * s + self.shift - s)
        sq = ((self.X.t() @ self.X) * (self.Y @ self.Y.t())).sum()
        # sqrt has an infinite slope at 0 (Y = 0 at init): use 0 there, as torch.norm's backward does
        lora = torch.where(sq > 0, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), torch.zeros_like(sq))
        return top + lora

    def merge_into_base(self) -> None:
        lin = _inner_linear(self.base)
        self._orig = lin.weight.detach().clone()  # exact unmerge
        lin.weight.add_(self.delta_weight().to(lin.weight.dtype))

    def unmerge_from_base(self) -> None:
        _inner_linear(self.base).weight.copy_(self._orig)
        del self._orig


@register_adapter("salt")
class SALT(Adapter):
    """SALT on Linear sites (default ``qkv``, ``o``, ``fc1``, ``fc2`` of every block, as the SAM2 code)."""

    mergeable = True
    paper = "Elsayed et al., SALT: Singular Value Adaptation with Low-Rank Transformation, arXiv 2503.16055"

    def __init__(self, ratio: float = 0.1, rank: int | None = None, r_lora: int = 256,
                 reg_multiplier: float = 0.0, targets: list[str] = ("qkv", "o", "fc1", "fc2"), layers="all",
                 train_norms: bool = False):
        super().__init__()
        # the reference (main.py) also trains every parameter whose name has "norm": the blocks'
        # LayerNorms norm1 / norm2 of the adapted layers here (the decoder's: task.sam.train_decoder=norms)
        self.train_norms = bool(train_norms)
        if rank is None and not 0 < float(ratio) <= 1:
            raise ValueError(f"SALT ratio must be in (0, 1], got {ratio}")
        int_option("salt", "r_lora", r_lora)
        if rank is not None:
            int_option("salt", "rank", rank)
        self.ratio, self.rank, self.r_lora = float(ratio), (None if rank is None else int(rank)), int(r_lora)
        self.reg_multiplier = float(reg_multiplier)
        self.targets, self.layers = list(targets), layers

    def attach(self, backbone) -> None:
        bad = [t for t in self.targets if t not in ("qkv", "o", "fc1", "fc2")]
        if bad:
            raise SiteError(f"SALT attaches to whole Linear sites (qkv, o, fc1, fc2), not {bad}")
        for site in self.sites(self.targets, self.layers):
            self.replace(site, SALTLinear(site.module, self.rank, self.ratio, self.r_lora))

    def mark_trainable(self) -> None:
        super().mark_trainable()
        if self.train_norms:
            for s in self.sites(["norm1", "norm2"], self.layers):
                for p in s.base_module.parameters():
                    p.requires_grad_(True)

    def regulariser(self) -> torch.Tensor:
        """Σ over layers of each layer's R (unweighted)."""
        return sum(m.regulariser() for m in self.modules if isinstance(m, SALTLinear))

    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        if self.reg_multiplier == 0 or self.merged:
            return None
        return self.reg_multiplier * self.regulariser()


def _inner_linear(module: nn.Module) -> nn.Linear:
    return inner_layer(module, nn.Linear, "SALT")
