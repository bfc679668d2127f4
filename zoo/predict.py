"""Predictions from a trained adapter artifact on your own files (plain PyTorch; no Lightning, no Hydra).

``python -m zoo predict ARTIFACT PATH... [--out DIR] [--weights FILE]`` (and ``eval.py artifact=...
+predict=DIR`` on a split's files) writes

* ``DIR/predictions.csv`` with ``file,label,score`` for image classification and audio clips: the top
  class by the artifact's recorded class names (the class index when none is recorded) and its
  softmax probability (multi-label audio: every class with sigmoid ≥ 0.5, ``;``-separated, and the
  highest sigmoid);
* ``DIR/masks/<image stem>.png`` for segmentation: an index PNG (pixel value = class id, with a
  palette to view it), at the image's own size, and a CSV row per image with the mask's path and the
  share of foreground pixels.

The model is rebuilt from the artifact (:func:`zoo.hub.from_zoo`: backbone, recorded head, adapter)
and the inputs are prepared exactly as the recorded preprocessing says: images through timm's eval
transform of the recorded data config (``timm.data.create_transform``: resize by ``crop_pct``, centre
crop, normalise), audio through :class:`zoo.audio.FrontEnd` with the recorded fbank arguments and
normalisation, segmentation images resized (bicubic) to the recorded input size and normalised.

Rows are :class:`Prediction` records with an ``adapter`` field: one artifact writes the three columns;
several (a future per-sample adapter choice, ``zoo.MultiAdapter``) add an ``adapter`` column.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from zoo.checkpoint import read_adapter_config

IMAGE_KINDS = ("classification",)
AUDIO_KINDS = ("audio", "audio_multilabel")
MASK_KINDS = ("segmentation",)
KINDS = IMAGE_KINDS + AUDIO_KINDS + MASK_KINDS
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
AUDIO_EXT = (".wav", ".flac", ".ogg")


class PredictError(ValueError):
    """The artifact or the inputs cannot be predicted on; the message says why and what to do."""


@dataclass
class Prediction:
    """One input's prediction: ``label`` (class name(s) or mask path), ``score``, and the adapter used."""

    file: str
    label: str
    score: float
    adapter: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Predictor:
    """An artifact ready to predict: the model (eval mode), what it predicts and how inputs are prepared."""

    name: str
    kind: str
    model: torch.nn.Module
    meta: dict[str, Any]
    class_names: list[str] | None

    # ------------------------------------------------------------------ inputs
    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.meta.get("preprocessing") or {}

    def extensions(self) -> tuple[str, ...]:
        return AUDIO_EXT if self.kind in AUDIO_KINDS else IMAGE_EXT

    def image_transform(self) -> Callable:
        from timm.data import create_transform

        p = self.preprocessing
        cfg = {k: tuple(p[k]) if isinstance(p.get(k), list) else p[k]
               for k in ("input_size", "interpolation", "mean", "std", "crop_pct") if k in p}
        if "input_size" not in cfg:
            raise PredictError(f"{self.name}: the artifact records no input size (preprocessing={p})")
        return create_transform(**cfg, is_training=False)

    def audio_front(self):
        from zoo.audio import FbankArgs, FrontEnd

        fb = dict(self.preprocessing.get("fbank") or {})
        if "mean" not in fb or "std" not in fb:
            raise PredictError(f"{self.name}: the artifact records no fbank normalisation (written before the "
                               f"front end was recorded); train it again to predict on clips")
        max_length, mean, std = fb.pop("max_length"), fb.pop("mean"), fb.pop("std")
        return FrontEnd(int(max_length), mean, std, FbankArgs(**fb))

    # ------------------------------------------------------------------ predictions
    def label_of(self, index: int) -> str:
        names = self.class_names
        return names[index] if names and index < len(names) else str(index)

    @torch.no_grad()
    def predict(self, files: Sequence[str | os.PathLike], out_dir: Path | None = None, batch_size: int = 16
                ) -> list[Prediction]:
        files = [str(f) for f in files]
        if self.kind in MASK_KINDS:
            if out_dir is None:
                raise PredictError("segmentation predictions are mask PNGs: give an output folder")
            return [self._mask(f, out_dir) for f in files]
        load = self._image_loader() if self.kind in IMAGE_KINDS else self._audio_loader()
        rows: list[Prediction] = []
        for i in range(0, len(files), batch_size):
            chunk = files[i:i + batch_size]
            logits = self.model(torch.stack([load(f) for f in chunk]))
            rows += [self._row(f, z) for f, z in zip(chunk, logits.float())]
        return rows

    def _image_loader(self) -> Callable[[str], torch.Tensor]:
        from PIL import Image

        tf = self.image_transform()

        def load(path: str) -> torch.Tensor:
            try:
                with Image.open(path) as im:
                    return tf(im.convert("RGB"))
            except (OSError, SyntaxError, ValueError) as e:
                raise PredictError(f"{path}: cannot read this image ({type(e).__name__}: {e})") from None

        return load

    def _audio_loader(self) -> Callable[[str], torch.Tensor]:
        from zoo.audio import AudioDecodeError

        front = self.audio_front()

        def load(path: str) -> torch.Tensor:
            try:
                return front(path)
            except (AudioDecodeError, OSError, RuntimeError) as e:
                raise PredictError(f"{path}: cannot read this clip ({type(e).__name__}: {e})") from None

        return load

    def _row(self, file: str, logits: torch.Tensor) -> Prediction:
        if self.kind == "audio_multilabel":
            p = logits.sigmoid()
            on = [self.label_of(int(i)) for i in torch.nonzero(p >= 0.5).flatten()]
            return Prediction(file, ";".join(on), float(p.max()), self.name)
        p = logits.softmax(-1)
        score, idx = p.max(-1)
        return Prediction(file, self.label_of(int(idx)), float(score), self.name)

    def _mask(self, file: str, out_dir: Path) -> Prediction:
        import numpy as np
        import torch.nn.functional as F
        from PIL import Image

        from zoo.backbones.sam_decoder import logits_to_labels, upsample

        head = self.meta.get("head") or {}
        mode = head.get("mode", "semantic")
        if mode != "semantic":
            raise PredictError(f"{self.name}: a SAM head in {mode!r} mode needs prompts from ground truth; "
                               f"predicting masks from images alone needs task.sam.mode=semantic")
        p = self.preprocessing
        size = int((p.get("input_size") or [3, 1024, 1024])[-1])
        try:
            with Image.open(file) as im:
                img = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except (OSError, SyntaxError, ValueError) as e:
            raise PredictError(f"{file}: cannot read this image ({type(e).__name__}: {e})") from None
        H, W = img.shape[:2]
        x = torch.from_numpy(img).permute(2, 0, 1)[None]
        if (H, W) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        if p.get("mean") is not None and p.get("std") is not None:
            x = (x - torch.tensor(p["mean"]).view(1, 3, 1, 1)) / torch.tensor(p["std"]).view(1, 3, 1, 1)
        labels = logits_to_labels(upsample(self.model(x).float(), (H, W)), mode)[0].numpy().astype(np.uint8)
        dest = out_dir / "masks" / f"{Path(file).stem}.png"
        save_mask_png(dest, labels)
        return Prediction(file, str(dest), float((labels > 0).mean()), self.name)


PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60)]


def save_mask_png(path: Path, labels, palette: Sequence[tuple[int, int, int]] = PALETTE) -> None:
    """An index PNG (mode ``P``: pixel value = class id, a palette to view it), written atomically."""
    from PIL import Image

    from zoo.io import atomic_path

    img = Image.fromarray(labels, mode="P")
    pal = [c for rgb in palette for c in rgb]
    img.putpalette(pal + [0] * (768 - len(pal)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def load_predictor(artifact: str | os.PathLike, weights: str | os.PathLike | None = None) -> Predictor:
    """The artifact (a folder, or a zoo entry name) as a :class:`Predictor`."""
    from zoo.hub import from_zoo, resolve

    folder = resolve(artifact)
    meta = read_adapter_config(folder)
    task = meta.get("task") or {}
    kind = task.get("kind") or ("classification" if (meta.get("head") or {}).get("type") == "linear" else None)
    if kind not in KINDS:
        raise PredictError(f"{artifact}: predict serves {', '.join(KINDS)} artifacts; this one is {kind!r} "
                           f"(use eval.py for its metrics)")
    model = from_zoo(str(folder), weights=weights)
    names = task.get("class_names")
    return Predictor(name=str(artifact), kind=kind, model=model, meta=meta, class_names=list(names) if names else None)


def expand_inputs(paths: Iterable[str | os.PathLike], extensions: Sequence[str]) -> list[str]:
    """Files as given, and every file with one of ``extensions`` under a folder (sorted, recursive)."""
    out: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in extensions)
            if not found:
                raise PredictError(f"{p} holds no {'/'.join(extensions)} files")
            out += found
        elif p.is_file():
            out.append(str(p))
        else:
            raise PredictError(f"{p} does not exist")
    if not out:
        raise PredictError("no input files given")
    return out


def rows_to_csv(rows: Sequence[Prediction]) -> str:
    """``file,label,score``; with rows of several adapters an ``adapter`` column too."""
    several = len({r.adapter for r in rows}) > 1
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "label", "score"] + (["adapter"] if several else []))
    for r in rows:
        w.writerow([r.file, r.label, f"{r.score:.6f}"] + ([r.adapter] if several else []))
    return buf.getvalue()


def predict(artifact: str | os.PathLike, paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
            weights: str | os.PathLike | None = None, batch_size: int = 16) -> Path:
    """Predict ``paths`` (files or folders) with ``artifact``; returns the written ``predictions.csv``."""
    from zoo.io import atomic_write_text

    pred = load_predictor(artifact, weights)
    files = expand_inputs(paths, pred.extensions())
    out = Path(out_dir)
    rows = pred.predict(files, out, batch_size)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / "predictions.csv"
    atomic_write_text(dest, rows_to_csv(rows))
    return dest
