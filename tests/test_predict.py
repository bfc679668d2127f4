"""``eval.py artifact=... +predict=DIR`` and ``python -m zoo predict``: audio clips (CSV) and segmentation (mask PNGs).

The predictions are made outside Lightning (:mod:`zoo.predict`: plain torch with the artifact's recorded
preprocessing); they must be the predictions the trained task itself makes.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import CONF, run_train


def _evaluate(tmp_path: Path, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from tasks.runner import evaluate, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "eval")
    return evaluate(cfg, overrides=overrides)


@pytest.mark.parametrize("head", ["linear", "layernorm_linear"])
def test_audio_predictions_are_the_tasks_own(tmp_path, head):
    m = run_train(["experiment=tiny_audio", "adapter=lora", f"task.head={head}"], tmp_path)
    art = Path(m["out_dir"]) / "adapter"
    import json

    assert json.loads((art / "adapter.json").read_text())["head"]["type"] == head  # AST's mlp_head: layernorm_linear
    out = tmp_path / "pred"
    res = _evaluate(tmp_path, [f"artifact={art}", "split=test", f"+predict={out}"])
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert rows and {r["file"].rsplit(".", 1)[-1] for r in rows} == {"wav"}
    import json

    classes = json.loads((art / "adapter.json").read_text())["task"]["class_names"]
    # the generated ESC-50-layout set: audio/<fold>-<clip>-<take>-<class index>.wav
    truth = [classes[int(Path(r["file"]).stem.rsplit("-", 1)[-1])] for r in rows]
    acc = np.mean([r["label"] == t for r, t in zip(rows, truth)])
    assert acc == pytest.approx(res["test/acc"])

    from zoo.predict import predict  # the command line's function on the same clips, by folder

    again = predict(str(art), [r["file"] for r in rows], tmp_path / "again")
    assert again.read_text() == (out / "predictions.csv").read_text()


def test_segmentation_masks_are_the_tasks_own(tmp_path):
    m = run_train(["experiment=tiny_seg", "adapter=lora"], tmp_path)
    run = Path(m["out_dir"])
    out = tmp_path / "pred"
    _evaluate(tmp_path, [f"artifact={run / 'adapter'}", "split=test", f"+predict={out}"])
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    task_masks = sorted((run / "predictions" / "test").glob("*.png"))  # written by the task at the end of training
    assert len(rows) == len(task_masks) == 16
    for r, theirs in zip(rows, task_masks):
        mine = np.asarray(Image.open(r["label"]))
        assert Image.open(r["label"]).mode == "P" and mine.shape == Image.open(r["file"]).size[::-1]
        assert np.array_equal(mine, np.asarray(Image.open(theirs)))
        assert float(r["score"]) == pytest.approx((mine > 0).mean(), abs=1e-6)


def test_predict_refuses_other_kinds_and_missing_inputs(tmp_path):
    import json

    from zoo.predict import PredictError, expand_inputs, load_predictor

    art = tmp_path / "a"
    art.mkdir()
    (art / "adapter.json").write_text(json.dumps({"methods": [{"name": "lora"}], "task": {"kind": "pde"},
                                                  "backbone": {"family": "morph", "model": "morph_ti"}}))
    with pytest.raises(PredictError, match="predict serves classification, audio, audio_multilabel, segmentation"):
        load_predictor(art)
    with pytest.raises(PredictError, match="does not exist"):
        expand_inputs([tmp_path / "nope.jpg"], (".jpg",))
    with pytest.raises(PredictError, match="holds no .jpg"):
        expand_inputs([art], (".jpg",))
