"""``make demos``'s combined table (``python -m tasks.demos DIR``) over runs of different task kinds: each demo's
runs grouped as its own table groups them (seeds averaged per row and config, mean ± std), its caption under them."""
from __future__ import annotations

import json
from pathlib import Path

from tasks.demos import demos_of, main, rows_of, text_table

ACC = [{"key": "val/acc", "header": "val acc", "fmt": "pct"}, {"key": "test/acc", "header": "test acc", "fmt": "pct"}]
NRMSE = [{"key": "val/nrmse", "header": "val nRMSE", "fmt": "float"},
         {"key": "test/vrmse", "header": "test VRMSE", "fmt": "float"},
         {"key": "test/nrmse", "header": "test nRMSE", "fmt": "float"}]


def _run(root: Path, demo: str, name: str, **m) -> None:
    d = root / demo / "multiruns" / "t" / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"schema_version": 2, **m}))


def _classification(root: Path, label: str, seed: int, val: float, test: float, params: int, config_id: str = "c",
                    demo: str = "demo", baseline: str | None = "linear") -> None:
    _run(root, demo, f"{label}_{seed}_{config_id}", kind="classification", adapter=label, label=label,
         dataset="dsprites_ori", seed=seed, fold=None, config_id=config_id,
         monitor={"name": "val/acc", "mode": "max", "value": val}, trainable_params=params, backbone_params=819200,
         columns=ACC, **{"val/acc": val, "test/acc": test}, wall_time_s=20.0,
         report={"baseline": baseline, "metric": None, "reference": None})


def _tree(root: Path) -> None:
    for seed, (lin, lora) in enumerate([(0.10, 0.50), (0.12, 0.53), (0.11, 0.56)]):
        _classification(root, "linear", seed, lin, lin - 0.01, 0)
        _classification(root, "lora", seed, lora, lora - 0.01, 4096)
    for seed, (scratch, level2) in enumerate([(0.10, 0.05), (0.12, 0.06), (0.11, 0.04)]):
        for label, v in (("from scratch", scratch), ("morph_level2", level2)):
            _run(root, "pde-demo", f"{label}_{seed}", kind="pde", adapter=label, label=label, dataset="fisher_kpp",
                 seed=seed, fold=None, config_id="p", monitor={"name": "val/nrmse", "mode": "min", "value": v},
                 trainable_params=100, backbone_params=10000, columns=NRMSE,
                 **{"val/nrmse": v, "test/vrmse": None, "test/nrmse": v + 0.01}, wall_time_s=5.0,
                 report={"baseline": "from scratch", "metric": None, "reference": None})


def test_each_demo_groups_its_seeds_per_row_and_prints_its_caption_under_them(tmp_path, capsys):
    _tree(tmp_path)
    # a row of the same label in another demo is never averaged with this one's
    _classification(tmp_path, "lora", 0, 0.9, 0.9, 4096, demo="audio-demo", baseline=None)
    assert [r["cells"] for r in rows_of(tmp_path)] == [
        ["audio-demo", "classification", "lora", "dsprites_ori", "1", "4,096", "0.50%", "val acc 90.0% ↑",
         "test acc 90.0%", "20s"],
        ["demo", "classification", "linear", "dsprites_ori", "3", "0", "0.00%", "val acc 11.0 ± 1.0% ↑",
         "test acc 10.0 ± 1.0%", "1m00s"],
        ["demo", "classification", "lora", "dsprites_ori", "3", "4,096", "0.50%", "val acc 53.0 ± 3.0% ↑",
         "test acc 52.0 ± 3.0%", "1m00s"],
        ["pde-demo", "pde", "from scratch", "fisher_kpp", "3", "100", "1.00%", "val nRMSE 0.11 ± 0.01 ↓",
         "test nRMSE 0.12 ± 0.01", "15s"],
        ["pde-demo", "pde", "morph_level2", "fisher_kpp", "3", "100", "1.00%", "val nRMSE 0.05 ± 0.01 ↓",
         "test nRMSE 0.06 ± 0.01", "15s"],
    ]
    demos = {d["demo"]: d for d in demos_of(tmp_path)}
    # each demo's caption is tasks.report's, with the baseline its runs recorded
    assert demos["demo"]["caption"].startswith(
        "test acc (higher is better), mean ± std over up to 3 seeds/folds per row. Best row lora: 52.0 ± 3.0 vs "
        "baseline linear: 10.0 ± 1.0, 42.0 points better (std of the paired per-seed differences 2.6 points, n=3, "
        "95% t-test): lora beats linear beyond the noise.")
    assert "Best row morph_level2" in demos["pde-demo"]["caption"]
    assert "morph_level2 beats from scratch beyond the noise" in demos["pde-demo"]["caption"]
    assert demos["audio-demo"]["caption"].startswith("No caption: these runs record no report.baseline")
    # the printed table: a demo's rows, then its caption, then the next demo's rows
    lines = text_table(list(demos.values())).splitlines()
    at = [next(i for i, ln in enumerate(lines) if ln.startswith(start) and key in ln) for start, key in
          [("demo ", "| lora "), ("  test acc", "Best row lora"), ("pde-demo ", "| from scratch "),
           ("pde-demo ", "| morph_level2 "), ("  test nRMSE", "Best row morph_level2")]]
    assert at == sorted(at) and at[1] == at[0] + 1 and at[4] == at[3] + 1
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Adapter Zoo demos" in out and "lora beats linear beyond the noise" in out
    md = (tmp_path / "summary.md").read_text()
    assert "| demo | classification | lora | dsprites_ori | 3 | 4,096 | 0.50% | val acc 53.0 ± 3.0% ↑ |" in md
    assert "13 runs, 2m50s of training wall time in all" in md
    assert "**pde-demo**: test nRMSE (lower is better)" in md
    saved = {d["demo"]: d for d in json.loads((tmp_path / "summary.json").read_text())}
    assert saved["pde-demo"]["rows"][1]["monitor"]["name"] == "val/nrmse" and len(saved["demo"]["rows"][0]["runs"]) == 3


def test_runs_of_one_label_under_two_configs_are_two_rows(tmp_path):
    """Bug caught: two learning rates of LoRA under one label were averaged into one row with a huge std."""
    for seed in range(2):
        _classification(tmp_path, "lora", seed, 0.5, 0.5, 4096, config_id="lr1e-2")
        _classification(tmp_path, "lora", seed, 0.2, 0.2, 4096, config_id="lr1e-4")
    rows = rows_of(tmp_path)
    assert [(r["label"], r["cells"][4], r["cells"][7]) for r in rows] == [
        ("lora [lr1e-2]", "2", "val acc 50.0 ± 0.0% ↑"), ("lora [lr1e-4]", "2", "val acc 20.0 ± 0.0% ↑")]


def test_no_runs_is_an_error_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1 and "no finished run" in capsys.readouterr().err
