"""The Well's own protocol (``experiment=the_well/one_step``): one step from 4 input frames, every window of
the test folder, VRMSE per channel on de-normalised fields, fields z-scored with the dataset's stats.yaml.

The expected values are computed here in numpy from The Well's reference code (PolymathicAI/the_well):
``benchmark/metrics/spatial.py`` (``VRMSE`` = ``NRMSE(norm_mode="std")``: √(mean_x (x − y)² / (torch.std(y)² +
1e-7)), per sample, step and channel), ``benchmark/trainer/training.py`` (``split_up_losses``: the mean over
the batch per channel, the "full" value the mean over channels), ``data/normalization.py``
(``ZScoreNormalization``: (x − mean) / clip(std, min=1e-4), per field, per component for a vector field) and
``data/datamodule.py`` / ``data/utils.py`` (the test set: every window of n_steps_input + n_steps_output
frames, ``raw_steps_to_possible_sample_t0s``)."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import yaml

from tests.helpers import compose_config, run_train

CHANNELS = ["A", "velocity_x", "velocity_y"]  # The Well's flatten_field_names: t0 fields, then t1 per dim


# ------------------------------------------------------------------ a tiny dataset in The Well's layout
def write_well_dataset(root, n=2, t=7, h=8, w=8, seed=0, constant_field=False):
    """``root/data/{train,valid,test}/part0.hdf5`` (t0 field ``A``, t1 field ``velocity``, 2-D) and
    ``root/stats.yaml`` from the training split, as The Well's ``compute_statistics.py`` lays it out."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in ("train", "valid", "test"):
        a = (2.0 + rng.standard_normal((n, t, h, w))).astype(np.float32)
        vel = (rng.standard_normal((n, t, h, w, 2)) * np.array([3.0, 0.2])).astype(np.float32)
        path = root / "data" / split / "part0.hdf5"
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            f.attrs.update({"n_spatial_dims": 2, "dataset_name": "toy_well", "n_trajectories": n, "grid_type": "cartesian"})
            d = f.create_group("dimensions")
            d.attrs["spatial_dims"] = ["x", "y"]
            d.create_dataset("time", data=np.arange(t, dtype=np.float32))
            g0, g1 = f.create_group("t0_fields"), f.create_group("t1_fields")
            g0.attrs["field_names"] = ["A"]
            g0.create_dataset("A", data=a)
            g1.attrs["field_names"] = ["velocity"]
            g1.create_dataset("velocity", data=vel)
            g0["A"].attrs.update({"time_varying": True, "sample_varying": True})
            if constant_field:  # e.g. a material mask: the same at every step (The Well: an input, never scored)
                g0.attrs["field_names"] = ["A", "mask"]
                g0.create_dataset("mask", data=np.ones((h, w), np.float32)).attrs.update(
                    {"time_varying": False, "sample_varying": False})
            f.create_group("t2_fields").attrs["field_names"] = []
        arrays[split] = (a, vel)
    a, vel = arrays["train"]
    stats = {"mean": {"A": float(a.mean()), "velocity": [float(v) for v in vel.mean(axis=(0, 1, 2, 3))]},
             "std": {"A": float(a.std()), "velocity": [float(v) for v in vel.std(axis=(0, 1, 2, 3))]},
             "rms": {"A": float(np.sqrt((a ** 2).mean())), "velocity": [float(v) for v in np.sqrt((vel ** 2).mean(axis=(0, 1, 2, 3)))]}}
    (root / "stats.yaml").write_text(yaml.safe_dump(stats))
    return arrays, stats


def _the_well_vrmse(pred, true, eps=1e-7):
    """The Well's VRMSE, in numpy from ``spatial.py``: arrays ``(B, T, H, W, C)`` (its channels-last layout) ->
    ``(B, T, C)``: √(mean over space of (x − y)² / (std(y, ddof=1)² + eps)) (``torch.std`` is Bessel-corrected)."""
    mse = ((pred - true) ** 2).mean(axis=(2, 3))
    return np.sqrt(mse / (true.std(axis=(2, 3), ddof=1) ** 2 + eps))


def _to_uptf7(x):
    """The Well's ``(B, T, H, W, [A, vx, vy])`` -> the zoo's ``(B, T, F=2, C=2, 1, H, W)`` (A repeated over C)."""
    a = np.repeat(x[..., :1], 2, axis=-1)
    return torch.from_numpy(np.stack([a, x[..., 1:]], axis=2)).permute(0, 1, 2, 5, 3, 4)[:, :, :, :, None]


# ------------------------------------------------------------------ the metric
def test_vrmse_per_channel_and_its_mean_equal_the_wells():
    from tasks.metrics.pde import RolloutMetrics

    rng = np.random.default_rng(1)
    true = rng.standard_normal((5, 1, 4, 4, 3)) * np.array([1.0, 3.0, 0.2])  # 16 points: Bessel's 16/15 shows
    pred = true + rng.standard_normal(true.shape) * np.array([0.1, 0.5, 0.5])  # uneven errors per channel
    ref = _the_well_vrmse(pred, true).mean(axis=0)  # (T, C): the mean over the batch, per channel
    m = RolloutMetrics()
    m.update(_to_uptf7(pred), _to_uptf7(true))
    chans = [(0, 0), (1, 0), (1, 1)]
    got = m.channel_tables(chans)["vrmse"]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9)
    full = float(ref.mean())  # The Well's "full" VRMSE: the mean over its three channels
    assert m.summary(chans)["vrmse"] == pytest.approx(full, rel=1e-9)
    # what either plausible slip would give instead: the variance without Bessel's correction, or the mean
    # over fields (velocity's two components counted as one) -- both differ here
    biased = np.sqrt(((pred - true) ** 2).mean(axis=(2, 3)) / (true.var(axis=(2, 3)) + 1e-7)).mean(axis=0)
    assert abs(float(biased.mean()) - full) > 1e-3
    assert abs(m.summary()["vrmse"] - full) > 1e-2  # the per-field mean (no channels given)


# ------------------------------------------------------------------ the data: windows and normalisation
def test_the_well_zscore_normalisation_and_every_test_window(tmp_path):
    from tasks.pde import PDEDataModule

    arrays, stats = write_well_dataset(tmp_path / "toy_well", constant_field=True)  # the constant field is left out
    stats["std"]["velocity"][1] = 1e-6  # a near-constant channel: The Well clips its std at 1e-4
    (tmp_path / "toy_well" / "stats.yaml").write_text(yaml.safe_dump(stats))
    dm = PDEDataModule(path=str(tmp_path / "toy_well"), context=4, rollout_horizon=1, revin="zscore",
                       eval_windows="all", eval_batch_size=4)
    dm.setup("test")
    ds = dm._sets["test"]
    a, vel = arrays["test"]
    n, t = a.shape[:2]
    assert len(ds) == n * (t - 4)  # every 4 -> 1 window (raw_steps_to_possible_sample_t0s with stride 1)
    assert dm.channels == [(0, 0, "A"), (1, 0, "velocity_x"), (1, 1, "velocity_y")]
    mean = np.array([stats["mean"]["A"], *stats["mean"]["velocity"]])
    std = np.maximum(np.array([stats["std"]["A"], *stats["std"]["velocity"]]), 1e-4)  # ZScoreNormalization's clip
    raw = np.concatenate([a[..., None], vel], axis=-1)  # The Well's flattened channels (n, t, h, w, 3)
    for k in (0, len(ds) - 1):
        ctx, tgt, mu, sigma, i = ds[k]
        start = k % (t - 4)
        want = (raw[i, start:start + 5] - mean) / std
        got = np.concatenate([ctx, tgt[None]], axis=0)  # (5, F, C, 1, H, W)
        np.testing.assert_allclose(got[:, 0, 0, 0], want[..., 0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[:, 1, 0, 0], want[..., 1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[:, 1, 1, 0], want[..., 2], rtol=1e-5, atol=1e-3)
        assert tuple(mu.shape) == (2, 2) and float(sigma[1, 1]) == pytest.approx(1e-4)
    assert dm.norm_record["scale"]["velocity_y"] == pytest.approx(1e-4)


def test_the_well_normalisation_needs_its_statistics_file(tmp_path):
    from tasks.pde import PDEDataModule

    write_well_dataset(tmp_path / "toy_well")
    (tmp_path / "toy_well" / "stats.yaml").unlink()
    dm = PDEDataModule(path=str(tmp_path / "toy_well"), context=4, rollout_horizon=1, revin="zscore")
    with pytest.raises(FileNotFoundError, match=r"toy_well/stats.yaml not found .*data.stats_file"):
        dm.setup("test")
    with pytest.raises(ValueError, match="data.revin='global'; valid: trajectory, context, none, zscore, rms"):
        PDEDataModule(path=str(tmp_path / "toy_well"), revin="global")


# ------------------------------------------------------------------ the recipe
def test_the_well_recipe_resolves_to_its_protocol():
    cfg = compose_config(["experiment=the_well/one_step", "data.path=/data/the_well/datasets/gray_scott_reaction_diffusion"])
    # benchmark/configs/config.yaml: n_steps_input 4, n_steps_output 1, ZScoreNormalization
    assert (cfg.task.context, cfg.data.context, cfg.task.rollout_horizon, cfg.data.rollout_horizon) == (4, 4, 1, 1)
    assert cfg.data.revin == "zscore" and cfg.data.eval_windows == "all" and cfg.task.selection == "last"
    assert (cfg.backbone.name, cfg.backbone.model, cfg.backbone.pretrained) == ("morph", "L", True)


def test_the_well_recipe_names_morph_l_and_fails_offline_in_one_clear_message(monkeypatch):
    from tasks.base import create_backbone
    from zoo.backbones.weights import WeightsUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # no cached copy either
    cfg = compose_config(["experiment=the_well/one_step", "data.path=/data/x"])
    with pytest.raises(WeightsUnavailableError) as e:
        create_backbone(dict(cfg.backbone))
    msg = str(e.value)
    assert "MORPH-L" in msg and "HF_HUB_OFFLINE is set" in msg
    assert "morph-L-FM-max_ar16_ep189_latestbatch.pth" in msg and "backbone.weights=" in msg


TINY = ["backbone.model=Ti", "backbone.pretrained=false", "backbone.max_ar=4", "+backbone.kwargs.dim=32",
        "+backbone.kwargs.depth=2", "+backbone.kwargs.heads=4", "+backbone.kwargs.heads_xa=4",
        "+backbone.kwargs.mlp_dim=64", "+backbone.kwargs.max_patches=64", "task.max_epochs=1", "callbacks=none",
        "data.batch_size=4", "data.eval_batch_size=4", "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false"]


def test_the_well_recipe_runs_and_records_its_protocol(tmp_path):
    arrays, stats = write_well_dataset(tmp_path / "toy_well")
    m = run_train(["experiment=the_well/one_step", f"data.path={tmp_path / 'toy_well'}", "adapter=lora", *TINY], tmp_path)
    p = m["protocol"]
    assert p["name"] == "the_well_one_step" and m["selection"] == "last"
    assert p["initial_step"] == 4 and p["horizon"] == 1 and p["start"] == "every window"
    n, t = arrays["test"][0].shape[:2]
    assert p["splits"]["test"] == {"name": "test", "size": n * (t - 4)} and p["splits"]["val"]["name"] == "valid"
    norm = p["normalisation"]
    assert norm["revin"] == "zscore" and norm["file"].endswith("toy_well/stats.yaml")
    assert norm["shift"] == pytest.approx({"A": stats["mean"]["A"], "velocity_x": stats["mean"]["velocity"][0],
                                           "velocity_y": stats["mean"]["velocity"][1]})
    assert norm["scale"]["velocity_x"] == pytest.approx(stats["std"]["velocity"][0])
    assert p["channels"] == CHANNELS and "VRMSE" in p["metric"]["vrmse"]
    per = m["test/vrmse_per_channel"]
    assert list(per) == CHANNELS and all(np.isfinite(v) and v > 0 for v in per.values())
    assert m["test/vrmse"] == pytest.approx(float(np.mean(list(per.values()))), rel=1e-6)  # The Well's "full" row
