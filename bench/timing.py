"""Timing helpers shared by the benchmarks (``bench.adapters``, ``bench.serving``): medians of calls,
interleaved rounds (so a shared machine's slow drifts hit every row alike), the environment line."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], None], n: int, device: str) -> float:
    """Median seconds of ``n`` calls of ``fn``."""
    ts = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def interleaved(built: list, fns: dict[str, Callable[[], None]], args, what: str) -> dict[str, list[float]]:
    """``args.repeats`` rounds; in each, every row's median over ``args.steps`` calls (``built`` is unused)."""
    for label, fn in fns.items():  # warm-up (allocator, lazy init, first-call overheads)
        for _ in range(args.warmup):
            fn()
    out: dict[str, list[float]] = {label: [] for label in fns}
    for r in range(args.repeats):
        for label, fn in fns.items():
            out[label].append(time_calls(fn, args.steps, args.device))
        log(args, f"  {what}: round {r + 1}/{args.repeats} done")
    return out


def log(args, msg: str) -> None:
    if not args.quiet:
        print(msg, flush=True)


def environment(args) -> str:
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"
    return f"torch {torch.__version__}, {dev}"
