"""Zero-shot retention: how much of CLIP's zero-shot ability a tuned model keeps.

Two measures (reference doc §1.6), computed on every CLIP run:

* **held-out zero-shot** (ZSCL-style; the Comp-LoRA "+1.3 %" is read as this): zero-shot top-1 of
  the *tuned* backbone on datasets it was not trained on, with classifier weights rebuilt from
  class names × templates through the tuned towers, next to the untuned backbone's; the drop is
  ``untuned − tuned`` (positive = forgetting); accuracies are fractions, as ``test/acc``;
* **base-to-new** (CoCoOp): train on the base half of the classes, report top-1 on base and on new
  classes and the harmonic mean ``H = 2·B·N / (B + N)``.
"""
from __future__ import annotations

from typing import Sequence

import torch


def harmonic_mean(base: float, new: float) -> float:
    """CoCoOp's H = 2·B·N / (B + N) (0 when both are 0)."""
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def retention_row(tuned: dict[str, float], untuned: dict[str, float]) -> dict[str, float]:
    """Per held-out dataset: ``zs/<d>`` (tuned), ``zs0/<d>`` (untuned), ``zs_drop/<d>``, plus means."""
    if set(tuned) != set(untuned):
        raise ValueError(f"retention needs the same held-out datasets tuned and untuned: {sorted(tuned)} vs {sorted(untuned)}")
    row: dict[str, float] = {}
    for d in sorted(tuned):
        row[f"zs/{d}"], row[f"zs0/{d}"] = tuned[d], untuned[d]
        row[f"zs_drop/{d}"] = untuned[d] - tuned[d]
    if tuned:
        row["zs/mean"] = sum(tuned.values()) / len(tuned)
        row["zs0/mean"] = sum(untuned.values()) / len(untuned)
        row["zs_drop/mean"] = row["zs0/mean"] - row["zs/mean"]
    return row


@torch.no_grad()
def zeroshot_accuracy(backbone, classnames: Sequence[str], templates: Sequence[str], loader,
                      logit_scale: float | None = None) -> float:
    """Top-1 (a fraction) of the zero-shot classifier built through ``backbone``'s current (tuned) towers."""
    from zoo.zeroshot import CLIPClassifier

    was = backbone.training
    model = CLIPClassifier(backbone, classnames, templates, head="zeroshot", logit_scale=logit_scale).eval()
    device = next(backbone.parameters()).device
    correct = total = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    backbone.train(was)
    return correct / max(total, 1)
