"""SAM's image encoder (timm ``samvit_*``) as a zoo backbone.

Tokens stay NHWC and attention is windowed; linear sites act on the last axis, so linear-site
adapters need no special case. Token-site adapters (prompts) are not offered here.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zoo.backbones.base import Backbone
from zoo.backbones.vit import TIMM_SITES, create_timm_model, weights_tag


class SAMBackbone(Backbone):
    """``forward_features`` gives the neck's feature map (B, 256, H/16, W/16); ``forward`` its mean."""

    family = "sam"
    site_map = TIMM_SITES
    fused_qkv = "attn.qkv"
    patch_embed_path = "model.patch_embed.proj"
    token_layout = "nhwc"

    def __init__(
        self,
        model: str = "samvit_base_patch16",
        pretrained: bool = True,
        weights: str | None = None,
        img_size: int | None = None,
        **kwargs: Any,
    ):
        build = dict(kwargs)
        if img_size is not None:
            build["img_size"] = img_size
        net = create_timm_model(model, pretrained, weights, **build)
        super().__init__(net, model, weights_tag(model, pretrained, weights), build)
        self.feature_dim = net.num_features
        self.data_config = dict(
            input_size=(3, img_size or 1024, img_size or 1024),
            mean=net.pretrained_cfg.get("mean", (0.485, 0.456, 0.406)),
            std=net.pretrained_cfg.get("std", (0.229, 0.224, 0.225)),
        )

    def blocks_container(self) -> nn.Module:
        return self.model.blocks

    def blocks_path(self) -> str:
        return "model.blocks"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x).mean(dim=(2, 3))
