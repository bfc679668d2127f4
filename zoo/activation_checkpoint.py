"""Activation checkpointing of a backbone's blocks (``trainer.checkpoint_blocks=true``).

``checkpoint_blocks(model)`` makes every block of the model's backbone (the Backbone's
``blocks_container()``: timm ViT, SAM, CLIP alike, including adapter wrappers that sit in the
block list such as VPT's prompted blocks) run under :func:`torch.utils.checkpoint.checkpoint`
(non-reentrant) while training with gradients: a block keeps only its input for backward and
recomputes its activations then. Memory falls from O(depth · activations per block) to
O(depth · block input + one block's activations); the price is one more forward of every block
per step (about +1/3 of a step's arithmetic). RNG state is preserved, so dropout, drop-path and
Gumbel samples are the same in the recomputation and gradients equal the plain ones.

The block's class is swapped for a subclass that only overrides ``forward``: parameter names,
``state_dict`` keys, sites and ``isinstance`` checks do not change, and a deep copy of the model
stays checkpointed. In eval mode or under ``torch.no_grad`` the block runs as before.
"""
from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_CLASSES: dict[type, type] = {}


class CheckpointedBlock:
    """Mixin put in front of a block's own class; see the module docstring."""

    def forward(self, *args, **kwargs):
        plain = super().forward
        if self.training and torch.is_grad_enabled():
            return checkpoint(plain, *args, use_reentrant=False, **kwargs)
        return plain(*args, **kwargs)


def _checkpointed_class(cls: type) -> type:
    if cls not in _CLASSES:
        name = f"Checkpointed_{cls.__module__.replace('.', '_')}_{cls.__qualname__.replace('.', '_')}"
        new = type(name, (CheckpointedBlock, cls), {"__module__": __name__, "__qualname__": name})
        setattr(sys.modules[__name__], name, new)  # picklable by name (ddp_spawn sends the model)
        _CLASSES[cls] = new
    return _CLASSES[cls]


def checkpoint_blocks(model: nn.Module, enabled: bool = True) -> int:
    """Turn block checkpointing on (or off) for ``model``'s backbone; returns the number of blocks."""
    from zoo.api import find_backbone

    blocks = list(find_backbone(model).blocks_container())
    for block in blocks:
        cls = type(block)
        if enabled and not isinstance(block, CheckpointedBlock):
            block.__class__ = _checkpointed_class(cls)
        elif not enabled and isinstance(block, CheckpointedBlock):
            block.__class__ = next(c for c in cls.__mro__[1:] if not issubclass(c, CheckpointedBlock))
    return len(blocks)
