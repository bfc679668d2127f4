"""PDE trajectories from PDEBench and The Well HDF5 files, as UPTF-7 windows for MORPH.

UPTF-7 (MORPH, arXiv 2509.21670, ``src/utils/uptf7.py``): a trajectory is ``(T, F, C, D, H, W)`` (fields
F ≤ 3, components C ≤ 3, unused spatial axes 1): 1-D data is ``(1, 1, X)``, 2-D ``(1, H, W)``.

Readers (streaming: each item reads only the frames it needs; h5py handles are opened lazily per
process, so DataLoader workers never share a handle across fork):

* PDEBench single-file 1-D (``tensor (N, T, X)``; Burgers, Advection, ReacDiff): F = C = 1.
* PDEBench field files (CFD: ``density``, ``pressure``, ``Vx`` [``Vy`` ``Vz``] each ``(N, T, *spatial)``, or
  any named fields): velocity components become one vector field (C = number of spatial dims), first as in
  MORPH's loaders ([V, density, pressure]); when a vector field is present scalars are repeated across the
  C slots (MORPH's convention).
* PDEBench per-seed files (``"0000"/data (T, *spatial, channels)``; 2-D diffusion-reaction, shallow water):
  each channel a scalar field.
* The Well (``t0_fields/`` scalars ``(B, T, *spatial)``, ``t1_fields/`` vectors ``(B, T, *spatial, d)``;
  files under ``<dataset>/data/{train,valid,test}/``): vectors with C = d, scalars repeated to C as above.

Splits: PDEBench single-file and field files take the **first 10% of trajectories as test** (PDEBench's
``test_ratio``), the next 10% as validation, the rest train; per-seed files take the last 10% of the
sorted seed keys as test and the 10% before them as validation. The Well uses its own folders.

Spatial axes that are not 1 or a multiple of 8 are padded (``fit=pad``, periodic wrap) or cropped
(``fit=crop``) to the next/previous multiple of 8, and the change is logged; metrics use the original
region (``Trajectories.crop``).

RevIN (MORPH ``src/utils/normalization.py``): per trajectory and field, μ and σ² over (T, C, D, H, W),
``x̂ = (x − μ)/√(σ² + 1e-6)``. ``revin=trajectory`` is MORPH's choice (statistics from the whole trajectory,
future frames included); ``revin=context`` computes them per window from the context frames only (no
leakage); ``revin=none`` leaves data as is. A trajectory with NaN/Inf values is reported with its index
(``on_nan=error``) or dropped with a warning naming it (``on_nan=skip``).

The Well's own normalisation (``revin=zscore`` / ``revin=rms``; ``the_well/data/normalization.py``): fixed
per-channel statistics of the dataset's training split, read from its ``stats.yaml`` (``mean``/``std`` or
``rms`` per field, a list per component for a vector field), the same for every trajectory:
``zscore`` is ``(x − mean) / max(std, 1e-4)`` (``ZScoreNormalization``), ``rms`` is ``x / max(rms, 1e-4)``
(``RMSNormalization``); metrics are computed on de-normalised fields, as The Well's trainer does.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.reading import DataFileError, reading

log = logging.getLogger(__name__)

EPS = 1e-6
MIN_DENOM = 1e-4  # The Well's min_denom: its normalisers clip std / rms at this
REVIN = ("trajectory", "context", "none")  # per-instance statistics
DATASET_NORMS = ("zscore", "rms")  # The Well's dataset-wide statistics (stats.yaml)
VELOCITY = ("Vx", "Vy", "Vz")
SCALARS_CFD = ("density", "pressure")
MULT = 8


# ------------------------------------------------------------------------------ UPTF-7 helpers
def place_spatial(spatial: Sequence[int]) -> tuple[int, int, int]:
    """1-D (X,) -> (1, 1, X); 2-D (H, W) -> (1, H, W); 3-D stays (D, H, W)."""
    spatial = tuple(int(s) for s in spatial)
    if not 1 <= len(spatial) <= 3:
        raise ValueError(f"expected 1, 2 or 3 spatial axes, got {len(spatial)} ({spatial})")
    return (1,) * (3 - len(spatial)) + spatial


def to_uptf7(fields: Sequence[np.ndarray], components: Sequence[int]) -> np.ndarray:
    """Stack per-field arrays ``(T, *spatial[, c])`` into ``(T, F, C, D, H, W)``.

    ``components[i]`` is the number of trailing component entries of field i (0 = a scalar field
    without a component axis). Scalars are repeated across C when another field is a vector (MORPH).
    """
    if len(fields) > 3:
        raise ValueError(f"MORPH takes at most 3 fields, got {len(fields)}; select fields with data.fields=[...]")
    c = max(max(components), 1)
    if c > 3:
        raise ValueError(f"MORPH takes at most 3 components per field, got {c}")
    out = []
    for a, k in zip(fields, components):
        a = np.asarray(a)
        if k == 0:
            a = np.repeat(a[:, None], c, axis=1)  # (T, C, *spatial)
        else:
            if k != c:
                raise ValueError(f"fields with different component counts ({k} vs {c}) cannot share a UPTF-7 array")
            a = np.moveaxis(a, -1, 1)
        t = a.shape[0]
        out.append(a.reshape(t, c, *place_spatial(a.shape[2:])))
    return np.stack(out, axis=1).astype(np.float32)


def fit_spatial(x: np.ndarray, mode: str = "pad", axes_from: int = -3) -> np.ndarray:
    """Pad (periodic wrap) or crop the last three axes to 1 or a multiple of 8."""
    if mode not in ("pad", "crop"):
        raise ValueError(f"fit={mode!r}; valid: pad, crop")
    pads, slices = [], []
    for s in x.shape[axes_from:]:
        if s == 1 or s % MULT == 0:
            pads.append((0, 0)); slices.append(slice(None))  # noqa: E702
        elif mode == "pad":
            pads.append((0, MULT - s % MULT)); slices.append(slice(None))  # noqa: E702
        else:
            pads.append((0, 0)); slices.append(slice(0, s - s % MULT))  # noqa: E702
    x = x[(Ellipsis, *slices)]
    if any(p != (0, 0) for p in pads):
        x = np.pad(x, [(0, 0)] * (x.ndim - 3) + pads, mode="wrap")
    return x


def fitted_shape(spatial: Sequence[int], mode: str) -> tuple[int, ...]:
    return tuple(s if s == 1 or s % MULT == 0 else (s + MULT - s % MULT if mode == "pad" else s - s % MULT)
                 for s in spatial)


# ------------------------------------------------------------------------------ RevIN
def revin_stats(x: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and field over (T, C, D, H, W) of ``x (B, T, F, C, D, H, W)`` -> μ, σ (B, F), σ = √(var+eps)."""
    dims = (1, 3, 4, 5, 6)
    mu = x.mean(dim=dims)
    var = x.var(dim=dims, unbiased=False)
    return mu, torch.sqrt(var + eps)


def _bcast(s: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B, F) (RevIN, per field) or (B, F, C) (dataset statistics, per channel) -> broadcastable to
    (B, [T,] F, C, D, H, W) with ``ndim`` dims."""
    s = s[:, None] if ndim == 7 else s
    return s.reshape(*s.shape, *(1,) * (ndim - s.ndim))


def revin_norm(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (x - _bcast(mu, x.ndim)) / _bcast(sigma, x.ndim)


def revin_denorm(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x * _bcast(sigma, x.ndim) + _bcast(mu, x.ndim)


def read_norm_stats(path: Path) -> dict:
    """A The Well ``stats.yaml`` (per-field ``mean``, ``std``, ``rms``, ...) as a dict; one line when absent."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The Well's normalisation needs the dataset's statistics file: {path} not found "
                                "(it comes with each dataset, beside data/; or set data.stats_file=/path/to/stats.yaml)")
    with reading(path, "The Well statistics file (YAML)"):
        stats = yaml.safe_load(path.read_text())
    if not isinstance(stats, dict):
        raise DataFileError(f"{path}: expected a mapping of statistics (mean, std, rms, ...), got {type(stats).__name__}")
    return stats


def dataset_norm_stats(stats: dict, layout: "Layout", kind: str, where: str = "stats.yaml") -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(shift, scale)`` arrays ``(F, C)`` for The Well's ``zscore`` (mean, max(std, 1e-4)) or
    ``rms`` (0, max(rms, 1e-4)) normalisation of a The Well ``layout``; scalars repeated over C as the data."""
    if kind not in DATASET_NORMS:
        raise ValueError(f"revin={kind!r} is not a dataset normalisation; valid: {', '.join(DATASET_NORMS)}")
    if layout.kind != "well":
        raise ValueError(f"data.revin={kind} reads The Well's stats.yaml, which only The Well's files have; "
                         f"use data.revin=trajectory, context or none for this file")
    keys = ("mean", "std") if kind == "zscore" else ("rms",)
    missing = [k for k in keys if k not in stats]
    if missing:
        raise ValueError(f"{where} has no {missing} statistics (it holds: {', '.join(map(str, stats))})")
    c = max(max(layout.components), 1)
    shift, scale = np.zeros((len(layout.keys), c)), np.ones((len(layout.keys), c))
    for j, ((_, name), comps) in enumerate(zip(layout.keys, layout.components)):
        vals = []
        for k in keys:
            if name not in stats[k]:
                raise ValueError(f"{where}: no {k!r} for field {name!r} (it has: {', '.join(map(str, stats[k]))})")
            v = np.atleast_1d(np.asarray(stats[k][name], dtype=np.float64))
            if v.size not in (1, max(comps, 1)):
                raise ValueError(f"{where}: {k}[{name!r}] has {v.size} values; the field has {max(comps, 1)} component(s)")
            vals.append(np.broadcast_to(v, (c,)) if comps == 0 else v)
        if kind == "zscore":
            shift[j], scale[j] = vals[0], np.maximum(vals[1], MIN_DENOM)
        else:
            scale[j] = np.maximum(vals[0], MIN_DENOM)
    return shift.astype(np.float32), scale.astype(np.float32)


# ------------------------------------------------------------------------------ file readers
class _H5:
    """A lazily opened, per-process h5py handle (safe with forked DataLoader workers)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = None
        self._pid = None

    def __call__(self):
        if self._f is None or self._pid != os.getpid():
            import h5py

            self._f = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._f

    def __getstate__(self):
        return {"path": self.path, "_f": None, "_pid": None}


@dataclass
class Layout:
    kind: str  # tensor | fields | seeds | well
    keys: list  # per kind: dataset names / group names
    components: list  # per field: 0 scalar, c vector
    n: int
    t: int
    spatial: tuple


def _missing(path, key, f) -> ValueError:
    return ValueError(f"{path}: no dataset {key!r}; the file holds: {', '.join(sorted(f.keys()))[:300]}")


def detect_layout(f, path, fields: Sequence[str] | None = None) -> Layout:
    """Recognise a PDEBench / The Well file and check shapes; ``fields`` selects/reorders fields."""
    keys = list(f.keys())
    if "t0_fields" in keys or "t1_fields" in keys:
        return _well_layout(f, path, fields)
    if keys and all(k.isdigit() for k in keys):
        seeds = sorted(keys)
        shapes = {}
        for seed in seeds:  # every seed's layout, not seed 0's: a mixed file would fail mid-training
            g = f[seed]
            if not hasattr(g, "keys") or "data" not in g:
                held = ", ".join(g.keys()) if hasattr(g, "keys") else "a dataset, not a group"
                raise ValueError(f"{path}: per-seed group {seed!r} has no dataset 'data' (it holds: {held})")
            shapes.setdefault(tuple(g["data"].shape), seed)
        if len(shapes) > 1:
            (a, sa), (b, sb) = list(shapes.items())[:2]
            raise ValueError(f"{path}: per-seed groups have different shapes: {sa}/data is {a} but {sb}/data is {b}; "
                             "every seed must hold one (T, *spatial, channels) shape")
        shape = next(iter(shapes))
        if len(shape) < 3:
            raise ValueError(f"{path}: {seeds[0]}/data has shape {shape}; expected (T, *spatial, channels)")
        if shape[-1] > 3:
            raise ValueError(f"{path}: {seeds[0]}/data has {shape[-1]} channels (fields); MORPH takes at most 3, "
                             "and per-seed channels cannot be selected: write a file with at most 3")
        return Layout("seeds", seeds, [0] * shape[-1], len(seeds), shape[0], tuple(shape[1:-1]))
    if fields is None and "tensor" in keys:
        shape = f["tensor"].shape
        if len(shape) != 3:
            raise ValueError(f"{path}: 'tensor' has shape {shape}; a PDEBench 1-D file holds (N, T, X)")
        return Layout("tensor", ["tensor"], [0], shape[0], shape[1], tuple(shape[2:]))
    if fields is None:
        known = [k for k in VELOCITY if k in keys] + [k for k in SCALARS_CFD if k in keys]
        # every field dataset, not only the CFD names: a file with density, pressure, energy, temperature
        # used to lose the last two without a word
        others = [k for k in keys if k not in known and not k.endswith("coordinate") and "tensor" != k
                  and hasattr(f[k], "shape") and len(f[k].shape) >= 3]
        names = known + others
        if not names:
            raise ValueError(f"{path}: no PDEBench dataset found ('tensor', per-seed groups, or fields such as "
                             f"density/Vx); the file holds: {', '.join(keys)}")
        n_fields = (1 if any(k in VELOCITY for k in names) else 0) + sum(k not in VELOCITY for k in names)
        if n_fields > 3:
            raise ValueError(f"{path} holds {n_fields} fields ({', '.join(names)}); MORPH takes at most 3: choose them "
                             f"with data.fields=[...] (velocity components Vx/Vy/Vz count as one field)")
    else:
        names = list(fields)
    for k in names:
        if k not in keys:
            raise _missing(path, k, f)
    shapes = {k: f[k].shape for k in names}
    first = shapes[names[0]]
    if len(first) < 3 or any(s != first for s in shapes.values()):
        raise ValueError(f"{path}: field datasets must share one (N, T, *spatial) shape; got {shapes}")
    vel = [k for k in names if k in VELOCITY]
    groups: list = ([vel] if vel else []) + [[k] for k in names if k not in VELOCITY]
    comps = [len(g) if g is vel else 0 for g in groups]
    return Layout("fields", groups, comps, first[0], first[1], tuple(first[2:]))


def _well_layout(f, path, fields) -> Layout:
    entries = []  # (group, name, components)
    constant = []  # fields that do not change in time: The Well's inputs, never predicted or scored
    for grp, rank in (("t0_fields", 0), ("t1_fields", 1), ("t2_fields", 2)):
        if grp not in f:
            continue
        for name in f[grp].attrs.get("field_names", list(f[grp].keys())):
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name not in f[grp]:
                raise ValueError(f"{path}: {grp} lists field {name!r} but has no such dataset")
            attrs = f[grp][name].attrs
            if not bool(attrs.get("time_varying", True)):
                constant.append(name)
                continue
            if not bool(attrs.get("sample_varying", True)):
                raise ValueError(f"{path}: {grp}/{name} is time-varying but the same for every trajectory "
                                 "(sample_varying false): not a layout this reader takes; leave it out with data.fields=[...]")
            entries.append((grp, name, rank))
    if constant:
        log.warning("%s: constant field(s) %s left out (The Well's constant fields are inputs, not predicted or scored)",
                    path, constant)
    by_name = {e[1]: e for e in entries}
    if fields is not None:
        bad = [k for k in fields if k not in by_name]
        if bad:
            raise ValueError(f"{path}: no field(s) {bad}; The Well file holds: {', '.join(by_name)}")
        entries = [by_name[k] for k in fields]
    if fields is None and any(e[2] >= 2 for e in entries):
        log.warning("%s: rank-2 (t2) field(s) %s left out (d² components; MORPH takes at most 3 per field)",
                    path, [e[1] for e in entries if e[2] >= 2])
    entries = [e for e in entries if e[2] < 2] if fields is None else entries
    if not entries:
        raise ValueError(f"{path}: The Well file has no t0/t1 fields")
    if any(e[2] == 2 for e in entries):
        raise ValueError(f"{path}: rank-2 (t2) fields have d² components; MORPH takes at most 3 per field")
    nd = int(f.attrs.get("n_spatial_dims", 0)) or None
    ref = f[entries[0][0]][entries[0][1]]
    if ref.ndim < 3:
        raise ValueError(f"{path}: {entries[0][0]}/{entries[0][1]} has shape {ref.shape}; expected (B, T, *spatial[, d])")
    spatial = tuple(ref.shape[2:2 + (nd or (ref.ndim - 2 - entries[0][2]))])
    comps = [0 if e[2] == 0 else f[e[0]][e[1]].shape[-1] for e in entries]
    return Layout("well", [(e[0], e[1]) for e in entries], comps, ref.shape[0], ref.shape[1], spatial)


class Trajectories:
    """One HDF5 file as a list of UPTF-7 trajectories, read frame ranges at a time."""

    def __init__(self, path: str | os.PathLike, fields: Sequence[str] | None = None, fit: str = "pad"):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"PDE data file not found: {self.path}")
        import h5py

        if not h5py.is_hdf5(self.path):
            raise DataFileError(f"{self.path} is not an HDF5 file: PDE data are PDEBench / The Well .hdf5 / .h5 files"
                                + (" (a .npy/.npz array has no field names or layout)" if self.path.suffix in (".npy", ".npz") else ""))
        self.h5 = _H5(self.path)
        with reading(self.path, "PDE data file (HDF5)"):
            self.layout = detect_layout(self.h5(), self.path, fields)
        if self.layout.n < 1 or self.layout.t < 1:
            raise DataFileError(f"{self.path}: {self.layout.n} trajectories of {self.layout.t} frames; "
                                "a PDE data file needs at least one trajectory with frames")
        self.fit = fit
        self.spatial = place_spatial(self.layout.spatial)
        self.fitted = fitted_shape(self.spatial, fit)
        if self.fitted != self.spatial:
            log.warning("%s: spatial axes %s are not 1 or multiples of 8; %s to %s (metrics use the original region)",
                        self.path.name, self.spatial, "padded" if fit == "pad" else "cropped", self.fitted)

    def __len__(self) -> int:
        return self.layout.n

    @property
    def frames(self) -> int:
        return self.layout.t

    def read(self, i: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Trajectory ``i``, frames ``start:stop``, as ``(T', F, C, D, H, W)`` (fitted to multiples of 8)."""
        with reading(self.path, "PDE data file (HDF5)"):  # a damaged chunk fails here, mid-run: name the file
            return self._read(i, start, stop)

    def _read(self, i: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        f, lay = self.h5(), self.layout
        sl = slice(start, stop)
        if lay.kind == "tensor":
            arrs, comps = [f["tensor"][i, sl]], [0]
        elif lay.kind == "fields":
            arrs = [np.stack([f[k][i, sl] for k in g], axis=-1) if c else f[g[0]][i, sl] for g, c in zip(lay.keys, lay.components)]
            comps = lay.components
        elif lay.kind == "seeds":
            d = f[lay.keys[i]]["data"][sl]
            arrs, comps = [d[..., j] for j in range(d.shape[-1])], [0] * d.shape[-1]
        else:
            arrs = [f[g][name][i, sl] for g, name in lay.keys]
            comps = lay.components
        x = to_uptf7(arrs, comps)
        if self.fitted != self.spatial:
            x = fit_spatial(x, self.fit)
        return x

    def channels(self) -> list[tuple[int, int, str]]:
        """The data's channels as ``(field, component, name)``: a scalar field once (its UPTF-7 slots repeat
        it), a vector field once per component. Names follow the file: The Well's ``velocity_x`` (its
        ``flatten_field_names``, with the file's ``dimensions/spatial_dims``), PDEBench's ``Vx``, ``density``."""
        lay = self.layout
        if lay.kind == "well":
            dims = ["x", "y", "z"]
            f = self.h5()
            if "dimensions" in f and "spatial_dims" in f["dimensions"].attrs:
                dims = [d.decode() if isinstance(d, bytes) else str(d) for d in f["dimensions"].attrs["spatial_dims"]]
            names = [[name] if c == 0 else [f"{name}_{dims[k]}" for k in range(c)]
                     for (_, name), c in zip(lay.keys, lay.components)]
        elif lay.kind == "fields":
            names = [list(g) if c else [g[0]] for g, c in zip(lay.keys, lay.components)]
        elif lay.kind == "seeds":
            names = [[f"u{j}"] for j in range(len(lay.components))]
        else:
            names = [["u"]]
        return [(j, k, n) for j, ns in enumerate(names) for k, n in enumerate(ns)]

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """Back to the original spatial region (after padding)."""
        d, h, w = self.spatial
        return x[..., :d, :h, :w] if self.fit == "pad" else x

    def scan(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """One streaming pass: per-trajectory RevIN μ, σ (N, F) and the indices holding NaN/Inf."""
        mus, sigmas, bad = [], [], []
        for i in range(len(self)):
            x = self.read(i).astype(np.float64)
            if not np.isfinite(x).all():
                bad.append(i)
                nf = x.shape[1]
                mus.append(np.zeros(nf)); sigmas.append(np.ones(nf))  # noqa: E702
                continue
            mus.append(x.mean(axis=(0, 2, 3, 4, 5)))
            sigmas.append(np.sqrt(x.var(axis=(0, 2, 3, 4, 5)) + EPS))
        return np.array(mus, np.float32), np.array(sigmas, np.float32), bad


def nan_report(traj: Trajectories, bad: list[int]) -> str:
    first = bad[0]
    x = traj.read(first)
    step = int(np.argwhere(~np.isfinite(x).reshape(x.shape[0], -1).all(axis=1))[0, 0])
    return (f"{traj.path}: trajectory {first} contains NaN/Inf values (first at time step {step})"
            + (f"; also trajectories {bad[1:10]}{'...' if len(bad) > 10 else ''}" if len(bad) > 1 else "")
            + " -- fix the file or set data.on_nan=skip to drop them")


def split_indices(traj: Trajectories, split: str, test_ratio: float = 0.1, val_ratio: float = 0.1) -> list[int]:
    """PDEBench's split (see the module docstring); The Well files are already split by folder."""
    n = len(traj)
    if traj.layout.kind == "well" or split == "all":
        return list(range(n))
    n_test, n_val = max(1, int(round(n * test_ratio))), max(1, int(round(n * val_ratio)))
    if n_test + n_val >= n:
        raise ValueError(f"{traj.path}: {n} trajectories are too few for a {test_ratio}/{val_ratio} test/val split")
    if traj.layout.kind == "seeds":  # test = last 10% of sorted seeds
        test, val, train = range(n - n_test, n), range(n - n_test - n_val, n - n_test), range(0, n - n_test - n_val)
    else:  # test = first 10%
        test, val, train = range(0, n_test), range(n_test, n_test + n_val), range(n_test + n_val, n)
    return list({"train": train, "val": val, "test": test}[split])


class WindowDataset(Dataset):
    """``(context (t, F, C, D, H, W), target (k, F, C, D, H, W), mu (F,), sigma (F,), traj_index)``; with
    ``horizon = 1`` the target is the single next frame ``(F, C, D, H, W)``, shaped like the model's output.
    With The Well's normalisation (``revin=zscore|rms``, ``norm_stats``) ``mu``, ``sigma`` are ``(F, C)``.

    Windows slide over every start of the chosen trajectories (``k = 1`` for teacher-forced training,
    ``k = horizon`` for rollout evaluation, where ``starts`` may restrict them, e.g. ``[0]``). Values are
    RevIN-normalised with the trajectory's (``revin=trajectory``) or the context's (``revin=context``)
    statistics, which are returned for de-normalisation.
    """

    def __init__(self, traj: Trajectories, indices: Sequence[int], context: int = 1, horizon: int = 1,
                 revin: str = "trajectory", on_nan: str = "error", starts: Sequence[int] | None = None,
                 stats: tuple | None = None, stride: int = 1, norm_stats: tuple | None = None):
        if revin not in REVIN + DATASET_NORMS:
            raise ValueError(f"revin={revin!r}; valid: {', '.join(REVIN + DATASET_NORMS)}")
        if (revin in DATASET_NORMS) != (norm_stats is not None):
            raise ValueError(f"revin={revin!r} " + ("needs the dataset's statistics (norm_stats)" if norm_stats is None
                                                    else "takes no dataset statistics (norm_stats)"))
        self.norm_stats = None if norm_stats is None else tuple(torch.as_tensor(a) for a in norm_stats)
        if on_nan not in ("error", "skip"):
            raise ValueError(f"on_nan={on_nan!r}; valid: error, skip")
        if context < 1 or horizon < 1:
            raise ValueError(f"context ({context}) and horizon ({horizon}) must be >= 1")
        if context + horizon > traj.frames:
            raise ValueError(f"{traj.path}: context {context} + horizon {horizon} frames exceed the trajectories' "
                             f"{traj.frames} frames; lower task.rollout_horizon or task.context")
        self.traj, self.context, self.horizon, self.revin = traj, context, horizon, revin
        mu, sigma, bad = stats if stats is not None else traj.scan()
        bad_here = [i for i in indices if i in set(bad)]
        if bad_here:
            if on_nan == "error":
                raise ValueError(nan_report(traj, bad_here))
            log.warning("%s: dropping trajectories with NaN/Inf values: %s", traj.path, bad_here)
        self.indices = [i for i in indices if i not in set(bad)]
        self.mu, self.sigma = torch.from_numpy(mu), torch.from_numpy(sigma)
        last = traj.frames - context - horizon
        starts = range(0, last + 1, stride) if starts is None else [s for s in starts if 0 <= s <= last]
        self.items = [(i, s) for i in self.indices for s in starts]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        i, s = self.items[k]
        x = torch.from_numpy(self.traj.read(i, s, s + self.context + self.horizon))
        ctx, tgt = x[: self.context], x[self.context:]
        if self.revin == "trajectory":
            mu, sigma = self.mu[i], self.sigma[i]
        elif self.revin == "context":
            m, sd = revin_stats(ctx[None].double())
            mu, sigma = m[0].float(), sd[0].float()
        elif self.norm_stats is not None:  # The Well: the dataset's per-channel statistics, (F, C)
            mu, sigma = self.norm_stats
        else:
            mu, sigma = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
        tgt = revin_norm(tgt[None], mu[None], sigma[None])[0]
        if self.horizon == 1:  # (inputs, targets shaped like the model's output): what data-driven adapter stages expect
            tgt = tgt[0]
        return revin_norm(ctx[None], mu[None], sigma[None])[0], tgt, mu, sigma, i
