"""What a run prints: each log line once, no warning the user cannot act on (issue 22, "logs they can read")."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from collections import Counter

from tests.helpers import ROOT, run_train

STAMP = re.compile(r"^\[[0-9-]+ [0-9:,]+\]\[[^\]]+\]\[[A-Z]+\] - ")  # Hydra's "[time][logger][LEVEL] - "
LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR): ")  # Lightning's own console handler


def test_train_prints_each_line_once_and_logs_every_line_to_its_file(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=tiny", f"hydra.run.dir={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    messages = Counter(LEVEL.sub("", STAMP.sub("", ln)) for ln in console)
    twice = {m: n for m, n in messages.items() if n > 1}
    assert not twice, twice  # was: "INFO: Seed set to 0" and "[...][lightning.fabric.utilities.seed][INFO] - Seed set to 0"
    assert "Seed set to 0" in messages and "`Trainer.fit` stopped: `max_epochs=2` reached." in messages
    # Hydra's file log keeps every line, Lightning's included
    (log_file,) = out.glob("*.log")
    logged = log_file.read_text()
    assert "[lightning.fabric.utilities.seed][INFO] - Seed set to 0" in logged
    assert "[lightning.pytorch.utilities.rank_zero][INFO] - `Trainer.fit` stopped" in logged
    assert "[adapter_zoo][INFO] - metrics:" in logged


def test_restoration_run_names_its_batch_size_and_fits_its_default_adapter(tmp_path):
    """A restoration (or captioning) batch has parts of several sizes: the training step names its batch size,
    so Lightning does not warn "Trying to infer the `batch_size` from an ambiguous collection" on every run;
    and experiment=tiny_restore runs with no adapter named (LoRA on q/v does not exist on a NAFNet)."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        m = run_train(["experiment=tiny_restore"], tmp_path)
    said = [str(w.message) for w in got]
    assert not [s for s in said if "ambiguous collection" in s], said
    assert m["adapter"] == "lora" and m["adapter_config"]["targets"] != ["q", "v"]
