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


def test_runs_under_different_protocols_are_never_in_one_table(tmp_path):
    # two restoration runs on the same data: one tested the last epoch, one selected on the test pairs
    for folder, selection, psnr in [("a", "last", 30.0), ("b", "val_is_test", 31.0), ("c", "last", 29.0)]:
        d = tmp_path / folder
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({
            "schema_version": 2, "kind": "restoration", "adapter": folder, "dataset": "derain",
            "columns": [{"key": "test/psnr", "header": "test PSNR", "fmt": "float"}], "test/psnr": psnr,
            "trainable_params": 1, "backbone_params": 10, "artifact_bytes": 0,
            "protocol": {"name": "final", "selection": selection, "val_overlaps_test": True,
                         "splits": {"test": {"name": "derain/test", "size": 100 if folder != "c" else 50}}}}))
    md = markdown(collect(tmp_path))
    tables = md.split("**protocol**:")[1:]
    assert len(tables) == 2  # a and c share a protocol (their split sizes are per-dataset facts), b does not
    last = next(t for t in tables if '"last"' in t.splitlines()[0])
    other = next(t for t in tables if '"val_is_test"' in t.splitlines()[0])
    assert "| a |" in last and "| c |" in last and "| b |" not in last
    assert "| b |" in other and "| a |" not in other
