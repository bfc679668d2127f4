"""open_clip's visual tower as a zoo backbone.

open_clip blocks use ``nn.MultiheadAttention``, which reads ``in_proj_weight`` directly, so a
wrapper on a Linear would never be called. :class:`ExplicitMultiheadAttention` replaces it with
the same computation through explicit ``in_proj`` / ``out_proj`` Linears (tested to give
identical outputs), and keeps nn.MultiheadAttention's state-dict names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.backbones.base import Backbone
from zoo.backbones.weights import hub_errors, load_state_dict_file


class ExplicitMultiheadAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` (batch-first or not) with explicit projections."""

    def __init__(self, embed_dim: int, num_heads: int, batch_first: bool = True, bias: bool = True):
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.head_dim = embed_dim // num_heads
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        # nn.MultiheadAttention's names on disk: in_proj_weight / in_proj_bias
        self._register_state_dict_hook(_to_mha_names)
        self._register_load_state_dict_pre_hook(_from_mha_names)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "ExplicitMultiheadAttention":
        if not mha._qkv_same_embed_dim:
            raise ValueError("nn.MultiheadAttention with separate kdim/vdim is not supported")
        new = cls(mha.embed_dim, mha.num_heads, mha.batch_first, bias=mha.in_proj_bias is not None)
        new = new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            new.in_proj.weight.copy_(mha.in_proj_weight)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                new.in_proj.bias.copy_(mha.in_proj_bias)
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=False, attn_mask=None, **_):
        if not self.batch_first:
            query = query.transpose(0, 1)
            key = key.transpose(0, 1) if key is not None else None
            value = value.transpose(0, 1) if value is not None else None
        d = self.embed_dim
        if (key is None or key is query) and (value is None or value is query):
            q, k, v = self.in_proj(query).split(d, dim=-1)
        else:  # cross-attention: same projection, rows picked per input (adapters still apply)
            q = self.in_proj(query)[..., :d]
            k = self.in_proj(key)[..., d : 2 * d]
            v = self.in_proj(value)[..., 2 * d :]
        q, k, v = (rearrange(t, "b n (h e) -> b h n e", h=self.num_heads) for t in (q, k, v))
        mask = _sdpa_mask(attn_mask, key_padding_mask, q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = self.out_proj(rearrange(x, "b h n e -> b n (h e)"))
        if not self.batch_first:
            x = x.transpose(0, 1)
        return x, None


def _sdpa_mask(attn_mask, key_padding_mask, dtype):
    """nn.MultiheadAttention masks (bool True = blocked, or additive float) as one additive mask."""
    mask = None
    if attn_mask is not None:
        mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn_mask.to(dtype)
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :]
        kpm = torch.zeros_like(kpm, dtype=dtype).masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else kpm.to(dtype)
        mask = kpm if mask is None else mask + kpm
    return mask


def _to_mha_names(module, state_dict, prefix, local_metadata):
    for name in ("weight", "bias"):
        k = f"{prefix}in_proj.{name}"
        if k in state_dict:
            state_dict[f"{prefix}in_proj_{name}"] = state_dict.pop(k)
    return state_dict


def _from_mha_names(state_dict, prefix, *args, **kwargs):
    for name in ("weight", "bias"):
        k = f"{prefix}in_proj_{name}"
        if k in state_dict:
            state_dict[f"{prefix}in_proj.{name}"] = state_dict.pop(k)


def replace_multihead_attention(module: nn.Module) -> int:
    """Swap every ``nn.MultiheadAttention`` under ``module`` for the explicit equivalent."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            setattr(module, name, ExplicitMultiheadAttention.from_mha(child))
            n += 1
        else:
            n += replace_multihead_attention(child)
    return n


class CLIPBackbone(Backbone):
    """open_clip ``model.visual``; ``forward(x)`` gives the projected image embedding."""

    family = "clip"
    site_map = {
        "o": "attn.out_proj",
        "fc1": "mlp.c_fc",
        "fc2": "mlp.c_proj",
        "attn": "attn",
        "mlp": "mlp",
        "norm1": "ln_1",
        "norm2": "ln_2",
    }
    fused_qkv = "attn.in_proj"
    patch_embed_path = "model.conv1"
    token_layout = "nld"

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = "openai", weights: str | None = None, **kwargs: Any):
        import open_clip

        if model not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model!r}; see open_clip.list_models()")
        if pretrained and not weights:
            hint = (
                "Use a local checkpoint with backbone.weights=/path/to/open_clip_model.safetensors, "
                "or random weights with backbone.pretrained=null."
            )
            with hub_errors(f"open_clip {model}/{pretrained}", hint):
                clip = open_clip.create_model(model, pretrained=pretrained, **kwargs)
        else:
            clip = open_clip.create_model(model, pretrained=None, **kwargs)
            if weights:
                sd = load_state_dict_file(weights)
                clip.load_state_dict(sd if any(k.startswith("visual.") for k in sd) else {f"visual.{k}": v for k, v in sd.items()}, strict=False)
        visual = clip.visual
        if not hasattr(visual, "transformer"):
            raise ValueError(f"{model}: only ViT visual towers are supported (got {type(visual).__name__})")
        replace_multihead_attention(visual)
        tag = f"file:{Path(weights).name}" if weights else (pretrained or None)
        super().__init__(visual, model, tag, dict(kwargs))
        self.feature_dim = visual.output_dim
        self.num_prefix_tokens = 1
        self.patch_size = visual.conv1.kernel_size[0]
        size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        self.data_config = dict(
            input_size=(3, size, size),
            mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        )
        if not visual.transformer.batch_first:
            raise ValueError("open_clip towers that are not batch-first are not supported")

    def blocks_container(self) -> nn.Module:
        return self.model.transformer.resblocks

    def blocks_path(self) -> str:
        return "model.transformer.resblocks"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        v = self.model
        return v.ln_post(v.transformer(v._embeds(x))) if hasattr(v, "_embeds") else v(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
