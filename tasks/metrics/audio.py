"""Audio metrics: macro mAP for multi-label tagging (AST's AudioSet recipe) and the per-fold table of a
cross-validated sweep (ESC-50's five folds)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torchmetrics.classification import MultilabelAveragePrecision

from tasks.base import read_metrics


def multilabel_map(num_classes: int) -> MultilabelAveragePrecision:
    """Macro mean average precision over classes (sklearn's ``average_precision_score(average="macro")``,
    exact: no thresholds)."""
    return MultilabelAveragePrecision(num_classes, average="macro", thresholds=None)


ESC50_FOLDS = 5


def _fold_of(m: dict[str, Any], run_dir: Path):
    fold = m.get("fold")
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if fold is None and hydra_cfg.is_file():  # each multirun job records its composed config
        from omegaconf import OmegaConf

        fold = OmegaConf.select(OmegaConf.load(hydra_cfg), "task.fold")
    return fold


def epoch_curve(run_dir: Path, key: str) -> dict[int, float]:
    """``{epoch: value}`` of a validation metric from a run's CSV log (``csv/metrics.csv``)."""
    import csv

    f = run_dir / "csv" / "metrics.csv"
    if not f.is_file():
        return {}
    with f.open() as fh:
        return {int(float(r["epoch"])): float(r[key]) for r in csv.DictReader(fh)
                if r.get(key) not in (None, "") and r.get("epoch") not in (None, "")}


def _validates_on_test(m: dict[str, Any]) -> bool:
    p = m.get("protocol")
    return isinstance(p, dict) and bool(p.get("val_overlaps_test"))


def summarize_folds(sweep_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{method: {"folds": {k: score}, "mean": ..., "metric": key, "selection": ...}}`` from the runs' metrics.json.

    Runs with a held-out validation fold report the test value of their monitored metric (``test/acc``,
    ``test/mAP``) at the checkpoint they selected. Runs whose validation *is* the test fold (AST's recipe,
    ``task.val_fold=none task.selection=last``) are summarised as AST's ``get_esc_result.py`` does: the
    per-epoch accuracies are averaged over the folds, **one** epoch is chosen on that average, and each fold
    reports its accuracy at that epoch (picking the best epoch per fold is over-optimistic, as AST notes).
    ESC-50 is reported over its five folds: fewer is refused.
    """
    out: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[str, dict[int, float]]] = {}
    for f in sorted(Path(sweep_dir).glob("**/metrics.json")):
        m = read_metrics(f)
        fold = _fold_of(m, f.parent)
        monitor = m.get("monitor") or {}
        val_key = monitor.get("name") or "val/acc"  # val/acc, or val/mAP (audio_multilabel)
        test_key = "test/" + val_key.split("/", 1)[1]
        if fold is None:
            continue
        method = str(m.get("adapter") or "run")
        on_test = _validates_on_test(m)
        row = out.setdefault(method, {"folds": {}, "metric": test_key, "selection": None, "dataset": m.get("dataset"),
                                      "mode": monitor.get("mode") or "max", "on_test": on_test})
        if row["on_test"] != on_test:
            raise ValueError(f"{f}: {method}'s folds mix runs that validate on the test fold with runs that do not; "
                             f"summarise them separately")
        if on_test:
            curve = epoch_curve(f.parent, val_key)
            if not curve:
                raise ValueError(f"{f}: a run that validates on its test fold needs its per-epoch curve "
                                 f"({f.parent / 'csv' / 'metrics.csv'}, {val_key}) to choose the epoch over all folds")
            curves.setdefault(method, {})[str(fold)] = curve
            row["metric"] = val_key
        else:
            key = test_key if m.get(test_key) is not None else val_key
            if m.get(key) is None:
                continue
            row["metric"] = key
            row["folds"][str(fold)] = float(m[key])
            row["selection"] = m.get("selection") or "val"
    for method, per_fold in curves.items():
        row = out[method]
        epochs = sorted(set.intersection(*(set(c) for c in per_fold.values())))
        if not epochs:
            raise ValueError(f"{method}: the folds' validation curves share no epoch")
        avg = {e: sum(c[e] for c in per_fold.values()) / len(per_fold) for e in epochs}
        best = epochs[0]  # the first best epoch, as np.argmax
        for e in epochs[1:]:
            if (avg[e] > avg[best]) if row["mode"] == "max" else (avg[e] < avg[best]):
                best = e
        row["folds"] = {k: c[best] for k, c in per_fold.items()}
        row["selection"], row["epoch"] = "epoch chosen on the fold average (AST)", best
    for method, row in list(out.items()):
        if not row["folds"]:
            del out[method]
            continue
        if row["dataset"] == "esc50" and len(row["folds"]) < ESC50_FOLDS:
            raise ValueError(f"ESC-50 is reported over its {ESC50_FOLDS} folds; {method} has only fold(s) "
                             f"{sorted(row['folds'], key=int)} (run task.fold=1,2,3,4,5)")
        vals = list(row["folds"].values())
        row["mean"] = sum(vals) / len(vals)
        del row["on_test"], row["mode"]
    return out


def folds_markdown(table: dict[str, dict[str, Any]]) -> str:
    folds = sorted({k for r in table.values() for k in r["folds"]}, key=int)
    lines = ["| method | " + " | ".join(f"fold {k}" for k in folds) + " | mean |",
             "|---|" + "---:|" * (len(folds) + 1)]
    for name, r in table.items():
        cells = [f"{100 * r['folds'][k]:.1f}" if k in r["folds"] else "–" for k in folds]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * r['mean']:.1f} |")
    return "\n".join(lines)
