"""PDE forecasting: autoregressive rollout and per-field, per-step error metrics (plain torch).

Rollout (MORPH ``visualize_rollouts_3d_full.py`` / PDEBench): from ``t`` context frames, predict the next
frame, drop the oldest input frame and append the prediction, ``horizon`` times.

Metrics, per sample, field f and rollout step k (after de-normalisation, on the original spatial region),
then averaged over samples (eps = 1e-7). A vector field's components are PDEBench's *channels*: the ratios
are taken per channel c, over space, then averaged over the field's components:

* MSE = mean_{c,x}((p − y)²), RMSE = √MSE
* nRMSE = mean_c √(mean_x((p − y)²) / (mean_x(y²) + eps))    (PDEBench ``metric_func``'s nRMSE)
* VRMSE = mean_c √(mean_x((p − y)²) / (s_x(y)² + eps))        (The Well's ``VRMSE``: ``NRMSE`` with
  ``norm_mode="std"``, ``s`` = ``torch.std``, the unbiased standard deviation over space; predicting the
  mean gives √((N−1)/N) ≈ 1)
* max error = mean_c max_{samples, x} |p − y|                  (PDEBench's ``err_Max``: the worst point
  of the split, per channel and step; merged over DDP ranks by maximum)

Pooling the components before the ratio (the project's earlier nRMSE) weights a strong component over a
weak one: with V_y = 0.3·V_x the pooled value is 1.6× below PDEBench's. MORPH's own scripts pool time,
fields and components per trajectory before the ratio; the per-field, per-step tables here are PDEBench's /
The Well's convention. ``summary`` averages the tables over steps and fields (PDEBench's ``if_mean``: over
channels and time).

**Channels.** PDEBench and The Well average nRMSE and VRMSE over *channels*: each scalar field is one, each
component of a vector field is one (The Well's ``velocity_x``, ``velocity_y``; its "full" VRMSE is the mean
over them, ``Trainer.split_up_losses``). A field's row in the tables is the mean over its components, so
the mean over fields weights a vector's components less than a scalar when both are present. Given the
channels (``(field, component)`` pairs: a scalar's repeated UPTF-7 slots count once), :meth:`RolloutMetrics.channel_tables`
gives nRMSE and VRMSE per channel and ``summary(channels)`` averages those two over channels, as the
references do; without a vector field beside scalars both means agree.

PDEBench's further metrics (Takamoto et al., *PDEBench*, NeurIPS 2022 Datasets & Benchmarks;
``pdebench/models/metrics.py`` ``metric_func``, reimplemented from its definitions), per PDEBench channel,
i.e. per (field, component), then averaged over the field's components. ``N`` is the number of grid points
of the n non-singleton spatial axes (sizes ``n_1..n_n``), ``e = p − y``, ``E`` the plain (unscaled) DFT of
``e`` over space, ``L_a = 1`` the domain lengths (PDEBench's scripts always pass 1):

* cRMSE (conserved quantity): ``√(mean_samples((Σ_x p − Σ_x y)²)) / N``, the RMS over samples of the error
  of the spatial mean.
* bRMSE (boundary): per sample ``√(Σ_faces e² / Σ_a 2·Π_{b≠a} n_b)``, averaged over samples: the squared
  error summed over both end faces of every axis (edges and corners counted once per face they lie on)
  over the number of face points; 1-D ``√((e_0² + e_last²)/2)``, 2-D denominator ``2n_x + 2n_y``.
* fRMSE (Fourier bands): a spectrum ``S(κ) = √(mean_samples(Σ_{k ∈ bin κ} |E_k|²)) · Π L_a / N``, then its
  mean over ``κ < 4`` (low), ``4 ≤ κ < 12`` (mid), ``κ ≥ 12`` (high). 1-D: ``E`` is the ``rfft`` and every
  wavenumber ``0..n//2`` is its own bin. 2-D / 3-D: only the indices ``0 ≤ k_a < n_a // 2`` enter,
  binned by ``⌊|k|⌋``, bins ``κ < min_a(n_a // 2)``. An empty band (grid too small) is NaN, as in PDEBench.

cRMSE and fRMSE are RMS over samples, so they are pooled over the whole split here (error sums reduced
over DDP ranks); PDEBench computes them per batch and averages over batches, which equals this when the
split is one batch. PDEBench's 3-D bRMSE code flattens channels into its face sum; here it is per channel,
as its 1-D and 2-D versions (identical for one channel).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

METRICS = ("mse", "rmse", "nrmse", "vrmse", "max_err", "crmse", "brmse", "frmse_low", "frmse_mid", "frmse_high")
PER_SAMPLE = ("mse", "rmse", "nrmse", "vrmse", "brmse")  # per-sample values averaged over samples
EPS = 1e-7
I_LOW, I_HIGH = 4, 12  # PDEBench's iLow, iHigh


@torch.no_grad()
def rollout(step: Callable[[torch.Tensor], torch.Tensor], context: torch.Tensor, horizon: int) -> torch.Tensor:
    """``context (B, t, F, C, D, H, W)`` -> predictions ``(B, horizon, F, C, D, H, W)``, feeding each back."""
    x, preds = context, []
    for _ in range(horizon):
        y = step(x)
        preds.append(y)
        x = torch.cat([x[:, 1:], y[:, None].to(x.dtype)], dim=1)
    return torch.stack(preds, dim=1)


def _space(x: torch.Tensor) -> torch.Tensor:
    """``(B, K, F, C, D, H, W)`` -> ``(B, K, F, C, *n)`` with only the non-singleton spatial axes (PDEBench's
    1-D / 2-D / 3-D layout; a single point stays 1-D)."""
    keep = [n for n in x.shape[4:] if n > 1] or [1]
    return x.reshape(*x.shape[:4], *keep)


def boundary_rmse(err: torch.Tensor, n: int) -> torch.Tensor:
    """PDEBench bRMSE per sample and channel: ``err (..., *sizes)`` over its last ``n`` (spatial) axes -> ``(...)``."""
    sizes = err.shape[err.ndim - n:]
    e2 = err.pow(2)
    total, points = 0.0, 0
    for a in range(n):
        face = e2.select(e2.ndim - n + a, 0) + e2.select(e2.ndim - n + a, -1)  # the two end faces of axis a
        if n > 1:
            face = face.sum(dim=tuple(range(face.ndim - (n - 1), face.ndim)))
        total = total + face
        points += 2 * math.prod(s for b, s in enumerate(sizes) if b != a)
    return (total / points).sqrt()


def binned_spectrum(err: torch.Tensor) -> torch.Tensor:
    """Per sample and channel, PDEBench's ``Σ_{k in bin κ} |E_k|²`` of ``err (B, K, F, C, *n)`` ->
    ``(B, K, F, C, bins)`` (see the module docstring for the bins)."""
    sizes = err.shape[4:]
    n = len(sizes)
    if n == 1:
        return torch.fft.rfft(err, dim=-1).abs().pow(2)
    spec = torch.fft.fftn(err, dim=tuple(range(4, 4 + n))).abs().pow(2)
    half = [s // 2 for s in sizes]
    spec = spec[(Ellipsis, *[slice(0, h) for h in half])]  # 0 <= k_a < n_a // 2
    bins = min(half)
    grids = torch.meshgrid(*[torch.arange(h, dtype=torch.float64) for h in half], indexing="ij")
    kappa = torch.floor(torch.sqrt(sum(g ** 2 for g in grids))).long().reshape(-1)
    keep = kappa < bins
    flat = spec.reshape(*spec.shape[:4], -1)[..., keep]
    out = flat.new_zeros(*flat.shape[:4], bins)
    return out.index_add_(-1, kappa[keep].to(flat.device), flat)


def per_sample_errors(pred: torch.Tensor, true: torch.Tensor) -> dict[str, torch.Tensor]:
    """``pred``, ``true`` ``(B, K, F, C, D, H, W)`` -> each per-sample metric ``(B, K, F)``."""
    space = (4, 5, 6)
    pred, true = pred.double(), true.double()
    mse_c = (pred - true).pow(2).mean(dim=space)  # (B, K, F, C): per channel
    energy = true.pow(2).mean(dim=space)
    points = math.prod(true.shape[4:])
    # The Well: torch.std (Bessel-corrected) over space; a single point has no spread to correct
    var = true.var(dim=space, correction=1 if points > 1 else 0)
    mse = mse_c.mean(dim=3)
    err = _space(pred - true)
    brmse = boundary_rmse(err, err.ndim - 4).mean(dim=3)  # per channel, then over the field's components
    nrmse_c, vrmse_c = (mse_c / (energy + EPS)).sqrt(), (mse_c / (var + EPS)).sqrt()
    return {"mse": mse, "rmse": mse.sqrt(), "nrmse": nrmse_c.mean(dim=3), "vrmse": vrmse_c.mean(dim=3),
            "brmse": brmse, "_nrmse_c": nrmse_c, "_vrmse_c": vrmse_c}


def pooled_sums(pred: torch.Tensor, true: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the batch of the squares behind cRMSE and fRMSE (RMS over samples, taken at the end):
    ``_cons`` ``(K, F, C)`` of ``((Σ_x p − Σ_x y) / N)²``; ``_spec`` ``(K, F, C, bins)`` of the binned spectrum."""
    err = _space(pred.double() - true.double())
    points = math.prod(err.shape[4:])
    cons = (err.sum(dim=tuple(range(4, err.ndim))) / points).pow(2).sum(0)
    return {"_cons": cons, "_spec": binned_spectrum(err).sum(0)}


MAXED = ("_max",)  # accumulated by maximum, not by sum


def max_abs_error(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """``(K, F, C)``: the largest |p − y| over the batch and space, per step and channel."""
    return (pred.double() - true.double()).abs().amax(dim=(0, 4, 5, 6))


def _from_pooled(sums: dict[str, torch.Tensor], count: int, spatial: tuple[int, ...],
                 lengths: tuple[float, ...] | None) -> dict[str, torch.Tensor]:
    points = math.prod(spatial)
    scale = math.prod(lengths) if lengths else 1.0
    out = {"crmse": (sums["_cons"] / count).sqrt().mean(dim=-1), "max_err": sums["_max"].mean(dim=-1)}
    spectrum = (sums["_spec"] / count).sqrt() / points * scale  # (K, F, C, bins)
    for name, band in (("frmse_low", slice(0, I_LOW)), ("frmse_mid", slice(I_LOW, I_HIGH)),
                       ("frmse_high", slice(I_HIGH, None))):
        part = spectrum[..., band]
        out[name] = (part.mean(dim=-1) if part.shape[-1] else torch.full(part.shape[:-1], float("nan"),
                                                                         dtype=part.dtype)).mean(dim=-1)
    return out


class RolloutMetrics:
    """Accumulates error sums; ``tables()`` gives each metric as a ``(K, F)`` table (see the module docstring).

    ``sums`` holds only sums over samples (per-sample metrics and the pooled squares), so the sums of
    several accumulators (DDP ranks) merge by addition. ``lengths``: the domain lengths L_a for fRMSE."""

    def __init__(self, lengths: tuple[float, ...] | None = None):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.spatial: tuple[int, ...] | None = None
        self.lengths = lengths

    def update(self, pred: torch.Tensor, true: torch.Tensor) -> None:
        errs = {k: v.sum(0) for k, v in per_sample_errors(pred, true).items()}  # incl. _nrmse_c, _vrmse_c (K, F, C)
        errs.update(pooled_sums(pred, true))
        errs["_max"] = max_abs_error(pred, true)
        for k, v in errs.items():
            self._add(k, v.cpu())
        self.count += pred.shape[0]
        self.spatial = tuple(_space(pred[:1]).shape[4:])

    def _add(self, k: str, v: torch.Tensor) -> None:
        if k not in self.sums:
            self.sums[k] = v
        else:
            self.sums[k] = torch.maximum(self.sums[k], v) if k in MAXED else self.sums[k] + v

    def merge_counts(self, sums: dict[str, torch.Tensor], count: int, spatial: tuple[int, ...] | None = None) -> None:
        for k, v in sums.items():
            self._add(k, v)
        self.count += count
        self.spatial = spatial or self.spatial

    def tables(self) -> dict[str, torch.Tensor]:
        if not self.count:
            raise ValueError("no rollout samples were evaluated")
        out = {k: self.sums[k] / self.count for k in PER_SAMPLE}
        out.update(_from_pooled(self.sums, self.count, self.spatial, self.lengths))
        return {k: out[k] for k in METRICS}

    def channel_tables(self, channels: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """nRMSE and VRMSE per step and channel, ``(K, len(channels))``; ``channels``: ``(field, component)``
        pairs (a scalar field once, a vector field once per component; see the module docstring)."""
        if not self.count:
            raise ValueError("no rollout samples were evaluated")
        f, c = torch.tensor([ch[0] for ch in channels]), torch.tensor([ch[1] for ch in channels])
        return {k: self.sums[f"_{k}_c"][:, f, c] / self.count for k in ("nrmse", "vrmse")}

    def summary(self, channels: list[tuple[int, int]] | None = None) -> dict[str, float]:
        """Each table's mean over steps and fields; with ``channels``, nRMSE and VRMSE are the mean over
        steps and channels (PDEBench's and The Well's average)."""
        out = {k: float(v.mean()) for k, v in self.tables().items()}
        if channels:
            out.update({k: float(v.mean()) for k, v in self.channel_tables(channels).items()})
        return out


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
