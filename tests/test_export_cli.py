"""``python -m zoo export``: a finished run folder to peft / merged files, and the one-line refusals."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import zoo
from tests.export_helpers import VIT, library_model, train_a_little
from zoo import hub
from zoo.__main__ import main as cli

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(hub.ENV_HOME, str(tmp_path / "cache"))
    monkeypatch.delenv(hub.ENV_REGISTRY, raising=False)
    monkeypatch.setattr(hub.registry, "PROJECT_REGISTRY", tmp_path / "none" / "registry.json")
    monkeypatch.setattr(hub.registry, "LOCAL_REGISTRY", tmp_path / "none" / "local_registry.json")
    monkeypatch.setattr(hub.registry, "_EXTRA_REGISTRIES", [])


def finished_run(tmp_path, method, **opts):
    base = library_model("vit", num_classes=3)
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items() if not k.startswith("head.")}, str(weights))
    model = zoo.ImageClassifier(zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=None,
                                                    weights=str(weights), **VIT), 3)
    zoo.apply_adapter(model, method, **opts)
    train_a_little(model)
    run = tmp_path / f"run_{method}"
    zoo.save_adapter(model, run / "adapter")
    (run / "metrics.json").write_text(json.dumps({"val/acc": 0.5}))
    return base, weights, run, model.eval()


def test_export_a_run_for_peft_and_merged(tmp_path, capsys):
    import timm

    base, weights, run, model = finished_run(tmp_path, "lora", rank=2, targets=["q", "v"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    assert cli(["export", str(run), "--format", "peft", "--out", str(tmp_path / "peft"), "--weights", str(weights)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert cli(["export", str(run), "--merged", "--out", str(tmp_path / "merged"), "--weights", str(weights)]) == 0
    merged = timm.create_model(f"local-dir:{tmp_path / 'merged'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.allclose(pm(x), want, atol=1e-5)
        assert torch.allclose(merged(x), want, atol=1e-5)


def test_a_method_peft_cannot_express_is_one_line_or_merged_on_request(tmp_path, capsys):
    _, weights, run, _ = finished_run(tmp_path, "ssf")
    args = ["export", str(run), "--format", "peft", "--out", str(tmp_path / "out"), "--weights", str(weights)]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "method 'ssf' has no peft equivalent" in err and "--merged" in err
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    assert cli(args + ["--merged"]) == 0
    assert "writing it merged" in capsys.readouterr().err
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "model.safetensors").is_file()
