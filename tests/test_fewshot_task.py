"""task=fewshot: retention arithmetic, base-to-new, held-out zero-shot through train.py's job, bad input."""
from __future__ import annotations

import json

import pytest

from tasks.metrics.fewshot import harmonic_mean, retention_row


def test_retention_and_harmonic_mean_arithmetic():
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert harmonic_mean(69.34, 74.22) == pytest.approx(71.70, abs=0.01)  # zero-shot CLIP's row (ProLIP table)
    assert harmonic_mean(0.0, 0.0) == 0.0
    row = retention_row({"a": 0.5, "b": 0.9}, {"a": 0.6, "b": 0.9})
    assert row["zs_drop/a"] == pytest.approx(0.1) and row["zs_drop/b"] == 0.0
    assert row["zs/mean"] == pytest.approx(0.7) and row["zs0/mean"] == pytest.approx(0.75)
    assert row["zs_drop/mean"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="same held-out datasets"):
        retention_row({"a": 0.5}, {"b": 0.5})


def test_base_to_new_run_writes_retention_and_never_trains_on_new_classes(tmp_path):
    from tasks.data.fewshot import load_fewshot
    from tests.helpers import run_train

    m = run_train(["experiment=fewshot_tiny", "adapter=lora", "+adapter.tower=both", "task.subsample=base"], tmp_path)
    assert m["kind"] == "fewshot" and m["test/acc"] is not None
    assert m["b2n/base"] == pytest.approx(m["test/acc"], abs=1e-6)
    assert m["b2n/h"] == pytest.approx(harmonic_mean(m["b2n/base"], m["b2n/new"]))
    for d in ("shapecolors", "shapeforms"):
        assert m[f"zs_drop/{d}"] == pytest.approx(m[f"zs0/{d}"] - m[f"zs/{d}"])
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter.json").read_text())
    from tasks.data.fewshot_shapes import COLORS

    base = load_fewshot(_root(), "shapes", 2, 0, "base")
    assert meta["head"]["classnames"] == base.classnames and len(base.classnames) == len(COLORS) * 4 // 2
    assert {c for _, _, c in base.train + base.val} <= set(base.classnames)  # what training saw
    new = load_fewshot(_root(), "shapes", 2, 0, "new").classnames
    assert not set(new) & set(meta["head"]["classnames"])


def _root():
    from tests.helpers import ROOT

    return ROOT / "data" / "fewshot"


def test_untuned_reference_equals_a_fresh_zero_shot_evaluation(tmp_path):
    """zs0 is the untuned model's held-out zero-shot accuracy: recompute it independently."""
    import lightning as L
    import torch

    from tasks.data.fewshot import ImageItems, load_fewshot
    from tasks.fewshot import make_transforms
    from tests.helpers import compose_config, run_train
    from zoo.zeroshot import CLIPClassifier

    m = run_train(["experiment=fewshot_tiny", "adapter=linear", "task.head=linear"], tmp_path)
    cfg = compose_config(["experiment=fewshot_tiny"])
    L.seed_everything(cfg.seed)
    from tasks.base import create_backbone
    from tasks.runner import _plain

    bb = create_backbone(_plain(cfg.backbone))
    s = load_fewshot(_root(), "shapeforms", 0, 0)
    _, tf = make_transforms(32, bb.data_config["mean"], bb.data_config["std"], "none")
    data = ImageItems(s.image_root, s.test, tf)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        acc = (CLIPClassifier(bb, s.classnames, [s.template]).eval()(x).argmax(1) == y).float().mean().item()
    assert m["zs0/shapeforms"] == pytest.approx(acc)
    assert m["zs/shapeforms"] == pytest.approx(acc)  # a linear probe leaves both towers untouched


def test_bad_task_configs_are_one_line(tmp_path):
    from tests.helpers import run_train

    with pytest.raises(Exception, match="task=fewshot needs backbone=clip"):
        run_train(["experiment=fewshot_tiny", "backbone=vit", "adapter=lora"], tmp_path)
    with pytest.raises(Exception, match="use head=text"):
        run_train(["experiment=fewshot_tiny", "adapter=lora", "+adapter.tower=text", "task.head=zeroshot"], tmp_path)
    with pytest.raises(Exception, match="unknown few-shot dataset 'mnist'"):
        run_train(["experiment=fewshot_tiny", "task.dataset=mnist"], tmp_path)


def test_clip_lora_recipe_selects_fp16_autocast_on_a_gpu_and_fp32_on_cpu(monkeypatch, caplog):
    """CLIP-LoRA trains under fp16 autocast with a GradScaler (Lightning's 16-mixed) on a GPU; the
    recipe resolves trainer.precision from the accelerator at compose time."""
    import logging

    import torch

    from tests.helpers import compose_config

    def precision(overrides, cuda):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        cfg = compose_config(["experiment=clip_lora", *overrides])
        return cfg.trainer.precision  # resolved on access

    assert precision([], cuda=True) == "16-mixed"            # accelerator=auto with a GPU
    assert precision(["trainer=gpu"], cuda=True) == "16-mixed"
    with caplog.at_level(logging.INFO, logger="tasks.trainer.perf"):
        assert precision([], cuda=False) == "32-true"        # auto without a GPU
        assert precision(["trainer.accelerator=cpu"], cuda=True) == "32-true"
    assert "16-mixed needs a CUDA GPU" in caplog.text
    assert precision(["trainer.precision=bf16-mixed"], cuda=False) == "bf16-mixed"  # an explicit choice wins


def test_clip_quickstart_tunes_on_shapes_grainy_and_measures_retention_on_the_pretraining_domain(tmp_path):
    """experiment=clip_quickstart composes and runs (random tiny CLIP, 2 steps): base classes of the shifted
    ShapesGrainy set, new classes of the same set, held-out zero-shot on the original-domain sets."""
    from tasks.data.fewshot import dataset_info
    from tests.helpers import compose_config, run_train

    cfg = compose_config(["experiment=clip_quickstart"])
    assert dataset_info(cfg.data.dataset).name == "ShapesGrainy" and cfg.data.subsample == "base"
    assert [dataset_info(d).name for d in cfg.task.heldout] == ["ShapeColors", "ShapeForms"]
    assert cfg.adapter.tower == "both" and cfg.task.head == "text"  # the CLIP-LoRA recipe's adapter and head

    m = run_train(["experiment=clip_quickstart", "backbone.weights=null", "task.max_steps=2"], tmp_path)
    assert m["dataset"] == "shapesgrainy" and m["protocol"]["name"] == "16shot-seed1"
    assert m["b2n/h"] == pytest.approx(harmonic_mean(m["b2n/base"], m["b2n/new"]))
    assert {"zs0/shapecolors", "zs0/shapeforms"} <= set(m)


def test_clip_shift_measurement_is_consistent(tmp_path):
    """tasks.pretrain.clip_shift (how ShapesGrainy's shift was picked) on a random tiny CLIP: a zero-shot hit has
    both the colour and the form right, so zero-shot <= min(colour, form); unknown components refused."""
    import torch
    from safetensors.torch import save_file

    from tasks.pretrain.clip import build_tiny
    from tasks.pretrain.clip_shift import measure

    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in build_tiny().state_dict().items()}, str(path))
    rows = measure(["none", "cast+noise"], str(path), shots=2, test=4)
    assert [r[0] for r in rows] == ["none", "cast+noise"]
    for _, zs, colour, form, probe in rows:
        assert 0 <= zs <= min(colour, form) <= 1 and 0 <= probe <= 1
    with pytest.raises(ValueError, match="unknown shift components \\['fog'\\]"):
        measure(["fog"], str(path), shots=1, test=1)
