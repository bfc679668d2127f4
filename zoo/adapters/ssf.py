"""SSF: Scaling & Shifting your Features (Lian et al., "Scaling & Shifting Your Features: A New
Baseline for Efficient Model Tuning", NeurIPS 2022).

After each chosen operation ``y = op(x)``:  ``y' = γ ⊙ y + β``  (γ, β ∈ R^{d_out}).

Mergeable: for a Linear, ``W' = diag(γ) W``, ``b' = γ ⊙ b + β``; for a LayerNorm the affine
weight and bias fold the same way. The reference code initialises γ ~ N(1, 0.02) and
β ~ N(0, 0.02) (``init=paper``, not exactly identity at init); ``init=identity`` starts at γ=1,
β=0. The reference also scales after the patch embedding and the final norm; we cover the
block sites (qkv, o, fc1, fc2, norm1, norm2 by default).

Training cost: SSF adds no matmul, only elementwise passes over every adapted layer's output
(the FLOP counter does not count them). Two fast paths keep those passes few, each equal to the
composition ``y * γ + β`` (forward and gradients, ``tests/test_fast_paths.py``):

* after a plain ``nn.LayerNorm``: ``γ ⊙ (x̂ w + b) + β = x̂ (γ ⊙ w) + (γ ⊙ b + β)``, so the LayerNorm
  runs with the folded affine and its own backward kernel forms the gradients of ``γ ⊙ w`` and
  ``γ ⊙ b + β`` (``Σ g x̂`` and ``Σ g``) in its pass: no extra pass over the activations;
* after any other layer (the Linears): one autograd op, forward ``addcmul(β, y, γ)`` (one pass
  instead of a multiply and an add), backward ``dy = g γ``, ``dγ = Σ g ⊙ y``, ``dβ = Σ g``.

Folding γ into a Linear's weight instead would need ``Σ_t g_t ⊙ y_t`` from ``gᵀ x``, a weight-gradient
GEMM the frozen floor does not pay, so the Linear sites keep the elementwise op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, WrappedLayer
from zoo.sites import SiteError, unwrap


class ScaleShift(WrappedLayer):
    def __init__(self, base: nn.Module, dim: int, init: str = "paper"):
        super().__init__(base)
        ref = next(unwrap(base).parameters())
        self.scale = nn.Parameter(torch.ones(dim, device=ref.device, dtype=ref.dtype))
        self.shift = nn.Parameter(torch.zeros(dim, device=ref.device, dtype=ref.dtype))
        if init == "paper":
            nn.init.normal_(self.scale, mean=1.0, std=0.02)
            nn.init.normal_(self.shift, std=0.02)
        self.fused = True  # the fast paths of the module docstring (False: the composition)

    def forward(self, x, *args, **kwargs):
        if self.merged:
            return self.base(x, *args, **kwargs)
        fast = self.fused and not torch.is_autocast_enabled(x.device.type) and x.dtype == self.scale.dtype
        if fast and not args and not kwargs and _plain_layer_norm(self.base):
            ln = self.base
            w = self.scale if ln.weight is None else ln.weight * self.scale
            b = self.shift if ln.bias is None else torch.addcmul(self.shift, ln.bias, self.scale)
            return F.layer_norm(x, ln.normalized_shape, w, b, ln.eps)
        y = self.base(x, *args, **kwargs)
        if fast and y.dtype == self.scale.dtype:
            return _ScaleShiftOp.apply(y, self.scale, self.shift)
        return y * self.scale + self.shift

    def merge_into_base(self) -> None:
        m = unwrap(self.base)
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros_like(self.shift), requires_grad=False)
            self._added_bias = True
        self._orig = (m.weight.detach().clone(), m.bias.detach().clone())  # exact unmerge
        w = m.weight
        w.mul_(self.scale.view(-1, *([1] * (w.ndim - 1))))
        m.bias.mul_(self.scale).add_(self.shift)

    def unmerge_from_base(self) -> None:
        m = unwrap(self.base)
        m.weight.copy_(self._orig[0])
        m.bias.copy_(self._orig[1])
        if getattr(self, "_added_bias", False):
            m.bias = None
            self._added_bias = False
        del self._orig


def _plain_layer_norm(m: nn.Module) -> bool:
    """An ``nn.LayerNorm`` (or a subclass keeping its forward) without hooks: its affine can be folded."""
    return (isinstance(m, nn.LayerNorm) and type(m).forward is nn.LayerNorm.forward
            and not m._forward_hooks and not m._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks)


class _ScaleShiftOp(torch.autograd.Function):
    """``y γ + β`` (γ, β over the last dim) with one forward pass and the reductions of the docstring."""

    @staticmethod
    def forward(ctx, y, scale, shift):
        ctx.save_for_backward(y if ctx.needs_input_grad[1] else None, scale)
        return torch.addcmul(shift, y, scale)

    @staticmethod
    def backward(ctx, g):
        y, scale = ctx.saved_tensors
        gy = gs = gb = None
        if ctx.needs_input_grad[0]:
            gy = g * scale
        if ctx.needs_input_grad[1]:
            gs = (g * y).reshape(-1, g.shape[-1]).sum(0)
        if ctx.needs_input_grad[2]:
            gb = g.reshape(-1, g.shape[-1]).sum(0)
        return gy, gs, gb


def out_dim(module: nn.Module) -> int:
    m = unwrap(module)
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.LayerNorm):
        return m.normalized_shape[0]
    raise SiteError(f"SSF acts on Linear and LayerNorm sites, not {type(m).__name__}")


@register_adapter("ssf")
class SSF(Adapter):
    mergeable = True
    paper = "Lian et al., SSF, NeurIPS 2022"

    def __init__(self, targets: list[str] = ("qkv", "o", "fc1", "fc2", "norm1", "norm2"),
                 layers="all", init: str = "paper"):
        super().__init__()
        if init not in ("paper", "identity"):
            raise ValueError("init must be 'paper' (γ~N(1,.02), β~N(0,.02)) or 'identity'")
        self.targets, self.layers, self.init = list(targets), layers, init

    def attach(self, backbone) -> None:
        for s in self.sites(self.targets, self.layers):
            if s.out_slice is not None:
                raise SiteError("SSF scales whole layers; use 'qkv' rather than q/k/v slices")
            self.replace(s, ScaleShift(s.module, out_dim(s.module), self.init))
