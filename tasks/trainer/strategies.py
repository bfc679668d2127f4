"""Distributed strategies named in ``conf/trainer/*.yaml`` that need Python objects (layer classes).

``fsdp(...)`` is Lightning's :class:`~lightning.pytorch.strategies.FSDPStrategy` with the zoo's
transformer blocks as the wrap policy (each MORPH ``EncoderBlock`` / timm ``Block`` becomes one FSDP
unit) and, optionally, activation checkpointing of the same blocks.
"""
from __future__ import annotations

from typing import Any


def block_classes() -> set[type]:
    from timm.models.vision_transformer import Block

    from zoo.backbones.morph_model import EncoderBlock

    return {EncoderBlock, Block}


def fsdp(activation_checkpointing: bool = False, sharding_strategy: str = "FULL_SHARD", **kwargs: Any):
    from lightning.pytorch.strategies import FSDPStrategy

    blocks = block_classes()
    return FSDPStrategy(auto_wrap_policy=blocks, sharding_strategy=sharding_strategy,
                        activation_checkpointing_policy=blocks if activation_checkpointing else None,
                        use_orig_params=True,  # frozen and trainable parameters share FSDP units (PEFT)
                        **kwargs)
