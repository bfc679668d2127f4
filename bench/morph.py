"""What each adapter costs on MORPH: ``python -m bench.morph [--model Ti --device cpu]``.

Rows: MORPH's fine-tuning levels 1-4 and the seed adapters (default configs), each at a 1-D sample
``(t=1, F=1, C=1, 1, 1, W)`` and a 2-D sample ``(t=1, F=2, C=1, 1, H, W)``. Columns: tokens per sample,
trainable parameters (% of the backbone), median training step time (forward, MSE, backward, AdamW step)
and peak memory (CUDA max allocated; on CPU the process's peak RSS after the row, which only grows, so
read CPU memory as an upper bound per row in the order run). Random weights (sizes as released).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import zoo

ROWS = [("morph_level1", "morph_ft", {"level": 1}), ("morph_level2", "morph_ft", {"level": 2}),
        ("morph_level3", "morph_ft", {"level": 3}), ("morph_level4", "morph_ft", {"level": 4}),
        ("lora", "lora", {}), ("adapter", "adapter", {}), ("ssf", "ssf", {}), ("bitfit", "bitfit", {}),
        ("f_adapter", "f_adapter", {}), ("full", "full", {})]


def shapes(w1d: int, hw2d: int) -> dict[str, tuple[int, ...]]:
    return {"1-D": (1, 1, 1, 1, 1, w1d), "2-D": (1, 2, 1, 1, hw2d, hw2d)}


def peak_memory(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_row(args, label, method, opts, shape):
    bb = zoo.create_backbone("morph", model=args.model, pretrained=False, **json.loads(args.kwargs)).to(args.device)
    zoo.apply_adapter(bb, method, **opts)
    trainable, _ = zoo.count_parameters(bb)
    total = sum(p.numel() for p in bb.parameters() if not p.requires_grad) + trainable
    x = torch.randn(args.batch_size, *shape, device=args.device)
    y = torch.randn(args.batch_size, *shape[1:], device=args.device)
    opt = torch.optim.AdamW(zoo.param_groups(bb, 1e-4, 0.0))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = F.mse_loss(bb(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    grid = bb.model.grid(x)
    return {"row": label, "shape": "x".join(map(str, shape)), "tokens": grid[0] * grid[1] * grid[2],
            "trainable": trainable, "trainable_pct": 100 * trainable / total,
            "step_ms": 1000 * statistics.median(times), "peak_mb": peak_memory(args.device)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="Ti")
    p.add_argument("--kwargs", default="{}", help='JSON overrides, e.g. \'{"depth": 2}\'')
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--w1d", type=int, default=1024)
    p.add_argument("--hw2d", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rows", nargs="*", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench/results_morph")
    args = p.parse_args(argv)
    rows = [r for r in ROWS if args.rows is None or r[0] in args.rows]
    res = []
    for name, shape in shapes(args.w1d, args.hw2d).items():
        for label, method, opts in rows:
            r = run_row(args, label, method, opts, shape)
            r["sample"] = name
            res.append(r)
            print(f"{name} {label:14s} tokens {r['tokens']:5d}  trainable {r['trainable']:>11,} ({r['trainable_pct']:.2f}%)"
                  f"  step {r['step_ms']:.1f} ms  peak {r['peak_mb']:.0f} MB", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"MORPH-{args.model} {args.kwargs}, batch {args.batch_size}, {args.device}", "",
             "| sample | method | tokens/sample | trainable | % | step (ms) | peak MB |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sample']} {r['shape']} | {r['row']} | {r['tokens']} | {r['trainable']:,} | {r['trainable_pct']:.2f} | "
              f"{r['step_ms']:.1f} | {r['peak_mb']:.0f} |" for r in res]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
