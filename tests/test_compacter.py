"""Compacter / Compacter++: the PHM weight is Σ C_i ⊗ s_i t_iᵀ with one rule shared by every layer,
the bottleneck formula, placements, parameter counts from the formula, what trains, artifacts."""
from __future__ import annotations

import math
import re

import pytest
import torch

import zoo
from zoo.adapters.compacter import PHMBottleneck, PHMLinear, PHMRule, phm_weight

from .conftest import tiny_vit


def test_phm_weight_is_a_sum_of_kronecker_products():
    n, rule = 4, torch.randn(4, 4, 4)
    left, right = torch.randn(n, 3, 2), torch.randn(n, 2, 5)
    want = sum(torch.kron(rule[i], left[i] @ right[i]) for i in range(n))
    torch.testing.assert_close(phm_weight(rule, left, right), want)


def test_phm_layer_and_bottleneck_formula():
    torch.manual_seed(0)
    rule = PHMRule(2, std=0.5)
    lin = PHMLinear(6, 4, 2, rule)
    assert torch.count_nonzero(lin.bias) == 0
    bound = math.sqrt(2) * math.sqrt(6 / (3 + 1))  # Xavier-uniform with gain sqrt(2) on each (d_in/n, k)
    assert lin.left.abs().max() <= bound
    x = torch.randn(5, 6)
    with torch.no_grad():
        lin.bias.normal_()
    H = sum(torch.kron(rule.weight[i], lin.left[i] @ lin.right[i]) for i in range(2))
    torch.testing.assert_close(lin(x), x @ H + lin.bias)
    b = PHMBottleneck(8, 4, 2, rule)
    gelu_new = lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3)))
    torch.testing.assert_close(b(x.new_ones(3, 8)), b.up(gelu_new(b.down(x.new_ones(3, 8)))))


@pytest.mark.parametrize("variant,per_block", [("compacter", 2), ("compacter++", 1)])
def test_placement_counts_shared_rule_and_gradients(variant, per_block):
    bb = tiny_vit()  # width 64, 2 blocks
    zoo.apply_adapter(bb, "compacter", variant=variant)
    (ad,) = bb.adapters
    d, n, k = 64, 4, 1
    m = max(n, -(-(d // 32) // n) * n)  # d // 32 = 2, rounded up to a multiple of n: 4
    assert ad.inner_dim(d) == m == 4 and ad.inner_dim(768) == 24  # ViT-B: exactly the reference's 768 // 32
    per_adapter = 2 * k * (d + m) + m + d
    norms = 2 * 2 * 2 * d  # norm1, norm2 of 2 blocks, weight and bias
    assert zoo.count_parameters(bb)[0] == 2 * per_block * per_adapter + n ** 3 + norms
    rules = {id(p.rule) for p in bb.modules() if isinstance(p, PHMLinear)}
    assert len(rules) == 1  # one rule for every PHM layer
    assert sum(isinstance(mod, PHMRule) for mod in bb.modules()) == 1
    wrapped = [s for s in ("attn", "mlp") if isinstance(getattr(bb.model.blocks[1], s), zoo.AdapterModule)]
    assert wrapped == (["attn", "mlp"] if variant == "compacter" else ["mlp"])
    x = torch.randn(2, 3, 32, 32)
    bb(x).pow(2).sum().backward()  # (a plain sum of LayerNorm-ed features has no gradient)
    trainable = {name: p for name, p in bb.named_parameters() if p.requires_grad}
    assert all(p.grad is not None for p in trainable.values())
    assert all(".adapter." in name or ".norm" in name for name in trainable)
    assert ad.phm_rule().grad.abs().sum() > 0


def test_not_identity_at_init_not_mergeable_and_artifact(tmp_path):
    bb = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    ref = bb(x)
    zoo.apply_adapter(bb, "compacter", train_norms=False)
    y = bb(x)
    assert not torch.allclose(y, ref)  # both PHM factors random: the paper's init changes the output
    with pytest.raises(zoo.NotMergeableError):
        zoo.merge_adapters(bb)
    zoo.save_adapter(bb, tmp_path)
    torch.manual_seed(0)
    other = tiny_vit()  # the same base weights
    torch.manual_seed(5)  # the attach draws other adapter values; loading puts the artifact's in
    zoo.load_adapter(other, tmp_path)
    torch.testing.assert_close(other(x), y)
    rule = other.adapters[0].phm_rule()
    assert all(m.rule.weight is rule for m in other.modules() if isinstance(m, PHMLinear))


def test_bad_options():
    with pytest.raises(ValueError, match=re.escape("unknown Compacter variant 'compacter+'; valid: compacter, compacter++")):
        zoo.apply_adapter(tiny_vit(), "compacter", variant="compacter+")
    with pytest.raises(zoo.SiteError, match="width 64 is not divisible by n=3"):
        zoo.apply_adapter(tiny_vit(), "compacter", n=3)
