"""`make methods-demo` (experiment=methods_demo): the ten newer methods next to LoRA with the quickstart's
backbone and recipe (on dsprites_ori), one table with the mean training step time (tasks.trainer.perf.StepTimer)."""
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from tasks.report import collect, markdown
from tasks.trainer.perf import StepTimer
from tests.helpers import compose_config, run_train

CONF = Path(__file__).resolve().parents[1] / "conf" / "experiment"
NEW = {"eva", "lora_ga", "lora_pro", "dylora", "galore", "miss", "shira", "loldu", "s2ft", "compacter"}


def sweep() -> list[str]:
    return yaml.safe_load((CONF / "methods_demo.yaml").read_text())["hydra"]["sweeper"]["params"]["adapter"].split(",")


def test_the_demo_sweeps_the_ten_and_lora_on_the_quickstart_task_and_backbone():
    assert set(sweep()) == NEW | {"lora"}
    q = compose_config(["experiment=quickstart", "adapter=lora"], Path("/tmp/compose-check"))
    for name in sweep():
        cfg = compose_config(["experiment=methods_demo", f"adapter={name}"], Path("/tmp/compose-check"))
        c = OmegaConf.to_container(cfg, resolve=True)
        assert c["adapter"]["name"] == name and c["task"]["optimizer"]["lr"] == c["lr_per_adapter"][name]
        assert c["backbone"] == OmegaConf.to_container(q.backbone, resolve=True)  # the same pretrained demo ViT
        # its measured table is on dsprites_ori, make demo's task until it moved to clevr_dist: pinned
        assert c["task"]["dataset"] == "dsprites_ori" and c["task"]["max_epochs"] == 5 and c["publish"] is None
    assert cfg.lr_per_adapter.lora == q.lr_per_adapter.lora  # LoRA's row is the quickstart's recipe


def test_a_demo_row_runs_and_records_its_step_time(tmp_path):
    """DyLoRA (a per-step rank sampler) through the demo's config, a few steps on a random backbone."""
    m = run_train(["experiment=methods_demo", "adapter=dylora", "backbone.weights=null", "task.max_epochs=1",
                   "+trainer.limit_train_batches=5", "+trainer.limit_val_batches=1"], tmp_path)
    assert m["adapter"] == "dylora" and m["val/acc"] is not None and m["step_ms"] > 0
    lines = markdown(collect(tmp_path)).splitlines()
    head, row = lines[0], lines[2]
    assert head.endswith("| artifact KiB | step ms |") and row.startswith("| dylora | dsprites_ori | 16,384 |")


def test_step_timer_counts_intervals_within_an_epoch_after_the_warm_up():
    t = StepTimer(skip=2)
    for _ in range(2):  # two epochs of 5 batches: 4 intervals each, the first 2 of the run skipped
        t.on_train_epoch_start(None, None)
        for i in range(5):
            t.on_train_batch_start(None, None, None, i)
    assert len(t.intervals) == 6 and t.mean_ms() > 0
    assert StepTimer().mean_ms() is None
