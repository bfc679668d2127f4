"""Regularized mask tuning (R-AMT): identity at init, binary merge, bit-packed artifact, gradient dropout."""
import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.adapters.mask_tuning import MaskedWeight, gradient_dropout, packbits, unpackbits
from zoo.sites import SiteError

torch.set_num_threads(1)


def tiny(depth=2, classes=5, seed=0):
    torch.manual_seed(seed)
    bb = zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=depth)
    return zoo.ImageClassifier(bb, classes)


def adapter_of(model):
    (a,) = zoo.adapters_of(model)
    return a


def train(model, steps=6, lr=3e-3, gdr_check=None):
    """The classification task's step order: loss + extra_loss, backward, before_optimizer_step, step."""
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    opt = torch.optim.Adam(zoo.param_groups(model, lr, 0.0))
    for _ in range(steps):
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        ctx = zoo.StepContext(model=model, inputs=x, targets=y, outputs=logits, loss=loss,
                              loss_fn=F.cross_entropy, forward=model)
        extra = zoo.extra_loss(model, ctx)
        (loss + extra).backward()
        if gdr_check is not None:
            gdr_check(model)
        zoo.before_optimizer_step(model)
        opt.step()
    return x


def test_identity_at_init_and_masks_all_ones():
    model = tiny()
    x = torch.randn(3, 3, 32, 32)
    ref = model(x)
    zoo.apply_adapter(model, "mask_tuning")
    a = adapter_of(model)
    assert torch.equal(model(x), ref)
    for m in a.masked():
        assert torch.equal(m.full_mask(), torch.ones_like(m.base.weight))
    assert a.sparsity() == 0.0


def test_trainable_set_is_the_scores():
    model = tiny(depth=3)
    zoo.apply_adapter(model, "mask_tuning")
    bb = model.backbone
    d = bb.feature_dim
    names = {n for n, p in bb.named_parameters() if p.requires_grad}
    expected = {"model.patch_embed.proj.score"} | {
        f"model.blocks.{i}.attn.{m}.score" for i in range(3) for m in ("qkv", "proj")}
    assert names == expected
    conv = bb.model.patch_embed.proj.base.weight.numel()
    trainable, _ = zoo.count_parameters(bb)
    assert trainable == conv + 3 * (3 * d * d + d * d)  # one score per masked weight


def test_row_subset_masks_only_selected_rows():
    model = tiny()
    zoo.apply_adapter(model, "mask_tuning", targets=["q", "v"], patch_embed=False)
    bb = model.backbone
    d = bb.feature_dim
    qkv = bb.model.blocks[0].attn.qkv
    assert isinstance(qkv, MaskedWeight) and tuple(qkv.score.shape) == (2 * d, d)
    with torch.no_grad():
        qkv.score.fill_(0.0)  # drop every selected weight
    w = qkv.masked_weight()
    assert torch.equal(w[:d], torch.zeros_like(w[:d])) and torch.equal(w[2 * d:], torch.zeros_like(w[2 * d:]))
    assert torch.equal(w[d:2 * d], qkv.base.weight[d:2 * d])  # k untouched
    assert not isinstance(bb.model.patch_embed.proj, MaskedWeight)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="must exceed threshold"):
        zoo.apply_adapter(tiny(), "mask_tuning", init_score=1e-3, threshold=5e-3)
    with pytest.raises(SiteError, match="Linear sites"):
        zoo.apply_adapter(tiny(), "mask_tuning", targets=["mlp"])
    with pytest.raises(ValueError, match="gdr_lambda"):
        zoo.apply_adapter(tiny(), "mask_tuning", gdr_lambda=2.0)


def test_teacher_gradient_is_zero_at_init_and_regulariser_value():
    """At init the masked model equals the teacher, so ∇_S KD = softmax(s) - softmax(t) back-propagated = 0."""
    model = tiny()
    zoo.apply_adapter(model, "mask_tuning", reg_weight=1e-4, gdr_lambda=1.0)
    a = adapter_of(model)
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    ctx = zoo.StepContext(model=model, inputs=x, targets=None, outputs=logits, forward=model)
    reg = a.extra_loss(ctx)
    expected = 1e-4 * sum(math.sqrt(s.numel()) * 1e-2 for s in a.scores())  # ||c·1||_2 = c·sqrt(n)
    assert reg.item() == pytest.approx(expected, rel=1e-4)  # float32 sums
    assert len(a.teacher_grads) == len(a.scores())
    for g in a.teacher_grads:
        assert g is not None and g.abs().max() < 1e-6


def test_training_changes_masks_and_merge_is_binary():
    model = tiny()
    zoo.apply_adapter(model, "mask_tuning", gdr_lambda=1.0)
    a = adapter_of(model)
    originals = {id(m): m.base.weight.detach().clone() for m in a.masked()}
    seen_teacher = []

    def check(model):  # after the first step the student differs from the teacher: g_b != 0
        seen_teacher.append(any(g is not None and g.abs().max() > 0 for g in a.teacher_grads))

    x = train(model, gdr_check=check)
    assert any(seen_teacher[1:])
    assert 0.0 < a.sparsity() < 1.0  # some masks flipped, most are kept
    out = model(x)
    zoo.merge_adapters(model, unload=False)
    assert torch.allclose(model(x), out, atol=1e-5)
    dropped = kept = 0
    for m in a.masked():
        w, w0 = m.base.weight, originals[id(m)]
        assert torch.all((w == w0) | (w == 0))
        keep = m.full_mask().bool()
        assert torch.equal(w[keep], w0[keep]) and torch.all(w[~keep] == 0)
        dropped += int((~keep).sum())
        kept += int(keep.sum())
    assert dropped > 0 and kept > 0
    zoo.unmerge_adapters(model)
    for m in a.masked():
        assert torch.equal(m.base.weight, originals[id(m)])
    zoo.merge_adapters(model, unload=True)  # plain model, masked weights
    assert not any(isinstance(mod, MaskedWeight) for mod in model.modules())
    assert torch.allclose(model(x), out, atol=1e-5)


def test_packbits_roundtrip_matches_numpy():
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    m = torch.rand(13, 7, generator=g) > 0.5
    packed = packbits(m)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(13 * 7 / 8)
    assert np.array_equal(packed.numpy(), np.packbits(m.numpy().reshape(-1)))
    assert torch.equal(unpackbits(packed, (13, 7)), m)


def test_artifact_stores_one_bit_per_masked_weight(tmp_path):
    model = tiny()
    zoo.apply_adapter(model, "mask_tuning", gdr_lambda=0.3)
    a = adapter_of(model)
    x = train(model, steps=4)
    assert a.sparsity() > 0
    bb = model.backbone
    zoo.save_adapter(bb, tmp_path / "art")  # the backbone alone: only the masks are stored
    f = tmp_path / "art" / "adapter.safetensors"
    raw = f.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    header.pop("__metadata__", None)
    n_masked = [s.numel() for s in a.scores()]
    packed = {k: v for k, v in header.items() if k.endswith("mask_packed")}
    shapes = {k: v for k, v in header.items() if k.endswith("mask_shape")}
    assert set(header) == set(packed) | set(shapes) and len(packed) == len(n_masked)
    assert all(v["dtype"] == "U8" for v in packed.values())
    data_bytes = sum(math.ceil(n / 8) for n in n_masked) + sum(8 * v["shape"][0] for v in shapes.values())  # int64 shapes
    assert f.stat().st_size == 8 + header_len + data_bytes
    assert sum(v["data_offsets"][1] - v["data_offsets"][0] for v in packed.values()) == sum(math.ceil(n / 8) for n in n_masked)
    assert f.stat().st_size < sum(n_masked) / 8 + 8192  # ~1 bit per weight (float scores: 32 bits)

    # round trip into a fresh backbone: identical masks and outputs
    fresh = tiny().backbone
    zoo.load_adapter(fresh, tmp_path / "art")
    b = adapter_of(fresh)
    for m1, m2 in zip(a.masked(), b.masked()):
        assert torch.equal(m1.full_mask(), m2.full_mask())
    assert torch.allclose(fresh(x), bb(x), atol=1e-6)


def test_gradient_dropout_lambda0_keeps_everything():
    g = torch.Generator().manual_seed(0)
    g_a, g_b = torch.randn(10000, generator=g), torch.randn(10000, generator=g)
    assert torch.equal(gradient_dropout(g_a, g_b, 0.0, torch.Generator().manual_seed(1)), g_a)


def _hook_on(g_a, g_b, lam):
    model = tiny(depth=1)
    zoo.apply_adapter(model, "mask_tuning", targets=[], patch_embed=True, gdr_lambda=lam)
    a = adapter_of(model)
    (score,) = a.scores()
    n = score.numel()
    score.grad = g_a[:n].reshape(score.shape).clone()
    a.teacher_grads = [g_b[:n].reshape(score.shape).clone()]
    a.before_optimizer_step()
    assert a.teacher_grads == []  # used once
    return score.grad.reshape(-1), g_a[:n], g_b[:n]


def test_hook_lambda0_keeps_all_elements():
    g = torch.Generator().manual_seed(0)
    g_a, g_b = torch.randn(200000, generator=g), torch.randn(200000, generator=g)
    out, ga, _ = _hook_on(g_a, g_b, 0.0)
    assert torch.equal(out, ga)


def test_hook_lambda1_drops_disagreeing_elements_with_the_right_probability():
    """Agreeing signs: P≈1, always kept. g_b = -3 g_a: P = |g_a|/(|g_a|+|g_b|) = 1/4 kept."""
    g = torch.Generator().manual_seed(0)
    n = 192 * 3 * 16 * 16  # the tiny patch-embedding conv
    g_a = torch.randn(n, generator=g)
    agree = torch.arange(n) % 2 == 0
    g_b = torch.where(agree, 2 * g_a, -3 * g_a)
    out, ga, _ = _hook_on(g_a, g_b, 1.0)
    kept = out != 0
    assert torch.equal(out[kept], ga[kept])  # kept elements unchanged, others exactly zero
    assert kept[agree].all()
    frac = kept[~agree].float().mean().item()
    sd = math.sqrt(0.25 * 0.75 / int((~agree).sum()))
    assert abs(frac - 0.25) < 5 * sd


def test_teacher_gradients_are_averaged_over_micro_batches():
    """Gradient accumulation: g_b of one optimizer step is the mean over its micro-batches, like g_a."""
    model = tiny()
    zoo.apply_adapter(model, "mask_tuning", gdr_lambda=1.0)
    a = adapter_of(model)
    with torch.no_grad():
        for s in a.scores():  # move away from the teacher so that g_b != 0
            s.copy_(torch.where(torch.rand_like(s) < 0.2, torch.zeros_like(s), s))
    xs = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    single = []
    for x in xs:
        logits = model(x)
        a.extra_loss(zoo.StepContext(model=model, inputs=x, targets=None, outputs=logits, forward=model))
        single.append([g.clone() for g in a.teacher_grads])
        a.teacher_grads, a._teacher_count = [], 0
    for x in xs:
        logits = model(x)
        a.extra_loss(zoo.StepContext(model=model, inputs=x, targets=None, outputs=logits, forward=model))
    for i, g in enumerate(a.teacher_grads):
        mean = sum(s[i] for s in single) / 3
        assert mean.abs().max() > 0 and torch.allclose(g, mean, atol=1e-9)


def test_scores_train_without_weight_decay():
    model = tiny()
    zoo.apply_adapter(model, "mask_tuning")
    a = adapter_of(model)
    groups = zoo.param_groups(model, 1e-3, 0.05)
    ids = {id(s) for s in a.scores()}
    (g,) = [g for g in groups if any(id(p) in ids for p in g["params"])]
    assert {id(p) for p in g["params"]} == ids and g["weight_decay"] == 0.0
    assert any(g2["weight_decay"] == 0.05 for g2 in groups)  # the head keeps its decay


# ---------------------------------------------------------------------- integration (train.py's job)
def test_mask_tuning_config_run_and_artifact_round_trip(tmp_path):
    """experiment=tiny trains (loss down); the artifact's bits are exactly the selected checkpoint's masks."""
    from pathlib import Path

    import lightning as L

    from tasks.runner import build_task
    from tests.helpers import compose_config, run_train

    overrides = ["experiment=tiny", "adapter=mask_tuning"]
    cfg = compose_config(overrides)
    assert cfg.adapter.name == "mask_tuning" and cfg.adapter.gdr_lambda == 0.3 and cfg.adapter.patch_embed
    m = run_train(overrides, tmp_path)
    assert m["train_loss_last"] < m["train_loss_first"]
    out = Path(m["out_dir"])
    (best,) = [p for p in (out / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    ckpt = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    scores = {k[len("model."):]: v for k, v in ckpt.items() if k.endswith(".score")}
    L.seed_everything(cfg.seed)
    fresh = build_task(cfg).model
    zoo.remove_adapters(fresh)
    zoo.load_adapter(fresh, out / "adapter")
    a = adapter_of(fresh)
    masked = {n: mod for n, mod in fresh.named_modules() if isinstance(mod, MaskedWeight)}
    assert len(masked) == len(scores) == 1 + 2 * 2  # patch embedding + (qkv, proj) x depth 2
    dropped = 0
    for name, mod in masked.items():
        want = scores[name + ".score"] > a.threshold
        assert torch.equal(mod.score > a.threshold, want)
        dropped += int((~want).sum())
    assert dropped > 0
    n_bits = sum(s.numel() for s in scores.values())
    head = sum(p.numel() * 4 for p in fresh.head.parameters())
    art = (out / "adapter" / "adapter.safetensors").stat().st_size
    assert art < n_bits / 8 + head + 8192


@pytest.mark.slow  # two 2-process runs; `make test-slow` runs it
def test_mask_tuning_ddp_cpu(tmp_path):
    from tests.helpers import run_train_ddp

    from pathlib import Path

    from safetensors import safe_open

    # GDR under DDP: g_b is all-reduced and U drawn from identically seeded generators on both ranks
    m = run_train_ddp(["experiment=tiny", "adapter=mask_tuning", "trainer.limit_train_batches=4"], tmp_path)
    assert m["adapter"] == "mask_tuning"
    assert math.isfinite(m["train_loss_first"]) and math.isfinite(m["train_loss_last"])
    with safe_open(str(Path(m["out_dir"]) / "adapter" / "adapter.safetensors"), "pt") as f:
        packed = [k for k in f.keys() if k.endswith("mask_packed")]
        assert len(packed) == 5 and not any(k.endswith(".score") for k in f.keys())


def test_teacher_runs_without_stochastic_depth():
    """issue 15: with drop-path > 0 in training mode the teacher must be the deterministic unmasked
    model (the student's own forward keeps its drop-path). Before the fix the teacher ran in train
    mode and differed from the unmasked model even at init (masks all ones)."""
    torch.manual_seed(0)
    bb = zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                             drop_path_rate=0.9)
    model = zoo.ImageClassifier(bb, 5)
    zoo.apply_adapter(model, "mask_tuning", gdr_lambda=1.0)
    a = adapter_of(model)
    x = torch.randn(4, 3, 32, 32)
    seen = []
    model.train()
    logits = model(x)
    ctx = zoo.StepContext(model=model, inputs=x, targets=None, outputs=logits,
                          forward=lambda inp: seen.append(model(inp)) or seen[-1])
    a.extra_loss(ctx)
    assert model.training and all(m.training for m in model.modules())  # flags restored
    model.eval()
    with torch.no_grad(), a.masks_disabled():
        want = model(x)
    torch.testing.assert_close(seen[0], want, atol=0, rtol=0)
