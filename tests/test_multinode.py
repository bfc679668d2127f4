"""Multi-node configs under a simulated SLURM allocation: Lightning's SLURMEnvironment resolves world size,
ranks and the rendezvous address from SLURM's variables (no launch; the real two-"node" torchrun run is the
slow test in tests/test_pde_task.py)."""
from __future__ import annotations

import pytest

# what `srun` exports to task 3 of `sbatch --nodes=2 --ntasks-per-node=2` (second task on the second node)
SLURM_TASK_3 = {"SLURM_JOB_ID": "734242", "SLURM_JOB_NAME": "zoo-pde", "SLURM_NTASKS": "4",
                "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "3",
                "SLURM_LOCALID": "1", "SLURM_NODELIST": "cn[07-08]"}


@pytest.fixture
def slurm_env(monkeypatch):
    # Lightning's process-wide rank_zero_only.rank is read from SLURM_PROCID when lightning is first imported
    # and set to the trainer's global rank (3 here) when a DDP trainer is built: pin it to its value from
    # before this test, or every rank-zero write (metrics.json, artifacts) of the later tests is silenced
    import lightning.pytorch  # noqa: F401  (import before SLURM_PROCID is set)
    from lightning_utilities.core.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    for k, v in SLURM_TASK_3.items():
        monkeypatch.setenv(k, v)
    for k in ("MASTER_ADDR", "MASTER_PORT"):  # SLURMEnvironment writes these: restore them afterwards
        monkeypatch.setenv(k, "unset")
        monkeypatch.delenv(k)
    return SLURM_TASK_3


def _trainer(overrides, tmp_path):
    from tasks.runner import build_trainer
    from tests.helpers import compose_config

    cfg = compose_config(["experiment=tiny_pde", *overrides], tmp_path)
    return build_trainer(cfg, has_val=True)


def test_slurm_resolves_world_size_and_ranks_of_the_multinode_config(slurm_env, tmp_path):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    trainer = _trainer(["trainer=ddp_nodes_cpu", "trainer.devices=2"], tmp_path)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment)
    assert (trainer.num_nodes, trainer.num_devices) == (2, 2)
    assert (trainer.world_size, trainer.global_rank, trainer.node_rank, trainer.local_rank) == (4, 3, 1, 1)
    assert not trainer.is_global_zero  # this task writes no metrics.json / artifact (the runner's rank-0 guard)
    assert env.main_address == "cn07"  # the first node of the allocation
    assert env.main_port == 15000 + 4242  # Lightning: the job id's last 4 digits + 15000, same on every task
    # fit's launcher checks the allocation against the config, then runs in this (srun-made) process
    assert env.creates_processes_externally and trainer.strategy.launcher.launch(lambda: "ran") == "ran"
    # the GPU config takes the node count the same way
    gpu = _trainer(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=2",
                    "trainer.precision=32-true"], tmp_path)
    assert (gpu.world_size, gpu.global_rank, gpu.node_rank) == (4, 3, 1)


def test_slurm_allocation_that_disagrees_with_the_config_is_one_clear_line(slurm_env, tmp_path):
    # Lightning checks at launch (the start of fit); the runner turns its ValueError into one line
    from tasks.runner import user_errors

    with pytest.raises(SystemExit, match=r"^error: .*`devices=3`.*--ntasks-per-node=2.*HINT: Set `devices=2`"):
        with user_errors():
            _trainer(["trainer=ddp_nodes_cpu", "trainer.devices=3"], tmp_path).strategy.launcher.launch(lambda: None)
    with pytest.raises(SystemExit, match=r"^error: .*`num_nodes=3`.*--nodes=2"):
        with user_errors():
            _trainer(["trainer=ddp_nodes_cpu", "trainer.devices=2", "trainer.num_nodes=3"],
                     tmp_path).strategy.launcher.launch(lambda: None)


def test_without_slurm_one_process_is_rank_zero_of_one(monkeypatch, tmp_path):
    for k in list(SLURM_TASK_3):
        monkeypatch.delenv(k, raising=False)
    trainer = _trainer([], tmp_path)
    assert (trainer.world_size, trainer.global_rank, trainer.num_nodes) == (1, 0, 1) and trainer.is_global_zero


def test_csv_history_survives_a_ddp_spawn_test_call(tmp_path):
    # ddp_spawn's trainer.test runs a fresh copy of the CSV logger, which rewrites metrics.csv with its own
    # rows only; in-process strategies append (then the file is left alone)
    from types import SimpleNamespace

    from tasks.runner import keep_csv_history, train_losses

    f = tmp_path / "csv" / "metrics.csv"
    f.parent.mkdir()
    fit_rows = "epoch,step,train/loss_step\n0,0,1.5\n0,1,0.75\n"
    f.write_text(fit_rows)
    zero = SimpleNamespace(is_global_zero=True)
    with keep_csv_history(zero, tmp_path):
        f.write_text("epoch,step,test/nrmse\n0,0,0.25\n")  # what the spawned test process leaves
    assert train_losses(tmp_path) == (1.5, 0.75)
    assert f.read_text().splitlines()[-1].endswith("0.25")
    appended = f.read_text()
    with keep_csv_history(zero, tmp_path):
        f.write_text(appended + "0,2,,,\n")  # an in-process logger appends: nothing to restore
    assert f.read_text() == appended + "0,2,,,\n"
