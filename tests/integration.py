"""Checks a real training run's artifact (shared by tests/test_hydra.py and tests/test_salt.py)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

import zoo
from tests.helpers import compose_config


def check_trained_artifact(overrides: list[str], metrics: dict) -> torch.nn.Module:
    """Rebuild the run's model from its config, load ``<out_dir>/adapter`` into it and check that

    * it reproduces the run's validation accuracy on the same validation batches, and
    * merging the adapter (``unload=True``: the plain backbone) leaves the logits unchanged.

    Returns the loaded, unmerged model.
    """
    import lightning as L

    from tasks.runner import build_datamodule, build_task

    cfg = compose_config(overrides)
    L.seed_everything(cfg.seed, workers=True)  # the same random base weights as the run
    task = build_task(cfg)
    model = task.model
    zoo.remove_adapters(model)
    zoo.load_adapter(model, Path(metrics["out_dir"]) / "adapter")  # checks the base-weight fingerprint
    dm = build_datamodule(cfg, task)
    dm.prepare_data()
    dm.setup("fit")
    limit = cfg.trainer.get("limit_val_batches") or float("inf")
    batches = [b for i, b in enumerate(dm.val_dataloader()) if i < limit]
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(b[0]) for b in batches])
        y = torch.cat([b[1] for b in batches])
        acc = (logits.argmax(-1) == y).float().mean().item()
        assert abs(acc - metrics["val/acc"]) < 1e-6, (acc, metrics["val/acc"])
        merged = zoo.merge_adapters(copy.deepcopy(model), unload=True)
        assert not zoo.adapters_of(merged)
        merged_logits = torch.cat([merged(b[0]) for b in batches])
    torch.testing.assert_close(merged_logits, logits, rtol=1e-4, atol=1e-4)
    return model


def assert_merge_keeps_outputs(model: torch.nn.Module, x: torch.Tensor, keys: set[str], rtol: float, atol: float) -> None:
    """Merging with ``unload=True`` keeps ``model(x)`` and leaves the backbone's original state-dict names."""
    with torch.no_grad():
        unmerged = model(x)
        zoo.merge_adapters(model, unload=True)
        merged = model(x)
    torch.testing.assert_close(merged, unmerged, rtol=rtol, atol=atol)
    assert set(model.backbone.state_dict()) == keys


def assert_val_accuracy(metrics: dict, n_val: int, key: str = "val/acc") -> None:
    """A check that can fail (issue 15, instead of ``0 <= acc <= 1``): the run's accuracy is a
    number of correct images out of the ``n_val`` it evaluated, and the selection monitor is it."""
    acc = metrics[key]
    assert isinstance(acc, float), (key, acc)
    k = acc * n_val
    assert abs(k - round(k)) < 1e-3 * max(1.0, k) and 0 <= round(k) <= n_val, (key, acc, n_val)
    if key == "val/acc" and isinstance(metrics.get("monitor"), dict) and metrics["monitor"].get("name") == key:
        assert metrics["monitor"]["value"] == acc
