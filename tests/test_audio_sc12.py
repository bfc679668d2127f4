"""Speech Commands 12-class: the official separate test archive, the v2 lists, _silence_ pieces
(deterministic, disjoint), and AST's Speech-Commands noise augmentation."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tasks.data import audio as A
from zoo.audio import FrontEnd, add_noise_and_shift, load_wav

WORDS = ("yes", "no", "up", "cat", "dog")


def _wav(path: Path, seconds: float, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1
    sf.write(path, x.astype(np.float32), 16000)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """A toy speech_commands_v0.02 (5 words x 5 speakers, two noise files) and a toy 12-class test archive."""
    root = tmp_path_factory.mktemp("sc")
    v2, test = root / "speech_commands_v0.02", root / "speech_commands_test_set_v0.02"
    for k, w in enumerate(WORDS):
        for i in range(5):
            _wav(v2 / w / f"spk{i}_nohash_0.wav", 0.1, 10 * k + i)
    _wav(v2 / "_background_noise_" / "white_noise.wav", 20.0, 100)
    _wav(v2 / "_background_noise_" / "running_tap.wav", 5.0, 101)
    (v2 / "validation_list.txt").write_text("".join(f"{w}/spk3_nohash_0.wav\n" for w in WORDS))
    (v2 / "testing_list.txt").write_text("".join(f"{w}/spk4_nohash_0.wav\n" for w in WORDS))
    for k, c in enumerate(A.SC12_CLASSES):
        for i in range(2):
            _wav(test / c / f"{c.strip('_')}_t{i}_nohash_0.wav", 1.0, 200 + 2 * k + i)
    return v2, test


def _rel(p: str) -> str:
    return "/".join(Path(p.split("#")[0]).parts[-2:]) + ("#" + p.split("#")[1] if "#" in p else "")


def test_twelve_classes_with_the_official_test_archive(layout):
    v2, test = layout
    splits, names = A.read_speechcommands(v2, "12", test_root=test)
    assert names == list(A.SC12_CLASSES) and len(names) == 12
    assert names[:10] == ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
    tr, va, te = ({_rel(p) for p, _ in splits[k]} for k in ("train", "val", "test"))
    assert not tr & va and not tr & te and not va & te  # no leakage between the lists
    # val: the validation list (+ silence); the testing list is used nowhere; test: the archive, labelled by folder
    assert {p for p in va if "#" not in p} == {f"{w}/spk3_nohash_0.wav" for w in WORDS}
    assert not any("spk4" in p for p in tr | va | te)
    assert {p for p in tr if "#" not in p} == {f"{w}/spk{i}_nohash_0.wav" for w in WORDS for i in range(3)}
    assert sorted(y for _, y in splits["test"]) == sorted(2 * list(range(12)))
    assert all(A.SC12_CLASSES[y] == Path(p).parent.name for p, y in splits["test"])
    label = {_rel(p): y for p, y in splits["train"]}
    assert label["yes/spk0_nohash_0.wav"] == 0 and label["up/spk0_nohash_0.wav"] == 2
    assert label["cat/spk0_nohash_0.wav"] == 10 and label["dog/spk1_nohash_0.wav"] == 10  # other words: _unknown_
    # without the archive: the v2 testing list (+ silence) is the test split
    splits2, _ = A.read_speechcommands(v2, "12")
    assert {_rel(p) for p, _ in splits2["test"] if "#" not in p} == {f"{w}/spk4_nohash_0.wav" for w in WORDS}


@pytest.mark.parametrize("mode", ["balanced", "tfds"])
def test_silence_pieces_are_reproducible_and_disjoint(layout, mode):
    v2, test = layout
    a = A.silence_split(v2, mode, {"train": 3, "val": 1, "test": 1})
    assert a == A.silence_split(v2, mode, {"train": 3, "val": 1, "test": 1})  # no random draw
    assert not set(a["train"]) & set(a["val"]) and not set(a["train"]) & set(a["test"]) and not set(a["val"]) & set(a["test"])
    if mode == "balanced":  # 25 non-overlapping 1 s pieces (20 + 5); j mod 10 < 8 / = 8 / = 9; capped per split
        assert [len(a[k]) for k in ("train", "val", "test")] == [3, 1, 1]
        starts = {(Path(p.split("#")[0]).name, float(p.split("#")[1])) for k in a for p in a[k]}
        assert len(starts) == 5 and all(s == int(s) for _, s in starts)  # whole seconds: pieces never overlap
    else:  # 1 s pieces every 0.5 s: 20 s -> 39, 5 s -> 9; running_tap.wav to validation only, none to test
        assert len(a["train"]) == 39 and len(a["val"]) == 9 and a["test"] == []
        assert all("running_tap.wav" in p for p in a["val"]) and not any("running_tap.wav" in p for p in a["train"])
    if mode == "tfds":  # its test _silence_ clips come from the official test archive only
        with pytest.raises(ValueError, match="data.silence=tfds leaves the test split without _silence_"):
            A.read_speechcommands(v2, "12", silence=mode)
    splits, _ = A.read_speechcommands(v2, "12", silence=mode, test_root=test if mode == "tfds" else None)
    # balanced: as many as an average word has in train (15 files / 5 words = 3); tfds: all 39
    assert sum(y == 11 for _, y in splits["train"]) == (3 if mode == "balanced" else 39)


def test_a_silence_piece_is_the_waveform_slice(layout):
    v2, _ = layout
    noise = v2 / "_background_noise_" / "white_noise.wav"
    ds = A.AudioClips([(f"{noise}#12.5", 11)], FrontEnd(max_length=100, normalize=False), 12)
    w, _ = load_wav(noise)
    assert ds._wave(f"{noise}#12.5").equal(w[:, 200000:216000])
    x, y = ds[0]
    assert y == 11 and x.shape == (100, 128)


def test_bad_archives_are_one_line(layout, tmp_path):
    v2, test = layout
    bad = tmp_path / "archive"
    shutil.copytree(test, bad)
    (bad / "seven").mkdir()
    with pytest.raises(ValueError, match=r"folder\(s\) \['seven'\] are not 12-class labels; valid: yes, no"):
        A.read_sc12_test_archive(bad)
    (bad / "seven").rmdir()
    shutil.rmtree(bad / "_silence_")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['_silence_'\] missing"):
        A.read_sc12_test_archive(bad)
    leak = tmp_path / "leak"
    shutil.copytree(test, leak)
    shutil.copy(v2 / "yes" / "spk0_nohash_0.wav", leak / "yes" / "spk0_nohash_0.wav")
    with pytest.raises(ValueError, match="also training or validation clips .*must be speech_commands_test_set_v0.02"):
        A.read_speechcommands(v2, "12", test_root=leak)
    with pytest.raises(ValueError, match="use it with task.dataset=speechcommands12"):
        A.read_speechcommands(v2, "35", test_root=test)
    with pytest.raises(ValueError, match="task.dataset=esc50 does not read it"):
        A.read_dataset("esc50", v2, test_root=test)
    with pytest.raises(ValueError, match="data.silence='some'; valid: balanced, tfds"):
        A.read_speechcommands(v2, "12", silence="some")
    with pytest.raises(FileNotFoundError, match="task.test_root=.*nowhere not found"):
        A.read_speechcommands(v2, "12", test_root=tmp_path / "nowhere")


def test_noise_augmentation_is_ast_noise_then_time_roll():
    fb = torch.randn(60, 16) * 3
    g = torch.Generator().manual_seed(0)
    shifts = []
    for _ in range(300):
        out = add_noise_and_shift(fb, generator=g)
        ok = [s for s in range(-15, 16) if ((d := torch.roll(out, -s, 0) - fb) >= 0).all() and (d < 0.1).all()]
        assert len(ok) == 1  # exactly one roll undoes it, leaving non-negative noise below 0.1
        shifts.append(ok[0])
    assert min(shifts) == -10 and max(shifts) == 9  # randint(-10, 10): [-10, 9]
    front = FrontEnd(max_length=60, mean=0.0, std=0.5, noise=True)
    raw = torch.randn(60, 128)
    assert front.finish(raw, train=False).equal(raw)  # evaluation: untouched
    assert not front.finish(raw, train=True).equal(raw)
