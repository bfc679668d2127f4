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
  ``_silence_`` (1 s pieces cut from ``_background_noise_``, as many as an average word has in that split,
  assigned to splits by piece index: a reconstruction, the sources do not fix it; the official separate
  12-class test archive is not read).
* **folder**: ``root/<class>/*.wav``, or ``root/{train,val,test}/<class>/*.wav``.

Every reader gives ``(path, label)`` lists; :class:`AudioClips` turns them into fbanks through
:class:`zoo.audio.FrontEnd`. A bad file raises an error naming its path (``bad_files=raise``), or is
reported and replaced by the next clip (``bad_files=skip``).
"""
from __future__ import annotations

import csv
import logging
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.audio import NORM_STATS, AudioDecodeError, FbankArgs, FrontEnd, dataset_stats, mixup_waveforms

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
            f"meta/esc50.csv and audio/*.wav), or use task.dataset=generated")
    with open(meta, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("filename", "fold", "target") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{meta}: missing column(s) {missing}; expected {', '.join(ESC50_COLUMNS)}")
        rows = []
        for i, r in enumerate(reader, start=2):
            try:
                rows.append({**r, "path": str(root / "audio" / r["filename"]), "fold": int(r["fold"]), "target": int(r["target"])})
            except ValueError:
                raise ValueError(f"{meta}, line {i}: fold and target must be integers, got {r['fold']!r}, {r['target']!r}") from None
    if not rows:
        raise ValueError(f"{meta} lists no clips")
    return rows


def esc50_split(rows: list[dict], test_fold: int, val_fold: str = "none") -> dict[str, list[tuple[str, int]]]:
    """Fold ``test_fold`` (1..5) for test; ``val_fold='none'`` trains on the other folds and validates on
    the test fold (AST), ``'next'`` holds out fold ``test_fold % 5 + 1`` for validation (PETL-AST)."""
    folds = sorted({r["fold"] for r in rows})
    if test_fold not in folds:
        raise ValueError(f"task.fold={test_fold}: the dataset's folds are {folds}")
    if val_fold not in ("none", "next"):
        raise ValueError(f"val_fold={val_fold!r}; valid: none (AST: validate on the test fold), next (PETL-AST)")
    vf = folds[(folds.index(test_fold) + 1) % len(folds)] if val_fold == "next" else test_fold
    pick = lambda keep: [(r["path"], r["target"]) for r in rows if keep(r["fold"])]  # noqa: E731
    return {
        "train": pick(lambda f: f != test_fold and f != vf),
        "val": pick(lambda f: f == vf),
        "test": pick(lambda f: f == test_fold),
    }


def esc50_classes(rows: list[dict]) -> list[str]:
    by_target = {r["target"]: r.get("category") or str(r["target"]) for r in rows}
    n = max(by_target) + 1
    return [by_target.get(i, str(i)) for i in range(n)]


# ------------------------------------------------------------------------------ Speech Commands
def _read_list(path: Path) -> set[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: Speech Commands v2 needs validation_list.txt and testing_list.txt")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def read_speechcommands(root: str | os.PathLike, classes: str = "35") -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """Train/val/test ``(path, label)`` lists by the official lists, and the class names."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Speech Commands folder not found: {root}")
    val, test = _read_list(root / "validation_list.txt"), _read_list(root / "testing_list.txt")
    words = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not words:
        raise ValueError(f"{root} has no word folders; expected the speech_commands_v0.02 layout (<word>/<file>.wav)")
    if classes == "35":
        names = words
        label = {w: i for i, w in enumerate(words)}.__getitem__
    elif classes == "12":
        names = list(SC12_WORDS) + ["_unknown_", "_silence_"]
        label = lambda w: SC12_WORDS.index(w) if w in SC12_WORDS else 10  # noqa: E731
    else:
        raise ValueError(f"Speech Commands classes={classes!r}; valid: 35, 12")
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for w in words:
        for f in sorted((root / w).iterdir()):
            if f.suffix.lower() not in AUDIO_EXT:
                continue
            rel = f"{w}/{f.name}"
            split = "val" if rel in val else "test" if rel in test else "train"
            splits[split].append((str(f), label(w)))
    if classes == "12":
        pieces = silence_pieces(root)
        for i, split in enumerate(("train", "val", "test")):
            n = max(1, len(splits[split]) // max(len(words), 1))
            chosen = [p for j, p in enumerate(pieces) if j % 10 in ((0, 1, 2, 3, 4, 5, 6, 7), (8,), (9,))[i]][:n]
            splits[split] += [(p, 11) for p in chosen]
    return splits, names


def silence_pieces(root: Path) -> list[str]:
    """``<file>#<start>`` references to the 1 s pieces of ``_background_noise_`` (read by :class:`AudioClips`)."""
    noise = root / "_background_noise_"
    if not noise.is_dir():
        raise FileNotFoundError(f"{noise} not found: the 12-class variant cuts _silence_ clips from it")
    import soundfile as sf

    out = []
    for f in sorted(noise.glob("*.wav")):
        info = sf.info(str(f))
        for k in range(int(info.frames // info.samplerate)):
            out.append(f"{f}#{k}")
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
        if not splits["val"]:
            splits["val"] = splits["test"]
        return splits, classes
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class folders; expected <root>/<class>/*.wav")
    items = [(str(f), i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.suffix.lower() in AUDIO_EXT]
    random.Random(0).shuffle(items)
    n = len(items)
    a, b = int(0.8 * n), int(0.9 * n)
    return {"train": items[:a], "val": items[a:b], "test": items[b:]}, classes


# ------------------------------------------------------------------------------ dataset
class AudioClips(Dataset):
    """``(fbank [T, F], label)`` from ``(path, label)`` pairs; ``path#k`` reads the k-th 1 s piece.

    ``mixup`` (training): with that probability a random second clip is mixed in at waveform level
    (λ ~ Beta(10, 10)) and the label becomes a soft vector (AST's dataloader). With mixup on, every
    label is a ``num_classes`` vector.
    """

    def __init__(self, items: list[tuple[str, int]], front: FrontEnd, num_classes: int, train: bool = False,
                 mixup: float = 0.0, bad_files: str = "raise"):
        if bad_files not in ("raise", "skip"):
            raise ValueError(f"bad_files={bad_files!r}; valid: raise, skip")
        if not items:
            raise ValueError("no audio clips in this split")
        self.items, self.front, self.num_classes = list(items), front, num_classes
        self.train, self.mixup, self.bad_files = train, float(mixup), bad_files
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.items)

    def _wave(self, path: str) -> torch.Tensor:
        if "#" in path:
            f, k = path.rsplit("#", 1)
            w = self.front.wave(f)
            sr = self.front.args.sample_rate
            return w[:, int(k) * sr:(int(k) + 1) * sr]
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
            t = torch.zeros(self.num_classes)
            t[y] += lam
            t[self.items[j][1]] += 1 - lam
            return x, t
        x = self.front.finish(self._raw(path), train=self.train)
        if self.train and self.mixup > 0:
            return x, torch.nn.functional.one_hot(torch.tensor(y), self.num_classes).float()
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


def write_generated(root: str | os.PathLike, clips_per_class: int = 20, seconds: float = 1.0, sample_rate: int = 16000,
                    classes: tuple[str, ...] = GENERATED_CLASSES, seed: int = 0) -> Path:
    """Write the generated set in the ESC-50 release layout (``audio/{fold}-{id}-{take}-{target}.wav``,
    ``meta/esc50.csv``; ``clips_per_class / 5`` clips per class and fold). Written once, atomically
    (a temporary folder renamed into place); an existing complete set is reused."""
    import soundfile as sf

    root = Path(root)
    if (root / "meta" / "esc50.csv").is_file():
        return root
    if clips_per_class % 5:
        raise ValueError(f"clips_per_class={clips_per_class} must be a multiple of 5 (5 folds)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
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
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first
            if not (root / "meta" / "esc50.csv").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def seconds_to_frames(seconds: float, frame_shift_ms: float = 10.0, frame_length_ms: float = 25.0) -> int:
    """Kaldi frames (snip_edges) in a clip of ``seconds``."""
    return 1 + int(math.floor((seconds * 1000 - frame_length_ms) / frame_shift_ms))


# ------------------------------------------------------------------------------ Lightning DataModule
DATASETS = ("generated", "generated_upstream", "esc50", "speechcommands", "speechcommands12", "folder")
# the fbank statistics the AST recipes use; others are computed from the training split
PUBLISHED_STATS = {"esc50": "esc50", "speechcommands": "speechcommands", "speechcommands12": "speechcommands"}


def read_dataset(dataset: str, root: str | os.PathLike, fold: int = 1, val_fold: str = "none",
                 generate: bool = True, clips_per_class: int = 20) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """``(splits, class names)`` of ``dataset`` at ``root`` (for ESC-50-layout sets: test fold ``fold``)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown audio dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if dataset in ("generated", "generated_upstream", "esc50"):
        if dataset != "esc50" and generate:
            classes = UPSTREAM_CLASSES if dataset == "generated_upstream" else GENERATED_CLASSES
            write_generated(root, clips_per_class=clips_per_class, classes=classes, seed=1 if dataset == "generated_upstream" else 0)
        rows = read_esc50(root)
        return esc50_split(rows, int(fold), val_fold), esc50_classes(rows)
    if dataset.startswith("speechcommands"):
        return read_speechcommands(root, "12" if dataset.endswith("12") else "35")
    return read_folder(root)


class AudioDataModule(L.LightningDataModule):
    """Fbank batches ``[B, max_length, num_mel_bins]`` for AST; the front end runs in the workers."""

    def __init__(self, dataset: str = "generated", root: str = "data/audio/generated", fold: int = 1,
                 val_fold: str = "none", max_length: int = 100, num_mel_bins: int = 128,
                 sample_rate: int = 16000, mean: float | None = None, std: float | None = None,
                 freqm: int = 0, timem: int = 0, mixup: float = 0.0, batch_size: int = 32,
                 eval_batch_size: int = 64, num_workers: int = 0, cache_dir: str | None = None,
                 bad_files: str = "raise", generate: bool = True, generate_clips: int = 20, seed: int = 0,
                 num_classes: int | None = None):
        super().__init__()
        self.seed = seed
        self.splits, self.classes = read_dataset(dataset, root, fold, val_fold, generate, generate_clips)
        self.num_classes = len(self.classes)
        if num_classes is not None and int(num_classes) != self.num_classes:
            raise ValueError(f"task.num_classes={num_classes}, but {dataset} at {root} has {self.num_classes} classes "
                             f"({', '.join(self.classes[:6])}{', ...' if self.num_classes > 6 else ''}); "
                             f"set task.num_classes={self.num_classes}")
        self.dataset, self.fold = dataset, fold
        args = FbankArgs(sample_rate=sample_rate, num_mel_bins=num_mel_bins)
        self.cache_dir = cache_dir
        if mean is None or std is None:
            if dataset in PUBLISHED_STATS:
                mean, std = NORM_STATS[PUBLISHED_STATS[dataset]]
            else:  # from the training split, raw fbanks (cached for training anyway)
                probe = FrontEnd(max_length, args=args, cache_dir=cache_dir)
                mean, std = dataset_stats(probe.load(p) for p, _ in self.splits["train"] if "#" not in p)
        self.mean, self.std = float(mean), float(std)
        self.front = lambda train: FrontEnd(max_length, self.mean, self.std, args, freqm if train else 0,
                                            timem if train else 0, cache_dir)
        self.mixup, self.bad_files = float(mixup), bad_files
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.test_set = self.splits["test"] or None  # the runner tests at the end when a test split exists

    def dataset_for(self, split: str, train: bool = False) -> AudioClips:
        return AudioClips(self.splits[split], self.front(train), self.num_classes, train=train,
                          mixup=self.mixup if train else 0.0, bad_files=self.bad_files)

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
