"""Speed / memory options of the trainer config: ``trainer.compile`` and ``trainer.checkpoint_blocks``.

Both are applied by one Lightning callback at ``setup`` (in every process, after the adapter and
any data-driven ``prepare`` have built the model), so they work for every task kind without the
task knowing:

* ``compile=true``: ``torch.compile`` of the task's model in place (``nn.Module.compile``: the
  module's call is compiled, its ``state_dict`` keys, artifact and checkpoints are unchanged).
  ``compile`` may also be a dict of ``torch.compile`` keyword arguments (e.g. ``{mode: max-autotune}``).
* ``checkpoint_blocks=true``: activation checkpointing of the backbone's blocks
  (:func:`zoo.checkpoint_blocks`): less memory, one more forward of each block per step.

:func:`mixed_precision` is the config resolver ``${mixed_precision:<precision>,${trainer.accelerator}}``:
a recipe that trains in mixed precision on a GPU (CLIP-LoRA: fp16 autocast + GradScaler, which is
Lightning's ``16-mixed``) and falls back to ``32-true`` elsewhere, saying so once in the log.
"""
from __future__ import annotations

import logging
from typing import Any

import lightning as L
from torch import nn

import zoo

OPTIONS = ("compile", "checkpoint_blocks")
log = logging.getLogger(__name__)
GPU_ACCELERATORS = ("gpu", "cuda")
_said: set[tuple[str, str]] = set()


def mixed_precision(precision: str, accelerator: str = "auto") -> str:
    """``precision`` (e.g. ``16-mixed``) when the run's accelerator is a CUDA GPU (``gpu``/``cuda``,
    or ``auto`` with one visible), else ``32-true`` with one log line: autocast fp16 and its
    GradScaler are a GPU feature (Lightning refuses ``16-mixed`` on CPU)."""
    import torch

    accelerator = str(accelerator).lower()
    gpu = accelerator in GPU_ACCELERATORS or (accelerator == "auto" and torch.cuda.is_available())
    if gpu:
        return str(precision)
    if (precision, accelerator) not in _said:
        _said.add((precision, accelerator))
        log.info("trainer.precision: %s needs a CUDA GPU (accelerator=%s); training in 32-true", precision, accelerator)
    return "32-true"


def _model(pl_module: L.LightningModule) -> nn.Module:
    m = getattr(pl_module, "model", None)
    return m if isinstance(m, nn.Module) else pl_module


class PerfOptions(L.Callback):
    def __init__(self, compile: bool | dict = False, checkpoint_blocks: bool = False):
        if not isinstance(compile, (bool, dict)):
            raise ValueError(f"trainer.compile must be true, false or a dict of torch.compile options, got {compile!r}")
        if not isinstance(checkpoint_blocks, bool):
            raise ValueError(f"trainer.checkpoint_blocks must be true or false, got {checkpoint_blocks!r}")
        self.compile, self.checkpoint_blocks = compile, checkpoint_blocks
        self._done = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._done:
            return
        model = _model(pl_module)
        if self.checkpoint_blocks:  # before compiling, so the compiled graph sees the checkpoints
            zoo.checkpoint_blocks(model)
        if self.compile:
            model.compile(**(self.compile if isinstance(self.compile, dict) else {}))
        self._done = True


def perf_callbacks(trainer_cfg: dict[str, Any]) -> list[L.Callback]:
    """Pop the perf options from the trainer config (Lightning's Trainer does not know them) and
    return the callback that applies them (none when both are off)."""
    opts = {k: trainer_cfg.pop(k) for k in OPTIONS if k in trainer_cfg}
    if not any(opts.values()):
        return []
    return [PerfOptions(**opts)]


class StepTimer(L.Callback):
    """Mean wall time of a training step (ms): the interval between consecutive training batches of one
    epoch (data, forward, backward, optimizer step), the first ``skip`` intervals of the run left out
    (warm-up: allocator, first-call costs). Start-to-start intervals need no device synchronisation:
    queued GPU work is paid by a later step, so the mean converges to the true rate."""

    def __init__(self, skip: int = 2):
        self.skip = skip
        self.intervals: list[float] = []
        self._last: float | None = None
        self._seen = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = None  # validation runs between epochs: not a training step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import time

        now = time.perf_counter()
        if self._last is not None:
            self._seen += 1
            if self._seen > self.skip:
                self.intervals.append(now - self._last)
        self._last = now

    def mean_ms(self) -> float | None:
        return 1000 * sum(self.intervals) / len(self.intervals) if self.intervals else None
