"""How far each rendering shift moves the tiny CLIP: zero-shot and a frozen-feature 16-shot probe.

Used to pick ``ShapesGrainy``'s domain (:data:`tasks.data.fewshot_shapes.DOMAIN`). For each shift (a
subset of :data:`~tasks.data.fewshot_shapes.SHIFT`, ``none`` = the pretraining renderer), renders
16 + 40 images of each of the 12 Shapes base classes, then reports the zero-shot top-1 on the 40
("a photo of a {}.", 12-way), its colour / form parts, and a linear probe on the frozen, normalised
image features (initialised from the class text features, AdamW lr 1e-3, 300 full-batch steps,
logit scale 100) trained on the 16 shots -- a quick proxy of what few-shot tuning can recover::

    python -m tasks.pretrain.clip_shift none noise cast+noise outline texture small blur+noise
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tasks.base import create_backbone
from tasks.pretrain.clip import DEFAULT_PATH, TINY_CLIP
from tasks.data.fewshot_shapes import COLORS, FORMS, SHIFT, render
from tasks.fewshot import make_transforms
from zoo.zeroshot import CLIPClassifier


def measure(shifts: list[str], weights: str = str(DEFAULT_PATH), shots: int = 16, test: int = 40, seed: int = 5):
    unknown = sorted({p for name in shifts if name != "none" for p in name.split("+")} - set(SHIFT))
    if unknown:  # before loading anything
        raise ValueError(f"unknown shift components {unknown}; valid: {', '.join(SHIFT)}")
    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY_CLIP.items() if k != "model"}
    bb = create_backbone(dict(name="clip", model=TINY_CLIP["model"], pretrained=None, weights=weights,
                              img_size=32, kwargs=cfg)).eval()
    _, tf = make_transforms(32, bb.data_config["mean"], bb.data_config["std"], "none")
    classes = [(c, f) for c in COLORS for f in FORMS][:12]  # the base classes
    clf = CLIPClassifier(bb, [f"{c} {f}" for c, f in classes], ["a photo of a {}."], head="zeroshot").eval()
    rows = []
    for name in shifts:
        parts = () if name == "none" else tuple(name.split("+"))
        rng = np.random.default_rng(seed)
        imgs, ys = [], []
        for y, (c, f) in enumerate(classes):
            for _ in range(shots + test):
                imgs.append(render(c, f, rng, shift=parts))
                ys.append(y)
        ys = torch.tensor(ys)
        is_test = torch.arange(len(ys)) % (shots + test) >= shots
        with torch.no_grad():
            feats = F.normalize(bb(torch.stack([tf(i) for i in imgs])), dim=-1)
            pred = clf.head(feats).argmax(1)
        zs, yt, pt = (pred[is_test] == ys[is_test]).float().mean().item(), ys[is_test], pred[is_test]
        colour = (pt // len(FORMS) == yt // len(FORMS)).float().mean().item()
        form = (pt % len(FORMS) == yt % len(FORMS)).float().mean().item()
        w = torch.nn.Parameter(clf.head.weights.clone())
        opt = torch.optim.AdamW([w], lr=1e-3, weight_decay=1e-2)
        for _ in range(300):
            loss = F.cross_entropy(100 * feats[~is_test] @ w.t(), ys[~is_test])
            opt.zero_grad()
            loss.backward()
            opt.step()
        probe = ((feats[is_test] @ w.t()).argmax(1) == yt).float().mean().item()
        rows.append((name, zs, colour, form, probe))
        print(f"{name:20s} zero-shot {zs:6.1%}  (colour {colour:6.1%}, form {form:6.1%})  "
              f"{shots}-shot probe {probe:6.1%}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shifts", nargs="*", default=["none", "cast+noise"],
                    help=f"'none' or '+'-joined components of: {', '.join(SHIFT)}")
    ap.add_argument("--weights", default=str(DEFAULT_PATH))
    a = ap.parse_args()
    if not Path(a.weights).is_file():
        raise SystemExit(f"error: tiny CLIP weights {a.weights} not found; run `python -m tasks.pretrain.clip` "
                         f"first or pass --weights")
    try:
        measure(a.shifts, a.weights)
    except ValueError as e:  # an unknown shift component: one line naming the valid ones
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
