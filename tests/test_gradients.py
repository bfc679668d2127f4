"""Gradients reach only what should train, for every registered method (issue 15).

For each adapter in ``zoo.list_adapters()`` on a tiny ViT + head: a frozen parameter never gets a
gradient, every trainable parameter gets one (and some of them a non-zero one), and what trains is
what the method claims: its own new parameters (never a wrapped original layer), all of the
backbone (``full``, ``galore``), its biases (``bitfit``), nothing of it (``linear``), or its own parameters plus the
blocks' LayerNorms (``compacter``, whose paper trains them).
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.adapters.base import AdapterModule

from .conftest import tiny_vit
from .helpers import assert_refuses, refuses

TRAINS_NORMS = {"compacter"}  # unfreeze_layer_norms: true in Compacter's configs
OPTIONS = {  # tiny settings; every other option at its default
    "colora": dict(faig_steps=1, faig_batches=1, finetune_steps=1, budget=0.5),
    "mhr": dict(n_splits=4, rank=2),
    "mosa": dict(bottleneck=8, experts=2),
    "onebit": dict(dim=4),
    "salt": dict(r_lora=4),
    "q_adapter": dict(num_queries=2, proj_dim=8),
    "vpt": dict(num_tokens=2),
}


def owned_by_adapters(model) -> set[str]:
    """Parameter names created by adapters (under an AdapterModule, not under its ``base``)."""
    out = set()
    for mname, m in model.named_modules():
        if isinstance(m, AdapterModule):
            for pname, _ in m.named_parameters():
                if not (pname == "base" or pname.startswith("base.")):
                    out.add(f"{mname}.{pname}")
    return out


@pytest.mark.parametrize("name", zoo.list_adapters())
def test_gradients_reach_only_what_should_train(name):
    torch.manual_seed(0)
    model = zoo.ImageClassifier(tiny_vit(), 4)
    if refuses(name, "vit"):
        return assert_refuses(model, name, **OPTIONS.get(name, {}))
    zoo.apply_adapter(model, name, **OPTIONS.get(name, {}))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
    loader = [(x, y)]
    model.train()
    zoo.prepare_adapters(model, loader)
    with torch.no_grad():  # move zero-initialised factors off zero so every path carries gradient
        for n, p in model.named_parameters():
            if p.requires_grad and p.is_floating_point() and not p.any():
                p.normal_(0, 1e-2)
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(x), y).backward()

    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    backbone_trainable = {n for n in trainable if n.startswith("backbone.")}
    if name in ("full", "galore"):  # GaLore: full-parameter (train_rest), its optimizer projects the targets
        assert backbone_trainable == {n for n in params if n.startswith("backbone.")}
    elif name == "bitfit":
        assert backbone_trainable and all(n.endswith(".bias") for n in backbone_trainable)
        assert backbone_trainable == {n for n in params if n.startswith("backbone.") and n.endswith(".bias")}
    elif name == "linear":
        assert backbone_trainable == set()
    else:
        ours = owned_by_adapters(model)
        if name in TRAINS_NORMS:  # the method's own parameters plus the blocks' LayerNorms (its paper's setting)
            norms = {n for n in params if n.startswith("backbone.model.blocks.") and re.search(r"\.norm[12]\.", n)}
            assert norms and norms <= backbone_trainable
            ours |= norms
        assert backbone_trainable and backbone_trainable <= ours, sorted(backbone_trainable - ours)[:5]
    for n, p in params.items():
        if not p.requires_grad:
            assert p.grad is None, f"{name}: frozen {n} got a gradient"
    got = {n for n in trainable if params[n].grad is not None}
    if name != "mosa":  # MoSA: only the sampled expert's rows train each step, others see zeros
        assert got == trainable, f"{name}: no gradient for {sorted(trainable - got)[:5]}"
    assert any(params[n].grad.abs().sum() > 0 for n in backbone_trainable | {"head.weight"} if params[n].grad is not None)
