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
    crash_at_rename,
    disk_full_at,
    example_input,
    folder_files,
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


def _load_in_library(family, folder):
    if family == "vit":
        return __import__("timm").create_model(f"local-dir:{folder}", pretrained=True)
    if family == "clip":
        return __import__("open_clip").create_model(f"local-dir:{folder}")
    return __import__("transformers").ASTModel.from_pretrained(str(folder))


@pytest.mark.parametrize("family,last", [("vit", "config.json"), ("clip", "open_clip_config.json"),
                                         ("ast", "model.safetensors")])
def test_a_failed_re_export_leaves_the_previous_one_or_no_config_never_a_mixed_set(tmp_path, monkeypatch, family, last):
    """The files were written one after the other: a full disk at zoo_export.json left the new weights and
    config beside the old record (and a head.safetensors of the old model: CLIP and AST load it separately).
    Now a failed write leaves the previous export whole, a crash between the renames leaves no config (timm,
    open_clip) or no weights (transformers loads a folder without config.json with the default ASTConfig):
    the library refuses the folder; and a re-export over an earlier export of another kind (a peft adapter,
    which transformers' from_pretrained would pick up; the other family's config) is byte-identical to a
    fresh one."""

    from zoo.export.merged import ZOO_META

    old_model = classifier(family, tmp_path)
    new_model = classifier(family, tmp_path, rank=4)
    old = folder_files(export_merged(old_model, tmp_path / "old"))
    new = folder_files(export_merged(new_model, tmp_path / "new"))
    assert sorted(old) == sorted(new) and last in new and ZOO_META in new
    assert all(old[k] != new[k] for k in new if k.endswith(".safetensors")) and old[ZOO_META] != new[ZOO_META]
    out = export_merged(old_model, tmp_path / "out")

    disk_full_at(monkeypatch, ZOO_META)  # the file the one-by-one writes came to last
    with pytest.raises(OSError) as e:
        export_merged(new_model, out)
    monkeypatch.undo()
    assert e.value.errno == 28 and e.value.filename == str(out / ZOO_META)
    assert folder_files(out) == old  # the previous export, whole, and no temporary folder

    crash_at_rename(monkeypatch, out / last)
    with pytest.raises(OSError, match=rf"{out} is left without {last}, an incomplete set that readers refuse"):
        export_merged(new_model, out)
    monkeypatch.undo()
    left = folder_files(out)
    assert sorted(left) == sorted(k for k in new if k != last) and all(left[k] == new[k] for k in left)
    with pytest.raises(OSError, match=last):
        _load_in_library(family, out)

    zoo.export.export_peft(old_model, out)  # an export of another kind in the same folder
    other = {"vit": "open_clip_config.json", "clip": "config.json", "ast": "open_clip_config.json"}[family]
    (out / other).write_text("{}")
    assert (out / "adapter_config.json").is_file()
    export_merged(new_model, out)
    assert folder_files(out) == new
    _load_in_library(family, out)


def test_a_keep_modules_export_replaces_a_merged_one_whole(tmp_path):
    """keep_modules writes model.safetensors + zoo_export.json; a merged export's config.json left beside
    them would make timm load the adapted state dict as a plain ViT."""
    model = classifier("vit", tmp_path)
    kept = folder_files(export_merged(model, tmp_path / "kept", keep_modules=True))
    assert sorted(kept) == ["model.safetensors", "zoo_export.json"]
    export_merged(model, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()
    assert folder_files(export_merged(model, tmp_path / "out", keep_modules=True)) == kept
