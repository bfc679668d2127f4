"""Audio datasets for AST: ESC-50, Speech Commands v2 (35 / 12 classes), a folder per class, and an
embedded generated set in the ESC-50 release layout (no downloads).

Protocols:

* **ESC-50** (Piczak, ACM MM 2015; ``meta/esc50.csv`` + ``audio/``): 5 predefined folds. For test fold k,
  :func:`esc50_split` trains on the other four (original AST) or, with ``val_fold='next'``, on three with
  fold k+1 (mod 5) for validation (PETL-AST). Labels are the ``target`` column (same order as AST's
  ``category`` index file).
* **Speech Commands v2** (Warden 2018): one folder per word; ``validation_list.txt`` and ``testing_list.txt``
  name the val/test files, train is every other word file; ``_background_noise_`` is excluded. Classes are
  the word folders in sorted order (AST's own index order differs, which only permutes the labels).
  ``speechcommands12``: yes no up down left right on off stop go + ``_unknown_`` (all other words) +
  ``_silence_`` (1 s pieces cut from ``_background_noise_``; see :func:`silence_split`). With
  ``test_root`` the test split is the official separate 12-class archive (``speech_commands_test_set_v0.02``:
  one folder per class including ``_silence_`` and ``_unknown_``, 4,890 clips) and ``testing_list.txt``
  clips are used nowhere (as TFDS ``speech_commands``); without it, the v2 testing list + silence pieces.
* **folder**: ``root/<class>/*.wav``, or ``root/{train,val,test}/<class>/*.wav``.
* **multilabel**: ``root/labels.csv`` (or ``labels.tsv``) with columns ``file,labels[,split]``: ``file``
  relative to ``root`` (an absolute path or one with ``..`` is refused: a list is data), ``labels`` the
  clip's class names separated by ``;`` (an AudioSet-style label list), ``split`` train / val / test (without it, a fixed 80/10/10 shuffle); ``root/classes.txt`` (one
  name a line) fixes the class order, else the sorted names. Targets are multi-hot vectors.

Every reader gives ``(path, label)`` lists (label: a class index, or a tuple of indices for multi-label); :class:`AudioClips` turns them into fbanks through
:class:`zoo.audio.FrontEnd`. A bad file raises an error naming its path (``bad_files=raise``), or is
reported and replaced by the next clip (``bad_files=skip``).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tasks.data.overlap import check_disjoint
from tasks.data.paths import check_inside
from tasks.data.staging import staging_dir
from tasks.options import FRACTION, LOADER, Int, Real, check_options
from tasks.protocol import FROM_TRAIN, overlaps
from zoo.audio import NORM_STATS, AudioDecodeError, FbankArgs, FrontEnd, dataset_stats, mixup_waveforms
from zoo.reading import read_text

log = logging.getLogger("tasks.audio")

ESC50_COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")
SC12_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
AUDIO_EXT = (".wav", ".flac", ".ogg")


# ------------------------------------------------------------------------------ ESC-50
def read_esc50(root: str | os.PathLike) -> list[dict]:
    """Rows of ``meta/esc50.csv`` with ``path`` (``audio/<filename>``), ``fold`` and ``target`` as ints."""
    root = Path(root)
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file():
        raise FileNotFoundError(
            f"{meta} not found: task.data_dir must be an ESC-50 release folder (ESC-50-master/ with "
            f"meta/esc50.csv and audio/*.wav; get it from https://github.com/karolpiczak/ESC-50, "
            f"archive/master.zip), or use task.dataset=generated")
    with io.StringIO(read_text(meta, "CSV file"), newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("filename", "fold", "target") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{meta}: missing column(s) {missing}; expected {', '.join(ESC50_COLUMNS)}")
        rows = []
        for i, r in enumerate(reader, start=2):
            name = check_inside((r["filename"] or "").strip(), f"{meta}, line {i}", root / "audio")
            try:
                rows.append({**r, "path": str(root / "audio" / name), "fold": int(r["fold"]), "target": int(r["target"])})
            except (ValueError, TypeError):
                raise ValueError(f"{meta}, line {i}: fold and target must be integers, got {r['fold']!r}, {r['target']!r}") from None
            if not 1 <= rows[-1]["fold"] <= 5:  # a 6th fold would only ever train, and the recorded protocol
                # (split_info: the 5-fold cycle) would name another validation fold than the one used
                raise ValueError(f"{meta}, line {i}: fold {rows[-1]['fold']}; the ESC-50 layout has folds 1..5")
            if rows[-1]["target"] < 0:
                raise ValueError(f"{meta}, line {i}: target {rows[-1]['target']} is negative; targets are class indices 0..K-1")
    if not rows:
        raise ValueError(f"{meta} lists no clips")
    return rows


VAL_FOLDS = ("none", "next", "previous")


def validation_fold(folds: list[int], test_fold: int, val_fold: str) -> int:
    """The fold that validates when ``test_fold`` tests: ``none`` the test fold itself (AST's original recipe,
    whose epoch is then chosen on the 5-fold average: :func:`tasks.metrics.audio.summarize_folds`), ``previous``
    fold k−1 (PETL-AST's ``main.py``: ``fold_idx - 1``, fold 5 for fold 1), ``next`` fold k+1."""
    if val_fold not in VAL_FOLDS:
        raise ValueError(f"val_fold={val_fold!r}; valid: none (AST: validate on the test fold), previous (PETL-AST: "
                         f"fold k-1), next (fold k+1)")
    step = {"none": 0, "next": 1, "previous": -1}[val_fold]
    return folds[(folds.index(test_fold) + step) % len(folds)]


def esc50_split(rows: list[dict], test_fold: int, val_fold: str = "none") -> dict[str, list[tuple[str, int]]]:
    """Fold ``test_fold`` (1..5) for test; ``val_fold='none'`` trains on the other folds and validates on
    the test fold (AST), ``'next'`` holds out fold ``test_fold % 5 + 1`` for validation (PETL-AST)."""
    folds = sorted({r["fold"] for r in rows})
    if test_fold not in folds:
        raise ValueError(f"task.fold={test_fold}: the dataset's folds are {folds}")
    vf = validation_fold(folds, test_fold, val_fold)
    pick = lambda keep: [(r["path"], r["target"]) for r in rows if keep(r["fold"])]  # noqa: E731
    return {
        "train": pick(lambda f: f != test_fold and f != vf),
        "val": pick(lambda f: f == vf),
        "test": pick(lambda f: f == test_fold),
    }


def esc50_classes(rows: list[dict], meta: str | os.PathLike = "meta/esc50.csv") -> list[str]:
    """Class names by target; one target named two ways, or fewer than two classes, is refused."""
    by_target: dict[int, str] = {}
    for r in rows:
        name = r.get("category") or str(r["target"])
        if by_target.setdefault(r["target"], name) != name:
            raise ValueError(f"{meta}: target {r['target']} is named both {by_target[r['target']]!r} and {name!r}; "
                             "one class name per target")
    need_two_classes(sorted(set(by_target.values())), meta)
    n = max(by_target) + 1
    return [by_target.get(i, str(i)) for i in range(n)]


def need_two_classes(classes: list[str], where) -> None:
    if len(classes) < 2:
        raise ValueError(f"{where}: {len(classes)} class ({', '.join(classes) or 'none'}); a classifier needs at "
                         "least two classes")


# ------------------------------------------------------------------------------ Speech Commands
def _read_list(path: Path) -> set[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: Speech Commands v2 needs validation_list.txt and testing_list.txt")
    return {line.strip() for line in read_text(path, "list file").splitlines() if line.strip()}


SC12_CLASSES = (*SC12_WORDS, "_unknown_", "_silence_")
SILENCE_MODES = ("balanced", "tfds")


def read_speechcommands(root: str | os.PathLike, classes: str = "35", test_root: str | os.PathLike | None = None,
                        silence: str = "balanced") -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """Train/val/test ``(path, label)`` lists by the official lists, and the class names.

    ``classes='12'``: the ten command words, ``_unknown_`` (every other word) and ``_silence_`` pieces of
    ``_background_noise_`` chosen by ``silence`` (:func:`silence_split`). ``test_root``: the official
    12-class test archive replaces the test split (:func:`read_sc12_test_archive`).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Speech Commands folder not found: {root}; expected speech_commands_v0.02 (<word>/*.wav, "
                                f"validation_list.txt, testing_list.txt) from "
                                f"http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz")
    if classes not in ("35", "12"):
        raise ValueError(f"Speech Commands classes={classes!r}; valid: 35, 12")
    if test_root and classes != "12":
        raise ValueError("task.test_root is the separate 12-class test archive: use it with task.dataset=speechcommands12")
    if silence not in SILENCE_MODES:
        raise ValueError(f"data.silence={silence!r}; valid: {', '.join(SILENCE_MODES)}")
    val, test = _read_list(root / "validation_list.txt"), _read_list(root / "testing_list.txt")
    words = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not words:
        raise ValueError(f"{root} has no word folders; expected the speech_commands_v0.02 layout (<word>/<file>.wav)")
    if classes == "35":
        names = words
        label = {w: i for i, w in enumerate(words)}.__getitem__
    else:
        names = list(SC12_CLASSES)
        label = lambda w: SC12_WORDS.index(w) if w in SC12_WORDS else 10  # noqa: E731
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for w in words:
        for f in sorted((root / w).iterdir()):
            if f.suffix.lower() not in AUDIO_EXT:
                continue
            rel = f"{w}/{f.name}"
            split = "val" if rel in val else "test" if rel in test else "train"
            splits[split].append((str(f), label(w)))
    if classes == "12":
        if silence == "tfds" and not test_root:  # its test split would have no _silence_ clip: class 11 untested
            raise ValueError("data.silence=tfds leaves the test split without _silence_ clips (TFDS takes them from "
                             "the official test archive): set task.test_root=<speech_commands_test_set_v0.02> or "
                             "use data.silence=balanced")
        per_word = {k: len(v) // len(words) for k, v in splits.items()}
        for split, pieces in silence_split(root, silence, per_word).items():
            splits[split] += [(p, 11) for p in pieces]
        if test_root:
            train_rel = {"/".join(Path(p).parts[-2:]) for p, _ in splits["train"] + splits["val"]}
            archive = read_sc12_test_archive(test_root)
            shared = [p for p, _ in archive if "/".join(Path(p).parts[-2:]) in train_rel]
            if shared:
                raise ValueError(f"{test_root}: {len(shared)} test clip(s) (e.g. {shared[0]}) are also training or validation "
                                 f"clips of {root}; task.test_root must be speech_commands_test_set_v0.02, not the training archive")
            splits["test"] = archive
    return splits, names


def read_sc12_test_archive(root: str | os.PathLike) -> list[tuple[str, int]]:
    """The official 12-class test set (``speech_commands_test_set_v0.02``): ``<class>/*.wav`` with the
    folders yes no up down left right on off stop go ``_unknown_`` ``_silence_`` (1 s clips, 16 kHz)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"task.test_root={root} not found: expected speech_commands_test_set_v0.02 (class folders)")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [f for f in folders if f not in SC12_CLASSES]
    if unknown:
        raise ValueError(f"{root}: folder(s) {unknown} are not 12-class labels; valid: {', '.join(SC12_CLASSES)}")
    missing = [c for c in SC12_CLASSES if c not in folders]
    if missing:
        raise ValueError(f"{root}: class folder(s) {missing} missing; the 12-class test archive has all of {', '.join(SC12_CLASSES)}")
    items = [(str(f), SC12_CLASSES.index(c)) for c in SC12_CLASSES for f in sorted((root / c).iterdir())
             if f.suffix.lower() in AUDIO_EXT]
    if not items:
        raise ValueError(f"{root}: no audio clips in the class folders")
    return items


def silence_pieces(root: Path, hop: float = 1.0) -> dict[str, list[str]]:
    """``{noise file name: ["<file>#<start s>", ...]}``: every 1 s piece of each ``_background_noise_`` clip,
    starting every ``hop`` seconds (read by :class:`AudioClips`)."""
    noise = root / "_background_noise_"
    if not noise.is_dir():
        raise FileNotFoundError(f"{noise} not found: the 12-class variant cuts _silence_ clips from it")
    import soundfile as sf

    out = {}
    for f in sorted(noise.glob("*.wav")):
        info = sf.info(str(f))
        seconds = info.frames / info.samplerate
        n = int(math.floor((seconds - 1.0) / hop + 1e-9)) + 1 if seconds >= 1.0 else 0
        out[f.name] = [f"{f}#{k * hop:g}" for k in range(n)]
    if not any(out.values()):
        raise ValueError(f"{noise}: no clip of at least 1 s to cut _silence_ pieces from")
    return out


def silence_split(root: Path, mode: str = "balanced", per_word: dict[str, int] | None = None) -> dict[str, list[str]]:
    """The ``_silence_`` pieces of each split; deterministic (no random draw), disjoint between splits.

    * ``balanced`` (a reconstruction, the sources do not fix it): non-overlapping 1 s pieces, piece
      ``j`` (over all noise files in name order) goes to train if ``j mod 10 < 8``, val if 8, test if 9;
      each split keeps its first ``per_word[split]`` pieces (as many as an average word has there).
    * ``tfds`` (TFDS ``speech_commands``, reconstructed from its split sizes 85,511 / 10,102): 1 s pieces
      every 0.5 s, ``running_tap.wav`` to validation, the other noise files to train, none to test
      (the official test archive brings its own ``_silence_`` clips). Pieces overlap within a split only.
    """
    if mode == "tfds":
        files = silence_pieces(root, hop=0.5)
        val = files.get("running_tap.wav", [])
        return {"train": [p for n, ps in files.items() if n != "running_tap.wav" for p in ps], "val": val, "test": []}
    if mode != "balanced":
        raise ValueError(f"data.silence={mode!r}; valid: {', '.join(SILENCE_MODES)}")
    pieces = [p for ps in silence_pieces(root).values() for p in ps]
    per_word = per_word or {}
    out = {}
    for split, keep in (("train", range(8)), ("val", (8,)), ("test", (9,))):
        n = max(1, per_word.get(split, 1))
        out[split] = [p for j, p in enumerate(pieces) if j % 10 in keep][:n]
    return out


# ------------------------------------------------------------------------------ folder per class
def read_folder(root: str | os.PathLike) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """``root/<class>/*`` (split 80/10/10 by a fixed shuffle) or ``root/{train,val,test}/<class>/*``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder not found: {root}")
    if (root / "train").is_dir():
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        splits = {}
        for split in ("train", "val", "test"):
            d = root / split
            if not d.is_dir():
                splits[split] = []
                continue
            extra = sorted(p.name for p in d.iterdir() if p.is_dir() and p.name not in classes)
            if extra:
                raise ValueError(f"{d}: class folder(s) {extra} are not training classes {classes}; add them to train/ or remove them")
            splits[split] = [(str(f), classes.index(c)) for c in classes if (d / c).is_dir()
                             for f in sorted((d / c).iterdir()) if f.suffix.lower() in AUDIO_EXT]
        need_two_classes(classes, root / "train")
        if not splits["val"]:
            splits["val"] = splits["test"]
        check_disjoint({k: [f for f, _ in v] for k, v in splits.items()}, str(root))
        return splits, classes
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class folders; expected <root>/<class>/*.wav")
    need_two_classes(classes, root)
    items = [(str(f), i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.suffix.lower() in AUDIO_EXT]
    splits = split_80_10_10(items)
    check_disjoint({k: [f for f, _ in v] for k, v in splits.items()}, str(root))
    return splits, classes


def split_80_10_10(items: list) -> dict[str, list]:
    """A fixed shuffle (seed 0) cut 80 / 10 / 10 into train / val / test, for data without splits."""
    items = list(items)
    random.Random(0).shuffle(items)
    a, b = int(0.8 * len(items)), int(0.9 * len(items))
    return {"train": items[:a], "val": items[a:b], "test": items[b:]}


# ------------------------------------------------------------------------------ multi-label list
MULTILABEL_FILES = ("labels.csv", "labels.tsv")


def parse_labels(text: str, sep: str = ";") -> list[str]:
    """``"dog; bark;;"`` → ``["dog", "bark"]`` (order kept, blanks and duplicates dropped)."""
    out: list[str] = []
    for name in (t.strip() for t in text.split(sep)):
        if name and name not in out:
            out.append(name)
    return out


def multi_hot(labels, num_classes: int) -> torch.Tensor:
    """A float ``[num_classes]`` vector with 1 at each class index of ``labels`` (an int or indices)."""
    t = torch.zeros(num_classes)
    t[list(labels) if isinstance(labels, (tuple, list)) else [labels]] = 1.0
    return t


def read_multilabel(root: str | os.PathLike) -> tuple[dict[str, list[tuple[str, tuple[int, ...]]]], list[str]]:
    """Splits of ``(path, class indices)`` and the class names from ``root/labels.csv`` (see the module doc)."""
    root = Path(root)
    found = [root / n for n in MULTILABEL_FILES if (root / n).is_file()]
    if not found:
        raise FileNotFoundError(f"{root / MULTILABEL_FILES[0]} not found: task.dataset=multilabel needs a list with "
                                f"the columns file,labels[,split] (labels separated by ';'), e.g. 'a.wav,dog;bark,train'")
    meta = found[0]
    with io.StringIO(read_text(meta, "CSV file"), newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if meta.suffix == ".tsv" else ",")
        cols = reader.fieldnames or []
        if "file" not in cols or "labels" not in cols:
            raise ValueError(f"{meta}: columns {cols}; expected file,labels[,split]")
        rows, seen = [], {}
        for i, r in enumerate(reader, start=2):
            names = parse_labels(r["labels"] or "")
            if not names:
                raise ValueError(f"{meta}, line {i}: {r['file']!r} has no labels; give at least one class name")
            split = (r.get("split") or "").strip()
            if "split" in cols and split not in ("train", "val", "test"):
                raise ValueError(f"{meta}, line {i}: split {split!r}; valid: train, val, test")
            path = check_inside((r["file"] or "").strip(), f"{meta}, line {i}", root)
            if (path, split) in seen:  # it used to count twice; across splits, check_disjoint below names the splits
                raise ValueError(f"{meta}, line {i}: {path!r} is listed again (first on line {seen[path, split]}); "
                                 f"one line per clip, with all its labels")
            seen[path, split] = i
            rows.append((str(root / path), names, split, i))
    if not rows:
        raise ValueError(f"{meta} lists no clips")
    class_file = root / "classes.txt"
    if class_file.is_file():
        classes = [c.strip() for c in read_text(class_file, "class list").splitlines() if c.strip()]
        for path, names, _, i in rows:
            bad = [n for n in names if n not in classes]
            if bad:
                raise ValueError(f"{meta}, line {i}: label(s) {bad} are not in {class_file} ({', '.join(classes[:8])}"
                                 f"{', ...' if len(classes) > 8 else ''}); add them there or fix the line")
    else:
        classes = sorted({n for _, names, _, _ in rows for n in names})
    index = {c: k for k, c in enumerate(classes)}
    items = [(path, tuple(index[n] for n in names), split) for path, names, split, _ in rows]
    if "split" in cols:
        splits = {k: [(p, y) for p, y, s in items if s == k] for k in ("train", "val", "test")}
    else:
        splits = split_80_10_10([(p, y) for p, y, _ in items])
    if not splits["val"]:
        splits["val"] = splits["test"]
    check_disjoint({k: [f for f, _ in v] for k, v in splits.items()}, str(meta))
    return splits, classes


# ------------------------------------------------------------------------------ dataset
class AudioClips(Dataset):
    """``(fbank [T, F], label)`` from ``(path, label)`` pairs; ``path#s`` reads the 1 s piece starting at s seconds.

    ``mixup`` (training): with that probability a random second clip is mixed in at waveform level
    (λ ~ Beta(10, 10)) and the label becomes a soft vector, λ on clip 1's classes and 1 − λ on clip 2's
    (summed where they share one; AST's dataloader, which serves its multi-label AudioSet recipe too).
    With mixup on, or ``multilabel``, every label is a ``num_classes`` float vector (multi-hot without mixup).
    """

    def __init__(self, items: list[tuple[str, int | tuple[int, ...]]], front: FrontEnd, num_classes: int,
                 train: bool = False, mixup: float = 0.0, bad_files: str = "raise", multilabel: bool = False):
        if bad_files not in ("raise", "skip"):
            raise ValueError(f"bad_files={bad_files!r}; valid: raise, skip")
        if not items:
            raise ValueError("no audio clips in this split")
        self.items, self.front, self.num_classes = list(items), front, num_classes
        self.train, self.mixup, self.bad_files, self.multilabel = train, float(mixup), bad_files, multilabel
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.items)

    def _wave(self, path: str) -> torch.Tensor:
        if "#" in path:
            f, start = path.rsplit("#", 1)
            w = self.front.wave(f)
            sr = self.front.args.sample_rate
            a = int(round(float(start) * sr))
            return w[:, a:a + sr]
        return self.front.wave(path)

    def _raw(self, path: str) -> torch.Tensor:
        if "#" in path:
            from zoo.audio import fbank

            return fbank(self._wave(path), self.front.args, source=path)
        return self.front.load(path)

    def _one(self, i: int):
        path, y = self.items[i]
        if self.train and self.mixup > 0 and random.random() < self.mixup:
            from zoo.audio import fbank

            j = random.randrange(len(self.items))
            lam = float(np.random.beta(10, 10))
            mix = mixup_waveforms(self._wave(path), self._wave(self.items[j][0]), lam)
            x = self.front.finish(fbank(mix, self.front.args, source=path), train=True)
            return x, lam * multi_hot(y, self.num_classes) + (1 - lam) * multi_hot(self.items[j][1], self.num_classes)
        x = self.front.finish(self._raw(path), train=self.train)
        if self.multilabel or (self.train and self.mixup > 0):
            return x, multi_hot(y, self.num_classes)
        return x, y

    def __getitem__(self, i: int):
        for k in range(len(self.items)):
            j = (i + k) % len(self.items)
            try:
                return self._one(j)
            except (AudioDecodeError, FileNotFoundError) as e:
                if self.bad_files == "raise":
                    raise type(e)(f"{e} (task.bad_files=skip reports and skips bad clips)") from None
                if self.items[j][0] not in self.skipped:
                    self.skipped.append(self.items[j][0])
                    log.warning("audio: skipped bad clip %s: %s", self.items[j][0], e)
        raise ValueError("every clip in this split failed to load")


# ------------------------------------------------------------------------------ generated set
GENERATED_CLASSES = (
    "low_tone", "high_tone", "chirp_up", "chirp_down", "am_tone", "fm_tone",
    "noise_burst", "click_train", "harmonic_stack", "two_tone",
)
# a different generated task (pitch / timbre / rhythm) for pretraining the demo AST
UPSTREAM_CLASSES = (
    "square_wave", "sawtooth", "tone_steps_up", "tone_steps_down", "lowpass_noise", "highpass_noise",
    "slow_pulses", "fast_pulses", "octave_pair", "vibrato", "tremolo_noise", "descending_glide",
)


def _synth(kind: str, sr: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """One clip of ``kind`` with random pitch, timing and level over faint pink-ish noise."""
    t = np.arange(n) / sr
    dur = rng.uniform(0.35, 0.8) * n / sr
    t0 = rng.uniform(0, n / sr - dur)
    env = ((t >= t0) & (t < t0 + dur)).astype(np.float64)
    env *= np.sin(np.clip((t - t0) / dur, 0, 1) * np.pi) ** 0.3
    f = rng.uniform(0.85, 1.15)
    if kind == "low_tone":
        x = np.sin(2 * np.pi * 300 * f * t)
    elif kind == "high_tone":
        x = np.sin(2 * np.pi * 2400 * f * t)
    elif kind in ("chirp_up", "chirp_down"):
        f0, f1 = (400 * f, 3600 * f) if kind == "chirp_up" else (3600 * f, 400 * f)
        tau = np.clip(t - t0, 0, dur)
        x = np.sin(2 * np.pi * (f0 * tau + (f1 - f0) * tau ** 2 / (2 * dur)))
    elif kind == "am_tone":
        x = np.sin(2 * np.pi * 1000 * f * t) * (1 + 0.9 * np.sin(2 * np.pi * rng.uniform(6, 12) * t))
    elif kind == "fm_tone":
        x = np.sin(2 * np.pi * 1000 * f * t + 8 * np.sin(2 * np.pi * rng.uniform(4, 8) * t))
    elif kind == "noise_burst":
        x = rng.standard_normal(n)
    elif kind == "click_train":
        x = np.zeros(n)
        period = int(sr / rng.uniform(15, 30))
        x[::period] = 1.0
        x = np.convolve(x, np.hanning(16), mode="same")
    elif kind == "harmonic_stack":
        x = sum(np.sin(2 * np.pi * 220 * f * h * t) / h for h in range(1, 7))
    elif kind == "two_tone":
        x = np.sin(2 * np.pi * 700 * f * t) + np.sin(2 * np.pi * 1900 * f * t)
    elif kind == "square_wave":
        x = np.sign(np.sin(2 * np.pi * 440 * f * t))
    elif kind == "sawtooth":
        x = 2 * ((440 * f * t) % 1.0) - 1
    elif kind in ("tone_steps_up", "tone_steps_down"):
        steps = np.array([500, 800, 1300, 2100]) * f
        idx = np.clip(((t - t0) / dur * 4).astype(int), 0, 3)
        x = np.sin(2 * np.pi * np.cumsum(steps[idx if kind == "tone_steps_up" else 3 - idx]) / sr)
    elif kind in ("lowpass_noise", "highpass_noise"):
        w = rng.standard_normal(n)
        k = np.ones(8) / 8
        low = np.convolve(w, k, mode="same")
        x = low if kind == "lowpass_noise" else w - low
    elif kind in ("slow_pulses", "fast_pulses"):
        rate = rng.uniform(3, 5) if kind == "slow_pulses" else rng.uniform(12, 16)
        x = np.sin(2 * np.pi * 900 * f * t) * (np.sin(2 * np.pi * rate * t) > 0.6)
    elif kind == "octave_pair":
        x = np.sin(2 * np.pi * 600 * f * t) + np.sin(2 * np.pi * 1200 * f * t)
    elif kind == "vibrato":
        x = np.sin(2 * np.pi * 1500 * f * t + 30 * np.sin(2 * np.pi * 5 * t))
    elif kind == "tremolo_noise":
        x = rng.standard_normal(n) * (1 + np.sin(2 * np.pi * rng.uniform(4, 8) * t))
    elif kind == "descending_glide":
        tau = np.clip(t - t0, 0, dur)
        x = np.sin(2 * np.pi * 2000 * f * (1 - np.exp(-tau * 3)) / 3)
    else:
        raise ValueError(kind)
    x = env * x / (np.abs(x).max() + 1e-9) * rng.uniform(0.2, 0.6)
    return (x + 0.01 * rng.standard_normal(n)).astype(np.float32)


GENERATED_STAMP = ".generated.json"  # the options a generated set was written with


def _generated_is_current(root: Path, done: Path, settings: str) -> bool:
    """Whether the set at ``root`` (complete when ``done`` exists) can be reused: data without our stamp
    (real data, or written before stamps) is read as is; ours with other options is generated again."""
    if not done.is_file():
        return False
    stamp = root / GENERATED_STAMP
    if not stamp.is_file() or stamp.read_text() == settings:
        return True
    log.warning("audio: %s was generated with other options (%s); generating it again with %s",
                root, stamp.read_text(), settings)
    return False


def _install_generated(tmp: Path, root: Path, done: Path, settings: str) -> None:
    """Stamp the complete set in ``tmp`` and move it to ``root`` (swapping out our older set)."""
    (tmp / GENERATED_STAMP).write_text(settings)
    if (root / GENERATED_STAMP).is_file():
        old = staging_dir(root.parent, f".{root.name}-old-")
        os.replace(root, old / root.name)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        if not done.is_file():
            raise


def write_generated(root: str | os.PathLike, clips_per_class: int = 20, seconds: float = 1.0, sample_rate: int = 16000,
                    classes: tuple[str, ...] = GENERATED_CLASSES, seed: int = 0) -> Path:
    """Write the generated set in the ESC-50 release layout (``audio/{fold}-{id}-{take}-{target}.wav``,
    ``meta/esc50.csv``; ``clips_per_class / 5`` clips per class and fold). Written once, atomically
    (a temporary folder renamed into place); an existing complete set is reused."""
    import soundfile as sf

    root = Path(root)
    settings = json.dumps({"clips_per_class": clips_per_class, "seconds": seconds, "sample_rate": sample_rate,
                           "classes": list(classes), "seed": seed}, sort_keys=True)
    if _generated_is_current(root, root / "meta" / "esc50.csv", settings):
        return root
    if clips_per_class % 5:
        raise ValueError(f"clips_per_class={clips_per_class} must be a multiple of 5 (5 folds)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(root.parent, f".{root.name}-")
    try:
        (tmp / "audio").mkdir()
        (tmp / "meta").mkdir()
        rng = np.random.default_rng(seed)
        n = int(seconds * sample_rate)
        rows = []
        for target, kind in enumerate(classes):
            for c in range(clips_per_class):
                fold = c % 5 + 1
                clip_id = 100000 + target * 1000 + c
                name = f"{fold}-{clip_id}-A-{target}.wav"
                sf.write(str(tmp / "audio" / name), _synth(kind, sample_rate, n, rng), sample_rate, subtype="PCM_16")
                rows.append([name, fold, target, kind, "False", clip_id, "A"])
        rows.sort(key=lambda r: r[0])
        with open(tmp / "meta" / "esc50.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(ESC50_COLUMNS)
            w.writerows(rows)
        _install_generated(tmp, root, root / "meta" / "esc50.csv", settings)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def write_generated_multilabel(root: str | os.PathLike, clips: int = 200, seconds: float = 1.0, sample_rate: int = 16000,
                               classes: tuple[str, ...] = GENERATED_CLASSES, seed: int = 2, two_share: float = 0.7) -> Path:
    """Write a generated multi-label set in the ``multilabel`` layout: ``audio/<n>.wav`` and ``labels.csv``
    (``file,labels,split``; 60/20/20 by clip index) plus ``classes.txt``. Each clip is the sum of two sounds
    of different :data:`GENERATED_CLASSES` kinds (probability ``two_share``) or one sound, so its labels
    are one or two class names. Written once, atomically; an existing set is reused."""
    import soundfile as sf

    root = Path(root)
    settings = json.dumps({"clips": clips, "seconds": seconds, "sample_rate": sample_rate, "classes": list(classes),
                           "seed": seed, "two_share": two_share}, sort_keys=True)
    if _generated_is_current(root, root / "labels.csv", settings):
        return root
    if clips < 5:
        raise ValueError(f"clips={clips}: need at least 5 (3 train / 1 val / 1 test)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(root.parent, f".{root.name}-")
    try:
        (tmp / "audio").mkdir()
        rng = np.random.default_rng(seed)
        n = int(seconds * sample_rate)
        rows = []
        for c in range(clips):
            k = 2 if rng.random() < two_share else 1
            kinds = sorted(rng.choice(len(classes), size=k, replace=False).tolist())
            x = sum(_synth(classes[t], sample_rate, n, rng) for t in kinds)
            x = (x / max(1.0, float(np.abs(x).max()) / 0.9)).astype(np.float32)
            name = f"audio/{c:05d}.wav"
            sf.write(str(tmp / name), x, sample_rate, subtype="PCM_16")
            split = ("train", "train", "train", "val", "test")[c % 5]
            rows.append([name, ";".join(classes[t] for t in kinds), split])
        (tmp / "classes.txt").write_text("\n".join(classes) + "\n")
        with open(tmp / "labels.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "labels", "split"])
            w.writerows(rows)
        _install_generated(tmp, root, root / "labels.csv", settings)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def seconds_to_frames(seconds: float, frame_shift_ms: float = 10.0, frame_length_ms: float = 25.0) -> int:
    """Kaldi frames (snip_edges) in a clip of ``seconds``."""
    return 1 + int(math.floor((seconds * 1000 - frame_length_ms) / frame_shift_ms))


# ------------------------------------------------------------------------------ Lightning DataModule
ESC50_LAYOUT = ("generated", "generated_upstream", "esc50")
DATASETS = ("generated", "generated_upstream", "esc50", "speechcommands", "speechcommands12", "folder",
            "generated_multilabel", "multilabel")
MULTILABEL_DATASETS = ("generated_multilabel", "multilabel")
# the fbank statistics the AST recipes use; others are computed from the training split
PUBLISHED_STATS = {"esc50": "esc50", "speechcommands": "speechcommands", "speechcommands12": "speechcommands"}


def read_dataset(dataset: str, root: str | os.PathLike, fold: int = 1, val_fold: str = "none",
                 generate: bool = True, clips_per_class: int = 20, test_root: str | os.PathLike | None = None,
                 silence: str = "balanced") -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """``(splits, class names)`` of ``dataset`` at ``root`` (for ESC-50-layout sets: test fold ``fold``)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown audio dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if test_root and dataset != "speechcommands12":
        raise ValueError(f"task.test_root is the separate 12-class Speech Commands test archive; task.dataset={dataset} "
                         f"does not read it (use task.dataset=speechcommands12, or task.test_root=null)")
    if dataset in MULTILABEL_DATASETS:
        if dataset == "generated_multilabel" and generate:
            write_generated_multilabel(root, clips=clips_per_class * len(GENERATED_CLASSES))
        return read_multilabel(root)
    if dataset in ("generated", "generated_upstream", "esc50"):
        if dataset != "esc50" and generate:
            classes = UPSTREAM_CLASSES if dataset == "generated_upstream" else GENERATED_CLASSES
            write_generated(root, clips_per_class=clips_per_class, classes=classes, seed=1 if dataset == "generated_upstream" else 0)
        rows = read_esc50(root)
        return esc50_split(rows, int(fold), val_fold), esc50_classes(rows, Path(root) / "meta" / "esc50.csv")
    if dataset.startswith("speechcommands"):
        return read_speechcommands(root, "12" if dataset.endswith("12") else "35", test_root, silence)
    return read_folder(root)


def train_stats(items: list, front: FrontEnd, bad_files: str, root, target_length: int | None = None) -> tuple[float, float]:
    """The fbank ``(mean, std)`` of the training clips (``path#s`` silence pieces left out, as they
    are cut from noise files); ``bad_files=skip`` skips unreadable clips here too, with a warning."""
    if bad_files not in ("raise", "skip"):
        raise ValueError(f"bad_files={bad_files!r}; valid: raise, skip")
    files = [p for p, _ in items if "#" not in p]
    if not files:
        raise ValueError(f"{root}: the training split has no clips to compute the fbank statistics from "
                         f"({len(items)} items, none a whole file); add clips, or give data.mean and data.std")
    skipped: list[str] = []

    def loaded():  # streamed: dataset_stats batches them, the whole split is never in memory
        for p in files:
            try:
                yield front.load(p)
            except (AudioDecodeError, FileNotFoundError) as e:
                if bad_files == "raise":
                    raise type(e)(f"{e} (task.bad_files=skip reports and skips bad clips)") from None
                skipped.append(p)
                log.warning("audio: skipped bad clip %s: %s", p, e)

    try:
        return dataset_stats(loaded(), target_length=target_length)
    except ValueError:
        if len(skipped) == len(files):
            raise ValueError(f"{root}: all {len(files)} training clips failed to load (bad_files=skip skipped them); "
                             "no clips to compute the fbank statistics from") from None
        raise


# every numeric option of the audio data config, checked in AudioDataModule.__init__
OPTIONS = {**LOADER, "fold": Int(1), "max_length": Int(1), "num_mel_bins": Int(1), "sample_rate": Int(1),
           "mean": Real(optional=True), "std": Real(0.0, lo_open=True, optional=True), "freqm": Int(0),
           "timem": Int(0), "mixup": FRACTION, "generate_clips": Int(1), "num_classes": Int(2, optional=True)}


class AudioDataModule(L.LightningDataModule):
    """Fbank batches ``[B, max_length, num_mel_bins]`` for AST; the front end runs in the workers."""

    def __init__(self, dataset: str = "generated", root: str = "data/audio/generated", fold: int = 1,
                 val_fold: str = "none", max_length: int = 100, num_mel_bins: int = 128,
                 sample_rate: int = 16000, mean: float | None = None, std: float | None = None,
                 freqm: int = 0, timem: int = 0, mixup: float = 0.0, batch_size: int = 32,
                 eval_batch_size: int = 64, num_workers: int = 0, cache_dir: str | None = None,
                 bad_files: str = "raise", generate: bool = True, generate_clips: int = 20, seed: int = 0,
                 num_classes: int | None = None, multilabel: bool = False, noise: bool = False,
                 test_root: str | None = None, silence: str = "balanced", specaug_after_norm: bool = False):
        super().__init__()
        check_options("data", locals(), OPTIONS)
        if not isinstance(specaug_after_norm, bool):
            raise ValueError(f"data.specaug_after_norm={specaug_after_norm!r}; valid: true, false")
        self.seed = seed
        if dataset in MULTILABEL_DATASETS and not multilabel:
            raise ValueError(f"task.dataset={dataset} has multi-label targets: use task=audio_multilabel "
                             f"(BCE loss, mAP), not task=audio")
        self.multilabel = bool(multilabel)
        self.splits, self.classes = read_dataset(dataset, root, fold, val_fold, generate, generate_clips, test_root, silence)
        self.num_classes = len(self.classes)
        if num_classes is not None and int(num_classes) != self.num_classes:
            raise ValueError(f"task.num_classes={num_classes}, but {dataset} at {root} has {self.num_classes} classes "
                             f"({', '.join(self.classes[:6])}{', ...' if self.num_classes > 6 else ''}); "
                             f"set task.num_classes={self.num_classes}")
        self.dataset, self.fold, self.val_fold, self.root = dataset, fold, val_fold, root
        args = FbankArgs(sample_rate=sample_rate, num_mel_bins=num_mel_bins)
        self.args, self.max_length = args, max_length
        self.cache_dir = cache_dir
        stats_source = "given"
        if mean is None or std is None:
            if dataset in PUBLISHED_STATS:
                stats_source = PUBLISHED_STATS[dataset]
                mean, std = NORM_STATS[stats_source]
            else:  # from the training split, raw fbanks (cached for training anyway)
                stats_source = FROM_TRAIN
                mean, std = train_stats(self.splits["train"], FrontEnd(max_length, args=args, cache_dir=cache_dir),
                                        bad_files, root, target_length=max_length)
        self.mean, self.std = float(mean), float(std)
        self.normalisation = {"mean": self.mean, "std": self.std, "source": stats_source}
        self.front = lambda train: FrontEnd(max_length, self.mean, self.std, args, freqm if train else 0,
                                            timem if train else 0, cache_dir, noise=noise and train,
                                            specaug_after_norm=specaug_after_norm)
        self.mixup, self.bad_files = float(mixup), bad_files
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.test_set = self.splits["test"] or None  # the runner tests at the end when a test split exists

    @staticmethod
    def check_data(dataset: str = "generated", root: str = "data/audio/generated", fold: int = 1, val_fold: str = "none",
                   generate: bool = True, generate_clips: int = 20, test_root: str | None = None,
                   silence: str = "balanced", **_) -> None:
        """The dataset's lists and folders (no clip decoded): run before any weights are built."""
        read_dataset(dataset, root, fold, val_fold, generate, generate_clips, test_root, silence)

    def preprocessing(self) -> dict:
        """The front end's arguments (recorded in the artifact: ``python -m zoo predict`` rebuilds it)."""
        from dataclasses import asdict

        return {"fbank": {**asdict(self.args), "max_length": self.max_length, "mean": self.mean, "std": self.std}}

    def split_files(self, split: str) -> list[str]:
        """The clip files of ``split`` (``eval.py +predict=DIR``; pieces cut from a longer file are left out)."""
        return [p for p, _ in self.splits[split] if "#" not in p]

    def split_info(self) -> dict:
        """Split names (ESC-50 layouts: the folds), sizes, and whether validation shares clips with test (the
        test fold with ``val_fold=none``; folder and multi-label layouts without a validation split)."""
        overlap = overlaps(self.splits["val"], self.splits["test"])
        if self.dataset in ESC50_LAYOUT:
            vf = validation_fold(list(range(1, 6)), int(self.fold), self.val_fold)
            names = {"train": "other folds", "val": f"fold{vf}", "test": f"fold{self.fold}"}
        else:
            names = {"train": "train", "val": "test" if overlap else "val", "test": "test"}
        return {s: {"name": names[s], "size": len(self.splits[s])} if self.splits[s] else None for s in ("train", "val", "test")} \
            | {"val_overlaps_test": overlap}

    def dataset_for(self, split: str, train: bool = False) -> AudioClips:
        if not self.splits[split]:  # it used to be "no audio clips in this split", naming neither
            raise ValueError(f"{self.dataset} at {self.root}: the {split} split has no clips (a labels.csv split "
                             f"column with no {split!r} row, or an empty {split}/ folder); add some, or use the "
                             f"layout's other split rule")
        return AudioClips(self.splits[split], self.front(train), self.num_classes, train=train,
                          mixup=self.mixup if train else 0.0, bad_files=self.bad_files, multilabel=self.multilabel)

    def _loader(self, split: str, train: bool) -> DataLoader:
        return DataLoader(self.dataset_for(split, train), batch_size=self.batch_size if train else self.eval_batch_size,
                          shuffle=train, num_workers=self.num_workers, drop_last=False,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


def fbank_throughput(paths: list[str], cache_dir: str | os.PathLike, max_length: int = 100) -> dict[str, float]:
    """Clips per second of the front end on ``paths``: decoded + fbank (a fresh cache), then from the cache."""
    import time

    shutil.rmtree(cache_dir, ignore_errors=True)
    front = FrontEnd(max_length, cache_dir=cache_dir)
    out = {}
    for label in ("uncached", "cached"):
        t = time.perf_counter()
        for p in paths:
            front(p)
        out[f"{label}_clips_per_s"] = len(paths) / max(time.perf_counter() - t, 1e-9)
    return out
