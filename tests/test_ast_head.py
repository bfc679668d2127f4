"""AST's classifier head (``task.head=layernorm_linear``, :class:`zoo.LayerNormLinearClassifier`): LayerNorm then
Linear on the pooled feature, as ``mlp_head`` in YuanGongND/ast ``src/models/ast_models.py`` and ``classifier`` in
HF's ``ASTForAudioClassification``; its artifact record, loading, mismatches and the AST recipe that uses it."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import zoo
from tests.test_ast import tiny_ast
from zoo.heads import LayerNormLinearClassifier

D, C = 32, 5  # the tiny AST's width, the number of classes


def _perturb_head(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # γ off 1, β off 0: a head that skipped or swapped its LayerNorm shows
        for p in model.head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def test_output_is_layernorm_then_linear_by_hand():
    model = LayerNormLinearClassifier(tiny_ast(), C).eval()
    _perturb_head(model)
    x = torch.randn(3, 100, 128)
    with torch.no_grad():
        tok = model.backbone.forward_features(x)
        h = (tok[:, 0] + tok[:, 1]) / 2  # ast_models.py: (x[:, 0] + x[:, 1]) / 2 after v.norm
        ln, fc = model.head[0], model.head[1]
        mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        normed = (h - mu) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias
        want = normed @ fc.weight.T + fc.bias
        got = model(x)
    assert got.shape == (3, C)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # without the LayerNorm the logits differ (the test above would catch a head that skipped it)
    assert not torch.allclose(got, fc(h), atol=1e-3)


def test_init_is_the_reference_mlp_head_defaults():
    """ast_models.py builds nn.Sequential(nn.LayerNorm(d), nn.Linear(d, label_dim)) and never re-initialises it:
    γ = 1, β = 0, eps 1e-5 and nn.Linear's own init (the same numbers from the same seed)."""
    bb = tiny_ast()
    torch.manual_seed(7)
    ref = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, C))
    torch.manual_seed(7)
    model = LayerNormLinearClassifier(bb, C)
    assert model.head[0].eps == 1e-5 == ref[0].eps
    assert torch.equal(model.head[0].weight, torch.ones(D)) and torch.equal(model.head[0].bias, torch.zeros(D))
    assert model.head.state_dict().keys() == ref.state_dict().keys()  # 0.weight, 0.bias, 1.weight, 1.bias: mlp_head.*
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.head.state_dict().items())


def test_equals_hf_ast_for_audio_classification(tmp_path):
    """External oracle: transformers' ASTForAudioClassification (classifier = LayerNorm + dense on the pooler
    output) with its weights in the zoo AST and the head; the HF head takes the config's eps, set to 1e-5 here."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ASTConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                 max_length=100, num_mel_bins=128, num_labels=C, layer_norm_eps=1e-5)
    hf = transformers.ASTForAudioClassification(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    model = LayerNormLinearClassifier(tiny_ast(weights=str(tmp_path), layer_norm_eps=1e-5), C).eval()
    model.head[0].load_state_dict(hf.classifier.layernorm.state_dict())
    model.head[1].load_state_dict(hf.classifier.dense.state_dict())
    x = torch.randn(2, 100, 128)
    with torch.no_grad():
        want, got = hf(input_values=x).logits, model(x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_parameter_count_and_gradients_reach_the_layernorm():
    model = LayerNormLinearClassifier(tiny_ast(), C)
    zoo.apply_adapter(model, "lora", rank=2, targets=["q", "v"])
    head = sum(p.numel() for p in model.head.parameters())
    assert head == 2 * D + D * C + C
    lora = sum(p.numel() for n, p in model.backbone.named_parameters() if p.requires_grad)
    assert lora == 2 * 2 * (2 * D * 2)  # 2 blocks × (q, v) × (A: r×d + B: d×r), r = 2
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora + head  # the head always trains
    loss = F.cross_entropy(model(torch.randn(2, 100, 128)), torch.tensor([0, 3]))
    loss.backward()
    for name, p in model.head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # LayerNorm γ, β and the Linear all learn
    frozen = [n for n, p in model.backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(model.backbone.get_parameter(n).grad is None for n in frozen)


def _adapted(tmp_path, cls=LayerNormLinearClassifier, seed=0):
    """A LoRA-adapted tiny AST classifier on base weights kept in a file (so from_zoo can rebuild the base)."""
    f = tmp_path / "base.safetensors"
    if not f.is_file():
        save_file({k: v.contiguous() for k, v in tiny_ast().model.state_dict().items()}, str(f))
    model = cls(tiny_ast(weights=str(f)), C)
    zoo.apply_adapter(model, "lora", rank=2, targets=["q", "v"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA's B off zero and the head off its init: every saved tensor matters
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), f


def test_artifact_records_the_head_and_from_zoo_rebuilds_it(tmp_path):
    model, base = _adapted(tmp_path)
    zoo.save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert meta["head"] == {"type": "layernorm_linear", "in_features": D, "num_classes": C, "eps": 1e-5}
    assert {"head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias"} <= set(meta["tensors"])
    rebuilt = zoo.from_zoo(str(tmp_path / "a"), weights=base)
    assert type(rebuilt) is LayerNormLinearClassifier and rebuilt.head_spec() == meta["head"]
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in rebuilt.state_dict().items())  # base, LoRA and head tensors
    x = torch.randn(2, 100, 128)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


@pytest.mark.parametrize("saved,into", [(LayerNormLinearClassifier, zoo.ImageClassifier),
                                        (zoo.ImageClassifier, LayerNormLinearClassifier)])
def test_a_head_mismatch_is_named_and_leaves_the_model_unchanged(tmp_path, saved, into):
    model, base = _adapted(tmp_path, saved)
    zoo.save_adapter(model, tmp_path / "a")
    other = into(tiny_ast(weights=str(base)), C)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    flags = [p.requires_grad for p in other.parameters()]
    with pytest.raises(zoo.AdapterMismatchError) as e:
        zoo.load_adapter(other, tmp_path / "a")
    lines = [ln.strip() for ln in str(e.value).splitlines() if ln.strip().startswith("head:")]
    assert len(lines) == 1 and "layernorm_linear" in lines[0] and "'linear'" in lines[0], str(e.value)
    assert not zoo.adapters_of(other) and [p.requires_grad for p in other.parameters()] == flags
    assert other.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_another_eps_is_a_mismatch_too(tmp_path):
    model, base = _adapted(tmp_path)
    zoo.save_adapter(model, tmp_path / "a")
    other = LayerNormLinearClassifier(tiny_ast(weights=str(base)), C, eps=1e-12)
    with pytest.raises(zoo.AdapterMismatchError, match=r"head: .*'eps': 1e-05.*'eps': 1e-12"):
        zoo.load_adapter(other, tmp_path / "a")


@pytest.mark.parametrize("eps,msg", [("tiny", "head.eps"), (-1.0, "head.eps"), (None, "eps")])
def test_a_bad_eps_in_adapter_json_is_one_line(tmp_path, eps, msg):
    model, base = _adapted(tmp_path)
    zoo.save_adapter(model, tmp_path / "a")
    cfg = tmp_path / "a" / "adapter.json"
    meta = json.loads(cfg.read_text())
    if eps is None:
        del meta["head"]["eps"]
    else:
        meta["head"]["eps"] = eps
    cfg.write_text(json.dumps(meta))
    with pytest.raises(zoo.AdapterMismatchError, match=msg) as e:
        zoo.from_zoo(str(tmp_path / "a"), weights=base)
    assert "\n" not in str(e.value) and "adapter.json" in str(e.value)


def test_build_classifier_names_the_valid_heads():
    with pytest.raises(ValueError, match=r"unknown classifier head 'mlp'; valid: linear, layernorm_linear"):
        zoo.build_classifier(tiny_ast(), C, "mlp")
    assert type(zoo.build_classifier(tiny_ast(), C, "layernorm_linear")) is LayerNormLinearClassifier
    assert type(zoo.build_classifier(tiny_ast(), C)) is zoo.ImageClassifier
    with pytest.raises(ValueError, match="eps must be a positive number"):
        LayerNormLinearClassifier(tiny_ast(), C, eps=0.0)


def test_published_entry_rebuilds_the_head_by_name(tmp_path, monkeypatch):
    """publish copies the record (the entry and the model card name the head); from_zoo(NAME) rebuilds AST's
    head from it, on the base weights published beside it, and gives the model's logits."""
    from zoo import hub

    monkeypatch.setenv(hub.ENV_HOME, str(tmp_path / "cache"))  # own cache, only this registry
    for var in (hub.ENV_OFFLINE, hub.ENV_REGISTRY):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub.registry, "PROJECT_REGISTRY", tmp_path / "none" / "registry.json")
    monkeypatch.setattr(hub.registry, "_EXTRA_REGISTRIES", [])
    reg = tmp_path / "zoo" / "registry.json"
    monkeypatch.setattr(hub.registry, "LOCAL_REGISTRY", reg)
    model, base = _adapted(tmp_path)
    zoo.save_adapter(model, tmp_path / "run" / "adapter", extra={"base_weights": {"path": str(base)}})
    entry = hub.publish_run(tmp_path / "run", "ast-mlp-head", registry=reg, out_dir=tmp_path / "zoo" / "ast-mlp-head")
    assert entry["head"] == model.head_spec() and entry["base_entry"] == "ast-mlp-head-base"
    assert '"type": "layernorm_linear"' in (tmp_path / "zoo" / "ast-mlp-head" / "README.md").read_text()
    base.unlink()  # the published copy of the base serves from here on
    rebuilt = zoo.from_zoo("ast-mlp-head")
    assert type(rebuilt) is LayerNormLinearClassifier
    x = torch.randn(2, 100, 128)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_a_bare_artifact_with_the_head_is_a_classifier_for_predict(tmp_path):
    """An artifact saved without a task record (zoo.save_adapter) says its kind by its head: both classifier
    heads are classification (before, only 'linear' was, and layernorm_linear was refused)."""
    from zoo.predict import load_predictor

    model, _ = _adapted(tmp_path)
    zoo.save_adapter(model, tmp_path / "a")
    assert load_predictor(tmp_path / "a", build=False).kind == "classification"
