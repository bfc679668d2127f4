"""Peak memory and step time of the SAM segmentation recipes: ``python -m bench.seg_memory [--img-size 256]``.

A thin wrapper over ``python -m bench.adapters --backbone sam`` (one codepath): the rows decoder-only
(``adapter=linear``: encoder frozen, SAM's mask decoder trains), SAMed (``conf/adapter/samed_lora.yaml``:
LoRA r=4 on q, v; decoder trains) and SALT (``conf/adapter/salt_sam.yaml``; decoder trains), each also
with activation checkpointing of the encoder blocks (``+ckpt``), against the frozen floor; peak memory
in a fresh subprocess per row (CUDA max allocated, or the process's peak RSS on CPU). SAM with random
weights (the cost does not depend on the values), K = 8 classes. Other ``bench.adapters`` options pass
through (e.g. ``--depth 4``, ``--repeats 5``).
"""
from __future__ import annotations

import argparse

from bench import adapters

RECIPES = ["decoder-only", "SAMed", "SALT (seg)"]


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--model", default="samvit_base_patch16")
    ap.add_argument("--out", default="bench/results/sam_memory")
    a, rest = ap.parse_known_args(argv)
    return adapters.main(["--backbone", "sam", "--img-size", str(a.img_size), "--batch-size", str(a.batch),
                          "--model", a.model, "--num-classes", "8", "--adapters", *RECIPES,
                          "--extra", *(f"{r}+ckpt" for r in RECIPES), "--skip-merged", "--out", a.out, *rest])


if __name__ == "__main__":
    main()
