"""NAFNet backbone: the reference's layout and parameter counts, sites, conv LoRA, every adapter."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from zoo.adapters.colora import CoLoRA
from zoo.adapters.lora import LoRAConv2d
from zoo.backbones.nafnet import LayerNorm2d, NAFBlock

CONV_TARGETS = ["conv_pw", "conv_dw", "conv_sca", "o", "fc1", "fc2"]


def tiny(width=8, seed=0):
    torch.manual_seed(seed)
    return zoo.create_backbone("nafnet", width=width, layout="tiny")


def randomize_blocks(bb):
    """β, γ are zero at init (each block the identity); make them non-zero so the blocks matter."""
    with torch.no_grad():
        for b in bb.blocks():
            b.beta.normal_(0, 0.5)
            b.gamma.normal_(0, 0.5)


@pytest.mark.parametrize("layout,millions", [("sidd", 29.16), ("gopro", 17.11)])
def test_width32_layouts_have_the_reference_parameter_counts(layout, millions):
    # audio_seg_restoration.md §3.3: "SIDD-w32 29.16M, GoPro-w32 17.11M" (VERIFIED there)
    bb = zoo.create_backbone("nafnet", width=32, layout=layout)
    assert round(sum(p.numel() for p in bb.parameters()) / 1e6, 2) == millions
    assert bb.depth == 36  # 2+2+4+8 + 12 + 2·4  ==  1+1+1+28 + 1 + 1·4


def test_block_math_layernorm_and_odd_sizes():
    x = torch.randn(2, 6, 5, 7)
    ln = LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (6,), ln.weight, ln.bias, eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref, rtol=1e-5, atol=1e-5)

    blk = NAFBlock(6)
    torch.testing.assert_close(blk(x), x, rtol=0, atol=0)  # β = γ = 0: identity at init
    with torch.no_grad():
        blk.beta.fill_(1.0)
    # branch 1 by hand: SCA has no sigmoid, SimpleGate is x1·x2
    h = blk.conv2(blk.conv1(blk.norm1(x)))
    h = h[:, :6] * h[:, 6:]
    h = h * blk.sca[1](h.mean((2, 3), keepdim=True))
    torch.testing.assert_close(blk(x), x + blk.conv3(h), rtol=1e-5, atol=1e-5)

    bb = tiny()
    for hw in [(13, 11), (16, 16), (1, 9)]:
        x = torch.rand(2, 3, *hw)
        assert bb(x).shape == x.shape  # padded to a multiple of 4, cropped back


def test_sites_and_clear_errors():
    bb = tiny()
    assert bb.depth == 5
    sites = zoo.find_sites(bb, ["conv_pw", "conv_dw", "o", "fc1", "fc2"], layers=[0])
    assert [s.path for s in sites] == [f"model.encoders.0.0.{c}" for c in ("conv1", "conv2", "conv3", "conv4", "conv5")]
    assert zoo.find_sites(bb, "conv_sca", layers=[-1])[0].path == "model.decoders.1.0.sca.1"
    with pytest.raises(zoo.SiteError, match="has no site 'q'; its sites are: o, fc1, fc2"):
        zoo.find_sites(bb, "q")
    with pytest.raises(ValueError, match="valid layouts: sidd, gopro, tiny, custom"):
        zoo.create_backbone("nafnet", layout="big")
    with pytest.raises(zoo.WeightsUnavailableError, match="backbone.weights="):
        zoo.create_backbone("nafnet", pretrained=True)


def test_weights_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    src = tiny(seed=1)
    randomize_blocks(src)
    torch.save({"params": src.model.state_dict()}, tmp_path / "naf.pth")  # the official checkpoint format
    save_file(src.model.state_dict(), str(tmp_path / "naf.safetensors"))
    x = torch.rand(1, 3, 8, 8)
    for f in ("naf.pth", "naf.safetensors"):
        bb = zoo.create_backbone("nafnet", width=8, layout="tiny", weights=str(tmp_path / f))
        torch.testing.assert_close(bb(x), src(x))
    with pytest.raises(zoo.WeightsUnavailableError, match="does not fit this NAFNet"):
        zoo.create_backbone("nafnet", width=16, layout="tiny", weights=str(tmp_path / "naf.pth"))


# ---------------------------------------------------------------------------- conv LoRA
@pytest.mark.parametrize("groups", [1, 4])
def test_lora_conv2d_is_the_low_rank_kernel_delta(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    lora = LoRAConv2d(conv, rank=2, alpha=4.0)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(lora(x), conv(x), rtol=0, atol=0)  # B = 0: identity at init
    with torch.no_grad():
        lora.lora_B.normal_()
    dw = 2.0 * (lora.lora_B @ lora.lora_A.flatten(1)).view_as(conv.weight)  # (alpha/r)·B·A
    torch.testing.assert_close(lora(x), F.conv2d(x, conv.weight + dw, conv.bias, padding=1, groups=groups),
                               rtol=1e-5, atol=1e-5)
    assert torch.linalg.matrix_rank(dw.flatten(1)) <= 2


def test_lora_on_nafnet_identity_at_init_and_merges_exactly():
    bb = tiny()
    randomize_blocks(bb)
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        before = bb(x)
    plain_keys = set(bb.state_dict())
    zoo.apply_adapter(bb, "lora", rank=2, alpha=2.0, targets=CONV_TARGETS)
    assert sum(isinstance(m, LoRAConv2d) for m in bb.modules()) == 6 * bb.depth
    with torch.no_grad():
        torch.testing.assert_close(bb(x), before, rtol=0, atol=0)
        for m in bb.modules():
            if isinstance(m, LoRAConv2d):
                m.lora_B.normal_(0, 0.1)
        adapted = bb(x)
    assert (adapted - before).abs().max() > 1e-3
    zoo.merge_adapters(bb, unload=True)
    assert set(bb.state_dict()) == plain_keys and not any(isinstance(m, LoRAConv2d) for m in bb.modules())
    with torch.no_grad():
        torch.testing.assert_close(bb(x), adapted, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- every adapter
WORKS = {"full", "bitfit", "linear", "lora", "colora", "s2ft", "galore"}  # galore: its default o/fc1/fc2 are NAFNet's 1×1 convs
CONFIG = {"lora": dict(rank=2, targets=CONV_TARGETS),
          "s2ft": dict(head_ratio=0, channel_ratio=0.25),  # fc2's 1x1 conv channels; 'o' has no heads here
          "colora": dict(targets=["conv_pw", "conv_sca", "o", "fc1", "fc2"], finetune_steps=2, faig_steps=2,
                         faig_batches=1, budget=0.2)}
REFUSAL = {  # why each other method cannot attach to a CNN without attention / token sequences
    "adapter": "no site 'attn'", "comp_lora": "no site 'q'", "hydra": "wraps Linear layers, got Conv2d",
    "mask_tuning": "no site 'patch_embed'", "mhr": "no site 'q'", "mosa": "no site 'mlp'", "onebit": "no site 'mlp'",
    "q_adapter": "no site 'tokens'", "salt": "no site 'qkv'", "ssf": "no site 'qkv'", "vpt": "no site 'tokens'",
    "conformer": "no site 'mlp'", "prefix": "no site 'attn'", "compacter": "no site 'attn'",
    "miss": "no site 'q'", "shira": "no site 'q'", "loldu": "no site 'q'",
    "dylora": "no site 'q'", "eva": "no site 'q'", "lora_ga": "no site 'q'", "lora_pro": "no site 'q'",
    # made for other backbones (tests/helpers.BACKBONE_SPECIFIC)
    "coop": "backbone 'nafnet' has none .use backbone=clip", "f_adapter": "use backbone=morph",
    "morph_ft": "backbone 'nafnet' does not describe them",
}


def test_every_registered_adapter_works_or_refuses_clearly():
    assert set(zoo.list_adapters()) == WORKS | set(REFUSAL)  # a new method must be classified here
    x = torch.rand(2, 3, 8, 8)
    batches = [(x + 0.1 * torch.randn_like(x), x)]
    for name in zoo.list_adapters():
        bb = tiny()
        randomize_blocks(bb)
        if name in REFUSAL:
            with pytest.raises(zoo.SiteError, match=REFUSAL[name]):
                zoo.apply_adapter(bb, name)
            assert not bb.adapters and not any(isinstance(m, zoo.AdapterModule) for m in bb.modules())
            continue
        zoo.apply_adapter(bb, name, **CONFIG.get(name, {}))
        zoo.prepare_adapters(bb, batches)
        trainable = [p for p in bb.parameters() if p.requires_grad]
        if name == "linear":  # nothing of the backbone trains, and a restoration model has no head
            assert not trainable
            continue
        assert trainable, name
        F.l1_loss(bb(batches[0][0]), x).backward()
        assert all(p.grad is not None for p in trainable), name
    with pytest.raises(zoo.SiteError, match="no site 'qkv'"):  # CoLoRA's ViT default targets
        zoo.apply_adapter(tiny(), "colora")


def test_colora_faig_ranks_on_nafnet_fill_the_budget():
    bb = tiny(width=16)
    randomize_blocks(bb)
    g = torch.Generator().manual_seed(0)
    clean = [torch.rand(2, 3, 16, 16, generator=g) for _ in range(2)]
    batches = [(c + 0.1 * torch.randn(c.shape, generator=g), c) for c in clean]
    targets = ["conv_pw", "o", "fc1", "fc2"]
    zoo.apply_adapter(bb, "colora", targets=targets, budget=0.1, finetune_steps=3, finetune_lr=1e-2,
                      faig_steps=3, faig_batches=2)
    (ad,) = bb.adapters
    zoo.prepare_adapters(bb, batches)
    assert set(ad.ranks) == {s.path for s in zoo.find_sites(bb, targets)}
    assert len(set(ad.ranks.values())) > 1  # contribution-dependent, not uniform
    shapes = {s.path: CoLoRA.layer_shape(s) for s in ad.targets_found}
    cost = sum(r * (o + i) for (o, i), r in zip(shapes.values(), (ad.ranks[n] for n in shapes)))
    limit = 0.1 * sum(o * i for o, i in shapes.values())
    assert cost <= limit
    assert cost + max(o + i for o, i in shapes.values()) > limit * 0.9  # the budget is (nearly) used up
    lora = sum(p.numel() for m in ad.modules for n, p in m.named_parameters() if not n.startswith("base."))
    assert lora == cost  # the LoRA parameters are exactly the allocated ranks' cost
