"""Published protocols (issue #23): never select on the test set, say what selected the checkpoint, and
follow each recipe's reference (NAFNet, CoOp, SAMed, AST, PETL-AST). Expected values are computed here
from the references' own rules (their fold tables, their epoch choice, their statistics), not by the code
under test."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasks.protocol import SELECTIONS, describe_splits, resolve_selection, trains
from tests.helpers import ROOT, compose_config, run_train


# ------------------------------------------------------------------ the rule
def _splits(val, test, overlap):
    return {"train": {"name": "train", "size": 8}, "val": val and {"name": val, "size": 2},
            "test": test and {"name": test, "size": 2}, "val_overlaps_test": overlap}


def test_selection_on_a_validation_split_that_is_test_is_refused_naming_both_splits():
    with pytest.raises(ValueError) as e:
        resolve_selection("val", _splits("fold1", "fold1", True))
    msg = str(e.value)
    assert "\n" not in msg and "(fold1) is the test split (fold1)" in msg and "task.selection=last" in msg
    with pytest.raises(ValueError, match=r"\(val \(4-shot\)\) overlaps the test split \(test\)"):
        resolve_selection(None, _splits("val (4-shot)", "test", True))  # the default is val
    assert resolve_selection("last", _splits("test", "test", True)) == "last"
    assert resolve_selection("val_is_test", _splits("test", "test", True)) == "val_is_test"
    assert resolve_selection("val", _splits("val", "test", False)) == "val"
    assert resolve_selection("val", _splits(None, "test", False)) == "last"  # nothing to select on
    with pytest.raises(ValueError, match="valid: val, last, val_is_test"):
        resolve_selection("best", _splits("val", "test", False))


def test_val_is_test_on_a_separate_validation_split_selects_on_val_and_says_so_in_one_line(caplog):
    # nothing of test validates: the request is harmless, but what happens (val) differs from what was asked
    with caplog.at_level("WARNING", logger="tasks.protocol"):
        assert resolve_selection("val_is_test", _splits("valid", "test", False)) == "val"
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "validation split (valid) is separate from the test split (test)" in lines[0]
    assert "selection=val" in lines[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="tasks.protocol"):  # VTAB's tune protocol: val200, no test split
        assert resolve_selection("val_is_test", _splits("val200", None, False)) == "val"
    assert "validation split (val200) is separate from the test split (none here)" in caplog.records[-1].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="tasks.protocol"):  # asked for where it applies: no warning
        assert resolve_selection("val_is_test", _splits("test", "test", True)) == "val_is_test"
        assert resolve_selection("val", _splits("valid", "test", False)) == "val"
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_run_asking_val_is_test_on_separate_splits_records_val(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="tasks.protocol"):
        m = run_train(["experiment=tiny_pde", "adapter=lora", "task.max_epochs=1", "task.selection=val_is_test"], tmp_path)
    assert m["selection"] == "val" and m["protocol"]["selection"] == "val" and m["validated_on"] == "val"
    assert any("validation split (val) is separate from the test split (test)" in r.getMessage() for r in caplog.records)


def test_a_run_that_trains_nothing_selects_nothing():
    # evaluate-only: the given weights are tested as they are, whatever the splits (validation is only reported)
    assert resolve_selection("val", _splits("val", "test", False), trains=False) == "none"
    assert resolve_selection("val", _splits("test", "test", True), trains=False) == "none"
    assert trains(compose_config(["experiment=tiny"]))
    for override in ("train=false", "task.max_epochs=0", "+trainer.max_steps=0", "trainer.limit_train_batches=0"):
        assert not trains(compose_config(["experiment=tiny", override])), override


@pytest.mark.parametrize("overrides", [["experiment=tiny", "adapter=lora", "task.protocol=tune"],
                                       # released NAFNet weights: its validation split is the test split
                                       ["experiment=tiny_restore", "adapter=full", "task.selection=val"]])
def test_evaluate_only_run_records_selection_none(tmp_path, overrides):
    # a released checkpoint evaluated as-is says so: "none", not "val" (nothing was selected on validation), and
    # validation on the test split is not refused (nothing selects on it).
    # (task.max_epochs=0 is refused for a task with anything to train: tasks.runner.check_training_steps)
    m = run_train([*overrides, "train=false"], tmp_path)
    assert m["selection"] == "none" and m["protocol"]["selection"] == "none"
    assert m["validated_on"] == m["protocol"]["splits"]["val"]["name"]
    # the given weights' validation score is reported (measured, not left empty)
    key = m["monitor"]["name"]
    assert m[key] is not None and m["monitor"]["value"] == m[key]


def test_a_datamodule_whose_val_set_is_its_test_set_overlaps_without_declaring_it():
    shared = [1, 2, 3]
    dm = SimpleNamespace(train_set=[0] * 5, val_set=shared, test_set=shared)
    info = describe_splits(dm)
    assert info["val_overlaps_test"] and info["val"]["size"] == 3
    assert not describe_splits(SimpleNamespace(train_set=[0], val_set=[1], test_set=[1]))["val_overlaps_test"]


# ------------------------------------------------------------------ restoration: NAFNet tests the last iteration
def _csv_epochs(run: Path, key: str) -> list[float]:
    with (run / "csv" / "metrics.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get(key)]
    return [float(r[key]) for r in sorted(rows, key=lambda r: int(float(r["epoch"])))]


def test_restoration_tests_the_last_epoch_not_the_best_on_test(tmp_path):
    # the command: with lr 0.2 full fine-tuning degrades after epoch 0; the run must report the
    # last epoch's test PSNR (validation = the test pairs, so the last logged val/psnr is that value)
    m = run_train(["experiment=tiny_restore", "adapter=full", "task.max_epochs=4", "task.optimizer.lr=0.2",
                   "task.log_images=0"], tmp_path)
    curve = _csv_epochs(Path(m["out_dir"]), "val/psnr")
    assert len(curve) == 4
    assert max(curve) > curve[-1] + 1e-3, f"precondition: the best epoch is not the last one ({curve})"
    assert m["test/psnr"] == pytest.approx(curve[-1], abs=1e-4)  # today's main: epoch 0's (the best) value
    assert m["selection"] == "last" and m["validated_on"] == "derain/test"
    assert m["protocol"]["splits"]["test"] == {"name": "derain/test", "size": 4}
    assert m["protocol"]["val_overlaps_test"] is True


def test_restoration_selecting_on_its_test_pairs_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"validation split \(derain/test\) is the test split \(derain/test\)"):
        run_train(["experiment=tiny_restore", "adapter=lora_conv", "task.selection=val"], tmp_path)


# ------------------------------------------------------------------ few-shot CLIP: ImageNet's val is its test set
def _fake_imagenet(root: Path, wnids=("n01", "n02"), per=(6, 3)) -> set[str]:
    from PIL import Image

    d = root / "imagenet"
    for split, n in zip(("train", "val"), per):
        for w in wnids:
            (d / "images" / split / w).mkdir(parents=True)
            for i in range(n):
                colour = (len(split), int(w[1:]) * 40, i * 20)  # distinct files: identical ones in two splits are refused
                Image.new("RGB", (8, 8), colour).save(d / "images" / split / w / f"{w}_{i}.JPEG")
    (d / "classnames.txt").write_text("".join(f"{w} class {w}\n" for w in wnids))
    return {f"val/{w}/{w}_{i}.JPEG" for w in wnids for i in range(per[1])}


def test_fewshot_imagenet_validation_shots_come_from_its_test_set_and_val_selection_is_refused(tmp_path):
    from tasks.fewshot import FewShotDataModule

    imagenet_val = _fake_imagenet(tmp_path)  # ImageNet's val folder: CoOp's test split
    dm = FewShotDataModule(str(tmp_path), "imagenet", shots=2, num_workers=0, img_size=8, generate=False)
    dm.setup("fit")
    info = describe_splits(dm)
    val_paths = {p for p, _, _ in dm.splits.val}
    assert val_paths and val_paths <= imagenet_val  # drawn from the test images
    assert info["val_overlaps_test"] and info["test"]["size"] == len(imagenet_val)
    with pytest.raises(ValueError, match=r"overlaps the test split \(test\)"):
        resolve_selection("val", info)
    assert compose_config(["task=fewshot"]).task.selection == "last"  # CoOp evaluates the last epoch


# ------------------------------------------------------------------ audio layouts
def _wavs(folder: Path, names):
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    for n in names:  # each file its own content: the loaders refuse byte-identical files in two splits
        seed = int.from_bytes(str(folder / n).encode()[-8:], "little") % 2 ** 32
        sf.write(folder / n, np.random.default_rng(seed).uniform(-0.1, 0.1, 1600).astype("float32"), 16000)


def _audio_dm(**kw):
    from tasks.data.audio import AudioDataModule

    return AudioDataModule(num_mel_bins=16, max_length=10, mean=0.0, std=1.0, generate=False, **kw)


def test_audio_folder_without_a_val_split_validates_on_test_and_is_refused(tmp_path):
    for split in ("train", "test"):
        for c in ("a", "b"):
            _wavs(tmp_path / split / c, [f"{split}{i}.wav" for i in range(2)])
    info = describe_splits(_audio_dm(dataset="folder", root=str(tmp_path)))
    assert info["val_overlaps_test"] and info["val"]["name"] == "test"
    with pytest.raises(ValueError, match=r"\(test\) is the test split \(test\)"):
        resolve_selection("val", info)


def test_audio_multilabel_without_val_rows_validates_on_test_and_is_refused(tmp_path):
    _wavs(tmp_path, [f"c{i}.wav" for i in range(6)])
    rows = [f"c{i}.wav,{'dog' if i % 2 else 'cat;dog'},{'train' if i < 4 else 'test'}" for i in range(6)]
    (tmp_path / "labels.csv").write_text("file,labels,split\n" + "\n".join(rows) + "\n")
    info = describe_splits(_audio_dm(dataset="multilabel", root=str(tmp_path), multilabel=True))
    assert info["val_overlaps_test"] and info["test"]["size"] == 2
    with pytest.raises(ValueError, match="select on the test set"):
        resolve_selection("val", info)


def _esc50(root: Path, per_fold: int = 2) -> None:
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for fold in range(1, 6):
        for i in range(per_fold):
            name = f"{fold}-{i}-A-{i % 2}.wav"
            rows.append(f"{name},{fold},{i % 2},c{i % 2},False,{i},A")
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    _wavs(root / "audio", [r.split(",")[0] for r in rows[1:]])


# PETL-AST main.py's ESC-50 table (test fold -> validation fold): folds_test [[5],[1],[2],[3],[4]],
# folds_valid [[4],[5],[1],[2],[3]]
PETL_AST_VALID = {5: 4, 1: 5, 2: 1, 3: 2, 4: 3}


@pytest.mark.parametrize("fold", [1, 2, 3, 4, 5])
def test_esc50_petl_ast_validates_on_fold_k_minus_1(tmp_path, fold):
    _esc50(tmp_path)
    dm = _audio_dm(dataset="esc50", root=str(tmp_path), fold=fold, val_fold="previous")
    assert {int(Path(p).name[0]) for p, _ in dm.splits["val"]} == {PETL_AST_VALID[fold]}
    assert {int(Path(p).name[0]) for p, _ in dm.splits["train"]} == set(range(1, 6)) - {fold, PETL_AST_VALID[fold]}
    info = describe_splits(dm)
    assert info["val"]["name"] == f"fold{PETL_AST_VALID[fold]}" and not info["val_overlaps_test"]


def test_esc50_val_fold_none_validates_on_the_test_fold_and_is_refused(tmp_path):
    _esc50(tmp_path)
    info = describe_splits(_audio_dm(dataset="esc50", root=str(tmp_path), fold=3, val_fold="none"))
    assert info["val_overlaps_test"]
    with pytest.raises(ValueError, match=r"\(fold3\) is the test split \(fold3\)"):
        resolve_selection("val", info)


def test_petl_ast_recipes_normalise_with_the_extractors_audioset_statistics():
    from transformers import ASTFeatureExtractor

    ext = ASTFeatureExtractor()  # what PETL-AST's AutoFeatureExtractor(MIT/ast-finetuned-audioset-10-10-0.4593) uses
    for recipe in ("petl_ast/esc50", "petl_ast/speechcommands"):
        cfg = compose_config([f"experiment={recipe}"])
        assert (cfg.data.mean, cfg.data.std) == pytest.approx((ext.mean, ext.std)), recipe


# ------------------------------------------------------------------ summarize_folds: AST's one epoch on the average
def _fold_run(root: Path, fold: int, curve: list[float], on_test: bool, dataset: str = "esc50", test=None) -> None:
    run = root / f"f{fold}"
    (run / "csv").mkdir(parents=True)
    with (run / "csv" / "metrics.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "step", "val/acc"])
        for e, v in enumerate(curve):
            w.writerow([e, 10 * (e + 1), v])
    (run / "metrics.json").write_text(json.dumps({
        "schema_version": 2, "kind": "audio", "adapter": "lora", "dataset": dataset, "fold": fold,
        "monitor": {"name": "val/acc", "mode": "max", "value": curve[-1]}, "val/acc": curve[-1],
        "test/acc": test if test is not None else curve[-1], "selection": "last" if on_test else "val",
        "protocol": {"name": f"fold{fold}", "val_overlaps_test": on_test}}))


def test_summarize_folds_chooses_one_epoch_on_the_five_fold_average_as_ast(tmp_path):
    import numpy as np

    curves = np.array([[0.50, 0.70, 0.60], [0.80, 0.60, 0.70], [0.60, 0.65, 0.80],
                       [0.55, 0.75, 0.60], [0.70, 0.72, 0.65]])
    for k, c in enumerate(curves, start=1):
        _fold_run(tmp_path, k, list(c), on_test=True)
    from tasks.metrics.audio import summarize_folds

    row = summarize_folds(tmp_path)["lora"]
    best = int(np.argmax(curves.mean(axis=0)))  # get_esc_result.py: argmax of the fold-averaged curve
    assert row["epoch"] == best == 1
    assert row["folds"] == {str(k): pytest.approx(curves[k - 1, best]) for k in range(1, 6)}
    assert row["mean"] == pytest.approx(curves[:, best].mean())
    assert row["mean"] < curves.max(axis=1).mean()  # per-fold picking (the over-optimistic way) differs


def test_summarize_folds_refuses_fewer_than_five_esc50_folds(tmp_path):
    from tasks.metrics.audio import summarize_folds

    for k in (1, 2, 3):
        _fold_run(tmp_path, k, [0.5, 0.6], on_test=False, test=0.5)
    with pytest.raises(ValueError, match=r"ESC-50 is reported over its 5 folds; lora has only fold\(s\) \['1', '2', '3'\]"):
        summarize_folds(tmp_path)
    _fold_run(tmp_path, 4, [0.5], on_test=False, test=0.7)
    _fold_run(tmp_path, 5, [0.5], on_test=False, test=0.8)
    assert summarize_folds(tmp_path)["lora"]["mean"] == pytest.approx((0.5 * 3 + 0.7 + 0.8) / 5)


# ------------------------------------------------------------------ SAMed: all 18 cases, epoch 159 tested
def test_samed_recipe_trains_on_every_case_and_tests_the_last_epoch():
    cfg = compose_config(["experiment=samed_synapse"])
    # SAMed train.py: --max_epochs 200 (the poly horizon) --stop_epoch 160; the 18 train.txt cases, no validation
    assert cfg.data.val_cases == 0 and cfg.task.selection == "last"
    assert cfg.task.max_epochs == 160 and cfg.task.scheduler.schedule_epochs == 200


def test_samed_poly_runs_over_max_epochs_while_training_stops_earlier():
    from tasks.segmentation import SegmentationTask

    task = SegmentationTask.__new__(SegmentationTask)
    import lightning as L

    L.LightningModule.__init__(task)
    from tests.seg_helpers import tiny_sam_backbone

    task.model = tiny_sam_backbone()  # no adapter: the optimizer hook builds plain AdamW
    task.optim_cfg = {"lr": 1.0, "weight_decay": 0.0, "betas": (0.9, 0.999)}
    task.sched_cfg = {"name": "poly", "warmup_iters": 0, "power": 0.9, "schedule_epochs": 200}
    task.param_groups = lambda lr, wd: [{"params": [__import__("torch").nn.Parameter(__import__("torch").zeros(1))]}]
    task._trainer = SimpleNamespace(estimated_stepping_batches=160 * 5, max_epochs=160)
    sched = task.configure_optimizers()["lr_scheduler"]["scheduler"]
    # trainer.py: lr_ = base_lr * (1 - iter / (max_epochs * len(loader))) ** 0.9 with max_epochs = 200
    it = 160 * 5 - 1
    assert sched.lr_lambdas[0](it) == pytest.approx((1 - it / (200 * 5)) ** 0.9)


def test_synapse_without_validation_cases_records_last_selection(tmp_path):
    m = run_train(["experiment=tiny_seg", "data.layout=synapse", "task.num_classes=2", "data.val_cases=0",
                   "task.selection=last", "task.max_epochs=1", "task.overlays=0"], tmp_path)
    assert m["selection"] == "last" and m["validated_on"] is None and m["protocol"]["splits"]["val"] is None
    assert m["protocol"]["splits"]["test"]["name"] == "test_vol.txt" and m["test/dice"] is not None


# ------------------------------------------------------------------ every tiny recipe records how it was made
def test_every_tiny_recipe_is_run_by_the_conformance_test():
    # tests/test_task_contract.py runs each kind's tiny_overrides and checks selection + protocol there
    from tasks.base import task_kinds

    covered = {o.split("=", 1)[1] for cls in task_kinds().values() for o in cls.tiny_overrides if o.startswith("experiment=")}
    tiny = {p.stem for p in (ROOT / "conf" / "experiment").glob("tiny*.yaml")}
    assert tiny and tiny <= covered, sorted(tiny - covered)


def check_protocol_record(m: dict) -> None:
    """What every run's metrics.json says about how its numbers were made."""
    assert m["selection"] in SELECTIONS
    p = m["protocol"]
    assert isinstance(p, dict) and p["selection"] == m["selection"] and p["validated_on"] == m["validated_on"]
    assert set(p["splits"]) == {"train", "val", "test"} and p["splits"]["train"]["size"]
    assert "normalisation" in p
    if m["selection"] == "val":
        assert not p["val_overlaps_test"] and p["splits"]["val"] is not None


# ------------------------------------------------------------------ PDE: PDEBench's metric_func axes
def _pdebench_metric_func(pred, target):
    """PDEBench ``metric_func`` (``pdebench/models/metrics.py``) for 1-D data, written here in numpy from its
    definitions: arrays ``(batch, nx, nt, nc)``; returns (nRMSE, max error), each averaged over channels and time."""
    import numpy as np

    p, t = np.moveaxis(pred, 3, 1), np.moveaxis(target, 3, 1)  # (nb, nc, nx, nt)
    err_mean = np.sqrt(np.mean((p - t) ** 2, axis=2))  # (nb, nc, nt)
    nrm = np.sqrt(np.mean(t ** 2, axis=2))
    n_rmse = np.mean(err_mean / nrm, axis=0)  # (nc, nt)
    err_max = np.max(np.max(np.abs(p - t), axis=2), axis=0)  # worst point of all the data, per channel and step
    return float(n_rmse.mean()), float(err_max.mean())


def test_pde_nrmse_and_max_error_follow_pdebench_per_channel():
    import numpy as np
    import torch

    from tasks.metrics.pde import RolloutMetrics

    rng = np.random.default_rng(0)
    B, K, X = 3, 2, 16
    vx = rng.normal(size=(B, K, X))
    true = np.stack([vx, 0.3 * vx], axis=-1)  # a velocity field with V_y = 0.3 V_x: two channels, uneven energy
    pred = true + 0.1 * rng.normal(size=true.shape)  # the same absolute error on both components
    ours = RolloutMetrics()
    # (B, K, X, C) -> the zoo's (B, K, F=1, C, D=1, H=1, W=X)
    to_zoo = lambda a: torch.from_numpy(a).permute(0, 1, 3, 2)[:, :, None, :, None, None, :]  # noqa: E731
    ours.update(to_zoo(pred), to_zoo(true))
    s = ours.summary()
    ref_nrmse, ref_max = _pdebench_metric_func(pred.transpose(0, 2, 1, 3), true.transpose(0, 2, 1, 3))
    assert s["nrmse"] == pytest.approx(ref_nrmse, rel=1e-5)
    assert s["max_err"] == pytest.approx(ref_max, rel=1e-12)
    # pooling the components before the ratio (the earlier definition) is well below PDEBench's value
    pooled = np.mean(np.sqrt(((pred - true) ** 2).mean(axis=(2, 3)) / (true ** 2).mean(axis=(2, 3))))
    assert ref_nrmse > 1.3 * pooled


def test_pde_rollout_runs_to_the_trajectory_end_and_is_recorded(tmp_path):
    m = run_train(["experiment=tiny_pde", "adapter=lora", "task.rollout_horizon=full", "task.max_epochs=1"], tmp_path)
    p = m["protocol"]
    # the tiny recipe's trajectories have 9 frames: from t = 0 with one context frame, 8 rollout steps (PDEBench)
    assert p["initial_step"] == 1 and p["horizon"] == {"full": [8]} and p["start"] == 0
    assert p["normalisation"]["revin"] == "trajectory" and m["test/max_err"] is not None
    tables = json.loads((Path(m["out_dir"]) / "rollout_metrics.json").read_text())["metrics"]
    assert len(tables["nrmse"]) == 8
    assert m["selection"] == "val" and m["validated_on"] == "val" and not p["val_overlaps_test"]


# ------------------------------------------------------------------ restoration: each dataset's own PSNR convention
@pytest.mark.parametrize("dataset, eight_bit", [("denoise", False), ("deblur", True), ("derain", True)])
def test_restoration_psnr_convention_follows_nafnet_per_dataset(dataset, eight_bit):
    import math

    import torch

    from tasks.metrics.restoration import psnr
    from tasks.restoration import metric_convention

    cfg = metric_convention({"crop_border": None, "y_channel": None, "quantize": None}, dataset, 2)
    target = torch.full((1, 3, 8, 8), 0.5)
    pred = target + 0.0015  # below half an 8-bit step: rounds to the target
    mse = 0.0 if eight_bit else 0.0015 ** 2  # NAFNet SIDD (use_image: false) scores the float output
    expect = math.inf if eight_bit else 10 * math.log10(1 / mse)
    got = psnr(pred, target, **cfg).item()
    assert (got == expect) if eight_bit else got == pytest.approx(expect, rel=1e-4)


# ------------------------------------------------------------------ captioning: the backend is recorded, METEOR never silently null
def test_captioning_without_java_refuses_meteor_and_records_its_backend(tmp_path, monkeypatch):
    import tasks.metrics.captioning as cm
    from tasks.runner import build_task, user_error_of

    monkeypatch.setattr(cm, "java_available", lambda: False)
    cfg = compose_config(["experiment=tiny_caption", "adapter=lora", "task.metrics.backend=auto",
                          "task.metrics.meteor_test=true"])
    with pytest.raises(Exception) as e:
        build_task(cfg)
    err = user_error_of(e.value)
    assert isinstance(err, ValueError) and "METEOR was asked for" in str(err) and "Java" in str(err)
    # auto without METEOR: pure scores, and the record says they are not the published (PTB) kind
    m = run_train(["experiment=tiny_caption", "adapter=lora", "task.metrics.backend=auto"], tmp_path)
    metric = m["protocol"]["metric"]
    assert metric["backend"] == "pure" and metric["comparable_with_published"] is False and m["test/meteor"] is None


# ------------------------------------------------------------------ MORPH: the reference's conv stack for any conv_filter
@pytest.mark.parametrize("conv_filter", [8, 16, 24, 48, 64])
def test_morph_conv_stack_follows_lanl_morph_for_any_filter_count(conv_filter):
    import torch.nn as nn

    from zoo.backbones.morph_model import ConvOperator, MorphConfig, count_parameters

    # lanl/MORPH src/utils/convolutional_operator.py: prev = 8; while prev < f: nxt = min(prev * 2, f); ...;
    # then one more conv prev -> f
    expected, prev = [], 8
    while prev < conv_filter:
        nxt = min(prev * 2, conv_filter)
        expected.append((prev, nxt))
        prev = nxt
    expected.append((prev, conv_filter))
    op = ConvOperator(conv_filter)
    got = [(m.in_channels, m.out_channels) for m in op.conv_stack if isinstance(m, nn.Conv3d)]
    assert got == expected
    cfg = MorphConfig(conv_filter=conv_filter, dim=32, heads=4, depth=1, mlp_dim=64)
    conv_params = 3 * 8 + sum(a * b * 27 for a, b in expected)
    assert count_parameters(cfg) - count_parameters(MorphConfig(conv_filter=8, dim=32, heads=4, depth=1, mlp_dim=64)) \
        == conv_params - (3 * 8 + 8 * 8 * 27) + (conv_filter - 8) * 8 ** 3 * 32


# ------------------------------------------------------------------ AST: the checkpoint's own position grid
TINY_AST = {"model": "deit_tiny_distilled_patch16_224", "pretrained": False,
            "embed_dim": 16, "depth": 1, "num_heads": 2}


@pytest.mark.parametrize("bins, fstride, rows", [(48, 10, 4), (40, 10, 3), (72, 10, 6), (128, 20, 6)])
def test_ast_audioset_checkpoint_grid_is_read_from_the_checkpoint(tmp_path, bins, fstride, rows):
    import torch
    from safetensors.torch import save_file

    from zoo.backbones.ast import ASTBackbone

    src = ASTBackbone(max_length=1024, num_mel_bins=128, **TINY_AST)  # the AudioSet geometry: 12 x 101
    sd = {k: v.clone().contiguous() for k, v in src.model.state_dict().items()}
    f0, t0 = 12, 101
    code = torch.arange(f0 * t0, dtype=torch.float32).reshape(1, f0 * t0, 1).expand(1, f0 * t0, 16)
    sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :2], code], dim=1).contiguous()  # entry = row * 101 + column
    save_file(sd, str(tmp_path / "ast.safetensors"))
    new = ASTBackbone(weights=str(tmp_path / "ast.safetensors"), max_length=1024, num_mel_bins=bins, fstride=fstride,
                      **TINY_AST)
    assert new.checkpoint_grid == (12, 101)
    # ast_models.py: f_dim < 12 -> rows [12//2 - f_dim//2, +f_dim) of the 12 x 101 table, time unchanged (t = 101)
    start = f0 // 2 - rows // 2
    expect = torch.tensor([[r * t0 + c for c in range(t0)] for r in range(start, start + rows)], dtype=torch.float32)
    got = new.model.pos_embed[0, 2:, 0].detach().reshape(rows, t0)
    assert torch.equal(got, expect)


# ------------------------------------------------------------------ AST: get_norm_stats.py's statistics
def test_dataset_stats_are_get_norm_stats_over_padded_batches():
    import numpy as np
    import torch

    from zoo.audio import dataset_stats

    g = torch.Generator().manual_seed(0)
    clips = [torch.randn(n, 8, generator=g) * 3 - 5 for n in (4, 7, 10, 12, 6)]  # unequal lengths
    T, B = 10, 2
    # get_norm_stats.py: the loader pads each fbank with zeros to target_length (cuts longer ones), batches of
    # batch_size; torch.mean / torch.std of each batch, then np.mean over the batches
    padded = [torch.cat([c, torch.zeros(T - len(c), 8)]) if len(c) < T else c[:T] for c in clips]
    batches = [torch.stack(padded[i:i + B]) for i in range(0, len(padded), B)]
    expect = (np.mean([float(torch.mean(b)) for b in batches]), np.mean([float(torch.std(b)) for b in batches]))
    assert dataset_stats(clips, target_length=T, batch_size=B) == pytest.approx(expect, rel=1e-6)
    # the earlier per-clip average of unpadded features is another number
    per_clip = (np.mean([float(c.mean()) for c in clips]), np.mean([float(c.std()) for c in clips]))
    assert abs(per_clip[0] - expect[0]) > 0.1


def test_samed_volume_evaluation_goes_through_its_input_size():
    import numpy as np
    from scipy.ndimage import zoom

    from tasks.data.segmentation_layouts import predict_volume

    assert compose_config(["experiment=samed_synapse"]).task.volume_input_size == 224
    rng = np.random.default_rng(0)
    vol = rng.random((3, 32, 32)).astype(np.float32)
    seen = []

    def predict(x):  # records what the model receives; "segments" by thresholding channel 0
        seen.append(x[:, 0].numpy().copy())
        return (x[:, 0] > 0.5).long()

    out = predict_volume(predict, vol, img_size=32, input_size=14)
    # SAMed utils.test_single_volume: slice (x, y) -> zoom to input_size (order 3) -> zoom to patch_size
    # (order 3) -> net -> argmax -> zoom back to (x, y) with order 0
    ref_inputs = [zoom(zoom(s, (14 / 32, 14 / 32), order=3), (32 / 14, 32 / 14), order=3) for s in vol]
    assert np.allclose(np.concatenate(seen), np.stack(ref_inputs), atol=1e-6)
    assert np.array_equal(out, np.stack([(r > 0.5).astype(np.int64) for r in ref_inputs]))
    assert not np.allclose(ref_inputs[0], vol[0], atol=1e-2)  # the 14-pixel bottleneck changes the input


# ------------------------------------------------------------------ SAM's predictor pipeline for natural images
def test_sam_longest_side_pipeline_matches_segment_anything():
    import numpy as np
    import torch
    from segment_anything.modeling import Sam
    from segment_anything.utils.transforms import ResizeLongestSide

    from zoo.backbones.sam_transforms import postprocess, prepare, preprocess_shape

    S, mean, std = 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rng = np.random.default_rng(0)
    img8 = (rng.random((97, 143, 3)) * 255).astype(np.uint8)  # a 97 x 143 natural image
    assert preprocess_shape(97, 143, S) == ResizeLongestSide.get_preprocess_shape(97, 143, S) == (43, 64)
    # the predictor: ResizeLongestSide.apply_image (PIL), then Sam.preprocess (normalise, pad bottom/right)
    resized = torch.from_numpy(ResizeLongestSide(S).apply_image(img8)).permute(2, 0, 1).float() / 255
    fake = type("S", (), {"pixel_mean": torch.tensor(mean).view(3, 1, 1), "pixel_std": torch.tensor(std).view(3, 1, 1),
                          "image_encoder": type("E", (), {"img_size": S})()})()
    ref = Sam.preprocess(fake, resized[None])
    ours, shape = prepare(torch.from_numpy(img8).permute(2, 0, 1).float() / 255, S, mean, std)
    assert shape == (43, 64) and ours.shape == ref.shape == (1, 3, S, S)
    assert torch.equal(ours[..., 43:, :], torch.zeros_like(ours[..., 43:, :]))  # the padding, as SAM's
    assert (ours - ref).abs().mean() < 0.02  # torch's antialiased bilinear vs PIL's, on 8-bit input
    logits = torch.randn(1, 2, S // 4, S // 4)
    assert torch.equal(postprocess(logits, S, shape, (97, 143)), Sam.postprocess_masks(fake, logits, shape, (97, 143)))
    # a square resize (SAMed's) is another input: the stretched image differs from the padded one
    square, _ = prepare(torch.from_numpy(img8).permute(2, 0, 1).float() / 255, S, mean, std, pipeline="square")
    assert not torch.allclose(square, ours)


def test_sam_segmenter_predicts_a_natural_image_at_its_own_size():
    import torch

    from tests.seg_helpers import tiny_segmenter

    torch.manual_seed(0)
    model = tiny_segmenter(num_classes=2).eval()
    image = torch.rand(3, 97, 143)
    labels = model.predict_image(image)
    assert labels.shape == (97, 143) and labels.dtype == torch.long and int(labels.max()) <= 2
    with pytest.raises(ValueError, match="valid: longest_side, square"):
        model.predict_image(image, pipeline="stretch")


def _non_square_folder(root: Path, size=(45, 67)):
    """A folder layout whose test image is not square (H x W = 45 x 67), with a 3-class index mask."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
        for i in range(n):
            Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(root / split / "images" / f"{i}.png")
            Image.fromarray(rng.integers(0, 4, size).astype(np.uint8)).save(root / split / "masks" / f"{i}.png")


@pytest.mark.parametrize("mode", ["semantic", "prompted"])
def test_segmentation_eval_with_sam_pipeline_is_segment_anythings_predictor(tmp_path, mode):
    """task.sam.pipeline=longest_side: the encoder receives SamPredictor's input of the non-square image
    (ResizeLongestSide, Sam.preprocess: normalise, pad bottom / right) and the prediction is Sam.postprocess_masks
    of the model's logits at the image's own size; the square training inputs are not what is evaluated."""
    import lightning as L
    import numpy as np
    import torch
    from PIL import Image
    from segment_anything.modeling import Sam
    from segment_anything.utils.transforms import ResizeLongestSide

    from tasks.runner import build_datamodule, build_task

    _non_square_folder(tmp_path / "data")
    cfg = compose_config(["experiment=tiny_seg", "data.layout=folder", f"data.root={tmp_path / 'data'}",
                          "task.sam.pipeline=longest_side", f"task.sam.mode={mode}", "data.augment=false"],
                         tmp_path / "run")
    task = build_task(cfg).eval()
    dm = build_datamodule(cfg, task)
    dm.setup("fit")
    seen = []
    task.model.register_forward_hook(lambda m, args, out: seen.append((args[0].detach().clone(), out.detach().clone())))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    res = trainer.test(task, datamodule=dm, verbose=False)[0]
    assert len(seen) == 1 and 0.0 <= res["test/dice"] <= 1.0
    x, logits = seen[0]

    S, (H, W) = 64, (45, 67)
    mean, std = dm.norm.mean.flatten(), dm.norm.std.flatten()
    img = torch.from_numpy(np.asarray(Image.open(tmp_path / "data" / "test" / "images" / "0.png").convert("RGB")))
    fake = type("S", (), {"pixel_mean": mean.view(3, 1, 1), "pixel_std": std.view(3, 1, 1),
                          "image_encoder": type("E", (), {"img_size": S})()})()
    resize = ResizeLongestSide(S)
    h, w = resize.get_preprocess_shape(H, W, S)
    assert (h, w) == (43, 64)
    # SamPredictor.set_torch_image's input: apply_image_torch's resize, then Sam.preprocess (pixels in [0, 1] here).
    # apply_image_torch itself reads the target size from image.shape[0], shape[1] (batch and channels, a known bug
    # of segment_anything): its interpolation is called here with the size get_preprocess_shape gives
    ref = Sam.preprocess(fake, torch.nn.functional.interpolate(img.permute(2, 0, 1)[None].float() / 255, (h, w),
                                                               mode="bilinear", align_corners=False, antialias=True))
    assert x.shape == ref.shape == (1, 3, S, S)
    assert torch.allclose(x, ref, atol=1e-5)
    assert torch.equal(x[..., h:, :], torch.zeros_like(x[..., h:, :]))  # SAM's zero padding, after normalising
    # SamPredictor.set_image (PIL resize of the 8-bit image): the same up to PIL's vs torch's antialiasing
    pil = torch.from_numpy(resize.apply_image(img.numpy())).permute(2, 0, 1)[None].float() / 255
    assert (x - Sam.preprocess(fake, pil)).abs().mean() < 0.02
    # the written prediction is the model's logits through Sam.postprocess_masks at the image's own size
    out = task.run_metrics(trainer, dm)
    pred = np.asarray(Image.open(Path(out["predictions_dir"]) / "0000.png"))
    full = Sam.postprocess_masks(fake, logits, (h, w), (H, W))
    expected = full.argmax(1)[0] if mode == "semantic" else torch.where(full.max(1).values > 0, full.argmax(1) + 1, 0)[0]
    assert pred.shape == (H, W) and np.array_equal(pred, expected.numpy())


def test_segmentation_sam_pipeline_refuses_what_it_cannot_do(tmp_path):
    from hydra.errors import InstantiationException

    from tasks.runner import build_datamodule, build_task

    with pytest.raises(InstantiationException, match="valid: null, longest_side, square"):
        build_task(compose_config(["experiment=tiny_seg", "task.sam.pipeline=stretch"]))
    with pytest.raises(InstantiationException, match="needs task.head=sam"):
        build_task(compose_config(["experiment=tiny_seg", "task.head=smp_fpn", "task.sam.pipeline=longest_side"]))
    cfg = compose_config(["experiment=tiny_seg", "data.layout=synapse", "task.sam.pipeline=longest_side"])
    with pytest.raises(InstantiationException, match="Synapse volumes are evaluated slice by slice"):
        build_datamodule(cfg, build_task(cfg))


def test_samed_recipe_refuses_sams_predictor_pipeline():
    # SAMed squashes every slice (512 -> 224 -> 512, test_single_volume): its recipe keeps that pipeline, and
    # asking it for SAM's natural-image pipeline is refused in one line, not silently ignored
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from omegaconf import OmegaConf

    cfg = compose_config(["experiment=samed_synapse", "task.sam.pipeline=longest_side"])
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert data.pop("normalize") == "none"  # SAMed: slices stay in [0, 1] (the runner passes mean = std = None)
    with pytest.raises(InstantiationException, match="Synapse volumes are evaluated slice by slice"):
        instantiate(data, mean=None, std=None, _convert_="all")
    assert compose_config(["experiment=samed_synapse"]).task.sam.get("pipeline") is None  # the recipe sets none


def test_restoration_with_held_out_pairs_selects_on_them_not_on_test(tmp_path):
    # data.val_from_train: validation pairs come out of the training split, so selecting on them is allowed
    # and the record names the held-out split (not derain/test)
    m = run_train(["experiment=tiny_restore", "adapter=full", "task.selection=val", "data.val_from_train=4",
                   "task.num_train=8", "task.log_images=0"], tmp_path)
    assert m["selection"] == "val" and m["validated_on"] == "derain/train (held out)"
    assert m["protocol"]["val_overlaps_test"] is False
    assert m["protocol"]["splits"]["val"] == {"name": "derain/train (held out)", "size": 4}
    assert m["protocol"]["splits"]["test"] == {"name": "derain/test", "size": 4}
