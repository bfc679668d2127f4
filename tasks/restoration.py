"""Image restoration (``task=restoration``): an image-to-image backbone (NAFNet) restores degraded images.

The task kind CoLoRA (Park et al., ECCV 2024, arXiv 2408.01099) was proposed for: PROD
pre-training (``data.dataset=prod``) and few-image fine-tuning on one real degradation
(``data.dataset=denoise|deblur|derain|dehaze|lowlight|jpeg`` with ``task.num_train=16|32|64|128``).

* model: the backbone itself (no head); it must be image-to-image (``backbone.image_to_image``);
* loss: ``psnr`` (NAFNet's PSNRLoss, default) | ``l1`` | ``mse`` (:mod:`tasks.losses.restoration`);
* metrics: PSNR and SSIM per image, averaged over the split (``val/psnr`` selects the checkpoint,
  higher is better), with the convention of ``task.metric`` (``crop_border``, ``y_channel``,
  ``quantize``; defaults: RGB, no crop, as NAFNet reports GoPro (8-bit images) and SIDD (float outputs,
  its ``use_image: false``); for ``dataset=sr``
  the Y channel with ``crop_border = task.scale``, the SR convention);
* evaluation runs tiled when ``task.tile`` is set (``tile_overlap`` pixels of context per tile);
* validation writes ``input | output | target`` strips of the first ``log_images`` images to
  ``<run>/val_images/epoch<E>.png`` (and to TensorBoard when that logger is on);
* ``predict_step`` returns ``{"images": restored}`` and, with ``task.predict_dir``, writes each as
  ``<predict_dir>/<input name>.png``; ``task.write_predictions=true`` also writes the test split's
  restored images while testing (``python eval.py artifact=<run>/adapter split=test
  task.write_predictions=true [task.tile=256] [task.predict_dir=...]``; default folder
  ``<run dir>/predictions/test``), one PNG per input at the input's size.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchmetrics import MeanMetric

import zoo
from tasks.base import Column, ZooTask, attach_adapter, create_backbone, register_task
from tasks.losses.restoration import LOSSES, restoration_loss
from tasks.metrics.restoration import psnr, ssim
from tasks.options import Int, check_options

STAGES = ("train", "val", "test")


@torch.no_grad()
def tiled_forward(model, x: torch.Tensor, tile: int | None = 256, overlap: int = 32) -> torch.Tensor:
    """``model(x)`` computed tile by tile, for images too large for one pass (Real-ESRGAN's ``tile``/``tile_pad``).

    The image is cut into ``tile×tile`` cores; each core is run with ``overlap`` extra pixels of
    context on every side (clipped at the image border) and only the core of the output is kept.
    For a model whose receptive-field radius is at most ``overlap`` the result equals the one-pass
    output exactly. NAFNet's channel attention pools over the whole input, so its tiled output is
    close to, not equal to, the one-pass one (NAFNet's TLC variant addresses this; not built here).
    ``tile=None`` or an image no larger than ``tile`` runs in one pass.
    """
    n, c, h, w = x.shape
    if tile is None or (h <= tile and w <= tile):
        return model(x)
    if int(tile) < 1 or int(overlap) < 0:
        raise ValueError(f"tile={tile} must be >= 1 and overlap={overlap} >= 0")
    out = None
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            py0, px0 = max(y0 - overlap, 0), max(x0 - overlap, 0)
            py1, px1 = min(y1 + overlap, h), min(x1 + overlap, w)
            pred = model(x[..., py0:py1, px0:px1])
            if out is None:
                out = x.new_zeros(n, pred.shape[1], h, w)
            out[..., y0:y1, x0:x1] = pred[..., y0 - py0:y1 - py0, x0 - px0:x1 - px0]
    return out


def save_png(img: torch.Tensor, path: str | Path) -> Path:
    """Write a ``3×H×W`` (or ``1×H×W``) tensor in [0, 1] as an 8-bit PNG, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (img.detach().float().clamp(0, 1).cpu() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else np.ascontiguousarray(arr))
    tmp = path.with_name(f".{path.name}.tmp")
    pil.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def side_by_side(inp: torch.Tensor, out: torch.Tensor, target: torch.Tensor, gap: int = 2) -> torch.Tensor:
    """``[input | output | target]`` of one ``3×H×W`` image, with a white gap, for logging."""
    pad = torch.ones(inp.shape[0], inp.shape[1], gap, dtype=inp.dtype, device=inp.device)
    return torch.cat([inp.clamp(0, 1), pad, out.clamp(0, 1), pad, target.clamp(0, 1)], dim=-1)



@register_task("restoration")
class RestorationTask(ZooTask):
    monitor_default = "val/psnr"
    mode_default = "max"
    columns = (Column("val/psnr", "val PSNR", "float"), Column("val/ssim", "val SSIM", "float"),
               Column("test/psnr", "test PSNR", "float"), Column("test/ssim", "test SSIM", "float"))
    predict_output = "images"
    tiny_overrides = ("experiment=tiny_restore", "adapter=lora_conv")  # conv LoRA: NAFNet has no q/v

    def __init__(self, backbone: dict, adapter: dict, loss: str = "psnr", metric: dict | None = None,
                 tile: int | None = None, tile_overlap: int = 32, log_images: int = 4, predict_dir: str | None = None,
                 write_predictions: bool = False,
                 optimizer: dict | None = None, scheduler: dict | None = None, monitor: str | None = None,
                 monitor_mode: str | None = None, **meta: Any):
        super().__init__(backbone, adapter, optimizer, scheduler, monitor, monitor_mode, **meta)
        check_options("task", locals(), {"tile": Int(1, optional=True), "tile_overlap": Int(0), "log_images": Int(0)})
        check_options("task.metric", metric or {}, {"crop_border": Int(0, optional=True)})
        if loss not in LOSSES:
            raise ValueError(f"task.loss={loss!r}; valid: {', '.join(LOSSES)}")
        metric = {"crop_border": None, "y_channel": None, "quantize": None, **(metric or {})}
        unknown = sorted(set(metric) - {"crop_border", "y_channel", "quantize"})
        if unknown:
            raise ValueError(f"unknown task.metric option(s) {unknown}; valid: crop_border, y_channel, quantize")
        metric = metric_convention(metric, meta.get("dataset"), meta.get("scale", 2))
        self.save_hyperparameters()
        bb = create_backbone(backbone)
        if not getattr(bb, "image_to_image", False):
            raise ValueError(f"task=restoration needs an image-to-image backbone (backbone=nafnet); "
                             f"backbone={bb.family} outputs features")
        self.model = attach_adapter(bb, adapter)
        self.loss_name, self.metric_cfg = loss, metric
        self.tile, self.tile_overlap = tile, int(tile_overlap)
        self.log_images, self.predict_dir, self.write_predictions = int(log_images), predict_dir, bool(write_predictions)
        self.means = torch.nn.ModuleDict({f"{s}_{m}": MeanMetric() for s in STAGES for m in ("psnr", "ssim")})

    def protocol_details(self, datamodule) -> dict[str, Any]:
        """The PSNR/SSIM convention (8-bit or float, Y or RGB, border crop) and the input range."""
        return {"metric": {"psnr_ssim": dict(self.metric_cfg), "average": "per image, then over the split"},
                "normalisation": "none: images in [0, 1] (NAFNet)"}

    # ------------------------------------------------------------------ the problem
    def loss_fn(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return restoration_loss(self.loss_name, pred, target)

    def update_metrics(self, stage: str, pred: torch.Tensor, target: torch.Tensor) -> None:
        names = ("psnr",) if stage == "train" else ("psnr", "ssim")  # SSIM per training step is not worth it
        for name in names:
            fn = psnr if name == "psnr" else ssim
            values = fn(pred.detach(), target, **self.metric_cfg)
            m = self.means[f"{stage}_{name}"]
            m.update(values)
            self.log(f"{stage}/{name}", m, on_step=False, on_epoch=True, prog_bar=stage == "val" and name == "psnr",
                     batch_size=len(pred))

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation forward: tiled when ``task.tile`` is set."""
        return tiled_forward(self.model, x, self.tile, self.tile_overlap) if self.tile else self.model(x)

    # ------------------------------------------------------------------ steps
    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        ds = getattr(dm, "train_set", None)
        if ds is not None and hasattr(ds, "epoch"):
            ds.epoch = self.current_epoch  # fresh crops / PROD draws per epoch, reproducibly

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = self.split_batch(batch)
        out = self.restore(x)
        self.log("val/loss", self.loss_fn(out, y), on_epoch=True, sync_dist=True, batch_size=len(x))
        self.update_metrics("val", out, y)
        if self.write_predictions and self.trainer.state.fn == "validate":  # trainer.validate (eval.py split=val, and the run's final validation), not fit's
            self.save_predictions(out, batch, batch_idx, self.prediction_dir("val"))
        if batch_idx == 0 and self.log_images > 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.log_side_by_side(x, out, y)

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = self.split_batch(batch)
        out = self.restore(x)
        self.update_metrics("test", out, y)
        if self.write_predictions:
            self.save_predictions(out, batch, batch_idx, self.prediction_dir("test"))

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        out = self.restore(x).clamp(0, 1)
        if self.predict_dir or self.write_predictions:
            self.save_predictions(out, batch, batch_idx, self.prediction_dir("predict"))
        return {self.predict_output: out}

    # ------------------------------------------------------------------ predictions
    def prediction_dir(self, stage: str) -> Path:
        """``task.predict_dir``, or ``<run dir>/predictions/<stage>`` (``task.write_predictions=true`` alone)."""
        if self.predict_dir:
            return Path(self.predict_dir)
        return Path(self.trainer.default_root_dir) / "predictions" / stage

    def save_predictions(self, out: torch.Tensor, batch, batch_idx: int, folder: Path) -> None:
        """One 8-bit PNG per image, ``<folder>/<input name>.png``, at the input's size."""
        names = batch[2] if isinstance(batch, (list, tuple)) and len(batch) > 2 else \
            [f"{batch_idx:05d}_{i}" for i in range(len(out))]
        for img, name in zip(out, names):
            save_png(img, folder / f"{name}.png")

    def on_test_epoch_end(self) -> None:
        if self.write_predictions and self.trainer.is_global_zero:
            import logging

            logging.getLogger("adapter_zoo").info("restored test images written to %s", self.prediction_dir("test"))

    # ------------------------------------------------------------------ images
    def log_side_by_side(self, x: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> Path:
        """``input | output | target`` of the first images, one row each, as a PNG (and to TensorBoard)."""
        n = min(self.log_images, len(x))
        rows = [side_by_side(x[i], out[i], y[i]) for i in range(n)]
        gap = torch.ones(rows[0].shape[0], 2, rows[0].shape[-1], dtype=rows[0].dtype, device=rows[0].device)
        grid = torch.cat([t for r in rows for t in (r, gap)][:-1], dim=1)
        path = save_png(grid, Path(self.trainer.default_root_dir) / "val_images" / f"epoch{self.current_epoch:03d}.png")
        for lg in self.trainer.loggers:
            exp = getattr(lg, "experiment", None)
            if hasattr(exp, "add_image"):
                exp.add_image("val/input_output_target", grid.clamp(0, 1).cpu(), self.global_step)
        return path


def metric_convention(metric: dict, dataset: str | None, scale: int) -> dict:
    """Fill ``null`` ``crop_border`` / ``y_channel`` / ``quantize`` with the task's convention: super-resolution
    (``dataset=sr``) is measured on Y with ``crop_border = scale`` (the SR papers'); the other tasks
    on RGB without a crop (NAFNet's GoPro/SIDD numbers). NAFNet's SIDD config scores the float outputs
    (``val.use_image: false``): ``denoise`` is not quantised; GoPro and the others score the saved 8-bit images."""
    sr = dataset == "sr"
    out = dict(metric)
    if out.get("quantize") is None:
        out["quantize"] = dataset != "denoise"
    if out["crop_border"] is None:
        out["crop_border"] = int(scale) if sr else 0
    if out["y_channel"] is None:
        out["y_channel"] = sr
    return out


def trainable_percent(model: torch.nn.Module) -> float:
    """Trainable parameters as a % of the backbone's (the number CoLoRA's ~7% refers to)."""
    trainable, _ = zoo.count_parameters(model)
    return 100.0 * trainable / max(1, zoo.count_parameters(zoo.find_backbone(model))[1])
