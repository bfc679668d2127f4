"""Serving several adapters: ``python -m bench.adapters --serving [--serving-k 1 4 16] [--serving-methods lora ...]``.

For each K, a batch of ``--batch-size`` samples routed round-robin over K adapters (each with its
own head) on one ViT backbone, timed three ways in interleaved rounds:

* ``multi``: :class:`zoo.MultiAdapter`, one mixed batch (low-rank adapters share one backbone pass);
* ``separate``: K adapted models (unmerged), each run on its own samples: K forwards per batch;
* ``merged``: ONE adapter merged into the base weights (``zoo.merge_adapters``) on the whole batch:
  what a single-task server costs, the floor a mixed batch is compared with.

Memory is the bytes of the tensors each setup holds (parameters and buffers, every storage counted
once): one MultiAdapter (the base once + K adapters and heads) against K separately loaded models
(K copies of the base) and one merged model. Each ratio is the median over rounds of the per-round
ratio to ``merged`` timed in the same round.
"""
from __future__ import annotations

import copy
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

import zoo

DEFAULT_K = (1, 4, 16)


def tensor_bytes(*modules: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``modules``, each storage once (shared base weights too)."""
    seen: dict[int, int] = {}
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def perturb(model: nn.Module, seed: int) -> nn.Module:
    """Adapter tensors off their init (B = 0 would make every adapter the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p) * 0.02)
    return model.eval()


def build_base(args) -> zoo.Backbone:
    torch.manual_seed(0)
    kw = {"depth": args.depth} if args.depth else {}
    return zoo.create_backbone("vit", model=args.model, pretrained=False, img_size=args.img_size, **kw).eval()


def adapter_models(base, k: int, methods: list[str], num_classes: int) -> dict[str, nn.Module]:
    """K adapted classifiers on copies of ``base``: methods cycle through ``methods``; class counts vary."""
    out = {}
    for i in range(k):
        model = zoo.ImageClassifier(copy.deepcopy(base), num_classes + i % 3)
        zoo.apply_adapter(model, methods[i % len(methods)])
        out[f"{methods[i % len(methods)]}{i}"] = perturb(model, i)
    return out


@torch.no_grad()
def run_serving(args, argv: list[str] | None) -> dict:
    from bench.timing import environment, interleaved, log

    methods = args.serving_methods
    n = args.batch_size
    x = torch.randn(n, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0)).to(args.device)
    base = build_base(args).to(args.device)
    results, checks = [], []
    for k in args.serving_k:
        if k > n:
            raise SystemExit(f"--serving-k {k} exceeds --batch-size {n}: every adapter needs a sample")
        log(args, f"K = {k}: building {k} adapter(s) ({', '.join(methods)})")
        models = {name: m.to(args.device) for name, m in adapter_models(base, k, methods, args.num_classes).items()}
        names = list(models)
        route = [names[i % k] for i in range(n)]
        multi = zoo.MultiAdapter(base, models).to(args.device)
        rows = {name: torch.tensor([i for i, r in enumerate(route) if r == name], device=args.device) for name in names}
        merged = zoo.merge_adapters(copy.deepcopy(models[names[0]]), unload=True).eval()  # the first method must merge
        got = multi.outputs(x, route)
        ref = {name: models[name](x[rows[name]]) for name in names}
        err = max((got[i] - ref[r][(rows[r] == i).nonzero()[0, 0]]).abs().max().item() for i, r in enumerate(route))
        plain = zoo.remove_adapters(copy.deepcopy(models[names[0]]))  # the same head without its adapter
        effect = (ref[names[0]] - plain(x[rows[names[0]]])).abs().max().item()
        checks.append(f"K={k}: max |MultiAdapter − the adapter's own model| over the batch = {err:.2e} "
                      f"(the adapter itself moves {names[0]}'s outputs by up to {effect:.2e})")

        def separate():
            for name in names:
                models[name](x[rows[name]])

        fns = {"multi": lambda: multi.outputs(x, route), "separate": separate, "merged": lambda: merged(x)}
        times = interleaved([], fns, args, f"K={k}")
        mem = {"multi": tensor_bytes(multi), "separate": sum(tensor_bytes(m) for m in models.values()),
               "merged": tensor_bytes(merged)}
        for label, ts in times.items():
            results.append({
                "k": k, "row": label, "batched": sum(r == "batched" for r in multi.routing().values()),
                "s": statistics.median(ts), "samples_per_s": n / statistics.median(ts),
                "x_merged": statistics.median(t / m for t, m in zip(ts, times["merged"])),
                "bytes": mem[label], "bytes_x_merged": mem[label] / mem["merged"],
            })
    cmd = "python -m bench.adapters " + shlex.join(argv if argv is not None else sys.argv[1:])
    res = {"command": cmd, "environment": environment(args), "methods": methods, "batch_size": n, "rows": results,
           "checks": checks}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from zoo.io import atomic_write_text

    atomic_write_text(out / "results.md", markdown(res, args))
    atomic_write_text(out / "results.json", json.dumps(res, indent=1) + "\n")
    if not args.quiet:
        print(markdown(res, args))
    return res


def _mib(b: int) -> str:
    return f"{b / 2 ** 20:.1f} MiB"


def markdown(res: dict, args) -> str:
    depth = f" depth {args.depth}" if args.depth else ""
    lines = [
        f"# Serving K adapters on one backbone: {args.model}{depth} at {args.img_size} px, batch {res['batch_size']}, "
        f"{args.device}",
        "",
        f"Command: `{res['command']}`  ",
        f"Environment: {res['environment']}; {args.repeats} interleaved rounds × {args.steps} timed calls per row "
        f"after {args.warmup} warm-up call(s). Adapters: {', '.join(res['methods'])} (default configs, one head "
        f"each, {args.num_classes}–{args.num_classes + 2} classes), samples routed round-robin.",
        "",
        "| K | setup | ms / batch | samples / s | time × merged | memory | memory × merged |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['k']} | {r['row']} | {1e3 * r['s']:.1f} | {r['samples_per_s']:.0f} | {r['x_merged']:.2f} | "
                     f"{_mib(r['bytes'])} | {r['bytes_x_merged']:.2f} |")
    lines += [
        "",
        "Notes:",
        "- **multi**: `zoo.MultiAdapter`, the whole mixed batch in one call (low-rank adapters: one backbone pass, "
        "each sample's factors gathered at every adapted layer; heads per adapter). **separate**: the K adapted "
        "models (unmerged), each on its own samples, one after the other. **merged**: one adapter merged into the "
        "base weights on the whole batch (a single-task server; it cannot serve the other K−1 tasks).",
        "- **memory**: bytes of the parameters and buffers held, each storage once: MultiAdapter keeps the base "
        "weights once; K separately loaded models keep K copies.",
        "- Absolute CPU timings are noisy (a shared machine): compare the ratios within one run, not milliseconds "
        "across runs.",
        "",
        "Checks:",
    ] + [f"- {c}" for c in res["checks"]]
    return "\n".join(lines) + "\n"
