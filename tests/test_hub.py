"""Model zoo: registry, downloads over a real local HTTP server, publishing, loading.

The server (``http.server`` in a thread on 127.0.0.1) serves a published artifact folder, honours
``Range`` requests, logs every request, and can be told to cut a transfer short or to serve slowly.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import zoo
from zoo import hub
from zoo.__main__ import main as cli

TINY = dict(model="vit_tiny_patch16_224", img_size=32, depth=2)


# ---------------------------------------------------------------------------- fixtures
class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range support, a request log and fault injection."""

    def log_message(self, *a):  # keep test output quiet
        pass

    def do_GET(self):
        srv = self.server
        path = Path(self.translate_path(self.path))
        srv.log.append((self.path, self.headers.get("Range")))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and srv.ranges:
            start = int(rng[6:].split("-")[0])
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if self.path in srv.cut_once:  # send half, then drop the connection
            srv.cut_once.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        step = max(1, len(body) // 8)
        for i in range(0, len(body), step):
            self.wfile.write(body[i:i + step])
            if srv.delay:
                time.sleep(srv.delay)


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: _Handler(*a, directory=str(root), **k)  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.log, srv.cut_once, srv.delay, srv.ranges = [], set(), 0.0, True
    srv.root, srv.url = root, f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own cache, no project registries, online."""
    monkeypatch.setenv(hub.ENV_HOME, str(tmp_path / "cache"))
    for var in (hub.ENV_OFFLINE, "HF_HUB_OFFLINE", hub.ENV_REGISTRY):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub.registry, "PROJECT_REGISTRY", tmp_path / "none" / "registry.json")
    monkeypatch.setattr(hub.registry, "LOCAL_REGISTRY", tmp_path / "none" / "local_registry.json")
    monkeypatch.setattr(hub.registry, "_EXTRA_REGISTRIES", [])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Upstream weights file + a finished run dir (run contract: metrics.json + adapter/)."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    up = zoo.create_backbone("vit", pretrained=False, **TINY)
    weights = root / "vit_up.safetensors"
    save_file({k: v.contiguous() for k, v in up.model.state_dict().items()}, str(weights))
    bb = zoo.create_backbone("vit", pretrained=None, weights=str(weights), **TINY)
    model = zoo.ImageClassifier(bb, 3)
    zoo.apply_adapter(model, "lora", rank=2)
    with torch.no_grad():  # a "trained" adapter: B != 0 so it changes the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    run = root / "run"
    zoo.save_adapter(model, run / "adapter")
    (run / "metrics.json").write_text(json.dumps({"val/acc": 0.75, "train_loss_last": 0.5, "task": "vtab",
                                                  "dataset": "dsprites_loc", "adapter": "lora"}))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model.eval()(x)
    return {"weights": weights, "run": run, "x": x, "y": y}


def _serve(server, trained, name="tiny-lora", relative=False):
    """Publish the run and its backbone into the served folder; register its registry URL."""
    base = server.url
    entry = hub.publish_run(trained["run"], name, out_dir=server.root / name, url_base=f"{base}/{name}",
                            licence="Apache-2.0")
    bbe = hub.publish_backbone(trained["weights"], "tiny-vit", "vit", TINY["model"],
                               kwargs={"img_size": 32, "depth": 2}, out_dir=server.root / "upstream",
                               url_base=f"{base}/upstream")
    if relative:  # sources relative to the registry's own URL
        for f in entry["files"]:
            f["sources"] = [{"url": f"{name}/{f['name']}"}]
    reg = {"format": 1, "entries": {name: entry, "tiny-vit": bbe}}
    (server.root / "registry.json").write_text(json.dumps(reg))
    os.environ[hub.ENV_REGISTRY] = f"{base}/registry.json"
    return entry


def _gets(server, suffix):
    return [r for r in server.log if r[0].endswith(suffix)]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- tests
def test_publish_run_entry_and_model_card(trained, tmp_path, capsys):
    out = tmp_path / "art"
    rc = cli(["publish", str(trained["run"]), "--name", "tiny-lora", "--out", str(out), "--licence", "MIT"])
    assert rc == 0
    entry = json.loads(capsys.readouterr().out)["tiny-lora"]
    files = {f["name"]: f for f in entry["files"]}
    assert set(files) == {"adapter.safetensors", "adapter.json", "README.md"}
    for name, f in files.items():
        assert f["sha256"] == _sha(out / name) and f["size"] == (out / name).stat().st_size
        # registered in the local zoo by default: sources relative to that registry
        assert f["sources"] == [{"path": os.path.relpath((out / name).resolve(), hub.registry.LOCAL_REGISTRY.resolve().parent)}]
    assert hub.get_entry("tiny-lora").files[0].sha256 == files["adapter.safetensors"]["sha256"]
    assert entry["method"][0]["name"] == "lora" and entry["method"][0]["config"]["rank"] == 2
    assert entry["metrics"]["val/acc"] == 0.75 and entry["task"] == {"name": "vtab", "dataset": "dsprites_loc"}
    meta = json.loads((out / "adapter.json").read_text())
    assert entry["backbone"]["fingerprint"] == meta["backbone"]["fingerprint"]
    assert entry["stored_parameters"] == sum(torch.Size(s).numel() for s in meta["tensors"].values())
    card = (out / "README.md").read_text()
    assert "# tiny-lora" in card and "lora" in card and "MIT" in card and 'zoo.from_zoo("tiny-lora")' in card


def test_download_cache_hit_and_from_zoo(server, trained):
    _serve(server, trained, relative=True)
    folder = hub.download("tiny-lora")
    entry = hub.get_entry("tiny-lora")
    for f in entry.files:
        assert _sha(folder / f.name) == f.sha256
    n = len(server.log)
    assert hub.download("tiny-lora") == folder and len(server.log) == n  # cache hit: no request at all
    model = zoo.from_zoo("tiny-lora")  # also fetches the upstream weights through the backbone entry
    assert isinstance(model, zoo.ImageClassifier) and not model.training
    assert len(_gets(server, "vit_up.safetensors")) == 1
    with torch.no_grad():
        torch.testing.assert_close(model(trained["x"]), trained["y"])
    assert hub.resolve("zoo:tiny-lora") == folder == hub.resolve_init("tiny-lora")


def test_resume_after_interrupted_transfer(server, trained):
    _serve(server, trained)
    server.cut_once.add("/tiny-lora/adapter.safetensors")
    with pytest.raises(hub.DownloadError, match="resumes"):
        hub.download("tiny-lora")
    entry = hub.get_entry("tiny-lora")
    part = hub.entry_dir(entry) / "adapter.safetensors.part"
    size = entry.files[0].size
    assert 0 < part.stat().st_size < size
    have = part.stat().st_size
    folder = hub.download("tiny-lora")
    gets = _gets(server, "adapter.safetensors")
    assert gets[-1][1] == f"bytes={have}-"  # resumed, not restarted
    assert _sha(folder / "adapter.safetensors") == entry.files[0].sha256 and not part.exists()


def test_corrupt_partial_file_is_deleted_and_next_download_recovers(server, trained):
    _serve(server, trained)
    entry = hub.get_entry("tiny-lora")
    d = hub.entry_dir(entry)
    d.mkdir(parents=True)
    (d / "adapter.safetensors.part").write_bytes(b"garbage left by a killed process")
    # the resumed file fails its hash: the download starts over once, saying why (no failed first call)
    with pytest.warns(UserWarning, match=r"adapter\.safetensors\.part.*left by an earlier download.*started again"):
        folder = hub.download("tiny-lora")
    assert _sha(folder / "adapter.safetensors") == entry.files[0].sha256
    gets = _gets(server, "adapter.safetensors")
    assert [g[1] for g in gets] == ["bytes=32-", None]  # resumed, then from the start
    assert not (d / "adapter.safetensors.part").exists()


def test_server_without_range_support_restarts_cleanly(server, trained):
    _serve(server, trained)
    server.ranges = False
    server.cut_once.add("/tiny-lora/adapter.safetensors")
    with pytest.raises(hub.DownloadError):
        hub.download("tiny-lora")
    folder = hub.download("tiny-lora")
    assert _sha(folder / "adapter.safetensors") == hub.get_entry("tiny-lora").files[0].sha256


def test_hash_mismatch_reports_both_hashes_and_deletes(server, trained):
    entry = _serve(server, trained)
    real = entry["files"][0]["sha256"]
    entry["files"][0]["sha256"] = "0" * 64
    (server.root / "registry.json").write_text(json.dumps({"format": 1, "entries": {"tiny-lora": entry}}))
    with pytest.raises(hub.IntegrityError) as e:
        hub.download("tiny-lora")
    msg = str(e.value)
    assert "0" * 64 in msg and real in msg
    d = hub.entry_dir(hub.get_entry("tiny-lora"))
    assert not any(p.name.startswith("adapter.safetensors") for p in d.iterdir())


@pytest.mark.parametrize("var", [hub.ENV_OFFLINE, "HF_HUB_OFFLINE"])
def test_offline_mode(server, trained, monkeypatch, var):
    _serve(server, trained)
    hub.entries()  # the registry itself is fetched (and cached) while online
    monkeypatch.setenv(var, "1")
    n = len(server.log)
    with pytest.raises(hub.OfflineError, match="offline") as e:
        hub.download("tiny-lora")
    assert "not in the cache" in str(e.value) and len(server.log) == n  # no request went out
    monkeypatch.setenv(var, "0")
    folder = hub.download("tiny-lora")
    monkeypatch.setenv(var, "1")
    assert hub.download("tiny-lora") == folder and len(hub.entries()) == 2  # cached registry + files


def _child_download(env: dict, q):
    os.environ.update(env)
    try:
        q.put(str(hub.download("tiny-lora", progress=False)))
    except Exception as e:  # report, don't hang the parent
        q.put(f"ERROR {type(e).__name__}: {e}")


def test_two_processes_download_the_same_entry(server, trained):
    _serve(server, trained)
    server.delay = 0.05  # slow enough that the two processes overlap
    ctx = mp.get_context("fork")  # children inherit the imported library: no torch import per process
    q = ctx.Queue()
    env = {k: os.environ[k] for k in (hub.ENV_HOME, hub.ENV_REGISTRY)}
    procs = [ctx.Process(target=_child_download, args=(env, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert results[0] == results[1] and not results[0].startswith("ERROR"), results
    assert len(_gets(server, "adapter.safetensors")) == 1  # one process downloaded, the other waited
    folder = Path(results[0])
    assert _sha(folder / "adapter.safetensors") == hub.get_entry("tiny-lora").files[0].sha256
    assert not list(folder.glob("*.part")) and not list(folder.glob("*.tmp"))


def test_entry_backbone_must_match_artifact_and_model(server, trained):
    entry = _serve(server, trained)
    # 1. a registry entry that contradicts its own artifact
    bad = json.loads(json.dumps(entry))
    bad["backbone"]["model"] = "vit_small_patch16_224"
    reg = json.loads((server.root / "registry.json").read_text())
    reg["entries"]["bad-entry"] = bad
    (server.root / "registry.json").write_text(json.dumps(reg))
    for _ in range(2):  # the files are cached after the first try: the second (and from_zoo) must refuse too
        with pytest.raises(hub.RegistryError, match="backbone.model: registry 'vit_small_patch16_224', artifact 'vit_tiny_patch16_224'"):
            hub.download("bad-entry")
    with pytest.raises(hub.RegistryError, match="contradicts its artifact"):
        zoo.from_zoo("bad-entry")
    # 2. a good entry loaded into a model with another backbone
    other = zoo.ImageClassifier(zoo.create_backbone("vit", model="vit_small_patch16_224", pretrained=False,
                                                    img_size=32, depth=2), 3)
    with pytest.raises(zoo.AdapterMismatchError, match="model: artifact has 'vit_tiny_patch16_224'"):
        zoo.load_adapter(other, hub.resolve("zoo:tiny-lora"))
    assert zoo.adapters_of(other) == []  # left untouched
    # 3. same architecture, different base weights: the fingerprint check names it
    rand = zoo.ImageClassifier(zoo.create_backbone("vit", pretrained=False, **TINY), 3)
    with pytest.raises(zoo.AdapterMismatchError):
        zoo.load_adapter(rand, hub.resolve("zoo:tiny-lora"))


def test_local_registry_from_publish_run(trained, tmp_path, monkeypatch, capsys):
    """What the quickstart does: publish into checkpoints/local_registry.json, then list and load."""
    reg = tmp_path / "checkpoints" / "local_registry.json"
    monkeypatch.setattr(hub.registry, "LOCAL_REGISTRY", reg)
    hub.publish_backbone(trained["weights"], "vit-demo", "vit", TINY["model"], kwargs={"img_size": 32, "depth": 2},
                         registry=reg, out_dir=tmp_path / "checkpoints" / "upstream")
    hub.publish_run(trained["run"], "vit-demo-lora", registry=reg, out_dir=tmp_path / "checkpoints" / "zoo" / "vit-demo-lora")
    data = json.loads(reg.read_text())
    assert data["entries"]["vit-demo-lora"]["files"][0]["sources"] == [{"path": "zoo/vit-demo-lora/adapter.safetensors"}]
    assert data["entries"]["vit-demo"]["files"][0]["sources"] == [{"path": "upstream/vit_up.safetensors"}]
    assert cli(["list", "--adapter", "lora", "--task", "dsprites"]) == 0
    out = capsys.readouterr().out
    assert "vit-demo-lora" in out and "vit-demo " not in out
    assert cli(["list", "--kind", "backbone", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["vit-demo"]
    monkeypatch.setenv(hub.ENV_OFFLINE, "1")  # local sources need no network
    model = zoo.from_zoo("vit-demo-lora")
    with torch.no_grad():
        torch.testing.assert_close(model(trained["x"]), trained["y"])
    assert cli(["verify"]) == 0
    cached = hub.entry_dir(hub.get_entry("vit-demo-lora")) / "adapter.safetensors"
    cached.write_bytes(b"x" * cached.stat().st_size)  # same size, wrong bytes: only a re-hash sees it
    assert cli(["verify"]) == 1
    assert "BAD" in capsys.readouterr().out and not cached.exists()


def test_hf_source_goes_through_hf_hub_download(trained, tmp_path, monkeypatch):
    import huggingface_hub

    art = tmp_path / "art"
    entry = hub.publish_run(trained["run"], "hf-lora", out_dir=art, hf_repo="lab/zoo", hf_subfolder="hf-lora")
    assert entry["files"][0]["sources"] == [{"hf_repo": "lab/zoo", "filename": "hf-lora/adapter.safetensors"}]
    calls = []

    def fake(repo_id, filename, revision=None, repo_type="model"):
        calls.append((repo_id, filename))
        return str(art / Path(filename).name)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    reg = tmp_path / "r.json"
    hub.add_entry(reg, "hf-lora", entry)
    hub.add_registry(reg)
    folder = hub.download("hf-lora")
    assert ("lab/zoo", "hf-lora/adapter.json") in calls and (folder / "adapter.safetensors").is_file()


def test_registry_validation_and_errors(tmp_path, monkeypatch):
    good = {"name": "adapter.safetensors", "sha256": "a" * 64, "size": 1, "sources": [{"url": "x"}]}
    bad_sha = {"format": 1, "entries": {"e": {"kind": "adapter", "backbone": {"family": "vit", "model": "m"},
                                               "files": [{**good, "sha256": "abc"}]}}}
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad_sha))
    with pytest.warns(UserWarning, match="64-hex sha256"):  # a bad entry skips itself
        assert hub.load_registry(p) == {}
    with pytest.raises(hub.RegistryError, match="kind must be one of"):
        hub.Entry.from_dict("e", {"kind": "weights", "backbone": {"family": "vit", "model": "m"}, "files": [good]})
    with pytest.raises(hub.RegistryError, match="needs adapter.safetensors and adapter.json"):
        hub.Entry.from_dict("e", {"kind": "adapter", "backbone": {"family": "vit", "model": "m"}, "files": [good]})
    monkeypatch.setenv(hub.ENV_REGISTRY, f"{p}:http://127.0.0.1:9/r.json")
    assert hub.registry_locations()[-2:] == [str(p), "http://127.0.0.1:9/r.json"]
    with pytest.warns(UserWarning, match="skipping registry"):
        with pytest.raises(hub.EntryNotFoundError, match="no zoo entry 'nope'") as e:
            hub.get_entry("nope")
    assert "could not be read" in str(e.value)
    assert cli(["download", "nope"]) == 2


# ---------------------------------------------------------------------------- issue 24: the cache
def test_a_symlinked_part_file_never_writes_outside_the_cache(server, trained, tmp_path):
    _serve(server, trained)
    d = hub.entry_dir(hub.get_entry("tiny-lora"))
    d.mkdir(parents=True)
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (d / "adapter.safetensors.part").symlink_to(outside)
    with pytest.raises(hub.HubError, match=r"adapter\.safetensors\.part is a symbolic link"):
        hub.download("tiny-lora")
    assert outside.read_text() == "keep"


@pytest.mark.parametrize("what", ["file", "lock", "folder"])
def test_symlinks_in_the_cache_are_refused(server, trained, tmp_path, what):
    _serve(server, trained)
    d = hub.entry_dir(hub.get_entry("tiny-lora"))
    outside = tmp_path / "outside"
    if what == "folder":  # the entry folder itself points elsewhere
        outside.mkdir()
        d.parent.mkdir(parents=True)
        d.symlink_to(outside)
        link = d
    else:
        d.mkdir(parents=True)
        outside.write_text("keep")
        link = d / "adapter.json" if what == "file" else Path(str(d) + ".lock")
        link.symlink_to(outside)
    with pytest.raises(hub.HubError, match=rf"{link.name} is a symbolic link"):
        hub.download("tiny-lora")
    assert (list(outside.iterdir()) == []) if what == "folder" else outside.read_text() == "keep"


@pytest.mark.parametrize("spec", ["not-an-object", None, 7, ["a", "list"]])
def test_one_malformed_file_spec_skips_only_its_entry(trained, tmp_path, spec):
    entry = hub.publish_run(trained["run"], "good", out_dir=tmp_path / "good")
    bad = json.loads(json.dumps(entry))
    bad["files"][1] = spec
    reg = tmp_path / "r.json"
    reg.write_text(json.dumps({"format": 1, "entries": {"good": entry, "bad": bad}}))
    with pytest.warns(UserWarning, match=r"entry 'bad'.*file #1 must be an object"):
        assert list(hub.load_registry(reg)) == ["good"]


@pytest.mark.parametrize("files", ["a-string", {"adapter.json": 1}])
def test_a_files_field_that_is_not_a_list_skips_only_its_entry(trained, tmp_path, files):
    entry = hub.publish_run(trained["run"], "good", out_dir=tmp_path / "good")
    reg = tmp_path / "r.json"
    reg.write_text(json.dumps({"format": 1, "entries": {"good": entry, "bad": {**entry, "files": files}}}))
    with pytest.warns(UserWarning, match=r"entry 'bad'.*'files' must be a list"):
        assert list(hub.load_registry(reg)) == ["good"]


def test_a_duplicate_file_name_in_an_entry_is_refused_and_never_deletes_the_good_copy(trained, tmp_path):
    entry = hub.publish_run(trained["run"], "dup", out_dir=tmp_path / "dup")
    reg = tmp_path / "r.json"
    reg.write_text(json.dumps({"format": 1, "entries": {"dup": entry}}))
    hub.add_registry(reg)
    d = hub.download("dup")
    good = (d / "adapter.safetensors").read_bytes()
    twin = {**entry["files"][0], "sha256": "0" * 64}  # the same name pinned twice, the second wrong
    reg.write_text(json.dumps({"format": 1, "entries": {"dup": {**entry, "files": entry["files"] + [twin]}}}))
    with pytest.warns(UserWarning, match=r"entry 'dup'.*file 'adapter\.safetensors' is listed twice"), \
            pytest.raises(hub.EntryNotFoundError, match="listed twice"):
        hub.download("dup")
    assert (d / "adapter.safetensors").read_bytes() == good


def test_list_json_into_a_closed_pipe_is_quiet(trained, tmp_path):
    import subprocess
    import sys

    hub.publish_run(trained["run"], "piped", out_dir=tmp_path / "piped", registry=tmp_path / "r.json")
    env = {**os.environ, hub.ENV_REGISTRY: str(tmp_path / "r.json"), "PYTHONPATH": str(Path(__file__).parents[1])}
    p = subprocess.run(f"{sys.executable} -m zoo list --json | head -1", shell=True, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.stdout == "{\n" and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def _run_on_local_base(trained, tmp_path) -> tuple[Path, Path]:
    """A copy of the finished run whose adapter.json records where its local base weights were (as train.py does)."""
    import shutil

    weights = tmp_path / "local" / trained["weights"].name  # the file the run read (its tag names it)
    weights.parent.mkdir(parents=True)
    shutil.copyfile(trained["weights"], weights)
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    meta = json.loads((run / "adapter" / "adapter.json").read_text())
    meta["base_weights"] = {"path": str(weights), "config": "vit_demo"}
    (run / "adapter" / "adapter.json").write_text(json.dumps(meta))
    return run, weights


def test_publish_of_a_run_on_local_base_weights_then_from_zoo(trained, tmp_path, monkeypatch, capsys):
    """publish registers the base weights the run read (<name>-base); from_zoo(NAME) then works even
    after the original file is gone, and gives the trained outputs."""
    reg = tmp_path / "zoo" / "registry.json"
    monkeypatch.setattr(hub.registry, "LOCAL_REGISTRY", reg)
    run, weights = _run_on_local_base(trained, tmp_path)
    assert cli(["publish", str(run), "--name", "mine", "--out", str(tmp_path / "zoo" / "mine")]) == 0
    entry = json.loads(capsys.readouterr().out)["mine"]
    assert entry["base_entry"] == "mine-base" and hub.get_entry("mine-base").kind == "backbone"
    weights.unlink()
    monkeypatch.setenv(hub.ENV_OFFLINE, "1")
    with torch.no_grad():
        torch.testing.assert_close(zoo.from_zoo("mine")(trained["x"]), trained["y"])
    # a second adapter on the same base reuses the entry instead of copying the weights again
    run2, _ = _run_on_local_base(trained, tmp_path / "again")
    assert hub.publish_run(run2, "mine2", registry=reg, out_dir=tmp_path / "zoo" / "mine2")["base_entry"] == "mine-base"


def test_local_base_weights_are_found_where_the_run_read_them_or_named(trained, tmp_path):
    run, weights = _run_on_local_base(trained, tmp_path)
    with torch.no_grad():  # the recorded path, no registry entry needed
        torch.testing.assert_close(zoo.from_zoo(str(run / "adapter"))(trained["x"]), trained["y"])
    weights.unlink()
    with pytest.raises(hub.EntryNotFoundError, match=r"local/vit_up.safetensors \(not on this machine\): pass "
                                                     r"weights=/path/to/vit_up.safetensors \(backbone=vit_demo"):
        zoo.from_zoo(str(run / "adapter"))
