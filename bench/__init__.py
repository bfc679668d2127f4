"""Benchmarks that print tables and write plots.

* ``python -m bench.adapters``: cost of every registered adapter (parameters, artifact size,
  training step time, peak memory, unmerged/merged inference) against the frozen floor and
  peft's LoRA on the same timm model.
* ``python -m bench.vtab RUNS_DIR ... --out DIR``: the VTAB-1k table from finished runs.
"""
