"""Task heads on top of a backbone's pooled features."""
from __future__ import annotations

import torch
from torch import nn

from zoo.backbones.base import Backbone


class ImageClassifier(nn.Module):
    """``backbone`` + a Linear head on its pooled feature. The head always trains."""

    def __init__(self, backbone: Backbone, num_classes: int, head_init_std: float | None = None):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        if head_init_std is not None:
            nn.init.trunc_normal_(self.head.weight, std=head_init_std)
            nn.init.zeros_(self.head.bias)

    def head_spec(self) -> dict:
        return {"type": "linear", "in_features": self.head.in_features, "num_classes": self.num_classes}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
