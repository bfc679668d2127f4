"""Benchmarks: ``bench.adapters`` builds its table on a tiny model; ``bench.vtab`` aggregates right."""
from __future__ import annotations

import argparse
import json

import pytest

import zoo
from bench import adapters as bench_adapters
from bench import vtab

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--depth", "2", "--batch-size", "2",
        "--threads", "1", "--quiet"]


# ------------------------------------------------------------------------ bench.adapters
def test_adapters_table_has_every_adapter_and_peft(tmp_path):
    res = bench_adapters.main(TINY + ["--steps", "2", "--repeats", "1", "--warmup", "0", "--memory", "skip",
                                      "--out", str(tmp_path)])
    md = (tmp_path / "results.md").read_text()
    first_cells = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")]
    labels = [r["label"] for r in res["rows"]] + list(res["skipped"])
    for name in zoo.list_adapters():  # every registered adapter is a row (or is reported as skipped)
        assert name in labels
        assert name in first_cells or name in res["skipped"]
    for ref in (bench_adapters.FLOOR, bench_adapters.LORA_QKV, bench_adapters.PEFT_ROW):
        assert ref in first_cells
    assert (tmp_path / "results.png").stat().st_size > 0

    rows = {r["label"]: r for r in res["rows"]}
    # zoo LoRA on qkv and peft LoRA on qkv: the same parameters, from LoRA's formula r·(d + 3d) per block
    d, r, depth = 192, 8, 2
    assert rows[bench_adapters.LORA_QKV]["trainable"] == rows[bench_adapters.PEFT_ROW]["trainable"] == depth * r * (d + 3 * d)
    assert rows["lora"]["trainable"] == depth * 2 * r * (d + d)  # q and v slices
    # MiSS and SHiRA against peft's on the same whole qkv: equal counts, from the formulas (r·d_out; r·(d_in + d_out))
    assert rows["miss[qkv]"]["trainable"] == rows["peft-miss[qkv]"]["trainable"] == depth * 64 * 3 * d
    assert rows["shira[qkv]"]["trainable"] == rows["peft-shira[qkv]"]["trainable"] == depth * 32 * (d + 3 * d)
    assert res["summary"]["miss_qkv_over_peft"] > 0 and res["summary"]["shira_qkv_over_peft"] > 0
    assert rows["peft-shira[qkv]"]["merged_s"] is not None
    assert rows["linear"]["trainable"] == 0 and rows["full"]["trainable_pct"] == pytest.approx(100.0)
    assert rows[bench_adapters.FLOOR]["trainable"] == 3
    # methods with their own optimizer are also compared with full fine-tuning (issue 26)
    assert set(res["summary"]["step_over_full"]) == {"galore", "lora_pro"} and "Own optimizers against full" in md
    assert rows["galore"]["trainable"] == rows["full"]["trainable"] and rows["lora_pro"]["trainable"] == rows["lora"]["trainable"]
    # the references are ratio 1 to themselves; a mergeable method has a merged time, a non-mergeable one not
    assert rows[bench_adapters.FLOOR]["train_x_floor"] == pytest.approx(1.0)
    assert rows[bench_adapters.PEFT_ROW]["train_x_peft"] == pytest.approx(1.0)
    assert rows["lora"]["merged_s"] is not None and rows["vpt"]["merged_s"] is None
    assert rows["lora"]["artifact_bytes"] > 0


def test_adapters_peak_memory_in_fresh_process():
    # full fine-tuning holds a gradient and two AdamW moments per backbone weight (3 x 4 bytes
    # each) that linear probing does not: the fresh-process peak must show (at least half of) it
    args = argparse.Namespace(model="vit_tiny_patch16_224", img_size=32, depth=4, batch_size=2,
                              device="cpu", num_classes=10, threads=1, quiet=True)
    full = bench_adapters.peak_memory(args, bench_adapters.Row("full", "zoo", "full"))
    linear = bench_adapters.peak_memory(args, bench_adapters.Row("linear", "zoo", "linear"))
    n = sum(p.numel() for p in zoo.create_backbone("vit", model=args.model, pretrained=False, img_size=32,
                                                   depth=4).parameters())
    assert linear > 50 * 2 ** 20  # a process with torch loaded
    assert full - linear > 0.5 * 12 * n


# ------------------------------------------------------------------------ bench.vtab
def _write(root, name, **m):
    base = {"adapter": "lora", "backbone": "vit_base_patch16_224.orig_in21k", "task": "vtab", "protocol": "final",
            "trainable_params": 294912, "backbone_params": 85798656, "artifact_bytes": 1_200_000,
            "val/acc": 0.0, "test/acc": None, "seed": 0}
    d = root / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({**base, **m}))
    (d / "adapter").mkdir()


# Hand-computed example (accuracies in %):
#   Natural:     cifar 64, caltech101 76, the other five 70      -> (64 + 76 + 5*70) / 7 = 490 / 7 = 70
#   Specialized: patch_camelyon 86, eurosat 74, the other two 80  -> (86 + 74 + 80 + 80) / 4 = 320 / 4 = 80
#   Structured:  clevr_count 45, clevr_dist 55, dsprites_loc has two seeds 40 and 60 (-> 50),
#                the other five 50                                 -> (45 + 55 + 50 + 5*50) / 8 = 400 / 8 = 50
#   group mean   = (70 + 80 + 50) / 3 = 66.666...                (the papers' convention)
#   19-task mean = (490 + 320 + 400) / 19 = 1210 / 19 = 63.684...  (V-PETL Bench's convention)
HAND = {"cifar": 0.64, "caltech101": 0.76, "patch_camelyon": 0.86, "eurosat": 0.74,
        "clevr_count": 0.45, "clevr_dist": 0.55}
GROUP_DEFAULT = {"Natural": 0.70, "Specialized": 0.80, "Structured": 0.50}


def _hand_sweep(root):
    i = 0
    for task, group in vtab.TASK_GROUP.items():
        if task == "dsprites_loc":
            continue
        _write(root / "multirun", str(i), dataset=task, **{"test/acc": HAND.get(task, GROUP_DEFAULT[group])})
        i += 1
    _write(root / "multirun", str(i), dataset="dsprites_loc", seed=0, **{"test/acc": 0.40})
    _write(root / "multirun", str(i + 1), dataset="dsprites_loc", seed=1, **{"test/acc": 0.60})


def test_vtab_aggregates_hand_computed_example(tmp_path):
    _hand_sweep(tmp_path)
    # tune protocol: val/acc is the number (test/acc ignored); a non-VTAB run is ignored
    _write(tmp_path / "tune", "0", dataset="cifar", protocol="tune", **{"val/acc": 0.9, "test/acc": 0.1})
    _write(tmp_path / "other", "0", task="fewshot", dataset="cifar", **{"test/acc": 0.3})
    rows = vtab.main([str(tmp_path / "multirun"), str(tmp_path / "tune"), str(tmp_path / "other"),
                      "--out", str(tmp_path / "out"), "--reference"])
    assert len(rows) == 2
    final = next(r for r in rows if r["protocol"] == "final")
    assert final["metric"] == "test/acc" and final["missing"] == []
    assert final["groups"] == pytest.approx({"Natural": 70.0, "Specialized": 80.0, "Structured": 50.0})
    assert final["group_mean"] == pytest.approx(200 / 3)
    assert final["task_mean"] == pytest.approx(1210 / 19)
    assert final["tasks"]["dsprites_loc"] == pytest.approx(50.0) and final["seeds"]["dsprites_loc"] == 2
    assert final["trainable_params"] == 294912 and final["artifact_bytes"] == 1_200_000

    tune = next(r for r in rows if r["protocol"] == "tune")
    assert tune["metric"] == "val/acc" and tune["tasks"] == pytest.approx({"cifar": 90.0})
    assert tune["group_mean"] is None and tune["task_mean"] is None and len(tune["missing"]) == 18

    md = (tmp_path / "out" / "vtab.md").read_text()
    assert "| 66.67 | 63.68 |" in md  # both conventions side by side in the results row
    lora_ref = next(line for line in md.splitlines() if line.startswith("| LoRA |"))
    assert "74.5" in lora_ref and "66.67" in lora_ref and "72.25" in lora_ref and "63.68" in lora_ref


def test_vtab_embedded_synthetic_tasks_aggregate(tmp_path):
    # the four tasks the repo embeds as synthetic data (all Structured): per-task numbers and the
    # missing list; no group mean from a partial group
    accs = {"dsprites_loc": 0.25, "dsprites_ori": 0.5, "clevr_count": 0.75, "clevr_dist": 1.0}
    for i, (t, a) in enumerate(accs.items()):
        _write(tmp_path, str(i), dataset=t, adapter="ssf", **{"test/acc": a})
    (row,) = vtab.main([str(tmp_path)])
    assert row["tasks"] == pytest.approx({t: 100 * a for t, a in accs.items()})
    assert row["groups"]["Structured"] is None and row["group_mean"] is None
    assert set(row["missing"]) == set(vtab.ALL_TASKS) - set(accs)


def test_vtab_task_table_is_the_canonical_19():
    assert len(vtab.ALL_TASKS) == 19 and len(set(vtab.ALL_TASKS)) == 19
    assert [len(v) for v in vtab.VTAB_TASKS.values()] == [7, 4, 8]


def test_vtab_bad_inputs_are_reported(tmp_path):
    _write(tmp_path, "0", dataset="cifar100")  # an alias, not a canonical name
    _write(tmp_path, "1", dataset="dtd", **{"test/acc": None})  # unfinished
    _write(tmp_path, "2", dataset="svhn", **{"test/acc": 87.0})  # percent instead of a fraction
    runs, warnings = vtab.load_runs(vtab.find_metrics([tmp_path]))
    assert runs == [] and len(warnings) == 3
    assert "valid: cifar" in warnings[0] and "no test/acc" in warnings[1] and "not in [0, 1]" in warnings[2]
    with pytest.raises(FileNotFoundError):
        vtab.find_metrics([tmp_path / "nope"])


def test_vtab_sweep_config_sweeps_the_19_tasks_final_protocol():
    from pathlib import Path

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "experiment" / "vtab_sweep.yaml")
    assert cfg.task.protocol == "final"
    override = OverridesParser.create().parse_override("task.dataset=" + cfg.hydra.sweeper.params["task.dataset"])
    assert override.is_sweep_override()
    assert list(override.sweep_string_iterator()) == list(vtab.ALL_TASKS)
    # and it composes with the real configs (the command in its header)
    from tests.helpers import compose_config

    composed = compose_config(["experiment=vtab_sweep", "adapter=lora", "data.root=/data/vtab-1k"])
    assert composed.task.name == "vtab" and composed.task.protocol == "final"
    assert composed.data.protocol == "final" and composed.data.root == "/data/vtab-1k"


def test_vtab_aggregates_a_real_tiny_run(tmp_path):
    # train.py's own metrics.json (experiment=tiny: embedded dsprites_loc) goes through bench.vtab
    from tests.helpers import run_train

    m = run_train(["experiment=tiny", "adapter=lora", "task.protocol=final"], tmp_path)
    assert m["protocol"]["name"] == "final" and m["test/acc"] is not None
    (row,) = vtab.main([str(tmp_path)])
    assert row["adapter"] == "lora" and row["metric"] == "test/acc"
    assert row["tasks"] == pytest.approx({"dsprites_loc": 100 * m["test/acc"]})
    assert row["trainable_params"] == m["trainable_params"] and row["artifact_bytes"] == m["artifact_bytes"]


# ------------------------------------------------------------------------ bench.adapters: every backbone
ONE_STEP = ["--batch-size", "2", "--steps", "1", "--repeats", "1", "--warmup", "0", "--memory", "skip",
            "--threads", "1", "--skip-merged", "--quiet"]
OPEN_CLIP_TINY = {"embed_dim": 32, "vision_cfg": {"width": 64, "patch_size": 8, "head_width": 32}}
PROFILE_SMOKE = {
    # backbone: (tiny-model options, rows to build, a method that must refuse the backbone, a row that must train)
    "clip": (["--img-size", "32", "--depth", "1", "--kwargs", json.dumps(
        {**OPEN_CLIP_TINY, "text_cfg": {"context_length": 16, "width": 32, "heads": 2}})],
        ["CLIP-LoRA", "morph_ft"], "morph_ft", "CLIP-LoRA"),
    "sam": (["--img-size", "64", "--num-classes", "2", "--kwargs", json.dumps(
        {"embed_dim": 32, "depth": 1, "num_heads": 2, "window_size": 2, "global_attn_indexes": [0], "neck_chans": 32}),
        "--head-kwargs", json.dumps({"decoder": {"mlp_dim": 64, "num_heads": 2, "iou_head_hidden_dim": 32}})],
        ["SAMed", "vpt"], "vpt", "SAMed"),
    "morph": (["--img-size", "16", "--morph-shape", "2d", "--kwargs", json.dumps(
        {"dim": 32, "depth": 1, "heads": 4, "heads_xa": 4, "mlp_dim": 64, "max_patches": 64, "max_ar": 2})],
        ["morph_level1", "vpt"], "vpt", "morph_level1"),
    "nafnet": (["--model", "tiny", "--img-size", "16", "--kwargs", json.dumps({"width": 8})],
               ["lora conv", "lora"], "lora", "lora conv"),
    "coca": (["--img-size", "32", "--depth", "1", "--frames", "2", "--kwargs", json.dumps(
        {**OPEN_CLIP_TINY, "vision_cfg": {**OPEN_CLIP_TINY["vision_cfg"], "attn_pooler_heads": 2,
                                          "attn_pooler_queries": 8},
         "text_cfg": {"context_length": 8, "width": 32, "heads": 2},
         "multimodal_cfg": {"context_length": 8, "width": 32, "heads": 2, "attn_pooler_heads": 2}})],
        ["q_adapter", "morph_ft"], "morph_ft", "q_adapter"),
}


@pytest.mark.parametrize("backbone", list(PROFILE_SMOKE))
def test_adapters_table_per_backbone(backbone, tmp_path):
    opts, rows, refused, trained = PROFILE_SMOKE[backbone]
    res = bench_adapters.main(["--backbone", backbone, *opts, *ONE_STEP, "--out", str(tmp_path), "--adapters", *rows])
    by = {r["label"]: r for r in res["rows"]}
    assert by[bench_adapters.FLOOR]["train_x_floor"] == pytest.approx(1.0)
    assert by[trained]["trainable"] > 0 and 0 < by[trained]["train_x_floor"] < float("inf")
    assert by[trained]["step_flops"] > 0
    assert refused in res["skipped"] and refused not in by  # a refusing method is listed, with its reason
    md = (tmp_path / "results.md").read_text()
    assert f"- `{refused}`: " in md and f"| {trained} |" in md
    if backbone == "clip":  # the text floor and the issue-10 checks
        assert by["CLIP-LoRA"]["ref"] == "frozen floor [text]"
        assert by["frozen floor [text]"]["train_x_floor"] == pytest.approx(1.0)
        assert any(c.startswith("(a) CLIP-LoRA step") for c in res["summary"]["checks"])


def test_clip_flop_ratio_is_counted_at_each_class_count(tmp_path):
    from bench.adapters import clip_flops_at_class_counts

    opts = PROFILE_SMOKE["clip"][0]
    args = bench_adapters.main(["--backbone", "clip", *opts, *ONE_STEP, "--out", str(tmp_path), "--adapters",
                                "CLIP-LoRA", "--class-counts", "2", "10"])["summary"]["checks"]
    line = [c for c in args if "counted at each class count" in c]
    assert len(line) == 1 and "2 classes" in line[0] and "10 classes (as EuroSAT)" in line[0]
    r = clip_flops_at_class_counts(bench_adapters.parse_args(["--backbone", "clip", *opts, *ONE_STEP]), [2, 10])
    # CLIP-LoRA adds the text tower's backward, which grows with the prompts while the images stay fixed
    assert r[10] > r[2] > 0


def test_recipe_rows_come_from_the_adapter_configs():
    from bench.profiles import PROFILES

    sam = {r.label: r for r in PROFILES["sam"].recipe_rows(None)}
    assert sam["SAMed"].adapter == "lora" and sam["SAMed"].config["rank"] == 4 and sam["SAMed"].config["targets"] == ["q", "v"]
    clip = {r.label: r for r in PROFILES["clip"].recipe_rows(None)}
    c = clip["CLIP-LoRA"].config
    assert (c["rank"], c["alpha"], c["targets"], c["tower"], c["scaling"]) == (2, 1.0, ["q", "k", "v"], "both", "rslora")
    assert clip["CLIP-LoRA"].opts == {"head": "text"} and clip["CLIP-LoRA"].ref == "frozen floor [text]"
    naf = {r.label: r for r in PROFILES["nafnet"].recipe_rows(None)}
    assert naf["colora conv"].config["targets"] == ["conv_pw", "conv_sca", "o", "fc1", "fc2"]  # defaults merged
    assert "budget" in naf["colora conv"].config


# ------------------------------------------------------------------------ bench.vtab: only like with like
def _full_sweep(root, adapter="lora", backbone="vit_base_patch16_224.orig_in21k", acc=0.5, **extra):
    for i, task in enumerate(vtab.ALL_TASKS):
        _write(root, f"{i}", adapter=adapter, backbone=backbone, dataset=task, **{"test/acc": acc}, **extra)


def test_vtab_never_averages_runs_of_different_configurations(tmp_path):
    # rank 4 scores 40 % and rank 8 scores 60 % on cifar: averaging them "as seeds" would give 50
    _write(tmp_path, "r4", dataset="cifar", adapter_config={"name": "lora", "rank": 4}, **{"test/acc": 0.4})
    _write(tmp_path, "r8", dataset="cifar", adapter_config={"name": "lora", "rank": 8}, **{"test/acc": 0.6})
    _write(tmp_path, "r8s1", dataset="cifar", seed=1, adapter_config={"name": "lora", "rank": 8}, **{"test/acc": 0.8})
    rows = vtab.aggregate(vtab.load_runs(vtab.find_metrics([tmp_path]))[0])
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {"rank=4", "rank=8"}
    assert by_variant["rank=4"]["tasks"] == pytest.approx({"cifar": 40.0})
    assert by_variant["rank=8"]["tasks"] == pytest.approx({"cifar": 70.0}) and by_variant["rank=8"]["seeds"]["cifar"] == 2


def test_vtab_ours_cell_takes_only_the_papers_backbone(tmp_path):
    # AugReg weights sort before the original ones: they must not fill the LoRA row's "ours" cell
    _full_sweep(tmp_path / "augreg", backbone="vit_base_patch16_224.augreg_in21k", acc=0.9)
    md = vtab.reference_table(vtab.aggregate(vtab.load_runs(vtab.find_metrics([tmp_path]))[0]))
    lora = next(line for line in md.splitlines() if line.startswith("| LoRA |"))
    assert "90.00" not in lora
    _full_sweep(tmp_path / "orig", acc=0.6)
    md = vtab.reference_table(vtab.aggregate(vtab.load_runs(vtab.find_metrics([tmp_path]))[0]))
    lora = next(line for line in md.splitlines() if line.startswith("| LoRA |"))
    assert "60.00" in lora and "90.00" not in lora


def test_vtab_refuses_to_average_seeds_made_on_different_splits(tmp_path):
    rec = lambda n: {"name": "final", "splits": {"train": {"name": "train800val200", "size": 1000},  # noqa: E731
                                                 "val": None, "test": {"name": "test", "size": n}}}
    _write(tmp_path, "a", dataset="cifar", protocol=rec(10000), **{"test/acc": 0.4})
    _write(tmp_path, "b", dataset="cifar", seed=1, protocol=rec(500), **{"test/acc": 0.6})
    with pytest.raises(ValueError, match="cifar were made on different splits"):
        vtab.aggregate(vtab.load_runs(vtab.find_metrics([tmp_path]))[0])


def test_vtab_sweep_uses_the_papers_backbone_and_its_normalisation():
    from tests.helpers import compose_config

    cfg = compose_config(["experiment=vtab_sweep", "adapter=lora"])
    assert cfg.backbone.model == vtab.PAPER_BACKBONE and cfg.data.normalize == "backbone"


# ------------------------------------------------------------------------ bench.adapters --serving
def test_serving_table_compares_multi_separate_and_merged(tmp_path):
    res = bench_adapters.main(TINY + ["--serving", "--serving-k", "1", "3", "--serving-methods", "lora", "hydra",
                                      "--batch-size", "6", "--steps", "1", "--repeats", "1", "--warmup", "0",
                                      "--out", str(tmp_path)])
    md = (tmp_path / "results.md").read_text()
    assert "Command: `python -m bench.adapters" in md and "--serving" in md
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == res["rows"]
    rows = {(r["k"], r["row"]): r for r in res["rows"]}
    assert set(rows) == {(k, s) for k in (1, 3) for s in ("multi", "separate", "merged")}
    assert rows[(3, "multi")]["batched"] == 3  # LoRA and Hydra both run in the shared pass
    # the base weights are held once by the MultiAdapter, three times by three separate models
    base = rows[(3, "merged")]["bytes"]
    assert rows[(3, "separate")]["bytes"] > 2.9 * base and rows[(3, "multi")]["bytes"] < 1.5 * base
    assert rows[(1, "merged")]["x_merged"] == pytest.approx(1.0)
    errs = [float(c.split("= ", 1)[1].split()[0]) for c in res["checks"]]
    effects = [float(c.rsplit("up to ", 1)[1].rstrip(")")) for c in res["checks"]]
    assert len(errs) == 2 and max(errs) < 1e-4 < min(effects)
