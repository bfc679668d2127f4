"""The reference rows of every PEFT table: linear probing, full fine-tuning and BitFit.

* ``linear``: the backbone stays frozen; only the task head trains.
* ``full``: every backbone weight trains (on multi-tower backbones: of the selected ``tower``s).
* ``bitfit``: only the bias terms train (Zaken et al., "BitFit: Simple Parameter-efficient
  Fine-tuning for Transformer-based Masked Language-models", ACL 2022). ``biases=all`` (default): every
  bias vector of the backbone; ``biases=linear_norm``: only those of ``nn.Linear`` and ``nn.LayerNorm``
  modules, as PETL-AST's BitFit on AST (Cappellazzo et al., IEEE MLSP 2024; main.py L241-246), which
  leaves e.g. the convolutional patch embedding's bias frozen.

None of them adds modules, so each is trivially "mergeable": the trained weights already sit in
the backbone, and ``merge_adapters(unload=True)`` leaves the plain model.
"""
from __future__ import annotations

from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter


class _NoModules(Adapter):
    mergeable = True

    def attach(self, backbone) -> None:
        self.backbone = backbone

    def merge(self) -> None:  # weights already live in the base
        self.merged = True


@register_adapter("linear")
class LinearProbe(_NoModules):
    """Head only: the backbone stays frozen."""

    paper = "linear probing"

    def __init__(self):
        super().__init__()


@register_adapter("full")
class FullFineTune(_NoModules):
    """Every backbone parameter trains."""

    paper = "full fine-tuning"

    def __init__(self):
        super().__init__()

    def mark_trainable(self) -> None:
        for _, p in self.backbone.tower_named_parameters(self.own_tower()):
            p.requires_grad_(True)


@register_adapter("bitfit")
class BitFit(_NoModules):
    """Only bias vectors train (Zaken et al., ACL 2022)."""

    paper = "Zaken et al., BitFit, ACL 2022"
    BIASES = ("all", "linear_norm")

    def __init__(self, biases: str = "all"):
        super().__init__()
        if biases not in self.BIASES:
            raise ValueError(f"unknown bitfit biases {biases!r}; valid: {', '.join(self.BIASES)}")
        self.biases = biases

    def mark_trainable(self) -> None:
        if self.biases == "linear_norm":  # PETL-AST main.py L244-246: isinstance(m, (Linear, LayerNorm)) -> m.bias
            allowed = {id(m.bias) for m in self.backbone.modules()
                       if isinstance(m, (nn.Linear, nn.LayerNorm)) and getattr(m, "bias", None) is not None}
        for name, p in self.backbone.tower_named_parameters(self.own_tower()):
            if name.endswith(".bias") and (self.biases == "all" or id(p) in allowed):
                p.requires_grad_(True)
