"""Bottleneck adapters in three placements, one registry name ``adapter`` with ``style``:

* ``houlsby`` — Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019:
  a sequential bottleneck after the attention output and after the MLP, inside the residual:
  ``h <- h + U σ(D h)``.
* ``pfeiffer`` — Pfeiffer et al., "AdapterFusion", EACL 2021: one sequential bottleneck after
  the MLP only.
* ``adaptformer`` — Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable Visual
  Recognition", NeurIPS 2022: parallel to the MLP, scaled,
  ``x <- x + MLP(LN(x)) + s · U ReLU(D x)`` with s = 0.1; as in the reference code the adapter
  reads the block's residual stream ``x`` (before the MLP's LayerNorm; ``adapter_input=mlp``
  reads the normalised input instead).

``train_norms=True`` also trains the LayerNorms (``norm1``, ``norm2``) of the adapted blocks, as
Houlsby et al. do ("we also train the layer normalization parameters"); the default ``False``
trains only the adapters (a deviation from the paper for ``houlsby``, kept so the three styles
compare at equal budgets; ``experiment=houlsby_vtab`` uses the paper's setting).

``placement`` (PETL-AST: Cappellazzo et al., "Parameter-Efficient Transfer Learning of Audio
Spectrogram Transformers", IEEE MLSP 2024, arXiv 2312.03694) crosses the Pfeiffer (MLP only) /
Houlsby (attention and MLP) insertion with ``sequential`` (the adapter reads the sub-block's output:
``out = h + F + A(F)``, PETL-AST's sequential-with-residual) or ``parallel`` (the adapter reads the
sub-block's normalised input: ``out = h + F(LN(h)) + A(LN(h))``, PETL-AST's parallel without
residual, its recommended setting). ``reduction_rate`` RR sets ``bottleneck = round(d / RR)``.
PETL-AST's code zero-initialises *both* projections (the adapter then degenerates to a learned bias);
here only the up-projection is zero, as its paper intends.

Up-projections start at zero so the model is exactly unchanged at init (``init=houlsby`` draws
both projections from N(0, 1e-2) for the paper's near-identity start instead). Not mergeable:
the bottleneck is non-linear.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, AdapterModule, WrappedLayer, dropout_option, float_option, int_option

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Bottleneck(AdapterModule):
    """``x -> [LN] -> down -> act -> dropout -> up -> · scale``."""

    def __init__(self, dim: int, bottleneck: int, act: str = "relu", scale: float = 1.0,
                 dropout: float = 0.0, layernorm: bool = False, init: str = "lora"):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if layernorm else nn.Identity()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTS[act]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        if init == "houlsby":
            for lin in (self.down, self.up):
                nn.init.trunc_normal_(lin.weight, std=1e-2, a=-2e-2, b=2e-2)
                nn.init.zeros_(lin.bias)
        else:  # AdaptFormer's "lora" init: Kaiming-uniform down, zero up -> exact identity at init
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(self.norm(x))))) * self.scale


class SequentialAdapter(WrappedLayer):
    """``h = base(...)``; returns ``h + adapter(h)`` (tuple outputs: on the first element)."""

    def __init__(self, base: nn.Module, adapter: Bottleneck):
        super().__init__(base)
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        if isinstance(out, tuple):  # nn.MultiheadAttention-style (out, weights)
            return (out[0] + self.adapter(out[0]),) + tuple(out[1:])
        return out + self.adapter(out)


class InputTap(WrappedLayer):
    """Identity wrapper that remembers its input (the block's residual stream before a LayerNorm)."""

    def forward(self, x, *args, **kwargs):
        self.last_input = x
        return self.base(x, *args, **kwargs)


class ParallelAdapter(WrappedLayer):
    """``base(x) + adapter(z)`` where z is ``x`` or, with a tap, the input of the preceding norm."""

    def __init__(self, base: nn.Module, adapter: Bottleneck, tap: InputTap | None = None):
        super().__init__(base)
        self.adapter = adapter
        self.__dict__["tap"] = tap  # a reference, not a child: the tap sits at its own site

    def forward(self, x, *args, **kwargs):
        z = self.tap.last_input if self.tap is not None else x
        if self.tap is not None:
            self.tap.last_input = None  # do not keep activations alive between forwards
        return self.base(x, *args, **kwargs) + self.adapter(z).reshape(x.shape)


def site_dim(module: nn.Module) -> int:
    """Feature width at a sub-block site (the input of its first Linear / the norm's size)."""
    from zoo.sites import unwrap

    module = unwrap(module)
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0]
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise ValueError(f"cannot infer the width of {type(module).__name__}")


@register_adapter("adapter")
class BottleneckAdapter(Adapter):
    """Houlsby / Pfeiffer / AdaptFormer bottleneck adapters (``style``)."""

    paper = "Houlsby et al. ICML 2019; Pfeiffer et al. EACL 2021; Chen et al. NeurIPS 2022 (AdaptFormer)"
    STYLES = ("houlsby", "pfeiffer", "adaptformer")
    PLACEMENTS = ("sequential", "parallel")

    def __init__(self, style: str = "houlsby", bottleneck: int = 8, act: str | None = None,
                 scale: float | None = None, dropout: float = 0.0, layernorm: bool = False,
                 init: str | None = None, adapter_input: str = "block", layers="all", train_norms: bool = False,
                 placement: str | None = None, reduction_rate: float | None = None):
        super().__init__()
        self.train_norms = bool(train_norms)
        if style not in self.STYLES:
            raise ValueError(f"unknown adapter style {style!r}; valid styles: {', '.join(self.STYLES)}")
        if placement is not None and placement not in self.PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; valid: {', '.join(self.PLACEMENTS)}")
        if style == "adaptformer" and placement == "sequential":
            raise ValueError("style=adaptformer is parallel by definition; use style=pfeiffer placement=sequential")
        if reduction_rate is not None and float(reduction_rate) <= 0:
            raise ValueError(f"reduction_rate must be > 0 (bottleneck = round(d / RR)), got {reduction_rate}")
        self.placement = placement or ("parallel" if style == "adaptformer" else "sequential")
        self.reduction_rate = None if reduction_rate is None else float(reduction_rate)
        if adapter_input not in ("block", "mlp"):
            raise ValueError("adapter_input must be 'block' (residual stream, as AdaptFormer) or 'mlp'")
        self.style, self.bottleneck, self.layers = style, int_option("adapter", "bottleneck", bottleneck), layers
        if scale is not None:
            float_option("adapter", "scale", scale)
        dropout_option("adapter", dropout)
        self.act = act or ("relu" if style == "adaptformer" else "gelu")
        self.scale = float(scale if scale is not None else (0.1 if style == "adaptformer" else 1.0))
        self.dropout, self.layernorm, self.adapter_input = float(dropout), bool(layernorm), adapter_input
        self.init = init or ("lora" if style == "adaptformer" else "lora")
        if self.init not in ("lora", "houlsby"):
            raise ValueError("init must be 'lora' (zero up-projection) or 'houlsby' (N(0, 1e-2))")

    def mark_trainable(self) -> None:
        super().mark_trainable()
        if self.train_norms:  # Houlsby et al.: the LayerNorms of the adapted blocks train too
            for s in self.sites(["norm1", "norm2"], self.layers):
                for p in s.base_module.parameters():
                    p.requires_grad_(True)

    def inner_dim(self, dim: int) -> int:
        """``round(d / RR)`` with a reduction rate (at least 1), else ``bottleneck``."""
        return self.bottleneck if self.reduction_rate is None else max(1, round(dim / self.reduction_rate))

    def make_module(self, dim: int) -> nn.Module:
        """The adapter function A (subclasses swap in another one, e.g. the Conformer adapter)."""
        return Bottleneck(dim, self.inner_dim(dim), self.act, self.scale, self.dropout, self.layernorm, self.init)

    def _bottleneck(self, dim: int, like: nn.Module) -> nn.Module:
        p = next(like.parameters())
        return self.make_module(dim).to(p.device, p.dtype)

    def attach(self, backbone) -> None:
        if self.style != "adaptformer" and self.placement == "parallel":
            # PETL-AST parallel: A reads the sub-block's own (normalised) input
            kinds = ["attn", "mlp"] if self.style == "houlsby" else ["mlp"]
            for site in self.sites(kinds, self.layers):
                dim = site_dim(site.module) if site.kind == "mlp" else _attn_out_dim(site.base_module)
                self.replace(site, ParallelAdapter(site.module, self._bottleneck(dim, site.base_module)))
            return
        if self.style == "adaptformer":
            mlps = self.sites("mlp", self.layers)
            norms = self.sites("norm2", self.layers) if self.adapter_input == "block" else [None] * len(mlps)
            for mlp, norm in zip(mlps, norms):
                tap = self.replace(norm, InputTap(norm.module)) if norm is not None else None
                self.replace(mlp, ParallelAdapter(mlp.module, self._bottleneck(site_dim(mlp.module), mlp.base_module), tap))
            return
        kinds = ["attn", "mlp"] if self.style == "houlsby" else ["mlp"]
        for site in self.sites(kinds, self.layers):
            dim = site_dim(site.module) if site.kind == "mlp" else _attn_out_dim(site.base_module)
            self.replace(site, SequentialAdapter(site.module, self._bottleneck(dim, site.base_module)))


def _attn_out_dim(attn: nn.Module) -> int:
    for name in ("proj", "out_proj", "o_proj"):
        m = getattr(attn, name, None)
        if isinstance(m, nn.Module):
            from zoo.sites import unwrap

            return unwrap(m).out_features
    return site_dim(attn)
