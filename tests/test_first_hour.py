"""The first hour of a new user (issue #22): errors in the right order and fast, names that help."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import compose_config, run_train


def _no_weights(*a, **k):
    raise AssertionError("weights were built before the data was checked")


def test_missing_vtab_data_fails_on_the_data_before_any_weights(tmp_path, monkeypatch):
    """backbone=vit would download IN-21k weights: the missing data must be reported first."""
    monkeypatch.setattr("zoo.create_backbone", _no_weights)
    with pytest.raises(FileNotFoundError, match=r"train800.txt.*\n.*images"):
        run_train(["backbone=vit", "task.dataset=cifar", f"data.root={tmp_path}/nowhere"], tmp_path)


def test_missing_esc50_fails_on_the_data_with_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr("zoo.create_backbone", _no_weights)
    with pytest.raises(FileNotFoundError, match=r"meta/esc50.csv not found.*github.com/karolpiczak/ESC-50"):
        run_train(["backbone=ast", "task=audio", "task.dataset=esc50", f"task.data_dir={tmp_path}/ESC-50-master"], tmp_path)


def test_missing_image_folder_fails_when_composed(tmp_path):
    from tasks.runner import user_errors

    with pytest.raises(SystemExit, match=r"^error: .*data.root=.*nowhere does not exist; expected an image folder"):
        with user_errors():
            compose_config(["experiment=tiny", "data.layout=imagefolder", f"data.root={tmp_path}/nowhere"]).task.num_classes


def _artifact_on_local_base(tmp_path: Path, recorded: Path | None) -> Path:
    art = tmp_path / "adapter"
    art.mkdir()
    meta = {"methods": [{"name": "lora", "config": {}}], "head": {"type": "linear", "in_features": 192, "num_classes": 10},
            "backbone": {"family": "ast", "model": "deit_tiny_distilled_patch16_224",
                         "weights_tag": "file:ast_demo.safetensors", "kwargs": {}},
            "task": {"kind": "audio", "config": {"_target_": "tasks.audio.AudioTask"}, "data": {}}}
    if recorded is not None:
        meta["base_weights"] = {"path": str(recorded), "config": "ast_demo"}
    (art / "adapter.json").write_text(json.dumps(meta))
    return art


def test_eval_of_an_artifact_on_local_base_weights_names_its_config_and_path(tmp_path):
    """Not ``backbone=vit_demo`` for an AST: the run's own backbone config and the file it read."""
    from omegaconf import OmegaConf

    from tasks.runner import evaluate

    gone = tmp_path / "checkpoints" / "audio" / "ast_demo.safetensors"
    cfg = OmegaConf.create({"artifact": str(_artifact_on_local_base(tmp_path, gone)), "split": "test", "seed": 0,
                            "backbone": {"weights": None}})
    with pytest.raises(ValueError, match=rf"ast_demo.safetensors; the run read {gone} \(not on this machine\): pass "
                                         rf"weights=/path/to/ast_demo.safetensors \(backbone=ast_demo backbone.weights="):
        evaluate(cfg)
