"""What each adapter costs: ``python -m bench.adapters [--backbone vit|ast|clip|sam|morph|nafnet|coca] ...``.

(``--serving``: the serving table of :mod:`bench.serving` instead, K adapters in one mixed batch.)

One row per registered adapter (``zoo.list_adapters()``, each with its default config), on the
model the backbone's task trains (``bench.profiles``: a timm classifier for vit/ast, CLIP with its
text-derived head, the SAM segmenter with its mask decoder, MORPH's next-frame predictor, NAFNet,
the CoCa captioner), plus:

* ``frozen floor``: forward + backward through the frozen model with no weight gradient (only an
  input bias trains, so gradients must flow through every block). No PEFT method that trains
  something inside the first block can be cheaper than this. CLIP adds ``frozen floor [text]``
  (class prompts re-encoded through the frozen text tower every step) for its ``head=text`` rows;
  every row's ratios are taken against its own floor;
* the backbone's recipe rows (CLIP-LoRA, SAMed / SALT / decoder-only, MORPH's levels 1-4, conv
  LoRA / CoLoRA on NAFNet), built from ``conf/adapter/*.yaml``;
* vit/ast: ``lora[qkv]`` and ``peft-lora[qkv]``: our LoRA and peft's LoRA on the *same* targets, the
  whole fused ``qkv`` Linear (peft cannot target the q and v row slices of timm's fused
  projection), at the same rank and alpha: the fair speed comparison.

For every row: trainable parameters in the backbone (count and % of the backbone; the task
head trains in every row except the floor and is not counted), artifact size on disk
(``zoo.save_adapter``; peft: the weights + config that ``save_pretrained`` writes, without its
README card), training step time (forward, the task's loss, backward, optimizer step), its FLOPs,
peak memory (a fresh subprocess per row: CUDA max allocated, or peak resident set size on CPU;
and the step's own share of it), and inference time unmerged and merged
(``zoo.merge_adapters(unload=True)``; peft ``merge_and_unload``).

Times are medians. Rows are timed in interleaved rounds (each round times every row once,
after a warm-up), and each ratio is the median over rounds of the per-round ratio to the two
references timed in the same round: the row's frozen floor (inference: the plain model) and
peft's LoRA, so slow drifts of a shared machine cancel out.

Methods whose ``apply_adapter``/``prepare``/training step fail with defaults (a method that refuses
the backbone with a SiteError, one that needs task ids) are skipped with the one-line reason printed
and listed under the table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import zoo

from bench.profiles import (FLOOR, LORA_QKV, PEFT_PAIRS, PEFT_ROW, PROFILES, BenchProfile, InputBias,  # noqa: F401
                            Row, peft_config, peft_head_direct, peft_pair_rows)
from bench.timing import environment, interleaved, log, sync
from bench.profiles import TEXT_FLOOR as CLIP_TEXT_FLOOR
from bench.profiles import clip_rows


def profile(args) -> BenchProfile:
    return PROFILES[getattr(args, "backbone", "vit")]


def lora_defaults() -> dict:
    return zoo.ADAPTERS.get("lora").from_config().config


# Options the bench changes from a method's defaults, only to keep the bench's own runtime
# bounded; they do not change the trained function's cost (CoLoRA's ranks still meet the 7%
# budget, allocated from a shorter fine-tune).
BENCH_CONFIG = {"colora": {"finetune_steps": 4, "faig_steps": 4, "faig_batches": 1},
                "lora_ga": {"batches": 2}, "eva": {"max_batches": 4}}

EXTRA_ROWS = ("compile", "ckpt")
# methods that bring their own optimizer (Adapter.make_optimizer): the summary compares them with ``full``
OPTIMIZER_METHODS = ("galore", "lora_pro")


def adapter_row(prof: BenchProfile, name: str) -> Row:
    opts = prof.row_opts(name)
    return Row(name, "zoo", name, dict(BENCH_CONFIG.get(name, {})), opts=opts, ref=prof.ref_for(opts))


def default_rows(adapters: list[str] | None, extras: list[str] = (), prof: BenchProfile | None = None,
                 args=None) -> list[Row]:
    """The floor(s), the profile's recipe rows, one row per adapter (default: every registered one),
    the peft references where the profile has them, and ``extras`` like ``lora+compile`` / ``floor+ckpt``.
    ``adapters`` may name registered adapters and the profile's recipe rows (by label)."""
    prof = prof or PROFILES["vit"]
    recipes = [r for r in prof.recipe_rows(args) if r.kind != "floor"]
    floors = [Row(FLOOR, "floor")] + [r for r in prof.recipe_rows(args) if r.kind == "floor"]
    by_label = {r.label: r for r in recipes}
    names = list(adapters) if adapters else [*by_label, *zoo.list_adapters()]
    unknown = [n for n in names if n not in zoo.ADAPTERS and n not in by_label]
    if unknown:
        raise SystemExit(f"unknown adapter(s) {unknown}; registered: {', '.join(zoo.list_adapters())}"
                         + (f"; {prof.name} recipe rows: {', '.join(by_label)}" if by_label else ""))
    rows = list(floors)
    for name in names:
        rows.append(by_label[name] if name in by_label else adapter_row(prof, name))
        if name == "lora" and prof.peft:
            rows.append(Row(LORA_QKV, "zoo", "lora", {"targets": ["qkv"]}))
        if name in PEFT_PAIRS and prof.peft:
            rows += peft_pair_rows(name)
    if prof.peft:
        d = lora_defaults()
        rows.append(Row(PEFT_ROW, "peft", None, {"r": int(d["rank"]), "lora_alpha": d["alpha"],
                                                 "lora_dropout": d["dropout"], "target_modules": ["qkv"]}))
    for spec in extras:
        name, _, what = spec.partition("+")
        if what not in EXTRA_ROWS or (name != "floor" and name not in zoo.ADAPTERS and name not in by_label):
            raise SystemExit(f"--extra {spec!r}: use ADAPTER+compile or ADAPTER+ckpt (ADAPTER: floor, one of "
                             f"{', '.join(zoo.list_adapters())}" + (f" or {', '.join(by_label)}" if by_label else "") + ")")
        flags = {"compile": what == "compile", "checkpoint": what == "ckpt"}
        if name == "floor":
            rows.append(Row(f"{FLOOR}+{what}", "floor", **flags))
        else:
            base = by_label[name] if name in by_label else adapter_row(prof, name)
            rows.append(Row(spec, "zoo", base.adapter, dict(base.config), opts=dict(base.opts), ref=base.ref, source=base.source, **flags))
    return rows


# ---------------------------------------------------------------------------- building
@dataclass
class Built:
    row: Row
    model: nn.Module  # what is trained
    plain: nn.Module  # for inference: the model without the floor's input bias
    backbone: zoo.Backbone
    base_params: int
    step: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    trainable: int = 0
    artifact: int | None = None
    flops: int | None = None


def to_device(x, device: str):
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def synthetic_batches(args, n: int = 2) -> list[tuple[Any, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x, y = profile(args).make_batch(args, g)
        out.append((to_device(x, args.device), y.to(args.device)))
    return out


def build(args, row: Row) -> Built:
    prof = profile(args)
    torch.manual_seed(0)
    clf, bb = prof.build(args, row.opts)  # the task's model (classifier, CLIP head, segmenter, ...)
    clf = clf.to(args.device)
    base_params = sum(p.numel() for p in bb.parameters())
    if row.kind == "floor":
        for p in clf.parameters():
            p.requires_grad_(False)
        model: nn.Module = InputBias(clf, prof.floor_shape(args), prof.input_key).to(args.device)
        plain = clf
    elif row.kind == "zoo":
        zoo.apply_adapter(clf, row.adapter, **row.config)
        prof.after_attach(clf)
        loss = prof.loss
        # no-op unless the method is data-driven; LoRA-GA's gradient pass uses the task's loss
        zoo.prepare_adapters(clf, synthetic_batches(args), loss_fn=lambda batch: loss(clf(batch[0]), batch[1]))
        prof.after_attach(clf)
        model = plain = clf
    elif row.kind == "peft":
        from peft import get_peft_model

        model = plain = get_peft_model(clf, peft_config(row.config))
        if peft_head_direct(row):
            clf.head.requires_grad_(True)
    else:
        raise ValueError(f"unknown row kind {row.kind!r}")
    if row.checkpoint:
        zoo.checkpoint_blocks(clf)
    if row.compile:
        model.compile()  # in place, as trainer.compile=true does (tasks/trainer/perf.py)
    b = Built(row, model, plain, bb, base_params)
    b.step = make_step(b, args)
    return b


def make_step(b: Built, args) -> Callable:
    model = b.model
    if b.row.kind == "zoo":
        groups = zoo.param_groups(model, lr=1e-3, weight_decay=1e-4)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing trains: with no task head of its own on this backbone this is the frozen model "
                         "(evaluation only)")
    hooks = b.row.kind == "zoo"
    # zoo rows get the optimizer an adapter supplies (GaLore, LoRA-Pro: their cost is optimizer state,
    # compare them with the ``full`` row), AdamW otherwise
    opt = zoo.build_optimizer(model, groups, 1e-3, 1e-4) if hooks else torch.optim.AdamW(groups, lr=1e-3, weight_decay=1e-4)
    loss_fn = profile(args).loss
    steps = [0]

    def step(x, y: torch.Tensor) -> None:
        if hooks:
            zoo.on_train_step(model, steps[0])  # DyLoRA's rank sampler
            steps[0] += 1
        logits = model(x)
        loss = loss_fn(logits, y)
        if hooks:
            ctx = zoo.StepContext(model=model, inputs=x, targets=y, outputs=logits, loss=loss,
                                  loss_fn=loss_fn, forward=model)
            extra = zoo.extra_loss(model, ctx)
            if extra is not None:
                loss = loss + extra
        loss.backward()
        if hooks:
            zoo.before_optimizer_step(model)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def trainable_in_backbone(b: Built) -> int:
    if b.row.kind == "floor":
        return sum(p.numel() for p in b.model.parameters() if p.requires_grad)
    return zoo.count_parameters(b.backbone)[0]


def artifact_bytes(b: Built) -> int | None:
    if b.row.kind == "floor":
        return None
    d = Path(tempfile.mkdtemp(prefix="bench-artifact-"))
    try:
        if b.row.kind == "zoo":
            zoo.save_adapter(b.model, d)
            files = [d / "adapter.safetensors", d / "adapter.json"]
        else:
            b.model.save_pretrained(str(d))
            files = [d / "adapter_model.safetensors", d / "adapter_config.json"]
            if peft_head_direct(b.row):  # the head that LoRA rows save through modules_to_save
                from safetensors.torch import save_file

                save_file({k: v.detach().contiguous() for k, v in b.plain.base_model.model.head.state_dict().items()},
                          str(d / "head.safetensors"))
                files.append(d / "head.safetensors")
        return sum(f.stat().st_size for f in files)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------- FLOPs
def _register_cpu_attention_flops() -> None:
    """torch's FLOP counter knows the CUDA attention kernels but not CPU flash attention (what
    timm's fused attention runs here): count it with the same formulas."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is None or bwd is None or fwd in fc.flop_registry or fwd.default in fc.flop_registry:
        return

    @fc.register_flop_formula(fwd)
    def _fwd(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    @fc.register_flop_formula(bwd)
    def _bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)


def step_flops(b: Built, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of one training step: matmuls, convolutions and attention of
    forward + backward, as torch's FlopCounterMode counts them (elementwise ops not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        b.step(x, y)
    return int(counter.get_total_flops())


def flops_or_none(args, b: Built, x, y) -> int | None:
    """The step's FLOPs, or None (logged) when counting fails while the step itself works (e.g. a
    method that takes autograd.grad of a teacher pass inside torch's FlopCounterMode)."""
    try:
        return step_flops(b, x, y)
    except Exception as e:  # noqa: BLE001 - the row is still timed, its FLOP cells stay empty
        b.model.zero_grad(set_to_none=True)
        log(args, f"  FLOPs of {b.row.label!r} not counted: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        return None


# ---------------------------------------------------------------------------- timing
def merge(b: Built) -> nn.Module | None:
    """The merged model (unloaded wrappers), or None when the method is not mergeable."""
    if b.row.kind == "floor":
        return b.plain
    if b.row.kind == "peft":
        return b.model.merge_and_unload()
    try:
        return zoo.merge_adapters(b.model, unload=True)
    except zoo.NotMergeableError:
        return None


def rel(times: dict[str, list[float]], ref_times: dict[str, list[float]], ref_of: dict[str, str]
        ) -> dict[str, float | None]:
    """Median over rounds of each row's time over its reference row's time in the same round."""
    return {k: statistics.median(t / r for t, r in zip(v, ref_times[ref_of[k]])) if ref_of.get(k) in ref_times
            else None for k, v in times.items()}


def ratios(times: dict[str, list[float]], ref: str) -> dict[str, float | None]:
    if ref not in times:
        return {k: None for k in times}
    return {k: statistics.median(t / r for t, r in zip(v, times[ref])) for k, v in times.items()}


# ---------------------------------------------------------------------------- memory
def peak_memory_child(args, row: Row) -> tuple[int, int]:
    """Run in a fresh process: build ``row``, do a few training steps; return the peak bytes and the
    bytes in use once the model and the batch are built (CUDA allocated, or the resident set size)."""
    b = build(args, row)
    x, y = synthetic_batches(args, 1)[0]
    sync(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = int(torch.cuda.memory_allocated())
    else:
        base = current_rss()
    for _ in range(2):
        b.step(x, y)
    sync(args.device)
    if args.device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated()), base
    return peak_rss(), base


def current_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss() -> int:
    """This process's peak resident set size in bytes.

    ``VmHWM`` of /proc/self/status where it exists: ``ru_maxrss`` is not usable in a child, as
    Linux carries the parent's high-water mark across fork + exec into it.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def peak_memory(args, row: Row, with_base: bool = False):
    """Peak bytes of ``row``'s training steps in a fresh process (``with_base``: and the bytes in use
    before the first step, as a pair), or None when the child failed."""
    cmd = [sys.executable, "-m", "bench.adapters", *child_argv(args), "--_memory-row", json.dumps(asdict(row))]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    for line in res.stdout.splitlines()[::-1]:
        if line.startswith("PEAK_BYTES "):
            peak, base = (int(v) for v in line.split()[1:3])
            return (peak, base) if with_base else peak
    log(args, f"  memory of {row.label!r} failed: {res.stderr.strip().splitlines()[-1:] }")
    return None


def child_argv(args) -> list[str]:
    a = ["--backbone", getattr(args, "backbone", "vit"),
         "--model", args.model, "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
         "--device", args.device, "--num-classes", str(args.num_classes), "--threads", str(args.threads)]
    for dest in ("depth", "kwargs", *profile(args).extra_args):
        if getattr(args, dest, None) is not None:
            a += ["--" + dest.replace("_", "-"), str(getattr(args, dest))]
    return a


# ---------------------------------------------------------------------------- run
def run(args) -> dict:
    prof = profile(args)
    rows = default_rows(args.adapters, args.extra or [], prof, args)
    x, y = synthetic_batches(args, 1)[0]
    built: list[Built] = []
    skipped: dict[str, str] = {}
    for row in rows:
        try:
            b = build(args, row)
            b.step(x, y)  # one step must work with defaults, else the method needs more than we give it
            b.trainable, b.artifact = trainable_in_backbone(b), artifact_bytes(b)  # before any merge
            b.flops = None if row.compile else flops_or_none(args, b, x, y)  # compiled: same arithmetic as eager
            built.append(b)
        except Exception as e:  # noqa: BLE001 - report and go on with the other methods
            skipped[row.label] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            if row.adapter in prof.skip_notes:
                skipped[row.label] += f" ({prof.skip_notes[row.adapter]})"
            log(args, f"skip {row.label}: {skipped[row.label]}")
            if args.verbose:
                traceback.print_exc()
    log(args, f"built {len(built)} rows on {args.device}; timing training steps")

    for b in built:
        b.model.train()
    train = interleaved(built, {b.row.label: (lambda b=b: b.step(x, y)) for b in built}, args, "train")

    def infer_fns(models: dict[str, nn.Module]) -> dict[str, Callable]:
        def fn(m):
            def call():
                with torch.inference_mode():
                    m(x)
            return call
        return {k: fn(m) for k, m in models.items()}

    for b in built:
        b.plain.eval()
    infer = interleaved(built, infer_fns({b.row.label: b.plain for b in built if b.row.timed_inference}), args,
                        "inference")
    merged_models: dict[str, nn.Module] = {}
    for b in built:
        if not b.row.timed_inference or args.skip_merged:
            continue
        m = merge(b)
        if m is not None:
            merged_models[b.row.label] = m.eval()
    merged = interleaved(built, infer_fns(merged_models), args, "merged inference")

    summary = {}
    if LORA_QKV in train and PEFT_ROW in train:
        per_round = [a / b for a, b in zip(train[LORA_QKV], train[PEFT_ROW])]
        summary["lora_qkv_over_peft_rounds"] = per_round
        summary["lora_qkv_over_peft"] = statistics.median(per_round)
    for name, (ours, theirs) in PEFT_PAIRS.items():  # zoo / peft of the same method, same targets
        if ours in train and theirs in train:
            per_round = [a / b for a, b in zip(train[ours], train[theirs])]
            summary[f"{name}_qkv_over_peft_rounds"] = per_round
            summary[f"{name}_qkv_over_peft"] = statistics.median(per_round)
    # methods whose cost is optimizer state (their own optimizer) against full fine-tuning, same rounds
    over_full = {lab: statistics.median(a / f for a, f in zip(train[lab], train["full"]))
                 for lab in OPTIMIZER_METHODS if lab in train and "full" in train}
    if over_full:
        summary["step_over_full"] = over_full
    results = []
    # each row against its own floor (CLIP's head=text rows: the text floor) and against peft's LoRA;
    # merged rows compare to the plain model and to peft's *unmerged* inference of the same round
    ref_of = {b.row.label: b.row.ref if b.row.ref in train else FLOOR for b in built}
    r_train = {"floor": rel(train, train, ref_of), "peft": ratios(train, PEFT_ROW)}
    r_infer = {"floor": rel(infer, infer, ref_of), "peft": ratios(infer, PEFT_ROW)}
    r_merged = {"floor": rel(merged, infer, ref_of), "peft": rel(merged, infer, {k: PEFT_ROW for k in merged})}
    flops_of = {b.row.label: b.flops for b in built}
    for b in built:
        lab = b.row.label
        tr = b.trainable
        floor_flops = flops_of.get(ref_of[lab])
        results.append({
            "label": lab,
            "config": b.row.describe_config(),
            "ref": ref_of[lab],
            "trainable": tr,
            "trainable_pct": 100.0 * tr / b.base_params,
            "artifact_bytes": b.artifact,
            "train_s": statistics.median(train[lab]),
            "train_x_floor": r_train["floor"][lab], "train_x_peft": r_train["peft"][lab],
            "step_flops": b.flops,
            "flops_x_floor": b.flops / floor_flops if b.flops and floor_flops else None,
            "infer_s": statistics.median(infer[lab]) if lab in infer else None,
            "infer_x_floor": r_infer["floor"].get(lab), "infer_x_peft": r_infer["peft"].get(lab),
            "merged_s": statistics.median(merged[lab]) if lab in merged else None,
            "merged_x_floor": r_merged["floor"].get(lab), "merged_x_peft": r_merged["peft"].get(lab),
        })
    by_label = {r["label"]: r for r in results}
    summary["checks"] = prof.checks(by_label, train, args)
    if prof.name == "clip" and getattr(args, "class_counts", None):
        summary["checks"].append(clip_class_count_check(args))
    return {"rows": results, "skipped": skipped, "summary": summary, "built": built}


DEFAULTS = {"batch_size": 32, "steps": 3, "repeats": 3,
            "warmup": 1}
PRESETS = {
    # the realistic CPU profile: 197 tokens per image, as a 224 px ViT sees at fine-tuning time
    "realistic": {"model": "vit_small_patch16_224", "img_size": 224, "batch_size": 8, "steps": 1, "repeats": 5,
                  "warmup": 2, "extra": ["lora+compile", "hydra+compile", "salt+compile", "floor+ckpt",
                                         "lora+ckpt"]},
    # the quick table: 17 tokens per image, which overstates token methods (VPT, Q-Adapter)
    "quick": {"model": "vit_small_patch16_224", "img_size": 64, "batch_size": 32, "steps": 1, "repeats": 3,
              "warmup": 1},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line with the backbone's and the preset's defaults filled in."""
    p = argparse.ArgumentParser(prog="python -m bench.adapters", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="realistic: ViT-S/16 at 224 px, batch 8, 5 rounds, + compile / checkpointing rows; "
                        "quick: 64 px, batch 32, 3 rounds. Options given explicitly override the preset.")
    p.add_argument("--backbone", choices=list(PROFILES), default="vit",
                   help="; ".join(f"{k}: {v.help} (default model {v.default_model})" for k, v in PROFILES.items()))
    p.add_argument("--max-length", type=int, default=1024, help="AST input frames (--backbone ast)")
    p.add_argument("--model", default=None,
                   help="the backbone's model name (timm ViT / SAM, open_clip CLIP / CoCa, MORPH size, NAFNet layout)")
    p.add_argument("--img-size", type=int, default=None,
                   help="image size (default 224; sam 256; nafnet 64); morph: the sample's spatial size w")
    p.add_argument("--depth", type=int, default=None,
                   help="override the number of blocks (every tower of CLIP / CoCa; tiny test models)")
    p.add_argument("--kwargs", default=None,
                   help="JSON options for the backbone (e.g. '{\"dim\": 32}' for MORPH, '{\"width\": 32}' for "
                        "NAFNet, '{\"text_cfg\": {\"width\": 256}}' merged into open_clip's tower configs)")
    p.add_argument("--head-kwargs", default=None, help="JSON options for SAM's mask decoder (sam: SamSegmenter decoder=)")
    p.add_argument("--morph-shape", choices=["1d", "2d"], default="1d",
                   help="morph: 1-D sample (1, 1, 1, 1, 1, w) or 2-D sample (1, 2, 1, 1, w, w), w = --img-size")
    p.add_argument("--frames", type=int, default=4, help="coca: frames per video sample")
    p.add_argument("--batch-size", type=int, default=None, help="default 32")
    p.add_argument("--steps", type=int, default=None, help="timed calls per row per round (default 3)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per row before timing (default 1)")
    p.add_argument("--adapters", nargs="*", default=None, help="default: every registered adapter")
    p.add_argument("--extra", nargs="*", default=None,
                   help="extra rows ADAPTER+compile (nn.Module.compile, training step only) or ADAPTER+ckpt "
                        "(activation checkpointing of blocks); ADAPTER may be 'floor'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--class-counts", type=int, nargs="*", default=None,
                   help="clip: also count CLIP-LoRA's and the text floor's step FLOPs with this many class prompts "
                        "(e.g. 10 47 100 397 1000: EuroSAT ... ImageNet)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--memory", choices=["subprocess", "skip"], default="subprocess",
                   help="peak memory per row in a fresh subprocess (or skip it)")
    p.add_argument("--memory-jobs", type=int, default=1,
                   help="memory subprocesses run at once (each row is still measured alone in its own process)")
    p.add_argument("--out", default=None, help="folder for results.md and results.png (default bench/results; "
                                               "--serving: bench/results/serving)")
    p.add_argument("--serving", action="store_true",
                   help="the serving table instead (bench.serving): a mixed batch of K adapters in one "
                        "zoo.MultiAdapter against K separate forwards and one merged adapter, time and memory")
    p.add_argument("--serving-k", type=int, nargs="+", default=[1, 4, 16], help="--serving: numbers of adapters")
    p.add_argument("--serving-methods", nargs="+", default=["lora"],
                   help="--serving: the adapters' methods (default configs), cycled over the K adapters")
    p.add_argument("--skip-merged", action="store_true", help="do not time merged inference")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of skipped methods")
    p.add_argument("--_memory-row", dest="memory_row", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    prof = PROFILES[args.backbone]
    if args.model is None:
        args.model = prof.default_model
    if args.img_size is None:
        args.img_size = prof.default_img_size
    for k, v in {**DEFAULTS, **PRESETS.get(args.preset, {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = "bench/results/serving" if args.serving else "bench/results"
    if args.serving and args.backbone != "vit":
        p.error("--serving runs on --backbone vit (timm ViT classifiers)")
    return args


DATASET_CLASSES = {10: "EuroSAT", 47: "DTD", 100: "Caltech101", 397: "SUN397", 1000: "ImageNet"}


def clip_flops_at_class_counts(args, counts) -> dict[int, float | None]:
    """CLIP-LoRA's step FLOPs over the text floor's, counted (not predicted) at each class count on this
    run's batch: both rows rebuilt with ImageNet's first ``n`` class names (the text tower's work grows
    with the prompts and with the longest one's length)."""
    import copy

    rows = {r.label: r for r in clip_rows(args)}
    out = {}
    for n in counts:
        a = copy.copy(args)
        a.num_classes, a.class_names = int(n), "imagenet"
        x, y = synthetic_batches(a, 1)[0]
        f = {lab: flops_or_none(a, build(a, rows[lab]), x, y) for lab in (CLIP_TEXT_FLOOR, "CLIP-LoRA")}
        out[int(n)] = f["CLIP-LoRA"] / f[CLIP_TEXT_FLOOR] if all(f.values()) else None
    return out


def clip_class_count_check(args) -> str:
    """The check line of ``--class-counts``: CLIP-LoRA's FLOPs over the text floor's at each class count."""
    ratios = clip_flops_at_class_counts(args, args.class_counts)
    return (f"(a) CLIP-LoRA FLOPs / text-floor FLOPs at batch {args.batch_size}, counted at each class count "
            "(ImageNet's first n class names): "
            + ", ".join(f"{n} classes (as {DATASET_CLASSES[n]}) {v:.2f}×" if n in DATASET_CLASSES else
                        f"{n} classes {v:.2f}×" for n, v in ratios.items() if v is not None))


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")

    if args.serving:
        from bench.serving import run_serving

        return run_serving(args, argv)

    if args.memory_row is not None:  # child process of peak_memory()
        print("PEAK_BYTES {} {}".format(*peak_memory_child(args, Row(**json.loads(args.memory_row)))), flush=True)
        return None

    res = run(args)
    if args.memory == "subprocess":
        log(args, "measuring peak memory (one fresh process per row)")
        from concurrent.futures import ThreadPoolExecutor

        def measure(b):  # a compiled row would compile again: not measured
            return None if b.row.compile else peak_memory(args, b.row, with_base=True)

        with ThreadPoolExecutor(max_workers=max(1, args.memory_jobs)) as pool:  # each row its own process
            peaks = list(pool.map(measure, res["built"]))
        for r, pb in zip(res["rows"], peaks):
            r["peak_bytes"], r["step_mem_bytes"] = (pb[0], max(0, pb[0] - pb[1])) if pb else (None, None)
    else:
        for r in res["rows"]:
            r["peak_bytes"] = r["step_mem_bytes"] = None
    mem = {r["label"]: r["peak_bytes"] for r in res["rows"]}
    for r in res["rows"]:
        floor_mem = mem.get(r["ref"])
        r["mem_x_floor"] = r["peak_bytes"] / floor_mem if r["peak_bytes"] and floor_mem else None
    del res["built"]
    over = res["summary"].get("step_over_full")
    if over and mem.get("full"):
        res["summary"]["mem_over_full"] = {lab: mem[lab] / mem["full"] for lab in over if mem.get(lab)}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python -m bench.adapters " + shlex.join(argv if argv is not None else sys.argv[1:])
    md = markdown(res, args, cmd)
    from zoo.io import atomic_write_text

    atomic_write_text(out / "results.md", md)
    atomic_write_text(out / "results.json", json.dumps({"command": cmd, **res}, indent=1) + "\n")
    plot(res["rows"], out / "results.png", args)
    print_rich(res, args)
    return res


# ---------------------------------------------------------------------------- output
COLUMNS = ["method", "config", "trainable", "%", "artifact", "step ms", "×floor", "×peft", "step GFLOP",
           "FLOP ×floor", "peak mem", "mem ×floor", "step mem", "infer ms", "×floor", "×peft", "merged ms", "×floor", "×peft"]


def _fmt_ratio(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def _fmt_gflop(v) -> str:
    return "—" if v is None else f"{v / 1e9:.3g}"


def _fmt_ms(v) -> str:
    return "—" if v is None else f"{1e3 * v:.1f}"


def _fmt_bytes(n) -> str:
    if n is None:
        return "—"
    for unit, s in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= s:
            return f"{n / s:.1f} {unit}"
    return f"{n} B"


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}K" if n >= 1e3 else str(n))


def table_cells(r: dict) -> list[str]:
    return [r["label"], r["config"], _fmt_count(r["trainable"]), f"{r['trainable_pct']:.3f}",
            _fmt_bytes(r["artifact_bytes"]), _fmt_ms(r["train_s"]), _fmt_ratio(r["train_x_floor"]),
            _fmt_ratio(r["train_x_peft"]), _fmt_gflop(r.get("step_flops")), _fmt_ratio(r.get("flops_x_floor")),
            _fmt_bytes(r.get("peak_bytes")), _fmt_ratio(r.get("mem_x_floor")),
            _fmt_bytes(r.get("step_mem_bytes")), _fmt_ms(r["infer_s"]),
            _fmt_ratio(r["infer_x_floor"]), _fmt_ratio(r["infer_x_peft"]), _fmt_ms(r["merged_s"]),
            _fmt_ratio(r["merged_x_floor"]), _fmt_ratio(r["merged_x_peft"])]


def input_desc(args) -> str:
    return profile(args).describe_input(args)


def markdown(res: dict, args, cmd: str) -> str:
    prof = profile(args)
    lines = [
        f"# Adapter cost ({args.backbone}): {args.model}{f' depth {args.depth}' if args.depth else ''} at "
        f"{input_desc(args)}, batch {args.batch_size}, {args.device}",
        "",
        f"Command: `{cmd}`  ",
        f"Environment: {environment(args)}; {args.repeats} interleaved rounds × {args.steps} timed calls per row "
        f"after {args.warmup} warm-up call(s).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2)) + "|",
    ]
    for r in res["rows"]:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in table_cells(r)) + " |")
    sm = res.get("summary", {})
    if "lora_qkv_over_peft" in sm:
        rounds = ", ".join(f"{v:.2f}" for v in sm["lora_qkv_over_peft_rounds"])
        lines += ["", f"**zoo LoRA / peft LoRA, same targets (qkv), training step: {sm['lora_qkv_over_peft']:.2f}** "
                      f"(median of interleaved rounds: {rounds})."]
    for name, (ours, theirs) in PEFT_PAIRS.items():
        if f"{name}_qkv_over_peft" in sm:
            rounds = ", ".join(f"{v:.2f}" for v in sm[f"{name}_qkv_over_peft_rounds"])
            lines += ["", f"**zoo {name} / peft {name}, same targets (qkv), training step: "
                          f"{sm[f'{name}_qkv_over_peft']:.2f}** (`{ours}` / `{theirs}`; rounds: {rounds})."]
    if sm.get("step_over_full"):
        mo = sm.get("mem_over_full", {})
        lines += ["", "**Own optimizers against full fine-tuning** (training step"
                  + (", peak memory" if mo else "") + " / the `full` row's): "
                  + "; ".join(f"{lab} {v:.2f}×" + (f", {mo[lab]:.2f}×" if lab in mo else "")
                              for lab, v in sm["step_over_full"].items()) + "."]
    mem = ("CUDA max allocated" if args.device.startswith("cuda")
           else "peak resident set size of the whole process (Python, torch, model and data included)")
    lines += [
        "",
        "Notes:",
        "- **trainable**: trainable parameters inside the backbone (adapter parameters, or the backbone's own "
        "for `full`/`bitfit`), excluding the task head, which trains in every row except the floor; "
        "**%** is relative to the backbone's parameters.",
        "- **artifact**: bytes on disk of `zoo.save_adapter` (adapter.safetensors + adapter.json, head included); "
        "for peft, `save_pretrained` (adapter_model.safetensors + adapter_config.json, head via "
        "`modules_to_save`, model-card README excluded).",
        f"- **step**: forward + cross-entropy + backward + optimizer step (AdamW, or the method's own optimizer: GaLore, LoRA-Pro, whose cost is optimizer state, to be read against the `full` row; zoo rows also run the adapter hooks "
        f"`extra_loss`/`before_optimizer_step`). **peak mem**: {mem}, measured in a fresh subprocess per row; "
        f"**step mem**: that peak minus what the process held once the model and the batch were built (the "
        f"training step's own working memory: activations, gradients, optimizer state).",
        f"- **×floor / ×peft**: median over rounds of the per-round ratio to the row's floor (training: "
        f"{prof.floor_note}; inference: the plain model)"
        + (f" and to `{PEFT_ROW}` (for merged inference: peft's *unmerged* inference)." if prof.peft else "."),
        "- **merged**: after `zoo.merge_adapters(model, unload=True)` (peft: `merge_and_unload()`); "
        "— = not mergeable.",
        "- **step GFLOP / FLOP ×floor**: the arithmetic of one training step (forward + backward; matmuls, "
        "convolutions and attention as torch's `FlopCounterMode` counts them, 2 FLOPs per multiply-add; "
        "elementwise ops and the optimizer are not counted). `FLOP ×floor − 1` is the method's own "
        "arithmetic relative to the frozen backbone's: where it is well above 1.15 the method is costlier by "
        "its mathematics, not by our implementation; where the time ratio is well above the FLOP ratio the "
        "difference is memory traffic or kernel overhead.",
        "- **+compile** rows: `model.compile()` (torch.compile in place, what `trainer.compile=true` does), "
        "training step only, compile time excluded (warm-up); **+ckpt** rows: `zoo.checkpoint_blocks` "
        "(`trainer.checkpoint_blocks=true`), memory and time against the same method without it.",
        "- Timings on a shared CPU are noisy: read the ratios, not the milliseconds.",
    ]
    lines += [f"- {n}" for n in prof.notes(args)]
    if sm.get("checks"):
        lines += ["", "Checks:"] + [f"- {c}" for c in sm["checks"]]
    if res["skipped"]:
        lines += ["", f"Skipped (refused {args.backbone} or failed with the default config on a synthetic batch):"]
        lines += [f"- `{k}`: {v}" for k, v in res["skipped"].items()]
    return "\n".join(lines) + "\n"


def print_rich(res: dict, args) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"{args.model} @ {input_desc(args)}, batch {args.batch_size}, {args.device}")
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("method", "config") else "right")
    for r in res["rows"]:
        t.add_row(*(escape(c) for c in table_cells(r)))  # "lora[qkv]" is not markup
    Console(width=250).print(t)
    for k, v in res["skipped"].items():
        print(f"skipped {k}: {v}")
    if "lora_qkv_over_peft" in res.get("summary", {}):
        print(f"zoo LoRA / peft LoRA (same targets, training step): {res['summary']['lora_qkv_over_peft']:.2f}")
    for lab, v in res.get("summary", {}).get("step_over_full", {}).items():
        print(f"{lab} / full fine-tuning (training step): {v:.2f}")
    for c in res.get("summary", {}).get("checks", []):
        print(c)


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import math

    fig, ax = plt.subplots(figsize=(7, 4.5))
    placed: list[tuple[float, float]] = []
    for r in rows:
        if r["train_x_floor"] is None:
            continue
        pct, y = max(r["trainable_pct"], 1e-5), r["train_x_floor"]
        ax.scatter(pct, y, s=25)
        # stack the labels of points that sit on top of each other (e.g. the LoRA rows)
        near = sum(abs(math.log10(pct) - a) < 0.1 and abs(y - b) < 0.03 for a, b in placed)
        placed.append((math.log10(pct), y))
        ax.annotate(r["label"], (pct, y), textcoords="offset points", xytext=(5, 3 - 10 * near), fontsize=8)
    ax.set_xscale("log")
    ax.axhline(1.0, color="grey", lw=0.7, ls="--")
    ax.set_xlabel("trainable parameters (% of backbone, log scale)")
    ax.set_ylabel("training step time / the row's frozen floor")
    ax.set_title(f"{args.model} @ {input_desc(args)}, batch {args.batch_size}, {args.device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
