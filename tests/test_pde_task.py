"""task=pde: every registered adapter trains a few steps on a tiny MORPH; rollout evaluation and its report."""
from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

import zoo
from tests.helpers import refuses
from tasks.pde import PDEDataModule, PDEForecastTask

BACKBONE = dict(name="morph", model="Ti", pretrained=False,
                kwargs=dict(dim=32, depth=2, heads=4, heads_xa=4, mlp_dim=64, max_patches=64))
OPTS = {"mhr": {"n_splits": 4}, "miss": {"rank": 8}, "shira": {"rank": 4}, "colora": {"faig_steps": 2, "faig_batches": 1, "finetune_steps": 0}}
REFUSED = ("vpt", "q_adapter")  # token adapters: MORPH's tokens live on a grid (tests/test_morph.py checks the message)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("pde")


def _dm(root, **kw):
    opts = dict(root=str(root), generate="burgers", generate_options=dict(n=20, res=64, frames=9),
                context=1, rollout_horizon=4, batch_size=8, eval_batch_size=8)
    opts.update(kw)
    return PDEDataModule(**opts)


def _trainer(**kw):
    return L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, **kw)


# adapters made for other backbones refuse MORPH at attach (tests/test_morph.py checks how)
@pytest.mark.parametrize("name", [n for n in zoo.list_adapters() if n not in REFUSED and not refuses(n, "morph")])
def test_every_adapter_trains_a_few_steps(name, data_root):
    torch.manual_seed(0)
    task = PDEForecastTask(BACKBONE, {"name": name, **OPTS.get(name, {})}, rollout_horizon=4,
                           optimizer={"lr": 1e-2}, scheduler={"name": "none"})
    dm = _dm(data_root)
    dm.prepare_data()
    dm.setup("fit")
    zoo.prepare_adapters(task.model, dm.train_dataloader())  # CoLoRA's data-driven stage (as the runner)
    before = {n: p.detach().clone() for n, p in task.model.named_parameters() if p.requires_grad}
    trainer = _trainer()
    if name == "linear":  # head-only; MORPH's head (its decoder) is part of the frozen backbone: refused clearly
        assert not before
        with pytest.raises(ValueError, match="leaves nothing to train"):
            trainer.fit(task, datamodule=dm)
        return
    trainer.fit(task, datamodule=dm)
    m = trainer.callback_metrics
    assert math.isfinite(float(m["val/nrmse"])) and math.isfinite(float(m["train/loss"]))
    changed = [n for n, p in task.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed, f"{name}: no trainable parameter changed in 3 steps"


def test_rollout_eval_report_and_horizon_errors(data_root, tmp_path):
    torch.manual_seed(0)
    task = PDEForecastTask(BACKBONE, {"name": "morph_ft", "level": 2, "rank_attn": 2, "rank_mlp": 2},
                           rollout_horizon=4, output_dir=str(tmp_path), scheduler={"name": "plateau"})
    dm = _dm(data_root)
    trainer = _trainer()
    trainer.fit(task, datamodule=dm)
    res = trainer.test(task, datamodule=dm, verbose=False)[0]
    report = json.loads((tmp_path / "rollout_metrics.json").read_text())
    nrmse = torch.tensor(report["metrics"]["nrmse"])
    assert nrmse.shape == (4, 1)  # steps x fields
    assert res["test/nrmse"] == pytest.approx(float(nrmse.mean()), rel=1e-5)
    assert res["test/nrmse_last_step"] == pytest.approx(float(nrmse[-1].mean()), rel=1e-5)
    for k in ("crmse", "brmse", "frmse_low", "frmse_mid", "frmse_high"):  # PDEBench's, in the report and the columns
        assert res[f"test/{k}"] == pytest.approx(float(torch.tensor(report["metrics"][k]).mean()), rel=1e-5)
        assert f"### {k} per rollout step" in (tmp_path / "rollout_metrics.md").read_text()
    assert (tmp_path / "rollout_error.png").stat().st_size > 0
    assert "| step | u | mean |" in (tmp_path / "rollout_metrics.md").read_text()
    # the test rollout equals a hand rollout of the model on the test trajectories (first 10%, from frame 0)
    from tasks.data.pde import revin_denorm
    from tasks.metrics.pde import RolloutMetrics, rollout

    task.model.eval()
    hand = RolloutMetrics()
    for ctx, tgt, mu, sigma, _ in dm.test_dataloader():
        hand.update(revin_denorm(rollout(task.model, ctx, 4), mu, sigma), revin_denorm(tgt, mu, sigma))
    assert dm._sets["test"].indices == [0, 1]
    assert hand.summary()["nrmse"] == pytest.approx(res["test/nrmse"], rel=1e-5)
    assert hand.summary()["crmse"] == pytest.approx(res["test/crmse"], rel=1e-5)
    with pytest.raises(ValueError, match="exceed the trajectories' 9 frames"):
        _dm(data_root, rollout_horizon=9).setup("fit")
    with pytest.raises(ValueError, match="max_ar"):
        PDEForecastTask(BACKBONE, {"name": "linear"}, context=2)


def test_several_equations_share_batches_when_shapes_match(data_root):
    dm = _dm(data_root, generate=["burgers", "advection"])
    dm.setup("fit")
    assert len(dm._sets["train"].datasets) == 2
    with pytest.raises(ValueError, match="different sample shapes"):
        _dm(data_root, generate=["burgers", "fitzhugh_nagumo_1d"]).setup("fit")


def test_configs_compose_and_fsdp_wraps_morph_blocks():
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy
    from omegaconf import OmegaConf

    from tests.helpers import compose_config
    from zoo.backbones.morph_model import EncoderBlock

    for level in (1, 2, 3, 4):
        cfg = compose_config(["experiment=tiny_pde", f"adapter=morph_level{level}"])
        assert cfg.adapter.name == "morph_ft" and cfg.adapter.level == level and cfg.backbone.name == "morph"
    cfg = compose_config(["experiment=tiny_pde", "trainer=fsdp", "trainer.strategy.activation_checkpointing=true"])
    strategy = instantiate(OmegaConf.to_container(cfg.trainer.strategy, resolve=True))
    assert isinstance(strategy, FSDPStrategy)
    assert EncoderBlock.__name__ in repr(strategy.kwargs["auto_wrap_policy"]) and strategy.kwargs["use_orig_params"]
    assert "EncoderBlock" in repr(strategy._activation_checkpointing_kwargs["auto_wrap_policy"])


def test_bench_morph_rows(tmp_path):
    from bench import morph as bench_morph

    kw = '{"dim": 32, "depth": 1, "heads": 4, "heads_xa": 4, "mlp_dim": 64, "max_patches": 64}'
    res = bench_morph.main(["--kwargs", kw, "--w1d", "64", "--hw2d", "16", "--batch-size", "2", "--steps", "1",
                            "--warmup", "0", "--device", "cpu", "--memory", "skip", "--out", str(tmp_path)])
    rows = {(r["sample"], r["row"]): r for r in res}
    assert len(rows) == 2 * len(bench_morph.ROWS)
    assert rows[("1-D", "lora")]["tokens"] == 8 and rows[("2-D", "lora")]["tokens"] == 4
    assert rows[("1-D", "morph_level4")]["trainable_pct"] == pytest.approx(100.0)
    lv = [rows[("2-D", f"morph_level{i}")]["trainable"] for i in (1, 2, 3, 4)]
    assert lv == sorted(lv) and len(set(lv)) == 4  # cumulative levels
    assert "| 2-D 1x2x1x1x16x16 | morph_level1 |" in (tmp_path / "results.md").read_text()


def test_runner_selects_on_min_nrmse_tests_and_writes_the_report(tmp_path):
    from tests.helpers import run_train

    m = run_train(["experiment=tiny_pde", "adapter=morph_level1", "task.max_epochs=2"], tmp_path)
    assert m["kind"] == "pde" and m["monitor"]["name"] == "val/nrmse" and m["monitor"]["mode"] == "min"
    out = Path(m["out_dir"])
    import csv

    per_epoch = [float(r["val/nrmse"]) for r in csv.DictReader((out / "csv" / "metrics.csv").open()) if r.get("val/nrmse")]
    assert m["val/nrmse"] == pytest.approx(min(per_epoch), rel=1e-6)
    assert m["test/nrmse"] is not None and m["test/vrmse"] is not None
    report = json.loads((out / "rollout_metrics.json").read_text())
    assert len(report["metrics"]["nrmse"]) == 4  # tiny_pde's rollout horizon
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["head"] == {"type": "backbone_output"} and meta["task"]["kind"] == "pde"


@pytest.mark.slow
def test_ddp_two_cpu_processes_reduce_rollout_metrics_over_ranks(tmp_path):
    # each rank rolls out half of the validation trajectories; the summed errors / counts must equal a
    # single-process evaluation of the saved artifact over all of them
    from tests.helpers import run_train_ddp
    from tests.test_task_contract import evaluate_artifact

    m = run_train_ddp(["experiment=tiny_pde", "adapter=lora", "task.max_epochs=1"], tmp_path)
    assert m["monitor"]["value"] is not None
    ev = evaluate_artifact(Path(m["out_dir"]) / "adapter", ["split=val", "trainer.limit_val_batches=1"])
    assert ev["val/nrmse"] == pytest.approx(m["val/nrmse"], rel=1e-5)


# One process with global batch 16 vs P processes with batch 16 / P: the same steps (tasks/data/sampling.py), so
# the same adapter and metrics up to float reduction order. Dropout off: its masks are drawn per rank.
EQUAL_RUN = ["experiment=tiny_pde", "adapter=lora", "task.max_epochs=2", "backbone.dropout=0", "backbone.emb_dropout=0"]
EQUAL_KEYS = ("val/nrmse", "val/vrmse", "test/nrmse", "test/vrmse", "test/nrmse_last_step", "test/crmse", "test/brmse",
              "test/frmse_low", "test/frmse_mid", "test/frmse_high", "train_loss_first", "train_loss_last")


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    out = tmp_path_factory.mktemp("single") / "run"
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *EQUAL_RUN, "data.batch_size=16", f"hydra.run.dir={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
    for k in EQUAL_KEYS:
        assert mb[k] == pytest.approx(ma[k], rel=1e-5, abs=1e-7), k
    ta, tb = load_file(a / "adapter" / "adapter.safetensors"), load_file(b / "adapter" / "adapter.safetensors")
    assert set(ta) == set(tb) and ta
    moved = max(float(v.abs().max()) for k, v in ta.items() if "lora_B" in k)
    assert moved > 1e-3  # LoRA's B starts at 0: the runs trained, and a 1e-6 tolerance is far below the updates
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_ddp_two_cpu_processes_equal_one_process_with_the_same_global_batch(single_process_run, tmp_path):
    from tests.helpers import run_train_ddp

    m = run_train_ddp([*EQUAL_RUN, "data.batch_size=8"], tmp_path)
    _assert_same_run(single_process_run, Path(m["out_dir"]))


@pytest.mark.slow
def test_two_node_torchrun_equals_one_process_and_rank0_writes_once(single_process_run, tmp_path):
    # torchrun rendezvous on localhost, 2 "nodes" x 1 CPU process (gloo), per-process batch 8: the same
    # adapter and metrics as one process with batch 16; one metrics.json and one artifact (rank 0)
    import os
    import socket
    import subprocess
    import sys

    from tests.helpers import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "nodes"
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    procs = [subprocess.Popen([torchrun, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={r}", "--master_addr=127.0.0.1",
                               f"--master_port={port}", str(ROOT / "train.py"), *EQUAL_RUN, "data.batch_size=8",
                               "trainer=ddp_nodes_cpu", f"hydra.run.dir={out}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1]
    assert len(list(out.rglob("metrics.json"))) == 1 and len(list(out.rglob("adapter.safetensors"))) == 1
    m = json.loads((out / "metrics.json").read_text())
    assert m["kind"] == "pde" and m["monitor"]["value"] is not None
    _assert_same_run(single_process_run, out)
