"""PDE data: solvers (exact / conservation checks), PDEBench + The Well readers, UPTF-7, RevIN, rollout metrics."""
from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from tasks.data import pde_solvers as S
from tasks.data.pde import (Trajectories, WindowDataset, fit_spatial, revin_denorm, revin_norm, revin_stats,
                            split_indices, to_uptf7)
from tasks.metrics.pde import RolloutMetrics, per_sample_errors, rollout


# ------------------------------------------------------------------------------ solvers
def test_advection_solver_matches_the_shifted_initial_condition():
    x = S.cell_centres(128)
    p = {"k": [2], "amp": [1.0], "phase": [0.3], "abs": False, "sign": 1.0, "window": False, "xl": 0, "xr": 1}
    u0 = S.init_function(p)(x)[None]
    t = np.array([0.0, 0.25, 0.5])
    num = S.advection(u0, 1.0, t)
    exact = S.advection_exact([p], x, 1.0, t)
    assert np.abs(exact[-1, 0] - u0[0]).max() < 1e-12  # βt = 0.5 = one period of wavenumber 2
    np.testing.assert_allclose(exact[1, 0], np.sin(2 * np.pi * 2 * (x - 0.25) + 0.3), atol=1e-12)
    rel = np.linalg.norm(num[-1] - exact[-1]) / np.linalg.norm(exact[-1])
    assert rel < 0.02, rel  # second-order MUSCL at 128 cells
    # a shift by a whole number of cells is a roll of the grid
    shift = S.advection_exact([p], x, 1.0, np.array([5 / 128]))[0, 0]
    np.testing.assert_allclose(shift, np.roll(u0[0], 5), atol=1e-12)


def test_burgers_energy_decays_and_mass_is_conserved():
    rng = np.random.default_rng(1)
    x = S.cell_centres(64)
    ps = S.init_params(6, rng)
    u0 = np.stack([S.init_function(p)(x) for p in ps])
    u = S.burgers(u0, 0.01, np.arange(11) * 0.05)
    energy = (u ** 2).sum(-1)  # (T, N)
    assert np.all(np.diff(energy, axis=0) <= 1e-10) and np.all(energy[-1] < energy[0])
    np.testing.assert_allclose(u.sum(-1), np.broadcast_to(u0.sum(-1), u.sum(-1).shape), atol=1e-9)  # periodic flux form


def test_fisher_kpp_stays_in_unit_interval_and_grows_to_one():
    u0 = np.full((1, 32), 0.1)
    u = S.fisher_kpp(u0, 0.01, 5.0, np.array([0.0, 0.2]))
    # spatially uniform: the exact logistic solution
    np.testing.assert_allclose(u[-1, 0], 0.1 * np.exp(1.0) / (1 - 0.1 + 0.1 * np.exp(1.0)), rtol=1e-10)
    r = S.fisher_kpp(np.random.default_rng(0).uniform(size=(3, 32)), 0.01, 5.0, np.arange(5) * 0.05)
    assert r.min() >= 0 and r.max() <= 1


def test_fitzhugh_nagumo_neumann_conserves_diffusive_part():
    # without reaction terms only diffusion acts: no-flux edges keep the mean of each field
    from tasks.data.pde_solvers import neumann_laplacian

    u = np.random.default_rng(0).standard_normal((2, 16, 16))
    assert abs(neumann_laplacian(u, 0.1, 2).sum()) < 1e-9
    out = S.fitzhugh_nagumo(2, 16, 2, np.linspace(0, 0.2, 3))
    assert out.shape == (2, 3, 16, 16, 2) and np.isfinite(out).all()
    first = S.fitzhugh_nagumo(1, 16, 2, np.array([0.0]))
    np.testing.assert_array_equal(first[0, 0, ..., 0], np.random.default_rng(0).standard_normal((2, 16, 16))[0])


# ------------------------------------------------------------------------------ readers + UPTF-7
def test_pdebench_files_convert_to_uptf7(tmp_path):
    p1 = S.generate("burgers", tmp_path, n=10, res=64, frames=6)
    assert p1.name == "1D_Burgers_Sols_Nu0.01.hdf5"
    with h5py.File(p1) as f:
        assert f["tensor"].shape == (10, 6, 64) and f["t-coordinate"].shape == (7,) and f.attrs["Nu"] == 0.01
        raw = f["tensor"][3]
    tr = Trajectories(p1)
    x = tr.read(3)
    assert x.shape == (6, 1, 1, 1, 1, 64)
    np.testing.assert_array_equal(x[:, 0, 0, 0, 0], raw)
    # 2-D per-seed file: channels become fields
    p2 = S.generate("diff_react_2d", tmp_path, n=10, res=16, frames=4)
    tr2 = Trajectories(p2)
    with h5py.File(p2) as f:
        d = f["0007"]["data"][:]
    x2 = tr2.read(7)
    assert x2.shape == (4, 2, 1, 1, 16, 16)
    np.testing.assert_array_equal(x2[:, 1, 0, 0], d[..., 1])
    # 3-D CFD-style fields: velocity is one 3-component field, scalars repeated across C
    n, t, s = 10, 3, 8
    rng = np.random.default_rng(0)
    arrs = {k: rng.standard_normal((n, t, s, s, s)).astype(np.float32) for k in ("density", "pressure", "Vx", "Vy", "Vz")}
    p3 = S.write_fields(tmp_path / "3D_CFD_Rand_Train.hdf5", arrs, {})
    x3 = Trajectories(p3).read(2)
    assert x3.shape == (3, 3, 3, 8, 8, 8)
    np.testing.assert_array_equal(x3[:, 0, 1], arrs["Vy"][2])
    np.testing.assert_array_equal(x3[:, 1, 2], arrs["density"][2])  # [V, density, pressure]; repeated
    np.testing.assert_array_equal(x3[:, 2, 0], arrs["pressure"][2])


def test_the_well_layout(tmp_path):
    n, t, h, w = 3, 5, 16, 8
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, t, h, w)).astype(np.float32)
    vel = rng.standard_normal((n, t, h, w, 2)).astype(np.float32)
    path = tmp_path / "gray_scott" / "data" / "train" / "part0.hdf5"
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as f:
        f.attrs["n_spatial_dims"] = 2
        f.attrs["dataset_name"] = "toy"
        g0, g1 = f.create_group("t0_fields"), f.create_group("t1_fields")
        g0.attrs["field_names"] = ["A"]
        g0.create_dataset("A", data=a)
        g1.attrs["field_names"] = ["velocity"]
        g1.create_dataset("velocity", data=vel)
        f.create_group("t2_fields").attrs["field_names"] = []
    tr = Trajectories(path)
    x = tr.read(1)
    assert x.shape == (5, 2, 2, 1, 16, 8)
    np.testing.assert_array_equal(x[:, 0, 0, 0], a[1])
    np.testing.assert_array_equal(x[:, 0, 1, 0], a[1])
    np.testing.assert_array_equal(x[:, 1, 1, 0], vel[1, ..., 1])
    assert split_indices(tr, "train") == [0, 1, 2]  # The Well: split by folder
    with pytest.raises(ValueError, match="no field"):
        Trajectories(path, fields=["B"])


def test_bad_files_are_named(tmp_path, caplog):
    p = tmp_path / "bad.hdf5"
    with h5py.File(p, "w") as f:
        f.create_dataset("tensor", data=np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"\(N, T, X\)"):
        Trajectories(p)
    with pytest.raises(ValueError, match="no dataset 'Vx'.*tensor"):
        Trajectories(p, fields=["Vx"])
    with pytest.raises(FileNotFoundError):
        Trajectories(tmp_path / "missing.hdf5")
    # 60 cells: padded (periodic) to 64, said in the log; crop mode keeps 56
    u = np.random.default_rng(0).standard_normal((10, 4, 60)).astype(np.float32)
    p2 = S.write_1d_tensor(tmp_path / "odd.hdf5", u, np.arange(60), np.arange(4), 0.01)
    with caplog.at_level("WARNING"):
        tr = Trajectories(p2)
    assert "padded" in caplog.text and tr.fitted == (1, 1, 64)
    x = tr.read(0)
    assert x.shape[-1] == 64 and np.array_equal(x[..., 60:], x[..., :4])
    assert torch.equal(tr.crop(torch.from_numpy(x)), torch.from_numpy(u[0]).reshape(4, 1, 1, 1, 1, 60))
    assert Trajectories(p2, fit="crop").read(0).shape[-1] == 56
    # NaN in trajectory 7: reported with its index (and step), or dropped on request
    u[7, 2, 5] = np.nan
    p3 = S.write_1d_tensor(tmp_path / "nan.hdf5", u, np.arange(60), np.arange(4), 0.01)
    tr3 = Trajectories(p3)
    with pytest.raises(ValueError, match="trajectory 7 .*time step 2"):
        WindowDataset(tr3, list(range(10)))
    ds = WindowDataset(tr3, list(range(10)), on_nan="skip")
    assert 7 not in ds.indices and len(ds.indices) == 9
    # horizon beyond the trajectory
    with pytest.raises(ValueError, match="exceed the trajectories' 4 frames"):
        WindowDataset(tr, [0], context=1, horizon=4)


def test_split_follows_pdebench(tmp_path):
    tr = Trajectories(S.generate("advection", tmp_path, n=20, res=16, frames=3))
    assert split_indices(tr, "test") == [0, 1] and split_indices(tr, "val") == [2, 3]
    assert split_indices(tr, "train") == list(range(4, 20))
    tr2 = Trajectories(S.generate("diff_react_2d", tmp_path, n=20, res=8, frames=2))
    assert split_indices(tr2, "test") == [18, 19]


def test_uptf7_fit_spatial_shapes():
    a = np.zeros((2, 1, 1, 1, 30, 17))
    assert fit_spatial(a, "pad").shape[-2:] == (32, 24) and fit_spatial(a, "crop").shape[-2:] == (24, 16)
    with pytest.raises(ValueError, match="at most 3 fields"):
        to_uptf7([np.zeros((2, 8))] * 4, [0] * 4)


# ------------------------------------------------------------------------------ RevIN
def test_revin_round_trip_and_context_only_stats(tmp_path):
    x = torch.randn(3, 5, 2, 3, 1, 8, 8, dtype=torch.float64) * 4 + 2
    mu, sigma = revin_stats(x)
    z = revin_norm(x, mu, sigma)
    torch.testing.assert_close(revin_denorm(z, mu, sigma), x)
    torch.testing.assert_close(z.mean(dim=(1, 3, 4, 5, 6)), torch.zeros(3, 2, dtype=torch.float64), atol=1e-12, rtol=0)
    # a series whose future differs wildly from its context: context stats ignore the future
    t = 6
    u = np.zeros((10, t, 16), np.float32)
    u[:, :2] = np.random.default_rng(0).standard_normal((10, 2, 16))
    u[:, 2:] = 1000.0
    p = S.write_1d_tensor(tmp_path / "future.hdf5", u, np.arange(16), np.arange(t), 0.01)
    tr = Trajectories(p)
    ctx_ds = WindowDataset(tr, [0], context=2, horizon=1, revin="context", starts=[0])
    traj_ds = WindowDataset(tr, [0], context=2, horizon=1, revin="trajectory", starts=[0])
    _, _, mu_c, sig_c, _ = ctx_ds[0]
    _, _, mu_t, _, _ = traj_ds[0]
    ref = u[0, :2].astype(np.float64)
    assert mu_c.item() == pytest.approx(ref.mean(), abs=1e-5)
    assert sig_c.item() == pytest.approx(math.sqrt(ref.var() + 1e-6), abs=1e-5)
    assert mu_t.item() > 500  # the whole-trajectory statistic (MORPH's) sees the future


# ------------------------------------------------------------------------------ rollout + metrics
def test_rollout_feeds_predictions_back():
    calls = []

    def step(x):
        calls.append(x.clone())
        return x[:, -1] + 1.0  # next frame = last frame + 1

    ctx = torch.zeros(2, 2, 1, 1, 1, 1, 8)
    ctx[:, 1] = 5.0
    out = rollout(step, ctx, horizon=4)
    assert out.shape == (2, 4, 1, 1, 1, 1, 8)
    assert torch.equal(out[:, :, 0, 0, 0, 0, 0], torch.tensor([[6.0, 7, 8, 9]] * 2))
    assert torch.equal(calls[2][:, :, 0, 0, 0, 0, 0], torch.tensor([[6.0, 7]] * 2))  # oldest dropped


def test_metrics_against_a_hand_computation():
    true = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 1, 1, 1, 4)
    pred = torch.tensor([1.0, 2.0, 3.0, 6.0]).reshape(1, 1, 1, 1, 1, 1, 4)
    e = per_sample_errors(pred, true)
    assert e["mse"].item() == pytest.approx(1.0)  # (0 + 0 + 0 + 4) / 4
    assert e["rmse"].item() == pytest.approx(1.0)
    assert e["nrmse"].item() == pytest.approx(math.sqrt(1.0 / 7.5), rel=1e-6)  # mean(y²) = 30/4
    # The Well's VRMSE divides by torch.std(y)² (Bessel-corrected): Σ(y − ȳ)² = 5 over 4 − 1 points
    assert e["vrmse"].item() == pytest.approx(math.sqrt(1.0 / (5.0 / 3.0)), rel=1e-6)
    m = RolloutMetrics()
    m.update(pred, true)
    m.update(true, true)
    assert m.summary()["mse"] == pytest.approx(0.5)


def test_identity_model_gives_the_known_error_on_advection(tmp_path):
    # u = sin(2π(x − βt) + φ): predicting "no change" has nRMSE 2|sin(π β k Δt)| after k steps
    res, frames, dt, beta = 64, 8, 0.01, 1.0
    x = S.cell_centres(res)
    phases = np.linspace(0, 2, 10)
    t = np.arange(frames) * dt
    u = np.stack([[np.sin(2 * np.pi * (x - beta * tt) + ph) for tt in t] for ph in phases]).astype(np.float32)
    p = S.write_1d_tensor(tmp_path / "1D_Advection_Sols_beta1.0.hdf5", u, x, t, dt, beta=beta)
    tr = Trajectories(p)
    horizon = 6
    ds = WindowDataset(tr, list(range(10)), context=1, horizon=horizon, revin="trajectory", starts=[0])
    metrics = RolloutMetrics()
    for ctx, tgt, mu, sigma, _ in torch.utils.data.DataLoader(ds, batch_size=4):
        pred = rollout(lambda z: z[:, -1], ctx, horizon)
        metrics.update(revin_denorm(pred, mu, sigma), revin_denorm(tgt, mu, sigma))
    got = metrics.tables()["nrmse"][:, 0]
    expected = torch.tensor([2 * abs(math.sin(math.pi * beta * k * dt)) for k in range(1, horizon + 1)], dtype=got.dtype)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-3)
