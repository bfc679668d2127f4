"""Audio datasets: the generated ESC-50-layout set, fold and list protocols, bad input."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import soundfile as sf
import torch

from tasks.data import audio as A
from zoo.audio import FrontEnd


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return A.write_generated(tmp_path_factory.mktemp("gen") / "esc", clips_per_class=5, seconds=0.5)


def test_generated_set_has_the_esc50_release_layout(generated):
    rows = A.read_esc50(generated)
    with open(generated / "meta" / "esc50.csv") as f:
        assert tuple(next(csv.reader(f))) == A.ESC50_COLUMNS
    assert len(rows) == 5 * len(A.GENERATED_CLASSES) and {r["fold"] for r in rows} == {1, 2, 3, 4, 5}
    assert len(A.GENERATED_CLASSES) >= 10 and A.esc50_classes(rows) == list(A.GENERATED_CLASSES)
    for r in rows:  # {FOLD}-{CLIP_ID}-{TAKE}-{TARGET}.wav
        fold, _, take, target = r["filename"][:-4].split("-")
        assert int(fold) == r["fold"] and int(target) == r["target"] and take == "A"
        info = sf.info(r["path"])
        assert info.samplerate == 16000 and info.channels == 1
    mtime = (generated / "meta" / "esc50.csv").stat().st_mtime_ns
    A.write_generated(generated, clips_per_class=5, seconds=0.5)  # reused, not rewritten
    assert (generated / "meta" / "esc50.csv").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("val_fold", ["none", "next"])
def test_five_fold_protocol(generated, val_fold):
    rows = A.read_esc50(generated)
    every = {r["path"] for r in rows}
    tested = []
    for k in range(1, 6):
        s = A.esc50_split(rows, k, val_fold)
        tr, va, te = ({p for p, _ in s[n]} for n in ("train", "val", "test"))
        assert not tr & te and not tr & va
        assert tr | va | te == every
        assert all(r["fold"] == k for r in rows if r["path"] in te)
        if val_fold == "next":
            assert not va & te and all(r["fold"] == k % 5 + 1 for r in rows if r["path"] in va)
        else:
            assert va == te
        tested += sorted(te)
    assert sorted(tested) == sorted(every)  # every clip is tested exactly once over the 5 folds
    with pytest.raises(ValueError, match=r"task.fold=6: the dataset's folds are \[1, 2, 3, 4, 5\]"):
        A.esc50_split(rows, 6)


def test_missing_meta_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta/esc50.csv not found: task.data_dir must be an ESC-50 release folder"):
        A.read_esc50(tmp_path)


def test_clips_give_normalised_fbanks_and_44k_is_resampled(tmp_path, caplog):
    root = A.write_generated(tmp_path / "cd", clips_per_class=5, seconds=0.5, sample_rate=44100, classes=("low_tone", "chirp_up"))
    rows = A.read_esc50(root)
    ds = A.AudioClips([(r["path"], r["target"]) for r in rows], FrontEnd(max_length=64, mean=-6.0, std=5.0), 2)
    with caplog.at_level("WARNING", logger="zoo.audio"):
        x, y = ds[0]
    assert x.shape == (64, 128) and y == rows[0]["target"]
    assert any("44100 Hz resampled to 16000 Hz" in r.message for r in caplog.records)


def test_bad_clip_is_named_or_skipped(tmp_path, caplog):
    good = tmp_path / "good.wav"
    sf.write(good, np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1, 16000)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    items = [(str(bad), 0), (str(good), 1)]
    with pytest.raises(ValueError, match="bad.wav: cannot decode audio.*task.bad_files=skip"):
        A.AudioClips(items, FrontEnd(max_length=32), 2)[0]
    ds = A.AudioClips(items, FrontEnd(max_length=32), 2, bad_files="skip")
    with caplog.at_level("WARNING", logger="tasks.audio"):
        x, y = ds[0]
    assert y == 1 and ds.skipped == [str(bad)]
    assert any("skipped bad clip" in r.message and "bad.wav" in r.message for r in caplog.records)


def test_mixup_gives_soft_labels(generated):
    rows = A.read_esc50(generated)
    ds = A.AudioClips([(r["path"], r["target"]) for r in rows], FrontEnd(max_length=48), 10, train=True, mixup=1.0)
    torch.manual_seed(0)
    x, t = ds[0]
    assert x.shape == (48, 128) and t.shape == (10,) and torch.isclose(t.sum(), torch.tensor(1.0))
    assert t[rows[0]["target"]] > 0


def _speech_commands(root):
    rng = np.random.default_rng(0)
    for w in ("yes", "no", "cat", "dog"):
        (root / w).mkdir(parents=True)
        for i in range(4):
            sf.write(root / w / f"spk{i}_nohash_0.wav", (rng.standard_normal(16000) * 0.1).astype(np.float32), 16000)
    (root / "_background_noise_").mkdir()
    sf.write(root / "_background_noise_" / "white.wav", (rng.standard_normal(16000 * 20) * 0.1).astype(np.float32), 16000)
    (root / "validation_list.txt").write_text("yes/spk1_nohash_0.wav\ncat/spk1_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("yes/spk2_nohash_0.wav\ndog/spk2_nohash_0.wav\n")


def test_speech_commands_lists_and_12_classes(tmp_path):
    _speech_commands(tmp_path)
    splits, names = A.read_speechcommands(tmp_path, "35")
    assert names == ["cat", "dog", "no", "yes"]  # _background_noise_ is not a class
    rel = {k: {"/".join(p.split("/")[-2:]) for p, _ in v} for k, v in splits.items()}
    assert rel["val"] == {"yes/spk1_nohash_0.wav", "cat/spk1_nohash_0.wav"}
    assert rel["test"] == {"yes/spk2_nohash_0.wav", "dog/spk2_nohash_0.wav"}
    assert len(rel["train"]) == 16 - 4 and not rel["train"] & (rel["val"] | rel["test"])
    splits, names = A.read_speechcommands(tmp_path, "12")
    assert names[-2:] == ["_unknown_", "_silence_"] and len(names) == 12
    labels = {"/".join(p.split("/")[-2:]): y for p, y in splits["train"]}
    assert labels["yes/spk0_nohash_0.wav"] == 0 and labels["cat/spk0_nohash_0.wav"] == 10
    silence = [p for p, y in splits["train"] if y == 11]
    assert silence and all("#" in p for p in silence)
    ds = A.AudioClips(splits["train"], FrontEnd(max_length=100), 12)
    x, y = ds[[i for i, (p, _) in enumerate(splits["train"]) if "#" in p][0]]
    assert y == 11 and x.shape == (100, 128)
    with pytest.raises(FileNotFoundError, match="validation_list.txt"):
        A.read_speechcommands(tmp_path / "yes")


def test_folder_layouts_and_unknown_class(tmp_path):
    rng = np.random.default_rng(0)
    for split, cls in [("train", "a"), ("train", "b"), ("val", "a"), ("test", "b")]:
        (tmp_path / split / cls).mkdir(parents=True)
        sf.write(tmp_path / split / cls / "x.wav", (rng.standard_normal(4000) * 0.1).astype(np.float32), 16000)
    splits, classes = A.read_folder(tmp_path)
    assert classes == ["a", "b"] and len(splits["train"]) == 2 and splits["val"][0][1] == 0 and splits["test"][0][1] == 1
    (tmp_path / "val" / "zebra").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) \['zebra'\] are not training classes \['a', 'b'\]"):
        A.read_folder(tmp_path)


def test_datamodule_batches_stats_and_cache(generated, tmp_path):
    dm = A.AudioDataModule(dataset="generated", root=str(generated), fold=2, max_length=48, batch_size=8,
                           eval_batch_size=16, cache_dir=str(tmp_path / "cache"), generate=False)
    assert dm.num_classes == 10 and len(dm.splits["test"]) == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 48, 128) and y.dtype == torch.long
    # statistics computed from the training split: normalised clips have mean ~0 and std ~0.5 (before padding)
    raw = torch.cat([dm.front(False).load(p) for p, _ in dm.splits["train"]])
    z = (raw - dm.mean) / (2 * dm.std)
    assert abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 0.5) < 0.1
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == len(dm.splits["train"])
    with pytest.raises(ValueError, match="unknown audio dataset 'esc10'; valid: generated, generated_upstream, esc50"):
        A.AudioDataModule(dataset="esc10", root=str(generated))


def test_wrong_num_classes_is_named(generated):
    with pytest.raises(ValueError, match="task.num_classes=7, but generated at .* has 10 classes .*set task.num_classes=10"):
        A.AudioDataModule(dataset="generated", root=str(generated), num_classes=7, generate=False)
