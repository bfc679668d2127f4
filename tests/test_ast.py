"""AST backbone: HF oracle, ImageNet → AST transfer, grid moves, sites, clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import zoo
from zoo.backbones.ast import convert_hf_state_dict, imagenet_to_ast, move_grid
from zoo.backbones.weights import WeightsUnavailableError

TINY = dict(model="deit_tiny_distilled_patch16_224", embed_dim=32, depth=2, num_heads=2)


def tiny_ast(**kw):
    opts = dict(TINY, pretrained=False, max_length=100)
    opts.update(kw)
    return zoo.create_backbone("ast", **opts)


def hf_model(max_length=100, for_classification=False):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                 max_length=max_length, num_mel_bins=128, num_labels=5)
    cls = transformers.ASTForAudioClassification if for_classification else transformers.ASTModel
    m = cls(cfg).eval()
    with torch.no_grad():  # every tensor distinct (LN weights off 1, biases off 0) so a swapped key shows
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


def to_legacy(sd):
    """transformers-5 names -> the legacy names the Hub files carry (the conversion script's)."""
    rules = [("layers.", "encoder.layer."), ("attention.q_proj", "attention.attention.query"),
             ("attention.k_proj", "attention.attention.key"), ("attention.v_proj", "attention.attention.value"),
             ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]
    out = {}
    for k, v in sd.items():
        for a, b in rules:
            k = k.replace(a, b)
        out[k] = v.clone()
    return out


@pytest.mark.parametrize("scheme", ["v5", "legacy", "classification"])
def test_converted_hf_model_gives_the_same_pooled_output(tmp_path, scheme):
    hf = hf_model(for_classification=scheme == "classification")
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if scheme == "legacy":
        sd = to_legacy(sd)
        assert any(".attention.attention.query." in k for k in sd)
    save_file(sd, str(tmp_path / "model.safetensors"))
    ours = tiny_ast(weights=str(tmp_path)).eval()  # a folder, as the Hub snapshot
    assert ours.model.blocks[0].norm1.eps == 1e-12
    x = torch.randn(2, 100, 128)
    with torch.no_grad():
        base = hf.audio_spectrogram_transformer if scheme == "classification" else hf
        ref = base(input_values=x)
        got = ours(x)
        tokens = ours.forward_features(x)
    assert torch.allclose(got, ref.pooler_output, atol=1e-5), (got - ref.pooler_output).abs().max()
    assert torch.allclose(tokens, ref.last_hidden_state, atol=1e-5)


def test_key_conversion_splits_qkv_in_q_k_v_order():
    sd = {"layers.0.attention.q_proj.weight": torch.full((2, 2), 1.0),
          "layers.0.attention.k_proj.weight": torch.full((2, 2), 2.0),
          "layers.0.attention.v_proj.weight": torch.full((2, 2), 3.0)}
    out = convert_hf_state_dict(sd)
    assert out["blocks.0.attn.qkv.weight"][:, 0].tolist() == [1, 1, 2, 2, 3, 3]
    with pytest.raises(WeightsUnavailableError, match="unknown AST checkpoint key"):
        convert_hf_state_dict({"encoder.layer.0.attention.rotary.weight": torch.zeros(1)})


def test_imagenet_transfer_toy_case():
    d, prefix = 3, 2
    grid = torch.arange(6 * 6 * d, dtype=torch.float).reshape(1, 6, 6, d)  # rows = frequency, columns = time
    pos = torch.cat([torch.full((1, prefix, d), -1.0), grid.reshape(1, 36, d)], dim=1)
    kernel = torch.randn(4, 3, 16, 16)
    w, new = imagenet_to_ast(kernel, pos, (6, 6), (2, 3))
    assert w.shape == (4, 1, 16, 16) and torch.allclose(w[:, 0], kernel[:, 0] + kernel[:, 1] + kernel[:, 2])
    # centre cut: time columns from 6//2 - 3//2 = 2, frequency rows from 3 - 1 = 2
    assert torch.equal(new[:, prefix:].reshape(1, 2, 3, d), grid[:, 2:4, 2:5])
    assert torch.equal(new[:, :prefix], pos[:, :prefix])
    # longer time axis: bilinear interpolation of the 6x6 grid to (6, 8), then the frequency cut
    _, new = imagenet_to_ast(kernel, pos, (6, 6), (2, 8))
    interp = F.interpolate(grid.permute(0, 3, 1, 2), size=(6, 8), mode="bilinear")[:, :, 2:4]
    assert torch.allclose(new[:, prefix:].reshape(1, 2, 8, d), interp.permute(0, 2, 3, 1))


def test_imagenet_pretrained_backbone_sums_the_kernel(monkeypatch):
    import timm

    import zoo.backbones.vit as vit

    src = timm.create_model(TINY["model"], pretrained=False, num_classes=0, img_size=96, **{k: v for k, v in TINY.items() if k != "model"})

    def fake(model, pretrained, weights, **kw):  # stands in for the hub download
        assert pretrained
        return src

    kernel = src.patch_embed.proj.weight.detach().clone()
    pos = src.pos_embed.detach().clone()
    monkeypatch.setattr(vit, "create_timm_model", fake)
    bb = tiny_ast(pretrained=True, num_mel_bins=26, max_length=36)  # grid (2, 3)
    assert torch.allclose(bb.model.patch_embed.proj.weight, kernel.sum(1, keepdim=True))
    assert torch.equal(bb.model.pos_embed[:, 2:].reshape(1, 2, 3, -1), pos[:, 2:].reshape(1, 6, 6, -1)[:, 2:4, 2:5])
    assert bb.model.blocks[0].norm1.eps == 1e-6  # ImageNet weights keep timm's eps


def test_move_1024_frame_grid_to_500_frames_as_the_original_ast(tmp_path):
    src = tiny_ast(max_length=1024)
    assert src.grid == (12, 101)
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    dst = tiny_ast(max_length=500, weights=str(tmp_path / "w.safetensors"))
    assert dst.grid == (12, 49) and dst.checkpoint_grid == (12, 101)
    old = src.model.pos_embed.detach()[:, 2:].reshape(1, 12, 101, -1)
    start = 50 - 49 // 2  # ast_models.py: 50 - int(t_dim / 2)
    assert torch.equal(dst.model.pos_embed.detach()[:, 2:].reshape(1, 12, 49, -1), old[:, :, start:start + 49])
    # longer than the checkpoint: interpolate (12, 101) -> (12, 120)
    moved = move_grid(src.model.pos_embed.detach(), (12, 101), (12, 120))
    ref = F.interpolate(old.permute(0, 3, 1, 2), size=(12, 120), mode="bilinear").permute(0, 2, 3, 1)
    assert torch.allclose(moved[:, 2:].reshape(1, 12, 120, -1), ref)
    assert torch.equal(dst.model.blocks[1].attn.qkv.weight, src.model.blocks[1].attn.qkv.weight)


@pytest.mark.parametrize("pooling", ["cls_dist", "cls", "mean"])
def test_pooling(pooling):
    bb = tiny_ast(pooling=pooling).eval()
    x = torch.randn(2, 100, 128)
    tok = bb.forward_features(x)
    want = {"cls_dist": (tok[:, 0] + tok[:, 1]) / 2, "cls": tok[:, 0], "mean": tok.mean(1)}[pooling]
    assert torch.allclose(bb(x), want)
    # [B, 1, F, T] is the same input as [B, T, F]
    assert torch.allclose(bb(x.transpose(1, 2).unsqueeze(1)), want, atol=1e-6)


def test_sites_are_the_vit_sites():
    bb = tiny_ast()
    assert bb.num_prefix_tokens == 2
    table = bb.block_sites(0)
    assert {"q", "k", "v", "qkv", "o", "fc1", "fc2", "attn", "mlp", "norm1", "norm2", "tokens"} <= set(table)
    assert table["v"][2] == slice(64, 96)


def test_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="pooling"):
        tiny_ast(pooling="max")
    with pytest.raises(ValueError, match="at least one 16x16 patch"):
        tiny_ast(max_length=10)
    with pytest.raises(ValueError, match="distilled"):
        zoo.create_backbone("ast", model="vit_tiny_patch16_224", pretrained=False)
    bb = tiny_ast()
    with pytest.raises(ValueError, match="pad/cut to backbone.max_length"):
        bb(torch.randn(1, 90, 128))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="(?s)could not download.*backbone.weights="):
        tiny_ast(weights="MIT/ast-finetuned-audioset-10-10-0.4593")
    with pytest.raises(WeightsUnavailableError, match="not found"):
        tiny_ast(weights="./no/such/file.safetensors")


def test_imagenet_weights_offline_give_the_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="(?s)could not download pretrained weights for timm model.*backbone.weights="):
        tiny_ast(pretrained=True)


def test_a_demo_checkpoint_of_another_geometry_says_to_pretrain_again(tmp_path):
    """A stale ``ast_demo.safetensors`` (stride 10: 12x9 patches) under the stride-16 demo config (8x6) is
    refused with the command that rewrites it; any other file of an unknown grid asks for its config.json."""
    tiny = {"model": "deit_tiny_distilled_patch16_224", "pretrained": False, "embed_dim": 16, "depth": 1,
            "num_heads": 2, "max_length": 100}
    sd = zoo.create_backbone("ast", fstride=10, tstride=10, **tiny).model.state_dict()
    for name in ("ast_demo.safetensors", "other.safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / name))
    with pytest.raises(WeightsUnavailableError, match=r"108 patch positions.*8x6.*experiment=audio_upstream` again"):
        zoo.create_backbone("ast", weights=str(tmp_path / "ast_demo.safetensors"), fstride=16, tstride=16, **tiny)
    with pytest.raises(WeightsUnavailableError, match=r"8x6; put the checkpoint's config.json"):
        zoo.create_backbone("ast", weights=str(tmp_path / "other.safetensors"), fstride=16, tstride=16, **tiny)
