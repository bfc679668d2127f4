"""Papers' recipes as experiment configs (issue 15): each composes with the values its paper or
reference code gives, and its adapter options are valid."""
from __future__ import annotations

import pytest
import torch

import zoo
from tests.helpers import compose_config

from .conftest import tiny_vit

RECIPES = {
    # experiment: {dotted key: value}
    "mask_tuning_paper": {"adapter.name": "mask_tuning", "backbone.name": "clip", "backbone.model": "ViT-B-16",
                          "task.optimizer.lr": 8e-5, "task.optimizer.weight_decay": 0.0, "task.max_epochs": 30,
                          "data.batch_size": 32},
    "comp_lora_clip": {"adapter.name": "comp_lora", "backbone.model": "ViT-B-16", "adapter.rank": 2, "adapter.alpha": 1.0,
                       "adapter.dropout": 0.25, "adapter.targets": ["q", "k", "v"], "task.optimizer.lr": 2e-4,
                       "task.optimizer.weight_decay": 1e-2, "data.batch_size": 32, "task.max_epochs": 320},
    "salt_paper": {"adapter.name": "salt", "backbone.name": "sam", "task.optimizer.lr": 1e-4,
                   "task.optimizer.weight_decay": 1e-2, "data.batch_size": 8, "task.max_epochs": 200},
    "mosa_vtab": {"adapter.name": "mosa", "adapter.bottleneck": 16, "data.batch_size": 128,
                  "task.optimizer.lr": 5e-3, "task.optimizer.weight_decay": 1e-2},
    "adaptformer_vtab": {"adapter.name": "adapter", "adapter.style": "adaptformer", "adapter.dropout": 0.1,
                         "adapter.scale": 0.1},
    "houlsby_vtab": {"adapter.name": "adapter", "adapter.style": "houlsby", "adapter.train_norms": True},
    "eva_vtab": {"adapter.name": "eva", "adapter.targets": ["q", "k", "v", "o", "fc1", "fc2"], "adapter.rho": 4.0,
                 "adapter.train_biases": True, "task.max_epochs": 30, "task.optimizer.weight_decay": 0.05,
                 "task.scheduler.warmup_epochs": 3, "data.batch_size": 64},
    "lora_pro_clip": {"adapter.name": "lora_pro", "backbone.name": "clip", "backbone.model": "ViT-B-16",
                      "adapter.rank": 8, "adapter.alpha": 16.0},
    "dylora_vtab": {"adapter.name": "dylora", "adapter.rank": 8, "adapter.alpha": 16.0, "adapter.frozen": True},
    "lora_ga_vtab": {"adapter.name": "lora_ga", "adapter.batches": 64, "adapter.direction": "ArB2r",
                     "adapter.stable_gamma": 16.0},
    "galore_vtab": {"adapter.name": "galore", "adapter.rank": 4, "adapter.scale": 4.0,
                    "adapter.update_proj_gap": 500, "task.optimizer.lr": 1e-4},
    "onebit_vtab": {"adapter.name": "onebit", "data.normalize": "none", "task.optimizer.lr": 1e-3,
                    "task.optimizer.weight_decay": 1e-4, "data.batch_size": 64, "task.scheduler.min_lr": 1e-5,
                    "backbone.kwargs.drop_path_rate": 0.1},
}


@pytest.mark.parametrize("exp", sorted(RECIPES))
def test_recipe_composes_with_the_papers_values(exp):
    from omegaconf import OmegaConf

    cfg = compose_config([f"experiment={exp}"])
    for key, want in RECIPES[exp].items():
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == want, f"{exp}: {key} = {got!r}, want {want!r}"
    opts = {k: v for k, v in OmegaConf.to_container(cfg.adapter, resolve=True).items() if k not in ("name", "init_from")}
    zoo.adapters.ADAPTERS.get(cfg.adapter.name).from_config(**opts)  # valid options


def test_houlsby_train_norms_trains_the_block_layernorms(tmp_path):
    torch.manual_seed(0)
    bb = tiny_vit()
    model = zoo.ImageClassifier(bb, 3)
    zoo.apply_adapter(model, "adapter", style="houlsby", bottleneck=4, train_norms=True)
    norms = {n for n, p in bb.named_parameters() if p.requires_grad and ".norm" in n and "adapter" not in n}
    assert norms == {f"model.blocks.{i}.norm{j}.{w}" for i in range(2) for j in (1, 2) for w in ("weight", "bias")}
    assert not any(p.requires_grad for n, p in bb.named_parameters() if n.startswith("model.norm."))  # final norm stays
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for n, p in bb.named_parameters() if n in norms)
    zoo.save_adapter(model, tmp_path)  # the trained norms are part of the artifact and reload
    torch.manual_seed(0)
    other = zoo.ImageClassifier(tiny_vit(), 3)
    zoo.load_adapter(other, tmp_path)
    assert {n for n, p in other.backbone.named_parameters() if p.requires_grad and n in norms} == norms


@pytest.mark.parametrize("groups_lr", [[5e-4], [5e-4, 0.1]])
def test_timm_style_cosine_matches_timm(groups_lr):
    """``task.scheduler.cosine_epochs`` (Hydra's VTAB schedule) against timm's CosineLRScheduler
    itself (t_initial=500, warmup_t=10, lr_min=1e-5, warmup_lr_init=1e-6) at every epoch of 100."""
    from types import SimpleNamespace

    from timm.scheduler import CosineLRScheduler

    from tasks.classification import ClassificationTask

    bb = {"name": "vit", "model": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32,
          "kwargs": {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}}
    task = ClassificationTask(bb, {"name": "linear"}, num_classes=3, optimizer={"lr": groups_lr[0], "weight_decay": 0.0},
                              scheduler={"warmup_epochs": 10, "min_lr": 1e-5, "cosine_epochs": 500, "warmup_lr_init": 1e-6})
    spe, epochs = 7, 100
    task._trainer = SimpleNamespace(estimated_stepping_batches=spe * epochs, max_epochs=epochs)
    conf = task.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    if len(groups_lr) > 1:  # a second group with its own lr (as MHR's routing logits)
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": groups_lr[1], "initial_lr": groups_lr[1]})
        sched = type(sched)(opt, sched.lr_lambdas + [task._timm_cosine(opt, spe).lr_lambdas[-1]])
    bases = [g["initial_lr"] for g in opt.param_groups]
    assert sorted(set(bases)) == sorted(groups_lr)
    ref_opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in bases])
    ref = CosineLRScheduler(ref_opt, t_initial=500, warmup_t=10, lr_min=1e-5, warmup_lr_init=1e-6)
    for epoch in range(epochs):
        ref.step(epoch)
        want = [g["lr"] for g in ref_opt.param_groups]
        got = [g["lr"] for g in opt.param_groups]
        assert got == pytest.approx(want, rel=1e-9), epoch
        for _ in range(spe):
            opt.step()
            sched.step()
    assert opt.param_groups[0]["lr"] > 0.9 * groups_lr[0]  # near-flat: after 100 of 500 epochs still > 90 %
