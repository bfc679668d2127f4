"""VPT: Visual Prompt Tuning (Jia et al., "Visual Prompt Tuning", ECCV 2022).

``num_tokens`` learnable prompts are inserted after the prefix (class) tokens:

* ``shallow``: prompts P ∈ R^{p×d} enter the first block only and travel through every block;
  they are dropped after the last block, so pooling sees the usual tokens.
* ``deep``: each block i gets its own prompts P_i; the prompt outputs of block i are discarded
  and replaced by P_{i+1} (the paper's Eq. for VPT-deep).

Prompts are initialised uniformly in ±sqrt(6 / (3·patch² + d)) (the paper's Xavier-uniform over
the patch-embedding fan), with optional prompt dropout. Not mergeable.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, WrappedLayer
from zoo.sites import SiteError


class PromptedBlock(WrappedLayer):
    """Wraps block i: optionally inserts prompts before it and/or removes them after it."""

    def __init__(self, base: nn.Module, prompt: nn.Parameter | None, num_tokens: int, prefix: int,
                 remove: bool, dropout: float = 0.0):
        super().__init__(base)
        self.prompt = prompt
        self.num_tokens, self.prefix, self.remove = num_tokens, prefix, remove
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.prompt is not None:  # insert (deep blocks first drop the previous block's prompts)
            p = self.dropout(self.prompt).unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([x[:, : self.prefix], p, x[:, self.prefix:]], dim=1)
        x = self.base(x, *args, **kwargs)
        if self.remove:
            x = torch.cat([x[:, : self.prefix], x[:, self.prefix + self.num_tokens:]], dim=1)
        return x


@register_adapter("vpt")
class VPT(Adapter):
    """Visual prompt tuning, ``mode`` = deep | shallow."""

    paper = "Jia et al., Visual Prompt Tuning, ECCV 2022"

    def __init__(self, mode: str = "deep", num_tokens: int = 10, dropout: float = 0.0, layers="all"):
        super().__init__()
        if mode not in ("deep", "shallow"):
            raise ValueError(f"unknown VPT mode {mode!r}; valid modes: deep, shallow")
        self.mode, self.num_tokens, self.dropout, self.layers = mode, int(num_tokens), float(dropout), layers

    def attach(self, backbone) -> None:
        if backbone.token_layout != "nld":
            raise SiteError(f"backbone {backbone.family!r} has no site 'tokens' (its tokens are {backbone.token_layout}); VPT needs it")
        sites = self.sites("tokens", self.layers)
        dim = getattr(backbone, "token_dim", None) or (backbone.feature_dim if backbone.family != "clip" else backbone.model.transformer.width)
        patch = getattr(backbone, "patch_size", 16)
        bound = math.sqrt(6.0 / float(3 * patch * patch + dim))
        ref = next(backbone.parameters())

        def new_prompt():
            p = nn.Parameter(torch.empty(self.num_tokens, dim, device=ref.device, dtype=ref.dtype))
            nn.init.uniform_(p, -bound, bound)
            return p

        pre = backbone.num_prefix_tokens
        if self.mode == "deep":
            for s in sites:
                self.replace(s, PromptedBlock(s.module, new_prompt(), self.num_tokens, pre, True, self.dropout))
        else:
            first, last = sites[0], sites[-1]
            if first is last:
                self.replace(first, PromptedBlock(first.module, new_prompt(), self.num_tokens, pre, True, self.dropout))
            else:
                self.replace(first, PromptedBlock(first.module, new_prompt(), self.num_tokens, pre, False, self.dropout))
                self.replace(last, PromptedBlock(last.module, None, self.num_tokens, pre, True))
