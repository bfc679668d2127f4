"""Progress lines at least every trainer.progress_every_s seconds in any output mode, and the wall time."""
from __future__ import annotations

import io
import re
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tasks.trainer.progress import ProgressLines, fmt_seconds


class _Slow(L.LightningModule):
    """A model whose steps take 0.1 s (a busy machine in miniature)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def training_step(self, batch, i):
        time.sleep(0.1)
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:.*LeafSpec")  # Lightning's own deprecated torch call (quiet_logs silences it in runs)
def test_a_line_every_period_without_a_terminal_and_the_wall_time():
    out = io.StringIO()  # not a terminal: the mode that printed nothing before
    cb = ProgressLines(every_s=0.25, stream=out)
    trainer = L.Trainer(max_epochs=2, callbacks=[cb], enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False)
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=1)
    t = time.monotonic()
    trainer.fit(_Slow(), data)
    wall = time.monotonic() - t
    lines = out.getvalue().splitlines()
    periodic = [ln for ln in lines if re.match(r"\[progress\] fit: epoch [12]/2, batch \d/8, train/loss \S+, \d+s elapsed", ln)]
    assert len(periodic) >= max(2, int(wall / 0.25) // 2)  # about one per period (a busy machine delays some)
    assert re.fullmatch(r"\[progress\] fit done in \d+s \(wall time\)", lines[-1])
    assert cb._thread is None  # the timer stopped with the run


def test_fmt_seconds():
    assert [fmt_seconds(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m05s"]


class _Fails(_Slow):
    def training_step(self, batch, i):
        if i == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, i)


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_a_run_that_raises_stops_its_timer():
    """Lightning skips teardown when fit raises: the timer must stop anyway, or a notebook (or the test
    session that found this) prints '[progress] fit: … elapsed' every period for the life of the process."""
    import threading

    out = io.StringIO()
    cb = ProgressLines(every_s=0.05, stream=out)
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(_Fails(), DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=1))
    assert cb._thread is None
    assert not [t for t in threading.enumerate() if t.name == "zoo-progress"]
    n = len(out.getvalue().splitlines())
    time.sleep(0.3)  # six periods
    assert len(out.getvalue().splitlines()) == n  # nothing printed after the run ended
