"""Result tables over run folders (tasks.report)."""
import json
import math

import pytest

from tasks.report import (caption, collect, compare, group_runs, grouped_rows, markdown, mean_std, protocol_groups,
                          published_note)


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


# ---------------------------------------------------------------------- rows over seeds and the caption

ACC = [{"key": "val/acc", "header": "val acc", "fmt": "pct"}, {"key": "test/acc", "header": "test acc", "fmt": "pct"}]
NRMSE = [{"key": "val/nrmse", "header": "val nRMSE", "fmt": "float"},
         {"key": "test/nrmse", "header": "test nRMSE", "fmt": "float"}]


def write_runs(root, rows, key="test/acc", columns=ACC, monitor=("val/acc", "max"), validated=True):
    """One metrics.json per (label, seed): ``rows`` maps a row label to its per-seed values of ``key``;
    ``validated``: the selection metric (``monitor``) has the same value (the caption ranks rows on it),
    else no run has a validation score."""
    for label, values in rows.items():
        for seed, v in enumerate(values):
            d = root / f"{label.replace(' ', '_')}_{seed}"
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps({
                "schema_version": 2, "kind": "x", "monitor": {"name": monitor[0], "mode": monitor[1], "value": None},
                "columns": columns, "adapter": "full" if label == "from scratch" else label, "label": label,
                "dataset": "d", "seed": seed, "fold": None, "trainable_params": 10, "backbone_params": 100,
                "artifact_bytes": 1024, **({monitor[0]: v} if validated else {}), key: v}))
    return collect(root)


def test_caption_method_clearly_better(tmp_path):
    rows = write_runs(tmp_path, {"linear": [0.40, 0.42, 0.41], "lora": [0.55, 0.56, 0.54], "full": [0.45, 0.46, 0.46]})
    text = caption(rows, "linear")
    head = text.splitlines()[0]
    # the best row by the metric, the means ± std, the difference in points, the verdict
    assert "Best row lora: 55.0 ± 1.0 vs baseline linear: 41.0 ± 1.0, 14.0 points better" in head
    assert "std of the paired per-seed differences 1.0 points, n=3, 95% t-test" in head
    assert "lora beats linear beyond the noise" in head
    # per-seed differences +5, +4, +5 points: t = 14 > 4.3
    assert text.splitlines()[1] == ("full vs linear: 4.7 points better (std of the paired per-seed differences 0.6 points, "
                                    "n=3, 95% t-test): better beyond the noise.")
    # a reference row (full fine-tuning): every other row against it as well
    with_ref = caption(rows, "linear", reference="full").splitlines()
    assert with_ref[:2] == text.splitlines() and with_ref[2].startswith("lora vs full: 9.3 points better (")
    assert "(the reference row 'nope' is not among the runs)" in caption(rows, "linear", reference="nope")


def test_caption_method_within_noise(tmp_path):
    # per-seed differences +3, -1, +2 points: mean +1.3, std 2.1, t = 1.1 < 4.3 (2 degrees of freedom)
    rows = write_runs(tmp_path, {"linear": [0.40, 0.45, 0.50], "lora": [0.43, 0.44, 0.52]})
    text = caption(rows, "linear")
    assert "1.3 points better" in text and "std of the paired per-seed differences 2.1 points" in text
    assert "lora does NOT beat linear beyond the noise" in text


def test_caption_method_worse_lower_is_better(tmp_path):
    """nRMSE (mode min): LoRA's higher error is worse than training from scratch, said so."""
    rows = write_runs(tmp_path, {"from scratch": [0.10, 0.11, 0.12], "lora": [0.15, 0.17, 0.16]},
                      key="test/nrmse", columns=NRMSE, monitor=("val/nrmse", "min"))
    text = caption(rows, "from scratch")
    assert text.startswith("test nRMSE (lower is better)")
    assert "0.05 worse (" in text  # lora's error is 0.05 higher
    assert "no row beats from scratch: the best, lora, is worse beyond the noise" in text


def test_caption_pairs_runs_by_seed(tmp_path):
    """Seeds that move both rows alike (easy / hard draws) are noise the pairing removes: a +2-point gain
    on every seed is beyond it although the rows' own std (20 points) is not."""
    rows = write_runs(tmp_path, {"linear": [0.30, 0.50, 0.70], "lora": [0.32, 0.521, 0.719]})
    assert "lora beats linear beyond the noise" in caption(rows, "linear")
    c = compare([r for r in rows if r["label"] == "linear"], [r for r in rows if r["label"] == "lora"], "test/acc", "max")
    assert c["paired"] and c["n"] == 3 and c["gain"] == pytest.approx(0.02)
    # the same numbers with the seeds shuffled between rows (no pairing possible): within the noise
    shuffled = [dict(r, seed=r["seed"] + 10) if r["label"] == "lora" else r for r in rows]
    assert "lora does NOT beat linear beyond the noise" in caption(shuffled, "linear")


def test_caption_one_run_each_claims_nothing_and_missing_baseline(tmp_path):
    rows = write_runs(tmp_path, {"linear": [0.40], "lora": [0.60]})
    assert "cannot be judged (one run each)" in caption(rows, "linear")
    assert caption(rows, "zero-shot").startswith("No caption: the baseline row 'zero-shot' is not among the runs (linear, lora)")


def test_grouped_table_mean_and_std(tmp_path):
    rows = write_runs(tmp_path, {"linear": [0.40, 0.42, 0.41], "lora": [0.55, 0.56, 0.54]})
    assert [r[:3] for r in grouped_rows(rows)] == [["linear", "d", "3"], ["lora", "d", "3"]]
    assert grouped_rows(rows)[1][-2] == "55.0 ± 1.0"  # test acc
    md = markdown(rows, caption(rows, "linear")).splitlines()
    assert md[0].startswith("| row | dataset | runs |") and md[3].startswith("| lora | d | 3 |")
    assert md[-1].startswith("test acc (higher is better)")
    only = markdown(rows, columns=["test/acc"]).splitlines()  # report.columns: the metrics shown
    assert only[0] == "| row | dataset | runs | adapter params | % of backbone | test acc | artifact KiB |"
    with pytest.raises(ValueError, match="no such metric \\['test/nope'\\]; valid: val/acc, test/acc"):
        markdown(rows, columns=["test/nope"])
    mu, sd, n = mean_std([1.0, None, 3.0, float("nan")])
    assert (mu, n) == (2.0, 2) and sd == pytest.approx(math.sqrt(2))


def test_caption_compares_only_runs_under_the_baselines_protocol(tmp_path):
    rows = write_runs(tmp_path, {"linear": [0.40, 0.42, 0.41], "lora": [0.55, 0.56, 0.54], "full": [0.90, 0.91, 0.92]})
    for m in rows:  # full selected on the test split: another protocol, never compared with the others
        m["protocol"] = {"name": "tune", "selection": "val_is_test" if m["label"] == "full" else "val"}
    text = caption(rows, "linear")
    assert "Best row lora" in text and "full vs" not in text
    assert text.splitlines()[-1] == "(not compared, made under another protocol than the baseline: full)"


def test_caption_best_row_is_chosen_on_validation_not_test(tmp_path):
    """Bug caught: picking the "best row" by its test mean selects a configuration on the test split."""
    rows = write_runs(tmp_path, {"linear": [0.40, 0.41, 0.42], "lora": [0.60, 0.61, 0.62], "full": [0.70, 0.71, 0.72]})
    val = {"linear": 0.3, "lora": 0.9, "full": 0.5}  # validation ranks lora first, test would rank full first
    for m in rows:
        m["val/acc"] = val[m["label"]]
    assert "Best row lora:" in caption(rows, "linear")


def test_caption_without_validation_scores_ranks_no_row_on_test(tmp_path):
    """Bug caught: with no validation score, the caption fell back to ranking rows on their test means and
    headlined that "best row" (a selection on test). Now no row is headlined; each is still compared with the
    baseline on test, and a row that has a validation score is ranked among the validated ones only."""
    runs = {"linear": [0.40, 0.41, 0.42], "lora": [0.50, 0.51, 0.52], "full": [0.70, 0.71, 0.72]}
    rows = write_runs(tmp_path / "a", runs, validated=False)
    text = caption(rows, "linear")
    lines = text.splitlines()
    assert "Best row" not in text and "beats linear" not in text
    assert "Rows not ranked: no run has a validation score (val/acc), and a best row is never chosen on test" in lines[0]
    assert "baseline linear: 41.0 ± 1.0" in lines[0]
    assert sorted(lines[1:]) == [  # every row vs the baseline on test: the comparison stays
        "full vs linear: 30.0 points better (std of the paired per-seed differences 0.0 points, n=3, 95% t-test): "
        "better beyond the noise.",
        "lora vs linear: 10.0 points better (std of the paired per-seed differences 0.0 points, n=3, 95% t-test): "
        "better beyond the noise."]
    rows = write_runs(tmp_path / "b", runs, validated=False)
    for m in rows:  # only lora validated: full's higher test mean does not make it the best row
        if m["label"] == "lora":
            m["val/acc"] = 0.3
    assert "Best row lora:" in caption(rows, "linear")


def test_caption_judges_nothing_against_a_single_unpaired_run(tmp_path):
    """Bug caught: one baseline run has no spread, so three other runs with equal values looked "beyond the noise"."""
    rows = write_runs(tmp_path, {"linear": [0.40], "lora": [0.55, 0.55, 0.55]})
    for m in rows:  # different seeds on the two sides: nothing to pair
        if m["label"] == "linear":
            m["seed"] = 99
    assert "beyond the noise" not in caption(rows, "linear").replace("does NOT beat", "")


def test_a_row_averages_only_runs_of_one_resolved_config(tmp_path):
    """Bug caught: two learning rates of one adapter under one label were averaged into one "± std" row."""
    rows = write_runs(tmp_path, {"linear": [0.40, 0.42, 0.41], "lora": [0.55, 0.56, 0.54, 0.20, 0.22, 0.21]})
    for m in rows:  # lora's runs 3-5 are another config (say lr 1e-4), each with its own seed
        m["config_id"] = "cfg-b" if m["label"] == "lora" and m["seed"] >= 3 else "cfg-a"
        if m["config_id"] == "cfg-b":
            m["seed"] -= 3
    body = grouped_rows(rows)
    assert [r[:3] for r in body] == [["linear", "d", "3"], ["lora [cfg-a]", "d", "3"], ["lora [cfg-b]", "d", "3"]]
    assert body[1][-2] == "55.0 ± 1.0" and body[2][-2] == "21.0 ± 1.0"
    # one config per label (the usual sweep): the label alone names the row
    same = [dict(m, config_id="x") for m in rows if m["label"] == "linear"]
    assert list(group_runs(same)) == ["linear"]


def test_published_note_names_each_entry_and_its_rule(tmp_path):
    rows = write_runs(tmp_path, {"linear": [0.40, 0.42], "lora": [0.55, 0.56]})
    assert published_note(rows) == ""
    for m in rows:
        m["published"] = f"demo-{m['label']}" if m["seed"] == 0 else None
    assert published_note(rows) == ("Published to the local model zoo (python -m zoo list): demo-linear (linear, seed 0), "
                                     "demo-lora (lora, seed 0); one run per row, its seed-0 run (publish_seed: fixed "
                                     "before any result, not chosen on a score).")
    for m in rows:  # every seed under one name per row: the last one wins, and the note says so
        m["published"] = f"demo-{m['label']}"
    assert "the last to finish owns it" in published_note(rows)


def test_summary_table_prints_the_caption_and_which_runs_were_published(tmp_path, capsys):
    """The end of a sweep (make demo): table, caption, then the zoo entries and the rule that chose them."""
    from omegaconf import OmegaConf

    from tasks.report import SummaryTable

    write_runs(tmp_path, {"linear": [0.40, 0.42, 0.41], "lora": [0.55, 0.56, 0.54]})
    for f in tmp_path.rglob("metrics.json"):
        m = json.loads(f.read_text())
        m["published"] = f"demo-{m['label']}" if m["seed"] == 0 else None
        f.write_text(json.dumps(m))
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, "report": {"baseline": "linear"}})
    SummaryTable().on_multirun_end(cfg)
    out = capsys.readouterr().out
    assert "lora beats linear beyond the noise" in out
    note = "Published to the local model zoo (python -m zoo list): demo-linear (linear, seed 0), demo-lora (lora, seed 0)"
    assert note in out and note in (tmp_path / "summary.md").read_text()


def test_printed_table_keeps_every_cell_on_one_line(tmp_path, capsys):
    """The demo table printed without a terminal (80 columns): no label cut to "samed_l…", no
    "mean ± std" wrapped over two lines."""
    from tasks.report import print_table

    rows = write_runs(tmp_path, {"decoder_only_baseline_row": [0.40, 0.42, 0.41], "samed_lora_rank4": [0.55, 0.56, 0.54]})
    for r in rows:
        r["dataset"] = "generated_texture_quickstart"
    print_table(rows, title="t")
    out = capsys.readouterr().out
    assert "…" not in out
    line = next(ln for ln in out.splitlines() if "samed_lora_rank4" in ln)
    assert "generated_texture_quickstart" in line and "55.0 ± 1.0" in line


def test_folds_with_their_own_training_statistics_share_one_table_and_caption(tmp_path):
    """Audio without published statistics normalises each fold by its own training split: the numbers
    differ per fold, the protocol does not, so the folds are one table and the caption compares them
    (the audio demo printed one table per fold and no verdict). Statistics of another kind still split."""
    rows = write_runs(tmp_path, {"linear": [0.575, 0.625, 0.75], "lora": [0.725, 0.825, 0.85]})
    for r in rows:
        r["protocol"] = {"name": f"fold{r['seed'] + 1}", "selection": "val", "val_overlaps_test": False,
                         "normalisation": {"mean": -4.7 - 0.01 * r["seed"], "std": 3.6, "source": "train split"}}
    assert len(protocol_groups(rows)) == 1
    assert "lora beats linear beyond the noise" in caption(rows, "linear")
    rows[0]["protocol"]["normalisation"]["source"] = "audioset"  # another rule: not comparable
    assert len(protocol_groups(rows)) == 2


def test_an_evaluate_only_baseline_is_in_the_table_of_the_trained_rows(tmp_path):
    """Bug caught: the zero-shot / no-fine-tuning row (train=false, recorded selection "none") was put in a table of
    its own, so the demo printed two tables and the caption "Only the baseline row ran: nothing to compare"."""
    rows = write_runs(tmp_path, {"zero-shot": [0.40, 0.40, 0.40], "lora": [0.55, 0.56, 0.54], "other": [0.5, 0.5, 0.5]})
    for m in rows:
        norm = "imagenet" if m["label"] == "other" else "backbone"  # another normalisation: another protocol
        m["protocol"] = {"name": "p", "selection": "none" if m["label"] == "zero-shot" else "last",
                         "val_overlaps_test": False, "normalisation": norm}
    md = markdown(rows)
    tables = md.split("**protocol**:")[1:]
    assert len(tables) == 2
    main = next(t for t in tables if '"backbone"' in t.splitlines()[0])
    assert 'selection="last"' in main.splitlines()[0]  # headed by the trained runs' selection
    assert "| zero-shot | d | 3 |" in main and "| lora | d | 3 |" in main and "| other |" not in main
    text = caption(rows, "zero-shot")
    assert "Best row lora: 55.0 ± 1.0 vs baseline zero-shot: 40.0 ± 0.0, 15.0 points better" in text
    assert text.splitlines()[-1] == "(not compared, made under another protocol than the baseline: other)"
    # alone (no trained run shares its record), an evaluate-only run keeps a table of its own
    alone = [m for m in rows if m["label"] != "lora"]
    assert len(markdown(alone).split("**protocol**:")[1:]) == 2
