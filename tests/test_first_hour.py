"""The first hour of a new user (issue #22): errors in the right order and fast, names that help."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import compose_config, run_train


def _no_weights(*a, **k):
    raise AssertionError("weights were built before the data was checked")


def test_missing_vtab_data_fails_on_the_data_before_any_weights(tmp_path, monkeypatch):
    """backbone=vit would download IN-21k weights: the missing data must be reported first."""
    monkeypatch.setattr("zoo.create_backbone", _no_weights)
    with pytest.raises(FileNotFoundError, match=r"train800.txt.*\n.*images"):
        run_train(["backbone=vit", "task.dataset=cifar", f"data.root={tmp_path}/nowhere"], tmp_path)


def test_missing_esc50_fails_on_the_data_with_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr("zoo.create_backbone", _no_weights)
    with pytest.raises(FileNotFoundError, match=r"meta/esc50.csv not found.*github.com/karolpiczak/ESC-50"):
        run_train(["backbone=ast", "task=audio", "task.dataset=esc50", f"task.data_dir={tmp_path}/ESC-50-master"], tmp_path)


def test_missing_image_folder_fails_when_composed(tmp_path):
    from tasks.runner import user_errors

    with pytest.raises(SystemExit, match=r"^error: .*data.root=.*nowhere does not exist; expected an image folder"):
        with user_errors():
            compose_config(["experiment=tiny", "data.layout=imagefolder", f"data.root={tmp_path}/nowhere"]).task.num_classes


def _artifact_on_local_base(tmp_path: Path, recorded: Path | None) -> Path:
    art = tmp_path / "adapter"
    art.mkdir()
    meta = {"methods": [{"name": "lora", "config": {}}], "head": {"type": "linear", "in_features": 192, "num_classes": 10},
            "backbone": {"family": "ast", "model": "deit_tiny_distilled_patch16_224",
                         "weights_tag": "file:ast_demo.safetensors", "kwargs": {}},
            "task": {"kind": "audio", "config": {"_target_": "tasks.audio.AudioTask"}, "data": {}}}
    if recorded is not None:
        meta["base_weights"] = {"path": str(recorded), "config": "ast_demo"}
    (art / "adapter.json").write_text(json.dumps(meta))
    return art


def test_eval_of_an_artifact_on_local_base_weights_names_its_config_and_path(tmp_path):
    """Not ``backbone=vit_demo`` for an AST: the run's own backbone config and the file it read."""
    from omegaconf import OmegaConf

    from tasks.runner import evaluate

    gone = tmp_path / "checkpoints" / "audio" / "ast_demo.safetensors"
    cfg = OmegaConf.create({"artifact": str(_artifact_on_local_base(tmp_path, gone)), "split": "test", "seed": 0,
                            "backbone": {"weights": None}})
    with pytest.raises(ValueError, match=rf"ast_demo.safetensors; the run read {gone} \(not on this machine\): pass "
                                         rf"weights=/path/to/ast_demo.safetensors \(backbone=ast_demo backbone.weights="):
        evaluate(cfg)


def _modules_after(script: str, args: list[str]) -> tuple[int, set[str], str]:
    """Run ``script args`` in a fresh interpreter; its exit code, the heavy modules it imported, stderr."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    probe = ("import runpy, sys, io, contextlib\n"
             f"sys.argv = {[script, *args]!r}\n"
             "rc = 0\n"
             "try:\n"
             f"    runpy.run_{'module' if script == 'zoo' else 'path'}({script!r}, run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    rc = e.code if isinstance(e.code, int) else 1\n"
             "    print(e.code if isinstance(e.code, str) else '', file=sys.stderr)\n"
             "heavy = [m for m in ('lightning', 'torch', 'timm', 'torchvision') if m in sys.modules]\n"
             "print('HEAVY=' + ','.join(heavy) + f' RC={rc}', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PROJECT_ROOT": str(ROOT)})
    last = [ln for ln in proc.stderr.splitlines() if ln.startswith("HEAVY=")][-1]
    heavy, rc = last[6:].split(" RC=")
    return int(rc), set(filter(None, heavy.split(","))), proc.stderr


@pytest.mark.parametrize("script,args,fails", [
    ("train.py", ["--help"], False),
    ("train.py", ["adapter=nope"], True),                    # Hydra: an unknown config choice
    ("train.py", ["task.dataset=mycats"], True),             # a resolver: not a VTAB task
    ("eval.py", ["--help"], False),
    ("zoo", ["--help"], False),
    ("zoo", ["list"], False),
])
def test_help_and_config_errors_answer_without_the_training_stack(script, args, fails, tmp_path):
    """--help and config mistakes never import Lightning / torch / timm (seconds of CPU before any answer)."""
    rc, heavy, err = _modules_after(script, [*args, f"hydra.run.dir={tmp_path}/run"] if script.endswith(".py")
                                    and args != ["--help"] else args)
    assert heavy == set(), f"{script} {args} imported {heavy}"
    assert (rc != 0) == fails, err[-2000:]
    if args == ["task.dataset=mycats"]:
        assert "unknown VTAB task 'mycats'" in err and "data.layout=imagefolder" in err


def test_a_failed_multirun_leaves_no_empty_sweep_folder(tmp_path):
    rc, _, err = _modules_after("train.py", ["-m", "adapter=nope,lora", f"paths.log_dir={tmp_path}/logs"])
    assert rc != 0 and "removed the empty sweep folder" in err
    assert not [p for p in (tmp_path / "logs" / "multiruns").iterdir()]


def test_the_empty_zoo_says_what_it_holds_and_how_to_fill_it(tmp_path, monkeypatch, capsys):
    from zoo import hub
    from zoo.__main__ import main as cli

    monkeypatch.setattr(hub.registry, "PROJECT_REGISTRY", tmp_path / "registry.json")
    monkeypatch.setattr(hub.registry, "LOCAL_REGISTRY", tmp_path / "local_registry.json")
    monkeypatch.setattr(hub.registry, "_EXTRA_REGISTRIES", [])
    monkeypatch.delenv(hub.ENV_REGISTRY, raising=False)
    assert cli(["list"]) == 0
    out = capsys.readouterr().out
    assert "the model zoo is empty" in out and "make demo" in out and "python -m zoo publish" in out


@pytest.mark.parametrize("module", ["zoo.checkpoint", "zoo.predict"])
def test_each_zoo_entry_module_imports_first(module):
    """``zoo`` imports its public names lazily: any module imported first (no ``import zoo`` before it)
    must not meet an import cycle."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]


def test_the_selection_metric_is_in_metrics_json_without_a_checkpoint_callback(tmp_path):
    """callbacks=none (the PDE quickstart): Lightning's default checkpoint keeps the last weights and monitors
    nothing; the task's monitor (val/nrmse) must still be measured and written, equal to the CSV's last value."""
    import csv

    m = run_train(["experiment=tiny_pde", "callbacks.model_checkpoint=null", "adapter=lora", "task.scheduler.name=none"], tmp_path)
    assert m["monitor"]["name"] == "val/nrmse" and m["monitor"]["value"] is not None
    assert m["val/nrmse"] == m["monitor"]["value"] and m["val/vrmse"] is not None
    rows = [r for r in csv.DictReader(open(Path(m["out_dir"]) / "csv" / "metrics.csv")) if r.get("val/nrmse")]
    assert float(rows[-1]["val/nrmse"]) == pytest.approx(m["val/nrmse"], rel=1e-5)


def test_parameter_counts_agree_between_run_log_metrics_and_table(tmp_path, caplog):
    """One meaning everywhere: the adapter's trainable parameters inside the backbone, head excluded."""
    import logging

    from tasks.report import PARAMS_NOTE, markdown

    caplog.set_level(logging.INFO, logger="adapter_zoo")
    m = run_train(["experiment=tiny", "adapter=lora", "adapter.rank=2", "trainer.max_epochs=1"], tmp_path)
    # LoRA rank 2 on q and v of 2 blocks of width 64: 2 blocks x 2 targets x r (64 + 64)
    assert m["trainable_params"] == 2 * 2 * 2 * (64 + 64)
    head = m["trainable_params_with_head"] - m["trainable_params"]
    assert head == 64 * 16 + 16  # the linear head of dsprites_loc (16 classes)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("adapter lora:"))
    assert f"{m['trainable_params']:,} trainable parameters" in line and f"+ {head:,} in the task head" in line
    md = markdown([m])
    assert f"| {m['trainable_params']:,} |" in md and md.count(PARAMS_NOTE) == 1 and PARAMS_NOTE in line
    # the share has one denominator everywhere: the backbone's parameters with its adapter (peft's convention)
    pct = 100 * m["trainable_params"] / m["backbone_params"]
    assert f"({pct:.2f}% of the backbone's {m['backbone_params']:,}, adapter included)" in line
    assert f"| {pct:.2f}% |" in md


def test_pyproject_installs_without_a_setuptools_licence_banner():
    """``make`` installs the project with pip: the licence as a TOML table printed a deprecation banner."""
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    from tests.helpers import ROOT

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert [str(w.message) for w in caught] == []
    assert dist.metadata.license_expression == "Apache-2.0"


def test_an_audio_folder_needs_no_class_count(tmp_path):
    """task.dataset=folder counts its class folders (as the image folder does); named sets keep theirs."""
    for c in ("dog", "rain", "bell"):
        (tmp_path / "sounds" / c).mkdir(parents=True)
    cfg = compose_config(["task=audio", "backbone=ast_demo", "task.dataset=folder", f"task.data_dir={tmp_path}/sounds"])
    assert cfg.task.num_classes == 3 and cfg.data.num_classes == 3
    assert compose_config(["task=audio", "backbone=ast_demo", "task.dataset=esc50"]).task.num_classes == 50
    assert compose_config(["task=audio", "backbone=ast_demo", "task.dataset=folder", "task.num_classes=7",
                           f"task.data_dir={tmp_path}/sounds"]).task.num_classes == 7


def test_every_lazy_public_name_resolves():
    import zoo

    missing = [n for n in zoo.__all__ if getattr(zoo, n, None) is None]
    assert missing == [] and "apply_adapter" in dir(zoo)
