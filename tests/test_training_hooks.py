"""The training-loop hooks of the adapter contract (issue 26) under the task contract: ``make_optimizer``
(GaLore, LoRA-Pro) is the optimizer every task builds, ``on_train_step`` (DyLoRA) sees the optimizer-step
count, ``prepare`` gets the task's loss; runs under train.py resume exactly, optimizer state included."""
import pytest
import torch

import zoo
from tests.helpers import compose_config, run_train
from tests.integration import assert_val_accuracy
from zoo.adapters.galore import GaLoreAdamW
from zoo.adapters.lora_pro import LoRAProOptimizer

NEW = ["eva", "lora_ga", "lora_pro", "galore", "dylora"]
TINY = {"lora_ga": ["adapter.batches=2"], "eva": ["adapter.max_batches=4"], "galore": ["adapter.update_proj_gap=2"]}


def build(overrides):
    from tasks.runner import build_task

    return build_task(compose_config(overrides))


@pytest.mark.parametrize("name,cls", [("galore", GaLoreAdamW), ("lora_pro", LoRAProOptimizer), ("lora", torch.optim.AdamW)])
@pytest.mark.parametrize("exp", ["tiny", "tiny_depth"])
def test_every_task_builds_the_adapters_optimizer(name, cls, exp):
    task = build([f"experiment={exp}", f"adapter={name}"])
    opt = task.build_optimizer()
    assert type(opt) is cls
    trainable = {id(p) for p in task.model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable


def test_on_train_batch_start_passes_the_optimizer_step_count(monkeypatch):
    task = build(["experiment=tiny", "adapter=dylora"])
    a = zoo.adapters_of(task.model)[0]
    monkeypatch.setattr(type(task), "global_step", property(lambda self: 7))
    task.on_train_batch_start(None, 0)
    assert a.sampled == a.sample_rank(7) and all(m.train_b == a.sampled for m in a.modules)


def test_prepare_receives_the_tasks_loss():
    task = build(["experiment=tiny", "adapter=lora_ga", "adapter.batches=1"])
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([0, 1])
    calls = []

    def loss_fn(batch):
        calls.append(batch)
        return task.batch_loss(batch)

    zoo.prepare_adapters(task.model, [(x, y)], loss_fn=loss_fn)
    assert len(calls) == 1 and zoo.adapters_of(task.model)[0].initialized
    torch.testing.assert_close(task.batch_loss((x, y)), task.loss_fn(task(x), y))


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_tiny_config_trains(name, tmp_path):
    m = run_train(["experiment=tiny", f"adapter={name}", *TINY.get(name, [])], tmp_path)
    assert m["adapter"] == name
    assert_val_accuracy(m, 200)
    assert m["train_loss_last"] is not None and m["trainable_params"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["galore", "lora_pro", "dylora"])
def test_resume_matches_uninterrupted(name, tmp_path):
    """Interrupted after one epoch and resumed from last.ckpt: the same result as two epochs straight
    (GaLore's projectors and moments, LoRA-Pro's full-size moments, DyLoRA's step-keyed ranks)."""
    base = ["experiment=tiny", f"adapter={name}", "task.max_epochs=2", *TINY.get(name, [])]
    full = run_train(base, tmp_path / "a")
    run_train(base + ["+callbacks.stop._target_=tests.helpers.StopAfterEpochs", "+callbacks.stop.epochs=1"],
              tmp_path / "b")
    resumed = run_train(base + ["ckpt_path=last"], tmp_path / "b")
    assert resumed["val/acc"] == pytest.approx(full["val/acc"], abs=1e-6)
    assert resumed["train_loss_last"] == pytest.approx(full["train_loss_last"], rel=1e-5)
