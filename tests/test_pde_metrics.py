"""PDEBench's cRMSE, bRMSE and fRMSE (tasks.metrics.pde) against hand computations and an independent numpy
implementation written from PDEBench's definitions in its own layout (batch, channel, space..., time)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.metrics.pde import RolloutMetrics


def _tables(pred: torch.Tensor, true: torch.Tensor, split: int | None = None) -> dict[str, np.ndarray]:
    m = RolloutMetrics()
    for a, b in ([(pred, true)] if split is None else [(pred[:split], true[:split]), (pred[split:], true[split:])]):
        m.update(a, b)
    return {k: v.numpy() for k, v in m.tables().items()}


def _uptf(x: np.ndarray) -> torch.Tensor:
    """(B, K, F, C, *space) with 1-3 spatial axes -> UPTF-7 (B, K, F, C, D, H, W)."""
    space = x.shape[4:]
    return torch.from_numpy(x.reshape(*x.shape[:4], *([1] * (3 - len(space))), *space))


# ---------------------------------------------------------------------- hand computations
def test_crmse_is_the_rms_over_samples_of_the_spatial_mean_error():
    true = np.zeros((2, 1, 1, 1, 16))
    pred = true.copy()
    pred[0] += 0.5          # sample 0: spatial-mean error 0.5
    pred[1, ..., :4] = 2.0  # sample 1: 4 points of 2 over 16 points -> 0.5
    pred[1, ..., 4], pred[1, ..., 5] = 1.0, -1.0  # a wiggle with zero sum does not count
    t = _tables(_uptf(pred), _uptf(true))
    assert t["crmse"][0, 0] == pytest.approx(math.sqrt((0.5 ** 2 + 0.5 ** 2) / 2))
    pred[1] = -pred[0]  # signs do not cancel across samples: RMS, not mean
    assert _tables(_uptf(pred), _uptf(true))["crmse"][0, 0] == pytest.approx(0.5)


def test_brmse_counts_edge_points_per_face():
    # 1-D: sqrt((e_0² + e_last²) / 2)
    err = np.zeros((1, 1, 1, 1, 8))
    err[..., 0], err[..., -1], err[..., 3] = 3.0, 4.0, 100.0  # interior errors do not count
    assert _tables(_uptf(err), _uptf(np.zeros_like(err)))["brmse"][0, 0] == pytest.approx(math.sqrt(25 / 2))
    # 2-D 3x4: a corner lies on an x-face and a y-face: (1 + 1) / (2·3 + 2·4)
    err = np.zeros((1, 1, 1, 1, 3, 4))
    err[..., 0, 0] = 1.0
    assert _tables(_uptf(err), _uptf(np.zeros_like(err)))["brmse"][0, 0] == pytest.approx(math.sqrt(2 / 14))
    # 3-D 2x3x4 with error 1 everywhere: every face point counts once per face -> 1
    err = np.ones((1, 1, 1, 1, 2, 3, 4))
    assert _tables(_uptf(err), _uptf(np.zeros_like(err)))["brmse"][0, 0] == pytest.approx(1.0)


def test_frmse_puts_a_single_wavenumber_in_its_band():
    n, a = 64, 0.8
    x = np.arange(n)
    for k, band in ((2, "frmse_low"), (5, "frmse_mid"), (20, "frmse_high")):
        err = (a * np.cos(2 * np.pi * k * x / n)).reshape(1, 1, 1, 1, n)
        t = _tables(_uptf(err), _uptf(np.zeros_like(err)))
        # |rfft| at k is a·n/2; divided by n: a/2, averaged over the band's wavenumbers
        width = {"frmse_low": 4, "frmse_mid": 8, "frmse_high": n // 2 + 1 - 12}[band]
        assert t[band][0, 0] == pytest.approx(a / 2 / width, rel=1e-9)
        assert sum(t[b][0, 0] for b in ("frmse_low", "frmse_mid", "frmse_high")) == pytest.approx(a / 2 / width)


def test_empty_high_band_is_nan_on_small_grids():
    err = np.random.default_rng(0).normal(size=(2, 1, 1, 1, 16, 16))  # 2-D: bins 0..7 < 12
    t = _tables(_uptf(err), _uptf(np.zeros_like(err)))
    assert np.isnan(t["frmse_high"]).all() and np.isfinite(t["frmse_mid"]).all()


# ---------------------------------------------------------------------- independent numpy implementation
def pdebench_metrics(pred: np.ndarray, true: np.ndarray, i_low: int = 4, i_high: int = 12) -> dict[str, np.ndarray]:
    """PDEBench's metric definitions on (batch, channel, *space, time), each -> (channel, time), written
    from the definitions with explicit loops (no code shared with tasks.metrics.pde)."""
    nb, nc, nt = pred.shape[0], pred.shape[1], pred.shape[-1]
    space = pred.shape[2:-1]
    d = len(space)
    npts = int(np.prod(space))
    e = pred - true
    flat = e.reshape(nb, nc, npts, nt)
    out = {"crmse": np.sqrt(np.mean(flat.sum(axis=2) ** 2, axis=0)) / npts}
    b = np.zeros((nb, nc, nt))
    for s in range(nb):
        for c in range(nc):
            for t in range(nt):
                f = e[s, c, ..., t]
                acc = 0.0
                for ax in range(d):
                    acc += np.sum(np.take(f, 0, axis=ax) ** 2) + np.sum(np.take(f, -1, axis=ax) ** 2)
                denom = 2 if d == 1 else (2 * space[0] + 2 * space[1] if d == 2 else
                                          2 * (space[0] * space[1] + space[1] * space[2] + space[2] * space[0]))
                b[s, c, t] = np.sqrt(acc / denom)
    out["brmse"] = b.mean(axis=0)
    if d == 1:
        spec = np.abs(np.fft.rfft(e, axis=2)) ** 2  # (b, c, k, t)
        spectrum = np.sqrt(spec.mean(axis=0)) / space[0]
    else:
        fe = np.abs(np.fft.fftn(e, axes=tuple(range(2, 2 + d)))) ** 2
        nbins = min(s // 2 for s in space)
        binned = np.zeros((nb, nc, nbins, nt))
        for idx in np.ndindex(*[s // 2 for s in space]):
            kappa = int(math.floor(math.sqrt(sum(i * i for i in idx))))
            if kappa <= nbins - 1:
                binned[:, :, kappa] += fe[(slice(None), slice(None), *idx)]
        spectrum = np.sqrt(binned.mean(axis=0)) / npts
    for name, sl in (("frmse_low", slice(0, i_low)), ("frmse_mid", slice(i_low, i_high)), ("frmse_high", slice(i_high, None))):
        with np.errstate(invalid="ignore"):
            out[name] = spectrum[:, sl].mean(axis=1) if spectrum[:, sl].shape[1] else np.full((nc, nt), np.nan)
    return out


@pytest.mark.parametrize("space", [(40,), (32, 28), (26, 24, 30)])
def test_matches_an_independent_numpy_implementation(space):
    rng = np.random.default_rng(len(space))
    B, K, F, C = 5, 3, 2, 2
    true = rng.normal(size=(B, K, F, C, *space))
    pred = true + rng.normal(scale=0.3, size=true.shape) + 0.1  # a bias: nonzero conserved-quantity error
    ours = _tables(_uptf(pred), _uptf(true), split=2)  # two batches: pooled over the split
    # PDEBench layout: channel = (field, component), time = rollout step
    to_pb = lambda x: np.moveaxis(x.reshape(B, K, F * C, *space), 1, -1)  # noqa: E731
    ref = pdebench_metrics(to_pb(pred), to_pb(true))
    for name in ("crmse", "brmse", "frmse_low", "frmse_mid", "frmse_high"):
        per_field = ref[name].reshape(F, C, K).mean(axis=1).T  # (K, F): mean over the field's components
        np.testing.assert_allclose(ours[name], per_field, rtol=1e-9, err_msg=name, equal_nan=True)
    if len(space) == 3:
        assert np.isnan(ours["frmse_high"]).all()  # bins < min(n_a // 2) = 12: the high band is empty
