"""S²FT: global random selection of heads / channels, the update confined to the selected o / fc2
columns, identity at init, merge equivalence, parameter counts, what trains, artifacts, conv channels."""
from __future__ import annotations

import pytest
import torch

import zoo
from zoo.adapters.s2ft import S2Linear, draw

from .conftest import tiny_vit


def test_draw_is_global_without_replacement_and_seeded():
    sizes = [12, 12, 12, 12]
    picks = draw(sizes, 0.25, torch.Generator().manual_seed(0))
    assert sum(map(len, picks)) == 12 and all(len(set(p)) == len(p) for p in picks)
    assert all(0 <= c < 12 for p in picks for c in p)
    assert picks == draw(sizes, 0.25, torch.Generator().manual_seed(0))
    assert picks != draw(sizes, 0.25, torch.Generator().manual_seed(1))
    assert sum(map(len, draw([7, 3], 0.52, torch.Generator()))) == 5  # ⌊0.52 · 10⌋


def test_selected_columns_count_identity_and_gradients():
    bb = tiny_vit()  # width 64, 2 blocks x 2 heads (d_h 32), MLP hidden 256
    x = torch.randn(2, 3, 32, 32)
    ref = bb(x)
    zoo.apply_adapter(bb, "s2ft", head_ratio=0.5, channel_ratio=0.1)
    assert torch.equal(bb(x), ref)
    (ad,) = bb.adapters
    heads = sum(len(v) for k, v in ad.selected.items() if k.endswith("attn.proj"))
    chans = sum(len(v) for k, v in ad.selected.items() if k.endswith("mlp.fc2"))
    assert heads == int(0.5 * 4) and chans == int(0.1 * 512)
    assert zoo.count_parameters(bb)[0] == 64 * (heads * 32 + chans)  # d_out x |I| per adapted projection
    with torch.no_grad():
        for p in bb.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    bb(x).pow(2).sum().backward()  # (a plain sum of LayerNorm-ed features has no gradient)
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".s2") for n in trainable)
    assert all(p.grad is not None for p in bb.parameters() if p.requires_grad)


def test_update_lives_in_the_selected_heads_columns_and_merges():
    bb = tiny_vit().eval()
    zoo.apply_adapter(bb, "s2ft", head_ratio=0.5, channel_ratio=0.05, seed=3)
    (ad,) = bb.adapters
    with torch.no_grad():
        for m in bb.modules():
            if isinstance(m, S2Linear):
                m.s2.normal_(0, 0.1)
    x = torch.randn(2, 3, 32, 32)
    for m in ad.modules:
        dw = m.delta_weight()
        nz = (dw != 0).any(0).nonzero().flatten()
        assert torch.equal(nz, m.cols.sort().values)  # exactly the selected columns change
    for path, chosen in ad.selected.items():
        if path.endswith("attn.proj") and chosen:
            i = int(path.split(".")[2])
            cols = bb.model.blocks[i].attn.proj.cols
            assert torch.equal(cols, torch.cat([torch.arange(h * 32, (h + 1) * 32) for h in chosen]))
            t = torch.randn(5, 64)
            proj = bb.model.blocks[i].attn.proj
            w = proj.base.weight.clone()
            w[:, cols] += proj.s2
            torch.testing.assert_close(proj(t), torch.nn.functional.linear(t, w, proj.base.bias))
    with torch.no_grad():
        y = bb(x)
        zoo.merge_adapters(bb, unload=True)
        torch.testing.assert_close(bb(x), y, rtol=1e-4, atol=1e-5)


def test_artifact_round_trip(tmp_path):
    bb = tiny_vit()
    zoo.apply_adapter(bb, "s2ft", head_ratio=0.5, channel_ratio=0.1)
    with torch.no_grad():
        for p in bb.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    x = torch.randn(2, 3, 32, 32)
    y = bb(x)
    zoo.save_adapter(bb, tmp_path)
    torch.manual_seed(0)
    other = tiny_vit()
    zoo.load_adapter(other, tmp_path)
    torch.testing.assert_close(other(x), y)


def test_nafnet_channels_only_and_refusals():
    bb = zoo.create_backbone("nafnet", width=8, layout="tiny")
    with pytest.raises(zoo.SiteError, match="without attention heads .*set head_ratio=0"):
        zoo.apply_adapter(bb, "s2ft")
    zoo.apply_adapter(bb, "s2ft", head_ratio=0, channel_ratio=0.25)  # fc2: the per-pixel MLP's 1x1 conv
    assert bb.adapters and all(m.conv for m in bb.adapters[0].modules)
    with torch.no_grad():
        for m in bb.adapters[0].modules:
            m.s2.normal_(0, 0.1)
        for b in bb.blocks():
            b.beta.normal_(0, 0.5)
            b.gamma.normal_(0, 0.5)
        x = torch.rand(1, 3, 8, 8)
        y = bb(x)
        zoo.merge_adapters(bb, unload=True)
        torch.testing.assert_close(bb(x), y, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="select no head and no channel"):
        zoo.apply_adapter(tiny_vit(), "s2ft", head_ratio=0.01, channel_ratio=0.001)
    with pytest.raises(ValueError, match="both 0"):
        zoo.apply_adapter(tiny_vit(), "s2ft", head_ratio=0, channel_ratio=0)
