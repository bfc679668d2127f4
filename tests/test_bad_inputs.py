"""Bad inputs and faults (issue 15): each case is one clear error or a safe outcome, never a silent
wrong result, a half-written file or a write outside the cache. The documentation's "What happens when…" page
(docs/what-happens-when.md) lists the same cases.
"""
from __future__ import annotations

import json
import re
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import zoo
from zoo import hub
from zoo.__main__ import main as cli
from zoo.checkpoint import AdapterMismatchError
from zoo.sites import SiteError

from .conftest import tiny_vit

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- helpers
@pytest.fixture()
def isolated(tmp_path, monkeypatch):
    """A private cache and no project registries."""
    monkeypatch.setenv(hub.ENV_HOME, str(tmp_path / "cache"))
    monkeypatch.delenv(hub.ENV_REGISTRY, raising=False)
    monkeypatch.delenv(hub.ENV_OFFLINE, raising=False)
    monkeypatch.setattr(hub.registry, "PROJECT_REGISTRY", tmp_path / "none" / "registry.json")
    monkeypatch.setattr(hub.registry, "LOCAL_REGISTRY", tmp_path / "none" / "local_registry.json")
    monkeypatch.setattr(hub.registry, "_EXTRA_REGISTRIES", [])
    return tmp_path


def lora_model(seed=0, **cfg):
    torch.manual_seed(seed)
    m = zoo.ImageClassifier(tiny_vit(), 3)
    zoo.apply_adapter(m, "lora", **{"rank": 2, **cfg})
    return m


def plain_model(seed=0):
    torch.manual_seed(seed)
    return zoo.ImageClassifier(tiny_vit(), 3)


def artifact(tmp_path, name="art", **cfg) -> Path:
    m = lora_model(**cfg)
    with torch.no_grad():
        for p in zoo.adapters_of(m)[0].adapter_parameters():
            p.normal_()
    return zoo.save_adapter(m, tmp_path / name)


def registry_with(tmp_path, entries: dict) -> Path:
    reg = tmp_path / "reg.json"
    reg.write_text(json.dumps({"format": 1, "entries": entries}))
    return reg


def published(tmp_path) -> tuple[Path, dict]:
    """A published tiny LoRA artifact with a local registry; returns (registry, entry)."""
    run = tmp_path / "run"
    art = artifact(tmp_path, "run/adapter")
    assert art == run / "adapter"
    reg = tmp_path / "zoo" / "registry.json"
    entry = hub.publish_run(run, "tiny-lora", registry=reg, out_dir=tmp_path / "zoo" / "tiny-lora")
    return reg, entry


def state_of(model: nn.Module):
    """Everything a failed load must leave unchanged: structure, flags, values, modes, adapters."""
    return ([(n, type(m).__name__, m.training) for n, m in model.named_modules()],
            {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()},
            [a.name for a in zoo.adapters_of(model)])


def same_state(a, b) -> bool:
    return (a[0] == b[0] and a[2] == b[2] and a[1].keys() == b[1].keys()
            and all(a[1][k][0] == b[1][k][0] and torch.equal(a[1][k][1], b[1][k][1]) for k in a[1]))


# ---------------------------------------------------------------------------- registry names
@pytest.mark.parametrize("bad", ["../../x", "/abs", "a/b", "..", ".hidden", "a\\b", ""])
def test_entry_with_a_path_name_skips_itself_not_its_registry(isolated, bad):
    reg, entry = published(isolated)
    data = json.loads(reg.read_text())
    data["entries"][bad] = data["entries"]["tiny-lora"]
    reg.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="plain name"):
        got = hub.load_registry(reg)
    assert list(got) == ["tiny-lora"]  # the good entry survives


def test_file_with_a_path_name_is_refused(isolated):
    reg, entry = published(isolated)
    data = json.loads(reg.read_text())
    data["entries"]["evil"] = {**entry, "files": [{**entry["files"][0], "name": "../../../escaped.safetensors"}]}
    reg.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="plain name"):
        assert list(hub.load_registry(reg)) == ["tiny-lora"]


def test_a_malicious_entry_name_never_writes_outside_the_cache(isolated):
    e = hub.Entry(name="../../outside", kind="adapter", backbone={"family": "vit", "model": "m"}, files=[])
    with pytest.raises(hub.RegistryError, match="plain name"):
        hub.entry_dir(e)
    assert not (isolated / "outside").exists()


# ---------------------------------------------------------------------------- cache integrity
def test_same_size_tampered_cached_file_is_detected_and_refetched(isolated, monkeypatch):
    reg, entry = published(isolated)
    hub.add_registry(reg)
    d = hub.download("tiny-lora")
    f = d / "adapter.safetensors"
    good = f.read_bytes()
    bad = bytearray(good)
    bad[-1] ^= 0xFF  # same size, different content
    f.write_bytes(bytes(bad))
    with pytest.warns(UserWarning, match="does not match its registry sha256"):
        assert not hub.is_cached("tiny-lora")
    hub.download("tiny-lora")
    assert f.read_bytes() == good


def test_warm_cache_does_not_rehash(isolated, monkeypatch):
    reg, _ = published(isolated)
    hub.add_registry(reg)
    hub.download("tiny-lora")
    calls = []
    real = hub.sha256_file
    monkeypatch.setattr(hub.fetch, "sha256_file", lambda p: calls.append(p) or real(p))
    assert hub.is_cached("tiny-lora") and hub.download("tiny-lora")
    assert calls == []  # size + mtime + inode stamp
    f = hub.entry_dir(hub.get_entry("tiny-lora")) / "adapter.json"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # touched: hash again
    assert hub.is_cached("tiny-lora") and len(calls) == 1


# ---------------------------------------------------------------------------- artifact writes
def test_failed_json_write_keeps_the_previous_artifact(tmp_path, monkeypatch):
    path = artifact(tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    import zoo.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.json, "dumps", boom)
    m = lora_model(seed=1)
    with pytest.raises(OSError, match="disk full"):
        zoo.save_adapter(m, path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # no temp files left either
    zoo.load_adapter(plain_model(), path)


def test_torn_pair_is_refused(tmp_path):
    a, b = artifact(tmp_path, "a"), artifact(tmp_path, "b", seed=1)
    (a / "adapter.safetensors").write_bytes((b / "adapter.safetensors").read_bytes())  # new weights, old json
    with pytest.raises(AdapterMismatchError, match="sha256 differs"):
        zoo.load_adapter(plain_model(), a)


def test_truncated_artifact_is_one_clear_error(tmp_path):
    a = artifact(tmp_path)
    w = a / "adapter.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    meta = json.loads((a / "adapter.json").read_text())
    meta.pop("weights_sha256")  # an older artifact without the hash: the read itself must fail clearly
    (a / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterMismatchError, match="cannot be read as safetensors"):
        zoo.load_adapter(plain_model(), a, allow_unhashed=True)


@pytest.mark.parametrize("methods", [[], None, [{"config": {}}]])
def test_empty_methods_in_adapter_json(tmp_path, methods):
    a = artifact(tmp_path)
    meta = json.loads((a / "adapter.json").read_text())
    meta["methods"] = methods
    (a / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterMismatchError, match="'methods' must be a non-empty list"):
        zoo.load_adapter(plain_model(), a)


# ---------------------------------------------------------------------------- non-finite tensors
def test_nan_artifact_is_refused_with_its_path(tmp_path):
    m = lora_model()
    with torch.no_grad():
        next(zoo.adapters_of(m)[0].adapter_parameters())[0, 0] = float("nan")
    a = zoo.save_adapter(m, tmp_path / "nan")
    model = plain_model()
    before = state_of(model)
    with pytest.raises(ValueError, match=r"nan/adapter\.safetensors: 1 tensor\(s\) contain NaN or inf"):
        zoo.load_adapter(model, a)
    assert same_state(before, state_of(model))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_inf_backbone_weights_are_refused_with_the_path(tmp_path, suffix):
    sd = {k: v.contiguous() for k, v in tiny_vit().model.state_dict().items()}
    sd[next(iter(sd))] = sd[next(iter(sd))].clone().fill_(float("inf"))
    f = tmp_path / f"w{suffix}"
    save_file(sd, str(f)) if suffix == ".safetensors" else torch.save(sd, f)
    with pytest.raises(zoo.WeightsUnavailableError, match=rf"w\{suffix}: 1 tensor\(s\) contain NaN or inf"):
        tiny_vit(weights=str(f))


# ---------------------------------------------------------------------------- load / apply leave the model intact
def test_failing_second_method_leaves_the_model_exactly_as_it_was(tmp_path):
    a = artifact(tmp_path)
    meta = json.loads((a / "adapter.json").read_text())
    meta["methods"].append({"name": "adapter", "config": {"bottleneck": 0}})  # the second one fails
    (a / "adapter.json").write_text(json.dumps(meta))
    model = plain_model()
    model.head.weight.requires_grad_(False)  # a user's own flag must survive
    before = state_of(model)
    with pytest.raises(ValueError, match="bottleneck must be an integer >= 1"):
        zoo.load_adapter(model, a)
    assert same_state(before, state_of(model))


def test_failed_attach_does_not_freeze_the_backbone():
    model = plain_model()
    before = state_of(model)
    with pytest.raises(SiteError):
        zoo.apply_adapter(model, "lora", targets=["mlp"])
    assert same_state(before, state_of(model))


def test_failed_tensor_load_into_attached_adapters_restores_flags(tmp_path):
    a = artifact(tmp_path)  # rank 2
    model = lora_model(rank=4)  # same method and backbone, other shapes
    before = state_of(model)
    with pytest.raises(AdapterMismatchError, match="shape"):
        zoo.load_adapter(model, a)
    assert same_state(before, state_of(model))


@pytest.mark.parametrize("how", ["apply", "load"])
def test_new_modules_follow_the_models_eval_mode(tmp_path, how):
    model = plain_model().eval()
    if how == "apply":
        zoo.apply_adapter(model, "lora", rank=2, dropout=0.5)
    else:
        zoo.load_adapter(model, artifact(tmp_path, dropout=0.5))
    assert not any(m.training for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model(x))  # no active dropout


def test_new_modules_follow_train_mode():
    model = plain_model().train()
    zoo.apply_adapter(model, "vpt", num_tokens=2, dropout=0.1)
    assert all(m.training for m in model.modules())


# ---------------------------------------------------------------------------- option validation
BAD_OPTIONS = [
    ("lora", dict(rank=2.7), "rank must be an integer"),
    ("lora", dict(rank=0), "rank must be an integer >= 1"),
    ("lora", dict(rank=True), "rank must be an integer"),
    ("lora", dict(rank="4"), "rank must be an integer"),
    ("lora", dict(rank=1000), r"exceeds min\(d_in, d_out\)"),
    ("lora", dict(rank=65, targets=["fc1"]), r"exceeds min\(d_in, d_out\) = min\(64, 256\) = 64"),
    ("lora", dict(dropout=1.0), "dropout must be a finite number in"),
    ("lora", dict(alpha=float("nan")), "alpha must be a finite number"),
    ("adapter", dict(bottleneck=0), "bottleneck must be an integer >= 1"),
    ("adapter", dict(bottleneck=-3), "bottleneck must be an integer >= 1"),
    ("adapter", dict(bottleneck=8.5), "bottleneck must be an integer"),
    ("adapter", dict(dropout=-0.1), "dropout"),
    ("vpt", dict(num_tokens=0), "num_tokens must be an integer >= 1"),
    ("vpt", dict(num_tokens=1.5), "num_tokens must be an integer"),
    ("vpt", dict(dropout=2), "dropout"),
    ("hydra", dict(par_rank=0), "par_rank must be an integer >= 1"),
    ("hydra", dict(seq_rank=1.5), "seq_rank must be an integer"),
    ("mosa", dict(bottleneck=0), "bottleneck must be an integer >= 1"),
    ("mosa", dict(experts=256), r"experts must be an integer in 1\.\.255"),
    ("mhr", dict(rank=0), "rank must be an integer >= 1"),
    ("mhr", dict(n_skills=2.5), "n_skills must be an integer"),
    ("onebit", dict(dim=0), "dim must be an integer >= 1"),
    ("q_adapter", dict(num_queries=0), "num_queries must be an integer >= 1"),
    ("q_adapter", dict(proj_dim=0.5), "proj_dim must be an integer"),
    ("salt", dict(r_lora=0), "r_lora must be an integer >= 1"),
    ("salt", dict(rank=2.5), "rank must be an integer"),
    ("comp_lora", dict(rank=1.5), "rank must be an integer"),
    ("comp_lora", dict(k=-1), "k must be an integer >= 0"),
    ("colora", dict(min_rank=0), "min_rank must be an integer >= 1"),
    ("colora", dict(ranks={"x": 1.5}), r"ranks\['x'\] must be an integer"),
]


@pytest.mark.parametrize("name,opts,match", BAD_OPTIONS, ids=[f"{n}-{list(o)[0]}={list(o.values())[0]}" for n, o, _ in BAD_OPTIONS])
def test_bad_size_options_are_one_clear_error(name, opts, match):
    model = plain_model()
    before = state_of(model)
    with pytest.raises(ValueError, match=match):
        zoo.apply_adapter(model, name, **opts)
    assert same_state(before, state_of(model))


def test_integral_float_options_are_accepted():
    model = plain_model()
    zoo.apply_adapter(model, "lora", rank=4.0)  # 4.0 from YAML arithmetic is a valid rank
    assert zoo.adapters_of(model)[0].rank == 4


# ---------------------------------------------------------------------------- slices for adapters without slice support
def test_adapter_without_slice_support_refuses_q_v():
    from zoo.adapters.base import Adapter, WrappedLayer

    class Scale(WrappedLayer):
        def __init__(self, base):
            super().__init__(base)
            self.s = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.base(x) * self.s

    class Toy(Adapter):
        name = "toy"

        def __init__(self, targets=("q", "v")):
            super().__init__()
            self.targets = list(targets)

        def attach(self, backbone):
            for s in self.sites(self.targets):
                self.replace(s, Scale(s.module))

    bb = tiny_vit()
    a = Toy.from_config()
    with pytest.raises(SiteError, match=r"\['q', 'v'\] are row slices .* target 'qkv'"):
        zoo.api.attach_adapter(a, bb)
    assert not any(isinstance(m, Scale) for m in bb.modules())
    zoo.api.attach_adapter(Toy.from_config(targets=["qkv"]), bb)  # whole layers work
    assert sum(isinstance(m, Scale) for m in bb.modules()) == 2


# ---------------------------------------------------------------------------- the command line
def test_list_json_stdout_is_valid_json_with_a_broken_registry(isolated, capsys, monkeypatch):
    reg, _ = published(isolated)
    broken = isolated / "broken.json"
    broken.write_text("{not json")
    data = json.loads(reg.read_text())
    data["entries"]["../evil"] = data["entries"]["tiny-lora"]
    reg.write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli(["--registry", str(reg), "--registry", str(broken), "list", "--json"]) == 0
    out, err = capsys.readouterr()
    assert list(json.loads(out)) == ["tiny-lora"]
    assert "broken.json" in err and "evil" in err


def test_publish_registers_in_the_local_zoo_by_default(isolated, capsys):
    artifact(isolated, "run/adapter")
    assert cli(["publish", str(isolated / "run"), "--name", "mine", "--out", str(isolated / "out")]) == 0
    capsys.readouterr()
    assert cli(["info", "mine"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "mine"
    assert cli(["publish", str(isolated / "run"), "--name", "other", "--out", str(isolated / "o2"), "--no-register"]) == 0
    capsys.readouterr()
    assert cli(["info", "other"]) == 2 and "no zoo entry 'other'" in capsys.readouterr().err


def test_from_zoo_missing_entry_names_the_known_ones(isolated):
    reg, _ = published(isolated)
    hub.add_registry(reg)
    with pytest.raises(hub.EntryNotFoundError, match="no zoo entry 'vit-demo-lora'; known entries: tiny-lora"):
        zoo.from_zoo("vit-demo-lora")


def test_notebook_backbone_kwargs_do_not_fall_back_silently(isolated, monkeypatch):
    import sys

    sys.path.insert(0, str(ROOT / "notebooks"))
    try:
        import nbkit
    finally:
        sys.path.remove(str(ROOT / "notebooks"))
    with pytest.raises(FileNotFoundError, match="no local zoo entry records its architecture"):
        nbkit.backbone_kwargs(isolated / "vit_demo.safetensors")


def test_results_notebook_reads_the_runs_folders():
    nb = json.loads((ROOT / "notebooks" / "03_results.ipynb").read_text())
    src = "".join("".join(c["source"]) for c in nb["cells"])
    assert '"logs" / "runs"' in src and '"logs" / "multiruns"' in src
    assert 'ROOT / "outputs"' not in src


def test_list_adapters_offers_descriptions():
    d = zoo.list_adapters(describe=True)
    assert list(d) == zoo.list_adapters()
    assert "Hu et al., LoRA" in d["lora"] and all(v.strip() for v in d.values())


# ---------------------------------------------------------------------------- configs as written in the README
@pytest.mark.parametrize("exp,suffix", [("multitask_tiny", "_mhr_multitask"), ("tiny", "_lora_dsprites_loc")])
def test_run_dir_resolves_without_an_explicit_hydra_run_dir(exp, suffix):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from tests.helpers import CONF
    from tasks.runner import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={exp}"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        assert OmegaConf.select(cfg, "hydra.run.dir").endswith(suffix)


# the README's and docs/'s command lines: tests/test_docs.py


# ---------------------------------------------------------------------------- the runner (after the task contract)
TINY = ["experiment=tiny", "adapter=lora"]


def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_saves_nothing(tmp_path, monkeypatch):
    from tasks.base import NonFiniteLossError
    from tasks.classification import ClassificationTask
    from tests.helpers import run_train

    real = ClassificationTask.loss_fn

    def diverging(self, logits, y):  # the loss becomes NaN in the second epoch
        loss = real(self, logits, y)
        return loss * float("nan") if self.current_epoch >= 1 else loss

    monkeypatch.setattr(ClassificationTask, "loss_fn", diverging)
    with pytest.raises(NonFiniteLossError, match=r"became nan at step 8 \(epoch 1.*learning rate") as e:
        run_train(TINY, tmp_path)
    run = tmp_path / "run"
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # epoch 0's, intact
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["state_dict"].values())
    from tasks.runner import user_errors

    with pytest.raises(SystemExit) as ex, user_errors():  # the command line: one error line, non-zero
        raise e.value
    assert str(ex.value.code).startswith("error: the training loss became nan")


def test_resume_with_another_adapter_config_is_refused_up_front(tmp_path):
    from tests.helpers import run_train

    stop = ["+callbacks.stop._target_=tests.helpers.StopAfterEpochs", "+callbacks.stop.epochs=1"]
    run_train(TINY + stop, tmp_path)
    with pytest.raises(ValueError, match=r"cannot resume from .*last\.ckpt.*\n  adapter\.rank: checkpoint 8, now 4"):
        run_train(TINY + ["adapter.rank=4", "ckpt_path=last"], tmp_path)


def test_resume_on_other_data_is_refused_but_another_batch_size_resumes(tmp_path):
    """The data config was not compared: another data root (or generated set, PDE file, split rule) resumed
    silently and mixed two trainings. Loading keys (batch size, workers, cache) may change."""
    from tests.helpers import run_train

    stop = ["+callbacks.stop._target_=tests.helpers.StopAfterEpochs", "+callbacks.stop.epochs=1"]
    data = [f"data.root={tmp_path / 'synthetic'}"]
    run_train(TINY + data + stop, tmp_path)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["zoo_data"]["root"] == str(tmp_path / "synthetic") and "batch_size" not in state["zoo_data"]
    with pytest.raises(ValueError, match=rf"cannot resume from .*last\.ckpt.*\n  data\.root: checkpoint "
                                         rf"'{re.escape(str(tmp_path / 'synthetic'))}', now '.*other'"):
        run_train(TINY + [f"data.root={tmp_path / 'other'}", "ckpt_path=last"], tmp_path)
    assert not (tmp_path / "other").exists()  # refused before the other data was generated or read
    run_train(TINY + data + ["data.batch_size=32", "ckpt_path=last"], tmp_path)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1  # 2nd epoch


def test_truncated_or_unsafe_checkpoint_is_one_clear_error(tmp_path, monkeypatch):
    from tasks.trainer.checkpoint_io import load_checkpoint

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (marker.write_text, ("ran",))

    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Evil()}, bad)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # explicit weights_only=True still wins
    with pytest.raises(ValueError, match="cannot be read as a weights-only checkpoint"):
        load_checkpoint(bad)
    assert not marker.exists()
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}}, good)
    trunc = tmp_path / "trunc.ckpt"
    trunc.write_bytes(good.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"trunc\.ckpt cannot be read"):
        load_checkpoint(trunc)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    from tasks.trainer.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    dest = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, dest)
    before = dest.read_bytes()

    def disk_full(obj, f, *a, **k):
        Path(f).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, dest)
    assert dest.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("content,match", [
    ("", "lists no images"),
    ("a.png 3\nb.png x\n", r"train800\.txt:2: the label 'x' is not an integer"),
    ("a.png 3\n\nb.png 16\n", r"train800\.txt:3: label 16 is out of range for 16 classes"),
    ("a.png -1\n", r"train800\.txt:1: label -1 is out of range"),
    ("just-a-path\n", r"train800\.txt:1: expected '<image path> <label>'"),
])
def test_bad_list_files_name_the_file_and_line(tmp_path, content, match):
    from tasks.data.vtab import read_list

    f = tmp_path / "train800.txt"
    f.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_list(f, 16)


def test_corrupt_or_missing_image_names_the_file(tmp_path):
    from tasks.data.vtab import FileListDataset, make_transform

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # truncated
    (tmp_path / "train800.txt").write_text("images/bad.png 0\nimages/gone.png 1\n")
    ds = FileListDataset(tmp_path, "train800", make_transform(32, None, None), num_classes=2)
    with pytest.raises(ValueError, match=r"images/bad\.png: cannot read this image"):
        ds[0]
    with pytest.raises(FileNotFoundError, match=r"images/gone\.png .* does not exist"):
        ds[1]


def test_head_smaller_than_the_labels_is_refused(tmp_path):
    from tests.helpers import run_train

    with pytest.raises(ValueError, match=r"task.num_classes=3, but the data \(dsprites_loc\) has 16 classes"):
        run_train(TINY + ["task.num_classes=3"], tmp_path)


def test_user_errors_do_not_hide_a_real_error():
    from hydra.errors import InstantiationException

    from tasks.runner import user_errors

    with pytest.raises(SystemExit, match="error: bad rank"), user_errors():
        try:
            raise ValueError("bad rank")
        except ValueError as e:
            raise InstantiationException("Error in call to target 'x'") from e  # a wrapper: look through
    with pytest.raises(RuntimeError, match="bug in the handler"), user_errors():
        try:
            raise ValueError("bad rank")
        except ValueError:
            raise RuntimeError("bug in the handler")  # raised while handling: must surface
    with pytest.raises(SystemExit) as e, user_errors():
        raise ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                         "  File x\nValueError: /d/a.png: cannot read this image")
    assert e.value.code == "error: /d/a.png: cannot read this image"


@pytest.mark.slow  # a subprocess (Hydra + torch start-up, ~40 s on 2 busy cores): `make test-slow`
def test_eval_leaves_no_run_folder_on_failure(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"artifact={tmp_path / 'nowhere'}"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("error: no adapter.json in")
    assert list(tmp_path.iterdir()) == []


def test_report_help_and_bad_paths(tmp_path, capsys):
    from tasks.report import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "RUNS_DIR" in capsys.readouterr().out
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "error: no such folder" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 1  # exists, but no finished run: not an empty table with exit 0
    assert "no metrics.json" in capsys.readouterr().err


def test_bench_vtab_bad_path_and_wide_table_to_file(tmp_path):
    import subprocess
    import sys

    from bench import vtab

    with pytest.raises(FileNotFoundError, match="does not exist"):
        vtab.main([str(tmp_path / "nowhere")])
    assert vtab._params(2304) == "2.3K" and vtab._params(512) == "512" and vtab._params(294912) == "294.9K"
    assert vtab._params(1_500_000) == "1.50M"
    out = tmp_path / "out"
    vtab.main(["--reference", str(tmp_path), "--out", str(out)])
    assert (out / "vtab.md").is_file() and "| method |" in (out / "vtab.md").read_text()


@pytest.mark.slow  # a subprocess (~30 s on 2 busy cores): `make test-slow`
def test_bench_vtab_command_line_bad_path(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "bench.vtab", str(tmp_path / "nowhere")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip() == f"error: runs dir {tmp_path / 'nowhere'} does not exist"


def test_artifact_records_the_models_own_input_size(tmp_path):
    """issue 15: a 32 px model recorded preprocessing.input_size=[3, 224, 224] (timm's pretrained config)."""
    path = artifact(tmp_path)
    assert zoo.read_adapter_config(path)["preprocessing"]["input_size"] == [3, 32, 32]


def test_no_network_fails_fast_with_the_weights_hint(monkeypatch):
    """issue 15: the default `python train.py` offline printed ~50 s of hub retries first. When the
    hub's host cannot be reached, the hub client runs offline (cache only, no retries)."""
    import socket
    import time

    import timm
    from huggingface_hub import constants

    from tasks.runner import user_errors
    from zoo.backbones import weights

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # (conftest sets it for the other tests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(weights, "_REACHABLE", {})

    def no_network(*a, **k):
        raise OSError("Temporary failure in name resolution")

    seen = []

    def create_model(name, pretrained=False, **kw):
        seen.append((pretrained, constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")))
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cache")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(timm, "create_model", create_model)
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e, user_errors():
        zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=True)
    assert time.perf_counter() - t0 < 5
    assert seen == [(True, True, "1")]  # the hub client ran in offline mode
    assert not constants.HF_HUB_OFFLINE and "HF_HUB_OFFLINE" not in os.environ  # and is restored
    msg = str(e.value.code)
    assert msg.startswith("error: could not download pretrained weights for timm model 'vit_tiny_patch16_224' "
                          "(the hub is unreachable (no network)") and "backbone.weights=" in msg


def test_quiet_logs(caplog):
    """No advertisement tip, no num_workers hint, no deprecation warning from Lightning internals."""
    import logging
    import warnings as w

    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from tasks.runner import quiet_logs

    quiet_logs()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        rank_zero_info("💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels](...)")
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)")
        rank_zero_info("a real message")
    assert [r.getMessage() for r in caplog.records] == ["a real message"]
    with w.catch_warnings(record=True) as got:
        w.simplefilter("always")
        quiet_logs()  # (catch_warnings restores the filters afterwards)
        w.warn("The 'val_dataloader' does not have many workers which may be a bottleneck.")
        w.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", DeprecationWarning)
        w.warn("something else")
    assert [str(x.message) for x in got] == ["something else"]


# ---------------------------------------------------------------------------- issue 24: security
def _evaluate(art: Path, *overrides: str) -> dict:
    from tests.test_task_contract import evaluate_artifact

    return evaluate_artifact(art, ["trainer.enable_progress_bar=false", *overrides])


def _record(art: Path, task_cfg: dict, data_cfg: dict) -> None:
    meta = json.loads((art / "adapter.json").read_text())
    meta["task"] = {"kind": "classification", "name": "vtab", "dataset": "dsprites_loc", "protocol": "tune",
                    "config": task_cfg, "data": data_cfg}
    (art / "adapter.json").write_text(json.dumps(meta))


VTAB_TASK = {"_target_": "tasks.classification.ClassificationTask", "name": "vtab", "dataset": "dsprites_loc",
             "protocol": "tune", "num_classes": 3}
VTAB_DATA = {"_target_": "tasks.data.vtab.VTABDataModule", "dataset": "dsprites_loc", "protocol": "tune",
             "root": "/nonexistent", "img_size": 32, "batch_size": 4, "normalize": "imagenet"}


@pytest.mark.parametrize("where", ["data", "task", "list"])
def test_eval_never_runs_a_nested_target_from_an_artifact(tmp_path, where):
    art = artifact(tmp_path)
    victim = tmp_path / "written-by-the-artifact"
    evil = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    task, data = dict(VTAB_TASK), dict(VTAB_DATA)
    key = {"data": "task.data.root._target_", "task": "task.config.optimizer._target_",
           "list": "task.data.extra[0]._target_"}[where]
    if where == "data":
        data["root"] = evil
    elif where == "task":
        task["optimizer"] = evil
    else:
        data["extra"] = [evil]
    _record(art, task, data)
    with pytest.raises(ValueError, match=rf"refusing the key '{re.escape(key)}'"):
        _evaluate(art)
    assert not victim.exists()


@pytest.mark.parametrize("group,target", [("config", "os.system"), ("data", "numpy.load"),
                                          ("config", "tasks.data.vtab.VTABDataModule")])
def test_eval_refuses_a_target_outside_the_allow_list(tmp_path, group, target):
    art = artifact(tmp_path)
    task, data = dict(VTAB_TASK), dict(VTAB_DATA)
    (task if group == "config" else data)["_target_"] = target
    _record(art, task, data)
    with pytest.raises(ValueError, match=rf"task\.{group}\._target_='{re.escape(target)}' is not one of the project's own"):
        _evaluate(art)


def test_eval_never_resolves_an_interpolation_from_an_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_SECRET", "s3cret")
    art = artifact(tmp_path)
    _record(art, VTAB_TASK, {**VTAB_DATA, "root": "${oc.env:ZOO_SECRET}"})
    with pytest.raises(ValueError, match=r"refusing task\.data\.root='\$\{oc\.env:ZOO_SECRET\}'"):
        _evaluate(art)
    meta = json.loads((art / "adapter.json").read_text())
    meta["backbone"]["kwargs"] = {"img_size": "${multiply:16,2}"}  # anywhere in the file
    (art / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"refusing backbone\.kwargs\.img_size="):
        _evaluate(art)


def test_the_allow_list_holds_every_task_and_data_class_of_the_configs():
    import yaml

    from tasks.recorded import DATA_TARGETS, TASK_TARGETS

    seen = set()
    for f in (ROOT / "conf" / "task").glob("*.yaml"):
        cfg = yaml.safe_load(f.read_text())
        for group, allowed in (("task", TASK_TARGETS), ("data", DATA_TARGETS)):
            target = (cfg.get(group) or {}).get("_target_")
            if target:
                assert target in allowed, (f.name, group, target)
                seen.add(target)
    src = (ROOT / "tasks" / "multitask.py").read_text()  # the multitask job's stages
    for t in re.findall(r'"_target_": "([\w.]+)"', src):
        assert t in TASK_TARGETS | DATA_TARGETS, t
    for t in TASK_TARGETS | DATA_TARGETS:  # every listed class exists
        from tasks.recorded import recorded_class

        assert callable(recorded_class({"_target_": t}, TASK_TARGETS | DATA_TARGETS, "x"))


def test_a_tampered_cached_file_with_its_mtime_put_back_is_detected(isolated):
    reg, _ = published(isolated)
    hub.add_registry(reg)
    d = hub.download("tiny-lora")
    f = d / "adapter.safetensors"
    st = f.stat()
    bad = bytearray(f.read_bytes())
    bad[-1] ^= 0xFF  # same size, same inode
    with open(f, "r+b") as fh:
        fh.write(bytes(bad))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_ino == st.st_ino
    with pytest.warns(UserWarning, match="does not match its registry sha256"):
        assert not hub.is_cached("tiny-lora")


def _rewrite(art: Path, state: dict | None = None, **meta_changes) -> None:
    """Edit an artifact as an attacker would: new tensors with a matching hash, changed json fields."""
    import hashlib

    meta = json.loads((art / "adapter.json").read_text())
    if state is not None:
        save_file(state, str(art / "adapter.safetensors"))
        meta["weights_sha256"] = hashlib.sha256((art / "adapter.safetensors").read_bytes()).hexdigest()
    for k, v in meta_changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    (art / "adapter.json").write_text(json.dumps(meta))


def test_an_artifact_without_its_weights_hash_is_refused_unless_allowed(tmp_path):
    from safetensors.torch import load_file

    a = artifact(tmp_path)
    state = load_file(str(a / "adapter.safetensors"))
    edited = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    _rewrite(a, edited, weights_sha256=None)  # edited weights, hash removed
    m = plain_model()
    before = state_of(m)
    with pytest.raises(AdapterMismatchError, match=r"adapter\.json records no weights_sha256.*allow_unhashed=True.*"
                                                   r"zoo\.save_adapter"):
        zoo.load_adapter(m, a)
    assert same_state(before, state_of(m))
    zoo.load_adapter(m, a, allow_unhashed=True)  # the explicit opt-in for an older artifact you trust
    zoo.save_adapter(m, tmp_path / "resaved")  # re-saving records the hash
    assert "weights_sha256" in json.loads((tmp_path / "resaved" / "adapter.json").read_text())
    zoo.load_adapter(plain_model(), tmp_path / "resaved")


@pytest.mark.parametrize("dtype", [torch.float16, torch.int32, torch.float64])
def test_artifact_tensors_of_another_dtype_are_refused(tmp_path, dtype):
    from safetensors.torch import load_file

    a = artifact(tmp_path)
    state = load_file(str(a / "adapter.safetensors"))
    key = next(k for k in sorted(state) if "lora_A" in k)
    _rewrite(a, {**state, key: state[key].to(dtype)})
    m = plain_model()
    before = state_of(m)
    with pytest.raises(AdapterMismatchError, match=rf"dtype: {re.escape(key)}: artifact {dtype}, model torch\.float32"):
        zoo.load_adapter(m, a)
    assert same_state(before, state_of(m))


def test_an_artifact_with_its_fingerprint_removed_is_refused(tmp_path):
    a = artifact(tmp_path)
    meta = json.loads((a / "adapter.json").read_text())
    del meta["backbone"]["fingerprint"]
    (a / "adapter.json").write_text(json.dumps(meta))
    other = plain_model(seed=5)  # other base weights
    with pytest.raises(AdapterMismatchError, match="records no base-weight fingerprint"):
        zoo.load_adapter(other, a)
    assert zoo.adapters_of(other) == []
    zoo.load_adapter(other, a, check_fingerprint=False)  # the explicit opt-out still works


def test_artifact_json_errors_name_the_file(tmp_path):
    a = artifact(tmp_path)
    (a / "adapter.json").write_text('{"methods": [')
    with pytest.raises(AdapterMismatchError, match=rf"{re.escape(str(a / 'adapter.json'))}: not valid JSON"):
        zoo.load_adapter(plain_model(), a)
    (a / "adapter.json").write_text('[1, 2]')
    with pytest.raises(AdapterMismatchError, match=rf"{re.escape(str(a / 'adapter.json'))}: expected a JSON object"):
        zoo.read_adapter_config(a)


def test_mhr_inventory_reads_artifacts_through_the_same_checks(tmp_path):
    from zoo.adapters.mhr import load_inventory

    a = artifact(tmp_path)
    w = a / "adapter.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(AdapterMismatchError, match="sha256 differs"):
        load_inventory(plain_model(), a)


# ---------------------------------------------------------------------------- list paths stay inside the data root
ESCAPES = ["../outside.png", "a/../../outside.png", "/etc/passwd", "..\\outside.png"]


@pytest.mark.parametrize("bad", ESCAPES)
def test_vtab_list_paths_leaving_the_data_root_are_refused(tmp_path, bad):
    from tasks.data.vtab import read_list

    f = tmp_path / "train800.txt"
    f.write_text(f"images/ok.png 0\n{bad} 1\n")
    with pytest.raises(ValueError, match=rf"train800\.txt:2: the path {re.escape(repr(bad))} leaves"):
        read_list(f, 3)
    f.write_text("images/ok.png 0\nsub/dir/b.png 1\n")  # plain relative paths still read
    assert [p for p, _ in read_list(f, 3)] == ["images/ok.png", "sub/dir/b.png"]


@pytest.mark.parametrize("bad", ESCAPES)
def test_fewshot_split_paths_leaving_the_data_root_are_refused(tmp_path, bad):
    from tasks.data.fewshot import read_split

    d = tmp_path / "oxford_pets"
    (d / "images").mkdir(parents=True)
    split = {s: [["a.jpg", 0, "cat"], ["b.jpg", 1, "dog"]] for s in ("train", "val", "test")}
    split["test"][1][0] = bad
    (d / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match=rf"split_zhou_OxfordPets\.json: test entry .*the path {re.escape(repr(bad))} leaves"):
        read_split(tmp_path, "oxford_pets")


@pytest.mark.parametrize("bad", ESCAPES)
def test_caption_ids_leaving_the_video_folder_are_refused(tmp_path, bad):
    import pickle

    import tasks.data.captioning as cd

    ids = ["v0", "v1", bad]
    for name in ("train", "val", "test"):
        (tmp_path / f"{name}_list.txt").write_text("\n".join(ids if name == "test" else ids[:2]) + "\n")
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({v: [["a", "cat"]] for v in ids}))
    with pytest.raises(ValueError, match=rf"test_list\.txt:3: the path {re.escape(repr(bad))} leaves"):
        cd.load_msvd(tmp_path, tmp_path / "videos")
    doc = {"videos": [{"video_id": v, "split": "train"} for v in ids], "sentences": [{"video_id": v, "caption": "c"} for v in ids]}
    (tmp_path / "msrvtt.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"msrvtt\.json: video_id: the path {re.escape(repr(bad))} leaves"):
        cd.load_msrvtt(tmp_path / "msrvtt.json", tmp_path / "videos")


# ---------------------------------------------------------------------------- issue 24: nothing lost
def test_segmentation_without_a_test_split_is_refused_before_training(tmp_path):
    from tasks.data.segmentation_generate import make_folder_dataset
    from tests.helpers import run_train

    root = make_folder_dataset(tmp_path / "data", n=6, size=64, num_classes=3)  # images/ + masks/ only
    assert sorted(p.name for p in root.iterdir()) == ["images", "masks"]
    ov = ["experiment=tiny_seg", "adapter=lora", f"data.root={root}", "task.max_epochs=1"]
    with pytest.raises(ValueError, match=r"has no test split.*test=false"):
        run_train(ov, tmp_path)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training
    m = run_train([*ov, "test=false"], tmp_path)  # the way out the message names: validation only
    assert m["monitor"]["value"] is not None and (tmp_path / "run" / "adapter" / "adapter.json").is_file()


class _Killed(BaseException):
    """kill -9 stand-in: nothing in the code under test may catch it."""


@pytest.mark.parametrize("kill_at", ["copy", "register"])
def test_a_killed_republish_leaves_the_registered_entry_loadable(isolated, monkeypatch, kill_at):
    from zoo.hub import publish as pub

    reg, first = published(isolated)
    out = isolated / "zoo" / "tiny-lora"
    m = lora_model()  # the new version: the same base, other adapter weights
    with torch.no_grad():
        for p in zoo.adapters_of(m)[0].adapter_parameters():
            p.fill_(0.5)
    zoo.save_adapter(m, isolated / "run2" / "adapter")
    real_copy, real_add = pub._atomic_copy, pub.add_entry

    def copy(src, dest):
        if kill_at == "copy" and dest.name == "adapter.json":  # the weights are already replaced
            raise _Killed
        real_copy(src, dest)

    def add(registry, name, entry):
        if kill_at == "register" and entry["files"][0]["sha256"] != first["files"][0]["sha256"]:
            raise _Killed  # the new files are written, the switch never happens
        return real_add(registry, name, entry)

    with monkeypatch.context() as mp, pytest.raises(_Killed):
        mp.setattr(pub, "_atomic_copy", copy)
        mp.setattr(pub, "add_entry", add)
        hub.publish_run(isolated / "run2", "tiny-lora", registry=reg, out_dir=out)
    assert hub.cache_dir() == isolated / "cache"
    hub.add_registry(reg)
    d = hub.download("tiny-lora")  # the registered (old) version still downloads and loads
    zoo.load_adapter(plain_model(), d)
    assert hub.get_entry("tiny-lora").files[0].sha256 == first["files"][0]["sha256"]
    new = hub.publish_run(isolated / "run2", "tiny-lora", registry=reg, out_dir=out)  # a complete re-publish
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter.json", "adapter.safetensors"]
    d = hub.download("tiny-lora")
    assert hub.get_entry("tiny-lora").files[0].sha256 == new["files"][0]["sha256"] != first["files"][0]["sha256"]
    zoo.load_adapter(plain_model(), d)


def test_publish_refuses_an_artifact_with_non_finite_tensors(isolated, capsys):
    m = lora_model()
    with torch.no_grad():
        next(zoo.adapters_of(m)[0].adapter_parameters())[0, 0] = float("nan")
    zoo.save_adapter(m, isolated / "run" / "adapter")
    reg = isolated / "reg.json"
    rc = cli(["publish", str(isolated / "run"), "--name", "diverged", "--out", str(isolated / "out"),
              "--registry-file", str(reg)])
    assert rc == 2 and "contain NaN or inf" in capsys.readouterr().err
    assert not reg.exists() and not (isolated / "out").exists()


def test_published_files_are_readable_by_others(isolated):
    reg, _ = published(isolated)
    umask = os.umask(0)
    os.umask(umask)
    for f in (isolated / "zoo" / "tiny-lora").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f  # as open() would create it, not mkstemp's 0600
    assert reg.stat().st_mode & 0o777 == 0o666 & ~umask
    art = artifact(isolated, "plain")
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in art.iterdir())


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_generation_folders_are_cleaned_on_the_next_run(tmp_path):
    import time

    from tasks.data import staging
    from tasks.data.restoration import generate

    host = staging._host()
    stale = [tmp_path / f".tmp_rain100l_{_dead_pid()}@{host}~abc", tmp_path / ".tmp_rain100l_k1ll3d",
             tmp_path / f".old_rain100l_{_dead_pid()}@{host}~x"]
    live = tmp_path / f".tmp_rain100l_{os.getpid()}@{host}~live"  # a generation running now
    young = tmp_path / ".tmp_rain100l_recent"  # an older name, but changed recently: maybe still running
    for d in (*stale, live, young):
        (d / "part").mkdir(parents=True)
    old = time.time() - staging.STALE_AFTER_S - 60
    os.utime(stale[1], (old, old))
    generate("derain", tmp_path, num_train=2, num_test=1, size=16)
    assert not any(d.exists() for d in stale)
    assert live.is_dir() and young.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["rain100l", live.name, young.name])


@pytest.mark.parametrize("writer", ["synthetic", "fewshot_shapes", "captioning", "audio"])
def test_every_generator_cleans_its_stale_folders(tmp_path, monkeypatch, writer):
    import importlib

    from tasks.data import staging

    calls = []
    real = staging.clean_stale
    monkeypatch.setattr(staging, "clean_stale", lambda parent, prefix: calls.append((Path(parent), prefix)) or real(parent, prefix))
    mod = importlib.import_module(f"tasks.data.{writer}")
    src = Path(mod.__file__).read_text()
    assert "mkdtemp" not in src and "staging_dir(" in src  # every temporary folder goes through staging_dir
    d = tmp_path / f".x-{_dead_pid()}@{staging._host()}~1"
    d.mkdir()
    assert staging.staging_dir(tmp_path, ".x-").name.startswith(f".x-{os.getpid()}@")
    assert calls == [(tmp_path, ".x-")] and not d.exists()


# ---------------------------------------------------------------------------- issue 24: one clear line
@pytest.mark.parametrize("code,why", [(28, "cannot write {}: no space left"), (122, "cannot write {}: disk quota"),
                                      (27, "cannot write {}: file too large"), (30, "cannot write {}: read-only file system"),
                                      (13, "cannot access {}: permission denied")])
def test_write_failures_of_the_environment_are_one_line_naming_the_path(tmp_path, code, why):
    from tasks.runner import user_errors

    with pytest.raises(SystemExit) as e, user_errors():
        raise OSError(code, os.strerror(code), str(tmp_path / "run" / "metrics.json"))
    assert e.value.code.startswith("error: " + why.format(tmp_path / "run" / "metrics.json"))
    with pytest.raises(OSError), user_errors():  # other OS errors (a bug, a broken device) keep their traceback
        raise OSError(5, "Input/output error", "x")


@pytest.mark.parametrize("script, args, key", [
    ("train.py", ["experiment=tiny_seg", "hydra.run.dir={f}/run"], "hydra.run.dir"),
    ("train.py", ["-m", "experiment=tiny_seg", "paths.log_dir={f}/logs"], "hydra.sweep.dir"),
    ("eval.py", ["artifact=x", "hydra.run.dir={f}/ev"], "hydra.run.dir"),
])
def test_an_unwritable_run_folder_is_one_line_before_hydra_writes(tmp_path, script, args, key):
    """It used to fail inside Hydra (its mkdir) with a traceback, before the project's code ran."""
    import subprocess
    import sys

    f = tmp_path / "a_file"
    f.write_text("")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / script), *(a.format(f=f) for a in args)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    line = p.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith(f"error: cannot write the run folder {f}/") and f"({key})" in line[0]
    assert line[0].endswith(f"{f} is a file, not a folder") and [q.name for q in tmp_path.iterdir()] == ["a_file"]


@pytest.mark.parametrize("code, why", [(30, "read-only file system"), (28, "no space left on the device"),
                                       (13, "permission denied")])
@pytest.mark.parametrize("fails", ["create", "write"])
def test_a_read_only_or_full_run_folder_is_refused_naming_it(tmp_path, monkeypatch, code, why, fails):
    """A read-only mount refuses the probe file's creation; a full disk may create it and refuse its bytes."""
    import tempfile

    from omegaconf import OmegaConf

    from tasks import run_folder

    def refuse(*a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile if fails == "create" else os, "mkstemp" if fails == "create" else "fsync", refuse)
    run = tmp_path / "logs" / "runs" / "r"
    cfg = OmegaConf.create({"hydra": {"run": {"dir": str(run)}, "output_subdir": ".hydra"}})
    with pytest.raises(SystemExit) as e:
        run_folder.CheckRunFolder().on_run_start(config=cfg)
    assert e.value.code == (f"error: cannot write the run folder {run} (hydra.run.dir): {why}; "
                            f"choose a writable place with hydra.run.dir=<folder>")
    assert list(tmp_path.iterdir()) == []  # nothing made, no probe file left
    # eval.py runs in an existing folder and writes nothing there (no .hydra/, logs to stdout): not refused
    cfg = OmegaConf.create({"hydra": {"run": {"dir": str(tmp_path)}, "output_subdir": None}})
    run_folder.CheckRunFolder().on_run_start(config=cfg)
    monkeypatch.undo()
    assert run_folder.writable_folder_error(run, "hydra.run.dir") is None and list(tmp_path.iterdir()) == []


def test_the_run_folder_check_imports_without_torch_and_shares_the_write_errors_table(tmp_path):
    """Hydra imports tasks.run_folder for every command (--help included): it must not pull torch, and its
    reasons are the table zoo.io reports with (it used to keep its own copy, lacking ENOTDIR)."""
    import subprocess
    import sys

    from tasks import run_folder
    from zoo import errnos, io

    probe = ("import sys, tasks.run_folder\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'lightning', 'zoo')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert out.strip() == "['zoo', 'zoo.errnos']"
    assert io.WRITE_ERRNOS is errnos.WRITE_ERRNOS and len(errnos.WRITE_ERRNOS) == 7
    for code, words in errnos.WRITE_ERRNOS.items():
        e = OSError(code, os.strerror(code))
        assert run_folder._describe(tmp_path, "k", e) == (f"cannot write the run folder {tmp_path} (k): {words}; "
                                                          f"choose a writable place with k=<folder>")
        assert io.describe_os_error(e).endswith(f": {words}; the files already there are left as they were")


def test_the_library_errors_are_one_line_once_their_modules_are_imported():
    """user_error_types looks them up where they are defined; it used to ask hasattr(zoo, "hub"), which on
    zoo's lazy __init__ imported zoo.hub and torch for a config error once anything had imported zoo."""
    import subprocess
    import sys

    from tasks.errors import user_errors
    from zoo.backbones.weights import WeightsUnavailableError
    from zoo.hub.registry import HubError

    for error in (WeightsUnavailableError("no weights for x"), HubError("no entry x")):
        with pytest.raises(SystemExit) as e, user_errors():
            raise error
        assert e.value.code == f"error: {error}"
    probe = ("import sys, zoo, zoo.errnos\nfrom tasks.errors import user_errors\ntry:\n    with user_errors():\n"
             "        raise ValueError('bad')\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert out.strip() == "error: bad False"


def test_a_write_error_without_a_file_name_gets_the_destination(tmp_path, monkeypatch):
    from zoo.io import atomic_write_text

    dest = tmp_path / "metrics.json"
    dest.write_text("old")

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")  # what f.write() raises: no file name

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as e:
        atomic_write_text(dest, "new")
    monkeypatch.undo()
    assert e.value.errno == 28 and e.value.filename == str(dest)
    assert dest.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_file_size_limit_is_one_line_naming_the_file(tmp_path):
    import subprocess
    import sys

    code = ("import resource, zoo.io\nfrom tasks.runner import user_errors\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
            f"with user_errors():\n    zoo.io.atomic_write_bytes({str(tmp_path / 'big.bin')!r}, b'x' * 100000)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: cannot write {tmp_path / 'big.bin'}: file too large "
                                                        f"(a file size limit such as `ulimit -f` is reached)")
    assert not any(tmp_path.iterdir())  # no partial file left


def test_a_read_only_cache_is_one_line_naming_it(isolated, monkeypatch, capsys):
    reg, _ = published(isolated)
    hub.add_registry(reg)
    cache = isolated / "cache"
    real = Path.mkdir

    def ro(self, *a, **k):
        if str(self).startswith(str(cache)):
            raise OSError(30, "Read-only file system", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", ro)
    assert cli(["download", "tiny-lora"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {cache}") and "read-only file system" in err[0]


def test_a_symlinked_registry_lock_is_refused(isolated, capsys):
    outside = isolated / "precious.txt"
    outside.write_text("keep")
    reg = isolated / "zoo" / "registry.json"
    reg.parent.mkdir()
    Path(str(reg) + ".lock").symlink_to(outside)
    artifact(isolated, "run/adapter")
    rc = cli(["publish", str(isolated / "run"), "--name", "x", "--out", str(isolated / "out"), "--registry-file", str(reg)])
    assert rc == 2 and "registry.json.lock is a symbolic link" in capsys.readouterr().err
    assert outside.read_text() == "keep" and not reg.exists()


# ---------------------------------------------------------------------------- issue 24: nothing silent
def test_a_nan_loss_in_segmentation_stops_the_run_before_anything_is_saved(tmp_path, monkeypatch):
    from tasks.base import NonFiniteLossError
    from tasks.segmentation import SegmentationTask
    from tests.helpers import run_train

    real = SegmentationTask.loss_fn

    def diverging(self, logits, y):  # what lr=1e12 does after a step or two
        loss = real(self, logits, y)
        return loss * float("nan") if self.global_step >= 1 else loss

    monkeypatch.setattr(SegmentationTask, "loss_fn", diverging)
    with pytest.raises(NonFiniteLossError, match=r"became nan at step 1 .*learning rate"):
        run_train(["experiment=tiny_seg", "adapter=lora", "task.max_epochs=1", "test=false"], tmp_path)
    run = tmp_path / "run"
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()


@pytest.mark.parametrize("overrides", [["experiment=tiny_seg", "adapter=lora"],
                                       ["experiment=tiny_audio", "adapter=lora"]])
def test_a_learning_rate_of_1e12_ends_with_the_non_finite_loss_line_and_saves_nothing(tmp_path, overrides):
    """A real divergence, not a loss forced to NaN: segmentation's own training_step and another kind."""
    from tasks.base import NonFiniteLossError
    from tasks.runner import user_errors
    from tests.helpers import run_train

    reg = tmp_path / "registry.json"
    with pytest.raises(NonFiniteLossError) as e:
        run_train([*overrides, "task.optimizer.lr=1e12", f"paths.data_dir={tmp_path / 'data'}", "publish=diverged",
                   f"publish_registry={reg}"], tmp_path)
    run = tmp_path / "run"
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists() and not reg.exists()
    with pytest.raises(SystemExit) as ex, user_errors():
        raise e.value
    assert re.fullmatch(r"error: the training loss became (nan|inf|-inf) at step \d+ \(epoch \d+\): most likely the "
                        r"learning rate is too high .*\(task\.optimizer\.lr=1000000000000\.0; try 10x lower\)\. "
                        r"Training stopped; .* nothing was saved or published", ex.value.code), ex.value.code
    if e.value.args[0].find("(epoch 0)") >= 0:  # no finished epoch: no checkpoint to speak of
        assert "no checkpoint was written" in ex.value.code and not (run / "checkpoints" / "last.ckpt").exists()


def test_every_task_kind_goes_through_the_one_finite_loss_check():
    from tasks.base import ZooTask, task_kinds

    # the check sits in ZooTask.on_before_backward, which Lightning calls for every loss a
    # training_step returns, however a task kind writes its training_step
    assert "isfinite" in __import__("inspect").getsource(ZooTask.on_before_backward)
    for name, cls in task_kinds().items():
        assert cls.on_before_backward is ZooTask.on_before_backward, name


@pytest.mark.parametrize("override,match", [("task.max_epochs=0", r"trainer\.max_epochs=0"),
                                            ("trainer.limit_train_batches=0", r"trainer\.limit_train_batches=0"),
                                            ("++trainer.max_steps=0", r"trainer\.max_steps=0")])
def test_a_run_that_would_take_no_training_step_is_refused(tmp_path, override, match):
    from tests.helpers import run_train

    with pytest.raises(ValueError, match=rf"{match}.*no optimisation step"):
        run_train([*TINY, override], tmp_path)
    run = tmp_path / "run"
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()


def test_an_empty_training_split_is_refused(tmp_path, monkeypatch):
    from tasks.data.vtab import VTABDataModule
    from tests.helpers import run_train

    real = VTABDataModule.setup

    def setup(self, stage=None):  # every training sample skipped (e.g. by a data filter)
        real(self, stage)
        if self.train_set is not None:
            self.train_set = torch.utils.data.Subset(self.train_set, [])

    monkeypatch.setattr(VTABDataModule, "setup", setup)
    with pytest.raises(ValueError, match=r"the training split gives no batch.*no optimisation step"):
        run_train(TINY, tmp_path)
    assert not (tmp_path / "run" / "adapter").exists()


def test_resume_with_another_dataset_or_backbone_is_refused_up_front(tmp_path):
    from tests.helpers import run_train

    stop = ["+callbacks.stop._target_=tests.helpers.StopAfterEpochs", "+callbacks.stop.epochs=1"]
    run_train(TINY + stop, tmp_path)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match=r"cannot resume .*\n  task\.dataset: checkpoint 'dsprites_loc', now 'dsprites_ori'"):
        run_train(TINY + ["task.dataset=dsprites_ori", "ckpt_path=last"], tmp_path)
    with pytest.raises(ValueError, match=r"cannot resume .*\n  backbone\.kwargs: checkpoint .*'depth': 2.*now .*'depth': 3"):
        run_train(TINY + ["backbone.kwargs.depth=3", "ckpt_path=last"], tmp_path)
    assert ckpt.read_bytes() == before  # refused before any training


def test_a_tasks_plain_copy_of_its_data_config_is_allowed_but_checked(tmp_path):
    from tasks.recorded import UnsafeArtifactError, check_artifact_config

    meta = {"task": {"config": {**VTAB_TASK, "data": dict(VTAB_DATA)}, "data": dict(VTAB_DATA)}}  # task=fewshot's data: ${data}
    check_artifact_config(meta, "a")
    meta["task"]["config"]["data"]["_target_"] = "os.system"
    with pytest.raises(UnsafeArtifactError, match=r"task\.config\.data\._target_='os\.system' is not one of"):
        check_artifact_config(meta, "a")


def test_eval_task_overrides_reach_the_data_keys_linked_to_them(tmp_path):
    from tasks.runner import _apply_overrides, task_links
    from tests.helpers import compose_config

    links = task_links(compose_config(["experiment=tiny_audio"]))
    assert links["root"] == "data_dir" and links["dataset"] == "dataset"  # data.root: ${task.data_dir}
    task, data = {"data_dir": "/recorded/esc50", "dataset": "esc50"}, {"root": "/recorded/esc50", "dataset": "esc50"}
    _apply_overrides(task, data, ["+task.data_dir=/missing"], links)
    assert task["data_dir"] == data["root"] == "/missing"  # not the recorded folder
    # an artifact written before the links were recorded: a data value equal to the task's is its link
    task, data = {"data_dir": "/recorded/esc50"}, {"root": "/recorded/esc50", "other": "x"}
    _apply_overrides(task, data, ["task.data_dir=/elsewhere"], None)
    assert data == {"root": "/elsewhere", "other": "x"}


def test_a_1d_pde_artifact_is_refused_on_a_2d_file_and_the_dataset_name_follows_the_data(tmp_path):
    from tasks.pde import PDEDataModule, PDEForecastTask

    opts = {"n": 4, "res": 16, "frames": 6}
    one_d = PDEDataModule(generate="burgers", root=str(tmp_path), generate_options=opts, rollout_horizon=2)
    one_d.check_recorded({})  # nothing recorded (an older artifact): nothing to compare
    one_d.prepare_data()
    one_d.setup("fit")
    rec = {"spatial": list(one_d.spatial), "fields": one_d.field_names}
    one_d.check_recorded(rec)  # its own data fits
    two_d = PDEDataModule(generate="diff_react_2d", root=str(tmp_path), generate_options=opts, rollout_horizon=2)
    with pytest.raises(ValueError, match=r"trained on 1-D data .* this data is 2-D"):
        two_d.check_recorded(rec)
    # eval.py data.path=<2-D file> on an artifact recorded with generate=burgers: not "burgers" any more
    task_cfg, data_cfg = {"dataset": "burgers"}, {"generate": "burgers", "path": str(two_d.resolve_paths()[0])}
    PDEForecastTask.eval_overrides(task_cfg, data_cfg, "test")
    assert task_cfg["dataset"] == "pdebench"
    task_cfg, data_cfg = {"dataset": "pdebench"}, {"generate": "advection", "path": None}
    PDEForecastTask.eval_overrides(task_cfg, data_cfg, "test")
    assert task_cfg["dataset"] == "advection"


def test_a_full_disk_during_training_names_the_run_folder(tmp_path, monkeypatch):
    from tasks import runner

    def full(cfg):  # what a logger's write() raises: no file name
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "_train", full)
    from tests.helpers import compose_config

    cfg = compose_config(TINY, tmp_path / "run")
    with pytest.raises(SystemExit) as e, runner.user_errors():
        runner.train(cfg)
    assert e.value.code.startswith(f"error: cannot write {tmp_path / 'run'} (the run's folder): no space left")


@pytest.mark.parametrize("key", ["_args_", "_partial_", "_recursive_", "_convert_"])
def test_every_hydra_key_in_an_artifact_is_refused(key):
    from tasks.recorded import UnsafeArtifactError, check_artifact_config

    meta = {"task": {"config": dict(VTAB_TASK), "data": {**VTAB_DATA, key: True}}, "tensors": {"_orig_mod.w": [2]}}
    with pytest.raises(UnsafeArtifactError, match=rf"refusing the key 'task\.data\.{key}'"):
        check_artifact_config(meta, "a")
    del meta["task"]["data"][key]
    check_artifact_config(meta, "a")  # other keys starting with '_' (a compiled model's names) are plain data
