"""``task=segmentation``: SAM (mask decoder) or an smp decoder on an adapted SAM encoder; Dice / IoU /
HD95 (:mod:`tasks.metrics.segmentation`), smp losses (:mod:`tasks.losses.segmentation`), the SAMed and SALT recipes.

Declares ``val/dice`` (max) as monitor, the columns ``val/dice, test/dice, test/iou, test/hd95``, and
``predict_output = "masks"`` (class-index maps). After testing, ``run_metrics`` writes the chosen
split's predictions as PNG masks + overlays under ``<output_dir>/predictions/<split>/``; each
validation epoch logs a few overlays to TensorBoard (``logger=tensorboard``: ``val/overlay/<i>``) or
else writes them under ``<output_dir>/overlays/epoch_<n>/``.

Heads (``task.head``): ``sam`` (:class:`zoo.backbones.sam_decoder.SamSegmenter`, ``task.sam.mode`` semantic | prompted | text)
or ``smp_dpt`` / ``smp_fpn`` / ``smp_unet`` (:class:`zoo.heads.smp.SmpSegmenter`). The loss is computed at the
logits' resolution with the label resized by nearest sampling (SAMed's low-res label for SAM);
metrics at the label's resolution (logits upsampled bilinearly). ``task.decoder_adapter`` adds a
second adapter on ``tower=decoder`` (SAMed_s). ``task.scheduler.name: poly`` is SAMed's schedule:
linear warm-up over ``warmup_iters`` steps, then ``lr·(1 − (it − warmup)/max_it)^power``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

import zoo
from tasks.base import Column, ZooTask, attach_adapter, create_backbone, register_task
from tasks.data.segmentation_layouts import overlay, predict_volume, resize_labels, save_mask_png, save_overlay_png
from tasks.losses.segmentation import SegLoss
from tasks.options import Int, check_options
from tasks.metrics.segmentation import per_class_scores, summarize
from zoo.backbones.sam_decoder import BINARY_MODES, logits_to_labels, prompts_from_mask, upsample

HEADS = ("sam", "smp_dpt", "smp_fpn", "smp_unet")


def build_seg_model(backbone: zoo.Backbone, head: str, num_classes: int, sam: dict | None = None,
                    smp: dict | None = None) -> torch.nn.Module:
    if head not in HEADS:
        raise ValueError(f"task.head={head!r}; valid: {', '.join(HEADS)}")
    if getattr(backbone, "family", None) != "sam":
        raise ValueError(f"task=segmentation needs backbone=sam (got {backbone.family!r})")
    if head == "sam":
        from zoo.backbones.sam_decoder import SamSegmenter

        return SamSegmenter(backbone, num_classes, **(sam or {}))
    from zoo.heads.smp import SmpSegmenter

    return SmpSegmenter(backbone, num_classes, decoder=head.split("_", 1)[1], **(smp or {}))


@register_task("segmentation")
class SegmentationTask(ZooTask):
    monitor_default = "val/dice"
    mode_default = "max"
    columns = (Column("val/dice", "val Dice", "pct"), Column("test/dice", "test Dice", "pct"),
               Column("test/iou", "test IoU", "pct"), Column("test/hd95", "test HD95", "float"))
    predict_output = "masks"
    tiny_overrides = ("experiment=tiny_seg",)

    def __init__(self, backbone: dict, adapter: dict, num_classes: int = 1, head: str = "sam",
                 sam: dict | None = None, smp: dict | None = None, prompt: str = "point", prompt_jitter: int = 0, decoder_adapter: dict | None = None,
                 loss: dict | None = None, metric_convention: str = "standard", val_hd95: bool = False,
                 class_names: list[str] | None = None, grad_checkpointing: bool = False, overlays: int = 4,
                 train_encoder: list[str] | None = None,
                 predict_split: str | None = "test", export_sam: str | None = None, optimizer: dict | None = None, scheduler: dict | None = None,
                 monitor: str | None = None, monitor_mode: str | None = None, **meta: Any):
        super().__init__(backbone, adapter, optimizer, scheduler, monitor, monitor_mode, **meta)
        self.save_hyperparameters()
        check_options("task", locals(), {"overlays": Int(0), "prompt_jitter": Int(0)})
        self.num_classes = int(num_classes)
        sam = dict(sam or {})
        # evaluation through SAM's predictor pipeline at each image's own size (null: the square training inputs)
        self.pipeline = sam.pop("pipeline", None)
        if self.pipeline is not None:
            from zoo.backbones.sam_transforms import PIPELINES

            if self.pipeline not in PIPELINES:
                raise ValueError(f"task.sam.pipeline={self.pipeline!r}; valid: null, {', '.join(PIPELINES)}")
            if head != "sam":
                raise ValueError(f"task.sam.pipeline is SAM's predictor pipeline: it needs task.head=sam (got {head!r})")
        self.mode = sam.get("mode", "semantic") if head == "sam" else "semantic"
        names = list(class_names) if class_names else None
        if self.mode == "text":  # S-SAM / SALT text prompts embed the class names
            if not names:
                raise ValueError("task.sam.mode=text embeds the class names: set task.class_names=[...] "
                                 f"({self.num_classes} names)")
            sam["text"] = {**dict(sam.get("text") or {}), "class_names": names}
        bb = create_backbone(backbone)
        if grad_checkpointing:
            bb.model.set_grad_checkpointing(True)  # timm's checkpoint_seq over the encoder blocks
        model = attach_adapter(build_seg_model(bb, head, self.num_classes, sam, smp), adapter)
        if decoder_adapter:
            d = dict(decoder_adapter)
            zoo.apply_adapter(model, d.pop("name"), tower="decoder", **d)
        for pattern in train_encoder or []:  # e.g. SALT's reference also trains pos_embed
            hits = [p for n, p in model.backbone.named_parameters() if pattern in n]
            if not hits:
                raise ValueError(f"task.train_encoder: no encoder parameter name contains {pattern!r} "
                                 f"(e.g. pos_embed, patch_embed, neck)")
            for p in hits:
                p.requires_grad_(True)
        self.model = model
        self.criterion = SegLoss(**{**(loss or {}), "prompted": self.mode in BINARY_MODES})
        self.prompt, self.prompt_jitter = prompt, int(prompt_jitter)
        self.convention, self.val_hd95 = metric_convention, bool(val_hd95)
        self.class_names = list(class_names) if class_names else [str(k) for k in range(1, self.num_classes + 1)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"task.class_names has {len(self.class_names)} names for num_classes={self.num_classes}")
        self.n_overlays, self.predict_split, self.export_sam = int(overlays), predict_split, export_sam
        if export_sam and head != "sam":
            raise ValueError(f"task.export_sam needs task.head=sam (got head={head!r})")
        if export_sam and self.mode == "text":  # segment_anything's Sam has no place for the text prompt path
            raise ValueError("task.export_sam with task.sam.mode=text would drop the trained text-prompt path "
                             "(a segment_anything checkpoint cannot hold it); use the run's adapter artifact")
        enc_lr = (optimizer or {}).get("encoder_lr")
        if enc_lr is not None and not float(enc_lr) > 0:
            raise ValueError(f"task.optimizer.encoder_lr must be > 0 (got {enc_lr}); leave it unset for one lr")
        self._scores: dict[str, list[dict[str, torch.Tensor]]] = {}

    # ------------------------------------------------------------------ forward / loss
    def _prompts(self, y: torch.Tensor | None):
        if self.mode != "prompted":
            return {}
        if y is None:
            raise ValueError("sam.mode=prompted needs ground-truth masks to build prompts from")
        points, boxes, present = prompts_from_mask(y.cpu(), self.num_classes, self.prompt,
                                                   self.prompt_jitter if self.training else 0)
        to = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        return {"points": None if points is None else (to(points[0]), to(points[1])), "boxes": to(boxes),
                "present": to(present)}

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, **self._prompts(y)) if self.mode == "prompted" else self.model(x)

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.criterion(logits, resize_labels(y, tuple(logits.shape[-2:])))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x, y)
        loss = self.loss_fn(logits, y)
        ctx = zoo.StepContext(model=self.model, inputs=x, targets=y, outputs=logits, loss=loss, loss_fn=self.loss_fn,
                              forward=lambda inp: self(inp, y), batch=batch)
        extra = zoo.extra_loss(self.model, ctx)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        if extra is not None:
            self.log("train/extra_loss", extra, on_step=False, on_epoch=True)
        return loss if extra is None else loss + extra

    def batch_loss(self, batch) -> torch.Tensor:
        x, y = (t.to(next(self.model.parameters()).device) for t in batch)
        return self.loss_fn(self(x, y), y)

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        ds = getattr(dm, "train_set", None)
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(self.current_epoch)  # new augmentation draws each epoch

    # ------------------------------------------------------------------ evaluation
    def labels(self, logits: torch.Tensor, size) -> torch.Tensor:
        return logits_to_labels(upsample(logits, size), self.mode)

    def _eval_step(self, stage: str, batch, batch_idx: int) -> None:
        hd = stage == "test" or self.val_hd95
        if isinstance(batch, dict) and "image" in batch:  # one image at its own size (task.sam.pipeline)
            pred = self._predict_image(batch)
            scores = per_class_scores(pred[None].cpu(), batch["mask"][None], self.num_classes, self.convention, hd)
        elif isinstance(batch, dict):  # a Synapse volume
            lab = batch["label"]
            pred = self._predict_volume(batch)
            scores = per_class_scores(torch.from_numpy(pred)[None], lab[None], self.num_classes, self.convention, hd)
        else:
            x, y = batch
            logits = self(x, y)
            if stage == "val":
                self.log("val/loss", self.loss_fn(logits, y), on_epoch=True, sync_dist=True, batch_size=x.shape[0])
            pred = self.labels(logits, tuple(y.shape[-2:]))
            scores = per_class_scores(pred.cpu(), y.cpu(), self.num_classes, self.convention, hd)
            if stage == "val" and batch_idx == 0 and self.n_overlays:
                self._write_overlays(x, pred, f"overlays/epoch_{self.current_epoch:03d}")
        self._scores.setdefault(stage, []).append(scores)

    def _predict_slices(self, x: torch.Tensor, y) -> torch.Tensor:
        return self.labels(self(x, y), tuple(x.shape[-2:]))

    def _predict_image(self, item: dict) -> torch.Tensor:
        """Class-index map ``(H, W)`` of one image at its own size through ``task.sam.pipeline``
        (:mod:`zoo.backbones.sam_transforms`: ``longest_side`` is SAM's ``SamPredictor``: resize the longest side,
        normalise, pad bottom / right; the logits cropped and resized back). Prompted mode takes its prompts from
        the mask brought into the encoder's frame the same way (nearest resize, zero padding)."""
        import torch.nn.functional as F

        from zoo.backbones.sam_transforms import predict_image, preprocess_shape

        image, mask = item["image"], item["mask"]
        size = int(self.model.backbone.img_size)
        y = None
        if self.mode == "prompted":
            h, w = (size, size) if self.pipeline == "square" else preprocess_shape(*image.shape[-2:], size)
            y = F.pad(resize_labels(mask[None], (h, w)), (0, size - w, 0, size - h)).to(self.device)
        logits = predict_image(lambda x: self(x, y), image.to(self.device), size, item["mean"], item["std"],
                               self.pipeline)
        return logits_to_labels(logits, self.mode)[0]

    def _predict_volume(self, batch: dict) -> np.ndarray:
        """Slice by slice (SAMed); prompted mode builds each slice's prompts from its ground truth
        (resized to the input size), as for 2-D images."""
        norm = batch["norm"]
        if self.mode == "prompted":
            return predict_volume(lambda x, y: self._predict_slices(norm(x.to(self.device)), y.to(self.device)),
                                  batch["volume"].numpy(), self.model.backbone.img_size, label=batch["label"].numpy(),
                                  input_size=self.meta.get("volume_input_size"))
        return predict_volume(lambda x: self._predict_slices(norm(x.to(self.device)), None), batch["volume"].numpy(),
                              self.model.backbone.img_size, input_size=self.meta.get("volume_input_size"))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step("val", batch, batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step("test", batch, batch_idx)

    def _epoch_end(self, stage: str) -> None:
        rows = self._scores.pop(stage, [])
        if not rows:
            return
        cat = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        if stage == "val" and not self.val_hd95:
            cat.pop("hd95")
        summary = summarize(cat, self.class_names)
        for k, v in summary.items():
            if "/" not in k or stage == "test":
                self.log(f"{stage}/{k}", torch.tensor(v if not math.isnan(v) else float("nan")),
                         prog_bar=(k == "dice" and stage == "val"), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        if isinstance(batch, dict) and "image" in batch:
            return {self.predict_output: self._predict_image(batch)[None].cpu()}
        if isinstance(batch, dict):
            return {self.predict_output: torch.from_numpy(self._predict_volume(batch)), "case": batch["case"]}
        x, y = batch if isinstance(batch, (list, tuple)) else (batch, None)
        return {self.predict_output: self.labels(self(x, y), tuple(x.shape[-2:]))}

    # ------------------------------------------------------------------ files
    def _out_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) if self.trainer is not None else Path(".")

    def _write_overlays(self, x: torch.Tensor, pred: torch.Tensor, sub: str) -> None:
        """A few validation overlays: to TensorBoard (``val/overlay/<i>``, one image per epoch step)
        when a TensorBoard logger is attached, else as PNG files under ``<output_dir>/<sub>/``."""
        if not self.trainer.is_global_zero:
            return
        img = _display(x[: self.n_overlays])
        tb = _tensorboard(self.trainer)
        for i in range(img.shape[0]):
            if tb is not None:
                tb.add_image(f"val/overlay/{i:02d}", overlay(img[i], pred[i].cpu().numpy()), self.global_step,
                             dataformats="HWC")
            else:
                save_overlay_png(self._out_dir() / sub / f"{i:02d}.png", img[i], pred[i].cpu().numpy())

    def run_metrics(self, trainer, datamodule) -> dict[str, Any]:
        """Write ``predict_split``'s predictions as PNG masks (+ overlays), and with ``export_sam``
        the whole SAM (adapters merged) as a segment_anything checkpoint; returns where."""
        out: dict[str, Any] = {}
        if self.export_sam and trainer.is_global_zero:
            import copy

            from zoo.backbones.sam_decoder import SamSegmenter, save_sam_checkpoint

            if not isinstance(self.model, SamSegmenter):
                raise ValueError("task.export_sam needs task.head=sam")
            m = zoo.merge_adapters(copy.deepcopy(self.model).cpu(), unload=True)
            out["exported_sam"] = str(save_sam_checkpoint(m, self.export_sam))
        return {**out, **self._write_predictions(trainer, datamodule)}

    def _write_predictions(self, trainer, datamodule) -> dict[str, Any]:
        split = self.predict_split
        if not split or not trainer.is_global_zero or not hasattr(datamodule, "split_set"):
            return {}
        ds = datamodule.split_set(split)
        if ds is None:
            return {}
        out = self._out_dir() / "predictions" / split
        self.eval()
        n = 0
        with torch.no_grad():
            for i in range(len(ds)):
                item = ds[i]
                if isinstance(item, dict) and "image" in item:
                    pred = self._predict_image(item).cpu().numpy()
                    save_mask_png(out / f"{i:04d}.png", pred)
                    save_overlay_png(out / "overlays" / f"{i:04d}.png", item["image"].permute(1, 2, 0).numpy(), pred)
                elif isinstance(item, dict):
                    pred = self.predict_step(item, i)[self.predict_output].numpy()
                    for z in range(pred.shape[0]):
                        save_mask_png(out / f"{item['case']}_slice{z:03d}.png", pred[z])
                else:
                    x, y = item
                    x = x[None].to(self.device)
                    pred = self.labels(self(x, y[None].to(self.device)), tuple(y.shape[-2:]))[0].cpu().numpy()
                    save_mask_png(out / f"{i:04d}.png", pred)
                    save_overlay_png(out / "overlays" / f"{i:04d}.png", _display(x)[0], pred)
                n += 1
        return {"predictions_dir": str(out), "predictions": n}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        if self.sched_cfg.get("name", "cosine") != "poly":
            return super().configure_optimizers()
        opt = self.build_optimizer()
        total = max(1, int(self.trainer.estimated_stepping_batches))
        horizon = self.sched_cfg.get("schedule_epochs")  # SAMed: poly over max_epochs=200, training stops at 160
        if horizon:
            total = max(1, round(total * float(horizon) / max(1, self.trainer.max_epochs or 1)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(int(self.sched_cfg.get("warmup_iters", 0)), total,
                                                                   float(self.sched_cfg.get("power", 0.9))))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def poly_lambda(warmup: int, max_iters: int, power: float):
    """SAMed ``trainer.py``: step ``it`` (0-based) gets ``(it+1)/warmup`` during warm-up, then
    ``(1 − (it − warmup)/max_iters)^power`` (``max_iters`` = all steps, as SAMed's max_iterations)."""
    def f(it: int) -> float:
        if warmup and it < warmup:
            return (it + 1) / warmup
        return max(0.0, 1.0 - (it - warmup) / max_iters) ** power
    return f


def _tensorboard(trainer):
    """The ``SummaryWriter`` of the trainer's TensorBoard logger, or None."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in getattr(trainer, "loggers", None) or []:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _display(x: torch.Tensor) -> np.ndarray:
    """Normalised images back to [0, 1] per image (min-max), ``(B, H, W, 3)``."""
    x = x.detach().float().cpu()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).permute(0, 2, 3, 1).numpy()
