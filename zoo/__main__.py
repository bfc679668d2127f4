"""``python -m zoo``: the model-zoo command line (list, info, download, verify, publish, export)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from zoo import hub


def _table(rows: list[hub.Entry]):
    from rich.table import Table

    t = Table(title="Adapter Zoo", caption="stored params: the artifact's tensors (adapter and task head)")
    t.add_column("name", no_wrap=True)
    for col in ("kind", "backbone", "weights", "method", "task", "metrics", "stored params", "licence", "cached"):
        t.add_column(col, overflow="fold")
    for e in rows:
        metrics = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(e.metrics.items())[:3])
        params = e.raw.get("stored_parameters")
        t.add_row(e.name, e.kind, f"{e.backbone.get('family')}/{e.backbone.get('model')}", str(e.backbone.get("weights_tag")),
                  ",".join(e.method_names) or "-", e.task_name or "-", metrics or "-",
                  f"{params:,}" if isinstance(params, int) else "-", e.licence or "-", "yes" if hub.is_cached(e) else "")
    return t


def empty_zoo_note() -> str:
    """What ``list`` says when no registry holds an entry (a fresh clone)."""
    return (f"the model zoo is empty: the project's registry ships no entries yet, and nothing was published on this "
            f"machine (registries read: {', '.join(hub.registry_locations())}).\n"
            f"  make demo      adds vit-demo (the demo backbone) and vit-demo-<linear|lora|full>-clevr_dist to "
            f"{hub.registry.LOCAL_REGISTRY}\n"
            f"  python -m zoo publish RUN_DIR --name NAME --out DIR [--url-base URL | --hf-repo ORG/REPO]   publishes "
            f"a finished run (a lab serves the folder and its registry.json)\n"
            f"  --registry PATH_OR_URL or ${hub.ENV_REGISTRY}   reads another registry (a lab's)")


def _predict(args):
    """``predict``: one artifact (``ARTIFACT PATH...``) or several (``--adapters``, :func:`zoo.predict.predict_many`)."""
    from zoo.predict import (
        PredictError,
        parse_adapters,
        parse_tasks,
        predict,
        predict_many,
        split_adapter_args,
    )

    if args.adapters:
        specs, spill = split_adapter_args(args.adapters)  # paths written after --adapters land in it
        task_specs, task_spill = split_adapter_args(args.tasks or [])
        spill += task_spill
        odd = [x for x in spill if "=" in x and not os.path.exists(x)]
        if odd:  # a malformed NAME=ARTIFACT, not a path: say so rather than 'does not exist'
            parse_adapters(odd)
        adapters = parse_adapters(specs)
        return predict_many(adapters, args.out, paths=[*args.inputs, *spill], manifest=args.manifest,
                            route=args.route, weights=args.weights, batch_size=args.batch_size,
                            tasks=parse_tasks(task_specs, list(adapters)) or None)
    if args.manifest or args.route or args.tasks:
        raise PredictError("--manifest, --route and --tasks serve several adapters: give them with --adapters "
                           "NAME=ARTIFACT ...")
    if len(args.inputs) < 2:
        raise PredictError("predict ARTIFACT PATH...: give an artifact and at least one file or folder "
                           "(or --adapters NAME=ARTIFACT ... for several)")
    return predict(args.inputs[0], args.inputs[1:], args.out, weights=args.weights, batch_size=args.batch_size)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `python -m zoo list --json | head -1`: the reader is gone, not an error of ours
        try:  # Python's recipe: point stdout at devnull so the flush at exit does not fail again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 1
    except OSError as e:  # disk full, read-only ADAPTERZOO_HOME or output folder, a file size limit
        from zoo.io import describe_os_error

        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zoo", description="Adapter Zoo model zoo")
    p.add_argument("--registry", action="append", default=[], metavar="PATH_OR_URL",
                   help=f"read this registry too (repeatable; also ${hub.ENV_REGISTRY})")
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="list zoo entries")
    ls.add_argument("--backbone", help="family or model name (substring)")
    ls.add_argument("--adapter", help="adapter method name")
    ls.add_argument("--task", help="task name (substring)")
    ls.add_argument("--kind", choices=hub.KINDS)
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info = sub.add_parser("info", help="show one entry")
    info.add_argument("name")
    dl = sub.add_parser("download", help="download one entry into the cache and print its folder")
    dl.add_argument("name")
    dl.add_argument("--force", action="store_true", help="download again even if cached")
    vf = sub.add_parser("verify", help="re-hash cached files (deleting corrupt ones) and check the registries")
    vf.add_argument("names", nargs="*")
    pr = sub.add_parser("predict", help="predict files with a trained adapter: a CSV (file,label,score) for images and "
                                         "audio clips, mask PNGs for segmentation; with --adapters, several "
                                         "adapters on one base in shared batches (docs/serving.md)",
                        usage="python -m zoo predict ARTIFACT PATH... [options]\n"
                              "       python -m zoo predict --adapters NAME=ARTIFACT... --manifest FILE.csv [options]\n"
                              "       python -m zoo predict --adapters NAME=ARTIFACT... --route all PATH... [options]")
    pr.add_argument("inputs", nargs="*", metavar="ARTIFACT PATH",
                    help="an artifact folder (<run>/adapter) or zoo entry name, then files or folders (searched "
                         "recursively); with --adapters only the files or folders")
    pr.add_argument("--adapters", nargs="+", action="extend", metavar="NAME=ARTIFACT",
                    help="several artifacts trained on the same base weights, served together (output: "
                         "file,adapter,label,score)")
    pr.add_argument("--manifest", metavar="FILE.csv",
                    help="with --adapters: a CSV with columns file,adapter routing each file to its adapter "
                         "(relative files: relative to the CSV's folder)")
    pr.add_argument("--tasks", nargs="+", action="extend", metavar="NAME=TASK_ID",
                    help="with --adapters: the task of a multi-task MHR artifact (serve it under several names for "
                         "several of its tasks)")
    pr.add_argument("--route", choices=("all",), help="with --adapters and PATH...: every file through every adapter")
    pr.add_argument("--out", default="predictions", help="output folder (default: ./predictions): predictions.csv, masks/")
    pr.add_argument("--weights", help="base weights file, for an artifact trained on local base weights that are "
                                      "not where the run read them")
    pr.add_argument("--batch-size", type=int, default=16)
    pb = sub.add_parser("publish", help="package a finished run as a zoo artifact and print its registry entry")
    pb.add_argument("run_dir")
    pb.add_argument("--name", required=True)
    pb.add_argument("--out", required=True, help="artifact folder to write")
    pb.add_argument("--registry-file", default=None,
                    help=f"add the entry to this local registry JSON (default: the local zoo, {hub.registry.LOCAL_REGISTRY})")
    pb.add_argument("--no-register", action="store_true", help="only write the artifact folder and print the entry")
    pb.add_argument("--url-base", help="URL the folder will be served from (becomes the source)")
    pb.add_argument("--hf-repo", help="Hugging Face repo the folder will be uploaded to")
    pb.add_argument("--hf-subfolder")
    pb.add_argument("--licence")
    pb.add_argument("--task")
    pb.add_argument("--description", default="")
    ex = sub.add_parser("export", help="write an adapter for peft, as a merged timm/open_clip/transformers "
                                       "checkpoint, or as ONNX (docs/export.md)")
    ex.add_argument("name", metavar="NAME_OR_RUN", help="zoo entry, artifact folder or finished run folder")
    ex.add_argument("--format", choices=("peft", "merged", "onnx"), default=None,
                    help="peft: adapter_config.json + adapter_model.safetensors; merged: the library's own checkpoint; "
                         "onnx: DIR/model.onnx (default: peft, or merged with --merged)")
    ex.add_argument("--out", required=True, metavar="DIR")
    ex.add_argument("--merged", action="store_true",
                    help="merge into the base weights (peft: for a method peft cannot express; onnx: insist on merging)")
    ex.add_argument("--keep-modules", action="store_true",
                    help="merged: write the adapted model's state dict instead (methods that cannot merge); "
                         "onnx: export the adapters' own ops unmerged")
    ex.add_argument("--weights", default=None, help="the base weights file, if the zoo cannot find it itself")
    args = p.parse_args(argv)
    for loc in args.registry:
        hub.add_registry(loc)

    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=200)  # piped: don't fold the table
    err = Console(stderr=True, soft_wrap=True)  # notes and warnings (one line each, not folded): stdout stays the table / valid JSON
    try:
        if args.cmd == "list":
            rows = hub.list_entries(args.backbone, args.adapter, args.task, args.kind)
            if args.json:
                print(json.dumps({e.name: e.raw for e in rows}, indent=2))
            elif rows:
                console.print(_table(rows))
            elif hub.entries():
                console.print("no zoo entries match")
            else:
                console.print(empty_zoo_note(), highlight=False)
            for loc, why in {**hub.registry_errors, **hub.entry_errors}.items():
                err.print(f"[yellow]skipped {loc}: {why}[/yellow]", highlight=False)
        elif args.cmd == "info":
            e = hub.get_entry(args.name)
            print(json.dumps({"name": e.name, "registry": e.origin, "cached": hub.is_cached(e),
                              "cache_dir": str(hub.entry_dir(e)), **e.raw}, indent=2))
        elif args.cmd == "download":
            print(hub.download(args.name, force=args.force))
        elif args.cmd == "verify":
            rows = hub.verify(args.names or None)
            bad = [r for r in rows if not r[2]]
            for name, fname, ok, msg in rows:
                console.print(f"{'[green]ok[/green]  ' if ok else '[red]BAD[/red] '} {name}/{fname}: {msg}")
            for loc, why in {**hub.registry_errors, **hub.entry_errors}.items():
                console.print(f"[red]BAD[/red]  registry {loc}: {why}")
            if not rows:
                console.print("nothing cached to verify")
            return 1 if bad or hub.registry_errors or hub.entry_errors else 0
        elif args.cmd == "predict":
            dest = _predict(args)
            err.print(f"wrote {dest}", highlight=False)
        elif args.cmd == "publish":
            reg = None if args.no_register else (args.registry_file or hub.registry.LOCAL_REGISTRY)
            entry = hub.publish_run(args.run_dir, args.name, registry=reg, out_dir=args.out,
                                    url_base=args.url_base, hf_repo=args.hf_repo, hf_subfolder=args.hf_subfolder,
                                    licence=args.licence, task=args.task, description=args.description)
            print(json.dumps({args.name: entry}, indent=2))
            if reg is not None:
                err.print(f"registered {args.name!r} in {reg} (`python -m zoo info {args.name}`)", highlight=False)
        elif args.cmd == "export":
            from zoo.export.cli import run_export

            out = run_export(args.name, args.out, args.format, args.merged, args.keep_modules, args.weights,
                             note=lambda m: err.print(f"[yellow]{m}[/yellow]", highlight=False))
            print(out)
    except (hub.HubError, FileNotFoundError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)  # one line, however wide the terminal
        return 2
    except RuntimeError as e:  # a base-weights file that cannot be used (--weights, a published base): the user's
        weights = sys.modules.get("zoo.backbones.weights")  # (imported only if weights were read: `list` stays fast)
        if weights is None or not isinstance(e, weights.WeightsUnavailableError):
            raise
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
