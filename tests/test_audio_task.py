"""task=audio end to end on the tiny generated set: every seed adapter trains, folds summarise."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import compose_config, run_train

SEED_ADAPTERS = ["linear", "full", "bitfit", "lora", "adapter", "vpt", "ssf", "conformer", "prefix"]


@pytest.mark.parametrize("adapter", SEED_ADAPTERS)
def test_tiny_audio_trains_every_seed_adapter(adapter, tmp_path):
    m = run_train(["experiment=tiny_audio", f"adapter={adapter}"], tmp_path)
    assert m["kind"] == "audio" and m["monitor"]["name"] == "val/acc"
    assert 0.0 <= m["val/acc"] <= 1.0 and m["test/acc"] is not None  # ESC-50 layout: the test fold is evaluated
    assert (Path(m["out_dir"]) / "adapter" / "adapter.safetensors").is_file()




def test_recipes_compose_with_the_reference_optimiser():
    cfg = compose_config(["experiment=petl_ast/esc50", "adapter=conformer"])
    assert cfg.task.optimizer.lr == 5e-3 and list(cfg.task.optimizer.betas) == [0.9, 0.98]
    assert cfg.task.optimizer.eps == 1e-6 and cfg.task.optimizer.weight_decay == 0.1
    assert cfg.backbone.max_length == 500 and cfg.data.freqm == 24 and cfg.data.timem == 80
    assert cfg.task.val_fold == "previous" and cfg.task.num_classes == 50  # PETL-AST: fold k-1 validates
    from omegaconf import OmegaConf

    raw = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/experiment/petl_ast/esc50.yaml")
    assert raw.hydra.sweeper.params["task.fold"] == "1,2,3,4,5"  # all folds in one command
    assert raw.hydra.callbacks.folds._target_ == "tasks.audio.FoldSummary"
    assert compose_config(["experiment=petl_ast/esc50", "adapter=vpt"]).task.optimizer.lr == 1e-2
    sc = compose_config(["experiment=petl_ast/speechcommands", "adapter=linear"])
    assert sc.task.optimizer.lr == 1e-3 and sc.task.num_classes == 35 and sc.data.batch_size == 128
    assert compose_config(["experiment=petl_ast/speechcommands", "task.dataset=speechcommands12"]).task.num_classes == 12


def test_fold_summary_reports_each_fold_and_the_mean(tmp_path):
    from tasks.metrics.audio import folds_markdown, summarize_folds

    for k, acc in [(1, 0.5), (2, 0.7), (3, 0.6)]:
        run = tmp_path / str(k)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(f"task:\n  fold: {k}\n")
        (run / "metrics.json").write_text(json.dumps({"schema_version": 2, "kind": "audio", "adapter": "lora",
                                                      "val/acc": acc - 0.1, "test/acc": acc}))
    table = summarize_folds(tmp_path)
    assert table["lora"]["folds"] == {"1": 0.5, "2": 0.7, "3": 0.6}
    assert table["lora"]["mean"] == pytest.approx(0.6)
    md = folds_markdown(table)
    assert "| lora | 50.0 | 70.0 | 60.0 | 60.0 |" in md
