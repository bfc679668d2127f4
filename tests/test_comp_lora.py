"""Comp-LoRA: the update lives in the complement of each weight's top-k singular subspace."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.adapters.comp_lora import CompLoRALinear, protected_rank


def tiny_vit(depth=2):
    torch.manual_seed(0)
    return zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=depth)


def train_steps(model, x, y, steps=5, lr=1e-2):
    """A few real AdamW steps on the task loss (+ the adapter's extra loss, as the task adds it)."""
    opt = torch.optim.AdamW(zoo.param_groups(model, lr, 0.0), lr=lr)
    model.train()
    for _ in range(steps):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        extra = zoo.extra_loss(model, zoo.StepContext(model, x, y, logits, loss))
        if extra is not None:
            loss = loss + extra
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def slice_weights(module: CompLoRALinear) -> dict[str, torch.Tensor]:
    w = module.linear().weight.detach().double()
    return {name: (w if s is None else w[s]).clone() for name, s in module.slices.items()}


def top_k(w: torch.Tensor, k: int):
    """Independent SVD of the original weight (not the module's buffers)."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :k], s, vh[:k].t()


def trained_deltas(mode, model_fn=tiny_vit, n_classes=5, img=32, **cfg):
    """Train Comp-LoRA a few steps; return [(W0, ΔW, k)] per adapted slice, taken by a real merge."""
    bb = model_fn()
    model = zoo.ImageClassifier(bb, n_classes)
    zoo.apply_adapter(model, "comp_lora", mode=mode, dropout=0.0, **cfg)
    mods = bb.adapters[0].modules
    before = [slice_weights(m) for m in mods]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, img, img, generator=g), torch.randint(0, n_classes, (8,), generator=g)
    train_steps(model, x, y)
    with torch.no_grad():
        out_unmerged = model(x)
        zoo.merge_adapters(model, unload=False)
        out_merged = model(x)
    torch.testing.assert_close(out_merged, out_unmerged, rtol=1e-4, atol=1e-5)  # merge is exact
    after = [slice_weights(m) for m in mods]
    zoo.unmerge_adapters(model)
    for m, b in zip(mods, before):  # unmerge restores the base weights
        for name, w in slice_weights(m).items():
            torch.testing.assert_close(w, b[name], rtol=0, atol=1e-6)
    return [(b[n], a[n] - b[n], m.k[n]) for m, b, a in zip(mods, before, after) for n in b]


def test_identity_at_init_and_trainable_count():
    bb = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = bb(x)
    zoo.apply_adapter(bb, "comp_lora")  # defaults: q, k, v; r = 2
    with torch.no_grad():
        torch.testing.assert_close(bb(x), ref)
    d, r, depth = 192, 2, 2
    assert zoo.count_parameters(bb)[0] == depth * 3 * (r * d + d * r)  # exactly LoRA's count: no extra parameters
    assert all(n.endswith(("lora_A", "lora_B.q", "lora_B.k", "lora_B.v"))
               for n, p in bb.named_parameters() if p.requires_grad)


def test_two_sided_update_is_orthogonal_to_top_k_after_training():
    k = 8
    results = trained_deltas("two_sided", k=k)
    assert len(results) == 2 * 3  # q, k, v slices of 2 blocks
    for w0, dw, kk in results:
        assert kk == k
        u, s, v = top_k(w0, k)
        norm = dw.norm()
        assert norm > 1e-3  # training really moved the weights
        assert (u.t() @ dw).norm() <= 1e-4 * norm
        assert (dw @ v).norm() <= 1e-4 * norm
        # first order: δσ_i = u_iᵀ ΔW v_i = 0 for the top k ...
        assert (u.t() @ dw @ v).diagonal().abs().max() <= 1e-4 * norm
        # ... and, ΔW being block-diagonal to (U_k, V_k), each top-k σ_i is still a singular value
        s_new = torch.linalg.svdvals(w0 + dw)
        dist = (s_new[None, :] - s[:k, None]).abs().min(dim=1).values
        assert dist.max() <= 1e-4 * s[0]


def test_plain_lora_update_would_not_be_orthogonal():
    """Control for the test above: the same check fails for an unconstrained update (penalty mode, λ=0)."""
    results = trained_deltas("penalty", k=8, penalty_weight=0.0)
    ratios = [(top_k(w0, 8)[0].t() @ dw).norm() / dw.norm() for w0, dw, _ in results]
    assert max(ratios) > 1e-2


@pytest.mark.parametrize("mode", ["left", "right"])
def test_one_sided_modes(mode):
    for w0, dw, k in trained_deltas(mode, k=4):
        u, _, v = top_k(w0, k)
        norm = dw.norm()
        protected, free = ((u.t() @ dw), (dw @ v)) if mode == "left" else ((dw @ v), (u.t() @ dw))
        assert protected.norm() <= 1e-4 * norm
        assert free.norm() > 1e-3 * norm  # the other side is not constrained


@pytest.mark.parametrize("form", ["core", "sides"])
def test_penalty_equals_its_formula_and_reaches_the_loss(form):
    bb = tiny_vit()
    zoo.apply_adapter(bb, "comp_lora", mode="penalty", penalty=form, penalty_weight=0.5, k=4, layers=[0])
    ad = bb.adapters[0]
    (m,) = ad.modules
    ctx = zoo.StepContext(bb, None, None, None)
    assert float(ad.extra_loss(ctx)) == 0.0  # B = 0 at init
    torch.manual_seed(0)
    for p in m.lora_B.values():
        torch.nn.init.normal_(p)
    dw_full = m.delta_weight().double()
    expected = 0.0
    for name, s in m.slices.items():
        u, v = m.U(name).double(), m.V(name).double()
        dw = dw_full[s]
        expected += (u.t() @ dw @ v).square().sum() if form == "core" else (u.t() @ dw).square().sum() + (dw @ v).square().sum()
    loss = ad.extra_loss(ctx)
    torch.testing.assert_close(loss.double(), 0.5 * expected, rtol=1e-4, atol=0)
    loss.backward()
    assert m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0


def test_energy_threshold_picks_smallest_k():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5])  # σ² / Σσ² cumulated: 0.719, 0.899, 0.944, 0.989, 1
    assert protected_rank(0.5, s) == 1
    assert protected_rank(0.85, s) == 2
    assert protected_rank(0.9, s) == 3
    assert protected_rank(0.95, s) == 4
    assert protected_rank(0.999, s) == 4  # capped so that one complementary direction remains
    assert protected_rank(3, s) == 3


@pytest.mark.parametrize("bad, match", [
    (dict(mode="both"), "valid modes: two_sided, left, right, penalty"),
    (dict(penalty="l1"), "valid penalties: core, sides"),
    (dict(k=1.5), "energy fraction"),
    (dict(k=192), r"0\.\.191"),
    (dict(targets=["mlp"]), "Linear sites"),
])
def test_bad_options_fail_clearly(bad, match):
    bb = tiny_vit()
    with pytest.raises(ValueError, match=match):
        zoo.apply_adapter(bb, "comp_lora", **bad)
    assert not bb.adapters and not any(isinstance(m, CompLoRALinear) for m in bb.modules())


def test_artifact_holds_only_trainable_factors(tmp_path):
    bb = tiny_vit()
    model = zoo.ImageClassifier(bb, 3)
    zoo.apply_adapter(model, "comp_lora", k=0.8, dropout=0.0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    train_steps(model, x, y, steps=2)
    zoo.save_adapter(model, tmp_path / "a")
    keys = set(zoo.read_adapter_config(tmp_path / "a")["tensors"])
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".U_" in k or ".V_" in k for k in keys)  # projectors are recomputed, not stored
    fresh = zoo.ImageClassifier(tiny_vit(), 3)
    zoo.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


def test_orthogonality_on_clip_visual_tower():
    def clip():
        torch.manual_seed(0)
        return zoo.create_backbone("clip", model="ViT-S-32", pretrained=None, force_image_size=64)

    results = trained_deltas("two_sided", model_fn=clip, img=64, k=16, layers=[0])
    assert len(results) == 3  # q, k, v rows of in_proj in block 0
    for w0, dw, k in results:
        u, _, v = top_k(w0, k)
        norm = dw.norm()
        assert norm > 1e-3
        assert (u.t() @ dw).norm() <= 1e-4 * norm
        assert (dw @ v).norm() <= 1e-4 * norm


# ------------------------------------------------------------------------------ integration (train.py's job)
def test_tiny_run_trains_and_its_artifact_is_orthogonal_and_mergeable(tmp_path):
    import lightning as L

    from tasks.runner import build_task
    from tests.helpers import compose_config, run_train

    overrides = ["experiment=tiny", "adapter=comp_lora", "adapter.k=4", "task.optimizer.lr=2e-2"]
    assert compose_config(overrides).adapter.name == "comp_lora"
    m = run_train(overrides, tmp_path)
    assert m["train_loss_last"] < m["train_loss_first"]
    assert m["trainable_params"] == 2 * 3 * (2 * 64 + 64 * 2)  # depth 2, q/k/v, r = 2, d = 64

    L.seed_everything(0)  # the run's seed: the same random base weights (the fingerprint checks it)
    model = build_task(compose_config(overrides)).model
    zoo.remove_adapters(model)
    zoo.load_adapter(model, f"{m['out_dir']}/adapter")
    mod = model.backbone.adapters[0].modules[0]  # block 0's qkv
    w0 = slice_weights(mod)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model.eval()(x)
        zoo.merge_adapters(model, unload=False)
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)
    for name, w in slice_weights(mod).items():
        dw = w - w0[name]
        u, _, v = top_k(w0[name], 4)
        assert dw.norm() > 0
        assert (u.t() @ dw).norm() <= 1e-4 * dw.norm() and (dw @ v).norm() <= 1e-4 * dw.norm()
