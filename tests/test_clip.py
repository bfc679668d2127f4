"""CLIP as a whole model: both towers, explicit attention, tower selection, weights, bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
from tests.clip_helpers import IMG, TINY, tiny_clip, tiny_open_clip
from zoo.backbones.clip import ExplicitMultiheadAttention


def _perturb(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_explicit_mha_equals_nn_mha_with_every_mask_form(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    ex = ExplicitMultiheadAttention.from_mha(mha).eval()
    B, L = 3, 7
    x = torch.randn(B, L, 32) if batch_first else torch.randn(L, B, 32)
    causal = torch.full((L, L), float("-inf")).triu(1)
    bool_causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, -2:] = True
    per_sample = torch.randn(B * 4, L, L)  # (B·heads, L, L) additive, as open_clip's padding masks
    cases = [{}, {"attn_mask": causal}, {"attn_mask": bool_causal}, {"key_padding_mask": kpm},
             {"attn_mask": causal, "key_padding_mask": kpm}, {"attn_mask": per_sample}]
    for kw in cases:
        ref = mha(x, x, x, need_weights=False, **kw)[0]
        out = ex(x, x, x, need_weights=False, **kw)[0]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=str(list(kw)))


def test_both_towers_equal_open_clip_and_state_dict_names_match():
    torch.manual_seed(0)
    bb = tiny_clip()
    ref = tiny_open_clip()
    ref.load_state_dict(bb.model.state_dict())  # strict: our explicit attention keeps open_clip's names
    assert sum(isinstance(m, nn.MultiheadAttention) for m in bb.modules()) == 0
    assert sum(isinstance(m, ExplicitMultiheadAttention) for m in bb.modules()) == 4  # 2 visual + 2 text blocks
    x = torch.randn(2, 3, IMG, IMG)
    tokens = bb.tokenize(["a photo of a red circle.", "blue star"])
    assert bb.model.attn_mask is not None and torch.isinf(bb.model.attn_mask).any()  # the causal mask is used
    with torch.no_grad():
        torch.testing.assert_close(bb(x), ref.encode_image(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bb.encode_text(tokens), ref.encode_text(tokens), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bb.logit_scale, ref.logit_scale.exp())


def test_custom_text_tower_with_padding_mask_equals_open_clip():
    """CustomTextCLIP with a class token builds a (B·heads, L, L) causal + padding mask."""
    torch.manual_seed(0)
    text_cfg = {**TINY["text_cfg"], "embed_cls": True, "pad_id": 0}
    bb = tiny_clip(text_cfg=text_cfg, force_custom_text=True)
    ref = tiny_open_clip(text_cfg=text_cfg, force_custom_text=True)
    ref.load_state_dict(bb.model.state_dict())
    assert zoo.find_sites(bb, ["q"], "all", "text")[0].path == "model.text.transformer.resblocks.0.attn.in_proj[q]"
    tokens = bb.tokenize(["a photo", "a much longer caption of a thing"])
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_text(tokens), ref.encode_text(tokens), atol=1e-5, rtol=1e-5)


def test_tower_selection_finds_sites_on_each_tower():
    bb = tiny_clip()
    vis = zoo.find_sites(bb, ["q", "v"])  # default: the visual tower (the VTAB use)
    txt = zoo.find_sites(bb, ["q", "v"], "all", "text")
    both = zoo.find_sites(bb, ["q", "v"], [1], "both")
    assert {s.tower for s in vis} == {"visual"} and {s.tower for s in txt} == {"text"}
    assert all(s.path.startswith("model.visual.") for s in vis)
    assert all(s.path.startswith("model.transformer.") for s in txt)
    assert [(s.tower, s.layer, s.kind) for s in both] == [("visual", 1, "q"), ("visual", 1, "v"),
                                                         ("text", 1, "q"), ("text", 1, "v")]


def test_lora_on_text_qv_leaves_k_and_outputs_at_init_untouched():
    torch.manual_seed(0)
    bb = tiny_clip()
    x, tokens = torch.randn(2, 3, IMG, IMG), bb.tokenize(["red circle", "blue star"])
    with torch.no_grad():
        img0, txt0 = bb(x), bb.encode_text(tokens)
    vis_w0 = {k: v.clone() for k, v in bb.model.visual.state_dict().items()}
    zoo.apply_adapter(bb, "lora", rank=2, targets=["q", "v"], tower="text")
    assert bb.adapters[0].config["tower"] == "text"
    with torch.no_grad():
        assert torch.equal(bb(x), img0) and torch.equal(bb.encode_text(tokens), txt0)  # B = 0
    _perturb(bb)
    with torch.no_grad():
        assert not torch.allclose(bb.encode_text(tokens), txt0)
        assert torch.equal(bb(x), img0)  # the visual tower has no adapter
    sites = zoo.find_sites(bb, ["qkv"], "all", "text")
    w0 = [s.base_module.weight.detach().clone() for s in sites]
    zoo.merge_adapters(bb, unload=True)
    d = w0[0].shape[0] // 3
    for s, w in zip(zoo.find_sites(bb, ["qkv"], "all", "text"), w0):
        dw = s.base_module.weight.detach() - w
        assert dw[:d].abs().max() > 0 and dw[2 * d:].abs().max() > 0
        assert torch.equal(dw[d:2 * d], torch.zeros_like(dw[d:2 * d]))  # k untouched
    assert all(torch.equal(v, bb.model.visual.state_dict()[k]) for k, v in vis_w0.items())


def test_lora_on_both_towers_trains_both():
    bb = tiny_clip()
    zoo.apply_adapter(bb, "lora", rank=2, targets=["q", "k", "v"], tower="both")
    x, tokens = torch.randn(2, 3, IMG, IMG), bb.tokenize(["red circle", "blue star"])
    img = bb.encode_image(x, normalize=True)
    txt = bb.encode_text(tokens, normalize=True)
    (img @ txt.t()).sum().backward()
    grads = {n.split(".resblocks")[0] for n, p in bb.named_parameters() if p.grad is not None}
    assert grads == {"model.visual.transformer", "model.transformer"}


def test_bad_tower_requests_are_one_clear_line():
    from tests.conftest import tiny_vit

    with pytest.raises(zoo.SiteError, match="single tower"):
        zoo.apply_adapter(tiny_vit(), "lora", tower="text")
    with pytest.raises(zoo.SiteError, match="unknown tower 'decoder'.*visual \\| text \\| both"):
        zoo.apply_adapter(tiny_clip(), "lora", tower="decoder")
    visual_only = tiny_clip(towers=["visual"])
    assert not hasattr(visual_only.model, "token_embedding")
    with pytest.raises(zoo.SiteError, match="tower 'text' is not built.*backbone.towers"):
        zoo.apply_adapter(visual_only, "lora", tower="text")
    with pytest.raises(ValueError, match="needs CLIP's text tower.*backbone.towers=\\[visual,text\\]"):
        visual_only.encode_text(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(zoo.SiteError, match="tower 'text' has no site 'tokens'"):
        zoo.apply_adapter(tiny_clip(), "vpt", tower="text")
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'"):
        zoo.create_backbone("clip", model="ViT-Q-99")
    with pytest.raises(ValueError, match="no pretrained tag 'nope'; valid tags: .*openai"):
        zoo.create_backbone("clip", model="ViT-B-16", pretrained="nope")


def test_local_weights_by_path_whole_model_and_visual_only(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = tiny_clip()
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in src.model.visual.state_dict().items()}, tmp_path / "v.safetensors")
    x = torch.randn(2, 3, IMG, IMG)
    torch.manual_seed(2)
    bb = tiny_clip(pretrained=str(tmp_path / "w.safetensors"))
    assert bb.weights_tag == "file:w.safetensors"
    tokens = bb.tokenize(["red circle"])
    with torch.no_grad():
        torch.testing.assert_close(bb(x), src(x))
        torch.testing.assert_close(bb.encode_text(tokens), src.encode_text(tokens))
    vis = tiny_clip(towers=["visual"], weights=str(tmp_path / "v.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(vis(x), src(x))
    save_file({"visual.nonsense": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="not in this open_clip model"):
        tiny_clip(weights=str(tmp_path / "bad.safetensors"))


def test_offline_pretrained_tag_is_one_clear_message(monkeypatch):
    import open_clip

    def no_hub(*a, **k):
        raise RuntimeError("Failed to download weights for tag 'openai'")

    monkeypatch.setattr(open_clip, "create_model", no_hub)
    with pytest.raises(zoo.WeightsUnavailableError, match="could not download pretrained weights for open_clip "
                       "ViT-B-16/openai.*\n.*backbone.weights=/path/to/"):
        zoo.create_backbone("clip", model="ViT-B-16", pretrained="openai")


def test_preprocess_and_tokenizer_come_from_open_clip():
    import open_clip

    bb = tiny_clip()
    assert bb.tokenize(["a"]).shape == (1, 16)
    assert torch.equal(bb.tokenize(["red circle"]), open_clip.get_tokenizer("ViT-B-16", context_length=16)(["red circle"]))
    names = [type(t).__name__ for t in bb.preprocess(is_train=True).transforms]
    assert names[0] == "RandomResizedCrop" and "Normalize" in names
    assert [type(t).__name__ for t in bb.preprocess().transforms][:2] == ["Resize", "CenterCrop"]


def test_openai_torchscript_archive_is_refused_without_loading_it(tmp_path):
    """OpenAI's clip.load .pt files are TorchScript archives: torch.jit.load would run their code, so
    the backbone refuses them with one line naming the safe routes (never reaching a loader)."""
    import warnings

    from zoo.backbones.clip import is_torchscript_archive

    path = tmp_path / "ViT-B-16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script/save deprecation notices
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 3)), str(path))
    plain = tmp_path / "plain.pt"
    torch.save(tiny_open_clip().state_dict(), plain)
    assert is_torchscript_archive(path) and not is_torchscript_archive(plain)
    with pytest.raises(ValueError, match=r"TorchScript archive .*refused. Use backbone.pretrained=openai"):
        tiny_clip(weights=str(path))
    tiny_clip(weights=str(plain))  # a weights-only torch state dict still loads


def _lora_text(bb):
    zoo.apply_adapter(bb, "lora", rank=2, targets=["q", "v"], tower="text")
    _perturb(bb)  # non-zero B: the adapter changes the features


@pytest.mark.parametrize("custom", [False, True])
def test_encode_text_cuts_padding_exactly(custom, monkeypatch):
    """Causal mask + EOT pooling: encode_text runs on max(eot)+1 tokens and equals open_clip's full forward,
    features and gradients (with a text LoRA), on CLIP and on a CustomTextCLIP text tower."""
    import zoo.backbones.clip as clip_mod

    torch.manual_seed(0)
    bb = tiny_clip(**({"force_custom_text": True} if custom else {}))
    _lora_text(bb)
    tokens = bb.tokenize(["a photo of a red circle.", "blue star", "a green square", "red star"])
    lengths = (tokens.argmax(-1) + 1).tolist()
    assert max(lengths) < tokens.shape[1] and len(set(lengths)) == 3
    seen = []
    real = clip_mod._encode_text_prefix
    monkeypatch.setattr(clip_mod, "_encode_text_prefix", lambda o, t, nz: seen.append(t.shape) or real(o, t, nz))
    cut = bb.encode_text(tokens, normalize=True)
    # one run per prompt length, each on its own prompts only
    assert sorted(seen) == sorted((lengths.count(n), n) for n in set(lengths))
    full = bb.model.encode_text(tokens, normalize=True)  # open_clip's own forward over all 16 positions
    torch.testing.assert_close(cut, full, atol=1e-6, rtol=1e-5)
    params = [p for p in bb.parameters() if p.requires_grad]
    g_cut = torch.autograd.grad(cut.square().sum(), params)
    g_full = torch.autograd.grad(full.square().sum(), params)
    for a, b in zip(g_cut, g_full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_encode_text_keeps_full_length_when_cutting_would_not_be_exact(monkeypatch):
    import zoo.backbones.clip as clip_mod

    calls = []
    monkeypatch.setattr(clip_mod, "_encode_text_prefix", lambda *a: calls.append(a))
    # no causal mask: every position sees the padding
    bb = tiny_clip()
    tokens = bb.tokenize(["a red circle."])
    bb.model.attn_mask = None
    bb.encode_text(tokens)
    # a text tower with an appended CLS embedding pools the last position
    text_cfg = {**TINY["text_cfg"], "embed_cls": True, "pad_id": 0}
    bb = tiny_clip(text_cfg=text_cfg, force_custom_text=True)
    bb.encode_text(tokens)
    # 'last' pooling reads the final (padding) position
    bb = tiny_clip()
    bb.model.text_pool_type = "last"
    bb.encode_text(tokens)
    # a mask that is not exactly causal
    bb = tiny_clip()
    bb.model.attn_mask = bb.model.attn_mask.clone()
    bb.model.attn_mask[3, 1] = float("-inf")
    bb.encode_text(tokens)
    assert calls == []
    assert clip_mod._is_causal(torch.ones(4, 4, dtype=torch.bool).triu(1))
    assert not clip_mod._is_causal(torch.ones(4, 4, dtype=torch.bool).triu(2))


@pytest.mark.parametrize("method", ["bitfit", "full"])
def test_an_artifact_holds_the_trained_in_proj_tensors(tmp_path, method):
    """ExplicitMultiheadAttention stores in_proj.weight/bias as in_proj_weight/bias (open_clip's names): an
    artifact must still hold them when they train (bitfit: the biases; full: everything), and restore them."""
    torch.manual_seed(0)
    bb = tiny_clip()
    zoo.apply_adapter(bb, method)
    assert bb.model.visual.transformer.resblocks[0].attn.in_proj.bias.requires_grad
    _perturb(bb)
    state = zoo.adapter_state_dict(bb, export=False)
    trained = {k for k in bb.model.state_dict() if k.startswith("visual.") and "in_proj" in k
               and (method == "full" or k.endswith("bias"))}  # the method's default tower: visual
    assert trained and {f"model.{k}" for k in trained} <= set(state)
    zoo.save_adapter(bb, tmp_path / "a")
    torch.manual_seed(0)
    fresh = tiny_clip()
    zoo.load_adapter(fresh, tmp_path / "a")
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), bb(x))


def test_random_weights_asked_for_are_built_without_open_clip_noise(caplog):
    """pretrained=None is random on purpose (or a weights file loaded right after): no "No pretrained weights
    loaded" warning and none of open_clip's INFO narration; the warning stays where weights were expected."""
    import logging

    import open_clip

    from zoo.backbones.clip import open_clip_quietly

    with caplog.at_level(logging.INFO):
        bb = tiny_clip()
        bb.tokenize(["a red square"])  # the tokenizer's narration too
    assert bb.weights_tag is None
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "No pretrained weights" in m or "Parsing model identifier" in m
                or "tokenizer" in m.lower()], said
    caplog.clear()
    with caplog.at_level(logging.INFO), open_clip_quietly():  # how a pretrained tag is built: the warning is kept
        open_clip.create_model("ViT-B-16", pretrained=None, **TINY)
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if m.startswith("No pretrained weights loaded for model 'ViT-B-16'")], said
    assert not [m for m in said if "Parsing model identifier" in m], said
