"""PDE forecasting: autoregressive rollout and per-field, per-step error metrics (plain torch).

Rollout (MORPH ``visualize_rollouts_3d_full.py`` / PDEBench): from ``t`` context frames, predict the next
frame, drop the oldest input frame and append the prediction, ``horizon`` times.

Metrics, per sample, field f and rollout step k, over the field's components and space (after
de-normalisation, on the original spatial region), then averaged over samples (eps = 1e-7):

* MSE = mean((p − y)²), RMSE = √MSE
* nRMSE = √(MSE / (mean(y²) + eps))          (PDEBench's nRMSE, MORPH's relative L2)
* VRMSE = √(MSE / (var(y) + eps))            (The Well; predicting the mean gives 1)

MORPH's own scripts pool time, fields and components per trajectory before the ratio; the per-field,
per-step tables here are PDEBench's / The Well's convention. ``summary`` averages the tables over steps and fields.
"""
from __future__ import annotations

from typing import Callable

import torch

METRICS = ("mse", "rmse", "nrmse", "vrmse")
EPS = 1e-7


@torch.no_grad()
def rollout(step: Callable[[torch.Tensor], torch.Tensor], context: torch.Tensor, horizon: int) -> torch.Tensor:
    """``context (B, t, F, C, D, H, W)`` -> predictions ``(B, horizon, F, C, D, H, W)``, feeding each back."""
    x, preds = context, []
    for _ in range(horizon):
        y = step(x)
        preds.append(y)
        x = torch.cat([x[:, 1:], y[:, None].to(x.dtype)], dim=1)
    return torch.stack(preds, dim=1)


def per_sample_errors(pred: torch.Tensor, true: torch.Tensor) -> dict[str, torch.Tensor]:
    """``pred``, ``true`` ``(B, K, F, C, D, H, W)`` -> each metric ``(B, K, F)``."""
    dims = (3, 4, 5, 6)
    pred, true = pred.double(), true.double()
    mse = (pred - true).pow(2).mean(dim=dims)
    energy = true.pow(2).mean(dim=dims)
    var = true.var(dim=dims, unbiased=False)
    return {"mse": mse, "rmse": mse.sqrt(), "nrmse": (mse / (energy + EPS)).sqrt(), "vrmse": (mse / (var + EPS)).sqrt()}


class RolloutMetrics:
    """Accumulates per-sample errors; ``tables()`` gives each metric as a ``(K, F)`` mean over samples."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def update(self, pred: torch.Tensor, true: torch.Tensor) -> None:
        errs = per_sample_errors(pred, true)
        for k, v in errs.items():
            s = v.sum(0).cpu()
            self.sums[k] = s if k not in self.sums else self.sums[k] + s
        self.count += pred.shape[0]

    def merge_counts(self, sums: dict[str, torch.Tensor], count: int) -> None:
        for k, v in sums.items():
            self.sums[k] = v if k not in self.sums else self.sums[k] + v
        self.count += count

    def tables(self) -> dict[str, torch.Tensor]:
        if not self.count:
            raise ValueError("no rollout samples were evaluated")
        return {k: v / self.count for k, v in self.sums.items()}

    def summary(self) -> dict[str, float]:
        return {k: float(v.mean()) for k, v in self.tables().items()}


def format_table(tables: dict[str, torch.Tensor], metric: str = "nrmse", fields: list[str] | None = None) -> str:
    t = tables[metric]
    fields = fields or [f"field{j}" for j in range(t.shape[1])]
    lines = [f"| step | {' | '.join(fields)} | mean |", "|---" * (len(fields) + 2) + "|"]
    for k in range(t.shape[0]):
        lines.append(f"| {k + 1} | " + " | ".join(f"{float(v):.4g}" for v in t[k]) + f" | {float(t[k].mean()):.4g} |")
    return "\n".join(lines)


def plot_error_vs_step(tables: dict[str, torch.Tensor], path, metrics=("nrmse", "vrmse")) -> None:
    """Error vs rollout step (mean over fields), one line per metric, written atomically."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in metrics:
        v = tables[m].mean(dim=1)
        ax.plot(range(1, len(v) + 1), v.numpy(), marker="o", label=m)
    ax.set_xlabel("rollout step")
    ax.set_ylabel("error (mean over fields)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
