"""``make demos``'s combined table (``python -m tasks.demos DIR``) over runs of different task kinds."""
from __future__ import annotations

import json
from pathlib import Path

from tasks.demos import main, rows_of


def _run(root: Path, demo: str, name: str, **m) -> None:
    d = root / demo / "multiruns" / "t" / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"schema_version": 2, **m}))


def test_one_table_over_kinds_with_each_selection_and_test_metric(tmp_path, capsys):
    _run(tmp_path, "demo", "0_lora", kind="classification", adapter="lora", dataset="dsprites_ori",
         monitor={"name": "val/acc", "mode": "max", "value": 0.5}, trainable_params=4096, backbone_params=819200,
         columns=[{"key": "val/acc", "header": "val acc", "fmt": "pct"}, {"key": "test/acc", "header": "test acc", "fmt": "pct"}],
         **{"val/acc": 0.5, "test/acc": 0.4561}, wall_time_s=61.0)
    _run(tmp_path, "pde-demo", "run", kind="pde", adapter="morph_level2", dataset="fisher_kpp",
         monitor={"name": "val/nrmse", "mode": "min", "value": 0.031}, trainable_params=100, backbone_params=10000,
         columns=[{"key": "val/nrmse", "header": "val nRMSE", "fmt": "float"},
                  {"key": "test/vrmse", "header": "test VRMSE", "fmt": "float"},
                  {"key": "test/nrmse", "header": "test nRMSE", "fmt": "float"}],
         **{"val/nrmse": 0.031, "test/vrmse": None, "test/nrmse": 0.04}, wall_time_s=5.0)
    rows = rows_of(tmp_path)
    assert [r["cells"] for r in rows] == [
        ["demo", "classification", "lora", "dsprites_ori", "4,096", "0.50%", "val acc 50.0% ↑", "test acc 45.6%", "1m01s"],
        ["pde-demo", "pde", "morph_level2", "fisher_kpp", "100", "1.00%", "val nRMSE 0.031 ↓", "test nRMSE 0.04", "5s"],
    ]
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Adapter Zoo demos" in out and "morph_level2" in out
    md = (tmp_path / "summary.md").read_text()
    assert "2 runs, 1m06s of training wall time" in md
    assert json.loads((tmp_path / "summary.json").read_text())[1]["monitor"]["name"] == "val/nrmse"


def test_no_runs_is_an_error_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1 and "no finished run" in capsys.readouterr().err
