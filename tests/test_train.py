"""End-to-end runs of train.py's job on the embedded tasks."""
import json
from pathlib import Path

import pytest
import torch

import zoo
from tests.helpers import compose_config, run_train, run_train_ddp
from tests.integration import assert_val_accuracy

ADAPTERS = ["linear", "full", "bitfit", "lora", "adapter", "vpt", "ssf"]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_baseline_configs_train(adapter, tmp_path):
    m = run_train(["experiment=tiny", f"adapter={adapter}"], tmp_path)
    assert m["adapter"] == adapter
    assert_val_accuracy(m, 200)  # val200, all of it (2 batches of 256)
    assert m["train_loss_last"] < m["train_loss_first"]
    out = Path(m["out_dir"])
    assert (out / "adapter" / "adapter.safetensors").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()


def test_every_adapter_config_composes():
    conf = Path(__file__).resolve().parents[1] / "conf" / "adapter"
    names = sorted(p.stem for p in conf.glob("*.yaml"))
    assert set(ADAPTERS) <= set(names)
    for name in names:
        cfg = compose_config(["experiment=tiny", f"adapter={name}"])
        assert cfg.adapter.name in zoo.list_adapters()


def test_unknown_choice_lists_options():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as e:
        compose_config(["adapter=nope"])
    assert "lora" in str(e.value) and "Available options" in str(e.value)


def test_checkpoint_is_adapter_only_and_artifact_reloads(tmp_path):
    m = run_train(["experiment=tiny", "adapter=lora"], tmp_path)
    out = Path(m["out_dir"])
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys and all("lora_" in k or k.startswith("model.head.") for k in keys)
    # the artifact rebuilds the model, reproduces the run's val accuracy, and merges exactly
    from tests.integration import check_trained_artifact

    check_trained_artifact(["experiment=tiny", "adapter=lora"], m)
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["methods"][0]["name"] == "lora" and meta["head"]["num_classes"] == 16


def test_resume_matches_uninterrupted(tmp_path):
    base = ["experiment=tiny", "adapter=lora", "task.max_epochs=2"]
    full = run_train(base, tmp_path / "a")
    # interrupt after the first epoch: stop the trainer at epoch 1 but keep the 2-epoch schedule
    part = run_train(base + ["+callbacks.stop._target_=tests.helpers.StopAfterEpochs", "+callbacks.stop.epochs=1"],
                     tmp_path / "b")
    assert part["train_loss_last"] is not None
    import warnings

    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        resumed = run_train(base + ["ckpt_path=last"], tmp_path / "b")
    # the CSV history is restored on purpose (below), the checkpoints are the run's own: no "directory exists
    # and is not empty" warning
    said = [str(w.message) for w in got]
    assert not [m for m in said if "exists and is not empty" in m], said
    assert resumed["val/acc"] == pytest.approx(full["val/acc"], abs=1e-6)
    assert resumed["train_loss_last"] == pytest.approx(full["train_loss_last"], rel=1e-4)
    # issue 15: the CSV log of the epochs before the interruption is kept, so train_loss_first is
    # the run's first loss (it was the resumed epoch's), and every step is logged once
    assert resumed["train_loss_first"] == pytest.approx(full["train_loss_first"], rel=1e-6)
    import csv

    def steps(run):
        rows = list(csv.DictReader((Path(run["out_dir"]) / "csv" / "metrics.csv").open()))
        return sorted(int(r["step"]) for r in rows if r.get("train/loss_step"))

    assert steps(resumed) == steps(full)


def test_missing_data_root_prints_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        run_train(["experiment=tiny", f"data.root={tmp_path}/nowhere", "data.generate=false"], tmp_path)
    msg = str(e.value)
    assert "train800.txt" in msg and "data.root=" in msg


def test_ddp_cpu_two_processes(tmp_path):
    m = run_train_ddp(["experiment=tiny", "adapter=lora"], tmp_path)
    assert_val_accuracy(m, 200)
    assert "LeafSpec" not in m["log"]  # Lightning's use of a deprecated torch API, silenced in the spawned ranks too
    assert (Path(m["out_dir"]) / "adapter" / "adapter.safetensors").is_file()


WARN_IN_A_FRESH_INTERPRETER = """
import sys, warnings
for folder in sys.argv[1:]:
    warnings.warn(f"Experiment logs directory {folder}/csv/ exists and is not empty. Previous log files ...")
    warnings.warn(f"Checkpoint directory {folder}/checkpoints exists and is not empty.")
warnings.warn("another warning")
"""


def test_a_resumed_fit_silences_its_own_folders_warnings_in_spawned_ranks_too(tmp_path):
    """ddp_spawn's ranks (trainer=ddp_cpu) are fresh interpreters: the resume's in-process filter did not
    reach them, and a resumed ddp_cpu run printed Lightning's "directory ... exists and is not empty" for its
    own csv/ and checkpoints/. A fresh interpreter started during the resumed fit (as the ranks are) says
    neither for the run's folder, still says them for another folder (a longer name too) and every other
    warning, and after the fit the environment is as it was."""
    import os
    import subprocess
    import sys

    from tasks.runner import resuming_in

    run, other = tmp_path / "run", tmp_path / "run2"

    def said():
        res = subprocess.run([sys.executable, "-c", WARN_IN_A_FRESH_INTERPRETER, str(run), str(other)],
                             capture_output=True, text=True, timeout=120, env=os.environ.copy())
        return [ln.split("UserWarning: ", 1)[1] for ln in res.stderr.splitlines() if "UserWarning: " in ln]

    before = os.environ.get("PYTHONWARNINGS")
    with resuming_in(run):
        during = said()
    assert during == [f"Experiment logs directory {other}/csv/ exists and is not empty. Previous log files ...",
                      f"Checkpoint directory {other}/checkpoints exists and is not empty.", "another warning"]
    assert os.environ.get("PYTHONWARNINGS") == before
    assert len(said()) == 5  # after the resumed fit: all of them again


@pytest.mark.slow
def test_a_resumed_ddp_cpu_run_prints_no_warning_about_its_own_folders(tmp_path):
    """The run end to end: train.py trainer=ddp_cpu for one epoch, then resumed to two (ckpt_path=last)."""
    base = ["experiment=tiny", "adapter=lora"]
    first = run_train_ddp(base + ["task.max_epochs=1"], tmp_path)
    resumed = run_train_ddp(base + ["task.max_epochs=2", "ckpt_path=last"], tmp_path)
    assert resumed["out_dir"] == first["out_dir"]
    assert "exists and is not empty" not in resumed["log"], resumed["log"][-3000:]
    assert "Restoring states from the checkpoint path" in resumed["log"]  # it did resume


def test_init_from_artifact(tmp_path):
    from tasks.runner import build_task

    m = run_train(["experiment=tiny", "adapter=lora"], tmp_path)
    art = Path(m["out_dir"]) / "adapter"
    cfg = compose_config(["experiment=tiny", "adapter=lora", f"+adapter.init_from={art}"])
    import lightning as L

    L.seed_everything(0)
    model = build_task(cfg).model
    from safetensors.torch import load_file

    saved = load_file(str(art / "adapter.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    bad = compose_config(["experiment=tiny", "adapter=ssf", f"+adapter.init_from={art}"])
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="use adapter=lora"):
        build_task(bad)


def test_every_experiment_composes():
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "experiment"
    names = sorted(str(p.relative_to(conf).with_suffix("")) for p in conf.rglob("*.yaml"))
    assert {"tiny", "quickstart", "upstream"} <= set(names)
    for name in names:
        cfg = compose_config([f"experiment={name}"], Path("/tmp/compose-check"))
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    q = compose_config(["experiment=quickstart", "adapter=full"])
    assert q.task.optimizer.lr == q.lr_per_adapter.full and q.backbone.weights.endswith("vit_demo.safetensors")


def test_config_mistakes_exit_with_the_message_not_a_traceback():
    from tasks.runner import user_errors

    with pytest.raises(SystemExit, match="^error: .*unknown VTAB task 'nope'; valid tasks: cifar"):
        with user_errors():
            compose_config(["experiment=tiny", "task.dataset=nope"], Path("/tmp/x")).task.num_classes
    from hydra.errors import InstantiationException

    with pytest.raises(SystemExit, match="error: adapter .lora.: rank must be an integer >= 1, got 0"):
        with user_errors():
            try:
                zoo.apply_adapter(zoo.ImageClassifier(__import__("tests.conftest").conftest.tiny_vit(), 2), "lora", rank=0)
            except ValueError as e:
                raise InstantiationException("wrapped") from e
    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        with user_errors():
            raise RuntimeError("a bug")


def test_publish_seed_publishes_only_that_seeds_run_and_metrics_json_says_which(tmp_path):
    """make demo's rule (publish_seed: 0): the other seeds' runs leave the zoo entry alone."""
    reg = tmp_path / "registry.json"
    common = ["experiment=tiny", "adapter=lora", "publish=tiny-lora", "publish_seed=0", f"publish_registry={reg}",
              f"paths.checkpoint_dir={tmp_path}/ckpt", "task.max_epochs=1"]
    other = run_train([*common, "seed=1"], tmp_path / "s1")
    assert other["published"] is None and not reg.exists()
    chosen = run_train([*common, "seed=0"], tmp_path / "s0")
    assert chosen["published"] == "tiny-lora" and "tiny-lora" in json.loads(reg.read_text())["entries"]
    # the two runs differ only by seed: one row of a table; the caption settings travel with each run
    assert other["config_id"] == chosen["config_id"]
    assert chosen["report"] == {"baseline": None, "metric": None, "reference": None}
