"""timm Vision Transformers (any ``timm`` ViT by name) as zoo backbones."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from zoo.backbones.base import Backbone
from zoo.backbones.weights import WeightsUnavailableError, hub_errors, load_state_dict_file

TIMM_SITES = {
    "o": "attn.proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
    "attn": "attn",
    "mlp": "mlp",
    "norm1": "norm1",
    "norm2": "norm2",
}


def create_timm_model(model: str, pretrained: bool, weights: str | None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with our two ways to get weights and a clear offline error."""
    arch = model.split(".")[0]
    if not timm.is_model(arch):
        raise ValueError(
            f"unknown timm model {model!r}; see timm.list_models('vit_*'), e.g. vit_base_patch16_224.augreg_in21k"
        )
    kwargs.setdefault("num_classes", 0)
    if pretrained and not weights:
        hint = (
            f"Use a local weights file with backbone.weights=/path/to/{arch}.safetensors "
            f"(zoo.create_backbone(..., weights=...)), or train from scratch with backbone.pretrained=false."
        )
        with hub_errors(f"timm model {model!r}", hint):
            return timm.create_model(model, pretrained=True, **kwargs)
    net = timm.create_model(model, pretrained=False, **kwargs)
    if weights:
        load_into(net, load_state_dict_file(weights), source=str(weights))
    return net


def load_into(net: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load a (timm or original-format) ViT state dict, resampling position embeddings if needed."""
    filter_fn = getattr(__import__(type(net).__module__, fromlist=["checkpoint_filter_fn"]), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, net)
    own = net.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if not (k.startswith("head.") and k not in own)}
    missing, unexpected = net.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    unexpected = [k for k in unexpected if not k.startswith("head.")]
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"{source} does not fit {type(net).__name__}: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )


def weights_tag(model: str, pretrained: bool, weights: str | None) -> str | None:
    """``augreg_in21k`` for hub weights, ``file:<name>`` for a local file, None for random init."""
    if weights:
        return f"file:{Path(weights).name}"
    if pretrained:
        return model.split(".", 1)[1] if "." in model else "default"
    return None


class TimmBackbone(Backbone):
    """What timm's ViT-style models share: block layout, sites, weight loading."""

    site_map = TIMM_SITES
    fused_qkv = "attn.qkv"
    patch_embed_path = "model.patch_embed.proj"

    def __init__(self, model: str, pretrained: bool, weights: str | None, img_size: int | None, **kwargs: Any):
        build = dict(kwargs)
        if img_size is not None:
            build["img_size"] = img_size
        net = create_timm_model(model, pretrained, weights, **build)
        if net.blocks and getattr(net.blocks[0].attn, "qkv", None) is None:
            raise ValueError(f"{model}: attention without a fused qkv projection is not supported yet")
        super().__init__(net, model, weights_tag(model, pretrained, weights), build)
        self.feature_dim = net.num_features
        self.patch_size = net.patch_embed.patch_size[0]
        self.feature_stride = self.patch_size

    def blocks_container(self) -> nn.Module:
        return self.model.blocks

    def blocks_path(self) -> str:
        return "model.blocks"

    def final_norm(self) -> nn.Module | None:
        """timm's ``norm`` after the blocks (HF AST's ``layernorm``); ``None`` where it is an Identity
        (models that normalise after pooling, ``fc_norm``)."""
        norm = getattr(self.model, "norm", None)
        return norm if isinstance(norm, nn.Module) and any(True for _ in norm.parameters()) else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class ViTBackbone(TimmBackbone):
    """Any timm ``VisionTransformer``: ``forward(x)`` gives the pooled (pre-logits) feature."""

    family = "vit"
    token_layout = "nld"

    def __init__(
        self,
        model: str = "vit_base_patch16_224.augreg_in21k",
        pretrained: bool = True,
        weights: str | None = None,
        img_size: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(model, pretrained, weights, img_size, **kwargs)
        self.num_prefix_tokens = self.model.num_prefix_tokens
        self.data_config = timm.data.resolve_data_config({}, model=self.model)
        # timm reads input_size from the *pretrained* config (224 for vit_*_224) even when the model
        # was built for another img_size; record the size the model actually takes
        grid = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        if grid is not None:
            self.data_config["input_size"] = (3, *tuple(int(v) for v in grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The patch tokens after the final norm, as a grid ``(B, D, H/p, W/p)``."""
        tokens = self.model.forward_features(x)[:, self.num_prefix_tokens:]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], h, w)
