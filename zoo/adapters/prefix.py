"""Prefix tuning on self-attention.

Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021; used on AST by
PETL-AST (Cappellazzo et al., IEEE MLSP 2024, arXiv 2312.03694; 24 prefix tokens).

Every adapted attention layer gets ``num_tokens`` learnable key and value vectors
``P_k, P_v ∈ R^{n×d}`` (split into heads like k and v) that every query also attends to:

    Attn(Q, [P_k; K], [P_v; V]) = softmax(Q [P_k; K]^T / √d_h) [P_v; V],

so the sequence length is unchanged. Reconstruction choices (PETL-AST's prefix code was not read in
detail): the prefixes are learned directly (no reparameterisation MLP, ``P-tuning v2`` style) and
initialised uniformly in ±sqrt(6 / (3·patch² + d)) like VPT prompts. Works on timm ``Attention``
(ViT, DeiT, AST); other attention modules are refused by name. Not mergeable.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, WrappedLayer
from zoo.sites import SiteError, unwrap


class PrefixAttention(WrappedLayer):
    """timm ``Attention`` with learnable key/value prefixes (the wrapped layer's weights are reused)."""

    def __init__(self, base: nn.Module, num_tokens: int, bound: float):
        super().__init__(base)
        attn = unwrap(base)
        d = attn.num_heads * attn.head_dim
        p = next(attn.parameters())
        self.prefix_k = nn.Parameter(torch.empty(num_tokens, d, device=p.device, dtype=p.dtype).uniform_(-bound, bound))
        self.prefix_v = nn.Parameter(torch.empty(num_tokens, d, device=p.device, dtype=p.dtype).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("prefix tuning does not support attention masks")
        a = unwrap(self.base)
        B, N, _ = x.shape
        h, dh = a.num_heads, a.head_dim
        qkv = a.qkv(x).reshape(B, N, 3, h, dh).permute(2, 0, 3, 1, 4)  # a.qkv may carry other adapters
        q, k, v = qkv.unbind(0)
        pk = self.prefix_k.reshape(1, -1, h, dh).transpose(1, 2).expand(B, -1, -1, -1).to(k.dtype)
        pv = self.prefix_v.reshape(1, -1, h, dh).transpose(1, 2).expand(B, -1, -1, -1).to(v.dtype)
        q, k = a.q_norm(q), a.k_norm(torch.cat([pk, k], dim=2))
        v = torch.cat([pv, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if self.training else 0.0)
        out = a.norm(out.transpose(1, 2).reshape(B, N, h * dh))
        if getattr(a, "gate", None) is not None:
            out = out * a.gate(x).sigmoid()
        return a.proj_drop(a.proj(out))


@register_adapter("prefix")
class PrefixTuning(Adapter):
    """Key/value prefixes on the attention of ``layers`` (PETL-AST default: 24 tokens, every layer)."""

    paper = "Li & Liang, Prefix-Tuning, ACL 2021; Cappellazzo et al., PETL-AST, IEEE MLSP 2024"

    def __init__(self, num_tokens: int = 24, layers="all"):
        super().__init__()
        if int(num_tokens) < 1:
            raise ValueError(f"prefix tuning needs num_tokens >= 1, got {num_tokens}")
        self.num_tokens, self.layers = int(num_tokens), layers

    def attach(self, backbone) -> None:
        sites = self.sites("attn", self.layers)
        for s in sites:
            a = s.base_module
            if not all(hasattr(a, n) for n in ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "proj")) \
                    or backbone.token_layout != "nld":
                raise SiteError(
                    f"prefix tuning needs timm ViT attention with a fused qkv on [B, N, d] tokens; backbone "
                    f"{backbone.family!r} has {type(a).__name__} with {backbone.token_layout} tokens")
        patch = getattr(backbone, "patch_size", 16)
        bound = math.sqrt(6.0 / float(3 * patch * patch + backbone.feature_dim))
        for s in sites:
            if isinstance(s.module, WrappedLayer):
                raise SiteError("prefix tuning replaces the attention computation; attach it before adapters that wrap 'attn'")
            self.replace(s, PrefixAttention(s.module, self.num_tokens, bound))
