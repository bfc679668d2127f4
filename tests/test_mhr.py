"""MHR / Poly / MHR-z / MHR-μ: the routing and mixing maths, variants, merge, transfer, artifacts."""
import pytest
import torch

import zoo
from zoo.adapters.mhr import MHRLinear, TaskState, load_inventory
from zoo.adapters.lora import LoRALinear

torch.set_num_threads(1)


def tiny(depth=2, num_classes=3, seed=0):
    torch.manual_seed(seed)
    bb = zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=depth)
    return zoo.ImageClassifier(bb, num_classes).eval()


def randomise(model, seed=1):
    """Non-zero B and spread-out routing, so that the mixing formula is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in zoo.api.iter_adapter_modules(model):
            for name, p in m.named_parameters():
                if not name.startswith("base."):
                    p.copy_(torch.randn(p.shape, generator=g) * (2.0 if "routing" in name else 0.1))


def direct_delta(x, A, B, Z, t, scaling):
    """The paper's formula with explicit loops over heads and skills."""
    h, m, dh, r = A.shape
    s = torch.sigmoid(Z[t].view(h, m))
    w = s / (s.sum(-1, keepdim=True) + 1e-12)
    A_t = torch.cat([sum(w[k, j] * A[k, j] for j in range(m)) for k in range(h)], dim=0)  # (d_in, r)
    B_t = torch.cat([sum(w[k, j] * B[k, j] for j in range(m)) for k in range(h)], dim=1)  # (r, d_out)
    return scaling * (x @ A_t) @ B_t


def make_linear(n_splits=4, n_tasks=3, n_skills=5, rank=2, alpha=3.0, d_in=8, d_out=12, slices=None, gumbel=False):
    torch.manual_seed(0)
    base = torch.nn.Linear(d_in, d_out)
    state = TaskState(n_tasks)
    lin = MHRLinear(base, slices or {"all": None}, state, n_tasks, n_skills, n_splits, rank, alpha, gumbel)
    with torch.no_grad():
        for p in (*lin.mhr_B.values(), *lin.routing.values()):
            p.normal_()
    return lin, state


def test_shapes_and_init():
    lin, _ = make_linear()
    assert lin.mhr_A["all"].shape == (4, 5, 2, 2) and lin.mhr_B["all"].shape == (4, 5, 2, 3)
    assert lin.routing["all"].shape == (3, 20)
    fresh = MHRLinear(torch.nn.Linear(48, 12), {"all": None}, TaskState(2), 2, 8, 4, 1, 1.0, False)
    bound = (1 / 3) ** 0.5 / 48 ** 0.5
    assert fresh.mhr_A["all"].abs().max() <= bound and fresh.mhr_A["all"].abs().max() > 0.8 * bound
    assert fresh.mhr_B["all"].abs().max() == 0 and fresh.routing["all"].abs().max() <= 1e-3


@pytest.mark.parametrize("n_splits", [1, 4])
def test_mixing_matches_direct_formula(n_splits):
    lin, state = make_linear(n_splits=n_splits)
    x = torch.randn(2, 7, 8)
    for t in range(3):
        state.set(t)
        want = lin.base(x) + direct_delta(x, lin.mhr_A["all"], lin.mhr_B["all"], lin.routing["all"], t, 1.5)
        torch.testing.assert_close(lin(x), want)


def test_per_sample_task_ids():
    lin, state = make_linear()
    x = torch.randn(4, 5, 8)
    ids = torch.tensor([2, 0, 1, 2])
    state.set(ids)
    out = lin(x)
    for i, t in enumerate(ids.tolist()):
        want = lin.base(x[i]) + direct_delta(x[i], lin.mhr_A["all"], lin.mhr_B["all"], lin.routing["all"], t, 1.5)
        torch.testing.assert_close(out[i], want)
    # SAM folds windows into the batch sample-major: k·B rows repeat each id k times
    assert state.per_row(8).tolist() == [2, 2, 0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="not a multiple"):
        state.per_row(6)
    with pytest.raises(ValueError, match="n_tasks=3"):
        state.set(torch.tensor([0, 3]))


def test_poly_is_one_head_with_plain_mixing():
    """Poly (h=1): y = Wx + s·x (Σ_j w_j A_j)(Σ_j w_j B_j), w = σ(z)/Σσ(z) — no head split."""
    model = tiny()
    zoo.apply_adapter(model, "mhr", variant="poly", n_tasks=2, n_skills=4, rank=2, alpha=2.0, targets=["fc1"])
    assert model.backbone.adapters[0].n_splits == 1
    randomise(model)
    lin = model.backbone.model.blocks[0].mlp.fc1
    A, B, Z = lin.mhr_A["fc1"][0], lin.mhr_B["fc1"][0], lin.routing["fc1"]  # (m, d_in, r), (m, r, d_out)
    x = torch.randn(3, 5, 192)
    lin.task.set(1)
    w = torch.sigmoid(Z[1]) / torch.sigmoid(Z[1]).sum()
    want = lin.base(x) + (x @ torch.einsum("j,jdr->dr", w, A)) @ torch.einsum("j,jrd->rd", w, B)
    torch.testing.assert_close(lin(x), want)


def test_heads_route_independently():
    """With h>1 each head's block of A rows / B columns follows its own routing row."""
    lin, state = make_linear(n_splits=4, n_skills=3)
    state.set(0)
    A_t, B_t = lin.task_adapter("all", 0)
    with torch.no_grad():
        lin.routing["all"][0, :3] += 5.0  # change head 0's routing only
    A2, B2 = lin.task_adapter("all", 0)
    assert not torch.allclose(A2[:2], A_t[:2]) and torch.equal(A2[2:], A_t[2:])
    assert not torch.allclose(B2[:, :3], B_t[:, :3]) and torch.equal(B2[:, 3:], B_t[:, 3:])


def test_identity_at_init_and_fused_qkv_slices():
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    zoo.apply_adapter(model, "mhr", n_tasks=2)
    torch.testing.assert_close(model(x), ref)
    qkv = model.backbone.model.blocks[0].attn.qkv
    assert isinstance(qkv, MHRLinear) and list(qkv.slices) == ["q", "k", "v"]
    # a delta on q only touches the q rows of the fused output
    with torch.no_grad():
        qkv.mhr_B["q"].normal_()
    tokens = torch.randn(2, 5, 192)
    out, base = qkv(tokens), qkv.base(tokens)
    assert not torch.allclose(out[..., :192], base[..., :192])
    torch.testing.assert_close(out[..., 192:], base[..., 192:])


def test_parameter_count_and_param_groups():
    model = tiny()
    zoo.apply_adapter(model, "mhr", n_tasks=3, n_skills=8, rank=1)
    trainable, _ = zoo.count_parameters(model.backbone)
    h, m, r, T, d = 64, 8, 1, 3, 192
    per_slice = lambda d_in, d_out: m * r * (d_in + d_out) + T * h * m
    per_block = 4 * per_slice(d, d) + per_slice(d, 4 * d) + per_slice(4 * d, d)
    assert trainable == 2 * per_block
    groups = zoo.param_groups(model, lr=1e-3, weight_decay=0.05)
    routing = [g for g in groups if g["lr"] == 0.1]
    assert len(routing) == 1 and routing[0]["weight_decay"] == 0.0
    assert sum(p.numel() for p in routing[0]["params"]) == 2 * 6 * T * h * m
    assert all(p.ndim == 2 for p in routing[0]["params"])
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable + sum(p.numel() for p in model.head.parameters())


def test_gumbel_sampling_in_training_only():
    lin, state = make_linear(gumbel=True)
    x = torch.randn(2, 3, 8)
    state.set(1)
    lin.train()
    a, b = lin(x), lin(x)
    assert not torch.allclose(a, b)  # a relaxed-Bernoulli sample per forward
    a.sum().backward()
    assert lin.routing["all"].grad is not None and lin.routing["all"].grad[1].abs().sum() > 0
    assert lin.routing["all"].grad[[0, 2]].abs().sum() == 0
    lin.eval()
    want = lin.base(x) + direct_delta(x, lin.mhr_A["all"], lin.mhr_B["all"], lin.routing["all"], 1, 1.5)
    torch.testing.assert_close(lin(x), want)


def test_merge_is_exact_for_one_task():
    model = tiny()
    zoo.apply_adapter(model, "mhr", n_tasks=3)
    randomise(model)
    x = torch.randn(2, 3, 32, 32)
    zoo.set_task(model, torch.tensor([1, 1]))
    ref = model(x)
    zoo.set_task(model, 0)
    assert not torch.allclose(model(x), ref, atol=1e-4)
    zoo.set_task(model, [0, 1])
    with pytest.raises(ValueError, match="single task"):
        zoo.merge_adapters(model, unload=False)
    zoo.unmerge_adapters(model)
    zoo.set_task(model, 1)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    zoo.merge_adapters(model, unload=False)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    zoo.unmerge_adapters(model)
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
    zoo.merge_adapters(model, unload=True)
    assert not any(isinstance(m, MHRLinear) for m in model.modules())
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def multitask_artifact(tmp_path, n_splits=None):
    src = tiny(seed=0)
    zoo.apply_adapter(src, "mhr", n_tasks=3, n_splits=n_splits)
    randomise(src)
    zoo.save_adapter(src, tmp_path / "mt")
    return src, tmp_path / "mt"


def test_mhr_z_trains_only_the_new_routing_row(tmp_path):
    src, path = multitask_artifact(tmp_path)
    model = tiny(seed=0)
    zoo.apply_adapter(model, "mhr", variant="mhr_z", n_tasks=1)
    load_inventory(model, path)
    adapter = model.backbone.adapters[0]
    routing = {id(p) for p in adapter.routing_parameters()}
    trainable = [p for p in model.backbone.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == routing
    assert all(p.shape == (1, 64 * 8) for p in trainable)  # one fresh row of h·m logits per slice
    assert all(p.abs().max() <= 1e-3 for p in trainable)
    # the inventory is the multi-task one
    s_lin, d_lin = src.backbone.model.blocks[1].mlp.fc2, model.backbone.model.blocks[1].mlp.fc2
    assert torch.equal(s_lin.mhr_A["fc2"], d_lin.mhr_A["fc2"]) and torch.equal(s_lin.mhr_B["fc2"], d_lin.mhr_B["fc2"])
    model.train()
    loss = model(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in model.backbone.parameters() if id(p) not in routing)
    groups = zoo.param_groups(model, 1e-3, 0.0)
    assert [g["lr"] for g in groups][0] == 0.1 and {id(p) for p in groups[0]["params"]} == routing


def test_mhr_mu_is_the_averaged_lora(tmp_path):
    src, path = multitask_artifact(tmp_path, n_splits=4)
    model = tiny(seed=0)
    zoo.apply_adapter(model, "mhr", variant="mhr_mu")
    load_inventory(model, path)
    assert all(isinstance(m, LoRALinear) for m in model.backbone.adapters[0].modules)
    x = torch.randn(2, 3, 32, 32)
    # (1) a plain zoo LoRA whose A, B are the skill means, heads concatenated, computed directly
    lora = tiny(seed=0)
    zoo.apply_adapter(lora, "lora", rank=1, alpha=1.0, targets=["q", "k", "v", "o", "fc1", "fc2"])
    src_mods = dict(src.named_modules())
    with torch.no_grad():
        for name, m in lora.named_modules():
            if isinstance(m, LoRALinear):
                s = src_mods[name]
                for i, key in enumerate(m.slices):
                    A, B = s.mhr_A[key], s.mhr_B[key]  # (h, m, d_in/h, r), (h, m, r, d_out/h)
                    A_mu = torch.cat([A[k].mean(0) for k in range(A.shape[0])], 0)
                    B_mu = torch.cat([B[k].mean(0) for k in range(B.shape[0])], 1)
                    m.lora_A[i:i + 1].copy_(A_mu.t())
                    m.lora_B[key].copy_(B_mu.t())
    lora.head.load_state_dict(model.head.state_dict())
    torch.testing.assert_close(model(x), lora(x))
    # (2) the MHR model with uniform routing (w = 1/m, mttl's AverageSelector) is the same function
    with torch.no_grad():
        for p in src.backbone.adapters[0].routing_parameters():
            p.zero_()
    src.head.load_state_dict(model.head.state_dict())
    torch.testing.assert_close(src(x), model(x), atol=1e-5, rtol=1e-5)
    # every averaged parameter trains; mergeable like a LoRA
    assert all(p.requires_grad for p in model.backbone.adapters[0].adapter_parameters())
    ref = model(x)
    zoo.merge_adapters(model, unload=True)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_load_inventory_checks_the_source(tmp_path):
    _, path = multitask_artifact(tmp_path)
    model = tiny()
    zoo.apply_adapter(model, "mhr", variant="mhr_z", n_splits=8)
    with pytest.raises(ValueError, match="n_splits"):
        load_inventory(model, path)
    other = tiny()
    zoo.apply_adapter(other, "lora")
    with pytest.raises(ValueError, match="'mhr' adapter"):
        load_inventory(other, path)


def test_artifact_round_trip(tmp_path):
    model = tiny()
    zoo.apply_adapter(model, "mhr", variant="mhr", n_tasks=2, n_splits=4, gumbel=True)
    randomise(model)
    x = torch.randn(2, 3, 32, 32)
    zoo.set_task(model, torch.tensor([1, 0]))
    ref = model(x)
    zoo.save_adapter(model, tmp_path / "a")
    other = tiny(seed=0)  # same base weights (the fingerprint is checked)
    zoo.load_adapter(other, tmp_path / "a")
    assert other.backbone.adapters[0].config["gumbel"] is True
    zoo.set_task(other, torch.tensor([1, 0]))
    torch.testing.assert_close(other(x), ref)


def test_bad_options():
    model = tiny()
    with pytest.raises(ValueError, match="valid variants: poly, mhr, mhr_z, mhr_mu"):
        zoo.apply_adapter(model, "mhr", variant="moe")
    with pytest.raises(ValueError, match="n_splits must be 1"):
        zoo.apply_adapter(model, "mhr", variant="poly", n_splits=4)
    with pytest.raises(zoo.SiteError, match="must divide"):
        zoo.apply_adapter(model, "mhr", n_splits=5)
    with pytest.raises(zoo.SiteError, match="Linear sites"):
        zoo.apply_adapter(model, "mhr", targets=["mlp"])
    assert not model.backbone.adapters  # failed attaches leave nothing behind
    zoo.apply_adapter(model, "mhr", n_tasks=2)
    with pytest.raises(ValueError, match="n_tasks=2"):
        zoo.set_task(model, 2)


# ---------------------------------------------------------------------- through train.py's job
def test_config_composes_and_tiny_run_trains(tmp_path):
    from pathlib import Path

    from tests.helpers import compose_config, run_train

    cfg = compose_config(["experiment=tiny", "adapter=mhr"])
    assert cfg.adapter.name == "mhr" and cfg.adapter.variant == "mhr" and cfg.adapter.routing_lr == 0.1
    m = run_train(["experiment=tiny", "adapter=mhr"], tmp_path)  # no task ids set: every sample is task 0
    from tests.integration import assert_val_accuracy

    assert m["adapter"] == "mhr"
    assert_val_accuracy(m, 200)
    assert m["train_loss_last"] < m["train_loss_first"]
    # the artifact rebuilds the trained model: same outputs as the run's final model
    art = Path(m["out_dir"]) / "adapter"
    meta = zoo.read_adapter_config(art)
    assert meta["methods"][0]["config"]["n_splits"] == 64
    from tasks.runner import build_task
    import lightning as L

    L.seed_everything(0)
    a = build_task(cfg).model.eval()
    zoo.remove_adapters(a)
    zoo.load_adapter(a, art)
    L.seed_everything(0)
    b = build_task(cfg).model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(a(x), b(x))  # trained B ≠ 0: the artifact carries the adaptation
    from safetensors.torch import load_file

    state = load_file(str(art / "adapter.safetensors"))
    b.load_state_dict(state, strict=False)
    torch.testing.assert_close(a(x), b(x))
    assert any(k.endswith("routing.q") for k in state) and any(".mhr_B." in k for k in state)


# ---------------------------------------------------------------------- issue 15
@pytest.mark.parametrize("stage1", ["poly", "mhr"])
@pytest.mark.parametrize("stage2", ["mhr_z", "mhr_mu", "mhr", "poly"])
def test_multitask_to_fewshot_adapter_for_every_variant(tmp_path, stage1, stage2):
    """Stage 2 inherits stage 1's *resolved* n_splits (``null`` is 1 for poly, 64 otherwise): before
    the fix ``experiment=mhr_vtab adapter.variant=poly`` crashed after the whole first stage."""
    from zoo.adapters.mhr import fewshot_adapter

    cfg = {"variant": stage1, "n_tasks": 3, "n_skills": 4, "n_splits": None, "rank": 1, "alpha": 1.0,
           "targets": ["q", "v", "fc2"], "layers": "all"}
    src = tiny(seed=0)
    zoo.apply_adapter(src, "mhr", **cfg)
    randomise(src)
    zoo.save_adapter(src, tmp_path / "mt")
    meta = zoo.read_adapter_config(tmp_path / "mt")
    if stage2 == "poly" and stage1 != "poly":
        with pytest.raises(ValueError, match="n_splits"):  # a 64-head inventory is no Poly inventory
            model = tiny(seed=0)
            zoo.apply_adapter(model, "mhr", **fewshot_adapter(cfg, stage2, meta))
            load_inventory(model, tmp_path / "mt")
        return
    model = tiny(seed=0)
    zoo.apply_adapter(model, "mhr", **fewshot_adapter(cfg, stage2, meta))
    load_inventory(model, tmp_path / "mt")
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_mhr_z_without_an_inventory_is_refused(tmp_path):
    model = tiny()
    zoo.apply_adapter(model, "mhr", variant="mhr_z")
    with pytest.raises(ValueError, match="no inventory was loaded"):
        zoo.prepare_adapters(model, None)
    _, path = multitask_artifact(tmp_path)
    load_inventory(model, path)
    zoo.prepare_adapters(model, None)  # fine once the inventory is in
    other = tiny()
    zoo.apply_adapter(other, "mhr", variant="mhr_z", n_tasks=1)
    zoo.save_adapter(other, tmp_path / "z")
    again = tiny()
    zoo.load_adapter(again, tmp_path / "z")  # adapter.init_from: the artifact holds the inventory
    zoo.prepare_adapters(again, None)


@pytest.mark.parametrize("set_ids", [False, True])
def test_gumbel_routing_on_sam_samples_once_per_image(monkeypatch, set_ids):
    """SAM runs each image as several windows (rows); the relaxed-Bernoulli routing must be drawn
    once per image, the same for all its windows."""
    import zoo.adapters.mhr as mhr_mod

    bb = zoo.create_backbone("sam", model="samvit_base_patch16", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=64, depth=2, num_heads=2, window_size=2, global_attn_indexes=(1,), neck_chans=32)
    zoo.apply_adapter(bb, "mhr", n_tasks=2, n_splits=4, gumbel=True, targets=["qkv"])
    seen = []
    real = mhr_mod.routing_weights
    monkeypatch.setattr(mhr_mod, "routing_weights", lambda logits, *a: seen.append(logits.shape[0]) or real(logits, *a))
    bb.train()
    if set_ids:
        zoo.set_task(bb, torch.tensor([0, 1, 1]))
    bb(torch.randn(3, 3, 32, 32))
    assert seen == [3, 3]  # block 0 is windowed (4 windows per image), block 1 global: 3 images each
