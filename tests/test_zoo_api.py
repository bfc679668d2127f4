"""The library API: sites, identity at init, merge, artifacts, errors (no Lightning)."""
import copy

import pytest
import torch
from torch import nn

import zoo
from tests.conftest import tiny_vit


def _perturb(model, std=0.05):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)


def tiny_sam():
    return zoo.create_backbone("sam", model="samvit_base_patch16", pretrained=False, img_size=32, patch_size=8,
                               embed_dim=64, depth=2, num_heads=2, window_size=2, global_attn_indexes=(1,),
                               neck_chans=32)


def tiny_clip(**kw):
    return zoo.create_backbone("clip", model="ViT-B-32", pretrained=None, **kw)


BACKBONES = {"vit": (tiny_vit, 32), "sam": (tiny_sam, 32)}


def test_registries_list_names():
    assert {"vit", "sam", "clip"} <= set(zoo.list_backbones())
    assert {"linear", "full", "bitfit", "lora", "adapter", "vpt", "ssf"} <= set(zoo.list_adapters())
    with pytest.raises(KeyError, match="valid adapters: .*lora"):
        zoo.apply_adapter(tiny_vit(), "nope")
    with pytest.raises(KeyError, match="valid backbones: .*clip, .*vit"):
        zoo.create_backbone("resnet")


def test_unknown_option_and_missing_site_are_named():
    with pytest.raises(TypeError, match="valid options: rank"):
        zoo.apply_adapter(tiny_vit(), "lora", rnak=4)
    with pytest.raises(zoo.SiteError, match="unknown site"):
        zoo.apply_adapter(tiny_vit(), "lora", targets=["query"])
    with pytest.raises(zoo.SiteError, match="no site 'tokens'"):
        zoo.apply_adapter(tiny_sam(), "vpt")
    with pytest.raises(zoo.SiteError, match="out of range"):
        zoo.apply_adapter(tiny_vit(), "lora", layers=[5])


@pytest.mark.parametrize("family", ["vit", "sam", "clip"])
def test_lora_qv_touches_only_q_and_v_slices(family):
    torch.manual_seed(0)
    if family == "clip":
        bb, x = tiny_clip(towers=["visual"]), torch.randn(2, 3, 224, 224)
    else:
        make, size = BACKBONES[family]
        bb, x = make(), torch.randn(2, 3, size, size)
    with torch.no_grad():
        y0 = bb(x)
    zoo.apply_adapter(bb, "lora", rank=4, targets=["q", "v"])
    with torch.no_grad():
        assert torch.equal(bb(x), y0)  # B = 0: exactly the base model
    _perturb(bb)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    site = zoo.find_sites(bb, ["qkv"], [0])[0]
    w0 = site.base_module.weight.detach().clone()
    d = w0.shape[0] // 3
    zoo.merge_adapters(bb, unload=False)
    dw = site.base_module.weight.detach() - w0
    assert dw[:d].abs().max() > 0 and dw[2 * d:].abs().max() > 0
    assert torch.equal(dw[d:2 * d], torch.zeros_like(dw[d:2 * d]))  # k untouched
    zoo.unmerge_adapters(bb)
    after = bb.state_dict()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)


def test_clip_explicit_attention_matches_open_clip():
    import open_clip

    torch.manual_seed(0)
    bb = tiny_clip()
    ref = open_clip.create_model("ViT-B-32", pretrained=None)
    ref.load_state_dict(bb.model.state_dict())  # also proves the state-dict names match open_clip's
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ref.encode_image(x), bb(x), atol=1e-5)


MERGEABLE = [("lora", {"rank": 4, "targets": ["q", "v", "o", "fc1"]}), ("ssf", {}), ("bitfit", {}), ("full", {}),
             ("linear", {})]


@pytest.mark.parametrize("name,kw", MERGEABLE)
@pytest.mark.parametrize("family", ["vit", "sam"])
def test_merge_equivalence_and_unload_restores_names(name, kw, family):
    make, size = BACKBONES[family]
    bb = make()
    keys0 = list(bb.state_dict())
    x = torch.randn(2, 3, size, size)
    zoo.apply_adapter(bb, name, **kw)
    _perturb(bb)
    bb.eval()
    with torch.no_grad():
        y = bb(x)
        zoo.merge_adapters(bb, unload=False)
        ym = bb(x)
        zoo.unmerge_adapters(bb)
        yu = bb(x)
        scale = y.abs().max()
        assert (ym - y).abs().max() / scale < 1e-5
        assert (yu - y).abs().max() / scale < 1e-5
        zoo.merge_adapters(bb, unload=True)
        assert (bb(x) - y).abs().max() / scale < 1e-5
    assert list(bb.state_dict()) == keys0
    fresh = make()
    fresh.load_state_dict(bb.state_dict())  # strict: same names and shapes as a fresh backbone


@pytest.mark.parametrize("name,kw", [("adapter", {}), ("adapter", {"style": "pfeiffer"}),
                                     ("adapter", {"style": "adaptformer"}), ("vpt", {}), ("vpt", {"mode": "shallow"})])
def test_non_mergeable_raise_and_change_nothing(name, kw):
    bb = tiny_vit()
    zoo.apply_adapter(bb, name, **kw)
    _perturb(bb)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = bb(x)
    with pytest.raises(zoo.NotMergeableError, match="cannot be merged"):
        zoo.merge_adapters(bb)
    with torch.no_grad():
        assert torch.equal(bb(x), y)


@pytest.mark.parametrize("name,kw", [("lora", {}), ("adapter", {}), ("adapter", {"style": "pfeiffer"}),
                                     ("adapter", {"style": "adaptformer"}), ("ssf", {"init": "identity"}),
                                     ("bitfit", {}), ("full", {}), ("linear", {})])
def test_identity_at_init(name, kw):
    bb = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y0 = bb(x)
        zoo.apply_adapter(bb, name, **kw)
        assert torch.equal(bb(x), y0)


def test_parameter_counts_follow_the_formulas():
    bb = tiny_vit()  # depth 2, dim 64, mlp 256
    d, L, r = 64, 2, 4
    zoo.apply_adapter(bb, "lora", rank=r, targets=["q", "v"])
    assert zoo.count_parameters(bb)[0] == L * 2 * (r * d + d * r)
    zoo.remove_adapters(bb)
    zoo.apply_adapter(bb, "adapter", style="houlsby", bottleneck=8)
    assert zoo.count_parameters(bb)[0] == L * 2 * (d * 8 + 8 + 8 * d + d)
    zoo.remove_adapters(bb)
    zoo.apply_adapter(bb, "vpt", mode="deep", num_tokens=5)
    assert zoo.count_parameters(bb)[0] == L * 5 * d
    zoo.remove_adapters(bb)
    zoo.apply_adapter(bb, "ssf")
    assert zoo.count_parameters(bb)[0] == L * 2 * (3 * d + d + 4 * d + d + d + d)
    zoo.remove_adapters(bb)
    total = zoo.count_parameters(bb)[1]
    assert zoo.count_parameters(bb) == (0, total)  # removing adapters leaves the base frozen


def test_gradients_reach_only_adapter_and_head():
    model = zoo.ImageClassifier(tiny_vit(), 16)
    zoo.apply_adapter(model, "lora", rank=4)
    loss = model(torch.randn(4, 3, 32, 32)).sum()
    loss.backward()
    for n, p in model.named_parameters():
        if "lora_A" in n:  # B = 0 at init, so dL/dA = 0 but it is computed
            assert p.grad is not None, n
        elif "lora_B" in n or n.startswith("head."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_vpt_keeps_sequence_length():
    bb = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    n0 = bb.forward_features(x).shape
    for mode in ("deep", "shallow"):
        zoo.apply_adapter(bb, "vpt", mode=mode, num_tokens=7)
        assert bb.forward_features(x).shape == n0
        zoo.remove_adapters(bb)


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = zoo.ImageClassifier(tiny_vit(), 10)
    zoo.apply_adapter(model, "lora", rank=4, targets=["q", "v", "fc2"])
    _perturb(model)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        y = model(x)
    zoo.save_adapter(model, tmp_path / "a", metrics={"val/acc": 0.5})
    torch.manual_seed(0)
    other = zoo.ImageClassifier(tiny_vit(), 10).eval()  # same seed: same base weights
    zoo.load_adapter(other, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(other(x), y)
    meta = zoo.read_adapter_config(tmp_path / "a")
    assert meta["methods"][0]["config"]["targets"] == ["q", "v", "fc2"]
    assert meta["backbone"]["fingerprint"] == other.backbone.fingerprint()


def test_load_onto_different_backbone_fails_and_leaves_model_unchanged(tmp_path):
    torch.manual_seed(0)
    model = zoo.ImageClassifier(tiny_vit(), 10)
    zoo.apply_adapter(model, "lora", rank=4)
    zoo.save_adapter(model, tmp_path / "a")
    torch.manual_seed(1)  # different base weights, same architecture
    other = zoo.ImageClassifier(tiny_vit(), 10)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(zoo.AdapterMismatchError, match="fingerprint"):
        zoo.load_adapter(other, tmp_path / "a")
    assert zoo.adapters_of(other) == [] and list(other.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    deeper = zoo.ImageClassifier(tiny_vit(depth=3), 10)
    with pytest.raises(zoo.AdapterMismatchError, match="depth|fingerprint"):
        zoo.load_adapter(deeper, tmp_path / "a")
    wrong_head = zoo.ImageClassifier(tiny_vit(), 7)
    with pytest.raises(zoo.AdapterMismatchError, match="head"):
        zoo.load_adapter(wrong_head, tmp_path / "a", check_fingerprint=False)
    assert zoo.adapters_of(wrong_head) == []


def test_artifact_has_no_pickle(tmp_path):
    model = zoo.ImageClassifier(tiny_vit(), 10)
    zoo.apply_adapter(model, "lora")
    art = zoo.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in art.iterdir()) == ["adapter.json", "adapter.safetensors"]
    from safetensors import safe_open

    with safe_open(str(art / "adapter.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k or k.startswith("head.") for k in keys)


def test_offline_pretrained_gives_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(zoo.WeightsUnavailableError) as e:
        zoo.create_backbone("vit", model="vit_tiny_patch16_224.augreg_in21k", pretrained=True)
    msg = str(e.value)
    assert "backbone.weights=" in msg and "backbone.pretrained=false" in msg
    assert "Traceback" not in msg


def test_local_weights_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = tiny_vit()
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    bb = tiny_vit(weights=str(tmp_path / "w.safetensors"))
    assert bb.fingerprint() == src.fingerprint()
    assert bb.weights_tag == "file:w.safetensors"
    with pytest.raises(zoo.WeightsUnavailableError, match="not found"):
        tiny_vit(weights=str(tmp_path / "missing.safetensors"))
