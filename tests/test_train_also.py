"""Every adapter's ``train_also``: the backbone norms that train beside the method (peft's ``modules_to_save``;
PETL-AST trains AST's final LayerNorm under every method and the blocks' layernorm_after / layernorm_before
with its adapters). Exactly those tensors get gradients, the count is the formula, the artifact restores
them, and the peft / merged exports and MultiAdapter carry them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.export_helpers import (
    example_input,
    library_features,
    library_model,
    train_a_little,
    zoo_backbone,
    zoo_features,
)
from tests.test_ast import tiny_ast
from zoo.sites import SiteError

X = torch.randn(2, 100, 128, generator=torch.Generator().manual_seed(0))


def norms_of(bb, names):
    """The timm modules ``names`` stand for, by hand: blocks' norm1 / norm2, the final ``norm``."""
    out = [getattr(b, k) for k in ("norm1", "norm2") if k in names for b in bb.model.blocks]
    return out + ([bb.model.norm] if "final_norm" in names else [])


def base_of(mod):
    return getattr(mod, "base", mod)  # adaptformer's InputTap wraps norm2


@pytest.mark.parametrize("method, opts, names", [
    ("lora", dict(rank=2, targets=["q", "v"]), ["final_norm"]),
    ("adapter", dict(style="houlsby", bottleneck=4), ["norm1", "norm2", "final_norm"]),
    ("adapter", dict(style="adaptformer", bottleneck=4), ["norm2"]),  # norm2 sits under an InputTap
    ("conformer", dict(reduction_rate=8), ["norm2", "final_norm"]),
    ("linear", {}, ["final_norm"]),
])
def test_exactly_the_named_norms_get_gradients(method, opts, names):
    bb = tiny_ast().train()
    zoo.apply_adapter(bb, method, train_also=names, **opts)
    adapter = bb.adapters[0]
    assert adapter.config["train_also"] == names  # recorded (adapter.json)
    own = {id(p) for p in adapter.adapter_parameters()}
    norms = {id(p) for m in norms_of(bb, names) for p in base_of(m).parameters()}
    bb(X).square().sum().backward()
    got = {id(p) for p in bb.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    base_with_grad = got - own
    assert base_with_grad == norms  # those norms, every block's, and nothing else of AST
    assert {id(p) for p in bb.parameters() if p.requires_grad} == own | norms
    # the count: the method's own parameters + 2D per named norm (LayerNorm: γ and β), per block for norm1/norm2
    d, depth = bb.feature_dim, len(bb.model.blocks)
    per_norm = sum(2 * d * (depth if n in ("norm1", "norm2") else 1) for n in names)
    trainable, _ = zoo.count_parameters(bb)
    assert trainable == sum(p.numel() for p in adapter.adapter_parameters()) + per_norm


def test_lora_count_by_the_formula():
    bb = tiny_ast()
    zoo.apply_adapter(bb, "lora", rank=2, targets=["q", "v"], train_also=["norm2", "final_norm"])
    d, depth, r = 32, 2, 2
    assert zoo.count_parameters(bb)[0] == depth * 2 * (r * d + d * r) + depth * 2 * d + 2 * d


def test_without_train_also_nothing_of_the_backbone_trains_and_nothing_is_recorded():
    bb = tiny_ast()
    zoo.apply_adapter(bb, "lora", rank=2, train_also=None)
    assert "train_also" not in bb.adapters[0].config
    assert not any(p.requires_grad for p in bb.model.norm.parameters())


def test_save_load_restores_the_trained_norms(tmp_path):
    torch.manual_seed(0)
    model = zoo.ImageClassifier(tiny_ast(), 5)
    zoo.apply_adapter(model, "adapter", style="pfeiffer", bottleneck=4, train_also=["norm2", "final_norm"])
    train_a_little(model)
    model.eval()
    zoo.save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert meta["methods"][0]["config"]["train_also"] == ["norm2", "final_norm"]
    assert {"backbone.model.norm.weight", "backbone.model.norm.bias", "backbone.model.blocks.1.norm2.weight"} <= set(meta["tensors"])
    assert not any(".norm1." in k for k in meta["tensors"])
    torch.manual_seed(0)
    fresh = zoo.ImageClassifier(tiny_ast(), 5).eval()  # the same base weights (seeded), untrained norms
    assert not torch.equal(fresh.backbone.model.norm.weight, model.backbone.model.norm.weight)
    zoo.load_adapter(fresh, tmp_path / "a")
    for k in ("model.norm.weight", "model.norm.bias", "model.blocks.0.norm2.weight", "model.blocks.1.norm2.bias"):
        assert torch.equal(fresh.backbone.get_parameter(k), model.backbone.get_parameter(k)), k
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))
    assert fresh.backbone.model.norm.weight.requires_grad  # rebuilt trainable, as trained


def test_a_typo_lists_the_valid_names_and_changes_nothing():
    bb = tiny_ast()
    flags = [p.requires_grad for p in bb.parameters()]
    with pytest.raises(ValueError, match=r"unknown train_also name\(s\) \['final_nrom'\]; valid: norm1, norm2, final_norm"):
        zoo.apply_adapter(bb, "lora", train_also=["final_nrom"])
    with pytest.raises(ValueError, match=r"train_also must be a list of names \(norm1, norm2, final_norm\), got 5$"):
        zoo.apply_adapter(bb, "lora", train_also=5)
    assert not bb.adapters and [p.requires_grad for p in bb.parameters()] == flags


def test_a_name_this_backbone_lacks_lists_the_ones_it_has():
    """timm's ViT with average pooling normalises after pooling (fc_norm): its ``norm`` is an Identity."""
    bb = zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, embed_dim=32,
                             depth=2, num_heads=2, global_pool="avg")
    flags = [p.requires_grad for p in bb.parameters()]
    with pytest.raises(SiteError, match=r"train_also='final_norm'.* no final_norm; valid here: norm1, norm2$"):
        zoo.apply_adapter(bb, "lora", rank=2, train_also=["norm1", "final_norm"])
    assert not bb.adapters and [p.requires_grad for p in bb.parameters()] == flags


def test_merged_export_carries_the_norms_as_base_weights(tmp_path):
    import transformers
    from safetensors.torch import load_file

    from zoo.export import export_merged

    bb = zoo_backbone("ast", library_model("ast"), tmp_path)
    model = zoo.ImageClassifier(bb, 5)
    zoo.apply_adapter(model, "lora", rank=2, alpha=4.0, targets=["q", "v"], train_also=["norm1", "final_norm"])
    train_a_little(model)
    model.eval()
    export_merged(model, tmp_path / "out")
    ast = transformers.ASTModel.from_pretrained(str(tmp_path / "out")).eval()
    assert torch.equal(ast.layernorm.weight, bb.model.norm.weight)
    assert torch.equal(ast.encoder.layer[1].layernorm_before.bias, bb.model.blocks[1].norm1.bias)
    h = load_file(str(tmp_path / "out" / "head.safetensors"))
    x = example_input("ast")
    with torch.no_grad():
        got = F.linear(ast(input_values=x).pooler_output, h["weight"], h["bias"])
        assert torch.allclose(got, model(x), atol=1e-5), (got - model(x)).abs().max()


def _lora_with_norms(tmp_path, names):
    base = library_model("ast")
    bb = zoo_backbone("ast", base, tmp_path).eval()
    zoo.apply_adapter(bb, "lora", rank=2, alpha=6.0, targets=["q", "v", "fc2"], train_also=names)
    train_a_little(bb)  # the norms off their base values too
    return base, bb.eval()


def test_peft_export_carries_the_norms_as_modules_to_save(tmp_path):
    peft = pytest.importorskip("peft")
    from zoo.export import export_peft, load_peft

    base, bb = _lora_with_norms(tmp_path, ["norm2", "final_norm"])
    x = example_input("ast")
    with torch.no_grad():
        want = bb(x)
    export_peft(bb, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["encoder.layer.0.layernorm_after", "encoder.layer.1.layernorm_after", "layernorm"]
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        got = library_features("ast", pm.base_model.model, x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    fresh = zoo_backbone("ast", library_model("ast"), tmp_path)
    load_peft(fresh, tmp_path / "peft")
    assert fresh.adapters[0].config == bb.adapters[0].config  # train_also included
    w, g = zoo.adapter_state_dict(bb), zoo.adapter_state_dict(fresh)
    assert sorted(w) == sorted(g) and all(torch.equal(w[k], g[k]) for k in w)
    assert "model.norm.weight" in w and "model.blocks.0.norm2.bias" in w


def test_peft_export_on_a_vit_names_timm_norms_beside_the_head(tmp_path):
    peft = pytest.importorskip("peft")
    from zoo.export import export_peft, load_peft

    base = library_model("vit", num_classes=5)
    model = zoo.ImageClassifier(zoo_backbone("vit", base, tmp_path), 5)
    zoo.apply_adapter(model, "lora", rank=2, targets=["q", "v"], train_also=["norm1", "final_norm"])
    train_a_little(model)
    model.eval()
    export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["head", "blocks.0.norm1", "blocks.1.norm1", "norm"]
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    x = example_input("vit")
    fresh = zoo.ImageClassifier(zoo_backbone("vit", library_model("vit", num_classes=5), tmp_path), 5)
    load_peft(fresh, tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(pm(x), model(x), atol=1e-5)
        assert torch.equal(fresh.eval()(x), model(x))


@pytest.mark.parametrize("family", ["clip", "sam"])
def test_peft_export_carries_block_norms_on_clip_and_sam(family, tmp_path):
    """open_clip's ln_1 (both towers with tower=both) and SAM's norm1 go to modules_to_save by their library
    names; peft gives the zoo's features and load_peft restores the config and every tensor. Neither backbone
    has a final norm here, which is one line naming what it has."""
    peft = pytest.importorskip("peft")
    from zoo.export import export_peft, load_peft

    base = library_model(family)
    bb = zoo_backbone(family, base, tmp_path).eval()
    opts = dict(tower="both") if family == "clip" else {}
    with pytest.raises(SiteError, match=r"no final_norm; valid here: norm1, norm2$"):
        zoo.apply_adapter(bb, "lora", rank=2, targets=["q", "v"], train_also=["final_norm"], **opts)
    zoo.apply_adapter(bb, "lora", rank=2, targets=["q", "v"], train_also=["norm1"], **opts)
    train_a_little(bb)
    bb.eval()
    x = example_input(family)
    with torch.no_grad():
        want = zoo_features(family, bb, x)
    export_peft(bb, tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"]
    assert saved == (["transformer.resblocks.0.ln_1", "transformer.resblocks.1.ln_1", "visual.transformer.resblocks.0.ln_1",
                      "visual.transformer.resblocks.1.ln_1"] if family == "clip" else ["blocks.0.norm1", "blocks.1.norm1"])
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert torch.allclose(library_features(family, pm.base_model.model, x), want, atol=1e-5)
    fresh = zoo_backbone(family, library_model(family), tmp_path)
    load_peft(fresh, tmp_path / "peft")
    assert fresh.adapters[0].config == bb.adapters[0].config
    w, g = zoo.adapter_state_dict(bb), zoo.adapter_state_dict(fresh)
    assert sorted(w) == sorted(g) and all(torch.equal(w[k], g[k]) for k in w)


def test_a_peft_lora_with_a_saved_layernorm_loads_as_train_also(tmp_path):
    """An adapter trained with peft itself (LoRA on query / value, modules_to_save=['layernorm']): load_peft
    rebuilds a zoo LoRA with train_also=[final_norm] whose output is peft's."""
    peft = pytest.importorskip("peft")
    from zoo.export import load_peft

    base = library_model("ast")
    bb = zoo_backbone("ast", base, tmp_path).eval()
    torch.manual_seed(5)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                   init_lora_weights=False, modules_to_save=["layernorm"]))
    with torch.no_grad():
        pm.base_model.model.layernorm.modules_to_save["default"].weight.mul_(1.5)
    pm.save_pretrained(str(tmp_path / "p"))
    pm.eval()
    load_peft(bb, tmp_path / "p")
    assert bb.adapters[0].config["train_also"] == ["final_norm"]
    x = example_input("ast")
    with torch.no_grad():
        assert torch.allclose(bb(x), library_features("ast", pm.base_model.model, x), atol=1e-5)


def test_peft_refuses_norms_in_only_some_blocks(tmp_path):
    peft = pytest.importorskip("peft")
    from zoo.export import ExportError, load_peft

    base = library_model("ast")
    bb = zoo_backbone("ast", base, tmp_path).eval()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False,
                                                   modules_to_save=["encoder.layer.0.layernorm_after"]))
    pm.save_pretrained(str(tmp_path / "p"))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    with pytest.raises(ExportError, match=r"holds 1 of the 2 norm2 norms .*train_also trains one in every block") as e:
        load_peft(bb, tmp_path / "p")
    assert "\n" not in str(e.value)
    assert not bb.adapters and all(torch.equal(v, before[k]) for k, v in bb.state_dict().items())


def test_multi_adapter_serves_adapters_with_their_own_norms(tmp_path):
    """Each adapter's trained norms are its own copy (MultiAdapter gives every trained base tensor one); the
    shared base keeps its own; every sample equals its adapter's model alone."""
    import copy

    base = tiny_ast().eval()
    base_norms = {k: v.clone() for k, v in base.state_dict().items() if "norm" in k}
    models = {}
    for name, (method, opts) in {"lora": ("lora", dict(rank=2, train_also=["final_norm"])),
                                 "pfeiffer": ("adapter", dict(style="pfeiffer", bottleneck=4, train_also=["norm2", "final_norm"])),
                                 "plain_lora": ("lora", dict(rank=2))}.items():
        m = zoo.ImageClassifier(copy.deepcopy(base), 3)
        zoo.apply_adapter(m, method, **opts)
        train_a_little(m, seed=len(models))
        models[name] = m.eval()
    specs = {n: zoo.save_adapter(m, tmp_path / n) for n, m in models.items()}
    ma = zoo.MultiAdapter(base, specs)
    names = ["lora", "pfeiffer", "plain_lora", "lora"]
    x = torch.randn(len(names), 100, 128)
    with torch.no_grad():
        outs = ma.outputs(x, names)
        for i, n in enumerate(names):
            torch.testing.assert_close(outs[i], models[n](x[i:i + 1])[0], atol=2e-5, rtol=1e-4)
    assert ma.routing()["lora"].startswith("grouped") and ma.routing()["plain_lora"] == "batched"
    assert all(torch.equal(base.state_dict()[k], v) for k, v in base_norms.items())  # the base's own, untouched


def test_train_py_trains_the_norms_and_eval_py_reproduces_the_run(tmp_path):
    """``adapter.train_also`` on the command line: the run's artifact records it and holds the trained norms
    (moved off the base by training), and eval.py, rebuilding the model from adapter.json, gets the
    selected validation value exactly."""
    from safetensors.torch import load_file

    from tests.helpers import run_train
    from tests.test_task_contract import evaluate_artifact

    m = run_train(["experiment=tiny_audio", "adapter=lora", "+adapter.train_also=[norm2,final_norm]",
                   "task.optimizer.lr=1e-2"], tmp_path)
    art = Path(m["out_dir"]) / "adapter"
    meta = json.loads((art / "adapter.json").read_text())
    assert meta["methods"][0]["config"]["train_also"] == ["norm2", "final_norm"]
    w = load_file(str(art / "adapter.safetensors"))
    norms = [k for k in w if k.endswith(("norm.weight", "norm2.weight"))]
    assert sorted(norms) and all(".norm1." not in k for k in w)
    assert any(not torch.equal(w[k], torch.ones_like(w[k])) for k in norms)  # trained off LayerNorm's init (1)
    mon = m["monitor"]
    ev = evaluate_artifact(art, ["split=val", "trainer.enable_progress_bar=false"])
    assert ev[mon["name"]] == pytest.approx(mon["value"], rel=1e-6, abs=1e-7)


def test_an_edited_record_is_one_line_and_leaves_the_model_unchanged(tmp_path):
    """adapter.json without the train_also its tensors need (or with a bad name) is refused naming what differs."""
    from zoo.checkpoint import AdapterMismatchError

    torch.manual_seed(0)
    model = tiny_ast()
    zoo.apply_adapter(model, "lora", rank=2, train_also=["final_norm"])
    train_a_little(model)
    zoo.save_adapter(model, tmp_path / "a")
    meta_file = tmp_path / "a" / "adapter.json"
    meta = json.loads(meta_file.read_text())
    for edit, msg in ((None, r"not in model: \['model.norm.bias', 'model.norm.weight'\]"),
                      (["final_nrom"], r"adapter.json: methods\[0\]: adapter 'lora': unknown train_also name")):
        cfg = dict(meta["methods"][0]["config"])
        cfg.pop("train_also")
        if edit is not None:
            cfg["train_also"] = edit
        meta_file.write_text(json.dumps({**meta, "methods": [{"name": "lora", "config": cfg}]}))
        torch.manual_seed(0)
        fresh = tiny_ast()
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(AdapterMismatchError, match=msg):
            zoo.load_adapter(fresh, tmp_path / "a")
        assert not fresh.adapters and all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
