"""peft export of issue #26's methods: EVA / LoRA-Pro (LoRA modules; round trip), DyLoRA at its eval rank,
LoRA-GA with its frozen offset (rank 2r), MiSS / SHiRA as peft MissConfig / ShiraConfig; the rest refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import zoo
from tests.export_helpers import (
    example_input,
    library_features,
    library_model,
    train_a_little,
    zoo_backbone,
    zoo_features,
)
from zoo.export import ExportError, export_peft, load_peft

peft = pytest.importorskip("peft")


def adapted(family, tmp_path, method, prepare=False, **opts):
    """A zoo model (ViT: with a head, which goes to modules_to_save) with ``method`` trained a little."""
    base = library_model(family, num_classes=5 if family == "vit" else 0)
    bb = zoo_backbone(family, base, tmp_path).eval()
    model = zoo.ImageClassifier(bb, 5) if family == "vit" else bb
    zoo.apply_adapter(model, method, **opts)
    if prepare:  # EVA / LoRA-GA's data pass (a ViT classifier: images and labels)
        g = torch.Generator().manual_seed(0)
        zoo.prepare_adapters(model, [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g))] * 3)
    train_a_little(model)
    return base, bb, model.eval()


def assert_peft_gives_zoo_outputs(family, base, bb, model, folder):
    x = example_input(family)
    with torch.no_grad():
        plain = library_features(family, base, x)
        want, logits = zoo_features(family, bb, x), model(x)
    export_peft(model, folder)
    pm = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        got = library_features(family, base, x)
        if family == "vit":
            assert torch.allclose(pm(x), logits, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter changes the output
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    return json.loads((folder / "adapter_config.json").read_text())


def assert_round_trip(family, base, bb, model, folder, tmp_path):
    fresh_bb = zoo_backbone(family, base, tmp_path)
    fresh = zoo.ImageClassifier(fresh_bb, 5) if family == "vit" else fresh_bb
    load_peft(fresh, folder)
    assert [a.name for a in fresh_bb.adapters] == [a.name for a in bb.adapters]
    assert fresh_bb.adapters[0].config == bb.adapters[0].config
    want, got = zoo.adapter_state_dict(model), zoo.adapter_state_dict(fresh)
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("family", ["vit", "ast"])
def test_eva_with_redistributed_ranks_in_peft_and_back(family, tmp_path):
    """EVA's per-unit ranks (rank redistribution) -> rank_pattern; its q and v wrappers stacked on one
    timm qkv -> one LoRA (rank r_q + r_v); load_peft rebuilds the EVA with the recorded ranks."""
    base, bb, model = adapted(family, tmp_path, "eva", rank=2, targets=["q", "v", "fc1"])
    ranks = {"model.blocks.0.attn.qkv[q]": 3, "model.blocks.0.attn.qkv[v]": 1, "model.blocks.0.mlp.fc1": 2,
             "model.blocks.1.attn.qkv[q]": 2, "model.blocks.1.attn.qkv[v]": 0, "model.blocks.1.mlp.fc1": 4}
    zoo.remove_adapters(model)
    zoo.apply_adapter(model, "eva", rank=2, targets=["q", "v", "fc1"], ranks=ranks)
    train_a_little(model)
    model.eval()
    cfg = assert_peft_gives_zoo_outputs(family, base, bb, model, tmp_path / "peft")
    if family == "vit":
        pattern = {m: cfg["rank_pattern"].get("^" + m.replace(".", "\\."), cfg["r"]) for m in cfg["target_modules"]}
        assert pattern == {"blocks.0.attn.qkv": 4, "blocks.0.mlp.fc1": 2, "blocks.1.attn.qkv": 2, "blocks.1.mlp.fc1": 4}
    assert_round_trip(family, library_model(family, num_classes=5 if family == "vit" else 0), bb, model,
                      tmp_path / "peft", tmp_path)


def test_eva_after_its_data_pass(tmp_path):
    base, bb, model = adapted("vit", tmp_path, "eva", prepare=True, rank=2, targets=["q", "v", "fc1"])
    assert bb.adapters[0].config["ranks"]
    assert_peft_gives_zoo_outputs("vit", base, bb, model, tmp_path / "peft")
    assert_round_trip("vit", library_model("vit", num_classes=5), bb, model, tmp_path / "peft", tmp_path)


def test_eva_training_biases_is_refused(tmp_path):
    _, _, model = adapted("vit", tmp_path, "eva", rank=2, train_biases=True)
    with pytest.raises(ExportError, match="train_biases"):
        export_peft(model, tmp_path / "p")


@pytest.mark.parametrize("family", ["vit", "ast"])
def test_lora_pro_is_a_lora_in_peft_and_back(family, tmp_path):
    base, bb, model = adapted(family, tmp_path, "lora_pro", rank=2, alpha=5.0, targets=["q", "v", "fc2"])
    assert_peft_gives_zoo_outputs(family, base, bb, model, tmp_path / "peft")
    assert_round_trip(family, library_model(family, num_classes=5 if family == "vit" else 0), bb, model,
                      tmp_path / "peft", tmp_path)


@pytest.mark.parametrize("family", ["vit", "ast"])
def test_lora_ga_exports_its_offset_as_a_rank_2r_lora(family, tmp_path):
    """γ (BA − B0A0) = γ [B, −B0][A; A0]: exporting only A, B (a plain LoRA) would add γ B0 A0 back."""
    base, bb, model = adapted(family, tmp_path, "lora_ga", prepare=family == "vit", rank=2, alpha=4.0,
                              targets=["fc1"], batches=2)
    w = bb.model.blocks[0].mlp.fc1
    if family == "ast":  # no data pass on the AST: a nonzero offset by hand
        with torch.no_grad():
            w.init_A.normal_()
            w.init_Bt.normal_()
    assert w.init_A.any() and w.init_Bt.any()
    cfg = assert_peft_gives_zoo_outputs(family, base, bb, model, tmp_path / "peft")
    assert cfg["r"] == 4 and cfg["lora_alpha"] == pytest.approx(4.0 / 2 * 4)  # rank 2r, γ = α/r kept
    key = "blocks.0.mlp.fc1" if family == "vit" else "encoder.layer.0.intermediate.dense"
    t = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    a, b = t[f"base_model.model.{key}.lora_A.weight"], t[f"base_model.model.{key}.lora_B.weight"]
    assert torch.equal(a[2:], w.init_A) and torch.equal(b[:, 2:], -w.init_Bt.t())
    # load_peft brings it back as the plain LoRA of the same function
    fresh_bb = zoo_backbone(family, library_model(family, num_classes=5 if family == "vit" else 0), tmp_path)
    fresh = zoo.ImageClassifier(fresh_bb, 5) if family == "vit" else fresh_bb
    load_peft(fresh.eval(), tmp_path / "peft")
    assert fresh_bb.adapters[0].name == "lora" and fresh_bb.adapters[0].config["rank"] == 4
    x = example_input(family)
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-5)


@pytest.mark.parametrize("family", ["vit", "ast"])
def test_dylora_exports_its_eval_rank(family, tmp_path):
    """The first e components with γ = α/e (DyLoRA's r/e rescaling of α/r): what eval() computes."""
    base, bb, model = adapted(family, tmp_path, "dylora", rank=4, alpha=6.0, eval_rank=3, targets=["q", "v"])
    cfg = assert_peft_gives_zoo_outputs(family, base, bb, model, tmp_path / "peft")
    slices = 2 if family == "vit" else 1  # q and v on one timm qkv; HF's query / value apart
    assert cfg["r"] == 3 * slices and cfg["lora_alpha"] == pytest.approx(6.0 / 3 * 3 * slices)
    w = bb.model.blocks[0].attn.qkv
    key = "blocks.0.attn.qkv" if family == "vit" else "encoder.layer.0.attention.attention.query"
    a = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))[f"base_model.model.{key}.lora_A.weight"]
    assert torch.equal(a[:3], w.lora_A[:3])  # the raw first e rows of the q slice
    bb.adapters[0].set_eval_rank(1)  # another truncation: another export
    cfg = assert_peft_gives_zoo_outputs(family, library_model(family, num_classes=5 if family == "vit" else 0), bb, model,
                                        tmp_path / "peft1")
    assert cfg["r"] == slices


@pytest.mark.parametrize("family", ["vit", "ast"])
@pytest.mark.parametrize("variant,opts", [("balance", {"targets": ["q", "v"]}), ("bat", {"targets": ["q", "v", "o"]}),
                                          ("mini", {"mini_r": 8, "targets": ["qkv", "fc1"]})])
def test_miss_is_peft_miss(family, variant, opts, tmp_path):
    """q / v shards on a fused qkv are one peft shard with zero k columns (balance) / zero k blocks (bat)."""
    base, bb, model = adapted(family, tmp_path, "miss", rank=4, variant=variant, init="random", **opts)
    cfg = assert_peft_gives_zoo_outputs(family, base, bb, model, tmp_path / "peft")
    assert cfg["peft_type"] == "MISS" and cfg["init_weights"] == {"balance": True, "bat": "bat", "mini": "mini"}[variant]
    if family == "vit" and variant != "mini":
        d = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))["base_model.model.blocks.0.attn.qkv.miss_block"]
        k_rows = d[:, 32:64] if variant == "balance" else d[8:16]
        assert not k_rows.any()


def test_miss_mini_on_qkv_slices_is_refused(tmp_path):
    _, _, model = adapted("vit", tmp_path, "miss", rank=4, variant="mini", mini_r=8, targets=["q", "v"])
    with pytest.raises(ExportError, match="MiSS mini tiles one"):
        export_peft(model, tmp_path / "p")


@pytest.mark.parametrize("family", ["vit", "ast"])
@pytest.mark.parametrize("rank,mask,targets", [(3, "random", ["q"]), (2, "weight", ["q", "v", "fc2"]),
                                                (2, "random", ["qkv"])])
def test_shira_is_peft_shira_with_its_mask(family, rank, mask, targets, tmp_path):
    """The zoo's mask travels as shira_indices (times the zoo's scale); a q slice of timm's qkv has r(d_in+d)
    entries, peft's module r′(d_in+3d): padded with zero entries outside the mask."""
    base, bb, model = adapted(family, tmp_path, "shira", rank=rank, mask=mask, scale=0.5, targets=targets)
    cfg = assert_peft_gives_zoo_outputs(family, base, bb, model, tmp_path / "peft")
    assert cfg["peft_type"] == "SHIRA"
    t = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    key, rows = ("blocks.0.attn.qkv", 96) if family == "vit" else ("encoder.layer.0.attention.attention.query", 32)
    vals, idx = t[f"base_model.model.{key}.shira_weight"], t[f"base_model.model.{key}.shira_indices"].long()
    assert vals.numel() == idx.shape[1] == cfg["r"] * (32 + rows)  # peft's count for its module
    dense = torch.zeros(rows, 32)
    dense[idx[0], idx[1]] = vals
    assert torch.equal(dense, bb.model.blocks[0].attn.qkv.delta_weight()[:rows])  # the same entries and values
    if family == "vit" and targets == ["q"]:
        assert cfg["r"] == 2 and vals.numel() == 256 > 3 * (32 + 32)  # r′ = ⌈192 / 128⌉, 64 zero entries padded


@pytest.mark.parametrize("method,opts", [("loldu", {}), ("s2ft", {}), ("compacter", {}), ("galore", {"rank": 2})])
def test_other_new_methods_are_refused_by_name(method, opts, tmp_path):
    base = library_model("vit", num_classes=5)
    model = zoo.ImageClassifier(zoo_backbone("vit", base, tmp_path), 5)
    zoo.apply_adapter(model, method, **opts)
    with pytest.raises(ExportError, match=f"method '{method}' has no peft equivalent") as e:
        export_peft(model, tmp_path / "x")
    assert "\n" not in str(e.value)
    assert ("--merged" in str(e.value)) == zoo.ADAPTERS.get(method).mergeable


def test_miss_and_shira_on_clip_mlp_and_refused_on_its_attention(tmp_path):
    """open_clip's attention is one nn.MultiheadAttention, which peft adapts with LoRA only."""
    base = library_model("clip")
    bb = zoo_backbone("clip", base, tmp_path).eval()
    zoo.apply_adapter(bb, "miss", rank=4, init="random", targets=["fc1", "fc2"])
    assert_peft_gives_zoo_outputs("clip", base, bb, bb, tmp_path / "peft")
    bb = zoo_backbone("clip", library_model("clip"), tmp_path).eval()
    zoo.apply_adapter(bb, "shira", rank=2, targets=["q", "v"])
    with pytest.raises(ExportError, match="MultiheadAttention layer .* has no MiSS / SHiRA"):
        export_peft(bb, tmp_path / "p")
