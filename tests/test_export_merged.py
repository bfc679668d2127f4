"""Merged export: timm, open_clip and transformers load the files alone (a subprocess that never imports
zoo) and give the adapted zoo model's outputs; non-mergeable methods are refused with the reason."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo
from tests.export_helpers import (
    example_input,
    library_model,
    train_a_little,
    zoo_backbone,
)
from zoo.export import ExportError, export_merged

LOADER = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    from safetensors.torch import load_file, save_file
    root = sys.argv[1]
    x = load_file(root + "/inputs.safetensors")
    out = {}
    import timm
    vit = timm.create_model("local-dir:" + root + "/vit", pretrained=True).eval()
    import open_clip
    clip = open_clip.create_model("local-dir:" + root + "/clip").eval()
    import transformers
    ast = transformers.ASTModel.from_pretrained(root + "/ast").eval()
    with torch.no_grad():
        out["vit"] = vit(x["vit"])
        h = load_file(root + "/clip/head.safetensors")
        out["clip"] = F.linear(clip.encode_image(x["clip"]), h["weight"], h["bias"])
        h = load_file(root + "/ast/head.safetensors")
        out["ast"] = F.linear(ast(input_values=x["ast"]).pooler_output, h["weight"], h["bias"])
    assert IN_PROCESS or not any(m == "zoo" or m.startswith("zoo.") for m in sys.modules), "zoo was imported"
    for net in (vit, clip, ast):  # the library's own classes only
        assert not any(type(m).__module__.startswith("zoo.") for m in net.modules())
    save_file({k: v.contiguous() for k, v in out.items()}, root + "/outputs.safetensors")
""")


def classifier(family, tmp_path, method="lora", **opts):
    bb = zoo_backbone(family, library_model(family), tmp_path)
    model = zoo.ImageClassifier(bb, 5)
    if method == "lora":
        opts = {"rank": 2, "alpha": 4.0, "targets": ["q", "v", "o", "fc1"], **opts}
    zoo.apply_adapter(model, method, **opts)
    train_a_little(model)
    return model.eval()


@pytest.mark.parametrize("subprocess_run", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_merged_exports_load_in_timm_open_clip_and_transformers_alone(tmp_path, subprocess_run):
    """Fast: the loader in this process (its models hold only library classes); slow: in a fresh
    interpreter outside the repository, which also shows zoo is never imported."""
    want, inputs = {}, {}
    for family in ("vit", "clip", "ast"):
        model = classifier(family, tmp_path)
        before = {k: v.clone() for k, v in zoo.adapter_state_dict(model).items()}
        x = example_input(family)
        with torch.no_grad():
            want[family] = model(x)
        export_merged(model, tmp_path / family)
        inputs[family] = x
        # the model itself is unchanged: still adapted, not merged
        assert [a.name for a in model.backbone.adapters] == ["lora"] and not model.backbone.adapters[0].merged
        assert all(torch.equal(v, zoo.adapter_state_dict(model)[k]) for k, v in before.items())
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    if subprocess_run:
        res = subprocess.run([sys.executable, "-c", "IN_PROCESS = False\n" + LOADER, str(tmp_path)], capture_output=True,
                             text=True, timeout=300, cwd=str(tmp_path))  # not the repository: no zoo by accident
        assert res.returncode == 0, res.stderr[-3000:]
    else:
        argv = sys.argv
        try:
            sys.argv = ["loader", str(tmp_path)]
            exec(LOADER, {"IN_PROCESS": True})
        finally:
            sys.argv = argv
    got = load_file(str(tmp_path / "outputs.safetensors"))
    for family in ("vit", "clip", "ast"):
        assert torch.allclose(got[family], want[family], atol=1e-5), (family, (got[family] - want[family]).abs().max())


def test_ast_layernorm_linear_head_goes_to_head_safetensors(tmp_path):
    """AST's mlp_head beside the merged transformers ASTModel: head.safetensors holds 0.* (the LayerNorm) and 1.*
    (the Linear), zoo_export.json its eps; transformers' pooler output through them by hand is the zoo's logits."""
    import json

    import torch.nn.functional as F
    import transformers

    model = zoo.LayerNormLinearClassifier(zoo_backbone("ast", library_model("ast"), tmp_path), 5)
    zoo.apply_adapter(model, "lora", rank=2, alpha=4.0, targets=["q", "v", "o", "fc1"])
    train_a_little(model)  # the LoRA off zero, γ off 1, β off 0
    model.eval()
    export_merged(model, tmp_path / "out")
    h = load_file(str(tmp_path / "out" / "head.safetensors"))
    assert sorted(h) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    meta = json.loads((tmp_path / "out" / "zoo_export.json").read_text())
    assert meta["head"] == {"type": "layernorm_linear", "in_features": 32, "num_classes": 5, "eps": 1e-5}
    assert meta["head_file"] == "head.safetensors"
    ast = transformers.ASTModel.from_pretrained(str(tmp_path / "out")).eval()
    x = example_input("ast")
    with torch.no_grad():
        pooled = ast(input_values=x).pooler_output
        got = F.linear(F.layer_norm(pooled, (32,), h["0.weight"], h["0.bias"], meta["head"]["eps"]), h["1.weight"], h["1.bias"])
        want = model(x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_a_method_that_cannot_merge_is_refused_with_the_reason(tmp_path):
    model = classifier("vit", tmp_path, method="vpt", num_tokens=2)
    with pytest.raises(ExportError, match=r"method 'vpt' cannot be merged .*--keep-modules") as e:
        export_merged(model, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_keep_modules_writes_the_adapted_state_dict(tmp_path):
    model = classifier("vit", tmp_path, method="vpt", num_tokens=2)
    train_a_little(model, seed=8)
    export_merged(model, tmp_path / "out", keep_modules=True)
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert state.keys() == model.state_dict().keys()
    fresh = classifier("vit", tmp_path, method="vpt", num_tokens=2)
    fresh.load_state_dict(state)
    x = example_input("vit")
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
