"""Task heads on top of a backbone, and how an artifact's ``head`` record rebuilds them.

Every head is an ``nn.Module`` holding ``self.backbone`` (a :class:`~zoo.Backbone`) and the head's
own layers, with

* ``head_spec()`` -> a JSON dict with ``"type"`` (a name registered here) and what the head needs
  to be rebuilt; the adapter artifact records it as ``head``, and
* ``from_spec(backbone, spec)`` (classmethod) -> the same head around ``backbone``.

:func:`build_head_model` is the one way a ``head`` record becomes a model (``zoo.from_zoo``,
``eval.py``): a task kind that brings a new head registers it with :func:`register_head`, in a
module that :data:`HEAD_MODULES` names (so ``from_zoo`` finds it without importing Lightning).
"""
from __future__ import annotations

import importlib
from typing import Any, Sequence

import torch
from torch import nn

from zoo.backbones.base import Backbone
from zoo.registry import Registry

HEADS: Registry = Registry("head type")

# modules (plain PyTorch) that register more head types; imported on first lookup
HEAD_MODULES: list[str] = ["zoo.zeroshot", "zoo.backbones.sam_decoder", "zoo.heads.smp", "zoo.backbones.coca"]


def register_head(name: str):
    """Class decorator: ``@register_head("linear")`` on a head with ``head_spec`` / ``from_spec``."""
    return HEADS.register(name)


def _load_head_modules() -> None:
    for mod in HEAD_MODULES:
        importlib.import_module(mod)


def head_class(name: str):
    if name not in HEADS:
        _load_head_modules()
    return HEADS.get(name)


def build_head_model(backbone: Backbone, spec: dict[str, Any] | None) -> nn.Module:
    """``backbone`` inside the head an artifact's ``head`` record describes (``None``: no head)."""
    if spec is None:
        return backbone
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"a head record needs a 'type'; got {spec!r}")
    return head_class(spec["type"]).from_spec(backbone, spec)


@register_head("linear")
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

    @classmethod
    def from_spec(cls, backbone: Backbone, spec: dict) -> "ImageClassifier":
        return cls(backbone, int(spec["num_classes"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@register_head("linear_per_task")
class MultiHeadClassifier(nn.Module):
    """``backbone`` + one Linear head per task; ``forward(x, task_ids)`` returns per-sample logits.

    Tasks have different numbers of classes, so logits are padded with ``-inf`` to the largest
    head (cross-entropy and argmax then only see the sample's own classes).
    """

    def __init__(self, backbone: Backbone, num_classes: Sequence[int]):
        super().__init__()
        self.backbone = backbone
        self.num_classes = [int(c) for c in num_classes]
        self.head = nn.ModuleList(nn.Linear(backbone.feature_dim, c) for c in self.num_classes)

    def head_spec(self) -> dict:
        return {"type": "linear_per_task", "in_features": self.backbone.feature_dim, "num_classes": self.num_classes}

    @classmethod
    def from_spec(cls, backbone: Backbone, spec: dict) -> "MultiHeadClassifier":
        return cls(backbone, spec["num_classes"])

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        from zoo.api import set_task

        set_task(self, task_ids)
        feats = self.backbone(x)
        out = feats.new_full((x.shape[0], max(self.num_classes)), float("-inf"))
        for t in task_ids.unique().tolist():
            rows = task_ids == t
            out[rows, : self.num_classes[t]] = self.head[t](feats[rows])
        return out


@register_head("dense_linear")
class DenseRegressor(nn.Module):
    """A light dense decoder: a 1×1 convolution on the backbone's feature map to ``out_channels × s²``
    values per cell, then ``PixelShuffle(s)`` back to the input resolution (``s`` = the backbone's
    stride, its patch size for a ViT), as MAE's per-patch linear decoder. The head always trains.

    ``forward(x)`` -> ``(B, out_channels, H, W)`` for an input ``(B, C, H, W)``.
    """

    def __init__(self, backbone: Backbone, out_channels: int = 1, upsample: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.out_channels = int(out_channels)
        self.upsample = int(upsample or backbone.feature_stride)
        self.head = nn.Sequential(
            nn.Conv2d(backbone.feature_dim, self.out_channels * self.upsample ** 2, kernel_size=1),
            nn.PixelShuffle(self.upsample),
        )

    def head_spec(self) -> dict:
        return {"type": "dense_linear", "in_features": self.backbone.feature_dim, "out_channels": self.out_channels,
                "upsample": self.upsample}

    @classmethod
    def from_spec(cls, backbone: Backbone, spec: dict) -> "DenseRegressor":
        return cls(backbone, int(spec["out_channels"]), int(spec["upsample"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.feature_map(x))


@register_head("backbone_output")
class BackboneOutput(nn.Module):
    """No layers of its own: the backbone's output is the prediction (MORPH's next frame comes from
    its own decoder, a part of the pretrained backbone). The PDE task (``task=pde``) uses it."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def head_spec(self) -> dict:
        return {"type": "backbone_output"}

    @classmethod
    def from_spec(cls, backbone: Backbone, spec: dict) -> "BackboneOutput":
        return cls(backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)
