"""MiSS (ex-Bone): the same forward, merge and unmerge as peft's MissConfig (all three variants,
d_in % r != 0), the paper's ΔW, identity at init, parameter counts, slices of a fused qkv."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
from zoo.adapters.miss import MiSSLinear

from .conftest import tiny_vit
from .helpers import OneLinear as One


def peft_pair(d_in, d_out, r, variant, mini_r=1):
    """peft's MissLinear (random init, init_weights=False / bat / mini) and ours with the same shard."""
    from peft import MissConfig, get_peft_model

    torch.manual_seed(0)
    ref = One(d_in, d_out)
    base = nn.Linear(d_in, d_out)
    base.load_state_dict(ref.lin.state_dict())
    init = {"balance": False, "mini": "mini", "bat": "bat"}[variant]
    pm = get_peft_model(ref, MissConfig(r=r, mini_r=mini_r, init_weights=init, target_modules=["lin"]))
    layer = pm.base_model.model.lin
    block = layer.miss_block["default"]
    with torch.no_grad():
        if variant != "balance":  # peft starts bat / mini at zero: give the shard values
            block.normal_(0, 0.1)
    ours = MiSSLinear(base, r, variant, mini_r)
    with torch.no_grad():
        ours.miss_block["all"].copy_(block)
    return layer, ours


CASES = [("balance", 16, 24, 4, 1), ("balance", 18, 12, 4, 1),  # d_in % r != 0: padded last chunk
         ("mini", 16, 24, 4, 6), ("mini", 18, 12, 4, 3), ("bat", 16, 24, 4, 1)]


@pytest.mark.parametrize("variant,d_in,d_out,r,mini_r", CASES)
def test_forward_merge_unmerge_equal_peft(variant, d_in, d_out, r, mini_r):
    layer, ours = peft_pair(d_in, d_out, r, variant, mini_r)
    x = torch.randn(3, 5, d_in)
    with torch.no_grad():
        ref_out = layer(x)
        torch.testing.assert_close(ours(x), ref_out, rtol=1e-5, atol=1e-6)
        assert (ref_out - ours.base(x)).abs().max() > 1e-3  # the shard does change the output
        layer.merge()
        ours.merge()
        torch.testing.assert_close(ours.base.weight, layer.base_layer.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x), ref_out, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        ours.unmerge()
        torch.testing.assert_close(ours.base.weight, layer.base_layer.weight, rtol=1e-5, atol=1e-5)


def test_dropout_in_training_equals_peft():
    from peft import MissConfig, get_peft_model

    torch.manual_seed(0)
    ref = One(18, 12)
    base = nn.Linear(18, 12)
    base.load_state_dict(ref.lin.state_dict())
    layer = get_peft_model(ref, MissConfig(r=4, miss_dropout=0.3, init_weights=False, target_modules=["lin"])).base_model.model.lin
    ours = MiSSLinear(base, 4, dropout=0.3)
    with torch.no_grad():
        ours.miss_block["all"].copy_(layer.miss_block["default"])
    layer.train()
    ours.train()
    x = torch.randn(6, 18)
    torch.manual_seed(1)
    want = layer(x)
    torch.manual_seed(1)
    torch.testing.assert_close(ours(x), want)
    torch.manual_seed(2)
    assert not torch.allclose(ours(x), want)  # another mask: dropout does act


def test_balance_delta_is_the_tiled_shard_with_a_truncated_last_block():
    torch.manual_seed(0)
    d_in, d_out, r = 10, 6, 4
    m = MiSSLinear(nn.Linear(d_in, d_out), r, init="random")
    D = m.miss_block["all"].detach()
    want = torch.cat([D.t(), D.t(), D.t()[:, :2]], 1)  # [Dᵀ | Dᵀ | Dᵀ[:, :d_in mod r]]
    torch.testing.assert_close(m.delta_weight(), want)
    x = torch.randn(7, d_in)
    xbar = torch.nn.functional.pad(x, (0, 2)).reshape(7, 3, r).sum(1)
    torch.testing.assert_close(m(x), m.base(x) + xbar @ D)


def test_bat_block_formula():
    torch.manual_seed(0)
    m = MiSSLinear(nn.Linear(8, 4), 2, "bat", init="random")
    W, D = m.base.weight.detach(), m.miss_block["all"].detach()
    want = W.clone()
    for i in range(2):
        for j in range(4):
            blk = W[2 * i:2 * i + 2, 2 * j:2 * j + 2]
            want[2 * i:2 * i + 2, 2 * j:2 * j + 2] = blk + blk @ D[i] + D[i]
    torch.testing.assert_close(W + m.delta_weight(), want)


@pytest.mark.parametrize("variant", ["balance", "mini", "bat"])
def test_identity_at_init_count_and_gradients(variant):
    bb = tiny_vit()  # width 64, 2 blocks, fused qkv
    x = torch.randn(2, 3, 32, 32)
    ref = bb(x)
    zoo.apply_adapter(bb, "miss", rank=16, variant=variant, mini_r=8)
    assert torch.equal(bb(x), ref)
    d, depth, r = 64, 2, 16
    per_slice = {"balance": r * d, "mini": r * 8, "bat": (d // r) * r * r}[variant]
    assert zoo.count_parameters(bb)[0] == depth * 2 * per_slice  # q and v of every block
    with torch.no_grad():
        for p in bb.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    bb(x).pow(2).sum().backward()  # (a plain sum of LayerNorm-ed features has no gradient)
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable and all("miss_block" in n for n in trainable)
    assert all(p.grad is None for p in bb.parameters() if not p.requires_grad)


@pytest.mark.parametrize("variant", ["balance", "mini", "bat"])
def test_slices_of_fused_qkv_equal_separate_projections(variant):
    """MiSS on the q and v slices of a fused qkv is MiSS on separate q / v projections (peft's HF ViT
    targets): k's rows are untouched, q's and v's get their own shard."""
    torch.manual_seed(0)
    d, r = 12, 4
    qkv = nn.Linear(d, 3 * d)
    m = MiSSLinear(qkv, r, variant, mini_r=3, slices={"q": slice(0, d), "v": slice(2 * d, 3 * d)}, init="random")
    x = torch.randn(5, d)
    out = m(x)
    for key, rows in (("q", slice(0, d)), ("v", slice(2 * d, 3 * d))):
        sep = nn.Linear(d, d)
        sep.load_state_dict({"weight": qkv.weight[rows], "bias": qkv.bias[rows]})
        one = MiSSLinear(sep, r, variant, mini_r=3)
        with torch.no_grad():
            one.miss_block["all"].copy_(m.miss_block[key])
        torch.testing.assert_close(out[:, rows], one(x))
    torch.testing.assert_close(out[:, d:2 * d], qkv(x)[:, d:2 * d])
    with torch.no_grad():
        m.merge()
        torch.testing.assert_close(m(x), out, rtol=1e-5, atol=1e-6)
        m.unmerge()
        torch.testing.assert_close(m(x), out, rtol=1e-5, atol=1e-6)


def test_merge_adapters_on_a_backbone_and_bad_options():
    bb = tiny_vit().eval()
    zoo.apply_adapter(bb, "miss", rank=16, variant="bat")
    with torch.no_grad():
        for p in bb.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
        x = torch.randn(2, 3, 32, 32)
        y = bb(x)
        zoo.merge_adapters(bb, unload=True)
        torch.testing.assert_close(bb(x), y, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown MiSS variant 'tri'; valid: balance, mini, bat"):
        zoo.apply_adapter(tiny_vit(), "miss", variant="tri")
    with pytest.raises(ValueError, match="variant=bat needs rank to divide d_in and d_out"):
        zoo.apply_adapter(tiny_vit(), "miss", rank=24, variant="bat")
    with pytest.raises(ValueError, match="rank=128 exceeds d_in=64"):
        zoo.apply_adapter(tiny_vit(), "miss", rank=128)
    with pytest.raises(zoo.SiteError, match="MiSS attaches to Linear sites"):
        zoo.apply_adapter(tiny_vit(), "miss", targets=["mlp"])
