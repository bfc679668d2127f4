"""Bad artifacts on every path that reads one (issue 24's re-probe of the artifact side): ``load_peft``,
``from_zoo``, ``MultiAdapter.from_artifacts``, ``python -m zoo predict``, the schema of ``adapter.json``
and where base weights may be read from. Each case is one clear line naming the file (and the key), never a
stack trace, a silent wrong result or a read of a path an artifact chose. docs/what-happens-when.md lists them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import zoo
from zoo import hub
from zoo.checkpoint import AdapterMismatchError
from zoo.export import ExportError, export_peft, load_peft
from zoo.predict import PredictError

from .conftest import tiny_vit
from .test_bad_inputs import isolated  # noqa: F401 (fixture)

SEED = 0


def classifier_artifact(tmp_path: Path, name: str = "art", seed: int = SEED, **extra) -> Path:
    """A tiny ViT LoRA classifier saved as a run saves it (task kind, class names, the seed that rebuilds
    its randomly initialised base)."""
    torch.manual_seed(seed)
    model = zoo.ImageClassifier(tiny_vit(), 3)
    zoo.apply_adapter(model, "lora", rank=2)
    with torch.no_grad():
        for p in zoo.adapters_of(model)[0].adapter_parameters():
            p.normal_(0, 0.1)
    record = {"seed": seed, "task": {"kind": "classification", "class_names": ["a", "b", "c"]}, **extra}
    return zoo.save_adapter(model, tmp_path / name, extra=record)


def edit_meta(art: Path, edit) -> None:
    meta = json.loads((art / "adapter.json").read_text())
    edit(meta)
    (art / "adapter.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------------------- load_peft
def peft_export(tmp_path: Path, head_cls=zoo.ImageClassifier) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(1)
    model = head_cls(tiny_vit(), 3)
    zoo.apply_adapter(model, "lora", rank=2, targets=["q", "v"])
    with torch.no_grad():
        for p in zoo.adapters_of(model)[0].adapter_parameters():
            p.normal_(0, 0.1)
    return export_peft(model.eval(), tmp_path / "peft"), model


def fresh(head_cls=zoo.ImageClassifier) -> torch.nn.Module:
    torch.manual_seed(1)
    return head_cls(tiny_vit(), 3)


class OtherHead(zoo.ImageClassifier):
    """A head timm's ViT has no module for: export_peft writes it to zoo_head.safetensors."""


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe\x00binary", b""])
@pytest.mark.parametrize("file", ["adapter_config.json", "zoo_export.json"])
def test_load_peft_on_a_malformed_json_file_names_it(tmp_path, file, content):
    out, _ = peft_export(tmp_path)
    (out / file).write_bytes(content)
    model = fresh()
    with pytest.raises(ExportError, match=rf"{file}: (not valid JSON|expected a JSON object)"):
        load_peft(model, out)
    assert not zoo.adapters_of(model)


@pytest.mark.parametrize("load_as, match", [
    ({"name": "full", "config": {}}, "load_as must be"),  # would make every base weight trainable
    ({"name": "lora", "config": "rank=2"}, "load_as must be"),
    ({"name": "lora", "config": {}, "extra": 1}, "load_as must be"),
    ({"name": "eva", "config": {"rank": 2}}, r"load_as names 'eva' but the recorded methods are \['lora'\]"),
    ({"name": "lora", "config": {"rank": 2, "init": {"_target_": "os.system"}}}, "refusing the key 'load_as.config.init._target_'"),
    ({"name": "lora", "config": {"rank": "${oc.env:HOME}"}}, "interpolations are not resolved"),
])
def test_load_peft_checks_the_recorded_load_as(tmp_path, load_as, match):
    out, _ = peft_export(tmp_path)
    meta = json.loads((out / "zoo_export.json").read_text())
    meta["load_as"] = load_as
    (out / "zoo_export.json").write_text(json.dumps(meta))
    model = fresh()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ExportError, match=match):
        load_peft(model, out)
    assert not zoo.adapters_of(model) and [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("file, change, match", [
    ("adapter_model.safetensors", lambda t: t.mul_(float("nan")), "contain NaN or inf"),
    ("adapter_model.safetensors", lambda t: t.to(torch.int32), "not floating point"),
    ("adapter_model.safetensors", lambda t: t.double(), "wider than the model's torch.float32"),
    ("zoo_head.safetensors", lambda t: t.mul_(float("inf")), "contain NaN or inf"),
    ("zoo_head.safetensors", lambda t: t.to(torch.int64), "not floating point"),
    ("zoo_head.safetensors", lambda t: t.double(), "wider than the model's torch.float32"),
])
def test_load_peft_refuses_non_finite_integer_and_wider_tensors(tmp_path, file, change, match):
    out, _ = peft_export(tmp_path, OtherHead)
    state = load_file(str(out / file))
    key = sorted(state)[0]
    state[key] = change(state[key].clone())
    save_file(state, str(out / file))
    model = fresh(OtherHead)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ExportError, match=rf"{file}: .*{match}"):
        load_peft(model, out)
    assert not zoo.adapters_of(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_peft_accepts_half_precision_factors_exactly(tmp_path):
    """peft often saves fp16 / bf16: they widen to fp32 exactly, so they load (the refusal is for narrowing)."""
    out, _ = peft_export(tmp_path, OtherHead)
    for f in ("adapter_model.safetensors", "zoo_head.safetensors"):
        state = {k: v.to(torch.bfloat16) for k, v in load_file(str(out / f)).items()}
        save_file(state, str(out / f))
    model = load_peft(fresh(OtherHead), out)
    a = zoo.adapters_of(model)[0].modules[0].lora_A
    want = load_file(str(out / "adapter_model.safetensors"))
    key = next(k for k in want if k.endswith("lora_A.weight"))
    assert a.dtype == torch.float32 and torch.equal(a.detach()[:2], want[key][:2].float())


# ---------------------------------------------------------------------------- one image reader
def test_predict_reads_16_bit_images_at_their_depth(tmp_path):
    """A 16-bit PNG used to be clipped to white by PIL's convert('RGB'); predict reads it as training does."""
    from zoo.predict import load_predictor
    from zoo.reading import read_rgb_pil

    art = classifier_artifact(tmp_path)
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    Image.fromarray((ramp >> 8).astype(np.uint8), mode="L").convert("RGB").save(tmp_path / "flat.png")
    load = load_predictor(art, build=False).loader()
    deep, flat = load(str(tmp_path / "deep.png")), load(str(tmp_path / "flat.png"))
    assert (deep - flat).abs().max() <= 2 / 255 / 0.5 + 1e-6  # rounding of 65535 vs 255 steps, after normalising
    assert deep.std() > 0.3  # not one white plane
    # and it is the reader training uses
    assert np.array_equal(np.asarray(read_rgb_pil(tmp_path / "deep.png")), np.asarray(read_rgb_pil(tmp_path / "deep.png")))


def test_imagefolder_reads_16_bit_images_at_their_depth(tmp_path):
    from tasks.data.imagefolder import load_image

    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 256).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    img = np.asarray(load_image(tmp_path / "deep.png", lambda im: im))
    assert img.min() == 0 and img.max() >= 254 and len(np.unique(img)) > 200  # a ramp, not white


def test_the_image_reader_lives_in_zoo_and_tasks_use_it():
    import tasks.data.imagefolder as imagefolder
    import tasks.data.vtab as vtab
    import zoo.reading

    assert vtab.read_rgb_pil is zoo.reading.read_rgb_pil and imagefolder.read_rgb_pil is zoo.reading.read_rgb_pil
    assert not (Path(__file__).resolve().parents[1] / "tasks" / "data" / "reading.py").exists()


@pytest.mark.parametrize("content", [b"\xff\xfe\x00\x01binary\x00", "file,adapter\nä.png,a\n".encode("latin-1")])
def test_a_binary_or_non_utf8_manifest_is_one_line(tmp_path, content):
    from zoo.predict import read_manifest

    (tmp_path / "m.csv").write_bytes(content)
    with pytest.raises(PredictError, match=r"m\.csv: cannot read the manifest as a UTF-8 CSV"):
        read_manifest(tmp_path / "m.csv", ["a"], (".png",))


# ---------------------------------------------------------------------------- the adapter.json schema
SCHEMA_CASES = [
    (lambda m: m.pop("backbone"), r"backbone must be an object"),
    (lambda m: m["backbone"].pop("family"), r"backbone\.family must be a non-empty string"),
    (lambda m: m["backbone"].update(kwargs=[1]), r"backbone\.kwargs must be an object"),
    (lambda m: m.update(head=[]), r"head must be null or an object"),
    (lambda m: m["head"].update(num_classes=10 ** 12), r"head\.num_classes must be an integer in 1\.\.65536"),
    (lambda m: m["head"].update(num_classes="3"), r"head\.num_classes must be an integer"),
    (lambda m: m["preprocessing"].update(input_size=[3, 10 ** 7, 10 ** 7]), r"preprocessing\.input_size must be"),
    (lambda m: m["preprocessing"].update(std=[0, 0, 0]), r"preprocessing\.std must be a list of finite numbers > 0"),
    (lambda m: m.update(task="classification"), r"task must be an object"),
    (lambda m: m["task"].update(class_names="abc"), r"task\.class_names must be a list of strings"),
    (lambda m: m.update(seed="zero"), r"seed must be an integer"),
    (lambda m: m.update(weights_sha256=123), r"weights_sha256 must be a sha256 hex string"),
    (lambda m: m.update(tensors={"x": "big"}), r"tensors\['x'\] must be a shape"),
    (lambda m: m["methods"][0].update(config=[2]), r"methods\[0\]\.config must be an object of options"),
    (lambda m: m.update(format_version=99), r"format_version must be an integer <= 1"),
    (lambda m: m.update(base_weights={"path": 3}), r"base_weights\.path must be a path"),
    (lambda m: m["backbone"]["kwargs"].update(img_size={"_target_": "os.getcwd"}),
     r"refusing the key 'backbone\.kwargs\.img_size\._target_'"),
    (lambda m: m["methods"][0]["config"].update(targets="${oc.env:HOME}"), r"refusing methods\[0\]\.config\.targets=.*interpolations are not resolved"),
    (lambda m: m["task"].update(config={"_target_": 7}), r"task\.config\._target_=7 is not one of"),
]


def _loaders():
    from zoo.multi_adapter import MultiAdapter
    from zoo.predict import load_predictor

    return {"from_zoo": lambda a: zoo.from_zoo(str(a)),
            "MultiAdapter.from_artifacts": lambda a: MultiAdapter.from_artifacts({"x": str(a)}),
            "predict": lambda a: load_predictor(a),
            "load_adapter": lambda a: zoo.load_adapter(zoo.ImageClassifier(tiny_vit(), 3), a)}


@pytest.mark.parametrize("edit, match", SCHEMA_CASES)
@pytest.mark.parametrize("loader", sorted(_loaders()))
def test_every_loader_checks_the_schema_of_adapter_json(tmp_path, edit, match, loader):
    """from_zoo, MultiAdapter and predict used to index meta[...] directly (a KeyError / TypeError trace,
    or a huge allocation from a head of 10**12 classes); every path now reads through one schema check."""
    art = classifier_artifact(tmp_path)
    edit_meta(art, edit)
    with pytest.raises(AdapterMismatchError, match=rf"{art / 'adapter.json'}: {match}"):
        _loaders()[loader](art)


def test_the_schema_accepts_what_save_adapter_writes(tmp_path):
    from zoo.checkpoint import read_adapter_config

    art = classifier_artifact(tmp_path)
    assert read_adapter_config(art)["task"]["class_names"] == ["a", "b", "c"]
    model = zoo.from_zoo(str(art))
    assert model.head_spec()["num_classes"] == 3


# ---------------------------------------------------------------------------- recorded base-weight paths
def test_a_downloaded_artifacts_base_weights_path_is_never_read(isolated, tmp_path, monkeypatch):  # noqa: F811
    """``base_weights.path`` is where a *local* run read its base: honoured for a run folder, never for an
    artifact in the download cache (a zoo entry must not make the loader read a path of this machine)."""
    secret = tmp_path / "elsewhere" / "secret.safetensors"
    secret.parent.mkdir()
    secret.write_bytes(b"not yours")
    art = classifier_artifact(tmp_path, "run/adapter", base_weights={"path": str(secret), "config": "vit_local"})
    edit_meta(art, lambda m: m["backbone"].update(weights_tag="file:secret.safetensors"))
    from zoo.checkpoint import _sha256

    seen = []

    def spy(*a, **kw):
        seen.append(kw.get("weights"))
        raise RuntimeError("stop")

    monkeypatch.setattr(zoo, "create_backbone", spy)
    with pytest.raises(RuntimeError, match="stop"):  # a local run folder: the recorded file is used
        zoo.from_zoo(str(art))
    assert seen == [str(secret)]

    cached = hub.cache_dir() / "entries" / "someone-else" / "0123456789abcdef"
    shutil.copytree(art, cached)
    assert _sha256(cached / "adapter.safetensors")
    seen.clear()
    for load in (lambda: zoo.from_zoo(str(cached)), lambda: zoo.MultiAdapter.from_artifacts({"x": str(cached)})):
        with pytest.raises(hub.EntryNotFoundError, match="a downloaded artifact's recorded path is not read"):
            load()
    assert seen == []
    from zoo.hub.load import recorded_weights

    assert recorded_weights({"path": str(secret)}, cached) is None
    assert recorded_weights({"path": str(secret)}, art) == secret
