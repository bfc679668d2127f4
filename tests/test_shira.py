"""SHiRA: the same mask (fixed seed, row-major order), forward, merge and unmerge as peft's ShiraConfig;
identity at init, parameter counts, what trains, slices of a fused qkv, the WM mask, artifacts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
from zoo.adapters.shira import SHiRALinear, shira_mask

from .conftest import tiny_vit
from .helpers import OneLinear as One


@pytest.mark.parametrize("d_in,d_out,r,seed", [(16, 24, 2, 7), (20, 12, 3, 123)])
def test_mask_forward_merge_unmerge_equal_peft(d_in, d_out, r, seed):
    from peft import ShiraConfig, get_peft_model

    torch.manual_seed(0)
    ref = One(d_in, d_out)
    base = nn.Linear(d_in, d_out)
    base.load_state_dict(ref.lin.state_dict())
    pm = get_peft_model(ref, ShiraConfig(r=r, random_seed=seed, init_weights=False, target_modules=["lin"]))
    layer = pm.base_model.model.lin
    ours = SHiRALinear(base, r, seed=seed)
    assert torch.equal(ours.indices_all, layer.shira_indices["default"])  # same Ω, same order, same dtype
    assert ours.shira_weight["all"].numel() == r * (d_in + d_out)
    with torch.no_grad():
        ours.shira_weight["all"].copy_(layer.shira_weight["default"])
        x = torch.randn(3, 5, d_in)
        out = layer(x)
        assert (out - base(x)).abs().max() > 1e-2
        torch.testing.assert_close(ours(x), out)
        layer.merge()
        ours.merge()
        torch.testing.assert_close(ours.base.weight, layer.base_layer.weight)
        torch.testing.assert_close(ours(x), out, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        ours.unmerge()
        torch.testing.assert_close(ours.base.weight, layer.base_layer.weight)


def test_a_qkv_slice_gets_peft_s_mask_of_a_separate_projection():
    """SHiRA on the q / v slices of a fused qkv draws each slice's mask as peft does on a separate
    query / value Linear (HF ViT): the same entries, offset to the slice's rows."""
    from peft import ShiraConfig, get_peft_model

    d, r = 16, 2
    qkv = nn.Linear(d, 3 * d)
    m = SHiRALinear(qkv, r, seed=3, slices={"q": slice(0, d), "v": slice(2 * d, 3 * d)})
    for key, start in (("q", 0), ("v", 2 * d)):
        sep = One(d, d)
        layer = get_peft_model(sep, ShiraConfig(r=r, random_seed=3, target_modules=["lin"])).base_model.model.lin
        want = layer.shira_indices["default"].clone()
        want[0] += start
        assert torch.equal(getattr(m, f"indices_{key}"), want)


def test_update_is_sparse_and_high_rank_and_theta_gets_the_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    m = SHiRALinear(lin, 2, seed=0, init="random")
    dw = m.delta_weight()
    assert int((dw != 0).sum()) == 2 * 64  # |Ω| = r (d_in + d_out)
    assert torch.linalg.matrix_rank(dw) > 2  # high rank at a rank-2 LoRA budget
    m(torch.randn(4, 32)).sum().backward()
    assert m.shira_weight["all"].grad is not None and m.shira_weight["all"].grad.abs().sum() > 0


def test_weight_magnitude_mask_picks_the_largest_entries():
    w = torch.randn(8, 6)
    idx = shira_mask(w, 1, "weight")
    chosen = w.abs()[idx[0], idx[1]]
    others = w.abs().clone()
    others[idx[0], idx[1]] = -1
    assert chosen.min() >= others.max() and idx.shape == (2, 14)
    assert torch.equal(idx, torch.stack(torch.where(torch.zeros(8, 6).index_put((idx[0], idx[1]), torch.tensor(1.)) > 0)))


def test_identity_at_init_count_gradients_and_merge_on_a_backbone(tmp_path):
    bb = tiny_vit()  # width 64, 2 blocks, fused qkv
    x = torch.randn(2, 3, 32, 32)
    ref = bb(x)
    zoo.apply_adapter(bb, "shira", rank=4)
    assert torch.equal(bb(x), ref)
    assert zoo.count_parameters(bb)[0] == 2 * 2 * 4 * (64 + 64)  # q and v slices of 2 blocks
    qkv = bb.model.blocks[0].attn.qkv
    assert int(qkv.indices_q[0].min()) == 0 and int(qkv.indices_v[0].min()) >= 128  # v's rows of the fused weight
    with torch.no_grad():
        for p in bb.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
        y = bb(x)
    assert not torch.allclose(y, ref, atol=1e-4)
    bb(x).pow(2).sum().backward()  # (a plain sum of LayerNorm-ed features has no gradient)
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable and all("shira_weight" in n for n in trainable)
    # k's rows stay as they were (only q and v are adapted)
    assert torch.equal(qkv.delta_weight()[64:128], torch.zeros(64, 64))
    zoo.save_adapter(bb, tmp_path)  # the mask travels with the artifact
    torch.manual_seed(0)
    other = tiny_vit()  # the same base weights
    zoo.load_adapter(other, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(other(x), y)
        zoo.merge_adapters(bb, unload=True)
        torch.testing.assert_close(bb(x), y, rtol=1e-4, atol=1e-5)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown SHiRA mask 'grad'; valid: random, weight"):
        zoo.apply_adapter(tiny_vit(), "shira", mask="grad")
    with pytest.raises(ValueError, match=r"rank=64 asks for r\*\(d_in\+d_out\) = 8192 trainable entries"):
        zoo.apply_adapter(tiny_vit(), "shira", rank=64)
