"""MORPH's own fine-tuning levels (Rautela et al., MORPH, arXiv 2509.21670; reference
``src/utils/select_fine_tuning_parameters.py`` and ``scripts/finetune_MORPH_general.py``).

Cumulative levels over a frozen MORPH:

======  =========================================================================================
level   trains
======  =========================================================================================
1       LoRA on q, k, v, o of all four axial attentions (rank 16) and on both MLP Linears (rank 12),
        α = 2r (scale 2), LoRA dropout 0.05  +  every LayerNorm  +  the positional table
2       level 1 + the whole patch embedding (component conv, patch projection, field cross-attention)
3       level 2 + the decoder Linear
4       every parameter, no LoRA
======  =========================================================================================

with the reference's AdamW groups (the task's ``lr``/``weight_decay`` are not used by these
groups, as in the reference): LoRA lr 1e-3 / wd 0; LayerNorms and positional table 1e-4 / 0;
embedding and decoder 1e-4 / 1e-5; level 4 everything 1e-4 / 0.

LoRA is the zoo's :class:`~zoo.adapters.lora.LoRALinear` (``y = W0 x + b + (α/r)·B A drop(x)``,
Kaiming-uniform A, zero B). One difference from the reference: q, k and v share one fused
Linear here, so the three LoRA branches see the same dropout mask (the reference draws one per
Linear); the function at init and the parameter count are identical.

Needs a backbone that names these roles (``tuning_groups()``); only ``backbone=morph`` does.
"""
from __future__ import annotations

from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter
from zoo.adapters.lora import LoRALinear, group_by_module
from zoo.sites import SiteError

LEVEL_ROLES = {1: ("norm", "pos"), 2: ("norm", "pos", "embed"), 3: ("norm", "pos", "embed", "decoder")}


@register_adapter("morph_ft")
class MorphFineTune(Adapter):
    """MORPH fine-tuning ``level`` 1-4 (``adapter=morph_level1..4``)."""

    mergeable = True
    supports_slices = True  # LoRALinear handles q/k/v row slices of the fused qkv
    paper = "Rautela et al., MORPH, arXiv 2509.21670 (SelectFineTuningParameters)"

    def __init__(self, level: int = 1, rank_attn: int = 16, rank_mlp: int = 12, alpha_attn: float | None = None,
                 alpha_mlp: float | None = None, dropout: float = 0.05, attn_targets: list[str] = ("q", "k", "v", "o"),
                 mlp_targets: list[str] = ("fc1", "fc2"), layers="all",
                 lr_lora: float = 1e-3, wd_lora: float = 0.0, lr_norm: float = 1e-4, lr_pos: float = 1e-4,
                 lr_embed: float = 1e-4, wd_embed: float = 1e-5, lr_decoder: float = 1e-4, wd_decoder: float = 1e-5,
                 lr_full: float = 1e-4, wd_full: float = 0.0):
        super().__init__()
        if int(level) not in (1, 2, 3, 4):
            raise ValueError(f"level={level}: MORPH's fine-tuning levels are 1, 2, 3, 4")
        if int(level) < 4 and (int(rank_attn) < 1 or int(rank_mlp) < 1):
            raise ValueError(f"levels 1-3 need LoRA ranks >= 1 (got rank_attn={rank_attn}, rank_mlp={rank_mlp})")
        self.level = int(level)
        self.rank_attn, self.rank_mlp = int(rank_attn), int(rank_mlp)
        self.alpha_attn = float(alpha_attn if alpha_attn is not None else 2 * self.rank_attn)
        self.alpha_mlp = float(alpha_mlp if alpha_mlp is not None else 2 * self.rank_mlp)
        self.dropout, self.layers = float(dropout), layers
        self.attn_targets, self.mlp_targets = list(attn_targets), list(mlp_targets)
        self.lr = {"lora": lr_lora, "norm": lr_norm, "pos": lr_pos, "embed": lr_embed, "decoder": lr_decoder, "full": lr_full}
        self.wd = {"lora": wd_lora, "norm": 0.0, "pos": 0.0, "embed": wd_embed, "decoder": wd_decoder, "full": wd_full}
        self.roles: dict[str, list[nn.Parameter]] = {}

    def attach(self, backbone) -> None:
        if not hasattr(backbone, "tuning_groups"):
            raise SiteError(f"morph_ft trains MORPH's named parameter groups (norms, positional table, embedding, "
                            f"decoder); backbone {backbone.family!r} does not describe them: use backbone=morph")
        groups = backbone.tuning_groups()
        if self.level == 4:
            self.roles = {"full": [p for ps in groups.values() for _, p in ps]}
            return
        for targets, rank, alpha in ((self.attn_targets, self.rank_attn, self.alpha_attn),
                                     (self.mlp_targets, self.rank_mlp, self.alpha_mlp)):
            if not targets:
                continue
            for group in group_by_module(self.sites(targets, self.layers)):
                slices = {s.kind: s.out_slice for s in group}
                self.replace(group[0], LoRALinear(group[0].module, rank, alpha, self.dropout, slices))
        self.roles = {role: [p for _, p in groups[role]] for role in LEVEL_ROLES[self.level]}

    def mark_trainable(self) -> None:
        super().mark_trainable()  # the LoRA factors
        for params in self.roles.values():
            for p in params:
                p.requires_grad_(True)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        groups = []
        lora = list(self.adapter_parameters())
        if lora:
            groups.append({"params": lora, "lr": self.lr["lora"], "weight_decay": self.wd["lora"], "name": "lora"})
        for role, params in self.roles.items():
            groups.append({"params": list(params), "lr": self.lr[role], "weight_decay": self.wd[role], "name": role})
        return groups
