"""SAM's image encoder (timm ``samvit_*``) as a zoo backbone.

Tokens stay NHWC and attention is windowed; linear sites act on the last axis, so linear-site
adapters need no special case. Token-site adapters (prompts) are not offered here.
"""
from __future__ import annotations

from typing import Any

import torch

from zoo.backbones.vit import TimmBackbone


class SAMBackbone(TimmBackbone):
    """``forward_features`` gives the neck's feature map (B, 256, H/16, W/16); ``forward`` its mean."""

    family = "sam"
    token_layout = "nhwc"

    def __init__(
        self,
        model: str = "samvit_base_patch16",
        pretrained: bool = True,
        weights: str | None = None,
        img_size: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(model, pretrained, weights, img_size, **kwargs)
        cfg = self.model.pretrained_cfg
        self.data_config = dict(
            input_size=(3, img_size or 1024, img_size or 1024),
            mean=cfg.get("mean", (0.485, 0.456, 0.406)),
            std=cfg.get("std", (0.229, 0.224, 0.225)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x).mean(dim=(2, 3))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)
