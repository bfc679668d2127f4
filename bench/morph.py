"""MORPH cost at a 1-D and a 2-D sample shape: ``python -m bench.morph [--model Ti --w1d 1024 --hw2d 128]``.

A thin wrapper over ``python -m bench.adapters --backbone morph`` (one codepath): it runs the table once
per sample shape, ``(t=1, F=1, C=1, D=1, H=1, W=w1d)`` and ``(t=1, F=2, C=1, D=1, H=hw2d, W=hw2d)``, with
MORPH's fine-tuning levels 1-4 and the seed adapters, writes each shape's table to ``OUT/1d`` and
``OUT/2d`` and a combined ``OUT/results.md`` (tokens per sample, trainable %, step time and its ratio
to the frozen floor, peak memory). Random weights (sizes as released).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import adapters
from bench.profiles import FLOOR, morph_sample, morph_tokens
from zoo.io import atomic_write_text

ROWS = ["morph_level1", "morph_level2", "morph_level3", "morph_level4", "lora", "adapter", "ssf", "bitfit",
        "f_adapter", "full"]
SHAPES = {"1-D": ("1d", "w1d"), "2-D": ("2d", "hw2d")}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="Ti")
    p.add_argument("--kwargs", default="{}", help='JSON overrides, e.g. \'{"depth": 2}\'')
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--w1d", type=int, default=1024)
    p.add_argument("--hw2d", type=int, default=128)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rows", nargs="*", default=None, help=f"default: {' '.join(ROWS)}")
    p.add_argument("--memory", choices=["subprocess", "skip"], default="subprocess")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="bench/results/morph")
    a = p.parse_args(argv)
    out, res, lines = Path(a.out), [], []
    for name, (shape, size_arg) in SHAPES.items():
        argv_s = ["--backbone", "morph", "--model", a.model, "--kwargs", a.kwargs, "--morph-shape", shape,
                  "--img-size", str(getattr(a, size_arg)), "--batch-size", str(a.batch_size), "--steps", str(a.steps),
                  "--repeats", str(a.repeats), "--warmup", str(a.warmup), "--memory", a.memory, "--threads",
                  str(a.threads), "--skip-merged", "--quiet", "--out", str(out / shape),
                  "--adapters", *(a.rows or ROWS)] + (["--device", a.device] if a.device else [])
        table = adapters.main(argv_s)
        ns = argparse.Namespace(model=a.model, kwargs=a.kwargs, morph_shape=shape, img_size=getattr(a, size_arg))
        tokens = morph_tokens(ns)
        sample = "x".join(str(d) for d in morph_sample(ns))
        for r in table["rows"]:
            row = {"sample": name, "row": r["label"], "shape": sample, "tokens": tokens, "trainable": r["trainable"],
                   "trainable_pct": r["trainable_pct"], "step_ms": 1e3 * r["train_s"],
                   "x_floor": r["train_x_floor"], "peak_mb": (r["peak_bytes"] or 0) / 2 ** 20 or None}
            mb = "—" if row["peak_mb"] is None else f"{row['peak_mb']:.0f}"
            lines.append(f"| {name} {sample} | {row['row']} | {tokens} | {row['trainable']:,} | "
                         f"{row['trainable_pct']:.2f} | {row['step_ms']:.1f} | {adapters._fmt_ratio(row['x_floor'])} | "
                         f"{mb} |")
            if r["label"] != FLOOR:
                res.append(row)
    head = [f"MORPH-{a.model} {a.kwargs}, batch {a.batch_size} (per shape: {out}/1d, {out}/2d)", "",
            "| sample | method | tokens/sample | trainable | % | step (ms) | ×floor | peak MB |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    atomic_write_text(out / "results.md", "\n".join(head + lines) + "\n")
    atomic_write_text(out / "results.json", json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
