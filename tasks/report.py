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
import math
import re
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from tasks.base import Column, columns_of, read_metrics


def collect(root: str | Path) -> list[dict[str, Any]]:
    """Every run's ``metrics.json`` under ``root`` (recursively), upgraded to the current schema
    (:func:`tasks.base.read_metrics`), with its folder."""
    rows = []
    for f in sorted(Path(root).rglob("metrics.json"), key=_natural):
        m = read_metrics(f)
        m["run_dir"] = str(f.parent)
        rows.append(m)
    return rows


def _natural(path: Path) -> list:
    """Sort key that puts a sweep's job 2 before job 10 (``2_lora`` < ``10_full``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


PREFIX = [("adapter", "adapter"), ("dataset", "dataset"), ("adapter params", None), ("% of backbone", None)]
# How every parameter count of the project is meant (the run log, metrics.json's trainable_params, this table):
PARAMS_NOTE = ("Adapter params: trainable parameters inside the backbone, task head excluded (as the papers count); "
               "% of backbone: of all its parameters, the adapter's included (as peft's print_trainable_parameters).")
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


def replicated(rows: list[dict[str, Any]]) -> bool:
    """Some row label has several runs (seeds or folds): the table shows mean ± std per label."""
    return len(group_runs(rows)) < len(rows)


def _table(rows: list[dict[str, Any]], keys: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    if replicated(rows) or keys:
        return grouped_header(rows, keys), grouped_rows(rows, keys)
    return header(rows), table_rows(rows)


PER_DATASET = ("name", "splits", "validated_on")  # differ between datasets of one sweep: not a protocol difference


def protocol_groups(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """``[(description, rows)]``: the runs grouped by their comparable protocol (one group when all agree)."""
    from tasks.protocol import EVALUATE_ONLY, comparable_key, comparable_record

    groups: dict[tuple, list[dict[str, Any]]] = {}
    frozen: list[dict[str, Any]] = []
    for m in rows:  # files written before the record (no protocol dict) stay together, as they always were shown
        p = m.get("protocol")
        if isinstance(p, dict) and p.get("selection") == EVALUATE_ONLY:
            frozen.append(m)
            continue
        key = comparable_key(m, ignore=PER_DATASET) if isinstance(p, dict) else ("not recorded",)
        groups.setdefault(key, []).append(m)
    # An evaluate-only run (a demo's zero-shot / no-fine-tuning row) selects nothing, so it is comparable with
    # trained runs whose record agrees but for the selection: it joins each such table (its own otherwise)
    without_selection = {key: comparable_key(rs[0], ignore=PER_DATASET + ("selection",)) for key, rs in groups.items()}
    for m in frozen:
        k = comparable_key(m, ignore=PER_DATASET + ("selection",))
        homes = [key for key, ks in without_selection.items() if ks == k]
        for key in homes or [("evaluate-only",) + k]:
            groups.setdefault(key, []).append(m)
    order, frozen_ids = {id(m): i for i, m in enumerate(rows)}, {id(m) for m in frozen}
    out = []
    for rs in groups.values():
        rs.sort(key=lambda m: order[id(m)])  # the runs' own order (a joined evaluate-only run is not moved to the end)
        p = next((m for m in rs if id(m) not in frozen_ids), rs[0]).get("protocol")  # a trained run's selection heads it
        desc = (", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in sorted(comparable_record(p, PER_DATASET).items()))
                if isinstance(p, dict) else "not recorded (metrics.json written before the protocol record)")
        out.append((desc, rs))
    return out


def markdown(rows: list[dict[str, Any]], caption_text: str = "", columns: list[str] | None = None) -> str:
    groups = protocol_groups(rows)
    if len(groups) > 1:
        text = "\n".join(f"**protocol**: {desc}\n\n{_markdown_table(rs, columns)}" for desc, rs in groups)
    else:
        text = _markdown_table(rows, columns)
    return text + (f"\n{caption_text}\n" if caption_text else "")


def _markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    head, body = _table(rows, columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n\n" + PARAMS_NOTE + "\n"


def print_table(rows: list[dict[str, Any]], title: str = "results", caption_text: str = "",
                columns: list[str] | None = None) -> None:
    from rich.console import Console

    groups = protocol_groups(rows)
    for i, (desc, rs) in enumerate(groups):
        _print_table(rs, title if len(groups) == 1 else f"{title} ({i + 1}/{len(groups)}, protocol: {desc})", columns)
    if caption_text:
        Console(width=max(110, Console().width)).print(caption_text, highlight=False, markup=False)


def _print_table(rows: list[dict[str, Any]], title: str, columns: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    head, body = _table(rows, columns)
    t = Table(title=title, caption=PARAMS_NOTE)
    for h in head:
        t.add_column(h, justify="left" if h in ("adapter", "row", "dataset") else "right")
    for r in body:
        t.add_row(*r)
    # as wide as the table needs: a narrow (or absent) terminal would otherwise wrap each "mean ± std"
    # over two lines and cut the row labels to "samed_l…"
    natural = Console(width=1000).measure(t).maximum
    Console(width=max(110, Console().width, natural)).print(t)


# ---------------------------------------------------------------------- rows over seeds, and the caption
# A demo sweeps its rows (adapters and baselines) over seeds or folds; the table shows one line per row
# label (``report.label``, default the adapter config's name) with mean ± std, and a caption computed from the
# numbers says what the effect is (best row vs ``report.baseline``) and how big the noise is.

# two-sided 95% critical values of Student's t for 1..10 degrees of freedom; beyond, 1.96 + 2.4/df
# (within 0.03 of the exact value)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t_critical(df: int) -> float:
    return T975[df - 1] if df <= len(T975) else 1.96 + 2.4 / df


def row_label(m: dict[str, Any]) -> str:
    return m.get("label") or m.get("adapter") or "?"


def replicate(m: dict[str, Any]) -> tuple:
    """What pairs two rows' runs: the seed and, where the task has folds, the fold."""
    return (m.get("seed"), m.get("fold"))


def group_runs(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs by row, in order of first appearance: a row is a label and one resolved config (``config_id``:
    runs that differ by more than their seed / fold are never averaged). A label run under several configs
    (e.g. two learning rates) gives one row per config, named ``label [config_id]``; files without a
    ``config_id`` (written before it) group by label alone."""
    by_key: dict[tuple, list[dict[str, Any]]] = {}
    for m in rows:
        by_key.setdefault((row_label(m), m.get("config_id")), []).append(m)
    n_configs: dict[str, int] = {}
    for label, _ in by_key:
        n_configs[label] = n_configs.get(label, 0) + 1
    return {(label if n_configs[label] == 1 else f"{label} [{cid}]"): runs for (label, cid), runs in by_key.items()}


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count of the non-missing values."""
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return math.nan, math.nan, 0
    mu = sum(v) / len(v)
    sd = math.sqrt(sum((x - mu) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return mu, sd, len(v)


def fmt_spread(col: Column, sd: float) -> str:
    """A standard deviation, two significant digits (points for percentages)."""
    return f"{100 * sd:.1f}" if col.fmt == "pct" else f"{sd:.2g}"


def fmt_stat(col: Column, mu: float, sd: float, n: int) -> str:
    if n == 0:
        return col.format(None)
    return col.format(mu) if n == 1 else f"{col.format(mu)} ± {fmt_spread(col, sd)}"


def shown_columns(rows: list[dict[str, Any]], keys: list[str] | None = None) -> list[Column]:
    """The metric columns to show: ``keys`` (in that order) where given, else all of them."""
    cols = metric_columns(rows)
    if not keys:
        return cols
    by_key = {c.key: c for c in cols}
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise ValueError(f"report.columns: no such metric {unknown}; valid: {', '.join(by_key)}")
    return [by_key[k] for k in keys]


def grouped_header(rows: list[dict[str, Any]], keys: list[str] | None = None) -> list[str]:
    return ["row", "dataset", "runs", *[h for h, _ in PREFIX[2:]], *[c.header for c in shown_columns(rows, keys)],
            *SUFFIX]


def grouped_rows(rows: list[dict[str, Any]], keys: list[str] | None = None) -> list[list[str]]:
    """One line per row label: the metric columns as mean ± std over its runs (seeds / folds)."""
    cols = shown_columns(rows, keys)
    out = []
    for label, runs in group_runs(rows).items():
        m = runs[0]
        p, bb = m.get("trainable_params", 0), max(1, m.get("backbone_params", 1))
        kib = mean_std([r.get("artifact_bytes", 0) for r in runs])[0] / 1024
        out.append([label, m.get("dataset", "?"), str(len(runs)), f"{p:,}", f"{100 * p / bb:.2f}%",
                    *[fmt_stat(c, *mean_std([r.get(c.key) for r in runs])) for c in cols], f"{kib:.1f}"])
    return out


def effect_metric(rows: list[dict[str, Any]], key: str | None = None) -> tuple[Column, str]:
    """The caption's metric and its direction: ``key`` if given, else the test counterpart of the
    runs' selection metric (``val/x`` -> ``test/x``) where the runs have it, else the selection metric."""
    cols = {c.key: c for c in metric_columns(rows)}
    mon = next((m["monitor"] for m in rows if m.get("monitor")), {"name": "val/acc", "mode": "max"})
    if key is None:
        test = "test/" + mon["name"].split("/", 1)[-1]
        key = test if any(m.get(test) is not None for m in rows) else mon["name"]
    col = cols.get(key) or Column(key, key)
    return col, mon.get("mode", "max")


def _diff_text(col: Column, gain: float) -> str:
    """An improvement (positive = better, whatever the metric's direction) in the column's unit, in words."""
    size = f"{100 * abs(gain):.1f} points" if col.fmt == "pct" else f"{abs(gain):.4g}"
    return f"{size} {'better' if gain > 0 else 'worse' if gain < 0 else 'apart'}"


def compare(base: list[dict[str, Any]], other: list[dict[str, Any]], key: str, mode: str) -> dict[str, Any]:
    """``other`` vs ``base`` on ``key``: the improvement (positive = better under ``mode``), its noise and verdict.

    Paired by seed (and fold) where at least two replicates are shared: the per-replicate improvements'
    mean, std and a paired t-test; otherwise the two groups' means with Welch's standard error. Verdict
    ``better`` / ``worse`` when the improvement is beyond 95% of the noise (|t| > t_crit), else ``within``;
    ``unknown`` with one run on each side (no noise estimate).
    """
    sign = 1.0 if mode == "max" else -1.0
    b = {replicate(m): m.get(key) for m in base if m.get(key) is not None}
    o = {replicate(m): m.get(key) for m in other if m.get(key) is not None}
    shared = [r for r in o if r in b]
    mb, sb, nb = mean_std(list(b.values()))
    mo, so, no = mean_std(list(o.values()))
    res: dict[str, Any] = {"base": (mb, sb, nb), "other": (mo, so, no)}
    if nb == 0 or no == 0:
        return {**res, "verdict": "unknown", "gain": math.nan, "noise": math.nan, "paired": False, "n": 0}
    if len(shared) >= 2:
        d = [sign * (o[r] - b[r]) for r in shared]
        gain, sd, n = mean_std(d)
        se, df, paired = sd / math.sqrt(n), n - 1, True
        noise = sd
    else:
        gain, n, paired = sign * (mo - mb), min(nb, no), False
        se = math.sqrt(sb ** 2 / nb + so ** 2 / no)
        df, noise = max(1, min(nb, no) - 1), math.sqrt((sb ** 2 + so ** 2) / 2)
    if nb + no <= 2 or (not paired and min(nb, no) < 2):  # a side of one unpaired run has no noise estimate
        verdict = "unknown"
    elif se == 0 and gain == 0:
        verdict = "within"
    elif se == 0:
        verdict = "better" if gain > 0 else "worse"
    else:
        t = gain / se
        verdict = "better" if t > t_critical(df) else "worse" if t < -t_critical(df) else "within"
    return {**res, "verdict": verdict, "gain": gain, "noise": noise, "paired": paired, "n": n}


ROW_VERDICT = {"better": "better beyond the noise", "within": "within the noise",
               "worse": "worse beyond the noise", "unknown": "not judged"}


def caption(rows: list[dict[str, Any]], baseline: str, metric: str | None = None, reference: str | None = None) -> str:
    """What the table shows, from its numbers: the best row (ranked on the runs' validation metric, never
    on test) against ``baseline`` (a row label), the difference and the noise (std over seeds, or of the
    paired per-seed differences), then every other row against the baseline, and with ``reference``
    (e.g. full fine-tuning) every other row against it too. Says so when no row beats the baseline beyond
    the noise; when no run has a validation score, headlines no row and says why (rows not ranked)."""
    groups = group_runs(rows)
    if baseline not in groups:
        return f"No caption: the baseline row {baseline!r} is not among the runs ({', '.join(groups)})."
    by_protocol = protocol_groups(rows)
    if len(by_protocol) > 1:  # compare only what was measured the same way as the baseline
        keep = next(rs for _, rs in by_protocol if any(row_label(m) == baseline for m in rs))
        kept = {id(m) for m in keep}
        left = list(dict.fromkeys(row_label(m) for m in rows if id(m) not in kept))
        text = caption(keep, baseline, metric, reference)
        return f"{text}\n(not compared, made under another protocol than the baseline: {', '.join(left)})"
    col, mode = effect_metric(rows, metric)
    others = {k: compare(groups[baseline], v, col.key, mode) for k, v in groups.items() if k != baseline}
    if not others:
        return f"Only the baseline row {baseline!r} ran: nothing to compare."
    sign = 1.0 if mode == "max" else -1.0
    scored = {k: c for k, c in others.items() if c["other"][2]}
    if not scored:
        return f"No caption: no run has {col.key}."
    # the best row is the one the selection metric (validation) ranks first, never the test metric: rows
    # without a validation score are not ranked (they are still compared with the baseline, below)
    sel_key = next((m["monitor"]["name"] for m in rows if m.get("monitor")), col.key)

    def selection_mean(k):
        vals = [r[sel_key] for r in groups[k] if r.get(sel_key) is not None]
        return sum(vals) / len(vals) if vals else None

    validated = {k: v for k in scored if (v := selection_mean(k)) is not None}
    best = max(validated, key=lambda k: sign * validated[k]) if validated else None
    direction = "higher is better" if mode == "max" else "lower is better"
    n_runs = max(len(v) for v in groups.values())

    def stat(s):
        return fmt_stat(col, *s)

    def noise(c):
        if c["verdict"] == "unknown" and c["n"] <= 1:
            return "one run each, so the noise is unknown"
        what = "std of the paired per-seed differences" if c["paired"] else "pooled std over seeds"
        unit = " points" if col.fmt == "pct" else ""
        return f"{what} {fmt_spread(col, c['noise'])}{unit}, n={c['n']}, 95% t-test"

    head = f"{col.header} ({direction}), mean ± std over up to {n_runs} seeds/folds per row. "
    if best is None:
        base_stat = stat(next(iter(scored.values()))["base"])
        lines = [head + f"Rows not ranked: no run has a validation score ({sel_key}), and a best row is never chosen "
                 f"on test. Each row vs baseline {baseline}: {base_stat}."]
    else:
        c = scored[best]
        verdict = {
            "better": f"{best} beats {baseline} beyond the noise",
            "within": f"{best} does NOT beat {baseline} beyond the noise",
            "worse": f"no row beats {baseline}: the best, {best}, is worse beyond the noise",
            "unknown": f"{best} vs {baseline} cannot be judged (one run each)",
        }[c["verdict"]]
        lines = [head + f"Best row {best}: {stat(c['other'])} vs baseline {baseline}: "
                 f"{stat(c['base'])}, {_diff_text(col, c['gain'])} ({noise(c)}): {verdict}."]
    for k, o in others.items():
        if k != best and o["other"][2]:
            lines.append(f"{k} vs {baseline}: {_diff_text(col, o['gain'])} ({noise(o)}): {ROW_VERDICT[o['verdict']]}.")
    if reference in groups and reference != baseline:
        for k, v in groups.items():
            if k not in (baseline, reference):
                o = compare(groups[reference], v, col.key, mode)
                if o["other"][2]:
                    lines.append(f"{k} vs {reference}: {_diff_text(col, o['gain'])} ({noise(o)}): "
                                 f"{ROW_VERDICT[o['verdict']]}.")
    elif reference:
        lines.append(f"(the reference row {reference!r} is not among the runs)")
    return "\n".join(lines)


def published_note(rows: list[dict[str, Any]]) -> str:
    """Which runs became local-zoo entries (``metrics.json`` ``published``) and by what rule; "" when none did."""
    pub = [m for m in rows if m.get("published")]
    if not pub:
        return ""
    items = ", ".join(f"{m['published']} ({row_label(m)}, seed {m.get('seed')})" for m in pub)
    names = [m["published"] for m in pub]
    seeds = {m.get("seed") for m in pub}
    if len(set(names)) < len(names):
        rule = "several runs published under one name: the last to finish owns it (set publish_seed to choose one)"
    elif len(pub) < len(rows) and len(seeds) == 1:
        rule = (f"one run per row, its seed-{next(iter(seeds))} run (publish_seed: fixed before any result, "
                f"not chosen on a score)")
    else:
        rule = "every run that set publish"
    return f"Published to the local model zoo (python -m zoo list): {items}; {rule}."


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
        report = config.get("report") or {}
        text = caption(rows, report["baseline"], report.get("metric"), report.get("reference")) \
            if report.get("baseline") else ""
        keys = list(report.get("columns") or [])
        wall = time.monotonic() - getattr(self, "_t0", time.monotonic())
        print_table(rows, title=f"results in {sweep_dir} ({len(rows)} runs, {fmt_seconds(wall)} wall time)",
                    caption_text=text, columns=keys)
        note = published_note(rows)
        if note:
            print(note)
        from zoo.io import atomic_write_text

        atomic_write_text(sweep_dir / "summary.md", markdown(rows, text, keys) + (f"\n{note}\n" if note else ""))


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tasks.report",
                                description="Table of finished runs (every metrics.json under the folders).")
    p.add_argument("runs", nargs="+", metavar="RUNS_DIR", help="run or multirun folders (e.g. logs/multiruns/<time>)")
    p.add_argument("--baseline", help="the baseline row's label (an adapter name, or a report.label such as "
                                      "'from scratch'): a caption compares the best row with it")
    p.add_argument("--metric", help="the caption's metric (default: the test counterpart of the selection metric)")
    p.add_argument("--columns", nargs="+", metavar="KEY", help="only these metrics (e.g. test/nrmse test/vrmse)")
    p.add_argument("--reference", help="a second row (e.g. full) the caption compares every other row with")
    args = p.parse_args(argv)
    missing = [d for d in args.runs if not Path(d).exists()]
    if missing:
        print(f"error: no such folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = [r for d in args.runs for r in collect(d)]
    if not rows:
        print(f"error: no metrics.json (finished run) under {', '.join(args.runs)}", file=sys.stderr)
        return 1
    text = caption(rows, args.baseline, args.metric, args.reference) if args.baseline else ""
    print_table(rows, caption_text=text, columns=args.columns)
    print(markdown(rows, text, args.columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
