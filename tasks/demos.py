"""One table over every modality's demo: ``python -m tasks.demos DIR`` (``make demos`` runs them, then this).

``make demos`` runs each demo with ``paths.log_dir=DIR/<demo>``; every finished run's ``metrics.json``
under ``DIR`` becomes one row. Kinds measure different things, so instead of the union of all columns
(:mod:`tasks.report`, one kind at a time) each row shows its task's **selection metric** (the declared
monitor, e.g. ``val/acc`` max, ``val/nrmse`` min) and its **first test metric**, each with its name and
direction, plus the adapter's parameters (head excluded, as everywhere: :data:`tasks.report.PARAMS_NOTE`)
and the run's wall time. ``summary.md`` / ``summary.json`` go next to the runs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tasks.report import PARAMS_NOTE, collect

HEADER = ["demo", "kind", "adapter", "dataset", "adapter params", "% of backbone", "selection (val)", "test",
          "wall time"]


def _metric(m: dict[str, Any], key: str | None) -> str:
    from tasks.base import columns_of

    if key is None or m.get(key) is None:
        return "–"
    col = next((c for c in columns_of(m) if c.key == key), None)
    value = col.format(m[key]) if col is not None else f"{float(m[key]):.4g}"
    name = col.header if col is not None else key
    if col is not None and col.fmt == "pct":
        value += "%"
    return f"{name} {value}"


def _test_key(m: dict[str, Any]) -> str | None:
    """The first declared test metric with a value."""
    from tasks.base import columns_of

    return next((c.key for c in columns_of(m) if c.key.startswith("test/") and m.get(c.key) is not None), None)


def demo_name(run_dir: Path, root: Path) -> str:
    rel = run_dir.resolve().relative_to(root.resolve()).parts
    return rel[0] if len(rel) > 1 else "-"


def rows_of(root: str | Path) -> list[dict[str, Any]]:
    """One record per finished run under ``root``: the table's cells and the numbers behind them."""
    from tasks.trainer.progress import fmt_seconds

    root = Path(root)
    out = []
    for m in collect(root):
        mon = m.get("monitor") or {}
        arrow = {"max": "↑", "min": "↓"}.get(mon.get("mode"), "")
        p, bb = m.get("trainable_params") or 0, max(1, m.get("backbone_params") or 1)
        test = _test_key(m)
        out.append({
            "cells": [demo_name(Path(m["run_dir"]), root), str(m.get("kind", "?")), str(m.get("adapter", "?")),
                      str(m.get("dataset", "?")), f"{p:,}", f"{100 * p / bb:.2f}%",
                      (_metric(m, mon.get("name")) + f" {arrow}").strip(), _metric(m, test),
                      fmt_seconds(m["wall_time_s"]) if m.get("wall_time_s") is not None else "–"],
            "monitor": mon, "test": {"name": test, "value": m.get(test) if test else None},
            "run_dir": m["run_dir"], "wall_time_s": m.get("wall_time_s"),
        })
    out.sort(key=lambda r: r["cells"][:3])
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r["cells"]) + " |" for r in rows]
    total = sum(r["wall_time_s"] or 0 for r in rows)
    from tasks.trainer.progress import fmt_seconds

    return ("\n".join(lines) + f"\n\n{len(rows)} runs, {fmt_seconds(total)} of training wall time in all "
            f"(↑ higher is better, ↓ lower). {PARAMS_NOTE}\n")


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, caption=f"↑ higher is better, ↓ lower. {PARAMS_NOTE}")
    for h in HEADER:
        t.add_column(h, justify="left" if h in ("demo", "kind", "adapter", "dataset", "selection (val)", "test") else "right")
    for r in rows:
        t.add_row(*r["cells"])
    Console(width=max(140, Console().width)).print(t)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from zoo.io import atomic_write_text

    p = argparse.ArgumentParser(prog="python -m tasks.demos", description="One table over the demos' runs.")
    p.add_argument("root", metavar="DIR", help="the folder make demos wrote (logs/demos/<time>)")
    args = p.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"error: no such folder: {root}", file=sys.stderr)
        return 2
    rows = rows_of(root)
    if not rows:
        print(f"error: no finished run (metrics.json) under {root}", file=sys.stderr)
        return 1
    print_table(rows, title=f"Adapter Zoo demos ({root})")
    atomic_write_text(root / "summary.md", markdown(rows))
    atomic_write_text(root / "summary.json", json.dumps([{k: v for k, v in r.items()} for r in rows], indent=1) + "\n")
    print(f"table: {root / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
