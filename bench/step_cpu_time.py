"""CPU time of one training step per row, old vs fused low-rank paths, interleaved (a loaded machine's helper).

``python -m bench.step_cpu_time --depth 12 --reps 4 --rows floor mhr mhr_old colora colora_old lora --prof mhr``
(``--rows`` takes any registered adapter name, e.g. ``hydra ssf comp_lora``)

Builds the rows as ``bench.adapters`` does (ViT-S/16, 224 px, batch 8) and times each step with
``time.thread_time`` (CPU time of this thread, one torch thread), which a machine shared with other
jobs inflates much less than wall time. Printed per row: the ratio of medians, of minima, and the
median (and range) of the per-round ratios to the first row (the most robust to load that changes
between rounds). ``NAME_old`` is the row with ``fused=False`` and
``batched_mix=False`` on every adapter module (the composed path: ``fused`` is the flag of the fused
ops of ``zoo.adapters.lowrank`` and of SSF's fast paths). ``--prof`` prints torch.profiler's
table of one step for the named rows. ``--breakdown`` profiles ``--breakdown-steps`` steps of every row
and prints each row's self CPU time per op category (backbone-sized GEMMs, thin GEMMs with a dimension
under 128 — the low-rank factors —, attention, the patch-embedding convolution, everything else:
elementwise ops, norms, reductions, copies) next to the first row's, so the extra time of a method is
located by kind of work rather than read off one noisy total. The profiler times each op by the wall
clock, and the rows are profiled one after another, not interleaved: use ``--breakdown`` on a quiet
machine only (under load ≈ 4 on 2 cores, rows with the same GEMMs differed by ±25% in that column).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import bench.adapters as B


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--rows", nargs="*", default=["floor", "mhr", "mhr_old", "colora", "colora_old", "lora"])
    p.add_argument("--prof", nargs="*", default=[])
    p.add_argument("--breakdown", action="store_true")
    p.add_argument("--breakdown-steps", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    # bench.adapters' realistic profile (ViT-S/16, 224 px, batch 8) at --depth, on the CPU
    args = B.parse_args(["--preset", "realistic", "--depth", str(a.depth), "--device", "cpu"])
    # any registered adapter by name, with bench.adapters' config for it; NAME_old: the composed path
    rows = {"floor": B.Row(B.FLOOR, "floor")}
    for n in a.rows:
        base = n.removesuffix("_old")
        if base != "floor":
            rows[n] = B.adapter_row(B.profile(args), base)
    built = {n: B.build(args, rows[n]) for n in a.rows}
    for n, b in built.items():
        flags = ("fused", "batched_mix") if n.endswith("_old") else ()
        for m in b.model.modules():
            for flag in flags:
                if hasattr(m, flag):
                    setattr(m, flag, False)
    x, y = B.synthetic_batches(args, 1)[0]
    for b in built.values():  # warm-up
        b.step(x, y)
        b.step(x, y)
    ts: dict[str, list[float]] = {n: [] for n in built}
    for _ in range(a.reps):
        for n, b in built.items():
            t = time.thread_time()
            b.step(x, y)
            ts[n].append(time.thread_time() - t)
    ref = statistics.median(ts[a.rows[0]])
    for n in built:
        med = statistics.median(ts[n])
        lo = min(ts[n])
        # per-round ratios: each round times every row within seconds, so a load change between
        # rounds cancels in the ratio; their median and range are the row's estimate and spread
        per = sorted(t / f for t, f in zip(ts[n], ts[a.rows[0]]))
        print(f"{n:12s} {1000 * med:8.1f} ms  x{med / ref:.3f} of {a.rows[0]}  (min x{lo / min(ts[a.rows[0]]):.3f};"
              f" per-round x{statistics.median(per):.3f} [{per[0]:.2f}-{per[-1]:.2f}])"
              f"  rounds {[round(1000 * t) for t in ts[n]]}")
    if a.breakdown:
        cats = {n: breakdown(b, x, y, a.breakdown_steps) for n, b in built.items()}
        names = list(CATEGORIES)
        print(f"self CPU ms per step by op category ({a.breakdown_steps} profiled steps; +/- vs {a.rows[0]})")
        print(f"{'row':14s}" + "".join(f"{c:>22s}" for c in names) + f"{'total':>16s}")
        base = cats[a.rows[0]]
        for n, c in cats.items():
            cells = "".join(f"{c[k]:10.1f} ({c[k] - base[k]:+8.1f})" for k in names)
            print(f"{n:14s}{cells}{sum(c.values()):9.1f} (x{sum(c.values()) / sum(base.values()):.3f})")
    for n in a.prof:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as pr:
            built[n].step(x, y)
        print("=====", n)
        print(pr.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40))


CATEGORIES = ("gemm", "thin_gemm", "attention", "patch_conv", "other")
GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addr_", "aten::addr"}


def category(name: str, shapes) -> str:
    if name in GEMMS:
        dims = [d for s in shapes if len(s) >= 2 for d in s[-2:]]
        return "thin_gemm" if dims and min(dims) < 128 else "gemm"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if "convolution" in name:
        return "patch_conv"
    return "other"


def breakdown(b, x, y, steps: int) -> dict[str, float]:
    """Self CPU time (ms per step) of ``b.step`` by :func:`category`, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as pr:
        for _ in range(steps):
            b.step(x, y)
    out = dict.fromkeys(CATEGORIES, 0.0)
    for e in pr.key_averages(group_by_input_shape=True):
        if e.key.startswith("aten::"):  # leaf ops carry the time; module/autograd wrappers are not aten
            out[category(e.key, e.input_shapes or [])] += e.self_cpu_time_total / 1000 / steps
    return out


if __name__ == "__main__":
    main()
