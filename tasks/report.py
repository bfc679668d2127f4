"""Result tables over finished runs: a Hydra callback for sweeps and ``python -m tasks.report DIR``.

Task-agnostic: the metric columns are the ones each run's ``metrics.json`` declares (its task
kind's :class:`~tasks.base.Column` list); runs of different kinds in one table show the union,
with ``–`` where a run has no such metric. Pre-contract files read as classification.

Runs made under different protocols are never put side by side: their ``metrics.json`` ``protocol``
records (:mod:`tasks.protocol`: selection, whether validation was the test split, the metric's backend and
axes, the horizon, the normalisation; not the split names and sizes, which differ per dataset) split the
runs into one table each, headed by what its runs share.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from tasks.base import Column, columns_of, read_metrics


def collect(root: str | Path) -> list[dict[str, Any]]:
    """Every run's ``metrics.json`` under ``root`` (recursively), upgraded to the current schema
    (:func:`tasks.base.read_metrics`), with its folder."""
    rows = []
    for f in sorted(Path(root).rglob("metrics.json")):
        m = read_metrics(f)
        m["run_dir"] = str(f.parent)
        rows.append(m)
    return rows


PREFIX = [("adapter", "adapter"), ("dataset", "dataset"), ("adapter params", None), ("% of backbone", None)]
# How every parameter count of the project is meant (the run log, metrics.json's trainable_params, this table):
PARAMS_NOTE = "Adapter params: trainable parameters inside the backbone, task head excluded (as the papers count)."
SUFFIX = ["artifact KiB"]
STEP = "step ms"  # shown when a run recorded its mean training step time (metrics.json "step_ms")


def metric_columns(rows: list[dict[str, Any]]) -> list[Column]:
    """The union of the runs' declared columns, in order of first appearance (one per key)."""
    seen: dict[str, Column] = {}
    for m in rows:
        for c in columns_of(m):
            seen.setdefault(c.key, c)
    return list(seen.values())


def _timed(rows: list[dict[str, Any]]) -> bool:
    return any(m.get("step_ms") is not None for m in rows)


def header(rows: list[dict[str, Any]]) -> list[str]:
    return [h for h, _ in PREFIX] + [c.header for c in metric_columns(rows)] + SUFFIX + ([STEP] if _timed(rows) else [])


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    cols = metric_columns(rows)
    out = []
    for m in rows:
        p, bb = m.get("trainable_params", 0), max(1, m.get("backbone_params", 1))
        out.append([m.get("adapter", "?"), m.get("dataset", "?"), f"{p:,}", f"{100 * p / bb:.2f}%",
                    *[c.format(m.get(c.key)) for c in cols], f"{m.get('artifact_bytes', 0) / 1024:.1f}",
                    *([Column("step_ms", STEP).format(m.get("step_ms"))] if _timed(rows) else [])])
    return out


PER_DATASET = ("name", "splits", "validated_on")  # differ between datasets of one sweep: not a protocol difference


def protocol_groups(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """``[(description, rows)]``: the runs grouped by their comparable protocol (one group when all agree)."""
    from tasks.protocol import comparable_key

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for m in rows:  # files written before the record (no protocol dict) stay together, as they always were shown
        key = comparable_key(m, ignore=PER_DATASET) if isinstance(m.get("protocol"), dict) else ("not recorded",)
        groups.setdefault(key, []).append(m)
    out = []
    for rs in groups.values():
        p = rs[0].get("protocol")
        desc = (", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in sorted(p.items()) if k not in PER_DATASET)
                if isinstance(p, dict) else "not recorded (metrics.json written before the protocol record)")
        out.append((desc, rs))
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    groups = protocol_groups(rows)
    if len(groups) > 1:
        return "\n".join(f"**protocol**: {desc}\n\n{_markdown_table(rs)}" for desc, rs in groups)
    return _markdown_table(rows)


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    head = header(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
    return "\n".join(lines) + "\n\n" + PARAMS_NOTE + "\n"


def print_table(rows: list[dict[str, Any]], title: str = "results") -> None:
    groups = protocol_groups(rows)
    for i, (desc, rs) in enumerate(groups):
        _print_table(rs, title if len(groups) == 1 else f"{title} ({i + 1}/{len(groups)}, protocol: {desc})")


def _print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, caption=PARAMS_NOTE)
    for h in header(rows):
        t.add_column(h, justify="left" if h in ("adapter", "dataset") else "right")
    for r in table_rows(rows):
        t.add_row(*r)
    Console(width=max(110, Console().width)).print(t)


class SummaryTable(Callback):
    """Hydra callback: at the end of a multirun, print and save the table of its runs."""

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        import time

        self._t0 = time.monotonic()

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        import time

        from tasks.trainer.progress import fmt_seconds

        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        if not rows:
            return
        wall = time.monotonic() - getattr(self, "_t0", time.monotonic())
        print_table(rows, title=f"results in {sweep_dir} ({len(rows)} runs, {fmt_seconds(wall)} wall time)")
        from zoo.io import atomic_write_text

        atomic_write_text(sweep_dir / "summary.md", markdown(rows))


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tasks.report",
                                description="Table of finished runs (every metrics.json under the folders).")
    p.add_argument("runs", nargs="+", metavar="RUNS_DIR", help="run or multirun folders (e.g. logs/multiruns/<time>)")
    args = p.parse_args(argv)
    missing = [d for d in args.runs if not Path(d).exists()]
    if missing:
        print(f"error: no such folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = [r for d in args.runs for r in collect(d)]
    if not rows:
        print(f"error: no metrics.json (finished run) under {', '.join(args.runs)}", file=sys.stderr)
        return 1
    print_table(rows)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
