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


def summarize_folds(sweep_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{method: {"folds": {k: score}, "mean": ..., "metric": key}}`` from the runs' metrics.json: the test
    value of each run's monitored metric (``test/acc``, ``test/mAP``), else the validation one."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(Path(sweep_dir).glob("**/metrics.json")):
        m = read_metrics(f)
        fold = m.get("fold")
        hydra_cfg = f.parent / ".hydra" / "config.yaml"
        if fold is None and hydra_cfg.is_file():  # each multirun job records its composed config
            from omegaconf import OmegaConf

            fold = OmegaConf.select(OmegaConf.load(hydra_cfg), "task.fold")
        val_key = (m.get("monitor") or {}).get("name") or "val/acc"  # val/acc, or val/mAP (audio_multilabel)
        test_key = "test/" + val_key.split("/", 1)[1]
        key = test_key if m.get(test_key) is not None else val_key
        if fold is None or m.get(key) is None:
            continue
        method = m.get("adapter") or "run"
        row = out.setdefault(str(method), {"folds": {}, "metric": key})
        row["folds"][str(fold)] = float(m[key])
    for row in out.values():
        vals = list(row["folds"].values())
        row["mean"] = sum(vals) / len(vals)
    return out


def folds_markdown(table: dict[str, dict[str, Any]]) -> str:
    folds = sorted({k for r in table.values() for k in r["folds"]}, key=int)
    lines = ["| method | " + " | ".join(f"fold {k}" for k in folds) + " | mean |",
             "|---|" + "---:|" * (len(folds) + 1)]
    for name, r in table.items():
        cells = [f"{100 * r['folds'][k]:.1f}" if k in r["folds"] else "–" for k in folds]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * r['mean']:.1f} |")
    return "\n".join(lines)
