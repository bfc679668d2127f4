"""CPU time of one training step per row, old vs fused low-rank paths, interleaved (a loaded machine's helper).

``python -m bench.step_cpu_time --depth 12 --reps 4 --rows floor mhr mhr_old colora colora_old lora --prof mhr``
(``--rows`` takes any registered adapter name, e.g. ``hydra ssf comp_lora``)

Builds the rows as ``bench.adapters`` does (ViT-S/16, 224 px, batch 8) and times each step with
``time.thread_time`` (CPU time of this thread, one torch thread), which a machine shared with other
jobs inflates much less than wall time. ``NAME_old`` is the row with ``fused=False`` and
``batched_mix=False`` on every adapter module (the composed path). ``--prof`` prints torch.profiler's
table of one step for the named rows.
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
    a = p.parse_args()
    torch.set_num_threads(1)
    args = argparse.Namespace(model="vit_small_patch16_224", img_size=224, batch_size=8, depth=a.depth,
                              device="cpu", num_classes=10, backbone="vit")
    # any registered adapter by name, with bench.adapters' config for it; NAME_old: the composed path
    rows = {"floor": B.Row(B.FLOOR, "floor")}
    for n in a.rows:
        base = n.removesuffix("_old")
        if base != "floor":
            rows[n] = B.Row(base, "zoo", base, dict(B.BENCH_CONFIG.get(base, {})))
    built = {n: B.build(args, rows[n]) for n in a.rows}
    for n, b in built.items():
        if n.endswith("_old"):
            for m in b.model.modules():
                for flag in ("fused", "batched_mix"):
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
        print(f"{n:12s} {1000 * med:8.1f} ms  x{med / ref:.3f} of {a.rows[0]}  rounds {[round(1000 * t) for t in ts[n]]}")
    for n in a.prof:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as pr:
            built[n].step(x, y)
        print("=====", n)
        print(pr.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40))


if __name__ == "__main__":
    main()
