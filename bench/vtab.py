"""The VTAB-1k table from finished runs: ``python -m bench.vtab RUNS_DIR [RUNS_DIR ...] --out DIR``.

Searches each ``RUNS_DIR`` recursively for ``metrics.json`` (a run dir, or a Hydra multirun dir
of numbered run dirs) written by ``train.py`` with ``task=vtab``::

    {"adapter": str, "backbone": str, "task": "vtab", "dataset": str, "protocol": "tune"|"final",
     "trainable_params": int, "backbone_params": int, "artifact_bytes": int,
     "val/acc": float|null, "test/acc": float|null, "seed": int}

One row per (adapter, backbone, protocol): accuracy per task (``test/acc`` for protocol
``final``, train800val200 -> test; ``val/acc`` for ``tune``, train800 -> val200), the
Natural / Specialized / Structured group means, and both averaging conventions in use:

* **group mean** = (Natural + Specialized + Structured) / 3, as the VPT, NOAH, FacT, Hydra and
  Convpass papers report;
* **19-task mean** = the plain mean over the 19 tasks, as V-PETL Bench reports.

Several seeds of one task are averaged. A mean over a group with a missing task is left
empty (a partial mean is not comparable with the published ones); the table lists the
missing tasks. ``--reference`` adds the published numbers (anchors.md, section c) as rows.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

# The canonical 19 VTAB-1k tasks (folder names of get_vtab1k.py) by group, in the papers' column
# order, from the task table of the data module (tasks/data/vtab.py).
from tasks.base import read_metrics  # noqa: E402
from tasks.protocol import protocol_name  # noqa: E402
from tasks.data.vtab import VTAB_TASKS as _TASK_TABLE  # noqa: E402

VTAB_TASKS: dict[str, tuple[str, ...]] = {
    g.capitalize(): tuple(t for t, (grp, _n, _aliases) in _TASK_TABLE.items() if grp == g)
    for g in ("natural", "specialized", "structured")
}
TASK_GROUP = {t: g for g, ts in VTAB_TASKS.items() for t in ts}
ALL_TASKS = tuple(TASK_GROUP)
SHORT = {  # column headers as in the papers
    "cifar": "CIFAR-100", "caltech101": "Caltech101", "dtd": "DTD", "oxford_flowers102": "Flowers102",
    "oxford_iiit_pet": "Pets", "svhn": "SVHN", "sun397": "Sun397", "patch_camelyon": "Camelyon",
    "eurosat": "EuroSAT", "resisc45": "Resisc45", "diabetic_retinopathy": "Retinopathy",
    "clevr_count": "Clevr-Count", "clevr_dist": "Clevr-Dist", "dmlab": "DMLab", "kitti": "KITTI-Dist",
    "dsprites_loc": "dSpr-Loc", "dsprites_ori": "dSpr-Ori", "smallnorb_azi": "sNORB-Azim",
    "smallnorb_ele": "sNORB-Elev",
}

# Published VTAB-1k results, ViT-B/16 supervised ImageNet-21k (anchors.md, section c). Each row names the zoo
# configuration that reproduces it: the adapter's name and the values of its resolved config that tell the method
# apart from others of the same name (Houlsby and AdaptFormer are both ``adapter``, told apart by ``style``; VPT
# shallow and deep by ``mode``; Bi-AdaptFormer and Bi-LoRA by ``base``), and the input normalisation of the paper's
# code (``data.normalize``: the checkpoint's mean = std = 0.5 as vtab_sweep; Hydra's code ImageNet mean / std; the
# binary adapters feed [0, 1] pixels).
class Published(NamedTuple):
    method: str
    adapter: str | None          # the zoo adapter's name (None: not in the zoo)
    config: dict[str, Any]       # resolved adapter-config values the run must have
    group_mean: float | None     # as the papers report
    task_mean: float | None      # V-PETL Bench's 19-task mean
    params_m: float | None       # V-PETL params in M
    source: str
    normalize: str = "backbone"  # the data.normalize of the paper's pipeline


REFERENCE: list[Published] = [
    Published("Full fine-tuning", "full", {}, 68.9, 65.57, 85.8, "NOAH table 1; Hydra README"),
    Published("Linear probing", "linear", {}, 57.6, 52.94, 0.0, "NOAH table 1; Hydra README"),
    Published("BitFit", "bitfit", {}, None, 62.05, 0.10, "V-PETL Bench only"),
    Published("VPT-Shallow", "vpt", {"mode": "shallow"}, None, 64.85, 0.08, "V-PETL Bench only"),
    Published("VPT-Deep", "vpt", {"mode": "deep"}, 72.0, 69.43, 0.56, "NOAH table 1; Hydra README"),
    Published("Adapter (Houlsby, bottleneck 8)", "adapter", {"style": "houlsby", "bottleneck": 8}, 73.9, 71.44, 0.16,
              "NOAH table 1; Hydra README"),
    Published("LoRA", "lora", {}, 74.5, 72.25, 0.29, "NOAH table 1; Hydra README"),
    Published("AdaptFormer", "adapter", {"style": "adaptformer"}, 74.7, 72.32, 0.16, "Hydra README"),
    Published("NOAH", None, {}, 75.5, 73.25, 0.43, "NOAH table 1"),
    Published("FacT-TK", None, {}, 75.6, 73.23, 0.07, "Hydra README"),
    Published("SSF", "ssf", {}, 75.7, 73.10, 0.21, "Hydra README"),
    Published("RepAdapter", None, {}, 76.1, 73.84, 0.22, "Hydra README"),
    Published("Hydra", "hydra", {}, 76.5, 74.21, 0.28, "extremebird/Hydra vtab1k/README.md",
              normalize="imagenet"),  # its vtab1k/dataset.py get_data: ImageNet mean / std
    Published("Bi-AdaptFormer-32 (1-bit)", "onebit", {"base": "adaptformer", "bits": 1, "dim": 32}, 77.0, None, None,
              "JieShibo/PETL-ViT binary_adapter/README.md", normalize="none"),
    Published("Bi-LoRA-32 (1-bit)", "onebit", {"base": "lora", "bits": 1, "dim": 32}, 76.7, None, None,
              "JieShibo/PETL-ViT binary_adapter/README.md", normalize="none"),
]


# The papers' backbone (VPT, NOAH, FacT, Hydra, V-PETL Bench): Google's original ViT-B/16 ImageNet-21k weights,
# timm's ``orig_in21k`` tag (``augreg_in21k`` is another checkpoint: its numbers do not sit beside theirs).
PAPER_BACKBONE = "vit_base_patch16_224.orig_in21k"


def find_metrics(dirs: list[str | Path]) -> list[Path]:
    out: list[Path] = []
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise FileNotFoundError(f"runs dir {d} does not exist")
        out += [d] if d.name == "metrics.json" else sorted(d.rglob("metrics.json"))
    return out


def load_runs(paths: list[Path]) -> tuple[list[dict], list[str]]:
    """Parsed VTAB runs (accuracy picked by protocol) and warnings about skipped files."""
    runs, warnings = [], []
    for p in paths:
        try:
            m = read_metrics(p)
        except (OSError, ValueError) as e:
            warnings.append(f"{p}: unreadable ({e})")
            continue
        if m.get("task") != "vtab" or m.get("kind") != "classification":
            continue
        ds = m.get("dataset")
        if ds not in TASK_GROUP:
            warnings.append(f"{p}: unknown VTAB task {ds!r}; valid: {', '.join(ALL_TASKS)}")
            continue
        protocol = protocol_name(m)
        if protocol not in ("final", "tune"):
            warnings.append(f"{p}: protocol {protocol!r} is neither 'final' nor 'tune'")
            continue
        key = "test/acc" if protocol == "final" else m["monitor"]["name"]
        acc = m.get(key)
        if acc is None or (isinstance(acc, float) and math.isnan(acc)):
            warnings.append(f"{p}: no {key} (protocol {protocol}); run unfinished?")
            continue
        if not 0.0 <= float(acc) <= 1.0:
            warnings.append(f"{p}: {key}={acc} is not in [0, 1]")
            continue
        runs.append({**m, "protocol_record": m.get("protocol"), "protocol": protocol, "acc": float(acc), "path": str(p)})
    return runs, warnings


def configuration(r: dict) -> dict:
    """What must be equal for two runs to be one method's row: everything of the resolved configuration that
    does not depend on the task (the adapter's config, the backbone's config with its weights, the input
    normalisation, the checkpoint selection, the protocol). Runs that differ in nothing else are seeds."""
    rec = r.get("protocol_record") if isinstance(r.get("protocol_record"), dict) else {}
    return {"adapter_config": {k: v for k, v in (r.get("adapter_config") or {}).items() if k != "init_from"},
            "backbone": r.get("backbone"), "backbone_config": r.get("backbone_config"),
            "normalisation": rec.get("normalisation"), "selection": rec.get("selection"), "protocol": r["protocol"],
            "differs_from_paper": rec.get("differs_from_paper")}


def _key(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True, default=str)


def _variant_tags(groups: dict[tuple, list[dict]]) -> dict[tuple, str]:
    """For one adapter with several configurations, the keys that tell them apart (``rank=4``, ``normalisation=...``)."""
    by_adapter: dict[str, list[tuple]] = defaultdict(list)
    for key in groups:
        by_adapter[key[0]].append(key)
    tags = {}
    for keys in by_adapter.values():
        flat = {k: _flatten(json.loads(k[3])) for k in keys}
        differ = sorted({f for v in flat.values() for f in v if len({_key(flat[k].get(f)) for k in keys}) > 1})
        for k in keys:
            tags[k] = ", ".join(f"{f}={flat[k].get(f)}" for f in differ if f not in ("backbone", "protocol"))
    return tags


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name.removeprefix("adapter_config.")] = v
    return out


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (adapter, backbone, protocol, resolved configuration), accuracies in percent.

    Only seeds are averaged: runs of one adapter that differ in their adapter config (rank 4 and rank 8),
    backbone weights, normalisation or selection are separate rows (``config`` names what differs).
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["adapter"], r["backbone"], r["protocol"], _key(configuration(r)))].append(r)
    tags = _variant_tags(groups)
    rows = []
    for key, rs in sorted(groups.items()):
        adapter, backbone, protocol, cfg = key
        per_task: dict[str, list[float]] = defaultdict(list)
        splits: dict[str, set[str]] = defaultdict(set)
        for r in rs:
            per_task[r["dataset"]].append(100.0 * r["acc"])
            splits[r["dataset"]].add(_key(((r.get("protocol_record") or {}) if isinstance(r.get("protocol_record"), dict)
                                           else {}).get("splits")))
        unlike = [t for t, s in splits.items() if len(s) > 1]
        if unlike:
            raise ValueError(f"{adapter} / {backbone} / {protocol}: runs of {', '.join(unlike)} were made on different "
                             f"splits (their metrics.json protocol records differ); only seeds may be averaged")
        task_acc = {t: statistics.fmean(v) for t, v in per_task.items()}
        group_means = {}
        for g, ts in VTAB_TASKS.items():
            group_means[g] = statistics.fmean(task_acc[t] for t in ts) if all(t in task_acc for t in ts) else None
        complete = all(v is not None for v in group_means.values())
        rows.append({
            "adapter": adapter, "backbone": backbone, "protocol": protocol, "config": json.loads(cfg),
            "variant": tags.get(key, ""),
            "metric": "test/acc" if protocol == "final" else "val/acc",
            "tasks": task_acc,
            "seeds": {t: len(v) for t, v in per_task.items()},
            "groups": group_means,
            "group_mean": statistics.fmean(group_means.values()) if complete else None,
            "task_mean": statistics.fmean(task_acc[t] for t in ALL_TASKS) if complete else None,
            "missing": [t for t in ALL_TASKS if t not in task_acc],
            "trainable_params": _one(rs, "trainable_params"),
            "backbone_params": _one(rs, "backbone_params"),
            "artifact_bytes": _one(rs, "artifact_bytes"),
        })
    return rows


def _one(rs: list[dict], key: str):
    """The run's value when all runs agree (the head differs per task: report the median)."""
    vals = [r.get(key) for r in rs if r.get(key) is not None]
    if not vals:
        return None
    return vals[0] if len(set(vals)) == 1 else int(statistics.median(vals))


def _f(v, nd=1) -> str:
    return "" if v is None else f"{v:.{nd}f}"


def _params(n) -> str:
    """Parameter counts readable at every size (a 1-bit adapter's 2,304 is not "0.00M")."""
    if n is None:
        return ""
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}K" if n >= 1e3 else f"{int(n)}"


def _size(n) -> str:
    if n is None:
        return ""
    return f"{n / 2 ** 20:.2f} MiB" if n >= 2 ** 20 else f"{n / 2 ** 10:.1f} KiB"


def results_table(rows: list[dict]) -> str:
    head = (["method", "backbone", "acc"] + [SHORT[t] for t in ALL_TASKS]
            + ["Natural", "Specialized", "Structured", "group mean", "19-task mean", "trainable", "artifact"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in rows:
        cells = [r["adapter"] + (f" ({r['variant']})" if r.get("variant") else ""), r["backbone"], r["metric"]]
        cells += [_f(r["tasks"].get(t)) for t in ALL_TASKS]
        cells += [_f(r["groups"][g]) for g in VTAB_TASKS]
        cells += [_f(r["group_mean"], 2), _f(r["task_mean"], 2), _params(r["trainable_params"]),
                  _size(r["artifact_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def places_beside(pub: Published, row: dict) -> bool:
    """The row is made as the paper's number was: its adapter and the values of its resolved config that name
    the method (``pub.config``), the papers' backbone (:data:`PAPER_BACKBONE`), protocol ``final``
    (train800val200 -> test), the paper's input normalisation, and a protocol record that does not mark the
    recipe as departing from the paper (``differs_from_paper``)."""
    cfg = row.get("config") or {}
    adapter_cfg = cfg.get("adapter_config") or {}
    norm = cfg.get("normalisation")
    return (pub.adapter is not None and row["adapter"] == pub.adapter and row["protocol"] == "final"
            and row["backbone"] == PAPER_BACKBONE and not cfg.get("differs_from_paper")
            and all(adapter_cfg.get(k) == v for k, v in pub.config.items())
            and (norm is None or norm.get("name") == pub.normalize))  # files from before the record: unknown


def reference_table(rows: list[dict] | None = None) -> str:
    """Published numbers next to ours (the 'ours' columns stay empty until runs exist).

    An "ours" cell is filled only by a row that :func:`places_beside` the published one, and only when one
    row does (several configurations would make the cell ambiguous: :func:`results_table` lists them).
    """
    lines = [
        "| method | zoo adapter | published group mean | ours: group mean | V-PETL 19-task mean | ours: 19-task mean "
        "| V-PETL params | ours: trainable |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for pub in REFERENCE:
        cands = [r for r in rows or [] if places_beside(pub, r)]
        o = cands[0] if len(cands) == 1 else None
        zoo_name = "–" if pub.adapter is None else f"`{pub.adapter}`" + "".join(
            f" {k}={v}" for k, v in pub.config.items())
        lines.append("| " + " | ".join([
            pub.method, zoo_name, _f(pub.group_mean), _f(o and o["group_mean"], 2), _f(pub.task_mean, 2),
            _f(o and o["task_mean"], 2), "" if pub.params_m is None else f"{pub.params_m:.2f}M",
            _params(o and o["trainable_params"]),
        ]) + " |")
    return "\n".join(lines)


NOTES = """Notes:
- Accuracy in %, ViT-B/16 supervised ImageNet-21k in the published rows. Protocol `final` trains on
  train800val200 and reports `test/acc`; protocol `tune` trains on train800 and reports `val/acc` (val200).
- **group mean** = (Natural + Specialized + Structured) / 3, the convention of the VPT, NOAH, FacT, Hydra and
  Convpass papers; **19-task mean** = plain mean of the 19 tasks, the convention of V-PETL Bench. They differ by
  2-3 points: always compare like with like. A mean is left empty when a task of its group is missing.
- An "ours" cell holds only runs on the papers' backbone (`vit_base_patch16_224.orig_in21k`) with protocol
  `final`, the row's normalisation and one configuration of the adapter the row names (`zoo adapter`: its name and
  the resolved config values that tell the method apart), from a recipe that does not say it differs from the
  paper (`task.differs_from_paper`); e.g. `python train.py -m experiment=vtab_sweep adapter=<name>
  data.root=<vtab-1k>`. Other runs appear in the results table, one row per configuration (only seeds averaged).
- Published numbers: the team spec reference/anchors.md (internal, not shipped) section (c) (NOAH table 1, Hydra and PETL-ViT READMEs,
  V-PETL Bench README). Trainable = backbone-side trainable parameters of our runs (head excluded)."""


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.vtab", description="Aggregate VTAB-1k runs into the standard table.")
    p.add_argument("runs", nargs="*", help="run or multirun dirs (searched recursively for metrics.json)")
    p.add_argument("--out", default=None, help="folder for vtab.md and vtab.json")
    p.add_argument("--reference", action="store_true", help="also show the published numbers next to ours")
    args = p.parse_args(argv)
    if not args.runs and not args.reference:
        p.error("give at least one RUNS_DIR (or --reference for the published table alone)")

    runs, warnings = load_runs(find_metrics(args.runs)) if args.runs else ([], [])
    rows = aggregate(runs)
    parts = ["# VTAB-1k"]
    if args.runs:
        parts += ["", results_table(rows) if rows else "(no finished VTAB runs found)"]
        missing = [f"- {r['adapter']} / {r['backbone']} / {r['protocol']}: {', '.join(r['missing'])}" for r in rows if r["missing"]]
        if missing:
            parts += ["", "Missing tasks:", *missing]
    if args.reference:
        parts += ["", "## Published reference (ViT-B/16 IN-21k) and ours", "", reference_table(rows)]
    parts += ["", NOTES]
    if warnings:
        parts += ["", "Skipped files:", *[f"- {w}" for w in warnings]]
    md = "\n".join(parts) + "\n"
    if args.out:  # the wide (29-column) table goes to the file; the terminal gets a summary
        from zoo.io import atomic_write_text

        out = Path(args.out)
        atomic_write_text(out / "vtab.md", md)
        atomic_write_text(out / "vtab.json", json.dumps({"rows": rows, "warnings": warnings}, indent=1) + "\n")
        print(summary(rows, warnings))
        print(f"full table: {out / 'vtab.md'} (and vtab.json)")
    else:
        print(md)
    return rows


def summary(rows: list[dict], warnings: list[str]) -> str:
    """A narrow table for the terminal: one line per method/backbone/protocol."""
    lines = [f"{'method':<14} {'backbone':<28} {'protocol':<6} {'tasks':>5} {'19-task mean':>12} {'trainable':>9}"]
    for r in rows:
        lines.append(f"{r['adapter']:<14} {str(r['backbone'])[:28]:<28} {r['protocol']:<6} {len(r['tasks']):>5} "
                     f"{_f(r['task_mean'], 2):>12} {_params(r['trainable_params']):>9}")
    if not rows:
        lines.append("(no finished VTAB runs found)")
    if warnings:
        lines.append(f"{len(warnings)} file(s) skipped (listed in the full table)")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
