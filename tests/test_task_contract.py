"""The task contract (tasks/base.py): every registered task kind trains, selects on its declared
monitor, writes a generic metrics.json, and its artifact reloads and reproduces the run's monitor
value through eval.py's ``evaluate``; plus reading pre-contract metrics.json files."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import zoo
from tasks.base import ZooTask, read_metrics, task_kinds
from tests.helpers import CONF, ROOT, compose_config, run_train
from tests.test_protocols import check_protocol_record

KINDS = task_kinds()


def evaluate_artifact(artifact: Path, overrides: list[str]) -> dict:
    """``python eval.py artifact=... <overrides>`` in this process."""
    from tasks.runner import evaluate, register_resolvers

    register_resolvers()
    ov = [f"artifact={artifact}", f"paths.output_dir={artifact.parent / 'eval'}", *overrides]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("eval", overrides=ov)
    return evaluate(cfg, overrides=ov)


def finished_runs(out_dir: Path) -> list[Path]:
    """Run folders (a metrics.json beside an adapter/ artifact) of a job, stages included."""
    return sorted(f.parent for f in out_dir.rglob("metrics.json") if (f.parent / "adapter" / "adapter.json").is_file())


def test_every_kind_is_registered_with_a_complete_declaration():
    assert {"classification", "multitask_classification", "dense_regression"} <= set(KINDS)
    for name, cls in KINDS.items():
        assert issubclass(cls, ZooTask) and cls.kind == name
        assert cls.mode_default in ("min", "max") and cls.monitor_default.startswith("val/")
        assert cls.monitor_default in [c.key for c in cls.columns], name
        assert cls.tiny_overrides, f"{name} declares no tiny config for the conformance tests"
        compose_config(list(cls.tiny_overrides))  # composes


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_conformance_tiny_fit_artifact_and_eval(kind, tmp_path):
    cls = KINDS[kind]
    # LoRA unless the kind's tiny config chooses its adapter (multitask's stages; conv LoRA on a CNN)
    own = kind == "multitask_classification" or any(o.startswith("adapter=") for o in cls.tiny_overrides)
    overrides = list(cls.tiny_overrides) if own else [*cls.tiny_overrides, "adapter=lora"]
    run_train(overrides, tmp_path)
    runs = finished_runs(tmp_path / "run")
    assert runs
    kinds = {}
    for run in runs:
        m = json.loads((run / "metrics.json").read_text())
        assert m["schema_version"] == 2
        mon = m["monitor"]
        assert mon["name"] in [c["key"] for c in m["columns"]] and mon["mode"] in ("min", "max")
        assert mon["value"] is not None and m[mon["name"]] == mon["value"]
        check_protocol_record(m)  # how the numbers were made: selection, splits, normalisation (issue #23)
        meta = json.loads((run / "adapter" / "adapter.json").read_text())
        assert meta["task"]["kind"] == m["kind"] and meta["task"]["monitor"]["name"] == mon["name"]
        b = meta["backbone"]  # the head rebuilds on a backbone of the run's architecture (random weights)
        bb = zoo.create_backbone(b["family"], model=b["model"], pretrained=None if b["family"] == "clip" else False,
                                 **b["kwargs"])
        assert meta["head"] is None or meta["head"] == zoo.heads.head_class(meta["head"]["type"]).from_spec(bb, meta["head"]).head_spec()
        kinds[run.name] = m["kind"]
        # eval.py on the artifact reproduces the selected validation value exactly
        limit = compose_config(list(cls.tiny_overrides)).trainer.get("limit_val_batches")
        ev = evaluate_artifact(run / "adapter", ["split=val", "trainer.enable_progress_bar=false",
                                                 *([f"trainer.limit_val_batches={limit}"] if limit is not None else [])])
        assert ev["kind"] == m["kind"]
        assert ev[mon["name"]] == pytest.approx(mon["value"], rel=1e-6, abs=1e-7), (run, ev, mon)
    assert kind in kinds.values(), f"no stage of the {kind} job produced a {kind} artifact: {kinds}"


def test_min_mode_selects_the_lowest_and_eval_py_reproduces_it(tmp_path):
    m = run_train(["experiment=tiny_depth", "adapter=lora", "task.max_epochs=3", "task.optimizer.lr=3e-2"], tmp_path)
    assert m["monitor"] == {"name": "val/mse", "mode": "min", "value": m["val/mse"]}
    out = Path(m["out_dir"])
    per_epoch = [float(r["val/mse"]) for r in csv.DictReader((out / "csv" / "metrics.csv").open()) if r.get("val/mse")]
    assert len(per_epoch) == 3 and min(per_epoch) != max(per_epoch)
    assert m["val/mse"] == pytest.approx(min(per_epoch), rel=1e-6)  # max mode would pick another epoch
    # the README's command, as a user types it
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"artifact={out / 'adapter'}", "split=val",
                           f"hydra.run.dir={tmp_path / 'eval'}", "trainer.enable_progress_bar=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert ev["val/mse"] == pytest.approx(m["val/mse"], rel=1e-6)


def test_dense_regression_publishes_and_from_zoo_rebuilds_its_head(tmp_path):
    from tasks.runner import build_datamodule, build_task
    from zoo import hub

    m = run_train(["experiment=tiny_depth", "adapter=lora"], tmp_path)
    registry = tmp_path / "registry.json"
    hub.publish_run(m["out_dir"], "tiny-depth-lora", registry=registry, out_dir=tmp_path / "zoo")
    hub.add_registry(registry)
    try:
        entry = hub.get_entry("tiny-depth-lora")
        assert entry.task["kind"] == "dense_regression" and entry.task["monitor"]["mode"] == "min"
        assert entry.metrics["val/mse"] == pytest.approx(m["val/mse"])
        torch.manual_seed(0)
        cfg = compose_config(["experiment=tiny_depth", "adapter=lora"])
        import lightning as L

        L.seed_everything(cfg.seed)
        task = build_task(cfg)  # the same random base weights as the run (seeded)
        zoo.remove_adapters(task.model)
        L.seed_everything(cfg.seed)
        model = hub.from_zoo("tiny-depth-lora", check_fingerprint=True)
    finally:
        hub.registry._EXTRA_REGISTRIES.remove(str(registry))
    assert isinstance(model, zoo.DenseRegressor) and zoo.adapters_of(model)[0].name == "lora"
    dm = build_datamodule(cfg, task)
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        pred = model(x)
    assert pred.shape == y.shape == (x.shape[0], 1, 32, 32)
    # predict_step returns what the task declares
    zoo.load_adapter(task.model, Path(m["out_dir"]) / "adapter")
    task.eval()
    with torch.no_grad():
        out = task.predict_step((x, y), 0)
    assert set(out) == {"maps"}
    torch.testing.assert_close(out["maps"], pred)


def test_old_metrics_json_reads_as_classification(tmp_path):
    from bench.vtab import load_runs
    from tasks.report import collect, markdown

    old = {"adapter": "lora", "backbone": "vit_tiny_patch16_224", "task": "vtab", "dataset": "dsprites_loc",
           "protocol": "tune", "trainable_params": 10, "backbone_params": 1000, "val/acc": 0.5, "test/acc": None,
           "artifact_bytes": 1024}
    new = {"schema_version": 2, "kind": "dense_regression", "monitor": {"name": "val/mse", "mode": "min", "value": 0.0123},
           "columns": [{"key": "val/mse", "header": "val MSE", "fmt": "float"}],
           "adapter": "full", "dataset": "rendered_depth", "trainable_params": 1000, "backbone_params": 1000,
           "val/mse": 0.0123, "artifact_bytes": 2048}
    for name, m in (("0_old", old), ("1_new", new)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    m = read_metrics(tmp_path / "0_old" / "metrics.json")
    assert m["kind"] == "classification" and m["monitor"] == {"name": "val/acc", "mode": "max", "value": 0.5}
    md = markdown(collect(tmp_path)).splitlines()
    assert md[0] == "| adapter | dataset | adapter params | % of backbone | val acc | test acc | val MSE | artifact KiB |"
    assert md[2] == "| lora | dsprites_loc | 10 | 1.00% | 50.0 | – | – | 1.0 |"
    assert md[3] == "| full | rendered_depth | 1,000 | 100.00% | – | – | 0.0123 | 2.0 |"
    runs, warnings = load_runs([tmp_path / "0_old" / "metrics.json", tmp_path / "1_new" / "metrics.json"])
    assert [r["acc"] for r in runs] == [0.5] and not warnings  # the regression run is not a VTAB run


def test_bad_monitor_declarations_are_refused():
    with pytest.raises(Exception, match="monitor_mode"):
        compose_and_build(["experiment=tiny_depth", "+task.monitor_mode=lowest"])
    with pytest.raises(Exception, match="validation metric"):
        compose_and_build(["experiment=tiny_depth", "+task.monitor=test/mse"])


def compose_and_build(overrides):
    from tasks.runner import build_task

    return build_task(compose_config(overrides))
