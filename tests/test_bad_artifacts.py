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


def test_a_save_removes_the_temporaries_a_killed_save_left_and_only_those(tmp_path):
    """save_adapter writes through atomic_path; a save killed with SIGKILL left .adapter.json.*.tmp /
    .adapter.safetensors.*.tmp in the artifact folder for good. The next save into the folder removes
    those whose writer (pid@host in the name) is gone; a save at work now and other files stay."""
    import os
    import subprocess
    import sys

    from zoo.tempnames import host

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # a pid that is gone
    art = tmp_path / "art"
    art.mkdir()
    gone = [f".adapter.json.{p.pid}@{host()}~abcdefgh.tmp", f".adapter.safetensors.{p.pid}@{host()}~_1b2c3d4.tmp"]
    keep = [f".adapter.json.{os.getpid()}@{host()}~abcdefgh.tmp", f".notes.txt.{p.pid}@{host()}~abcdefgh.tmp", "x.tmp"]
    for n in gone + keep:
        (art / n).write_bytes(b"half")
    classifier_artifact(tmp_path)
    assert sorted(q.name for q in art.iterdir()) == sorted(["adapter.json", "adapter.safetensors", *keep])


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


# every optional key check_adapter_meta reads, at its path in the record, with what it must be
OPTIONAL_KEYS = [("backbone.weights_tag", "a string or null"), ("backbone.fingerprint", "a string or null"),
                 ("backbone.kwargs", "an object of build options"), ("preprocessing", "an object"),
                 ("preprocessing.fbank", "an object"), ("task", "an object"), ("task.kind", "a string"),
                 ("task.config", "an object"), ("task.data", "an object"), ("task.links", "an object"),
                 ("weights_sha256", "a sha256 hex string"), ("metrics", "an object"),
                 ("tensors", "an object {name: shape}"), ("base_weights", "an object {path, config}"),
                 ("base_weights.path", "a path (string)")]


def test_each_optional_key_of_adapter_json_is_named_at_its_path(tmp_path):
    """Each wrong-typed optional key is refused under its own dotted path (a nested key named under another
    object's path, or the top-level one under a nested path, would send the reader to the wrong place)."""
    import copy

    from zoo.checkpoint import check_adapter_meta

    good = json.loads((classifier_artifact(tmp_path) / "adapter.json").read_text())
    good.setdefault("preprocessing", {})
    good["base_weights"] = {}
    check_adapter_meta(good, "a.json")  # the record as saved passes
    for path, want in OPTIONAL_KEYS:
        meta = copy.deepcopy(good)
        *parents, key = path.split(".")
        d = meta
        for p in parents:
            d = d[p]
        d[key] = [True]  # a list: the wrong type for every one of them
        with pytest.raises(AdapterMismatchError) as e:
            check_adapter_meta(meta, "a.json")
        assert str(e.value).startswith(f"a.json: {path} must be {want}, got [True] (the artifact is corrupt"), path


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


# ---------------------------------------------------------------------------- found by the re-probe
@pytest.mark.parametrize("edit, match", [
    (lambda m: m["methods"][0].update(name="nope"), r"methods\[0\]: unknown adapter 'nope'; valid adapters: "),
    (lambda m: m["methods"][0]["config"].update(bogus=1), r"methods\[0\]: adapter 'lora' got unknown option\(s\) \['bogus'\]"),
    (lambda m: m["methods"][0]["config"].update(rank=0), r"methods\[0\]: adapter 'lora': rank must be"),
    (lambda m: m["backbone"].update(family="nope"), r"backbone: unknown backbone 'nope'; valid backbones: "),
    (lambda m: m["head"].update(type="nope"), r"head: unknown head type 'nope'; valid head types: "),
    (lambda m: m["head"].pop("num_classes"), r"head: the record .* has no key 'num_classes'"),
])
@pytest.mark.parametrize("loader", ["from_zoo", "MultiAdapter.from_artifacts"])
def test_what_the_record_names_is_built_with_one_line_naming_file_and_key(tmp_path, edit, match, loader):
    """An unknown method / backbone / head or a bad option used to be a KeyError or TypeError (a stack trace
    from python -m zoo predict, which reports ValueErrors)."""
    art = classifier_artifact(tmp_path)
    edit_meta(art, edit)
    with pytest.raises(AdapterMismatchError, match=rf"{art / 'adapter.json'}: {match}"):
        _loaders()[loader](art)


def test_the_command_line_reports_a_bad_record_in_one_line(tmp_path, capsys):
    from zoo.__main__ import main

    art = edit_meta_and_return(classifier_artifact(tmp_path), lambda m: m["methods"][0]["config"].update(bogus=1))
    img_file = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img_file)
    assert main(["predict", str(art), str(img_file), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "methods[0]" in err and "bogus" in err


def test_the_command_line_reports_an_unusable_weights_file_in_one_line(tmp_path, capsys):
    from zoo.__main__ import main

    art = classifier_artifact(tmp_path)
    junk = tmp_path / "base.pt"
    junk.write_text("not weights")
    img_file = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img_file)
    assert main(["predict", str(art), str(img_file), "--weights", str(junk), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and str(junk) in err  # was a WeightsUnavailableError trace


def edit_meta_and_return(art: Path, fn) -> Path:
    edit_meta(art, fn)
    return art


@pytest.mark.parametrize("batch_size", [0, -3])
@pytest.mark.parametrize("many", [False, True])
def test_predict_refuses_a_batch_size_below_one(tmp_path, batch_size, many):
    """0 was 'range() arg 3 must not be zero'; -3 wrote an empty predictions.csv and exited 0."""
    from zoo.predict import predict, predict_many

    art = classifier_artifact(tmp_path)
    img_file = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img_file)
    with pytest.raises(PredictError, match=r"--batch-size must be an integer >= 1"):
        if many:
            predict_many({"a": str(art)}, tmp_path / "o", paths=[img_file], route="all", batch_size=batch_size)
        else:
            predict(art, [img_file], tmp_path / "o", batch_size=batch_size)
    assert not (tmp_path / "o" / "predictions.csv").exists()


def test_predict_refuses_non_finite_outputs_instead_of_labelling_them(tmp_path):
    """A NaN row used to become class 0 with score nan."""
    from zoo.predict import load_predictor

    art = classifier_artifact(tmp_path)
    pred = load_predictor(art)
    pred.model.forward = lambda x: torch.full((x.shape[0], 3), float("nan"))
    img_file = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img_file)
    with pytest.raises(PredictError, match=r"x\.png: the model of .* gave non-finite outputs"):
        pred.predict([img_file])


def test_an_artifact_with_overflowing_values_is_refused(tmp_path):
    """1e30 is finite, but the first matrix product overflows: the model could only output NaN."""
    from zoo.checkpoint import _sha256

    art = classifier_artifact(tmp_path)
    state = load_file(str(art / "adapter.safetensors"))
    key = sorted(state)[0]
    state[key] = torch.full_like(state[key], 1e30)
    save_file(state, str(art / "adapter.safetensors"))
    edit_meta(art, lambda m: m.update(weights_sha256=_sha256(art / "adapter.safetensors")))
    with pytest.raises(ValueError, match=rf"adapter\.safetensors: 1 tensor\(s\) hold values beyond ±1e\+15, e\.g\. \['{key}'\]"):
        zoo.from_zoo(str(art))


@pytest.mark.parametrize("content, match", [("{broken", "not valid JSON"), ("[1, 2]", "expected a JSON object")])
def test_publish_names_a_malformed_metrics_json(isolated, tmp_path, content, match):  # noqa: F811
    art = classifier_artifact(tmp_path, "run/adapter")
    (art.parent / "metrics.json").write_text(content)
    with pytest.raises(hub.RegistryError, match=rf"{art.parent / 'metrics.json'}: {match}"):
        hub.publish_run(art.parent, "x", registry=None, out_dir=tmp_path / "out")


@pytest.mark.parametrize("content, match", [("{broken registry", "not valid JSON"),
                                            ('{"format": 1, "entries": []}', "'entries' must be an object")])
def test_publish_names_a_broken_registry_file_and_leaves_it(isolated, tmp_path, content, match):  # noqa: F811
    art = classifier_artifact(tmp_path, "run/adapter")
    reg = tmp_path / "reg.json"
    reg.write_text(content)
    with pytest.raises(hub.RegistryError, match=rf"{reg}: .*{match}"):
        hub.publish_run(art.parent, "x", registry=reg, out_dir=tmp_path / "out")
    assert reg.read_text() == content


def test_publish_copies_no_base_file_it_has_not_checked(isolated, tmp_path):  # noqa: F811
    """A run's recorded base_weights.path used to be copied into the (served) publish folder before it was
    read as weights: /etc/passwd landed in out/base/. Now the file is checked first, its fingerprint too."""
    from zoo.backbones import WeightsUnavailableError

    junk = tmp_path / "private" / "notes.txt"
    junk.parent.mkdir()
    junk.write_text("private")
    torch.manual_seed(7)
    other = tiny_vit()
    other_file = tmp_path / "private" / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(other_file))
    for base, err, match in ((junk, WeightsUnavailableError, "notes.txt"),
                             (other_file, ValueError, "are not the base weights the adapter was trained on")):
        art = classifier_artifact(tmp_path, f"run_{base.stem}/adapter",
                                  base_weights={"path": str(base), "config": "vit_local"})
        edit_meta(art, lambda m: m["backbone"].update(weights_tag=f"file:{base.name}"))
        out = tmp_path / f"out_{base.stem}"
        with pytest.raises(err, match=match):
            hub.publish_run(art.parent, "x", registry=None, out_dir=out)
        assert not (out / "base").exists() or not any((out / "base").iterdir())


def test_a_network_registry_cannot_name_files_on_this_machine(isolated, tmp_path):  # noqa: F811
    import hashlib

    from zoo.hub.registry import Entry

    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"s3cret")
    sha = hashlib.sha256(b"s3cret").hexdigest()
    for source in ({"path": str(secret)}, {"url": secret.as_uri()}):
        files = [{"name": n, "sha256": sha, "size": 6, "sources": [source]} for n in ("adapter.json", "adapter.safetensors")]
        e = Entry.from_dict("leak", {"kind": "adapter", "backbone": {"family": "vit", "model": "m"}, "files": files},
                            origin="https://example.org/registry.json")
        with pytest.raises(hub.RegistryError, match=r"is a file on this machine; a registry read over the network"):
            hub.download(e)
        assert not any((hub.cache_dir() / "entries").rglob("adapter.json"))


def test_a_failed_fetch_is_one_line(isolated, tmp_path):  # noqa: F811
    from zoo.hub.registry import Entry

    files = [{"name": n, "sha256": "0" * 64, "size": 1, "sources": [{"path": str(tmp_path / "a")}, {"path": str(tmp_path / "b")}]}
             for n in ("adapter.json", "adapter.safetensors")]
    e = Entry.from_dict("gone", {"kind": "adapter", "backbone": {"family": "vit", "model": "m"}, "files": files},
                        origin=str(tmp_path / "reg.json"))
    with pytest.raises(hub.DownloadError) as info:
        hub.download(e)
    assert "\n" not in str(info.value) and str(tmp_path / "a") in str(info.value) and str(tmp_path / "b") in str(info.value)


@pytest.mark.parametrize("key, value", [("lora_alpha", "big"), ("lora_dropout", 2), ("r", 0), ("use_rslora", "yes"),
                                        ("alpha_pattern", {"x": -1})])
@pytest.mark.parametrize("with_meta", [True, False])
def test_load_peft_checks_the_numbers_of_adapter_config(tmp_path, key, value, with_meta):
    """With zoo_export.json a malformed lora_alpha was ignored without a word; without it, a TypeError."""
    out, _ = peft_export(tmp_path)
    if not with_meta:
        (out / "zoo_export.json").unlink()
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg[key] = value
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=rf"adapter_config\.json: {key} must (be|map)"):
        load_peft(fresh(), out)


def _folder(root: Path, classes, n=3, start=0) -> Path:
    for c in classes:
        for i in range(start, start + n):
            d = root / c
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), (10 * i + sum(map(ord, c))) % 256, np.uint8)).save(d / f"{c}{i}.png")
    return root


@pytest.mark.parametrize("layout", ["flat", "train"])
def test_an_image_folder_with_one_class_is_refused(tmp_path, layout):
    from tasks.data.imagefolder_scan import read_imagefolder

    root = _folder(tmp_path / "data" / ("train" if layout == "train" else ""), ["cat"]).parent if layout == "train" \
        else _folder(tmp_path / "data", ["cat"])
    with pytest.raises(ValueError, match=r": 1 class \(cat\); a classifier needs at least two classes"):
        read_imagefolder(tmp_path / "data")
    assert root


def test_an_image_folder_with_the_same_image_in_train_and_val_is_refused(tmp_path):
    from tasks.data.imagefolder_scan import read_imagefolder
    from zoo.reading import DataFileError

    _folder(tmp_path / "data" / "train", ["cat", "dog"])
    _folder(tmp_path / "data" / "val", ["cat", "dog"], n=1, start=5)
    read_imagefolder(tmp_path / "data")  # distinct images: fine
    shutil.copy(tmp_path / "data" / "train" / "dog" / "dog2.png", tmp_path / "data" / "val" / "dog" / "copy.png")
    with pytest.raises(DataFileError, match=r"1 val file\(s\) are byte-identical to train files \(e\.g\. .*copy\.png = .*dog2\.png\)"):
        read_imagefolder(tmp_path / "data")


@pytest.mark.parametrize("fmt", ["peft", "merged"])
def test_an_export_that_fails_mid_write_leaves_the_previous_files_whole(tmp_path, monkeypatch, fmt):
    """Exports wrote their files in place: a full disk mid-write left a truncated file. Now every file goes
    through zoo.io.atomic_path."""
    import errno

    from zoo.export import export_merged

    _, model = peft_export(tmp_path / "first")
    export = export_peft if fmt == "peft" else export_merged
    out = export(model.eval(), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = Path.write_bytes

    def half_then_full(self, data):
        real(self, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        export(model, out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing truncated, no temp file left
