"""Backbone registry: ``zoo.create_backbone(family, **options)``."""
from __future__ import annotations

from typing import Any

from zoo.backbones.base import Backbone
from zoo.backbones.weights import WeightsUnavailableError
from zoo.registry import Registry

BACKBONES: Registry = Registry("backbone")


def register_backbone(name: str):
    return BACKBONES.register(name)


def _vit(**kw: Any) -> Backbone:
    from zoo.backbones.vit import ViTBackbone

    return ViTBackbone(**kw)


def _sam(**kw: Any) -> Backbone:
    from zoo.backbones.sam import SAMBackbone

    return SAMBackbone(**kw)


def _clip(**kw: Any) -> Backbone:
    from zoo.backbones.clip import CLIPBackbone

    return CLIPBackbone(**kw)


def _morph(**kw: Any) -> Backbone:
    from zoo.backbones.morph import MORPHBackbone

    return MORPHBackbone(**kw)


def _ast(**kw: Any) -> Backbone:
    from zoo.backbones.ast import ASTBackbone

    return ASTBackbone(**kw)


def _nafnet(**kw: Any) -> Backbone:
    from zoo.backbones.nafnet import NAFNetBackbone

    return NAFNetBackbone(**kw)


def _unet(**kw: Any) -> Backbone:
    from zoo.backbones.unet import UNetBackbone

    return UNetBackbone(**kw)


def _coca(**kw: Any) -> Backbone:
    from zoo.backbones.coca import CoCaBackbone

    return CoCaBackbone(**kw)


register_backbone("vit")(_vit)
register_backbone("morph")(_morph)
register_backbone("ast")(_ast)
register_backbone("unet")(_unet)
register_backbone("nafnet")(_nafnet)
register_backbone("sam")(_sam)
register_backbone("clip")(_clip)
register_backbone("coca")(_coca)


def create_backbone(name: str, **options: Any) -> Backbone:
    """Build backbone family ``name`` (``zoo.list_backbones()``) with its options, e.g.
    ``create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32)``."""
    return BACKBONES.get(name)(**options)


def list_backbones() -> list[str]:
    return BACKBONES.names()


__all__ = ["Backbone", "BACKBONES", "create_backbone", "list_backbones", "register_backbone", "WeightsUnavailableError"]
