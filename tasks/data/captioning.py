"""Video-captioning data: MSR-VTT and MSVD layouts, frame sampling, and embedded moving-shape clips.

Conventions (``shared/reference/clip_fewshot_captioning.md`` §2.1):

* **MSR-VTT**: one json (``MSRVTT_data.json`` or the official ``train_val_videodatainfo.json`` /
  ``test_videodatainfo.json`` structure) with ``videos`` (``video_id``, ``split``) and ``sentences``
  (``video_id``, ``caption``); captioning uses the official **6513 / 497 / 2990** split: the
  ``split`` field (``train`` / ``validate`` / ``test``) when present, else the order of ``videos``
  (``[:6513]``, ``[6513:7010]``, ``[7010:]``, as UniVL). Videos ``<video_dir>/<video_id>.mp4``.
* **MSVD**: ``train_list.txt`` / ``val_list.txt`` / ``test_list.txt`` (1200 / 100 / 670 ids) and
  one caption file: ``raw-captions.pkl`` (id -> list of token lists; read with an unpickler that
  refuses every class, so only plain dict/list/str data loads), a json ``{id: [caption, ...]}`` or a
  text file of ``<id> <caption>`` lines. Videos ``<video_dir>/<id>.avi``.
* Training yields **one sample per caption**; validation/test yield **one sample per video with all
  its references** (one generated caption scored against all of them).
* Frames: ``num_frames`` (default 8) at the centres of equal segments (``sampling="center"``), or
  CLIP4Clip's ``np.linspace(0, n-1, K)`` (``"linspace"``). A video is a file decoded with PyAV
  (torchvision 0.29 has no video reader) or a folder of pre-extracted frames (sorted images).

The embedded dataset ``shapes`` renders short clips of one coloured shape moving in one direction,
with templated captions ("a red square moves left"), written once as real ``.mp4`` files in the
MSR-VTT layout so the same reader and decoder are exercised. ``trail=True`` draws a motion streak
behind the shape, so one frame shows the direction (plain clips show it only in frame order).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tasks.data.overlap import check_disjoint
from tasks.data.paths import check_inside
from tasks.data.staging import staging_dir
from tasks.data.vtab import EpochSeededSampler
from tasks.options import LOADER, Int, check_options
from zoo.reading import read_rgb_pil, read_text, reading

log = logging.getLogger(__name__)

DATASETS = ("msrvtt", "msvd", "shapes")
SAMPLINGS = ("center", "linspace", "random")
MSRVTT_SPLIT = (6513, 497, 2990)
MSVD_SPLIT = (1200, 100, 670)
FRAME_EXT = (".jpg", ".jpeg", ".png", ".bmp")


# ------------------------------------------------------------------------------------ frames
def sample_indices(n: int, k: int, sampling: str = "center", rng: np.random.Generator | None = None) -> list[int]:
    """``k`` frame indices out of ``n``: segment centres ``floor((i + ½) n / k)``, CLIP4Clip's
    ``round(linspace(0, n-1, k))``, or (``random``, TSN's training-time sampling) one uniformly
    random frame of each of the ``k`` equal segments ``[floor(i n / k), floor((i+1) n / k))``;
    fewer than ``k`` frames repeat some (the count stays ``k``)."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown frame sampling {sampling!r}; valid: {', '.join(SAMPLINGS)}")
    if n < 1:
        raise ValueError("a video with no frames cannot be sampled")
    if k < 1:
        raise ValueError(f"num_frames must be >= 1, got {k}")
    if sampling == "center" or (sampling == "random" and n < k):
        return [min(n - 1, int(math.floor((i + 0.5) * n / k))) for i in range(k)]
    if sampling == "random":
        rng = rng if rng is not None else np.random.default_rng()
        return [int(rng.integers(i * n // k, (i + 1) * n // k)) for i in range(k)]
    return [int(round(x)) for x in np.linspace(0, n - 1, k)]


def read_frames(path: str | os.PathLike, k: int, sampling: str = "center",
                rng: np.random.Generator | None = None) -> np.ndarray:
    """(k, H, W, 3) uint8 frames of a video file (PyAV) or a folder of frame images."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_EXT)
        if not files:
            raise ValueError(f"frame folder {path} has no images ({', '.join(FRAME_EXT)})")
        return np.stack([np.asarray(read_rgb_pil(files[i])) for i in sample_indices(len(files), k, sampling, rng)])
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path} (check data.root / data.video_dir)")
    try:
        import av
    except ImportError as e:
        raise ImportError("decoding videos needs PyAV: pip install -e '.[caption]' (or use pre-extracted frame folders)") from e
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as e:  # av raises InvalidDataError, ValueError (no video stream), ...
        raise ValueError(f"cannot decode video {path}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}") from None
    if not frames:
        raise ValueError(f"cannot decode video {path}: it has no frames")
    return np.stack([frames[i] for i in sample_indices(len(frames), k, sampling, rng)])


# ------------------------------------------------------------------------------------ annotations
class Annotations:
    """Split lists and captions: ``splits = {"train"|"val"|"test": [video_id]}``, ``captions = {id: [str]}``."""

    def __init__(self, splits: dict[str, list[str]], captions: dict[str, list[str]], video_dir: Path, ext: str,
                 source: str | os.PathLike = "the annotations"):
        # an empty caption would be trained on as a target and scored as a reference: drop it, say so
        kept = {v: [c for c in cs if c.strip()] for v, cs in captions.items()}
        empty = sum(len(cs) for cs in captions.values()) - sum(len(cs) for cs in kept.values())
        if empty:
            log.warning("%s: %d empty caption(s) dropped", source, empty)
        self.splits, self.captions, self.video_dir, self.ext = splits, kept, Path(video_dir), ext
        for split, ids in splits.items():
            missing = [v for v in ids if not kept.get(v)]
            if missing:
                raise ValueError(f"{source}: {len(missing)} {split} video(s) have no (non-empty) caption, "
                                 f"e.g. {missing[0]!r}")
        # one video in two splits (by id, or the same file under two ids) is refused: val = train would
        # select and report on training videos
        for a, b in (("train", "val"), ("train", "test")):
            both = sorted(set(splits.get(a, ())) & set(splits.get(b, ())))
            if both:
                raise ValueError(f"{source}: {len(both)} video(s) are in both the {a} and the {b} split, "
                                 f"e.g. {both[0]!r}; a video may be in one split only")
        check_disjoint({k: [self.video_path(v) for v in ids] for k, ids in splits.items()}, str(source),
                       identical="warn")

    def video_path(self, vid: str) -> Path:
        folder = self.video_dir / vid
        return folder if folder.is_dir() else self.video_dir / f"{vid}{self.ext}"


def _read_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"caption file {path} is empty")
    try:
        return json.loads(read_text(path, "annotation file"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid json ({e})") from None


def load_msrvtt(json_path: str | os.PathLike, video_dir: str | os.PathLike) -> Annotations:
    data = _read_json(Path(json_path))
    if not isinstance(data, dict) or "videos" not in data or "sentences" not in data:
        raise ValueError(f"{json_path}: expected an MSR-VTT json with 'videos' and 'sentences'")
    for key, fields in (("videos", ("video_id",)), ("sentences", ("video_id", "caption"))):
        if not isinstance(data[key], list):
            raise ValueError(f"{json_path}: '{key}' must be a list of objects")
        for i, entry in enumerate(data[key]):
            gone = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if gone:
                raise ValueError(f"{json_path}: {key}[{i}] has no {' / '.join(repr(f) for f in gone)} key "
                                 f"(each entry of '{key}' needs {', '.join(fields)})")
    vids = [check_inside(str(v["video_id"]), f"{json_path}: video_id", video_dir) for v in data["videos"]]
    if all("split" in v for v in data["videos"]):
        name = {"train": "train", "validate": "val", "val": "val", "test": "test"}
        splits = {"train": [], "val": [], "test": []}
        for v in data["videos"]:
            if v["split"] not in name:
                raise ValueError(f"{json_path}: unknown split {v['split']!r} for {v['video_id']} (train, validate, test)")
            splits[name[v["split"]]].append(str(v["video_id"]))
    else:  # UniVL: the official split is the order of `videos`
        a, b, _ = MSRVTT_SPLIT
        splits = {"train": vids[:a], "val": vids[a:a + b], "test": vids[a + b:]}
    captions: dict[str, list[str]] = {}
    for s in data["sentences"]:
        captions.setdefault(str(s["video_id"]), []).append(str(s["caption"]).strip())
    return Annotations(splits, captions, Path(video_dir), ".mp4", json_path)


class _DataOnlyUnpickler(pickle.Unpickler):
    """Loads plain containers and strings only: any class or function reference is refused."""

    def find_class(self, module, name):
        raise ValueError(f"refusing to unpickle {module}.{name}: caption pickles hold only dict/list/str")


def read_msvd_captions(path: str | os.PathLike) -> dict[str, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"caption file {path} is empty")
    if path.suffix == ".pkl":
        with reading(path, "caption pickle"):  # a truncated pickle: EOFError / UnpicklingError
            raw = _DataOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
    elif path.suffix == ".json":
        raw = _read_json(path)
    else:  # "<video_id> <caption words>" per line
        raw = {}
        for line in read_text(path, "caption file").splitlines():
            if line.strip():
                vid, _, cap = line.strip().partition(" ")
                raw.setdefault(vid, []).append(cap)
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"caption file {path} has no captions (expected video id -> list of captions)")
    # raw-captions.pkl stores each caption as a list of tokens: join with spaces (CLIP4Clip)
    return {str(k): [" ".join(c) if isinstance(c, (list, tuple)) else str(c) for c in v] for k, v in raw.items()}


def load_msvd(root: str | os.PathLike, video_dir: str | os.PathLike, captions_file: str = "raw-captions.pkl") -> Annotations:
    root = Path(root)
    captions = read_msvd_captions(root / captions_file)
    splits = {}
    for split in ("train", "val", "test"):
        f = root / f"{split}_list.txt"
        if not f.is_file():
            raise FileNotFoundError(f"MSVD split list not found: {f} (train_list.txt, val_list.txt, test_list.txt)")
        splits[split] = [check_inside(line.strip(), f"{f}:{i}", video_dir)
                         for i, line in enumerate(read_text(f, "split list").splitlines(), 1) if line.strip()]
    return Annotations(splits, captions, Path(video_dir), ".avi", root / captions_file)


# ------------------------------------------------------------------------------------ datasets
class CaptionDataset(Dataset):
    """``train``: one item per (video, caption); ``eval``: one item per video with all references.

    Items: ``{"frames": (K, 3, H, W) float, "caption": str, "refs": [str], "video_id": str}``.
    ``sampling="random"`` draws from torch's global generator (seeded by the run), so a seeded run
    repeats its frames.

    ``cache_frames``: keep each video's decoded, transformed frames in memory after its first read (a
    training video is read once, not once per caption and epoch). Only for deterministic sampling and a
    deterministic ``transform``; meant for small sets (the embedded shapes: a few MB), not MSR-VTT.
    """

    def __init__(self, ann: Annotations, split: str, mode: str, num_frames: int = 8, sampling: str = "center",
                 transform: Callable | None = None, cache_frames: bool = False):
        if mode not in ("train", "eval"):
            raise ValueError(f"unknown mode {mode!r}; valid: train, eval")
        if cache_frames and sampling == "random":
            raise ValueError("data.cache_frames=true keeps one draw of frames per video: it needs a deterministic "
                             "sampling (center or linspace), not random")
        self.ann, self.num_frames, self.sampling, self.transform = ann, num_frames, sampling, transform
        self.cache: dict[str, torch.Tensor] | None = {} if cache_frames else None
        ids = ann.splits[split]
        if not ids:
            raise ValueError(f"split {split!r} has no videos")
        self.items = [(v, c) for v in ids for c in ann.captions[v]] if mode == "train" else [(v, None) for v in ids]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        vid, cap = self.items[i]
        frames = self.cache.get(vid) if self.cache is not None else None
        if frames is None:
            frames = self._read(vid)
            if self.cache is not None:
                self.cache[vid] = frames
        refs = self.ann.captions[vid]
        return {"frames": frames, "caption": cap if cap is not None else refs[0], "refs": list(refs), "video_id": vid}


    def _read(self, vid: str) -> torch.Tensor:
        rng = np.random.default_rng(int(torch.randint(2**31 - 1, ()))) if self.sampling == "random" else None
        frames = torch.from_numpy(read_frames(self.ann.video_path(vid), self.num_frames, self.sampling, rng))
        frames = frames.permute(0, 3, 1, 2).float().div(255)  # (K, 3, H, W) in [0, 1]
        return self.transform(frames) if self.transform is not None else frames


def collate(batch: list[dict]) -> dict:
    return {"frames": torch.stack([b["frames"] for b in batch]), "caption": [b["caption"] for b in batch],
            "refs": [b["refs"] for b in batch], "video_id": [b["video_id"] for b in batch]}


def frame_transform(img_size: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> Callable:
    """Resize (bicubic, short side) + centre crop + normalise, on a (K, 3, H, W) float tensor."""
    import torchvision.transforms.v2 as T

    ops = [T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(img_size)]
    if mean is not None and std is not None:
        ops.append(T.Normalize(list(mean), list(std)))
    return T.Compose(ops)


# ------------------------------------------------------------------------------------ moving shapes
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
SHAPES = ("square", "circle", "triangle")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TEMPLATES = ("a {c} {s} moves {d}", "a {c} {s} is moving {d}", "the {c} {s} slides {d}")
SHAPES_SPLIT = (96, 24, 24)
# palette=swapped: each colour *name* is drawn with another colour's RGB (a derangement), a
# controlled domain shift for adaptation (the words are known, what they look like changed)
PALETTES = {"standard": {c: c for c in COLOURS}, "swapped": {"red": "blue", "green": "red", "blue": "yellow", "yellow": "green"}}
# trail=True: a motion streak (what a long exposure shows) behind the shape, fading copies at these
# distances behind it (fractions of the image) with these opacities; it makes the direction of
# motion visible in every single frame, where plain clips show it only in the frames' order
TRAIL = ((0.15, 0.15), (0.10, 0.3), (0.05, 0.5))


def render_clip(colour: str, shape: str, motion: str, rng: np.random.Generator, frames: int = 16,
                palette: str = "standard", trail: bool = False) -> np.ndarray:
    """(frames, 32, 32, 3) uint8: one shape crossing a noisy grey background in direction ``motion``
    (with ``trail``: fading copies behind it, :data:`TRAIL`)."""
    from tasks.data.synthetic import _finish, shape_mask

    kind = {"triangle": "arrow"}.get(shape, shape)
    size = rng.uniform(0.13, 0.18)
    dx, dy = MOTIONS[motion]
    start = np.array([0.5 - 0.3 * dx, 0.5 - 0.3 * dy]) + rng.uniform(-0.08, 0.08, 2) * (1 - np.abs([dx, dy]))
    bg = 0.35 + 0.1 * rng.random(3)
    angle = -math.pi / 2 if shape == "triangle" else 0.0  # the triangle points up
    out = []
    for t in range(frames):
        cx, cy = start + 0.6 * (t / max(frames - 1, 1)) * np.array([dx, dy])
        img = np.broadcast_to(bg, (64, 64, 3)).copy() + rng.normal(0, 0.03, (64, 64, 3))
        rgb = np.array(COLOURS[PALETTES[palette][colour]])
        for dist, alpha in TRAIL if trail else ():
            m = shape_mask(kind, cx - dist * dx, cy - dist * dy, size, angle)
            img[m] = (1 - alpha) * img[m] + alpha * rgb
        img[shape_mask(kind, cx, cy, size, angle)] = rgb
        out.append(_finish(img))
    return np.stack(out)


def write_video(path: Path, frames: np.ndarray, fps: int = 8) -> None:
    """Encode (T, H, W, 3) uint8 as MPEG-4 (part 2) in ``.mp4`` with PyAV."""
    import av

    with av.open(str(path), mode="w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"qscale": "2"}
        s.codec_context.gop_size = 1  # intra-only: tiny clips decode without inter-frame smear
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def write_shapes(root: str | os.PathLike, split: Sequence[int] = SHAPES_SPLIT, seed: int = 0, frames: int = 16,
                 palette: str = "standard", trail: bool = False) -> Path:
    """Write the moving-shapes set in the MSR-VTT layout (``msrvtt.json`` + ``videos/``) once, atomically."""
    if palette not in PALETTES:
        raise ValueError(f"unknown palette {palette!r}; valid: {', '.join(PALETTES)}")
    root = Path(root)
    final = root / "shapes"
    if (final / "msrvtt.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(root, ".shapes-")
    try:
        (tmp / "videos").mkdir()
        rng = np.random.default_rng(seed)
        combos = [(c, s, d) for c in COLOURS for s in SHAPES for d in MOTIONS]  # 48
        videos, sentences = [], []
        names = ["train"] * split[0] + ["validate"] * split[1] + ["test"] * split[2]
        for i, name in enumerate(names):
            c, s, d = combos[int(rng.integers(len(combos)))] if name == "train" else combos[i % len(combos)]
            vid = f"video{i}"
            write_video(tmp / "videos" / f"{vid}.mp4", render_clip(c, s, d, rng, frames, palette, trail))
            videos.append({"video_id": vid, "split": name, "category": 0})
            sentences += [{"video_id": vid, "caption": t.format(c=c, s=s, d=d), "sen_id": len(sentences)} for t in TEMPLATES]
        (tmp / "msrvtt.json").write_text(json.dumps({"info": {"source": "adapter-zoo moving shapes"}, "videos": videos,
                                                     "sentences": sentences}))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ------------------------------------------------------------------------------------ DataModule
class CaptionDataModule(L.LightningDataModule):
    """MSR-VTT / MSVD / embedded shapes; ``batch["frames"]`` is (B, K, 3, H, W)."""

    def __init__(self, dataset: str = "shapes", root: str = "data/captioning", video_dir: str | None = None,
                 annotations: str | None = None, num_frames: int = 8, sampling: str = "center", img_size: int = 224,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, batch_size: int = 16,
                 eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 max_train: int | None = None, max_eval: int | None = None,
                 shapes_split: Sequence[int] = SHAPES_SPLIT, palette: str = "standard", shapes_seed: int = 0,
                 trail: bool = False, cache_frames: bool = False, **_: object):
        super().__init__()
        check_options("data", locals(), {**LOADER, "eval_batch_size": Int(1, optional=True), "num_frames": Int(1),
                                         "max_train": Int(1, optional=True), "max_eval": Int(1, optional=True)})
        if dataset not in DATASETS:
            raise ValueError(f"unknown captioning dataset {dataset!r}; valid: {', '.join(DATASETS)}")
        sample_indices(num_frames, num_frames, sampling)  # validates num_frames and sampling early
        self.dataset, self.root, self.video_dir, self.annotations = dataset, Path(root).expanduser(), video_dir, annotations
        self.num_frames, self.sampling, self.seed = num_frames, sampling, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.max_train, self.max_eval = num_workers, max_train, max_eval
        self.shapes_split = tuple(int(n) for n in shapes_split)
        self.palette, self.shapes_seed, self.trail = palette, int(shapes_seed), bool(trail)
        self.cache_frames = bool(cache_frames)
        if self.cache_frames and sampling == "random":
            raise ValueError("data.cache_frames=true keeps one draw of frames per video: it needs a deterministic "
                             "data.sampling (center or linspace), not random")
        self.transform = frame_transform(img_size, mean, std)
        self.has_val = True

    def load_annotations(self) -> Annotations:
        if self.dataset == "shapes":
            name = f"{self.palette}{'-trail' if self.trail else ''}-{'x'.join(map(str, self.shapes_split))}-s{self.shapes_seed}"
            folder = write_shapes(self.root / name, self.shapes_split, self.shapes_seed, palette=self.palette,
                                  trail=self.trail)
            return load_msrvtt(folder / "msrvtt.json", folder / "videos")
        if self.dataset == "msrvtt":
            return load_msrvtt(self.root / (self.annotations or "MSRVTT_data.json"), self.root / (self.video_dir or "videos"))
        return load_msvd(self.root, self.root / (self.video_dir or "videos"), self.annotations or "raw-captions.pkl")

    def setup(self, stage: str | None = None) -> None:
        ann = self.load_annotations()
        kw = dict(num_frames=self.num_frames, transform=self.transform, cache_frames=self.cache_frames)
        # random (TSN) sampling is a training-time augmentation: evaluation reads segment centres
        ev = "center" if self.sampling == "random" else self.sampling
        self.train_set = _subset(CaptionDataset(ann, "train", "train", sampling=self.sampling, **kw), self.max_train)
        self.val_set = _subset(CaptionDataset(ann, "val", "eval", sampling=ev, **kw), self.max_eval)
        self.test_set = _subset(CaptionDataset(ann, "test", "eval", sampling=ev, **kw), self.max_eval)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate,
                          sampler=EpochSeededSampler(len(self.train_set), self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, num_workers=self.num_workers, collate_fn=collate)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size, num_workers=self.num_workers, collate_fn=collate)


def _subset(ds: CaptionDataset, n: int | None) -> CaptionDataset:
    if n is not None and n < len(ds):
        ds.items = ds.items[:n]
    return ds
