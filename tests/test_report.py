"""Result tables over run folders (tasks.report)."""
import json

from tasks.report import collect, markdown


def test_collect_and_markdown(tmp_path):
    runs = [("0_linear", "linear", 0, 0.25), ("1_lora", "lora", 1000, 0.5)]
    for folder, adapter, params, acc in runs:
        d = tmp_path / folder
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({
            "adapter": adapter, "dataset": "dsprites_loc", "trainable_params": params, "backbone_params": 100_000,
            "val/acc": acc, "test/acc": None, "artifact_bytes": 2048}))
    rows = collect(tmp_path)
    assert [r["adapter"] for r in rows] == ["linear", "lora"]
    md = markdown(rows).splitlines()
    assert md[2] == "| linear | dsprites_loc | 0 | 0.00% | 25.0 | – | 2.0 |"
    assert md[3] == "| lora | dsprites_loc | 1,000 | 1.00% | 50.0 | – | 2.0 |"
