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

Several artifacts on one base (``python -m zoo predict --adapters NAME=ARTIFACT ... --manifest FILE.csv``
or ``... PATH... --route all``): :func:`predict_many` routes each file to its adapter through one
:class:`zoo.MultiAdapter` (one backbone, mixed batches) and writes ``file,adapter,label,score``; each
row is the one ``predict`` gives with that artifact alone. The artifacts must record the same
preprocessing (one decoded input serves every adapter).
"""
from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

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
    model: torch.nn.Module | None  # None: described only (predict_many runs the model through a MultiAdapter)
    meta: dict[str, Any]
    class_names: list[str] | None

    # ------------------------------------------------------------------ inputs
    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.meta.get("preprocessing") or {}

    def extensions(self) -> tuple[str, ...]:
        return AUDIO_EXT if self.kind in AUDIO_KINDS else IMAGE_EXT

    def loader(self) -> Callable[[str], torch.Tensor]:
        """File path -> the model's input tensor, as the recorded preprocessing says (images, audio clips)."""
        return self._image_loader() if self.kind in IMAGE_KINDS else self._audio_loader()

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
        check_batch_size(batch_size)
        if self.kind in MASK_KINDS:
            if out_dir is None:
                raise PredictError("segmentation predictions are mask PNGs: give an output folder")
            return [self._mask(f, out_dir) for f in files]
        load = self.loader()
        rows: list[Prediction] = []
        for i in range(0, len(files), batch_size):
            chunk = files[i:i + batch_size]
            logits = self.model(torch.stack([load(f) for f in chunk]))
            rows += [self._row(f, z) for f, z in zip(chunk, logits.float())]
        return rows

    def _image_loader(self) -> Callable[[str], torch.Tensor]:
        tf = self.image_transform()

        def load(path: str) -> torch.Tensor:
            # the reader training uses (zoo.reading): a 16-bit PNG / TIFF at its real depth, a bad file named
            return tf(_read_image(path, pil=True))

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
        if not bool(torch.isfinite(logits).all()):  # a NaN row would read as class 0 with score nan
            raise PredictError(f"{file}: the model of {self.name} gave non-finite outputs ({logits.tolist()[:4]}); "
                               "its tensors overflow (check the artifact) or the input holds NaN/inf")
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

        from zoo.backbones.sam_decoder import logits_to_labels, upsample

        head = self.meta.get("head") or {}
        mode = head.get("mode", "semantic")
        if mode != "semantic":
            raise PredictError(f"{self.name}: a SAM head in {mode!r} mode needs prompts from ground truth; "
                               f"predicting masks from images alone needs task.sam.mode=semantic")
        p = self.preprocessing
        size = int((p.get("input_size") or [3, 1024, 1024])[-1])
        img = _read_image(file, pil=False)  # float 0..1 at the image's real bit depth, as segmentation trains
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


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PredictError(f"--batch-size must be an integer >= 1, got {batch_size!r}")


def _read_image(path: str, pil: bool):
    """An input image through :mod:`zoo.reading` (the reader the training data use); any failure is a
    :class:`PredictError` naming the file."""
    from zoo.reading import DataFileError, read_rgb, read_rgb_pil

    try:
        return read_rgb_pil(path) if pil else read_rgb(path)
    except (DataFileError, OSError) as e:
        raise PredictError(str(e) if isinstance(e, DataFileError) else f"{path}: cannot read this image ({e})") from None


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


def load_predictor(artifact: str | os.PathLike, weights: str | os.PathLike | None = None, build: bool = True,
                   name: str | None = None) -> Predictor:
    """The artifact (a folder, or a zoo entry name) as a :class:`Predictor` (``build=False``: its record
    only, no model; ``name``: what its rows' ``adapter`` column says, default the artifact as given)."""
    from zoo.hub import from_zoo, resolve

    folder = resolve(artifact)
    meta = read_adapter_config(folder)
    task = meta.get("task") or {}
    from zoo.heads import CLASSIFIER_HEADS

    kind = task.get("kind") or ("classification" if (meta.get("head") or {}).get("type") in CLASSIFIER_HEADS else None)
    if kind not in KINDS:
        raise PredictError(f"{artifact}: predict serves {', '.join(KINDS)} artifacts; this one is {kind!r} "
                           f"(use eval.py for its metrics)")
    model = from_zoo(str(folder), weights=weights) if build else None
    names = task.get("class_names")
    return Predictor(name=name or str(artifact), kind=kind, model=model, meta=meta, class_names=list(names) if names else None)


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


def rows_to_csv(rows: Sequence[Prediction], with_adapter: bool | None = None) -> str:
    """``file,label,score``; ``file,adapter,label,score`` with rows of several adapters (or ``with_adapter``)."""
    several = len({r.adapter for r in rows}) > 1 if with_adapter is None else with_adapter
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file"] + (["adapter"] if several else []) + ["label", "score"])
    for r in rows:
        w.writerow([r.file] + ([r.adapter] if several else []) + [r.label, f"{r.score:.6f}"])
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


# ---------------------------------------------------------------------------- several artifacts, one pass

ROUTES = ("all",)
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def parse_adapters(specs: Iterable[str]) -> dict[str, str]:
    """``["NAME=ARTIFACT", ...]`` -> ``{name: artifact}`` (names unique)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, artifact = str(spec).partition("=")
        if not sep or not _NAME.fullmatch(name) or not artifact:
            raise PredictError(f"--adapters takes NAME=ARTIFACT (a name of letters, digits, _ . -), got {spec!r}")
        if name in out:
            raise PredictError(f"--adapters: the name {name!r} is given twice")
        out[name] = artifact
    if not out:
        raise PredictError("--adapters: give at least one NAME=ARTIFACT")
    return out


def parse_tasks(specs: Iterable[str], adapters: Sequence[str]) -> dict[str, int]:
    """``["NAME=TASK_ID", ...]`` -> ``{name: task id}``: an MHR artifact over several tasks serves one task
    per name (give the artifact under several names to serve several of its tasks)."""
    out: dict[str, int] = {}
    for spec in specs:
        name, sep, task = str(spec).partition("=")
        if not sep or not task.strip().isdigit():
            raise PredictError(f"--tasks takes NAME=TASK_ID (an integer), got {spec!r}")
        if name not in adapters:
            raise PredictError(f"--tasks: {name!r} is not among --adapters; valid: {', '.join(adapters)}")
        out[name] = int(task)
    return out


def split_adapter_args(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--adapters a=X b=Y photos/`` (argparse gives the option everything up to the next one): the
    leading ``NAME=...`` items are adapters, the rest input paths."""
    k = 0
    while k < len(items) and "=" in items[k] and _NAME.fullmatch(items[k].partition("=")[0]):
        k += 1
    return list(items[:k]), list(items[k:])


def read_manifest(path: str | os.PathLike, adapters: Sequence[str], extensions: Sequence[str]
                  ) -> list[tuple[str, str]]:
    """``(file, adapter)`` jobs from a CSV with columns ``file,adapter`` (other columns are ignored).
    A relative ``file`` is relative to the manifest's folder; a folder routes every input file under it."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("file", "adapter") if c not in (reader.fieldnames or [])]
            if missing:
                raise PredictError(f"{path}: the manifest needs the columns file,adapter; its header is "
                                   f"{','.join(reader.fieldnames or []) or '(empty)'}")
            rows = [(r["file"] or "", (r["adapter"] or "").strip()) for r in reader]
    except OSError as e:
        raise PredictError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    except (UnicodeDecodeError, csv.Error) as e:  # a binary or non-UTF-8 file, NUL bytes
        raise PredictError(f"{path}: cannot read the manifest as a UTF-8 CSV ({type(e).__name__}: {e})") from None
    if not rows:
        raise PredictError(f"{path}: the manifest lists no files")
    unknown = sorted({a for _, a in rows if a not in adapters})
    if unknown:
        raise PredictError(f"{path}: adapter(s) {unknown} are not among --adapters; valid: {', '.join(adapters)}")
    jobs: list[tuple[str, str]] = []
    for i, (f, a) in enumerate(rows, start=2):  # line 1 is the header
        if not f.strip():
            raise PredictError(f"{path}:{i}: empty file")
        p = Path(f)
        jobs += [(g, a) for g in expand_inputs([p if p.is_absolute() else path.parent / p], extensions)]
    return jobs


def check_shared_inputs(predictors: Sequence[Predictor]) -> None:
    """Refuse artifacts that cannot share one decoded input: masks, image with audio, or a preprocessing
    record that differs (the key that differs is named)."""
    for p in predictors:
        if p.kind in MASK_KINDS:
            raise PredictError(f"{p.name}: several artifacts predict {', '.join(IMAGE_KINDS + AUDIO_KINDS)}; "
                               f"predict segmentation masks one artifact at a time")
    first = predictors[0]
    for p in predictors[1:]:
        if (p.kind in AUDIO_KINDS) != (first.kind in AUDIO_KINDS):
            raise PredictError(f"adapters {first.name!r} ({first.kind}) and {p.name!r} ({p.kind}) take different "
                               f"inputs; predict them separately")
        a, b = first.preprocessing, p.preprocessing
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                show = [repr(d[key]) if key in d else "absent" for d in (a, b)]
                raise PredictError(f"adapters {first.name!r} and {p.name!r} record different preprocessing: {key} "
                                   f"is {show[0]} vs {show[1]}; one batch needs the same inputs, so predict them "
                                   f"separately")


def route_jobs(adapters: Sequence[str], paths: Iterable[str | os.PathLike] | None = None,
               manifest: str | os.PathLike | None = None, route: str | None = None,
               extensions: Sequence[str] = IMAGE_EXT) -> list[tuple[str, str]]:
    """The ``(file, adapter)`` pairs to predict: the manifest's, or (``route="all"``) every file with every
    adapter, file by file."""
    paths = list(paths or [])
    if manifest is not None:
        if paths or route:
            raise PredictError("--manifest routes the files itself: give no input paths and no --route with it")
        return read_manifest(manifest, adapters, extensions)
    if route not in ROUTES:
        raise PredictError(f"several adapters need --manifest FILE.csv (columns file,adapter) or --route "
                           f"{'|'.join(ROUTES)} with input paths" + (f" (got --route {route!r})" if route else ""))
    return [(f, a) for f in expand_inputs(paths, extensions) for a in adapters]


def predict_many(adapters: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike,
                 paths: Iterable[str | os.PathLike] | None = None, manifest: str | os.PathLike | None = None,
                 route: str | None = None, weights: str | os.PathLike | None = None, batch_size: int = 16,
                 tasks: Mapping[str, int] | None = None) -> Path:
    """Predict with several artifacts on one base in shared batches (:class:`zoo.MultiAdapter`); returns
    ``out_dir/predictions.csv`` (``file,adapter,label,score``, one row per routed file and adapter).
    ``tasks``: the task id of each multi-task MHR artifact (``{name: id}``)."""
    from zoo.io import atomic_write_text
    from zoo.multi_adapter import MultiAdapter

    check_batch_size(batch_size)
    described = {n: load_predictor(a, build=False, name=n) for n, a in adapters.items()}
    preds = list(described.values())
    check_shared_inputs(preds)
    jobs = route_jobs(list(adapters), paths, manifest, route, preds[0].extensions())
    served = MultiAdapter.from_artifacts(dict(adapters), weights=weights, tasks=tasks)  # refuses other bases
    load = preds[0].loader()  # one preprocessing for all (checked above)
    rows: list[Prediction] = []
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s:s + batch_size]
        inputs: dict[str, torch.Tensor] = {}  # a file routed to several adapters is decoded once
        for f, _ in chunk:
            if f not in inputs:
                inputs[f] = load(f)
        outs = served.predict_batch(torch.stack([inputs[f] for f, _ in chunk]), [a for _, a in chunk])
        rows += [described[a]._row(f, z.float()) for (f, a), z in zip(chunk, outs)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / "predictions.csv"
    atomic_write_text(dest, rows_to_csv(rows, with_adapter=True))
    return dest
