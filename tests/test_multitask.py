"""task=multitask: multi-task stage (task ids in every batch, a head per task), then few-shot transfer."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zoo
from tests.helpers import compose_config, run_train


def test_multitask_datamodule_tags_tasks(tmp_path):
    from tasks.multitask import FewShotDataModule, MultiTaskDataModule

    root = Path(__file__).resolve().parents[1] / "data" / "synthetic"
    dm = MultiTaskDataModule(["dsprites_loc", "clevr_count"], root=str(root), img_size=32, generate=True, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 1600 and len(dm.val_set) == 400
    assert dm.train_set[0][2] == 0 and dm.train_set[1599][2] == 1
    x, y, t = next(iter(dm.train_dataloader()))
    assert set(t.tolist()) == {0, 1}  # shuffled over the union: batches mix tasks
    fs = FewShotDataModule(shots=3, dataset="clevr_dist", root=str(root), img_size=32, generate=True, num_workers=0)
    fs.prepare_data()
    fs.setup("fit")
    labels = [fs.train_set.dataset.items[i][1] for i in fs.train_set.indices]
    assert all(labels.count(c) == 3 for c in set(labels)) and len(set(labels)) > 1


def test_multi_head_loss_and_routing_per_sample():
    from tasks.multitask import MultiTaskClassificationTask

    cfg = compose_config(["experiment=multitask_tiny"])
    bb = {k: v for k, v in dict(cfg.backbone).items()}
    bb["kwargs"] = dict(bb["kwargs"])
    adapter = {k: (list(v) if k == "targets" else v) for k, v in dict(cfg.adapter).items()}
    task = MultiTaskClassificationTask(bb, adapter, ["dsprites_loc", "clevr_count"])
    model = task.model
    assert model.backbone.adapters[0].n_tasks == 2 and [h.out_features for h in model.head] == [16, 8]
    x, t = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 1, 0])
    logits = model(x, t)
    assert torch.isinf(logits[1, 8:]).all() and torch.isfinite(logits[0]).all()
    y = torch.tensor([3, 7, 2, 15])
    want = sum(torch.nn.functional.cross_entropy(model(x[i:i + 1], t[i:i + 1])[:, :[16, 8][t[i]]], y[i:i + 1])
               for i in range(4)) / 4
    torch.testing.assert_close(task.task_loss(logits, y, t), want)


@pytest.mark.parametrize("variant", ["mhr_z", "mhr_mu"])
def test_multitask_then_fewshot_runs(variant, tmp_path):
    m = run_train(["experiment=multitask_tiny", f"task.fewshot.variant={variant}"], tmp_path)
    out = Path(m["out_dir"])
    assert m["task"] == "multitask" and m["dataset"] == "clevr_dist"
    from tests.integration import assert_val_accuracy

    assert_val_accuracy(m, 200)  # the held-out task's val200
    assert_val_accuracy(m, 600, "multitask/val/acc")  # mean of three tasks' val200 accuracies
    assert json.loads((out / "metrics.json").read_text())["multitask/dataset"] == "dsprites_loc+dsprites_ori+clevr_count"
    mt_meta = zoo.read_adapter_config(out / "multitask" / "adapter")
    assert mt_meta["methods"][0]["config"]["n_tasks"] == 3 and mt_meta["head"]["num_classes"] == [16, 16, 8]
    mt = load_file(str(out / "multitask" / "adapter" / "adapter.safetensors"))
    fs = load_file(str(out / "fewshot" / "adapter" / "adapter.safetensors"))
    fs_meta = zoo.read_adapter_config(out / "fewshot" / "adapter")
    assert fs_meta["methods"][0]["config"]["variant"] == variant and fs_meta["head"]["num_classes"] == 6
    h, s = 8, 8  # experiment=multitask_tiny: n_splits 8, 8 skills
    if variant == "mhr_z":
        # the inventory is stage 1's, untouched; only a fresh routing row (and the new head) trained
        inv = [k for k in mt if ".mhr_A." in k or ".mhr_B." in k]
        assert inv and all(torch.equal(mt[k], fs[k]) for k in inv)
        routing = [k for k in fs if ".routing." in k]
        assert routing and all(fs[k].shape == (1, h * s) for k in routing)
        assert m["trainable_params"] == sum(fs[k].numel() for k in routing)
    else:
        assert not any(".mhr_" in k or ".routing." in k for k in fs)
        assert any(k.endswith("lora_A") for k in fs)


def test_multitask_configs_compose():
    cfg = compose_config(["experiment=mhr_vtab"])
    assert cfg.task.runner == "tasks.multitask.run" and cfg.adapter.name == "mhr"
    assert cfg.task.heldout not in cfg.task.datasets and cfg.task.fewshot.variant == "mhr_z"
    assert list(cfg.data.datasets) == list(cfg.task.datasets)
