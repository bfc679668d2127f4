"""Audio classification with AST: a :class:`~tasks.classification.ClassificationTask` on fbanks.

``task=audio`` with ``task.dataset=generated | esc50 | speechcommands | speechcommands12 | folder``
(:mod:`tasks.data.audio`); ``task=audio_multilabel`` with ``task.dataset=multilabel | generated_multilabel``
(:class:`AudioMultiLabelTask`: BCE with logits, macro mAP, as AST's AudioSet recipe). The model is the
classification one (backbone + head + adapter; ``task.head``: ``linear``, or ``layernorm_linear``, AST's
``mlp_head``: LayerNorm, then Linear); what differs is the data (the AST front end in the DataModule's workers), soft targets under mixup
(cross-entropy against λ-mixed label vectors, accuracy against their argmax, as AST's ESC-50 recipe),
and the artifact's preprocessing record (the fbank arguments instead of image mean/std).

ESC-50-layout sets are 5-fold: ``task.fold=k`` runs fold k; ``experiment=petl_ast/esc50`` (or
``-m task.fold=1,2,3,4,5``) runs all five as a Hydra multirun and :class:`FoldSummary` prints and
saves the per-fold and mean accuracy (``folds.md`` / ``folds.json`` in the sweep folder).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.experimental.callback import Callback


from tasks.base import Column, register_task
from tasks.classification import ClassificationTask
from tasks.metrics.audio import folds_markdown, multilabel_map, summarize_folds


@register_task("audio")
class AudioTask(ClassificationTask):
    """Sound / keyword classification on ``[B, T, F]`` fbanks (selection: ``val/acc``)."""

    tiny_overrides = ("experiment=tiny_audio",)

    def __init__(self, backbone: dict, adapter: dict, num_classes: int | None, **kw: Any):
        if num_classes is None:
            raise ValueError(f"task.num_classes is needed for task.dataset={kw.get('dataset', 'folder')}: set it to the number "
                             f"of classes (class folders, or the class names in labels.csv)")
        if backbone.get("name") != "ast":
            raise ValueError(f"task=audio reads fbanks: use backbone=ast (or ast_demo), not backbone={backbone.get('name')}")
        super().__init__(backbone, adapter, num_classes, **kw)

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # integer labels, or mixup's soft label vectors (F.cross_entropy takes class probabilities)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def update_metrics(self, stage: str, logits: torch.Tensor, y: torch.Tensor) -> None:
        super().update_metrics(stage, logits, y.argmax(-1) if y.is_floating_point() else y)

    def preprocessing(self) -> dict[str, Any]:
        from zoo import find_backbone

        bb = find_backbone(self.model)
        front = {k: v for k, v in self.meta.items() if k in ("fbank", "dataset", "fold")}
        return {"input_size": [bb.max_length, bb.num_mel_bins], "layout": "fbank [T, F]", **front}


@register_task("audio_multilabel")
class AudioMultiLabelTask(AudioTask):
    """Multi-label audio tagging on fbanks (selection: ``val/mAP``, max).

    Targets are multi-hot vectors (soft under mixup: λ on clip 1's classes, 1 − λ on clip 2's). Loss:
    binary cross-entropy with logits, the mean over classes and clips (AST's AudioSet recipe, ``BCE / mAP``).
    Metric: torchmetrics ``MultilabelAveragePrecision(average="macro")``, exact (no thresholds):
    per class ``AP_c = Σ_n (R_n − R_{n−1}) P_n`` over the clips ranked by score, then the mean over
    classes. A class with no positive clip in the split counts as AP 0 (torchmetrics warns; sklearn's
    ``average_precision_score`` does the same), so keep every class present in val and test.
    """

    columns = (Column("val/mAP", "val mAP", "pct"), Column("test/mAP", "test mAP", "pct"))
    monitor_default = "val/mAP"
    mode_default = "max"
    tiny_overrides = ("experiment=tiny_audio_multilabel",)

    def __init__(self, backbone: dict, adapter: dict, num_classes: int | None, **kw: Any):
        if kw.get("label_smoothing"):
            raise ValueError("task.label_smoothing is for single-label tasks; task=audio_multilabel takes 0")
        super().__init__(backbone, adapter, num_classes, **kw)
        self.val_map = multilabel_map(num_classes)
        self.test_map = multilabel_map(num_classes)

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not y.is_floating_point():  # class indices (a single-label set): one-hot
            y = F.one_hot(y, logits.shape[-1]).float()
        return F.binary_cross_entropy_with_logits(logits, y)

    def update_metrics(self, stage: str, logits: torch.Tensor, y: torch.Tensor) -> None:
        if stage == "train":  # mixup's targets are soft; mAP is measured on val / test only
            return
        target = y.round().long() if y.is_floating_point() else F.one_hot(y, logits.shape[-1])
        metric = self.val_map if stage == "val" else self.test_map
        metric.update(logits, target)
        self.log(f"{stage}/mAP", metric, on_step=False, on_epoch=True, prog_bar=stage == "val")


class FoldSummary(Callback):
    """Hydra callback: at the end of a fold sweep, the per-fold and mean of every column per method."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        table = summarize_folds(sweep)
        if not table:
            return
        text = folds_markdown(table)
        print(text)
        for name, content in (("folds.md", text), ("folds.json", json.dumps(table, indent=2))):
            tmp = sweep / f".{name}.tmp"
            tmp.write_text(content)
            os.replace(tmp, sweep / name)


class FrontEndThroughput(Callback):
    """Hydra callback: before a sweep, measure the AST front end on the generated set (clips/s
    decoded + fbank vs read from the cache) and print it (``throughput.json`` in the sweep folder)."""

    def __init__(self, root: str, max_length: int = 100):
        self.root, self.max_length = root, max_length

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        import tempfile

        from tasks.data.audio import fbank_throughput, read_esc50, write_generated

        paths = [r["path"] for r in read_esc50(write_generated(self.root))]
        with tempfile.TemporaryDirectory() as tmp:
            res = fbank_throughput(paths, Path(tmp) / "cache", self.max_length)
        print(f"front end on {len(paths)} generated clips: {res['uncached_clips_per_s']:.0f} clips/s uncached "
              f"(decode + fbank), {res['cached_clips_per_s']:.0f} clips/s from the fbank cache")
        sweep = Path(config.hydra.sweep.dir)
        sweep.mkdir(parents=True, exist_ok=True)
        (sweep / "throughput.json").write_text(json.dumps(res, indent=2))
