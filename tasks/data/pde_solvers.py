"""Small PDE solvers that write PDEBench-format HDF5 files (offline data for tests and demos).

Recipes follow PDEBench's generators (Takamoto et al., "PDEBench", NeurIPS 2022 Datasets & Benchmarks;
github.com/pdebench/PDEBench ``pdebench/data_gen``), re-derived in numpy at small sizes:

* 1-D, cell-centred grid on [0, 1], periodic (2 ghost cells each side), second-order midpoint stepping
  ``u* = u + Δt/2·L(u)``, ``u ← u + Δt·L(u*)``, MUSCL reconstruction with the monotonised-central limiter
  ``φ(a, b, c) = sign(c)·½(1 + sign(ab))·min(2·min(|a|, |b|), |c|)``; the step is CFL-bounded and clipped
  so that saves land on multiples of ``dt_save``.
* Initial conditions (``init_multi``): two integer wavenumbers in 1..4, ``Σ A sin(2πn x + φ)``, A ~ U(0, 1),
  φ ~ U(0, 2π); |u| with p = 0.1; a random sign; with p = 0.1 a tanh window.
* **Burgers** ``∂t u + ∂x(u²/2) = (ν/π) ∂xx u`` (the file's ``Nu`` is ν): local Lax-Friedrichs flux plus a
  central viscous flux; Δt = CFL·min(Δx/max|u|, ½Δx²/(ν/π)), CFL 0.25.
* **Advection** ``∂t u + β ∂x u = 0``: upwind flux of the MUSCL state, Δt = CFL·Δx/|β|, CFL 0.4; the exact
  solution ``u0(x − βt mod 1)`` is :func:`advection_exact`.
* **Fisher-KPP** ``∂t u = ν ∂xx u + ρ u(1 − u)``: exact logistic reaction step then explicit diffusion
  (inside the midpoint scheme), Δt = CFL·½Δx²/ν; ICs min-max normalised to [0, 1].
* **FitzHugh-Nagumo** (PDEBench's 2-D diffusion-reaction) ``∂t u = D_u Δu + u − u³ − k − v``,
  ``∂t v = D_v Δv + u − v`` (D_u = 1e-3, D_v = 5e-3, k = 5e-3) on [−1, 1]^d with no-flux (Neumann)
  boundaries and i.i.d. N(0, 1) initial cells (``default_rng(seed)``), 1-D or 2-D. PDEBench integrates with
  scipy's RK45; here a fixed-step classical RK4 (scipy is not a dependency), stable for these sizes.

Writers produce the PDEBench layouts: single-file 1-D (``tensor (N, T, X)``, ``x-coordinate``,
``t-coordinate`` with T+1 entries, attrs), field files (one dataset per field, CFD style) and per-seed
group files (``"0000"/data (T, *spatial, channels)`` + ``grid/x|y|t``). Files are written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from tasks.options import Int, check_options


# ------------------------------------------------------------------------------- initial conditions
def init_params(n: int, rng: np.random.Generator, k_tot: int = 4, picks: int = 2) -> list[dict]:
    out = []
    for _ in range(n):
        out.append({
            "k": rng.integers(1, k_tot + 1, size=picks), "amp": rng.uniform(0, 1, size=picks),
            "phase": rng.uniform(0, 2 * np.pi, size=picks), "abs": rng.uniform() < 0.1,
            "sign": rng.choice([-1.0, 1.0]), "window": rng.uniform() < 0.1,
            "xl": rng.uniform(0.1, 0.45), "xr": rng.uniform(0.55, 0.9),
        })
    return out


def init_function(p: dict, length: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """The initial condition as a function of x (periodic with period ``length`` except the window)."""
    def u0(x: np.ndarray) -> np.ndarray:
        u = sum(a * np.sin(2 * np.pi * k * x / length + ph) for k, a, ph in zip(p["k"], p["amp"], p["phase"]))
        if p["abs"]:
            u = np.abs(u)
        u = u * p["sign"]
        if p["window"]:
            xm = np.mod(x, length)
            u = u * 0.5 * (np.tanh((xm - p["xl"]) / 0.01) - np.tanh((xm - p["xr"]) / 0.01))
        return u
    return u0


def cell_centres(n: int, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    dx = (hi - lo) / n
    return lo + (np.arange(n) + 0.5) * dx


# ------------------------------------------------------------------------------- 1-D finite volumes
def mc_slope(u_ghost: np.ndarray) -> np.ndarray:
    """Limited slope per cell of a ghosted array (..., X+4) -> (..., X+2) (cells 1..X+2)."""
    a = u_ghost[..., 1:-1] - u_ghost[..., :-2]
    b = u_ghost[..., 2:] - u_ghost[..., 1:-1]
    c = 0.5 * (u_ghost[..., 2:] - u_ghost[..., :-2])
    return np.sign(c) * 0.5 * (1 + np.sign(a * b)) * np.minimum(2 * np.minimum(np.abs(a), np.abs(b)), np.abs(c))


def interface_states(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MUSCL left/right states at the X+1 interfaces i-1/2 .. X-1/2 (+ the wrap), periodic."""
    g = np.concatenate([u[..., -2:], u, u[..., :2]], axis=-1)  # 2 ghost cells each side
    s = mc_slope(g)  # slopes of cells -1..X
    cells = g[..., 1:-1]
    left = cells[..., :-1] + 0.5 * s[..., :-1]  # state left of interface j-1/2 for j = 0..X
    right = cells[..., 1:] - 0.5 * s[..., 1:]
    return left, right


def _integrate(u: np.ndarray, rhs, dt_fn, t_save: np.ndarray, react=None) -> np.ndarray:
    """Midpoint stepping with saves at ``t_save``; ``react(u, dt)`` an optional exact reaction substep."""
    out = np.empty((len(t_save),) + u.shape, dtype=np.float64)
    out[0] = u
    t = t_save[0]
    for i, ts in enumerate(t_save[1:], start=1):
        while t < ts - 1e-12:
            dt = min(dt_fn(u), ts - t)
            if react is not None:
                u = react(u, dt)
            u_half = u + 0.5 * dt * rhs(u)
            u = u + dt * rhs(u_half)
            t += dt
        out[i] = u
    return out


def burgers(u0: np.ndarray, nu: float, t_save: np.ndarray, cfl: float = 0.25) -> np.ndarray:
    """u0 (N, X) on [0, 1] -> (T, N, X)."""
    dx = 1.0 / u0.shape[-1]
    visc = nu / np.pi

    def rhs(u):
        ul, ur = interface_states(u)
        flux = 0.5 * (0.5 * ul ** 2 + 0.5 * ur ** 2) - 0.25 * np.abs(ul + ur) * (ur - ul)
        g = np.concatenate([u[..., -1:], u, u[..., :1]], axis=-1)
        flux = flux - visc * (g[..., 1:] - g[..., :-1]) / dx
        return -(flux[..., 1:] - flux[..., :-1]) / dx

    def dt_fn(u):
        return cfl * min(dx / max(np.abs(u).max(), 1e-8), 0.5 * dx ** 2 / visc)

    return _integrate(u0.astype(np.float64), rhs, dt_fn, t_save)


def advection(u0: np.ndarray, beta: float, t_save: np.ndarray, cfl: float = 0.4) -> np.ndarray:
    dx = 1.0 / u0.shape[-1]

    def rhs(u):
        ul, ur = interface_states(u)
        flux = beta * (ul if beta >= 0 else ur)
        return -(flux[..., 1:] - flux[..., :-1]) / dx

    return _integrate(u0.astype(np.float64), rhs, lambda u: cfl * dx / abs(beta), t_save)


def advection_exact(params: list[dict], x: np.ndarray, beta: float, t_save: np.ndarray) -> np.ndarray:
    """``u(x, t) = u0(x − βt mod 1)`` -> (T, N, X)."""
    return np.stack([np.stack([init_function(p)(np.mod(x - beta * t, 1.0)) for p in params]) for t in t_save])


def fisher_kpp(u0: np.ndarray, nu: float, rho: float, t_save: np.ndarray, cfl: float = 0.25) -> np.ndarray:
    dx = 1.0 / u0.shape[-1]

    def rhs(u):
        g = np.concatenate([u[..., -1:], u, u[..., :1]], axis=-1)
        return nu * (g[..., 2:] - 2 * g[..., 1:-1] + g[..., :-2]) / dx ** 2

    def react(u, dt):  # exact logistic step, written to be safe at u = 0
        e = np.exp(rho * dt)
        return u * e / (1.0 - u + u * e)

    return _integrate(u0.astype(np.float64), rhs, lambda u: cfl * 0.5 * dx ** 2 / nu, t_save, react)


def neumann_laplacian(u: np.ndarray, dx: float, ndim: int) -> np.ndarray:
    """5-point (or 3-point) Laplacian with zero-flux edges (edge-replicated ghost cells)."""
    lap = np.zeros_like(u)
    for ax in range(u.ndim - ndim, u.ndim):
        pad = [(0, 0)] * u.ndim
        pad[ax] = (1, 1)
        g = np.pad(u, pad, mode="edge")
        sl = lambda a, b: tuple(slice(a, b) if i == ax else slice(None) for i in range(u.ndim))  # noqa: E731
        lap += (g[sl(2, None)] - 2 * u + g[sl(None, -2)]) / dx ** 2
    return lap


def fitzhugh_nagumo(n: int, res: int, ndim: int, t_save: np.ndarray, seed0: int = 0, du: float = 1e-3,
                    dv: float = 5e-3, k: float = 5e-3, dt: float | None = None) -> np.ndarray:
    """-> (N, T, *spatial, 2) with fields (u, v); sample i seeded with ``default_rng(seed0 + i)``."""
    dx = 2.0 / res
    dt = dt or min(0.01, 0.2 * dx ** 2 / max(du, dv) / ndim)
    shape = (res,) * ndim
    u = np.stack([np.random.default_rng(seed0 + i).standard_normal((2, *shape)) for i in range(n)])  # (N, 2, ...)

    def rhs(s):
        a, b = s[:, 0], s[:, 1]
        return np.stack([du * neumann_laplacian(a, dx, ndim) + a - a ** 3 - k - b,
                         dv * neumann_laplacian(b, dx, ndim) + a - b], axis=1)

    out = np.empty((len(t_save), *u.shape))
    out[0] = u
    t = t_save[0]
    for i, ts in enumerate(t_save[1:], start=1):
        while t < ts - 1e-12:
            h = min(dt, ts - t)
            k1 = rhs(u); k2 = rhs(u + 0.5 * h * k1); k3 = rhs(u + 0.5 * h * k2); k4 = rhs(u + h * k3)  # noqa: E702
            u = u + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            t += h
        out[i] = u
    return np.moveaxis(out, (0, 2), (1, -1))  # (N, T, *spatial, 2)


# ------------------------------------------------------------------------------- writers
def _atomic_h5(path: Path, write) -> Path:
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with h5py.File(tmp, "w") as f:
        write(f)
    os.replace(tmp, path)
    return path


def write_1d_tensor(path: Path, u: np.ndarray, x: np.ndarray, t: np.ndarray, dt_save: float, **attrs) -> Path:
    """PDEBench single-file 1-D layout: ``tensor (N, T, X)``, ``x-coordinate``, ``t-coordinate`` (T+1)."""
    def write(f):
        f.create_dataset("tensor", data=u.astype(np.float32), chunks=(1, u.shape[1], u.shape[2]))
        f.create_dataset("x-coordinate", data=x.astype(np.float32))
        f.create_dataset("t-coordinate", data=(np.arange(len(t) + 1) * dt_save + t[0]).astype(np.float32))
        for k, v in attrs.items():
            f.attrs[k] = v
    return _atomic_h5(path, write)


def write_fields(path: Path, fields: dict[str, np.ndarray], coords: dict[str, np.ndarray], **attrs) -> Path:
    """PDEBench CFD-style layout: one ``(N, T, *spatial)`` dataset per field (``density``, ``Vx``, ...)."""
    def write(f):
        for name, a in fields.items():
            f.create_dataset(name, data=a.astype(np.float32), chunks=(1,) + a.shape[1:])
        for name, c in coords.items():
            f.create_dataset(name, data=c.astype(np.float32))
        for k, v in attrs.items():
            f.attrs[k] = v
    return _atomic_h5(path, write)


def write_seeds(path: Path, data: np.ndarray, grids: dict[str, np.ndarray]) -> Path:
    """PDEBench per-seed layout: group ``"0000"`` … with ``data (T, *spatial, channels)`` and ``grid/x|y|t``."""
    def write(f):
        for i, d in enumerate(data):
            g = f.create_group(f"{i:04d}")
            g.create_dataset("data", data=d.astype(np.float32))
            for name, c in grids.items():
                g.create_dataset(f"grid/{name}", data=c.astype(np.float32))
    return _atomic_h5(path, write)


# ------------------------------------------------------------------------------- datasets
EQUATIONS = ("burgers", "advection", "fisher_kpp", "fitzhugh_nagumo_1d", "diff_react_2d")


def generate(equation: str, root: str | os.PathLike, n: int = 32, res: int = 64, frames: int = 21,
             seed: int = 0, **params) -> Path:
    """Write one small PDEBench-format file for ``equation`` under ``root``; returns its path.

    Defaults are small (n trajectories of ``frames`` saved steps on ``res`` cells); the PDEBench file name
    and parameter attrs are kept (``1D_Burgers_Sols_Nu0.01.hdf5`` ...).
    """
    # n=0 used to fail in numpy ("need at least one array to stack"); res=0 or frames=1 made no usable data
    check_options("data.generate_options", {"n": n, "res": res, "frames": frames},
                  {"n": Int(1), "res": Int(8), "frames": Int(2)})
    root = Path(root)
    rng = np.random.default_rng(seed)
    x = cell_centres(res)
    if equation in ("burgers", "advection", "fisher_kpp"):
        dt_save = params.pop("dt_save", 0.01 if equation == "fisher_kpp" else 0.02)
        t = np.arange(frames) * dt_save
        ps = init_params(n, rng)
        u0 = np.stack([init_function(p)(x) for p in ps])
        if equation == "burgers":
            nu = params.pop("nu", 0.01)
            u = burgers(u0, nu, t)
            name, attrs = f"1D_Burgers_Sols_Nu{nu}.hdf5", {"Nu": nu}
        elif equation == "advection":
            beta = params.pop("beta", 1.0)
            u = advection_exact(ps, x, beta, t) if params.pop("exact", True) else advection(u0, beta, t)
            name, attrs = f"1D_Advection_Sols_beta{beta}.hdf5", {"beta": beta}
        else:
            nu, rho = params.pop("nu", 0.005), params.pop("rho", 5.0)
            lo, hi = u0.min(-1, keepdims=True), u0.max(-1, keepdims=True)
            u = fisher_kpp((u0 - lo) / np.maximum(hi - lo, 1e-12), nu, rho, t)
            name, attrs = f"ReacDiff_Nu{nu}_Rho{rho}.hdf5", {"Nu": nu, "rho": rho}
        _no_extra(params)
        return write_1d_tensor(root / name, np.moveaxis(u, 0, 1), x, t, dt_save, **attrs)
    if equation in ("fitzhugh_nagumo_1d", "diff_react_2d"):
        ndim = 1 if equation.endswith("1d") else 2
        t_end = params.pop("t_end", 5.0 * (frames - 1) / 100)  # PDEBench: 101 frames over [0, 5]
        _no_extra(params)
        t = np.linspace(0, t_end, frames)
        data = fitzhugh_nagumo(n, res, ndim, t, seed0=seed)
        xs = np.linspace(-1 + 1.0 / res, 1 - 1.0 / res, res)
        if ndim == 1:
            return write_fields(root / "1D_FitzHughNagumo.hdf5", {"u": data[..., 0], "v": data[..., 1]},
                                {"x-coordinate": xs, "t-coordinate": t})
        return write_seeds(root / "2D_diff-react_NA_NA.h5", data, {"x": xs, "y": xs, "t": t})
    raise ValueError(f"unknown equation {equation!r}; valid: {', '.join(EQUATIONS)}")


def _no_extra(params: dict) -> None:
    if params:
        raise ValueError(f"unknown solver option(s) {sorted(params)}")
