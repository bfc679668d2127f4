"""``python -m zoo predict --adapters NAME=ARTIFACT ... (--manifest FILE.csv | --route all PATH...)``.

Several artifacts on one tiny base (LoRA, Hydra, VPT; heads of 3, 5 and 2 classes, each its own class
names) served by one ``zoo.MultiAdapter``: every row must be the row ``python -m zoo predict`` writes
with that artifact alone, and the refusals must be one line each.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from tests.conftest import tiny_vit
from zoo.__main__ import main

HEADS = {"pets": (("lora", {"rank": 2}), ["cat", "dog", "hamster"]),
         "cars": (("hydra", {"par_rank": 2, "seq_rank": 2}), ["sedan", "van", "truck", "bus", "cab"]),
         "birds": (("vpt", {"num_tokens": 2}), ["owl", "wren"])}  # VPT runs grouped, the others batched


def _base_file(folder: Path, seed: int) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "base.safetensors"  # one file name: only the fingerprint tells two bases apart
    save_file({k: v.contiguous() for k, v in tiny_vit().model.state_dict().items()}, str(path))
    return path


def _artifact(tmp_path: Path, weights: Path, name: str, seed: int, preprocessing: dict | None = None) -> Path:
    (method, cfg), classes = HEADS[name]
    torch.manual_seed(seed)
    model = zoo.ImageClassifier(tiny_vit(weights=str(weights), pretrained=None), len(classes))
    zoo.apply_adapter(model, method, **cfg)
    with torch.no_grad():  # off the init (LoRA's B = 0 would make every adapter the plain backbone)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    extra = {"task": {"kind": "classification", "class_names": classes}}
    if preprocessing is not None:
        extra["preprocessing"] = preprocessing
    return zoo.save_adapter(model, tmp_path / f"{name}-{seed}", extra=extra)


def _images(folder: Path, n: int = 7) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        out.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 36, 3), dtype=np.uint8)).save(out[-1])
    return out


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("many")
    w = _base_file(tmp, 0)
    arts = {n: _artifact(tmp, w, n, i + 1) for i, n in enumerate(HEADS)}
    return tmp, w, arts, _images(tmp / "photos")


def _alone(tmp: Path, w: Path, art: Path, files: list[str], out: Path) -> dict[str, dict]:
    assert main(["predict", str(art), *files, "--weights", str(w), "--out", str(out)]) == 0
    rows = _rows(out / "predictions.csv")
    assert list(rows[0]) == ["file", "label", "score"]
    return {r["file"]: r for r in rows}


def _same_as_alone(rows: list[dict], alone: dict[str, dict[str, dict]]):
    for r in rows:
        own = alone[r["adapter"]][r["file"]]
        assert r["label"] == own["label"], r
        assert float(r["score"]) == pytest.approx(float(own["score"]), abs=2e-6)


def test_manifest_routes_each_file_to_its_adapter(zoo_dir, tmp_path):
    tmp, w, arts, images = zoo_dir
    names = list(HEADS)
    routed = [(img, names[(i * 2) % 3]) for i, img in enumerate(images)]  # mixed, every adapter present
    manifest = tmp / "photos" / "manifest.csv"  # relative paths: relative to the manifest's folder
    manifest.write_text("file,adapter,note\n" + "".join(f"{img.name},{a},x\n" for img, a in routed))
    out = tmp_path / "multi"
    adapters = [f"{n}={arts[n]}" for n in names]
    assert main(["predict", "--adapters", *adapters, "--manifest", str(manifest), "--weights", str(w),
                 "--out", str(out), "--batch-size", "4"]) == 0  # chunks of 4: batches that mix adapters
    rows = _rows(out / "predictions.csv")
    assert list(rows[0]) == ["file", "adapter", "label", "score"]
    assert [(r["file"], r["adapter"]) for r in rows] == [(str(img), a) for img, a in routed]
    alone = {n: _alone(tmp, w, arts[n], [str(i) for i in images], tmp_path / n) for n in names}
    _same_as_alone(rows, alone)
    for r in rows:  # each label comes from its own adapter's class names (a mis-routed row fails here)
        assert r["label"] in HEADS[r["adapter"]][1]
    # the adapters disagree on these inputs, so equality above is not a coincidence of one model
    assert len({alone[n][str(images[0])]["score"] for n in names}) == 3


def test_route_all_and_paths_after_adapters(zoo_dir, tmp_path):
    tmp, w, arts, images = zoo_dir
    names = ["cars", "pets"]
    out = tmp_path / "all"
    # the paths written after --adapters (argparse hands them to the option) are inputs, not adapters
    assert main(["predict", "--route", "all", "--weights", str(w), "--out", str(out), "--batch-size", "3",
                 "--adapters", *[f"{n}={arts[n]}" for n in names], str(tmp / "photos")]) == 0
    rows = _rows(out / "predictions.csv")
    files = sorted(str(i) for i in images)
    assert [(r["file"], r["adapter"]) for r in rows] == [(f, n) for f in files for n in names]
    _same_as_alone(rows, {n: _alone(tmp, w, arts[n], files, tmp_path / n) for n in names})


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines  # one line, however long
    return lines[0]


def test_refusals_are_one_line(zoo_dir, tmp_path, capsys):
    _, w, arts, images = zoo_dir
    pets, cars = f"pets={arts['pets']}", f"cars={arts['cars']}"
    common = ["--weights", str(w), "--out", str(tmp_path / "o")]

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"file,adapter\n{images[0]},pets\n{images[1]},dogs\n")
    line = _error(capsys, ["predict", "--adapters", pets, cars, "--manifest", str(manifest), *common])
    assert "['dogs'] are not among --adapters; valid: pets, cars" in line

    manifest.write_text(f"path,adapter\n{images[0]},pets\n")
    assert "needs the columns file,adapter; its header is path,adapter" in \
        _error(capsys, ["predict", "--adapters", pets, "--manifest", str(manifest), *common])

    line = _error(capsys, ["predict", "--adapters", pets, cars, str(images[0]), *common])
    assert "--manifest FILE.csv (columns file,adapter) or --route all" in line

    # trained on other base weights: MultiAdapter's refusal reaches the command line whole
    other = _artifact(tmp_path, _base_file(tmp_path / "elsewhere", 9), "cars", 5)
    line = _error(capsys, ["predict", "--adapters", pets, f"cars={other}", "--route", "all", str(images[0]), *common])
    assert "error: adapter 'cars' was trained on other base weights" in line and "must share the same base" in line

    # another preprocessing record: the differing key is named
    pre = json.loads((arts["pets"] / "adapter.json").read_text())["preprocessing"]
    shifted = _artifact(tmp_path, w, "birds", 6, preprocessing={**pre, "crop_pct": 1.0})
    line = _error(capsys, ["predict", "--adapters", pets, f"birds={shifted}", "--route", "all", str(images[0]),
                           *common])
    assert f"crop_pct is {pre['crop_pct']!r} vs 1.0" in line

    assert "the name 'pets' is given twice" in \
        _error(capsys, ["predict", "--adapters", pets, pets, "--route", "all", str(images[0]), *common])
    assert "--tasks: 'cars' is not among --adapters; valid: pets" in \
        _error(capsys, ["predict", "--adapters", pets, "--tasks", "cars=1", "--route", "all", str(images[0]), *common])
    assert "--tasks takes NAME=TASK_ID (an integer), got 'pets=first'" in \
        _error(capsys, ["predict", "--adapters", pets, "--tasks", "pets=first", "--route", "all", str(images[0]),
                        *common])
    assert not (tmp_path / "o" / "predictions.csv").exists()  # nothing written by a refused call


def test_preprocessing_check_is_key_by_key():
    from zoo.predict import PredictError, Predictor, check_shared_inputs

    def desc(name, kind="classification", **pre):
        return Predictor(name, kind, None, {"preprocessing": pre}, None)

    check_shared_inputs([desc("a", input_size=[3, 32, 32]), desc("b", input_size=[3, 32, 32])])
    with pytest.raises(PredictError, match=r"input_size is \[3, 32, 32\] vs \[3, 64, 64\]"):
        check_shared_inputs([desc("a", input_size=[3, 32, 32]), desc("b", input_size=[3, 64, 64])])
    with pytest.raises(PredictError, match=r"mean is absent vs \[0.5\]"):
        check_shared_inputs([desc("a"), desc("b", mean=[0.5])])
    with pytest.raises(PredictError, match="take different inputs"):
        check_shared_inputs([desc("a"), desc("b", kind="audio")])
    with pytest.raises(PredictError, match="segmentation masks one artifact at a time"):
        check_shared_inputs([desc("a", kind="segmentation"), desc("b", kind="segmentation")])


def test_tasks_of_a_multi_task_mhr_artifact(zoo_dir, tmp_path):
    """``--tasks NAME=ID``: one MHR artifact over three tasks served under two names, one task each; each row
    is that task's own prediction (``zoo.set_task`` on the artifact's own model, predict's code path)."""
    from zoo.predict import Predictor, read_adapter_config

    tmp, w, arts, images = zoo_dir
    torch.manual_seed(11)
    model = zoo.ImageClassifier(tiny_vit(weights=str(w), pretrained=None), 4)
    zoo.apply_adapter(model, "mhr", n_splits=2, n_skills=2, n_tasks=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    classes = ["a", "b", "c", "d"]
    art = zoo.save_adapter(model, tmp_path / "mhr", extra={"task": {"kind": "classification", "class_names": classes}})
    files = [str(i) for i in images]
    manifest = tmp_path / "m.csv"
    routed = [(f, ["t0", "t2", "pets"][i % 3]) for i, f in enumerate(files)]
    manifest.write_text("file,adapter\n" + "".join(f"{f},{a}\n" for f, a in routed))
    out = tmp_path / "out"
    assert main(["predict", "--adapters", f"t0={art}", f"t2={art}", f"pets={arts['pets']}", "--tasks", "t0=0",
                 "t2=2", "--manifest", str(manifest), "--weights", str(w), "--out", str(out)]) == 0
    rows = _rows(out / "predictions.csv")
    assert [(r["file"], r["adapter"]) for r in rows] == routed
    alone = {"pets": _alone(tmp, w, arts["pets"], files, tmp_path / "pets")}
    for name, task in (("t0", 0), ("t2", 2)):
        own = zoo.from_zoo(str(art), weights=w)
        zoo.set_task(own, task)
        pred = Predictor(name, "classification", own, read_adapter_config(art), classes)
        alone[name] = {r.file: {"label": r.label, "score": f"{r.score:.6f}"} for r in pred.predict(files)}
    assert any(alone["t0"][f]["score"] != alone["t2"][f]["score"] for f in files)  # the task id matters
    _same_as_alone(rows, alone)
