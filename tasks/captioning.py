"""Video captioning (``task=captioning``): an open_clip CoCa whose vision tower is adapted.

The setting of Q-Adapter (Chen et al., ACM MM Asia 2025, arXiv 2510.10022): a frozen captioner,
adapters in its vision encoder, trained with the captioning loss (token cross-entropy, CoCa's
``caption_loss_weight=1, clip_loss_weight=0``), evaluated by generating one caption per video and
scoring it against all references with BLEU-4, METEOR, ROUGE-L and CIDEr-D
(:mod:`tasks.metrics.captioning`). The checkpoint is selected on ``val/cider_d`` (max).

* model: :class:`zoo.backbones.coca.CoCaCaptioner` around ``backbone=coca``; the text tower and
  decoder weights stay frozen (``task.train_decoder=true`` trains them, e.g. to pretrain the
  embedded tiny CoCa); adapters go to the vision tower, or with ``adapter.tower=decoder`` to the
  decoder's self/cross-attention blocks; a temporal embedding (``backbone.temporal_embedding``)
  trains with any adapter;
* training batches: one (video, caption) pair per sample; validation/test: one video with all its
  references (:mod:`tasks.data.captioning`);
* ``predict_step`` returns ``{"captions": [str], "video_id": [str]}``;
* an adapter with nothing to train (``adapter=linear``: there is no head) is the frozen baseline:
  the run trains nothing and only evaluates.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tasks.base import Column, ZooTask, attach_adapter, create_backbone, register_task
from tasks.metrics.captioning import caption_scores, keyword_accuracy, resolve_backend
from tasks.options import GENERATION, check_options
from zoo.backbones.coca import CoCaCaptioner

GENERATION_DEFAULTS = {"method": "greedy", "seq_len": 20, "min_seq_len": 2}


@register_task("captioning")
class CaptioningTask(ZooTask):
    monitor_default = "val/cider_d"
    mode_default = "max"
    columns = (
        Column("val/cider_d", "val CIDEr-D", "float"),
        Column("val/bleu4", "val BLEU-4", "pct"),
        Column("test/cider_d", "test CIDEr-D", "float"),
        Column("test/bleu4", "test BLEU-4", "pct"),
        Column("test/meteor", "test METEOR", "pct"),
        Column("test/rouge_l", "test ROUGE-L", "pct"),
    )
    predict_output = "captions"
    tiny_overrides = ("experiment=tiny_caption",)

    def __init__(self, backbone: dict, adapter: dict, train_decoder: bool = False, generation: dict | None = None,
                 metrics: dict | None = None, optimizer: dict | None = None, scheduler: dict | None = None,
                 monitor: str | None = None, monitor_mode: str | None = None, **meta: Any):
        super().__init__(backbone, adapter, optimizer, scheduler, monitor, monitor_mode, **meta)
        self.save_hyperparameters()
        generation = {**GENERATION_DEFAULTS, **(generation or {})}
        generation.update(check_options("task.generation", generation, GENERATION))  # before the model is built
        if backbone.get("name") != "coca":
            raise ValueError(f"task=captioning needs backbone=coca (or coca_tiny), got backbone={backbone.get('name')}")
        bb = create_backbone(backbone)
        self.model = _attach(CoCaCaptioner(bb), adapter)
        if train_decoder:  # else the decoder's own weights train only if an adapter marks them (tower=decoder)
            for p in bb.text_parameters():
                p.requires_grad_(True)
        for p in bb.fusion_parameters():  # a new temporal embedding (zero-init) trains with any adapter
            p.requires_grad_(True)
        self.generation = generation
        self.metric_cfg = {"backend": "auto", "meteor_val": False, "meteor_test": True, **(metrics or {})}
        # resolved once, before training: a bad name, or METEOR asked for without Java, fails here; the scores of
        # a run all come from one backend, recorded in metrics.json's protocol (pure scores are not PTB scores)
        self.metric_cfg["backend"] = resolve_backend(self.metric_cfg["backend"])
        self.keywords = _check_keywords(self.metric_cfg.get("keywords"))
        if self.metric_cfg["backend"] == "pure" and (self.metric_cfg["meteor_val"] or self.metric_cfg["meteor_test"]):
            raise ValueError("METEOR was asked for (task.metrics.meteor_test / meteor_val) but the coco backend is not "
                             "available (it needs Java on PATH and pycocoevalcap): install Java, or set "
                             "task.metrics.meteor_test=false task.metrics.meteor_val=false (then no METEOR, and "
                             "task.metrics.backend=pure scores are not comparable with published PTB-tokenised ones)")
        self._hyps: dict[str, str] = {}
        self._refs: dict[str, list[str]] = {}

    def protocol_details(self, datamodule) -> dict[str, Any]:
        """The caption metrics' backend: ``coco`` (pycocoevalcap, PTB tokenizer: the published numbers') or ``pure``
        (a simple tokenizer: BLEU-4 moves by points; never to be put beside a published score)."""
        coco = self.metric_cfg["backend"] == "coco"
        return {"normalisation": getattr(datamodule, "normalisation", None),
                "metric": {"backend": self.metric_cfg["backend"],
                           "tokenizer": "PTB (pycocoevalcap, Java)" if coco else "pure (lowercase, punctuation dropped)",
                           "comparable_with_published": coco,
                           "meteor": bool(self.metric_cfg["meteor_test"]) and coco,
                           "generation": dict(self.generation)}}

    def metric_columns(self) -> tuple[Column, ...]:
        """The caption metrics, then one accuracy per ``task.metrics.keywords`` group (val and test)."""
        return self.columns + tuple(Column(f"{split}/{name}_acc", f"{split} {name} acc", "pct")
                                    for name in self.keywords for split in ("val", "test"))

    @property
    def coca(self):
        return self.model.backbone

    # ------------------------------------------------------------------ the problem
    def split_batch(self, batch) -> tuple[dict, torch.Tensor]:
        text = self.coca.tokenize(batch["caption"]).to(batch["frames"].device)
        return {"frames": batch["frames"], "text": text}, text[:, 1:]

    def loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=self.coca.pad_id)

    def update_metrics(self, stage: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if stage == "train":  # next-token accuracy on real tokens (captions are scored at val/test)
            mask = labels != self.coca.pad_id
            acc = (logits.argmax(-1)[mask] == labels[mask]).float().mean()
            self.log("train/token_acc", acc, on_step=False, on_epoch=True, batch_size=len(labels))

    def captions(self, frames: torch.Tensor) -> list[str]:
        return self.coca.decode(self.model.generate(frames, **self.generation))

    def _eval_step(self, stage: str, batch) -> None:
        x, y = self.split_batch(batch)
        self.log(f"{stage}/loss", self.loss_fn(self(x), y), on_epoch=True, sync_dist=True,
                 batch_size=len(batch["caption"]))
        for vid, cap, refs in zip(batch["video_id"], self.captions(batch["frames"]), batch["refs"]):
            self._hyps[vid], self._refs[vid] = cap, list(refs)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _score(self, stage: str) -> None:
        hyps, refs = _gather(self._hyps), _gather(self._refs)
        self._hyps, self._refs = {}, {}
        if not hyps:
            return
        meteor = self.metric_cfg["meteor_val" if stage == "val" else "meteor_test"]
        scores = caption_scores(refs, hyps, backend=self.metric_cfg["backend"], meteor=bool(meteor))
        for k in ("cider_d", "bleu4", "rouge_l", "meteor"):
            if scores[k] is not None:
                self.log(f"{stage}/{k}", float(scores[k]), prog_bar=k == "cider_d")
        for name, words in self.keywords.items():
            acc = keyword_accuracy(refs, hyps, words)
            if acc is not None:
                self.log(f"{stage}/{name}_acc", acc)
        self.last_captions = dict(sorted(hyps.items()))

    def on_validation_epoch_end(self) -> None:
        self._score("val")

    def on_test_epoch_end(self) -> None:
        self._score("test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        frames = batch["frames"] if isinstance(batch, dict) else batch
        out = {self.predict_output: self.captions(frames)}
        if isinstance(batch, dict):
            out["video_id"] = list(batch["video_id"])
        return out

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        if not any(p.requires_grad for p in self.model.parameters()):
            return None  # the frozen baseline (adapter=linear): evaluate only
        return super().configure_optimizers()

    def training_step(self, batch, batch_idx: int):
        if not any(p.requires_grad for p in self.model.parameters()):
            return None  # nothing to train: Lightning skips the step
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self) -> None:
        if not any(p.requires_grad for p in self.model.parameters()):
            # the frozen baseline: one epoch's validation is the result (every further epoch would
            # score the same model again)
            self.trainer.should_stop = True


def _attach(model: CoCaCaptioner, adapter: dict) -> CoCaCaptioner:
    """:func:`tasks.base.attach_adapter`, except that an artifact (``init_from``) saved with a
    temporal embedding gets its methods attached and the embedding marked trainable *before* its
    tensors load (attaching freezes every backbone weight, and an artifact holds the trainable ones)."""
    bb = model.backbone
    extra = list(bb.fusion_parameters())
    if not (extra and adapter.get("init_from")):
        return attach_adapter(model, adapter)
    from zoo import apply_adapter, hub
    from zoo.checkpoint import load_adapter, read_adapter_config

    path = str(hub.resolve_init(adapter["init_from"]))
    methods = read_adapter_config(path)["methods"]
    if adapter.get("name") not in (methods[0]["name"], "from-artifact"):
        raise ValueError(f"adapter.init_from={adapter['init_from']} holds {[m['name'] for m in methods]}, "
                         f"but adapter={adapter.get('name')}; use adapter={methods[0]['name']}")
    for m in methods:
        apply_adapter(model, m["name"], **(m.get("config") or {}))
    for p in extra:
        p.requires_grad_(True)
    load_adapter(model, path)
    return model


def _check_keywords(keywords) -> dict[str, list[str]]:
    """``task.metrics.keywords``: ``{name: [word, ...]}`` (e.g. ``direction: [left, right, up, down]``), each
    group scored by :func:`tasks.metrics.captioning.keyword_accuracy` as ``<split>/<name>_acc``."""
    if not keywords:
        return {}
    if not isinstance(keywords, dict):
        raise ValueError(f"task.metrics.keywords must map a name to a list of words, got {keywords!r}")
    out = {}
    for name, words in keywords.items():
        if not str(name).isidentifier() or isinstance(words, str) or not words or \
                not all(isinstance(w, str) and w.strip() for w in words):
            raise ValueError(f"task.metrics.keywords.{name}: expected a name (letters, digits, _) and a non-empty "
                             f"list of words, got {words!r}")
        out[str(name)] = [str(w) for w in words]
    return out


def _gather(d: dict) -> dict:
    """Merge per-rank dicts (DDP); a no-op in one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return d
    parts: list[dict] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
    torch.distributed.all_gather_object(parts, d)
    return {k: v for p in parts for k, v in p.items()}
