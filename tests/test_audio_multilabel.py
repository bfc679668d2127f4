"""Multi-label audio (task=audio_multilabel): the labels.csv layout, multi-hot targets and mixup,
BCE with logits, macro mAP against a hand computation, and a tiny run on the generated mixtures."""
from __future__ import annotations

import csv
import zlib

import numpy as np
import pytest
import soundfile as sf
import torch

from tasks.data import audio as A
from tests.helpers import compose_config, run_train
from zoo.audio import FrontEnd


def average_precision_by_hand(scores: list[float], positive: list[int]) -> float:
    """AP of one class: rank by score (no ties), mean of the precision at the rank of each positive."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, precisions = 0, []
    for rank, i in enumerate(order, start=1):
        if positive[i]:
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / len(precisions) if precisions else 0.0


def test_hand_oracle_on_a_worked_case():
    # scores 0.9 (pos) 0.8 0.4 0.2 (pos): precisions 1/1 and 2/4 -> AP 0.75
    assert average_precision_by_hand([0.9, 0.8, 0.2, 0.4], [1, 0, 1, 0]) == 0.75
    assert average_precision_by_hand([0.7, 0.6, 0.3, 0.1], [1, 1, 0, 0]) == 1.0


@pytest.fixture(scope="module")
def task():
    from tasks.runner import build_task

    return build_task(compose_config(["experiment=tiny_audio_multilabel", "adapter=linear"]))


def test_macro_map_equals_hand_computation_over_batches(task):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 10, generator=g)
    target = (torch.rand(12, 10, generator=g) < 0.3).float()
    target[0] = 1.0  # every class has a positive clip
    logged = {}
    task.log = lambda name, value, **kw: logged.setdefault(name, value)  # outside a Trainer
    task.val_map.reset()
    task.update_metrics("val", logits[:5], target[:5])  # two batches, multi-hot float targets
    task.update_metrics("val", logits[5:], target[5:])
    got = float(task.val_map.compute())
    want = np.mean([average_precision_by_hand(logits[:, c].tolist(), target[:, c].int().tolist()) for c in range(10)])
    assert got == pytest.approx(want, abs=1e-6)
    assert logged["val/mAP"] is task.val_map and task.monitor == "val/mAP" and task.monitor_mode == "max"
    task.update_metrics("train", logits, target * 0.7)  # soft mixup targets: no train mAP
    assert "train/mAP" not in logged


def test_loss_is_bce_with_logits_on_soft_targets(task):
    z = torch.tensor([[2.0, -1.0, 0.5]])
    y = torch.tensor([[1.0, 0.0, 0.3]])
    s = torch.sigmoid(z)
    want = -(y * s.log() + (1 - y) * (1 - s).log()).mean()
    assert float(task.loss_fn(z, y)) == pytest.approx(float(want), rel=1e-6)
    assert float(task.loss_fn(z, torch.tensor([0]))) == pytest.approx(
        float(task.loss_fn(z, torch.tensor([[1.0, 0.0, 0.0]]))))  # class indices read as one-hot


def test_parse_labels_and_multi_hot():
    assert A.parse_labels(" dog; bark;;dog ;") == ["dog", "bark"]
    assert A.multi_hot((0, 3), 5).tolist() == [1, 0, 0, 1, 0] and A.multi_hot(2, 3).tolist() == [0, 0, 1]


def _clip(path, n=4000):
    path.parent.mkdir(parents=True, exist_ok=True)
    seed = zlib.crc32(path.name.encode())  # distinct clips: identical files across splits are refused
    sf.write(path, (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32), 16000)


def _write(root, rows, header=("file", "labels", "split"), name="labels.csv", delimiter=","):
    with open(root / name, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)


def test_labels_csv_layout(tmp_path):
    for i in range(4):
        _clip(tmp_path / "clips" / f"{i}.wav")
    _write(tmp_path, [["clips/0.wav", "dog;bark", "train"], ["clips/1.wav", "speech", "train"],
                      ["clips/2.wav", "bark; speech", "val"], ["clips/3.wav", "dog", "test"]])
    splits, classes = A.read_multilabel(tmp_path)
    assert classes == ["bark", "dog", "speech"]  # sorted names without classes.txt
    assert [y for _, y in splits["train"]] == [(1, 0), (2,)] and splits["val"][0][1] == (0, 2)
    assert splits["test"] == [(str(tmp_path / "clips" / "3.wav"), (1,))]
    (tmp_path / "classes.txt").write_text("speech\ndog\nbark\nmusic\n")  # fixes the order, may hold unused classes
    splits, classes = A.read_multilabel(tmp_path)
    assert classes == ["speech", "dog", "bark", "music"] and splits["train"][0][1] == (1, 2)
    ds = A.AudioClips(splits["train"], FrontEnd(max_length=32), len(classes), multilabel=True)
    x, y = ds[0]
    assert x.shape == (32, 128) and y.tolist() == [0, 1, 1, 0]
    # a TSV without a split column: a fixed 80/10/10 shuffle
    (tmp_path / "labels.csv").unlink()
    (tmp_path / "classes.txt").unlink()
    _write(tmp_path, [[f"clips/{i}.wav", "dog"] for i in range(4)], header=("file", "labels"), name="labels.tsv", delimiter="\t")
    splits, _ = A.read_multilabel(tmp_path)
    assert len(splits["train"]) == 3 and len(splits["test"]) == 1 and splits["val"] == splits["test"]  # 4 clips: 3 / 0 / 1
    assert {p for p, _ in splits["train"] + splits["test"]} == {str(tmp_path / "clips" / f"{i}.wav") for i in range(4)}


@pytest.mark.parametrize("rows, classes, match", [
    ([["a.wav", "", "train"]], None, r"line 2: 'a.wav' has no labels"),
    ([["a.wav", "dog", "training"]], None, r"line 2: split 'training'; valid: train, val, test"),
    ([["a.wav", "dog;cat", "train"]], "dog\n", r"line 2: label\(s\) \['cat'\] are not in .*classes.txt"),
])
def test_bad_label_lists_are_one_line(tmp_path, rows, classes, match):
    _write(tmp_path, rows)
    if classes:
        (tmp_path / "classes.txt").write_text(classes)
    with pytest.raises(ValueError, match=match):
        A.read_multilabel(tmp_path)


def test_missing_list_and_wrong_task_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="labels.csv not found: task.dataset=multilabel needs .*file,labels"):
        A.read_multilabel(tmp_path)
    with pytest.raises(ValueError, match="has multi-label targets: use task=audio_multilabel"):
        A.AudioDataModule(dataset="multilabel", root=str(tmp_path))


def test_mixup_mixes_multi_hot_targets(tmp_path, monkeypatch):
    _clip(tmp_path / "a.wav")
    _clip(tmp_path / "b.wav")
    items = [(str(tmp_path / "a.wav"), (0, 1)), (str(tmp_path / "b.wav"), (1, 2))]
    ds = A.AudioClips(items, FrontEnd(max_length=32), 4, train=True, mixup=1.0, multilabel=True)
    monkeypatch.setattr(A.np.random, "beta", lambda a, b: 0.3)
    monkeypatch.setattr(A.random, "randrange", lambda n: 1)
    _, t = ds[0]
    # λ on clip 1's classes, 1 − λ on clip 2's, summed on the shared class (AST's dataloader)
    assert torch.allclose(t, torch.tensor([0.3, 1.0, 0.7, 0.0]))


def test_generated_multilabel_set(tmp_path):
    root = A.write_generated_multilabel(tmp_path / "ml", clips=20, seconds=0.5)
    splits, classes = A.read_multilabel(root)
    assert classes == list(A.GENERATED_CLASSES)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [12, 4, 4]
    labels = [y for s in splits.values() for _, y in s]
    assert all(1 <= len(y) <= 2 and len(set(y)) == len(y) for y in labels) and any(len(y) == 2 for y in labels)
    assert sf.info(splits["train"][0][0]).samplerate == 16000


def test_tiny_multilabel_run(tmp_path):
    m = run_train(["experiment=tiny_audio_multilabel", "adapter=lora"], tmp_path)
    assert m["kind"] == "audio_multilabel" and m["monitor"]["name"] == "val/mAP" and m["monitor"]["mode"] == "max"
    assert 0.0 < m["val/mAP"] <= 1.0 and 0.0 < m["test/mAP"] <= 1.0
    assert [c["key"] for c in m["columns"]] == ["val/mAP", "test/mAP"]


def test_fold_summary_reads_map_runs(tmp_path):
    import json

    from tasks.metrics.audio import summarize_folds

    for k, v in [(1, 0.4), (2, 0.6)]:
        (tmp_path / str(k)).mkdir()
        (tmp_path / str(k) / "metrics.json").write_text(json.dumps({
            "schema_version": 2, "kind": "audio_multilabel", "adapter": "lora", "fold": k,
            "monitor": {"name": "val/mAP", "mode": "max", "value": 0.9}, "val/mAP": 0.9, "test/mAP": v}))
    table = summarize_folds(tmp_path)
    assert table["lora"]["metric"] == "test/mAP" and table["lora"]["mean"] == pytest.approx(0.5)
