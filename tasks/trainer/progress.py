"""A progress line at least every ``trainer.progress_every_s`` seconds, in any output mode, and the wall time.

A run without a terminal (piped, logged to a file, a job scheduler) or with the progress bar off used
to print nothing between Lightning's start and end messages, for up to minutes on a busy machine. A
background timer prints one line on rank 0's stderr every ``every_s`` seconds, whatever the stage (stderr:
``eval.py``'s stdout stays its JSON)::

    [progress] fit: epoch 3/20, batch 40/125, train/loss 0.512, 1m30s elapsed

and one line at the end of each stage with its wall time. The timer is a thread (not a batch hook), so
a single long step, a slow validation or a data-module setup still get their line. It is started in
``setup`` (in the process that trains: ddp_spawn's ranks get a fresh one) and stopped in ``teardown``.
With a live progress bar on a terminal the periodic line is left out (the bar shows the same), the
wall-time line is kept.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerStatus


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class ProgressLines(L.Callback):
    def __init__(self, every_s: float = 30.0, stream=None):
        if not every_s or every_s <= 0:
            raise ValueError(f"trainer.progress_every_s={every_s}: must be > 0 seconds")
        self.every_s = float(every_s)
        self.stream = stream
        self._state: dict[str, Any] = {}
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def __getstate__(self):  # ddp_spawn pickles callbacks: no thread / lock / stream crosses
        return {"every_s": self.every_s, "stream": None, "_state": {}, "_stop": None, "_thread": None}

    # ------------------------------------------------------------------ output
    def _print(self, line: str) -> None:
        print(f"[progress] {line}", file=self.stream or sys.stderr, flush=True)

    def _bar_is_live(self, trainer: L.Trainer) -> bool:
        return trainer.progress_bar_callback is not None and (sys.stdout.isatty() or sys.stderr.isatty())

    def line(self) -> str:
        st = dict(self._state)
        stage, t0 = st.get("stage", "setup"), st.get("t0", time.monotonic())
        elapsed = time.monotonic() - t0
        parts = [f"{stage}:"]
        if st.get("max_epochs"):
            parts.append(f"epoch {st.get('epoch', 0) + 1}/{st['max_epochs']},")
        if st.get("batches"):
            parts.append(f"batch {st.get('batch', 0)}/{st['batches']},")
        if st.get("loss") is not None:
            parts.append(f"train/loss {st['loss']:.4g},")
        # no time-left estimate: validation inside fit (PDE rollouts, ...) makes batch counts a poor clock
        parts.append(f"{fmt_seconds(elapsed)} elapsed")
        return " ".join(parts)

    # ------------------------------------------------------------------ the timer
    def _run(self, trainer: L.Trainer) -> None:
        stop = self._stop
        assert stop is not None
        while not stop.wait(self.every_s):
            if trainer.state.status in (TrainerStatus.FINISHED, TrainerStatus.INTERRUPTED):
                return  # a run that ended by a path that skipped our hooks: never tick on forever
            if not self._bar_is_live(trainer):
                self._print(self.line())

    def _stop_timer(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._stop = self._thread = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._state = {"stage": getattr(stage, "value", stage), "t0": time.monotonic()}
        if not trainer.is_global_zero or self._thread is not None:
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(trainer,), name="zoo-progress", daemon=True)
        self._thread.start()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning skips the teardown hooks when a stage raises; in a notebook or a test session the
        # timer would otherwise print "[progress] fit: … elapsed" every period for the life of the process.
        self._stop_timer()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop_timer()
        if trainer.is_global_zero and "t0" in self._state:
            self._print(f"{getattr(stage, 'value', stage)} done in {fmt_seconds(time.monotonic() - self._state['t0'])} (wall time)")

    # ------------------------------------------------------------------ state
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batches = trainer.num_training_batches
        self._state.update(stage="fit", epoch=trainer.current_epoch, max_epochs=trainer.max_epochs, batch=0,
                           batches=batches if isinstance(batches, int) else None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self._state.update(batch=batch_idx + 1,
                           loss=float(loss.detach()) if hasattr(loss, "detach") else self._state.get("loss"))

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit":
            self._state.update(stage="validate")

    def on_test_start(self, trainer, pl_module) -> None:
        self._state.update(stage="test")
