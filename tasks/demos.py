"""One table over every modality's demo: ``python -m tasks.demos DIR`` (``make demos`` runs them, then this).

``make demos`` runs each demo with ``paths.log_dir=DIR/<demo>``; every finished run's ``metrics.json``
under ``DIR/<demo>`` belongs to that demo. Within a demo the runs are grouped as :mod:`tasks.report` groups
a sweep (its protocol groups, then its rows: runs of one row label and one resolved config, seeds / folds
averaged, mean ± std), so a row here is the same row as in that demo's own table. Kinds measure
different things, so instead of the union of all columns each row shows its task's **selection metric**
(the declared monitor, e.g. ``val/acc`` max, ``val/nrmse`` min) and its **first test metric**, each with
its name and direction, plus the adapter's parameters (head excluded, as everywhere:
:data:`tasks.report.PARAMS_NOTE`) and the row's training wall time. Under each demo's rows comes the
caption :func:`tasks.report.caption` computes from its runs, with the baseline the demo's runs recorded
(``metrics.json`` ``report``). ``summary.md`` / ``summary.json`` go next to the runs.
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from tasks.base import Column, columns_of
from tasks.report import PARAMS_NOTE, caption, collect, fmt_stat, group_runs, mean_std, protocol_groups

HEADER = ["demo", "kind", "row", "dataset", "runs", "adapter params", "% of backbone", "selection (val)", "test",
          "wall time"]
LEGEND = f"mean ± std over each row's runs (seeds / folds); ↑ higher is better, ↓ lower. {PARAMS_NOTE}"


def demo_name(run_dir: Path, root: Path) -> str:
    rel = run_dir.resolve().relative_to(root.resolve()).parts
    return rel[0] if len(rel) > 1 else "-"


def _column(runs: list[dict[str, Any]], key: str) -> Column:
    return next((c for m in runs for c in columns_of(m) if c.key == key), Column(key, key))


def _stat(runs: list[dict[str, Any]], key: str | None) -> tuple[str, tuple[float, float, int]]:
    """``'<header> mean ± std[%]'`` of ``key`` over ``runs`` and the numbers, ``'–'`` when no run has it."""
    if key is None:
        return "–", (float("nan"), float("nan"), 0)
    col = _column(runs, key)
    stat = mean_std([m.get(key) for m in runs])
    if stat[2] == 0:
        return "–", stat
    return f"{col.header} {fmt_stat(col, *stat)}{'%' if col.fmt == 'pct' else ''}", stat


def _test_key(runs: list[dict[str, Any]]) -> str | None:
    """The first declared test metric that some run has a value for."""
    keys = [c.key for m in runs for c in columns_of(m) if c.key.startswith("test/")]
    return next((k for k in dict.fromkeys(keys) if any(m.get(k) is not None for m in runs)), None)


def demo_caption(runs: list[dict[str, Any]]) -> str:
    """The caption :func:`tasks.report.caption` computes for one demo's runs, with the baseline (and metric,
    reference) they recorded; a line saying why there is none otherwise."""
    report = next((m["report"] for m in runs if isinstance(m.get("report"), dict) and m["report"].get("baseline")),
                  None)
    if report is None:
        return "No caption: these runs record no report.baseline (the demo sets none, or metrics.json predates it)."
    return caption(runs, report["baseline"], report.get("metric"), report.get("reference"))


def demos_of(root: str | Path) -> list[dict[str, Any]]:
    """Per demo folder under ``root``: ``{"demo", "rows", "caption"}``, its rows grouped as in its own table."""
    from tasks.trainer.progress import fmt_seconds

    root = Path(root)
    by_demo: dict[str, list[dict[str, Any]]] = {}
    for m in collect(root):
        by_demo.setdefault(demo_name(Path(m["run_dir"]), root), []).append(m)
    out = []
    for demo in sorted(by_demo):
        rows = []
        for _, runs_of_protocol in protocol_groups(by_demo[demo]):
            for label, runs in group_runs(runs_of_protocol).items():
                m = runs[0]
                mon = m.get("monitor") or {}
                arrow = {"max": "↑", "min": "↓"}.get(mon.get("mode"), "")
                p, bb = m.get("trainable_params") or 0, max(1, m.get("backbone_params") or 1)
                sel_text, sel = _stat(runs, mon.get("name"))
                test = _test_key(runs)
                test_text, tst = _stat(runs, test)
                walls = [r["wall_time_s"] for r in runs if r.get("wall_time_s") is not None]
                rows.append({
                    "cells": [demo, str(m.get("kind", "?")), label, str(m.get("dataset", "?")), str(len(runs)),
                              f"{p:,}", f"{100 * p / bb:.2f}%", (sel_text + f" {arrow}").strip() if sel[2] else "–",
                              test_text, fmt_seconds(sum(walls)) if walls else "–"],
                    "label": label, "runs": [r["run_dir"] for r in runs], "seeds": [r.get("seed") for r in runs],
                    "monitor": {"name": mon.get("name"), "mode": mon.get("mode"), "mean": sel[0], "std": sel[1]},
                    "test": {"name": test, "mean": tst[0], "std": tst[1]},
                    "wall_time_s": sum(walls) if walls else None,
                })
        out.append({"demo": demo, "rows": rows, "caption": demo_caption(by_demo[demo])})
    return out


def rows_of(root: str | Path) -> list[dict[str, Any]]:
    """Every demo's rows, in table order."""
    return [r for d in demos_of(root) for r in d["rows"]]


def text_table(demos: list[dict[str, Any]]) -> str:
    """One plain-text table: a demo's rows, then its caption (wrapped to the table's width), then the next."""
    rows = [r["cells"] for d in demos for r in d["rows"]]
    widths = [max(len(str(x)) for x in col) for col in zip(HEADER, *rows)]
    right = {"runs", "adapter params", "% of backbone", "wall time"}

    def line(cells):
        return " | ".join(c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(cells, widths, HEADER)).rstrip()

    total = sum(widths) + 3 * (len(widths) - 1)
    rule = "-" * total
    out = [line(HEADER), rule]
    for d in demos:
        out += [line(r["cells"]) for r in d["rows"]]
        for para in d["caption"].splitlines():
            out += textwrap.wrap(para, width=max(60, total), initial_indent="  ", subsequent_indent="    ")
        out.append(rule)
    return "\n".join(out)


def markdown(demos: list[dict[str, Any]]) -> str:
    """The table as Markdown (one table; each demo's caption follows, under its name)."""
    from tasks.trainer.progress import fmt_seconds

    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r["cells"]) + " |" for d in demos for r in d["rows"]]
    captions = [f"**{d['demo']}**: " + d["caption"].replace("\n", "  \n") for d in demos]
    total = sum(r["wall_time_s"] or 0 for d in demos for r in d["rows"])
    n_runs = sum(len(r["runs"]) for d in demos for r in d["rows"])
    return ("\n".join(lines) + f"\n\n{n_runs} runs, {fmt_seconds(total)} of training wall time in all. {LEGEND}\n\n"
            + "\n\n".join(captions) + "\n")


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
    demos = demos_of(root)
    if not demos:
        print(f"error: no finished run (metrics.json) under {root}", file=sys.stderr)
        return 1
    print(f"Adapter Zoo demos ({root})\n\n{text_table(demos)}\n{LEGEND}")
    atomic_write_text(root / "summary.md", markdown(demos))
    atomic_write_text(root / "summary.json", json.dumps(demos, indent=1, default=str) + "\n")
    print(f"table: {root / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
