"""Few-shot CLIP classification (CoOp / CLIP-LoRA protocol) with zero-shot retention on every run.

``task=fewshot``: the model is :class:`zoo.zeroshot.CLIPClassifier` (``head: zeroshot | linear | text``)
on ``backbone=clip``; the data is one of the 11 CoOp datasets (or the embedded ``Shapes``), K shots
per class drawn by CoOp's rule (:mod:`tasks.data.fewshot`), test split evaluated once at the end.

Retention (:mod:`tasks.metrics.fewshot`), computed after the test and written to ``metrics.json``:

* ``retention.heldout`` datasets: zero-shot top-1 through the tuned towers (``zs/<d>``) next to the
  untuned backbone's (``zs0/<d>``, measured before the adapter is attached) and the drop;
* with ``subsample: base`` (base-to-new): ``b2n/base`` = the test accuracy on base classes,
  ``b2n/new`` = zero-shot accuracy on the new classes through the tuned towers (the text head or
  the zero-shot builder: new class names never reach training), and ``b2n/h`` their harmonic mean.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import lightning as L
import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader

import zoo
from tasks.base import Column, create_backbone, register_task
from tasks.classification import ClassificationTask
from tasks.data.fewshot import ImageItems, load_fewshot
from tasks.options import LOADER, Int, Real, check_options
from tasks.metrics.fewshot import harmonic_mean, retention_row, zeroshot_accuracy
from zoo.zeroshot import CLIPClassifier, check_head

log = logging.getLogger(__name__)
AUGMENTS = ("clip_lora", "none")


def make_transforms(img_size: int, mean, std, augment: str = "clip_lora"):
    """Train: CLIP-LoRA's RandomResizedCrop(scale 0.08–1, bicubic) + flip; eval: CLIP's resize + centre crop."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment={augment!r}; valid: {', '.join(AUGMENTS)}")
    norm = [T.ToTensor()] + ([T.Normalize(tuple(mean), tuple(std))] if mean is not None else [])
    bicubic = T.InterpolationMode.BICUBIC
    test = T.Compose([T.Resize(img_size, interpolation=bicubic), T.CenterCrop(img_size), *norm])
    if augment == "none":
        return test, test
    train = T.Compose([T.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=bicubic),
                       T.RandomHorizontalFlip(0.5), *norm])
    return train, test


class FewShotDataModule(L.LightningDataModule):
    """K-shot train/val, the full test split, and the retention sets (held-out datasets, new classes)."""

    def __init__(self, root: str, dataset: str, shots: int = 16, subsample: str = "all", layout: str = "auto",
                 sampler: str = "coop", short_classes: str | None = None, validate: bool = True,
                 batch_size: int = 32, eval_batch_size: int = 256, num_workers: int = 4, img_size: int = 224,
                 augment: str = "clip_lora", heldout: Sequence[str] = (), mean=None, std=None, seed: int = 1,
                 generate: bool = True, **_: Any):
        super().__init__()
        check_options("data", locals(), LOADER)
        check_options("task", locals(), {"shots": Int(1)})  # data.shots is ${task.shots}
        self.root, self.dataset, self.shots, self.subsample = root, dataset, int(shots), subsample
        self.layout, self.sampler, self.short_classes, self.seed = layout, sampler, short_classes, seed
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.train_tf, self.test_tf = make_transforms(img_size, mean, std, augment)
        self.heldout, self.generate, self.has_val = list(heldout or []), generate, bool(validate)
        self.splits = None
        self.test_set = True  # there is always a test split: the runner evaluates it once at the end

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = load_fewshot(self.root, self.dataset, self.shots, self.seed, self.subsample, self.layout,
                                       self.sampler, self.short_classes, self.generate)
            s = self.splits
            self.train_set = ImageItems(s.image_root, s.train, self.train_tf)
            self.val_set = ImageItems(s.image_root, s.val, self.test_tf)
            self.test_set = ImageItems(s.image_root, s.test, self.test_tf)

    def split_info(self) -> dict:
        """K-shot train, the ``min(K, 4)``-shot validation draw and the test split; validation overlaps test
        where the dataset has no validation split of its own (ImageNet: its val is the test set)."""
        from tasks.protocol import overlaps

        s = self.splits
        k = f"{self.shots}-shot" if self.shots > 0 else "all"
        return {"train": {"name": f"train ({k})", "size": len(s.train)},
                "val": {"name": f"val ({min(self.shots, 4) if self.shots > 0 else 'all'}-shot)", "size": len(s.val)}
                if self.has_val and s.val else None,
                "test": {"name": "test", "size": len(s.test)}, "val_overlaps_test": overlaps(s.val, s.test)}

    def _loader(self, ds, train=False) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(ds, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train,
                          generator=g if train else None, num_workers=self.num_workers, drop_last=False,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        return self._loader(self.train_set, True)

    def val_dataloader(self):
        return self._loader(self.val_set)

    def test_dataloader(self):
        return self._loader(self.test_set)

    def retention_sets(self) -> dict[str, tuple[list[str], str, DataLoader]]:
        """``name -> (class names, template, test loader)``: held-out datasets, and new classes (base-to-new)."""
        out = {}
        for d in self.heldout:
            s = load_fewshot(self.root, d, 0, self.seed, "all", self.layout, generate=self.generate)
            out[d] = (s.classnames, s.template, self._loader(ImageItems(s.image_root, s.test, self.test_tf)))
        if self.subsample == "base":
            s = load_fewshot(self.root, self.dataset, 0, self.seed, "new", self.layout, generate=self.generate)
            out["__new__"] = (s.classnames, s.template, self._loader(ImageItems(s.image_root, s.test, self.test_tf)))
        return out


@register_task("fewshot")
class FewShotTask(ClassificationTask):
    """Classification with a CLIP text-derived head; adds retention metrics after the test."""

    columns = (Column("val/acc", "val acc", "pct"), Column("test/acc", "test acc", "pct"),
               Column("test/acc_zeroshot", "zero-shot test acc", "pct"),
               Column("zs/mean", "held-out ZS", "pct"), Column("zs0/mean", "held-out ZS (untuned)", "pct"),
               Column("zs_drop/mean", "ZS drop", "pct"), Column("b2n/base", "base", "pct"),
               Column("b2n/new", "new", "pct"), Column("b2n/h", "H", "pct"))
    tiny_overrides = ("experiment=fewshot_tiny",)

    def __init__(self, backbone: dict, adapter: dict, data: dict, head: str = "text", logit_scale: float | None = None,
                 templates: Sequence[str] | None = None, num_classes: int = 0, evaluate_only: bool = False, **kw: Any):
        # a negative or zero temperature would invert or flatten every prediction; an empty template list no prompt
        logit_scale = Real(0.0, lo_open=True, optional=True).check("task.logit_scale", logit_scale)
        if templates is not None and (isinstance(templates, str) or not list(templates)
                                      or not all(isinstance(t, str) and t.strip() for t in templates)):
            raise ValueError(f"task.templates={templates!r}: give a non-empty list of prompt templates such as "
                             f"['a photo of a {{}}.'], or null for the dataset's CoOp template")
        self.data_cfg, self.head_type, self.fixed_scale = dict(data), head, logit_scale
        self.evaluate_only = evaluate_only  # the zero-shot row (train=false): nothing trains, by design
        self.templates_override = list(templates) if templates else None
        self.untuned: dict[str, float] = {}
        self.extra_metrics: dict[str, Any] = {}
        names = load_fewshot(data["root"], data["dataset"], 0, 1, data.get("subsample", "all"),
                             data.get("layout", "auto"), generate=data.get("generate", True))
        self.classnames, self.template = names.classnames, names.template
        super().__init__(backbone, adapter, num_classes=len(names.classnames), **kw)

    def templates(self, template: str) -> list[str]:
        return self.templates_override or [template]

    def build_model(self, backbone: dict, adapter: dict, num_classes: int) -> torch.nn.Module:
        if backbone.get("name") != "clip":
            raise ValueError(f"task=fewshot needs backbone=clip (a text tower for its class-name head), "
                             f"got backbone={backbone.get('name')}")
        bb = create_backbone(backbone)
        model = CLIPClassifier(bb, self.classnames, self.templates(self.template), head=self.head_type,
                               logit_scale=self.fixed_scale, dataset=self.data_cfg["dataset"])
        self.untuned = self._heldout_accuracy(bb)  # before any adapter: the untuned reference
        from tasks.base import attach_adapter

        attach_adapter(model, adapter)
        if adapter.get("name") != "colora" and not self.evaluate_only:  # CoLoRA's factors appear in prepare()
            check_head(model)
        return model

    def _retention_dm(self) -> FewShotDataModule:
        bb = zoo.find_backbone(self.model) if hasattr(self, "model") else None
        dc = (bb.data_config if bb is not None else {})
        cfg = {k: v for k, v in self.data_cfg.items() if not k.startswith("_")}
        return FewShotDataModule(**{**cfg, "mean": dc.get("mean"), "std": dc.get("std")})

    def _heldout_accuracy(self, backbone) -> dict[str, float]:
        """Untuned zero-shot accuracy on the held-out datasets and on this run's own test split."""
        dc = backbone.data_config
        cfg = {k: v for k, v in self.data_cfg.items() if not k.startswith("_")}
        dm = FewShotDataModule(**{**cfg, "mean": dc.get("mean"), "std": dc.get("std")})
        dm.setup()
        out = {d: zeroshot_accuracy(backbone, names, self.templates(t), loader, self.fixed_scale)
               for d, (names, t, loader) in dm.retention_sets().items() if d != "__new__"}
        self.extra_metrics["test/acc_zeroshot"] = zeroshot_accuracy(
            backbone, self.classnames, self.templates(self.template), dm.test_dataloader(), self.fixed_scale)
        return out

    def on_test_epoch_start(self) -> None:
        self._test_counts = [0, 0]

    def update_metrics(self, stage: str, logits: torch.Tensor, y: torch.Tensor) -> None:
        super().update_metrics(stage, logits, y)
        if stage == "test":  # the base accuracy of base-to-new, without reading the metric's state
            self._test_counts[0] += int((logits.argmax(-1) == y).sum())
            self._test_counts[1] += len(y)

    def run_metrics(self, trainer, datamodule) -> dict[str, Any]:
        return dict(self.extra_metrics)

    def on_test_epoch_end(self) -> None:
        """After the (once, final) test: retention through the tuned towers, into ``extra_metrics``."""
        bb = zoo.find_backbone(self.model)
        dm = self._retention_dm()
        tuned: dict[str, float] = {}
        for d, (names, t, loader) in dm.retention_sets().items():
            acc = zeroshot_accuracy(bb, names, self.templates(t), loader, self.fixed_scale)
            if d == "__new__":
                base = self._test_counts[0] / max(1, self._test_counts[1])
                self.extra_metrics.update({"b2n/base": base, "b2n/new": acc, "b2n/h": harmonic_mean(base, acc)})
            else:
                tuned[d] = acc
        if tuned:
            self.extra_metrics.update(retention_row(tuned, self.untuned))
        if self.extra_metrics:
            log.info("retention: %s", {k: round(v, 2) for k, v in self.extra_metrics.items()})
