"""The peft format both ways: zoo LoRA -> peft on timm / open_clip / transformers (same outputs),
peft LoRA -> zoo (target-name translation, refusals that leave the model unchanged), round trips."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import zoo
from tests.export_helpers import (
    FAMILIES,
    crash_at_rename,
    disk_full_at,
    example_input,
    folder_files,
    library_features,
    library_model,
    train_a_little,
    zoo_backbone,
    zoo_features,
)
from zoo.export import ExportError, export_peft, load_peft

peft = pytest.importorskip("peft")

# one LoRA per backbone touching a fused qkv's q and v slices plus another Linear kind
TARGETS = {"vit": ["q", "v", "fc1"], "sam": ["q", "v", "o"], "clip": ["q", "v", "fc2"], "ast": ["q", "v", "fc2"]}


def adapted(family, tmp_path, targets=None, head=None, **lora):
    base = library_model(family, num_classes=5 if family == "vit" else 0)
    bb = zoo_backbone(family, base, tmp_path).eval()
    model = zoo.ImageClassifier(bb, 5) if (head if head is not None else family == "vit") else bb
    opts = {"rank": 2, "alpha": 6.0, "targets": targets or TARGETS[family], **lora}
    if family == "clip":
        opts["tower"] = "both"
    zoo.apply_adapter(model, "lora", **opts)
    train_a_little(model)
    return base, bb, model.eval()


def peft_on(base, folder):
    return peft.PeftModel.from_pretrained(base, str(folder)).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_lora_gives_the_zoo_outputs_in_peft(family, tmp_path):
    base, bb, model = adapted(family, tmp_path)
    x = example_input(family)
    with torch.no_grad():
        plain = library_features(family, base, x)
        want = zoo_features(family, bb, x)
    export_peft(model, tmp_path / "peft")
    pm = peft_on(base, tmp_path / "peft")
    with torch.no_grad():
        got = library_features(family, base, x)
        if family == "vit":  # the head went to modules_to_save: the logits agree too
            assert torch.allclose(pm(x), model(x), atol=1e-5)
        if family == "clip":  # the text tower too (the LoRA is on both towers)
            tokens = torch.randint(0, 100, (2, 16))
            assert torch.allclose(base.encode_text(tokens), bb.encode_text(tokens), atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter changes the output
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_q_v_slices_become_a_rank_2r_lora_on_qkv_with_zero_k_rows(tmp_path):
    _, _, model = adapted("vit", tmp_path, targets=["q", "v"], alpha=6.0)
    export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    t = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert cfg["r"] == 4 and cfg["lora_alpha"] == pytest.approx(12.0)  # rank 2r, alpha rescaled: γ = 6/2 = 12/4
    assert cfg["modules_to_save"] == ["head"] and torch.equal(t["base_model.model.head.weight"], model.head.weight)
    w = model.backbone.model.blocks[0].attn.qkv
    a, b = t["base_model.model.blocks.0.attn.qkv.lora_A.weight"], t["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    d, r = 32, 2
    assert torch.equal(a, torch.cat([w.lora_A[:r], w.lora_A[r:]]))
    assert torch.equal(b[:d, :r], w.lora_B["q"]) and torch.equal(b[2 * d:, r:], w.lora_B["v"])
    assert not b[d:2 * d].any() and not b[:d, r:].any() and not b[2 * d:, :r].any()
    assert torch.allclose(w.delta_weight(), cfg["lora_alpha"] / cfg["r"] * b @ a, atol=1e-6)


def test_ast_q_and_v_stay_rank_r_on_hf_query_and_value(tmp_path):
    _, _, model = adapted("ast", tmp_path, targets=["q", "v"])
    export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and sorted(cfg["target_modules"])[:2] == ["encoder.layer.0.attention.attention.query",
                                                                   "encoder.layer.0.attention.attention.value"]
    assert not any(".key" in m for m in cfg["target_modules"])


@pytest.mark.parametrize("family", FAMILIES)
def test_zoo_peft_zoo_round_trip_gives_identical_tensors(family, tmp_path):
    """With a Linear head on every backbone: in modules_to_save (timm) or in zoo_head.safetensors."""
    base, bb, model = adapted(family, tmp_path, head=True)
    export_peft(model, tmp_path / "peft")
    assert (tmp_path / "peft" / "zoo_head.safetensors").is_file() == (family != "vit")
    fresh_bb = zoo_backbone(family, base, tmp_path)
    fresh = zoo.ImageClassifier(fresh_bb, 5)
    load_peft(fresh, tmp_path / "peft")
    want, got = zoo.adapter_state_dict(model), zoo.adapter_state_dict(fresh)
    assert sorted(want) == sorted(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert fresh_bb.adapters[0].config == bb.adapters[0].config


def test_ast_layernorm_linear_head_goes_to_zoo_head_and_back(tmp_path):
    """AST's mlp_head (LayerNorm, then Linear): HF's ASTModel has no module for it, so both its layers go to
    zoo_head.safetensors as the Linear head does; peft's output through it by hand gives the zoo logits, and
    load_peft restores every tensor. Another head (a Linear, another eps) is refused, the model unchanged."""
    base = library_model("ast")
    bb = zoo_backbone("ast", base, tmp_path).eval()
    model = zoo.LayerNormLinearClassifier(bb, 5)
    zoo.apply_adapter(model, "lora", rank=2, alpha=6.0, targets=TARGETS["ast"])
    train_a_little(model)  # γ off 1, β off 0 too
    model.eval()
    export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None
    head = load_file(str(tmp_path / "peft" / "zoo_head.safetensors"))
    assert sorted(head) == ["head.0.bias", "head.0.weight", "head.1.bias", "head.1.weight"]
    meta = json.loads((tmp_path / "peft" / "zoo_export.json").read_text())
    assert meta["head"] == model.head_spec() and meta["head_location"] == "zoo_head.safetensors"
    x = example_input("ast")
    peft_on(base, tmp_path / "peft")
    with torch.no_grad():
        pooled = library_features("ast", base, x)  # transformers + peft, no zoo
        got = F.linear(F.layer_norm(pooled, (32,), head["head.0.weight"], head["head.0.bias"], meta["head"]["eps"]),
                       head["head.1.weight"], head["head.1.bias"])
        assert torch.allclose(got, model(x), atol=1e-5), (got - model(x)).abs().max()
    fresh = zoo.LayerNormLinearClassifier(zoo_backbone("ast", library_model("ast"), tmp_path), 5)
    load_peft(fresh, tmp_path / "peft")
    want, have = model.state_dict(), fresh.state_dict()
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
    for other in (zoo.ImageClassifier(zoo_backbone("ast", library_model("ast"), tmp_path), 5),
                  zoo.LayerNormLinearClassifier(zoo_backbone("ast", library_model("ast"), tmp_path), 5, eps=1e-6)):
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(ExportError, match="head") as e:
            load_peft(other, tmp_path / "peft")
        assert "\n" not in str(e.value)
        assert not zoo.adapters_of(other) and all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def _peft_adapter(family, base, seed=5):
    """A LoRA trained with peft itself on the library model (nonzero B: init_lora_weights=False)."""
    targets = {"vit": ["qkv", "fc2"], "sam": ["qkv", "attn.proj"], "clip": ["attn", "c_fc"], "ast": ["query", "value", "intermediate.dense"]}
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=targets[family], init_lora_weights=False,
                          modules_to_save=["head"] if family == "vit" else None)
    return peft.get_peft_model(base, cfg).eval()


def merged_by_hand(plain, pm):
    """``plain`` (a copy of the base before peft) with every peft LoRA delta added once, from peft's own
    ``get_delta_weight``. For open_clip this is the reference rather than peft's forward: peft 0.21's
    ``MultiheadAttention.merge`` (which its forward calls) adds the out_proj delta twice (huggingface/peft
    PR #3774, open)."""
    from peft.tuners.lora.layer import LoraLayer, MultiheadAttention

    ref = dict(plain.named_modules())
    with torch.no_grad():
        for name, m in pm.base_model.model.named_modules():
            if isinstance(m, MultiheadAttention):
                ref[name].in_proj_weight += m.get_delta_weight("default")
            elif isinstance(m, LoraLayer):
                target = name.replace(".base_layer.out_proj", ".out_proj")
                ref[target].weight += m.get_delta_weight("default")
    return plain


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_zoo_peft_round_trip(family, tmp_path):
    import copy

    base = library_model(family, num_classes=5 if family == "vit" else 0)
    bb = zoo_backbone(family, base, tmp_path).eval()  # before peft changes base
    model = zoo.ImageClassifier(bb, 5).eval() if family == "vit" else bb
    plain = copy.deepcopy(base)
    pm = _peft_adapter(family, base)
    if family == "vit":
        with torch.no_grad():
            pm.base_model.model.head.modules_to_save["default"].weight.add_(1.0)  # a trained head
    pm.save_pretrained(str(tmp_path / "theirs"))
    load_peft(model, tmp_path / "theirs")
    x = example_input(family)
    with torch.no_grad():
        want = pm(x) if family == "vit" else library_features(family, base, x)
        if family == "clip":
            want = library_features(family, merged_by_hand(plain, pm), x)
        got = model(x) if family == "vit" else zoo_features(family, bb, x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    export_peft(model, tmp_path / "ours")
    theirs = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        assert torch.equal(theirs[k], ours[k]), k


def _same_model(model, before):
    return set(dict(model.named_parameters())) == set(before) and all(
        torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_mismatched_base_is_refused_and_the_model_is_unchanged(tmp_path):
    _, _, model = adapted("vit", tmp_path)
    export_peft(model, tmp_path / "peft")
    # another width: the factors do not fit
    other = zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, embed_dim=48, depth=2, num_heads=2, img_size=32)
    m = zoo.ImageClassifier(other, 5)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(ExportError, match="do not fit"):
        load_peft(m, tmp_path / "peft")
    assert other.adapters == [] and _same_model(m, before)
    # same shapes, other weights: the recorded fingerprint differs
    same = zoo.ImageClassifier(zoo_backbone("vit", library_model("vit", seed=9), tmp_path), 5)
    before = {n: p.detach().clone() for n, p in same.named_parameters()}
    with pytest.raises(ExportError, match="fingerprint"):
        load_peft(same, tmp_path / "peft")
    assert same.backbone.adapters == [] and _same_model(same, before)
    load_peft(same, tmp_path / "peft", check_fingerprint=False)  # the user may insist
    # an adapter made for another library's model
    clip_base = library_model("clip")
    _peft_adapter("clip", clip_base).save_pretrained(str(tmp_path / "clip"))
    with pytest.raises(ExportError, match="made for a CLIP"):
        load_peft(zoo.ImageClassifier(zoo_backbone("vit", library_model("vit"), tmp_path), 5), tmp_path / "clip")


def test_a_delta_the_zoo_config_cannot_hold_is_refused(tmp_path):
    base, _, model = adapted("vit", tmp_path, targets=["q", "v"])
    export_peft(model, tmp_path / "peft")
    f = tmp_path / "peft" / "adapter_model.safetensors"
    t = load_file(str(f))
    t["base_model.model.blocks.1.attn.qkv.lora_B.weight"][40] = 1.0  # a k row
    from safetensors.torch import save_file

    save_file(t, str(f))
    fresh = zoo.ImageClassifier(zoo_backbone("vit", base, tmp_path), 5)
    with pytest.raises(ExportError, match="k rows"):
        load_peft(fresh, tmp_path / "peft")
    assert fresh.backbone.adapters == [] and not any(p.requires_grad is False and "lora" in n for n, p in fresh.named_parameters())
    assert not any("lora" in n for n, _ in fresh.named_parameters())


@pytest.mark.parametrize("method,opts", [("ssf", {}), ("vpt", {"num_tokens": 2}), ("bitfit", {})])
def test_a_method_peft_cannot_express_is_refused_by_name(method, opts, tmp_path):
    base, bb, _ = adapted("vit", tmp_path)
    zoo.remove_adapters(bb)
    m = zoo.ImageClassifier(zoo_backbone("vit", base, tmp_path), 5)
    zoo.apply_adapter(m, method, **opts)
    with pytest.raises(ExportError, match=f"method '{method}' has no peft equivalent") as e:
        export_peft(m, tmp_path / "x")
    assert ("--merged" in str(e.value)) == zoo.ADAPTERS.get(method).mergeable
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method,opts", [
    ("colora", {"targets": ["qkv", "fc2"]}),  # per-layer ranks -> rank_pattern / alpha_pattern
    ("comp_lora", {"rank": 2, "k": 4, "targets": ["q", "v"]}),  # its projected factors, as applied
    ("lora", {"rank": 2, "alpha": 3.0, "targets": ["q", "k", "v", "o"], "scaling": "rslora"}),  # rank 3r, γ = α/√r
])
def test_lora_family_methods_map_to_their_peft_config(method, opts, tmp_path):
    base = library_model("vit", num_classes=5)
    bb = zoo_backbone("vit", base, tmp_path).eval()
    model = zoo.ImageClassifier(bb, 5)
    if method == "colora":
        paths = [f"model.blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "mlp.fc2")]
        opts = {**opts, "ranks": dict(zip(paths, (1, 3, 2, 4)))}
    zoo.apply_adapter(model, method, **opts)
    train_a_little(model)
    model.eval()
    export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    if method == "colora":
        ranks = {m: cfg["rank_pattern"].get("^" + re.escape(m), cfg["r"]) for m in cfg["target_modules"]}
        assert sorted(ranks.values()) == [1, 2, 3, 4]
    x = example_input("vit")
    with torch.no_grad():
        want = model(x)
    pm = peft_on(base, tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(pm(x), want, atol=1e-5), (pm(x) - want).abs().max()


@pytest.mark.parametrize("targets,rank_pattern,expect", [
    (["blocks.1.attn.qkv", "blocks.1.mlp.fc1"], {}, {"targets": ["qkv", "fc1"], "layers": [1]}),
    (["blocks.0.attn.qkv", "blocks.1.mlp.fc1"], {}, "same sites in every adapted layer"),
    (["qkv"], {"^blocks\\.1\\.attn\\.qkv": 5}, "different ranks"),
])
def test_the_zoo_config_derived_from_a_peft_adapter(targets, rank_pattern, expect, tmp_path):
    base = library_model("vit")
    model = zoo_backbone("vit", base, tmp_path).eval()
    torch.manual_seed(0)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=6, target_modules=targets, rank_pattern=rank_pattern,
                                                   init_lora_weights=False)).eval()
    pm.save_pretrained(str(tmp_path / "p"))
    if isinstance(expect, str):
        with pytest.raises(ExportError, match=expect):
            load_peft(model, tmp_path / "p")
        assert model.adapters == [] and not any("lora" in n for n, _ in model.named_parameters())
        return
    load_peft(model, tmp_path / "p")
    cfg = model.adapters[0].config
    assert {k: cfg[k] for k in expect} == expect and cfg["rank"] == 3 and cfg["alpha"] == 6.0
    x = example_input("vit")
    with torch.no_grad():
        assert torch.allclose(model(x), library_features("vit", base, x), atol=1e-5)


def test_sam_segmenter_round_trip_carries_the_mask_decoder(tmp_path):
    """The encoder's LoRA goes to peft (timm samvit); the trained prompt encoder / mask decoder, which the
    timm model has no module for, to zoo_head.safetensors; load_peft puts both back."""
    from tests.seg_helpers import save_reference_sam, tiny_segmenter

    _, f = save_reference_sam(tmp_path / "sam.pth")
    model = tiny_segmenter(num_classes=2, weights=str(f))
    zoo.apply_adapter(model, "lora", rank=2, targets=["q", "v"])
    train_a_little(model)
    export_peft(model.eval(), tmp_path / "peft")
    head = load_file(str(tmp_path / "peft" / "zoo_head.safetensors"))
    assert head and all(k.startswith("decoder.") for k in head)
    fresh = tiny_segmenter(num_classes=2, weights=str(f)).eval()
    load_peft(fresh, tmp_path / "peft")
    want, got = model.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    x = example_input("sam", 1)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("family", ["vit", "ast"])
def test_hydra_is_one_lora_with_a_bias_in_peft(family, tmp_path):
    """Hydra's parallel + sequential branches = a rank r_p + r_s LoRA on the input with a bias on B."""
    base, bb, model = adapted(family, tmp_path)
    zoo.remove_adapters(model)
    model = zoo.ImageClassifier(bb, 5) if family == "vit" else bb
    zoo.apply_adapter(model, "hydra", par_rank=2, seq_rank=3, scale=0.7, targets=["o", "fc2", "qkv"])
    train_a_little(model)
    model.eval()
    export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["lora_bias"] is True and cfg["r"] == 5 and cfg["lora_alpha"] == pytest.approx(0.7 * 5)
    x = example_input(family)
    with torch.no_grad():
        want = zoo_features(family, bb, x)
    peft_on(base, tmp_path / "peft")
    with torch.no_grad():
        got = library_features(family, base, x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    with pytest.raises(ExportError, match="lora_bias"):  # peft's adapter has a bias a zoo LoRA cannot hold
        load_peft(zoo_backbone(family, library_model(family, num_classes=5 if family == "vit" else 0), tmp_path),
                  tmp_path / "peft")


def test_a_clip_out_proj_delta_warns_about_peft_mha(tmp_path):
    _, _, model = adapted("clip", tmp_path, targets=["o"])
    with pytest.warns(UserWarning, match="3774"):
        export_peft(model, tmp_path / "peft")
    _, _, model = adapted("clip", tmp_path, targets=["q", "v"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_peft(model, tmp_path / "peft2")  # zero out_proj factors: nothing to warn about


def test_a_failed_re_export_leaves_the_previous_one_or_no_adapter_never_a_mixed_pair(tmp_path, monkeypatch):
    """The files were written one after the other: a full disk at adapter_config.json left the old config
    beside the new weights, which peft loads without a word. Now a failed write leaves the previous export
    whole, and a crash between the renames leaves no adapter_config.json (no adapter, to peft and load_peft)."""

    from zoo.export.peft import CONFIG, WEIGHTS, ZOO_HEAD, read_peft

    _, _, old_model = adapted("vit", tmp_path)
    _, _, new_model = adapted("vit", tmp_path, rank=4)
    old, new = folder_files(export_peft(old_model, tmp_path / "old")), folder_files(export_peft(new_model, tmp_path / "new"))
    assert old[CONFIG] != new[CONFIG] and old[WEIGHTS] != new[WEIGHTS] and ZOO_HEAD not in new
    out = export_peft(old_model, tmp_path / "peft")

    disk_full_at(monkeypatch, CONFIG)
    with pytest.raises(OSError) as e:
        export_peft(new_model, out)
    assert e.value.errno == 28 and e.value.filename == str(out / CONFIG)
    assert folder_files(out) == old  # the previous export, whole, and no temporary folder
    monkeypatch.undo()

    crash_at_rename(monkeypatch, out / CONFIG)
    with pytest.raises(OSError, match=rf"Input/output error; {re.escape(str(out))} is left without {CONFIG}, an "
                                      "incomplete set that readers refuse: write it again"):
        export_peft(new_model, out)
    monkeypatch.undo()
    left = folder_files(out)
    assert sorted(left) == sorted(k for k in new if k != CONFIG) and all(left[k] == new[k] for k in left)
    with pytest.raises(FileNotFoundError, match=rf"not a peft adapter folder: expected {CONFIG}"):
        read_peft(out)
    with pytest.raises(ValueError, match=rf"Can't find '{CONFIG}'"):
        peft.PeftConfig.from_pretrained(str(out))

    (out / ZOO_HEAD).write_bytes(b"an earlier export's head")  # this export has its head in modules_to_save
    export_peft(new_model, out)
    assert folder_files(out) == new


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from zoo.io import atomic_path, write_together
folder = Path(sys.argv[1])
with atomic_path(folder / "adapter_model.safetensors") as tmp:  # a file written on its own (an older export)
    tmp.write_bytes(b"half a file")
    write_together(folder, {"adapter_model.safetensors": b"weights",  # a set, killed while writing its config
                            "adapter_config.json": lambda p: os.kill(os.getpid(), signal.SIGKILL)}, last="adapter_config.json")
"""


def test_the_next_export_removes_the_temporaries_a_killed_export_left_and_nothing_else(tmp_path):
    """A writer killed with SIGKILL leaves its hidden temporary file (atomic_path) or staging folder
    (write_together) behind, and nothing removed them. The next export into the folder removes those of
    the names it writes whose writer is gone (its pid, recorded in the name, is dead on this host), or,
    older names without an owner, unchanged for hours; a writer still at work, another host's, and every
    other file stay."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from zoo.tempnames import STALE_AFTER_S, host

    out = tmp_path / "peft"
    out.mkdir()
    res = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert res.returncode == -9, res.stderr[-2000:]
    killed = sorted(p.name for p in out.iterdir())  # the staging folder of the set, the file written on its own
    pid = re.fullmatch(r"\.adapter_config\.json\.(\d+)@.*~\w{8}\.tmp", killed[0]).group(1)
    assert re.fullmatch(rf"\.adapter_model\.safetensors\.{pid}@{re.escape(host())}~\w{{8}}\.tmp", killed[1]), killed
    assert (out / killed[0]).is_dir() and (out / killed[1]).read_bytes() == b"half a file"
    hours_ago = time.time() - STALE_AFTER_S - 60
    aged = ".zoo_export.json.k1ll3d_x.tmp"  # an older name without an owner, unchanged for hours
    keep = {f".adapter_config.json.{os.getpid()}@{host()}~abcdefgh.tmp": True,  # a writer at work now
            ".adapter_model.safetensors.recent12.tmp": False,  # no owner, but changed just now: maybe at work
            f".adapter_config.json.{pid}@{host()}.elsewhere~abcdefgh.tmp": False,  # another host's, recent
            ".adapter_config.json.bak": True, "notes.tmp": True, ".adapter_config.json.12345678.tmp.keep": True,
            f".model.onnx.{pid}@{host()}~abcdefgh.tmp": True}  # a name this export does not write
    for name, old in {**keep, aged: True}.items():
        (out / name).write_bytes(b"")
        if old:
            os.utime(out / name, (hours_ago, hours_ago))
    _, _, model = adapted("vit", tmp_path)
    export_peft(model, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(["adapter_config.json", "adapter_model.safetensors",
                                                            "zoo_export.json", *keep])
