"""What ``bench.adapters`` trains for each backbone: one :class:`BenchProfile` per ``--backbone``.

A profile says how to build the task's model (the module a run trains: classifier, CLIP with its
text-derived head, SAM segmenter, captioner, ...), a synthetic batch, the task's loss, where the
frozen floor's trainable input bias goes, and the rows that belong to that backbone only (the
papers' recipes, a second floor). Everything else (timing, FLOPs, memory, tables) is shared.

Rows that only make sense for one backbone are *recipe rows*: named by their label, built from the
repo's own ``conf/adapter/*.yaml`` (one source for the recipe), selectable with ``--adapters LABEL``.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import zoo

FLOOR = "frozen floor"
PEFT_ROW = "peft-lora[qkv]"
LORA_QKV = "lora[qkv]"
# methods peft also has: our row and peft's on the same whole fused ``qkv`` Linear, same options
# (method -> (zoo label, peft label)); the like-for-like comparison, as lora[qkv] / peft-lora[qkv]
PEFT_PAIRS = {"miss": ("miss[qkv]", "peft-miss[qkv]"), "shira": ("shira[qkv]", "peft-shira[qkv]")}
CONF = Path(__file__).resolve().parents[1] / "conf" / "adapter"


@dataclass
class Row:
    """One line of the table: what to build."""

    label: str
    kind: str  # "floor" | "zoo" | "peft"
    adapter: str | None = None
    config: dict = field(default_factory=dict)
    compile: bool = False  # nn.Module.compile() of the trained model (training step timed only)
    checkpoint: bool = False  # zoo.checkpoint_blocks: activation checkpointing of every block
    opts: dict = field(default_factory=dict)  # options of the profile's model (e.g. CLIP's head=text)
    ref: str = FLOOR  # the floor row this row's ratios are taken against
    source: str | None = None  # conf/adapter/<source>.yaml, for recipe rows

    @property
    def timed_inference(self) -> bool:
        return not (self.compile or self.checkpoint)  # same model as the plain row at inference

    def describe_config(self) -> str:
        extra = (["torch.compile"] if self.compile else []) + (["checkpoint_blocks"] if self.checkpoint else [])
        extra += [f"{k}={v}" for k, v in self.opts.items()]
        base = self._describe()
        return ", ".join([base, *extra]) if extra else base

    def _describe(self) -> str:
        if self.kind == "floor":
            return "input bias only"
        if self.kind == "peft":
            c = dict(self.config)
            method = c.pop("peft_type", "lora")
            if method != "lora":
                return f"peft {PEFT_CONFIGS[method]}(" + ", ".join(f"{k}={v}" for k, v in c.items()) + ")"
            return f"peft LoraConfig(r={c['r']}, alpha={c['lora_alpha']}, target_modules={c['target_modules']})"
        if self.source:
            short = {k: v for k, v in self.config.items() if k in ("finetune_steps", "faig_steps", "faig_batches")}
            return ", ".join([f"conf/adapter/{self.source}.yaml", *(f"{k}={v}" for k, v in short.items())])
        return ", ".join(f"{k}={v}" for k, v in self.config.items()) or "defaults"


PEFT_CONFIGS = {"lora": "LoraConfig", "miss": "MissConfig", "shira": "ShiraConfig"}  # a peft row's peft_type


def peft_config(config: dict):
    """The peft config of a ``peft`` row (``peft_type``: lora (default) | miss | shira).

    Only LoRA rows keep the task head through ``modules_to_save=["head"]``: that name also matches timm's
    ``Identity`` head inside the backbone, and peft 0.21's MiSS / SHiRA ``merge_and_unload`` then fails on
    it ('Identity' has no attribute 'weight'); their rows train the head directly (:func:`peft_head_direct`)
    and save it next to peft's files.
    """
    import peft

    c = dict(config)
    kind = c.pop("peft_type", "lora")
    return getattr(peft, PEFT_CONFIGS[kind])(**c, **({"modules_to_save": ["head"]} if kind == "lora" else {}))


def peft_head_direct(row: Row) -> bool:
    """A peft row whose task head trains outside peft (see :func:`peft_config`)."""
    return row.kind == "peft" and row.config.get("peft_type", "lora") != "lora"


def peft_pair_rows(name: str) -> list[Row]:
    """``<name>[qkv]`` (zoo, the method's defaults on the whole fused qkv) and peft's same method there."""
    d = zoo.ADAPTERS.get(name).from_config().config
    ours, theirs = PEFT_PAIRS[name]
    opts = {"miss": lambda: {"r": int(d["rank"]), "miss_dropout": d["dropout"]},
            "shira": lambda: {"r": int(d["rank"]), "random_seed": d["seed"]}}[name]()
    return [Row(ours, "zoo", name, {"targets": ["qkv"]}),
            Row(theirs, "peft", None, {"peft_type": name, **opts, "target_modules": ["qkv"]})]


class InputBias(nn.Module):
    """The frozen floor: a trainable input bias in front of a frozen model (``key``: the entry of a
    dict input it is added to, e.g. a captioner's ``frames``)."""

    def __init__(self, model: nn.Module, shape: tuple[int, ...] = (1, 3, 1, 1), key: str | None = None):
        super().__init__()
        self.model, self.key = model, key
        self.bias = nn.Parameter(torch.zeros(*shape))

    def forward(self, x):
        if self.key is None:
            return self.model(x + self.bias)
        return self.model({**x, self.key: x[self.key] + self.bias})


def adapter_conf(name: str, **override: Any) -> dict:
    """``conf/adapter/<name>.yaml`` resolved (its Hydra ``defaults`` merged), without ``name``."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for base in [d for d in cfg.pop("defaults", []) if d != "_self_"]:
        cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{base}.yaml"), cfg)
    # resolved as train.py resolves it, under a run config (``${oc.select:seed,0}`` in an adapter config
    # means the run's seed; alone, the adapter's own ``seed`` key would refer to itself)
    run = OmegaConf.create({"seed": 0, "adapter": cfg})
    out = OmegaConf.to_container(run.adapter, resolve=True)
    adapter = out.pop("name")
    return {"adapter": adapter, "config": {**out, **override}}


def recipe(label: str, conf: str, ref: str = FLOOR, opts: dict | None = None, **override: Any) -> Row:
    c = adapter_conf(conf, **override)
    return Row(label, "zoo", c["adapter"], c["config"], opts=dict(opts or {}), ref=ref, source=conf)


def _kw(args) -> dict:
    return json.loads(args.kwargs) if getattr(args, "kwargs", None) else {}


def _images(args, g, channels: int = 3) -> torch.Tensor:
    return torch.randn(args.batch_size, channels, args.img_size, args.img_size, generator=g)


@dataclass(frozen=True)
class BenchProfile:
    name: str
    help: str
    default_model: str
    build: Callable[[Any, dict], tuple[nn.Module, zoo.Backbone]]  # (args, row.opts) -> (task model, backbone)
    make_batch: Callable[[Any, torch.Generator], tuple[Any, torch.Tensor]]
    describe_input: Callable[[Any], str]
    floor_note: str  # what the floor trains and where gradients flow
    loss: Callable[[Any, torch.Tensor], torch.Tensor] = F.cross_entropy
    floor_shape: Callable[[Any], tuple[int, ...]] = lambda a: (1, 3, 1, 1)
    input_key: str | None = None
    default_img_size: int = 224
    recipe_rows: Callable[[Any], list[Row]] = lambda a: []
    row_opts: Callable[[str], dict] = lambda name: {}  # the model options of a registered adapter's row
    ref_for: Callable[[dict], str] = lambda opts: FLOOR  # the floor of a row with these model options
    after_attach: Callable[[nn.Module], None] = lambda m: None
    peft: bool = False  # timm's fused qkv: the lora[qkv] / peft rows
    notes: Callable[[Any], list[str]] = lambda a: []
    checks: Callable[[dict, dict, Any], list[str]] = lambda rows, train, args: []  # (rows by label, round times)
    extra_args: tuple[str, ...] = ()  # argparse dests forwarded to the memory subprocess
    skip_notes: dict = field(default_factory=dict)  # adapter -> why it fails here, added to its skip line


# ------------------------------------------------------------------------------- vit / ast
def _timm_classifier(family: str):
    def build(args, opts):
        kw = _kw(args)
        if args.depth is not None:
            kw["depth"] = args.depth
        size = {"max_length": args.max_length} if family == "ast" else {"img_size": args.img_size}
        bb = zoo.create_backbone(family, model=args.model, pretrained=False, **size, **kw)
        return zoo.ImageClassifier(bb, args.num_classes), bb
    return build


def _labels(args, g) -> torch.Tensor:
    return torch.randint(0, args.num_classes, (args.batch_size,), generator=g)


VIT_NOTES = [
    "peft cannot put LoRA on the q and v row slices of timm's fused `qkv` Linear, so the like-for-like speed "
    f"comparison is `{LORA_QKV}` (zoo LoRA, `targets=[qkv]`) against `{PEFT_ROW}` (`target_modules=[\"qkv\"]`), "
    "same rank and alpha. `lora` is our default (q and v slices).",
]

VIT = BenchProfile(
    "vit", "timm ViT image classifier", "vit_small_patch16_224", _timm_classifier("vit"),
    lambda a, g: (_images(a, g), _labels(a, g)), lambda a: f"{a.img_size} px",
    "forward and backward through the frozen backbone, only a 3-value input bias trains", peft=True,
    notes=lambda a: VIT_NOTES + [
        f"VPT's extra cost is its prompt tokens relative to the image tokens ((img_size/patch)² + prefix; "
        f"{a.img_size} px here): small images overstate it compared with 224 px (197 tokens)."])

AST = BenchProfile(
    "ast", "Audio Spectrogram Transformer on [B, max_length, 128] fbanks", "deit_small_distilled_patch16_224",
    _timm_classifier("ast"), lambda a, g: (torch.randn(a.batch_size, a.max_length, 128, generator=g), _labels(a, g)),
    lambda a: f"{a.max_length} frames (AST)",
    "forward and backward through the frozen backbone, only a 1-value input bias trains",
    floor_shape=lambda a: (1, 1, 1), peft=True, notes=lambda a: list(VIT_NOTES), extra_args=("max_length",))


# ------------------------------------------------------------------------------- clip
def _open_clip_cfg(args, model: str, towers: tuple[str, ...]) -> dict:
    """open_clip's model config with the towers' depth overridden (``--depth``) and the image size set."""
    import open_clip

    kw = _kw(args)
    if args.depth is None and not kw:
        return {"img_size": args.img_size}
    cfg = copy.deepcopy(open_clip.get_model_config(model))
    out = {k: cfg[k] for k in ("embed_dim", *towers) if k in cfg}
    for t in towers:
        if t in out and args.depth is not None:
            out[t]["layers"] = args.depth
    out["vision_cfg"]["image_size"] = args.img_size
    for k, v in kw.items():  # {"text_cfg": {"width": 256}} merges into the tower's config
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


CLIP_CLASSES = ["red circle", "blue star", "green square", "yellow triangle", "purple heart", "orange cross",
                "black arrow", "white moon", "pink diamond", "brown ring"]
TEXT_FLOOR = "frozen floor [text]"


def _clip_classnames(n: int, source: str = "shapes") -> list[str]:
    """``n`` class names: the bench's shapes, or ImageNet's (open_clip's list: real prompt lengths, which
    set the text tower's work since ``encode_text`` stops at the longest prompt's end-of-text token)."""
    if source == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return [IMAGENET_CLASSNAMES[i % len(IMAGENET_CLASSNAMES)] for i in range(n)]
    return [CLIP_CLASSES[i] if i < len(CLIP_CLASSES) else f"shape number {i}" for i in range(n)]


def _clip_build(args, opts):
    from zoo.zeroshot import CLIPClassifier

    bb = zoo.create_backbone("clip", model=args.model, pretrained=None,
                             **_open_clip_cfg(args, args.model, ("vision_cfg", "text_cfg")))
    # the few-shot task's model (tasks/fewshot.py): CLIP-LoRA's single template and fixed logit scale 100
    model = CLIPClassifier(bb, _clip_classnames(args.num_classes, getattr(args, "class_names", "shapes")),
                           ["a photo of a {}."],
                           head=opts.get("head", "zeroshot"), logit_scale=100.0)
    return model, bb


def clip_rows(args) -> list[Row]:
    text = {"head": "text"}
    return [Row(TEXT_FLOOR, "floor", opts=text, ref=TEXT_FLOOR),
            recipe("CLIP-LoRA", "clip_lora", ref=TEXT_FLOOR, opts=text),
            Row("lora [text head]", "zoo", "lora", opts=text, ref=TEXT_FLOOR)]


def _per_round(train: dict, a: str, b: str) -> float | None:
    import statistics

    if a not in train or b not in train:
        return None
    return statistics.median(x / y for x, y in zip(train[a], train[b]))


def _clip_checks(rows: dict, train: dict, args) -> list[str]:
    out = []
    a = _per_round(train, "CLIP-LoRA", TEXT_FLOOR)
    if a is not None:
        fl = rows["CLIP-LoRA"].get("flops_x_floor")
        out.append(f"(a) CLIP-LoRA step / frozen floor with text encoded per batch: {a:.2f}× "
                   f"({'within' if a <= 1.15 else 'ABOVE'} the 1.15× target; FLOPs {fl:.2f}×)" if fl else
                   f"(a) CLIP-LoRA step / frozen floor with text encoded per batch: {a:.2f}×")
    b = _per_round(train, "lora", FLOOR)
    c = _per_round(train, TEXT_FLOOR, FLOOR)
    d = _per_round(train, "lora [text head]", FLOOR)
    if b is not None:
        out.append(f"(b) visual-only LoRA with cached class text features (head=zeroshot) / visual-tower floor: "
                   f"{b:.2f}×" + (f"; the same LoRA re-encoding the frozen class prompts every step (head=text): "
                                  f"{d:.2f}×" if d is not None else "")
                   + (f"; the text floor / the visual floor: {c:.2f}×" if c is not None else ""))
    return out


CLIP = BenchProfile(
    "clip", "open_clip CLIP, both towers, through the few-shot task's model (zoo.zeroshot.CLIPClassifier)",
    "ViT-B-16", _clip_build, lambda a, g: (_images(a, g), _labels(a, g)),
    lambda a: f"{a.img_size} px, {a.num_classes} classes × 1 template",
    "`frozen floor`: head=zeroshot (class text features cached), frozen visual tower, only a 3-value input bias "
    "trains (the ViT-style floor); `frozen floor [text]`: head=text, both towers frozen, the class prompts "
    "encoded through the text tower at every step (no gradient needed there: autograd records nothing in the "
    "frozen text tower), gradients through the visual tower to the input only",
    recipe_rows=clip_rows, row_opts=lambda name: {"linear": {"head": "linear"}, "coop": {"head": "text"}}.get(name, {}),
    ref_for=lambda opts: TEXT_FLOOR if opts.get("head") == "text" else FLOOR,
    checks=_clip_checks,
    notes=lambda a: [
        "Rows without `head=` use `head=zeroshot` (cached class text features; adapters on the visual tower, their "
        "default) and compare to `frozen floor`; `head=text` rows (CoOp's learned context needs them) (class prompts re-encoded through the text "
        f"tower every step) compare to `{TEXT_FLOOR}`. `CLIP-LoRA` is `conf/adapter/clip_lora.yaml` (q, k, v of "
        "both towers, r=2, alpha=1, rsLoRA scale, dropout 0.25); `linear` uses `head=linear` (the zero-shot "
        "weights as a trainable Linear).",
        "**trainable %** is relative to the whole CLIP (both towers)."])


# ------------------------------------------------------------------------------- sam
def _sam_build(args, opts):
    from zoo.backbones.sam_decoder import SamSegmenter

    kw = _kw(args)
    if args.depth is not None:
        kw["depth"] = args.depth
    bb = zoo.create_backbone("sam", model=args.model, pretrained=False, img_size=args.img_size, **kw)
    head = json.loads(args.head_kwargs) if args.head_kwargs else {}
    return SamSegmenter(bb, args.num_classes, decoder_weights=None, **head), bb


_SEG_LOSS: dict = {}


def _sam_loss(logits, y):
    from tasks.losses.segmentation import SegLoss

    if "samed" not in _SEG_LOSS:
        _SEG_LOSS["samed"] = SegLoss("samed")  # 0.2 CE + 0.8 Dice on the low-res masks (SAMed)
    return _SEG_LOSS["samed"](logits, y)


SAM = BenchProfile(
    "sam", "SAM segmentation: timm SAM encoder + segment_anything mask decoder (zoo.backbones.sam_decoder.SamSegmenter), masks loss",
    "samvit_base_patch16", _sam_build,
    lambda a, g: (_images(a, g), torch.randint(0, a.num_classes + 1, (a.batch_size, a.img_size // 4, a.img_size // 4),
                                              generator=g)),
    lambda a: f"{a.img_size} px, {a.num_classes} classes (+ background)",
    "encoder and mask decoder frozen, only a 3-value input bias trains (gradients through decoder and encoder)",
    loss=_sam_loss, default_img_size=256,
    recipe_rows=lambda a: [Row("decoder-only", "zoo", "linear"), recipe("SAMed", "samed_lora"),
                           recipe("SALT (seg)", "salt_sam")],
    notes=lambda a: [
        "The mask decoder (and prompt encoder) trains in every row except the floor, as in the segmentation task; "
        "**trainable** counts the encoder only. `decoder-only` = `adapter=linear` (encoder frozen); `SAMed` = "
        "`conf/adapter/samed_lora.yaml` (LoRA q, v, r=4); `SALT (seg)` = `conf/adapter/salt_sam.yaml`. Loss: "
        "SAMed's 0.2·CE + 0.8·Dice at the decoder's low resolution (img/4)."],
    extra_args=("head_kwargs",))


# ------------------------------------------------------------------------------- morph
MORPH_SHAPES = {"1d": "(t=1, F=1, C=1, D=1, H=1, W=w)", "2d": "(t=1, F=2, C=1, D=1, H=w, W=w)"}


def morph_sample(args) -> tuple[int, ...]:
    w = args.img_size
    return (1, 1, 1, 1, 1, w) if args.morph_shape == "1d" else (1, 2, 1, 1, w, w)


def _morph_build(args, opts):
    from zoo.heads import BackboneOutput

    kw = _kw(args)
    if args.depth is not None:
        kw["depth"] = args.depth
    bb = zoo.create_backbone("morph", model=args.model, pretrained=False, **kw)
    return BackboneOutput(bb), bb  # what task=pde trains: the next frame from MORPH's own decoder


def _morph_batch(args, g):
    s = morph_sample(args)
    return torch.randn(args.batch_size, *s, generator=g), torch.randn(args.batch_size, *s[1:], generator=g)


def morph_tokens(args) -> int:
    bb = zoo.create_backbone("morph", model=args.model, pretrained=False, **{**_kw(args), "depth": 1})
    d, h, w = bb.model.grid(torch.zeros(1, *morph_sample(args)))[:3]
    return int(d * h * w)


MORPH = BenchProfile(
    "morph", "MORPH PDE foundation model, next-frame MSE (task=pde's model), --morph-shape 1d|2d", "Ti",
    _morph_build, _morph_batch,
    lambda a: f"{a.morph_shape.upper()} sample {tuple(morph_sample(a))}, {morph_tokens(a)} tokens/sample",
    "the frozen model, only a 1-value input bias trains", loss=F.mse_loss, floor_shape=lambda a: (1,) * 7,
    default_img_size=256,
    recipe_rows=lambda a: [recipe(f"morph_level{i}", f"morph_level{i}") for i in (1, 2, 3, 4)],
    notes=lambda a: [
        f"MORPH input (B, t, F, C, D, H, W), sample {MORPH_SHAPES[a.morph_shape].replace('w', str(a.img_size))}; "
        "loss: one-step MSE (task=pde). `morph_level1..4` are `conf/adapter/morph_level*.yaml` (MORPH's own "
        "fine-tuning levels; LoRA r=16 attention / 12 MLP)."],
    extra_args=("morph_shape",))


# ------------------------------------------------------------------------------- nafnet
def _nafnet_build(args, opts):
    kw = {"width": 16, "layout": args.model, **_kw(args)}
    bb = zoo.create_backbone("nafnet", **kw)
    return bb, bb  # image to image: the backbone is the task's model (task=restoration)


def _psnr_loss(pred, target):
    from tasks.losses.restoration import restoration_loss

    return restoration_loss("psnr", pred, target)  # NAFNet's PSNR loss, the task's default


NAFNET = BenchProfile(
    "nafnet", "NAFNet restoration (conv sites), PSNR loss (task=restoration); --model = layout", "sidd",
    _nafnet_build, lambda a, g: (_images(a, g), _images(a, g)), lambda a: f"{a.img_size} px",
    "the frozen network, only a 3-value input bias trains", loss=_psnr_loss, default_img_size=64,
    recipe_rows=lambda a: [recipe("lora conv", "lora_conv"),
                           recipe("colora conv", "colora_conv", finetune_steps=4, faig_steps=4, faig_batches=1)],
    notes=lambda a: [
        f"NAFNet {json.dumps({'width': 16, 'layout': a.model, **_kw(a)})}. `lora conv` = `conf/adapter/lora_conv.yaml`, "
        "`colora conv` = `conf/adapter/colora_conv.yaml` (its prepare stage shortened, as for the ViT table). "
        "Methods that need attention or tokens refuse a CNN (listed below)."])


# ------------------------------------------------------------------------------- coca
def _coca_build(args, opts):
    from zoo.backbones.coca import CoCaCaptioner

    cfg = _open_clip_cfg(args, args.model, ("vision_cfg", "text_cfg", "multimodal_cfg"))
    bb = zoo.create_backbone("coca", model=args.model, pretrained=None, **cfg)
    return CoCaCaptioner(bb), bb


def _coca_freeze_text(model: nn.Module) -> None:
    bb = zoo.find_backbone(model)
    for p in bb.text_parameters():  # the captioning task's frozen decoder, whatever the adapter marked
        p.requires_grad_(False)


def _coca_batch(args, g):
    import open_clip

    text_cfg = {**open_clip.get_model_config(args.model)["text_cfg"], **_kw(args).get("text_cfg", {})}
    frames = torch.randn(args.batch_size, args.frames, 3, args.img_size, args.img_size, generator=g)
    text = torch.randint(1, int(text_cfg["vocab_size"]), (args.batch_size, int(text_cfg["context_length"])), generator=g)
    return {"frames": frames, "text": text}, text[:, 1:]


def _coca_loss(logits, labels):
    return F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=0)  # CoCa's pad id


COCA = BenchProfile(
    "coca", "open_clip CoCa captioner (vision tower adapted, text decoder frozen), captioning loss", "coca_ViT-B-32",
    _coca_build, _coca_batch, lambda a: f"{a.img_size} px × {a.frames} frames",
    "vision tower and decoder frozen, only a 3-value bias on the frames trains", loss=_coca_loss,
    floor_shape=lambda a: (1, 1, 3, 1, 1), input_key="frames", after_attach=_coca_freeze_text,
    notes=lambda a: [
        "The captioning task's model (`CoCaCaptioner`): frames (B, T, 3, H, W) through the vision tower "
        "(`fusion=flatten`), teacher-forced captioning cross-entropy through the frozen text decoder. "
        "**trainable %** is relative to the whole CoCa."],
    extra_args=("frames",),
    skip_notes={"colora": "CoLoRA's prepare stage moves (x, y) tensor batches only; the captioner's batch is a "
                          "dict {frames, text}: not supported yet"})


PROFILES: dict[str, BenchProfile] = {p.name: p for p in (VIT, AST, CLIP, SAM, MORPH, NAFNET, COCA)}
