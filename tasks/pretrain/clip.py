"""Pretrain the embedded tiny CLIP on rendered (image, caption) pairs with open_clip's own loss.

The model is an open_clip ``ViT-B-16`` config shrunk to a toy size (:data:`TINY_CLIP`), trained
contrastively (``open_clip.ClipLoss``: symmetric InfoNCE with the learned temperature) on
coloured shapes (:mod:`tasks.data.fewshot_shapes`) with captions drawn from several phrasings
("a photo of a red circle.", "a red shape", "a photo of a star.", ...), so that zero-shot
classification of the embedded datasets (``Shapes``, ``ShapeColors``, ``ShapeForms``) is clearly
above chance and tuning can lose it. The result is cached as safetensors::

    python -m tasks.pretrain.clip            # -> checkpoints/clip/tiny_shapes_p4_s1000.safetensors (~150-180 CPU s)

and used by ``backbone=clip_tiny`` (``conf/backbone/clip_tiny.yaml``).

Toy scale, measured (zero-shot top-1 on the Shapes base-class test split / on ShapeForms; colours are
always 100 %: forms are what the model must learn; 2 shared CPU cores, heavily loaded):

=====================================================  ===========  ==========
vision tower, pretraining                              Shapes base  ShapeForms
=====================================================  ===========  ==========
8-px patches (4×4 tokens), 2 blocks, 500 steps (old)   46.7 %       48.4 %
same, 1200 steps                                       51.7 %       50.0 %
same, 1200 steps, lr 5e-3                              49.2 %       45.3 %
4-px patches (8×8 tokens), 2 blocks, 1000 steps        60.8 %       59.4 %
4-px patches, 3 blocks, 1000 steps                     71.7 %       68.8 %
4-px patches, 3 blocks, 2000 steps (until 12-07)       80.8 %       73.4 %
batches of 34 never-repeated captions, 2 / 3 blocks    50.8 / 63.3  51.6 / 59.4
=====================================================  ===========  ==========

The 2-block, 8-px ViT barely tells a star from a square; finer patches and one more block do.

The default is 1000 steps of 64 pairs so that ``make clip-demo`` fits 5 minutes of one core, pretraining
included. Measured 2026-12-07 (``python -m tasks.pretrain.clip_shift none cast+noise --weights ...``: zero-shot on
the 12 base classes, 40 images each, clean and as ShapesGrainy renders them, and a frozen-feature 16-shot probe;
CPU seconds at one thread under a load of 8-16 on 2 cores):

==========================  ======  ===========  ====================  ================
steps × batch               CPU s   clean ZS     ShapesGrainy ZS       ShapesGrainy probe
==========================  ======  ===========  ====================  ================
2000 × 64                   293     75.2 %       37.1 %                58.3 %
1000 × 64 (the default)     177     67.1 %       34.8 %                54.4 %
1200 × 32                   144     51.0 %       35.2 %                46.5 %
600 × 64                    107     54.4 %       38.7 %                52.7 %
==========================  ======  ===========  ====================  ================

On the 600-step model CLIP-LoRA (240 iterations, seed 1) lost on the new classes (47.9 % vs zero-shot 53.1 %) and
10.9 points of held-out zero-shot: too little pretraining for the demo's point, so 1000.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from tasks.data.fewshot_shapes import COLORS, FORMS, render

log = logging.getLogger(__name__)

TINY_CLIP = dict(
    model="ViT-B-16",
    embed_dim=64,
    vision_cfg=dict(image_size=32, layers=3, width=64, patch_size=4, head_width=32),
    text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2),
)
DEFAULT_PATH = Path(os.environ.get("PROJECT_ROOT", ".")) / "checkpoints" / "clip" / "tiny_shapes_p4_s1000.safetensors"
# 1000 steps of 64 pairs: ~150 CPU s at one thread, so that `make clip-demo` (pretraining included) fits 5 minutes
# on a quiet machine; 2000 steps make a better tiny CLIP at twice the cost (module docstring)
STEPS = 1000
CAPTIONS = ("a photo of a {c} {f}.", "a {c} {f}", "a {f} that is {c}", "a photo of a {c} shape.",
            "a photo of a {f}.", "{c} {f}")


def build_tiny(**overrides):
    import open_clip

    cfg = {**TINY_CLIP, **overrides}
    name = cfg.pop("model")
    from zoo.backbones.clip import open_clip_quietly

    with open_clip_quietly(no_hub_weights=True):  # pretrained from scratch, on purpose
        return open_clip.create_model(name, pretrained=None, **cfg)


def pretrain(path: str | Path = DEFAULT_PATH, steps: int = STEPS, batch_size: int = 64, pool: int = 4000,
             lr: float = 2e-3, seed: int = 0) -> Path:
    """Train and save (atomically) the tiny CLIP; returns the path."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_tiny()
    from zoo.backbones.clip import open_clip_quietly

    with open_clip_quietly():
        tok = open_clip.get_tokenizer("ViT-B-16", context_length=TINY_CLIP["text_cfg"]["context_length"])
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    colors, forms = list(COLORS), list(FORMS)
    pairs = [(colors[rng.integers(6)], forms[rng.integers(4)]) for _ in range(pool)]
    images = torch.from_numpy(np.stack([np.asarray(render(c, f, rng)) for c, f in pairs])).permute(0, 3, 1, 2)
    images = (images.float() / 255 - mean) / std
    loss_fn = open_clip.ClipLoss()
    # fused: one kernel over all tensors (the 49408-row token embedding makes the unfused step ~40 % of the time)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    t0 = time.time()
    for step in range(steps):
        idx = rng.choice(pool, batch_size, replace=False)
        caps = [CAPTIONS[rng.integers(len(CAPTIONS))].format(c=pairs[i][0], f=pairs[i][1]) for i in idx]
        img_f, txt_f, scale = model(images[idx], tok(caps))
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        if step % 50 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.3f (%.0fs)", step, steps, loss.item(), time.time() - t0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return path


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_PATH))
    ap.add_argument("--steps", type=int, default=STEPS)
    a = ap.parse_args()
    print(pretrain(a.out, steps=a.steps))


if __name__ == "__main__":
    main()
