"""The notebooks run top to bottom on a fresh machine (small settings: ``ZOO_NB_SMALL=1``).

Each one executes in a real Jupyter kernel (``python3``) through nbclient, with an empty zoo cache
and no runs to read, as on a fresh clone. Outputs are not committed.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(p.name for p in NB_DIR.glob("*.ipynb"))
# one per modality: the project's task trained a few steps, then pictures (docs/notebooks.md)
MODALITY_NOTEBOOKS = ["05_audio.ipynb", "06_segmentation.ipynb", "07_pde.ipynb", "08_restoration.ipynb",
                      "09_captioning.ipynb", "10_clip.ipynb"]
# what each modality notebook must print (its measured numbers, with what made them)
MODALITY_LINES = {
    "05": ["on 20 clips (10 classes, chance 10%); tiny model, 200 steps"],
    "06": ["test split (16 images): mean Dice"],
    "07": ["2 test windows, 4 rollout steps; nRMSE per step"],
    "08": ["tiny NAFNet pretrained here, 150 steps of the adapter"],
    "09": ["test split (4 clips): BLEU-4", "tiny random CoCa, 150 steps"],
    "10": ["zero-shot accuracy: base", "tuned accuracy: base"],
}


def _number(text: str, pattern: str) -> list[float]:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not found in the notebook's output"
    return [float(g) for g in m.groups()]


def _trained_something(name: str, text: str) -> None:
    """The short training must have an effect (a fit that silently trains nothing fails here: LoRA
    inside a randomly initialised NAFNet did, its blocks start as the identity)."""
    if name.startswith("05"):
        assert _number(text, r"test accuracy ([\d.]+)%")[0] > 20  # chance is 10%
    if name.startswith("06"):
        assert _number(text, r"mean Dice ([\d.]+)")[0] > 0.1
    if name.startswith("07"):
        m = re.search(r"nRMSE per step \(mean over windows and fields\): ([\d. ]+)", text)
        assert m and max(map(float, m.group(1).split())) < 0.8  # an untrained model is near 1
    if name.startswith("08"):
        before, after = _number(text, r"PSNR input ([\d.]+) dB -> restored ([\d.]+) dB")
        assert after > before
    if name.startswith("09"):
        assert _number(text, r"CIDEr-D ([\d.]+)")[0] > 0.1  # the words of the shapes captions were learnt
    if name.startswith("10"):
        zs = _number(text, r"zero-shot accuracy: base ([\d.]+)%")[0]
        assert _number(text, r"tuned accuracy: base ([\d.]+)%")[0] > zs + 5


def _outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == kind or kind in o.get("data", {})]


def _text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_notebooks_are_committed_without_outputs():
    assert NOTEBOOKS == ["01_quickstart.ipynb", "02_adapter_anatomy.ipynb", "03_results.ipynb", "04_serving.ipynb",
                         *MODALITY_NOTEBOOKS]
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
    if name in MODALITY_NOTEBOOKS:
        # the small run must say it used the tiny random backbone, and draw every picture
        md = "".join(o.get("data", {}).get("text/markdown", "") for o in _outputs(nb, "text/markdown"))
        assert "tiny randomly initialised backbone" in md and "training steps" in md
        figures = 1 if name.startswith("09") else 2
        assert len(_outputs(nb, "image/png")) == figures, f"{name}: expected {figures} figure(s)"
        for line in MODALITY_LINES[name[:2]]:
            assert line in text, f"{name}: {line!r} not printed"
        _trained_something(name, text)
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
