"""Zero-shot classifier and CLIP heads, LoRA scaling, CoOp, Comp-LoRA on both towers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.clip_helpers import IMG, tiny_clip
from zoo.zeroshot import CLIPClassifier, zeroshot_weights

NAMES = ["red_circle", "blue star", "green square"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]


def manual_logits(bb, x, names, templates):
    """Per class: normalise each template's text feature, average, re-normalise; cosine × exp(logit_scale)."""
    rows = []
    for c in names:
        t = bb.encode_text(bb.tokenize([tp.format(c.replace("_", " ")) for tp in templates]))
        t = t / t.norm(dim=-1, keepdim=True)
        m = t.mean(0)
        rows.append(m / m.norm())
    img = bb.encode_image(x)
    img = img / img.norm(dim=-1, keepdim=True)
    return bb.model.logit_scale.exp() * img @ torch.stack(rows).t()


def test_zeroshot_logits_equal_manual_computation_and_heads_agree_at_init(tmp_path):
    torch.manual_seed(0)
    bb = tiny_clip()
    x = torch.randn(4, 3, IMG, IMG)
    with torch.no_grad():
        ref = manual_logits(bb, x, NAMES, TEMPLATES)
        for head in ("zeroshot", "linear", "text"):
            model = CLIPClassifier(bb, NAMES, TEMPLATES, head=head, dataset="toy", cache_dir=tmp_path)
            torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4, msg=head)
        fixed = CLIPClassifier(bb, NAMES, TEMPLATES, head="zeroshot", logit_scale=100.0)
        torch.testing.assert_close(fixed(x), ref / bb.model.logit_scale.exp() * 100, atol=1e-4, rtol=1e-4)
    heads = {h: CLIPClassifier(bb, NAMES, TEMPLATES, head=h) for h in ("zeroshot", "linear")}
    assert sum(p.numel() for p in heads["zeroshot"].head.parameters()) == 0  # frozen: a buffer
    assert heads["linear"].head.fc.weight.shape == (3, 32)


def test_zeroshot_cache_per_model_tag_dataset_and_prompts(tmp_path):
    bb = tiny_clip()
    w = zeroshot_weights(bb, NAMES, TEMPLATES, dataset="toy", cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("ViT-B-16--random--toy--")
    from safetensors.torch import save_file

    save_file({"weights": torch.ones_like(w)}, str(files[0]))  # a cache hit reads the file, no recompute
    assert torch.equal(zeroshot_weights(bb, NAMES, TEMPLATES, dataset="toy", cache_dir=tmp_path), torch.ones_like(w))
    zeroshot_weights(bb, NAMES, TEMPLATES[:1], dataset="toy", cache_dir=tmp_path)  # other prompts: other key
    zeroshot_weights(tiny_clip(), NAMES, TEMPLATES, dataset="toy", cache_dir=tmp_path)  # other weights: other key
    assert len(list(tmp_path.iterdir())) == 3


def test_bad_input_for_heads():
    with pytest.raises(ValueError, match="needs the class names"):
        CLIPClassifier(tiny_clip(), [], TEMPLATES)
    with pytest.raises(ValueError, match="valid CLIP heads: zeroshot, linear, text"):
        CLIPClassifier(tiny_clip(), NAMES, head="mlp")
    with pytest.raises(ValueError, match="needs CLIP's text tower.*backbone.towers"):
        CLIPClassifier(tiny_clip(towers=["visual"]), NAMES)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    bb = tiny_clip()
    zoo.apply_adapter(bb, "lora", rank=4, alpha=1.0, scaling="rslora", targets=["q"], tower="both")
    mods = bb.adapters[0].modules
    assert len(mods) == 4 and all(m.scaling == pytest.approx(1 / math.sqrt(4)) for m in mods)
    with torch.no_grad():
        mods[0].lora_B["q"].normal_()
    d = mods[0].linear().out_features // 3
    torch.testing.assert_close(mods[0].delta_weight()[:d], 0.5 * mods[0].lora_B["q"] @ mods[0].lora_A)
    with pytest.raises(ValueError, match="scaling='sqrt'; valid: standard, rslora"):
        zoo.apply_adapter(tiny_clip(), "lora", scaling="sqrt")


def test_coop_context_equals_the_words_it_replaces_and_only_it_trains():
    torch.manual_seed(0)
    bb = tiny_clip()
    model = CLIPClassifier(bb, NAMES, head="text")
    zoo.apply_adapter(model, "coop", n_ctx=4)
    coop = bb.adapters[0]
    assert coop.class_prompts(["red circle"]) == [["X X X X red circle."]]
    words = bb.tokenize(["a photo of a"])[0, 1:5]
    with torch.no_grad():
        coop.modules[0].ctx.copy_(bb.model.token_embedding.base.weight[words])
        ours = bb.encode_text(bb.tokenize(coop.class_prompts(["red circle"])[0]))
        plain = bb.encode_text(bb.tokenize(["a photo of a red circle."]))
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)
    x, y = torch.randn(4, 3, IMG, IMG), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(model(x), y).backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained == ["backbone.model.token_embedding.ctx"]
    assert zoo.count_parameters(model)[0] == 4 * 32


def test_coop_refuses_without_a_text_tower():
    from tests.conftest import tiny_vit

    with pytest.raises(zoo.SiteError, match="CoOp learns the prompt of a CLIP text tower"):
        zoo.apply_adapter(tiny_vit(), "coop")
    with pytest.raises(ValueError, match="needs CLIP's text tower"):
        zoo.apply_adapter(tiny_clip(towers=["visual"]), "coop")
    with pytest.raises(ValueError, match="n_ctx=16 leaves no room"):
        zoo.apply_adapter(tiny_clip(), "coop", n_ctx=16)


def test_comp_lora_on_both_towers_keeps_the_protected_subspace():
    from tests.test_comp_lora import top_k

    torch.manual_seed(0)
    bb = tiny_clip()
    model = CLIPClassifier(bb, NAMES, head="text")
    zoo.apply_adapter(model, "comp_lora", rank=2, k=4, tower="both", dropout=0.0)
    mods = bb.adapters[0].modules
    assert len(mods) == 4  # one fused q/k/v projection per block, 2 visual + 2 text
    w0 = {id(m): m.linear().weight.detach().clone() for m in mods}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    x, y = torch.randn(6, 3, IMG, IMG), torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    zoo.merge_adapters(model, unload=False)
    for m in mods:
        dw_all = m.linear().weight.detach() - w0[id(m)]
        for name, s in m.slices.items():
            dw, w = dw_all[s], w0[id(m)][s]
            u, _, v = top_k(w, 4)
            assert dw.norm() > 1e-4
            assert (u.t() @ dw).norm() <= 1e-4 * dw.norm() and (dw @ v).norm() <= 1e-4 * dw.norm()
