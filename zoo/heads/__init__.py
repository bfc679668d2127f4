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


@register_head("layernorm_linear")
class LayerNormLinearClassifier(nn.Module):
    """``backbone`` + AST's classifier head: a LayerNorm then a Linear on the pooled feature.

    Gong et al., "AST: Audio Spectrogram Transformer", Interspeech 2021 (``YuanGongND/ast``,
    ``src/models/ast_models.py``: ``mlp_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, label_dim))``
    on ``(x[:, 0] + x[:, 1]) / 2``, the mean of the CLS and DIST tokens after the encoder's final norm)::

        logits = W · (γ ⊙ (h − μ(h)) / √(σ²(h) + ε) + β) + b          h: the pooled feature (d)

    with ``μ``, ``σ²`` the mean and (biased) variance over the d features. Initialised as the reference,
    which keeps PyTorch's defaults (it never re-initialises ``mlp_head``, also not when it replaces the
    AudioSet head for a new label set): γ = 1, β = 0, ε = 1e-5 (``nn.LayerNorm``'s default; HF's
    ``ASTMLPHead`` uses the config's 1e-12 instead), ``nn.Linear``'s uniform init. ``head`` is that
    ``nn.Sequential`` (``head.0`` the LayerNorm, ``head.1`` the Linear: the reference's ``mlp_head.0`` /
    ``mlp_head.1``); 2·d + d·C + C parameters, all of which always train (it is the head).
    """

    def __init__(self, backbone: Backbone, num_classes: int, eps: float = 1e-5):
        super().__init__()
        eps = float(eps)
        if not (eps > 0 and eps < float("inf")):
            raise ValueError(f"the layernorm_linear head's eps must be a positive number, got {eps!r}")
        self.backbone = backbone
        self.num_classes = num_classes
        d = backbone.feature_dim
        self.head = nn.Sequential(nn.LayerNorm(d, eps=eps), nn.Linear(d, num_classes))

    def head_spec(self) -> dict:
        return {"type": "layernorm_linear", "in_features": self.head[1].in_features, "num_classes": self.num_classes,
                "eps": self.head[0].eps}

    @classmethod
    def from_spec(cls, backbone: Backbone, spec: dict) -> "LayerNormLinearClassifier":
        eps = spec["eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise ValueError(f"head record: eps must be a number, got {eps!r}")
        return cls(backbone, int(spec["num_classes"]), eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# the single-label classifier heads a classification task may build (``task.head``): name -> class
CLASSIFIER_HEADS: dict[str, type[nn.Module]] = {"linear": ImageClassifier, "layernorm_linear": LayerNormLinearClassifier}


def build_classifier(backbone: Backbone, num_classes: int, head: str = "linear") -> nn.Module:
    """``backbone`` inside the classifier head ``head`` (:data:`CLASSIFIER_HEADS`): ``linear`` (a Linear on the
    pooled feature) or ``layernorm_linear`` (AST's ``mlp_head``: LayerNorm, then Linear)."""
    if head not in CLASSIFIER_HEADS:
        raise ValueError(f"unknown classifier head {head!r}; valid: {', '.join(CLASSIFIER_HEADS)}")
    return CLASSIFIER_HEADS[head](backbone, num_classes)


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
