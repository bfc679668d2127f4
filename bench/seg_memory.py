"""Peak memory and step time of SAM segmentation recipes: ``python -m bench.seg_memory [--img-size 256]``.

Rows: decoder-only (``linear``: the encoder frozen, SAM's decoder trains), SAMed (LoRA r=4 on q, v;
decoder trains), SALT (default SALT sites qkv/o/fc1/fc2; decoder trains), each with and without
activation checkpointing of the encoder blocks (``task.grad_checkpointing``). SAM ViT-B with random
weights (the cost does not depend on the values), K = 8 classes, a fresh subprocess per row.
Memory: CUDA max allocated on a GPU, else the peak resident set size minus the resident size
after the model is built (the training step's own working memory). Also the SAMed artifact size.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = {"decoder-only": ("linear", {}), "SAMed": ("lora", {"rank": 4, "alpha": 4, "targets": ["q", "v"]}),
        "SALT": ("salt", {})}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_row(name: str, ckpt: bool, img: int, batch: int, model: str, device: str) -> dict:
    import torch

    import zoo
    from zoo.seg import SamSegmenter
    from zoo.seg.losses import SegLoss

    torch.manual_seed(0)
    bb = zoo.create_backbone("sam", model=model, pretrained=False, img_size=img)
    seg = SamSegmenter(bb, 8, decoder_weights=None)
    adapter, opts = ROWS[name]
    zoo.apply_adapter(seg, adapter, **opts)
    bb.model.set_grad_checkpointing(ckpt)
    seg.to(device).train()
    trainable, total = zoo.count_parameters(seg)
    opt = torch.optim.AdamW([p for p in seg.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 9, (batch, img // 4, img // 4), device=device)
    loss_fn = SegLoss("samed")
    base = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(seg(x), y).backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    mem = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mb() - base
    out = {"row": name, "checkpointing": ckpt, "trainable": trainable, "total": total,
           "step_s": sorted(times[1:])[0], "peak_mb": mem}
    if name == "SAMed" and not ckpt:
        with tempfile.TemporaryDirectory() as d:
            zoo.save_adapter(seg, d)
            out["artifact_mb"] = (Path(d) / "adapter.safetensors").stat().st_size / 2**20
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--model", default="samvit_base_patch16")
    ap.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.row:
        print(json.dumps(run_row(a.row, bool(a.ckpt), a.img_size, a.batch, a.model, a.device)))
        return
    results = []
    for name in ROWS:
        for ckpt in (0, 1):
            cmd = [sys.executable, "-m", "bench.seg_memory", "--row", name, "--ckpt", str(ckpt),
                   "--img-size", str(a.img_size), "--batch", str(a.batch), "--model", a.model, "--device", a.device]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                print(f"{name} ckpt={ckpt}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"SAM {a.model} img {a.img_size} batch {a.batch} on {a.device} (memory: "
          f"{'CUDA max allocated' if a.device == 'cuda' else 'peak RSS growth during the step'})")
    print("| recipe | act. ckpt | trainable | step (s) | memory (MB) |\n|---|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['row']} | {'on' if r['checkpointing'] else 'off'} | {r['trainable']:,} | {r['step_s']:.2f} | "
              f"{r['peak_mb']:.0f} |")
    for r in results:
        if "artifact_mb" in r:
            print(f"SAMed artifact (LoRA + prompt encoder + mask decoder): {r['artifact_mb']:.1f} MB")


if __name__ == "__main__":
    main()
