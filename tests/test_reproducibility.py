"""Same seed, same machine, same thread count -> bitwise the same run (what `make demo` relies on).

The demo's path: generated data (PNG files written by tasks/data/synthetic.py), a seeded
epoch-wise sampler, seeded DataLoader workers, ``trainer.deterministic=true`` (as the upstream and
quickstart experiments set it), then the adapter artifact and ``metrics.json``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from tests.helpers import run_train


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_generated_data_is_byte_identical(tmp_path, monkeypatch):
    from tasks.data import synthetic

    monkeypatch.setattr(synthetic, "SPLITS", {"train800val200": 12, "test": 4})
    for task in ("clevr_dist", "dsprites_ori", "shapes"):  # the quickstart task, the methods demo's, the upstream one
        a = tree_digest(synthetic.write_task(tmp_path / "a", task))
        b = tree_digest(synthetic.write_task(tmp_path / "b", task))
        assert len(a) == 12 + 4 + 4 and a == b


def test_safetensors_bytes_are_stable_across_saves(tmp_path):
    """safetensors orders ``__metadata__`` by a Rust HashMap (random per save); the zoo's writer sorts it."""
    from safetensors import safe_open
    from safetensors.torch import load

    from zoo.io import safetensors_bytes

    state = {"b": torch.randn(3, 4), "a": torch.arange(5)}
    meta = {"format": "pt", "adapter_zoo": "1", "z": "x"}
    blobs = {safetensors_bytes(state, meta) for _ in range(16)}
    assert len(blobs) == 1
    blob = blobs.pop()
    assert all(torch.equal(v, state[k]) for k, v in load(blob).items())
    (tmp_path / "x.safetensors").write_bytes(blob)
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == meta


RUN = ["experiment=tiny", "adapter=lora", "task.max_epochs=2", "trainer.limit_train_batches=2",
       "trainer.limit_val_batches=1", "data.num_workers=2", "trainer.deterministic=true"]


def test_two_runs_with_the_same_seed_are_bitwise_identical(tmp_path):
    """Two epochs (the sampler reseeds per epoch), two DataLoader workers, LoRA as in the demo."""
    torch.set_num_threads(1)
    runs = [run_train(RUN, tmp_path / name) for name in ("a", "b")]
    out = [Path(r["out_dir"]) for r in runs]
    for name in ("adapter/adapter.safetensors", "adapter/adapter.json"):
        assert (out[0] / name).read_bytes() == (out[1] / name).read_bytes(), name
    # metrics.json records how long the run took (wall_time_s, step_ms): everything else is identical
    metrics, other = (json.loads((o / "metrics.json").read_text()) for o in out)
    timing = {"wall_time_s", "step_ms"}
    assert {k: v for k, v in metrics.items() if k not in timing} == {k: v for k, v in other.items() if k not in timing}
    assert timing & set(metrics), "the timing keys this comparison leaves out are gone: compare the whole file"
    assert metrics["train_loss_first"] != metrics["train_loss_last"]  # it trained
