"""MiSS, SHiRA, LoLDU, S²FT and Compacter beyond the ViT: SAM's mask decoder (tower=decoder), CLIP's two
towers at once, and their trainable counts on ViT-B/16 from the formulas (the numbers in
docs/adapters/new-methods-a.md). The every-adapter tests (test_gradients, test_petl_ast, test_sam_seg,
test_morph, test_nafnet, test_unet, test_coca, test_clip_adapters, test_pde_task) cover the other backbones."""
from __future__ import annotations

import pytest
import torch

import zoo
from tests.clip_helpers import tiny_clip
from tests.seg_helpers import IMG, tiny_segmenter

SMALL = {"miss": {"rank": 8}, "shira": {"rank": 4}, "loldu": {}, "s2ft": {"head_ratio": 0.5, "channel_ratio": 0.05},
         "compacter": {}}
ZERO_INIT = ("miss", "shira", "loldu", "s2ft")  # unchanged model at init (Compacter's PHM factors are both random)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_sam_mask_decoder_tower(name):
    torch.manual_seed(0)
    model = tiny_segmenter(num_classes=2, train_decoder="no_transformer")
    x = torch.randn(2, 3, IMG, IMG)
    if name == "compacter":  # Houlsby adapters go after 'attn' sub-blocks; the decoder's attentions are not one
        with pytest.raises(zoo.SiteError, match="has no site 'attn'"):
            zoo.apply_adapter(model, name, tower="decoder")
        assert not zoo.adapters_of(model)
        return
    with torch.no_grad():
        before = model(x)
    zoo.apply_adapter(model, name, tower="decoder", **SMALL[name])
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    ours = [(n, p) for n, p in model.decoder.named_parameters() if p.requires_grad and "transformer" in n]
    assert ours and not any(p.requires_grad for p in model.backbone.parameters())
    with torch.no_grad():
        for _, p in ours:
            p.normal_(0, 0.05) if name != "loldu" else p.mul_(1.5)
    model(x).pow(2).mean().backward()
    assert all(p.grad is not None for _, p in ours)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_clip_both_towers(name):
    torch.manual_seed(0)
    bb = tiny_clip()
    zoo.apply_adapter(bb, name, tower="both", **SMALL[name])
    trainable = [n for n, p in bb.named_parameters() if p.requires_grad]
    assert any(n.startswith("model.visual.") for n in trainable)
    assert any(not n.startswith("model.visual.") for n in trainable)  # the text tower's blocks too


VIT_B = {  # name, options -> trainable parameters on ViT-B/16 (12 blocks, d = 768, MLP 3072, 12 heads)
    ("miss", ()): 12 * 2 * 64 * 768,  # r·d_out on q and v
    ("shira", ()): 12 * 2 * 32 * (768 + 768),  # r·(d_in + d_out) on q and v
    ("loldu", ()): 12 * 2 * 768,  # r = min(d_out, d_in) diagonal entries on q and v
    ("s2ft", ()): int(0.052 * 12 * 12) * 64 * 768 + int(0.02 * 12 * 3072) * 768,  # 7 heads · d_h · d + 737 channels · d
    ("compacter", ()): 24 * (2 * (768 + 24) + 24 + 768) + 4 ** 3 + 12 * 2 * 2 * 768,  # 24 PHM adapters, rule, LNs
    ("compacter", (("variant", "compacter++"),)): 12 * (2 * (768 + 24) + 24 + 768) + 4 ** 3 + 12 * 2 * 2 * 768,
}


@pytest.mark.slow
@pytest.mark.parametrize("name,opts", sorted(VIT_B))
def test_vit_b16_counts_from_the_formula(name, opts):
    bb = zoo.create_backbone("vit", model="vit_base_patch16_224", pretrained=False)
    zoo.apply_adapter(bb, name, **dict(opts))
    assert zoo.count_parameters(bb)[0] == VIT_B[(name, opts)]
