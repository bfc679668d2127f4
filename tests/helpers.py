"""Run train.py's job in-process (fast) or as two DDP processes, for tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


def compose_config(overrides: list[str], out_dir: Path | None = None):
    """Compose conf/train.yaml with ``overrides`` as Hydra would (no run directory)."""
    from tasks.runner import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=False)
    if out_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(out_dir)
    return cfg


def run_train(overrides: list[str], tmp_path: Path) -> dict[str, Any]:
    """Train in this process with ``overrides`` (e.g. ``["experiment=tiny", "adapter=lora"]``).

    Returns the run's metrics (``metrics.json``) plus ``out_dir``.
    """
    from tasks.runner import train

    out = Path(tmp_path) / "run"
    cfg = compose_config(overrides, out)
    metrics = train(cfg)
    return {**json.loads((out / "metrics.json").read_text()), "out_dir": str(out)}


def run_train_ddp(overrides: list[str], tmp_path: Path, timeout: int = 600) -> dict[str, Any]:
    """``python train.py <overrides> trainer=ddp_cpu`` in a subprocess (two CPU ranks)."""
    out = Path(tmp_path) / "ddp_run"
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, "trainer=ddp_cpu", f"hydra.run.dir={out}"]
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"DDP run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return {**json.loads((out / "metrics.json").read_text()), "out_dir": str(out), "log": proc.stdout + proc.stderr}


class StopAfterEpochs:
    """Lightning callback (for tests) that interrupts training after ``epochs`` epochs."""

    def __new__(cls, epochs: int = 1):
        import lightning as L

        class _Stop(L.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                if trainer.current_epoch + 1 >= epochs:
                    trainer.should_stop = True

        return _Stop()


# Adapters made for one kind of backbone: on any other they refuse with a SiteError naming why
# (MORPH's levels and F-Adapter need MORPH's groups / token grid, CoOp needs CLIP's text tower,
# prefix tuning needs timm's fused-qkv attention on [B, N, d] tokens). The "every registered
# adapter on backbone X" tests use this to expect that refusal instead of a run.
BACKBONE_SPECIFIC = {
    "f_adapter": ("morph",),
    "morph_ft": ("morph",),
    "coop": ("clip",),
    "prefix": ("vit", "ast"),
}


def refuses(adapter: str, family: str) -> bool:
    """``adapter`` is made for other backbone families than ``family`` (it must refuse clearly)."""
    families = BACKBONE_SPECIFIC.get(adapter)
    return families is not None and family not in families


def assert_refuses(model, adapter: str, **options) -> None:
    """``apply_adapter`` refuses with one clear SiteError naming the backbone, and leaves no adapter."""
    import pytest

    import zoo

    family = zoo.find_backbone(model).family
    with pytest.raises(zoo.SiteError, match=rf"(?s).*({family}|backbone).*") as e:
        zoo.apply_adapter(model, adapter, **options)
    assert "\n" not in str(e.value).strip(), str(e.value)
    assert not zoo.adapters_of(model)


def assert_optimizer_resumes_exactly(make_model, n_steps: int, split: int, lr: float = 1e-3, wd: float = 0.01):
    """Train ``make_model()`` (an ImageClassifier with 3 classes on 32-px images) for ``n_steps`` with
    ``zoo.build_optimizer``; interrupt another copy after ``split`` steps, save model and optimizer state
    (``torch.save``, loaded back with ``weights_only=True``), resume a fresh copy from it and finish: every
    parameter equals the uninterrupted run's exactly. Returns the resumed optimizer."""
    import io

    import torch
    import torch.nn.functional as F

    import zoo

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n_steps)]

    def fit(model, opt, part):
        for x, y in part:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    def optimizer(model):
        return zoo.build_optimizer(model, zoo.param_groups(model, lr, wd), lr, wd)

    full = make_model()
    fit(full, optimizer(full), batches)
    part = make_model()
    opt = optimizer(part)
    fit(part, opt, batches[:split])
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = make_model()
    resumed.load_state_dict(saved["model"])
    opt = optimizer(resumed)
    opt.load_state_dict(saved["opt"])
    fit(resumed, opt, batches[split:])
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    return opt


class OneLinear(nn.Module):
    """A model that is one Linear named ``lin``: peft's tuners wrap it by name (``target_modules=["lin"]``),
    for tests that compare a zoo wrapper with peft's on the same layer."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x)
