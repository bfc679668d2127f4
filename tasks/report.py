"""Result tables over finished runs: a Hydra callback for sweeps and ``python -m tasks.report DIR``."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


def collect(root: str | Path) -> list[dict[str, Any]]:
    """Every run's ``metrics.json`` under ``root`` (recursively), with its folder."""
    rows = []
    for f in sorted(Path(root).rglob("metrics.json")):
        m = json.loads(f.read_text())
        m["run_dir"] = str(f.parent)
        rows.append(m)
    return rows


def _fmt_acc(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for m in rows:
        p, bb = m.get("trainable_params", 0), max(1, m.get("backbone_params", 1))
        out.append([m.get("adapter", "?"), m.get("dataset", "?"), f"{p:,}", f"{100 * p / bb:.2f}%",
                    _fmt_acc(m.get("val/acc")), _fmt_acc(m.get("test/acc")), f"{m.get('artifact_bytes', 0) / 1024:.1f}"])
    return out


HEADER = ["adapter", "dataset", "trainable params", "% of backbone", "val acc", "test acc", "artifact KiB"]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict[str, Any]], title: str = "results") -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for h in HEADER:
        t.add_column(h, justify="left" if h in ("adapter", "dataset") else "right")
    for r in table_rows(rows):
        t.add_row(*r)
    Console(width=max(110, Console().width)).print(t)


class SummaryTable(Callback):
    """Hydra callback: at the end of a multirun, print and save the table of its runs."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        if not rows:
            return
        print_table(rows, title=f"results in {sweep_dir}")
        (sweep_dir / "summary.md").write_text(markdown(rows))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m tasks.report RUNS_DIR [RUNS_DIR ...]")
    rows = [r for d in sys.argv[1:] for r in collect(d)]
    print_table(rows)
    print(markdown(rows))
