"""The notebooks run top to bottom on a fresh machine (small settings: ``ZOO_NB_SMALL=1``).

Each one executes in a real Jupyter kernel (``python3``) through nbclient, with an empty zoo cache
and no runs to read, as on a fresh clone. Outputs are not committed.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(p.name for p in NB_DIR.glob("*.ipynb"))


def _outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == kind or kind in o.get("data", {})]


def _text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_notebooks_are_committed_without_outputs():
    assert NOTEBOOKS == ["01_quickstart.ipynb", "02_adapter_anatomy.ipynb", "03_results.ipynb", "04_serving.ipynb"]
    for name in NOTEBOOKS:
        nb = nbformat.read(NB_DIR / name, as_version=4)
        nbformat.validate(nb)
        for c in nb.cells:
            if c.cell_type == "code":
                assert c.outputs == [] and c.execution_count is None, f"{name}: strip outputs before committing"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("ZOO_NB_SMALL", "1")
    monkeypatch.setenv("ADAPTERZOO_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("ZOO_RUNS", str(tmp_path / "no_runs"))  # 03: the fresh-machine path
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NB_DIR / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NB_DIR)}}).execute()
    assert not _outputs(nb, "error")
    assert _outputs(nb, "image/png"), f"{name} drew no plot"
    text = _text(nb)
    if name.startswith("01"):
        assert "max |Δ| zoo model vs trained model: 0.0" in text  # from_zoo reproduces the trained model
        assert "adapters left: []" in text
    if name.startswith("02"):
        assert "numerical rank of ΔW_q: 4" in text  # LoRA rank 4 on q
    if name.startswith("03"):
        assert "finished runs found" in text and "lora" in text
    if name.startswith("04"):  # each sample of the mixed batch equals its adapter alone; three class counts
        assert "(< 1e-4: True)" in text and "classes per sample: [6, 8, 16]" in text
        assert "dsprites_loc  batched" in text and "clevr_dist    batched" in text
