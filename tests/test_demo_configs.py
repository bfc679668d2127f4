"""Every demo (make demo and the modality quickstarts) is one sweep whose rows include its baseline, over at
least 3 seeds or folds, with the baseline named for the caption (tasks.report); each row composes."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tasks.runner import apply_final_overrides
from tests.helpers import CONF, compose_config

# experiment -> (the baseline row's label, the replicate key the sweep varies)
DEMOS = {
    "quickstart": ("linear", "seed"),
    "clip_quickstart": ("zero-shot", "seed"),
    "audio_quickstart": ("linear", "task.fold"),
    "seg_quickstart": ("linear", "seed"),
    "pde_quickstart": ("from scratch", "seed"),
    "restore_quickstart": ("no fine-tuning", "seed"),
    "caption_quickstart": ("no fine-tuning", "seed"),
}


def sweep(name: str) -> dict[str, list[str]]:
    params = OmegaConf.load(Path(CONF) / "experiment" / f"{name}.yaml").hydra.sweeper.params
    return {k: [v.strip() for v in str(vals).split(",")] for k, vals in params.items()}


def test_every_make_target_demo_is_listed():
    makefile = (Path(CONF).parent / "Makefile").read_text()
    for name in DEMOS:
        # one sweep per demo (LOG_ARG: make demos' folder), no per-row commands
        assert f"train.py experiment={name} $(LOG_ARG)\n" in makefile, name
    assert makefile.count("train.py experiment=pde_quickstart") == 1


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_demo_sweeps_its_rows_with_the_baseline_over_three_replicates(name):
    baseline, replicate = DEMOS[name]
    params = sweep(name)
    assert len(params[replicate]) >= 3 and len(set(params[replicate])) == len(params[replicate])
    assert set(params) == {"adapter", replicate}  # rows x replicates, nothing else multiplies the time
    labels = {}
    for adapter in params["adapter"]:
        cfg = apply_final_overrides(compose_config([f"experiment={name}", f"adapter={adapter}"]))
        assert cfg.report.baseline == baseline
        label = cfg.report.label or adapter  # tasks.runner.run_label: the adapter config as chosen
        labels[label] = cfg
        OmegaConf.to_container(cfg.task.optimizer, resolve=True)  # the per-method learning rate resolves
    assert len(labels) == len(params["adapter"]), "two rows share a label"
    assert baseline in labels and len(labels) >= 2
    base = labels[baseline]
    if baseline == "from scratch":  # the same network without the pretrained weights the other rows adapt
        assert base.backbone.weights is None and all(c.backbone.weights for k, c in labels.items() if k != baseline)
    if baseline in ("no fine-tuning", "zero-shot"):
        assert base.train is False and all(c.train for k, c in labels.items() if k != baseline)


def test_clip_rows_zero_shot_linear_probe_and_lora():
    rows = {a: apply_final_overrides(compose_config(["experiment=clip_quickstart", f"adapter={a}"]))
            for a in sweep("clip_quickstart")["adapter"]}
    probe, zs, lora = rows["baseline/linear_probe"], rows["baseline/zeroshot"], rows["clip_lora"]
    assert (probe.adapter.name, probe.task.head, probe.train) == ("linear", "linear", True)
    assert (zs.task.head, zs.train) == ("text", False)
    assert (lora.adapter.name, lora.adapter.tower, lora.task.head) == ("lora", "both", "text")  # CLIP-LoRA


def test_clip_demo_validates_its_last_epoch_and_selects_nothing_on_it():
    """The caption ranks the rows on validation (never test): the 4-shot validation draw must be on, the weights
    tested must be the last ones (CoOp's rule), and the last epoch must be one that validates -- otherwise val/acc
    is a stale epoch's (e.g. max_steps not a multiple of the epochs between validations)."""
    import math

    cfg = apply_final_overrides(compose_config(["experiment=clip_quickstart", "adapter=clip_lora"]))
    assert cfg.data.validate is True and cfg.task.selection == "last"
    train_items = cfg.task.shots * 12  # 16 shots of the 12 base classes (CLIP-LoRA's sampler repeats short classes)
    batches = math.ceil(train_items / cfg.data.batch_size)
    epochs, every = cfg.task.max_steps / batches, cfg.trainer.check_val_every_n_epoch
    assert epochs == int(epochs) and int(epochs) % every == 0, (cfg.task.max_steps, batches, every)


def test_final_overrides_rejects_a_malformed_entry():
    cfg = OmegaConf.create({"final_overrides": ["backbone.weights"], "backbone": {"weights": "x"}})
    with pytest.raises(ValueError, match="expected 'key=value' strings"):
        apply_final_overrides(cfg)


def test_zero_shot_row_evaluates_the_untuned_model(tmp_path):
    """adapter=baseline/zeroshot (train=false) on the CLIP demo (random tiny CLIP): nothing trains, no refusal,
    and its test accuracy is the untuned model's zero-shot accuracy the task measures separately."""
    from tests.helpers import run_train

    m = run_train(["experiment=clip_quickstart", "adapter=baseline/zeroshot", "backbone.weights=null"], tmp_path)
    assert m["label"] == "zero-shot" and m["trainable_params_with_head"] == 0
    assert m["test/acc"] is not None and m["test/acc"] == pytest.approx(m["test/acc_zeroshot"])


def test_make_demo_publishes_one_run_per_method_its_seed_0():
    """Bug caught: every seed published under the same zoo name, so the entry was whichever seed finished last."""
    from tasks.runner import publish_name

    for adapter in sweep("quickstart")["adapter"]:
        names = [publish_name(compose_config(["experiment=quickstart", f"adapter={adapter}", f"seed={s}"]))
                 for s in (0, 1, 2)]
        assert names == [f"vit-demo-{adapter}-clevr_dist", None, None]
    assert publish_name(compose_config(["experiment=tiny", "publish=mine", "seed=3"])) == "mine"  # publish_seed: null
    assert publish_name(compose_config(["experiment=tiny", "seed=3"])) is None


def test_config_id_is_equal_exactly_for_runs_that_differ_by_seed_or_fold(tmp_path):
    """What a table averages (tasks.report.group_runs): replicates share config_id, other settings do not."""
    from tasks.runner import config_id

    def cid(*overrides, out="a"):
        return config_id(compose_config(["experiment=quickstart", "adapter=lora", *overrides], tmp_path / out))

    base = cid("seed=0")
    assert cid("seed=1", out="b") == base  # another seed, another output folder: a replicate
    assert cid("seed=0", "publish=other", out="c") == base  # where it is published changes no result
    assert cid("seed=0", "task.optimizer.lr=0.001") != base
    assert cid("seed=0", "adapter.rank=4") != base
    folds = [config_id(compose_config(["experiment=audio_quickstart", "adapter=lora", f"task.fold={f}"], tmp_path))
             for f in (1, 2)]
    assert folds[0] == folds[1]


def test_publish_seed_must_be_a_seed_or_null():
    from tasks.options import check_run_options

    with pytest.raises(ValueError, match="publish_seed"):
        check_run_options(compose_config(["experiment=tiny", "publish_seed=first"]))
    check_run_options(compose_config(["experiment=quickstart", "publish_seed=null"]))


def test_make_demo_full_fine_tuning_moves_the_head_at_lr_and_the_backbone_at_encoder_lr():
    """make demo's full row: the head at the linear probe's lr (1e-2), every backbone weight at encoder_lr (1e-4);
    with one lr the random head wiped out the features on seed 0 (docs/modalities/classification.md#make-demo).
    Checked on the optimizer the task builds: AdamW's first step moves each element by its group's lr
    (m/sqrt(v) = sign(g) at step 1, weight decay aside), so a group with the wrong lr moves by the wrong amount."""
    import torch

    from tasks.runner import build_task

    rows = {a: compose_config(["experiment=quickstart", f"adapter={a}", "backbone.weights=null"])
            for a in sweep("quickstart")["adapter"]}
    assert rows["full"].task.optimizer.lr == rows["linear"].task.optimizer.lr == 1e-2
    assert rows["full"].task.optimizer.encoder_lr == 1e-4
    assert rows["linear"].task.optimizer.encoder_lr is None and rows["lora"].task.optimizer.encoder_lr is None
    task = build_task(rows["full"])
    head, body = task.model.head, task.model.backbone
    opt = task.build_optimizer()
    seen = {id(p) for g in opt.param_groups for p in g["params"]}
    assert seen == {id(p) for p in task.model.parameters()}  # every weight trains, each in one group
    for g in opt.param_groups:
        for p in g["params"]:
            assert g["lr"] == (1e-2 if any(p is q for q in head.parameters()) else 1e-4)
            assert g["weight_decay"] == (0.0 if p.ndim <= 1 else 1e-4)  # biases, norms, tokens' 1-d: no decay
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    x = torch.randn(4, 3, 32, 32)
    torch.nn.functional.cross_entropy(task.model(x), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    for n, p in task.model.named_parameters():
        lr = 1e-2 if n.startswith("head.") else 1e-4
        big = p.grad.abs() > 1e-4  # far above Adam's eps (1e-8): the step is lr * g / (|g| + eps) = lr * sign(g)
        assert big.any(), n
        moved = (p.detach() - before[n]).abs()[big]  # weight decay adds lr * 1e-4 * |p|: below the tolerance
        assert torch.allclose(moved, torch.full_like(moved, lr), rtol=1e-3), n
