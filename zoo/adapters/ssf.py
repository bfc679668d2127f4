"""SSF: Scaling & Shifting your Features (Lian et al., "Scaling & Shifting Your Features: A New
Baseline for Efficient Model Tuning", NeurIPS 2022).

After each chosen operation ``y = op(x)``:  ``y' = γ ⊙ y + β``  (γ, β ∈ R^{d_out}).

Mergeable: for a Linear, ``W' = diag(γ) W``, ``b' = γ ⊙ b + β``; for a LayerNorm the affine
weight and bias fold the same way. The reference code initialises γ ~ N(1, 0.02) and
β ~ N(0, 0.02) (``init=paper``, not exactly identity at init); ``init=identity`` starts at γ=1,
β=0. The reference also scales after the patch embedding and the final norm; we cover the
block sites (qkv, o, fc1, fc2, norm1, norm2 by default).
"""
from __future__ import annotations

import torch
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

    def forward(self, x, *args, **kwargs):
        y = self.base(x, *args, **kwargs)
        return y if self.merged else y * self.scale + self.shift

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
