"""MoSA: partitions, sparse training, merge = expectation, export, consistency loss, DDP."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.adapters.base import StepContext
from zoo.adapters.mosa import MoSA, SplitLinear, export_plain_adapter, random_partition, symmetric_kl


def tiny(num_classes=5, depth=2, **cfg):
    torch.manual_seed(0)
    bb = zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=depth)
    model = zoo.ImageClassifier(bb, num_classes)
    zoo.apply_adapter(model, "mosa", **{"bottleneck": 8, **cfg})
    return model


def mosa_of(model) -> MoSA:
    return zoo.adapters_of(model)[0]


def randomize(model, std=0.5):
    """Pretend training happened: give every expert's entries (and biases) distinct values."""
    with torch.no_grad():
        for s in mosa_of(model).split_layers():
            s.delta.normal_(0, std)
            s.bias.normal_(0, std)


def test_partition_is_disjoint_equal_and_covering():
    part = random_partition((7, 13), 4, seed=3)
    masks = torch.stack([part == k for k in range(4)])
    assert torch.equal(masks.sum(0), torch.ones(7, 13, dtype=torch.long))  # each entry in exactly one set
    sizes = masks.flatten(1).sum(1)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 7 * 13
    assert torch.equal(part, random_partition((7, 13), 4, seed=3))
    assert not torch.equal(part, random_partition((7, 13), 4, seed=4))


@pytest.mark.parametrize("share", ["down", "up", "none"])
def test_split_layers_follow_share_and_masks_are_reproducible(share):
    model, again = tiny(share=share), tiny(share=share)
    splits = mosa_of(model).split_layers()
    b = mosa_of(model).bottlenecks()[0]
    assert isinstance(b.up, SplitLinear) == (share in ("down", "none"))
    assert isinstance(b.down, SplitLinear) == (share in ("up", "none"))
    assert len(splits) == 2 * (2 if share == "none" else 1)
    for s, s2 in zip(splits, mosa_of(again).split_layers()):
        masks = torch.stack([s.mask(k) for k in range(s.experts)]).long()
        assert torch.equal(masks.sum(0), torch.ones_like(masks[0]))
        assert torch.equal(s.partition, s2.partition)  # derived from mask_seed and the layer
    # different blocks get different partitions
    assert not torch.equal(splits[0].partition, splits[-1].partition)
    # split down projection: every expert starts at the shared Kaiming init W0, up at zero
    if share != "down":
        assert b.down.weight0 is not None and b.down.weight0.abs().sum() > 0
    if share != "up":
        assert b.up.weight0 is None


@pytest.mark.parametrize("share", ["down", "none"])
def test_training_step_changes_only_the_active_experts_entries(share):
    model = tiny(share=share, consistency_weight=0.0)
    with torch.no_grad():  # a non-zero up-projection so that a split down also gets gradients
        for b in mosa_of(model).bottlenecks():
            if not isinstance(b.up, SplitLinear):
                b.up.weight.normal_(0, 0.1)
            else:
                b.up.delta.normal_(0, 0.1)
    splits = mosa_of(model).split_layers()
    before = [(s.delta.detach().clone(), s.bias.detach().clone()) for s in splits]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    F.cross_entropy(model(x), y).backward()
    zoo.before_optimizer_step(model)
    opt.step()
    for s, (d0, b0) in zip(splits, before):
        k = s.last_expert
        changed = s.delta.detach() != d0
        assert changed.any()
        assert not (changed & ~s.mask(k)).any(), "an entry outside the active partition moved"
        rows = (s.bias.detach() != b0).any(1)
        assert rows[k] and rows.sum() == 1, "only the active expert's bias may move"


def test_merged_output_is_the_expectation_over_experts():
    model = tiny(share="down", dropout=0.0)
    randomize(model)
    b = mosa_of(model).bottlenecks()[0]
    h = torch.randn(3, 5, 192)
    b.train()
    outs = []
    for k in range(b.up.experts):
        b.up.active = k
        outs.append(b(h))
    b.up.active = None
    b.eval()
    torch.testing.assert_close(b(h), torch.stack(outs).mean(0), rtol=1e-5, atol=1e-6)
    # and each training output used exactly expert k: W0 + M_k ⊙ Δ
    k_out = F.linear(F.gelu(b.down(b.norm(h))), b.up.delta * b.up.mask(2), b.up.bias[2]) * b.scale
    torch.testing.assert_close(outs[2], k_out)


def test_eval_is_deterministic_training_is_stochastic():
    model = tiny(dropout=0.0)
    randomize(model)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    outs = [model(x) for _ in range(10)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_export_gives_a_plain_adaptformer_with_identical_outputs():
    model = tiny(share="up")
    randomize(model)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    want = model(x)
    trainable_mosa = zoo.count_parameters(model)[0]
    mosa_of(model).export(model)
    assert [a.name for a in zoo.adapters_of(model)] == ["adapter"]
    assert zoo.adapters_of(model)[0].config["style"] == "adaptformer"
    model.eval()
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    ref = zoo.ImageClassifier(zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2), 5)
    zoo.apply_adapter(ref, "adapter", style="adaptformer", bottleneck=8, layernorm=True)
    d, r, depth, head = 192, 8, 2, 192 * 5 + 5
    plain = depth * (2 * d + (d * r + r) + (r * d + d))  # LN + down + up
    assert zoo.count_parameters(model)[0] == zoo.count_parameters(ref)[0] == plain + head
    # MoSA during training: share=up splits the down projection -> N private biases there
    assert trainable_mosa == plain + head + depth * (4 - 1) * r


def test_export_refuses_other_adapters():
    model = tiny()
    zoo.apply_adapter(model, "lora", rank=2)
    with pytest.raises(ValueError, match="exactly one MoSA"):
        export_plain_adapter(model)


def test_consistency_loss_is_the_symmetric_kl_of_two_passes():
    model = tiny(ce2_weight=0.5)
    randomize(model)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    model.train()
    z1 = model(x)
    seen = []

    def forward(inp):
        seen.append(inp)
        return model(inp)

    torch.manual_seed(5)
    ctx = StepContext(model=model, inputs=x, targets=y, outputs=z1, loss_fn=F.cross_entropy, forward=forward)
    loss = zoo.extra_loss(model, ctx)
    assert len(seen) == 1 and seen[0] is x
    torch.manual_seed(5)
    z2 = model(x)
    p1, p2 = z1.softmax(1), z2.softmax(1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(1).mean()  # KL(p || q), batchmean
    want = 0.5 * (kl(p2, p1) + kl(p1, p2)) + 0.5 * F.cross_entropy(z2, y)
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-6)
    assert loss.requires_grad and loss > 0
    # stop-gradient on each target: d/dz1 of the KL is p1 - p2 (per sample, / batch)
    z1d, z2d = z1.detach().requires_grad_(), z2.detach().requires_grad_()
    symmetric_kl(z1d, z2d).backward()
    torch.testing.assert_close(z1d.grad, 0.5 * (p1 - p2).detach() / 4, rtol=1e-4, atol=1e-7)
    model.eval()
    assert mosa_of(model).extra_loss(ctx) is None  # no second pass outside training


def test_bad_share_lists_options():
    with pytest.raises(ValueError, match="down, up, none"):
        tiny(share="left")


def test_artifact_round_trip(tmp_path):
    model = tiny(share="none")
    randomize(model)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    want = model(x)
    zoo.save_adapter(model, tmp_path)
    torch.manual_seed(0)  # the same base weights (the fingerprint is checked) ...
    other = zoo.ImageClassifier(zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2), 5)
    torch.manual_seed(99)  # ... but a different adapter init: W0 and Δ must come from the artifact
    zoo.load_adapter(other, tmp_path)
    other.eval()
    assert torch.equal(other(x), want)


# ---------------------------------------------------------------------- through train.py's job
def _reload_artifact(cfg_overrides, artifact):
    """Rebuild the run's model from its config and seed, load the artifact, return it."""
    import lightning as L

    from tasks.runner import build_task
    from tests.helpers import compose_config

    L.seed_everything(0)
    fresh = build_task(compose_config(cfg_overrides)).model
    zoo.remove_adapters(fresh)
    zoo.load_adapter(fresh, artifact)
    return fresh


def test_tiny_run_trains_and_artifact_round_trips(tmp_path):
    from pathlib import Path

    from safetensors.torch import load_file

    from tests.helpers import run_train

    overrides = ["experiment=tiny", "adapter=mosa", "adapter.bottleneck=8"]
    m = run_train(overrides, tmp_path)
    assert m["adapter"] == "mosa"
    assert m["train_loss_last"] < m["train_loss_first"]
    art = Path(m["out_dir"]) / "adapter"
    fresh = _reload_artifact(overrides, art)
    saved = load_file(str(art / "adapter.safetensors"))
    state = zoo.adapter_state_dict(fresh)
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    assert any(k.endswith("up.delta") and v.abs().sum() > 0 for k, v in saved.items())


def test_ddp_cpu_run(tmp_path):
    """train.py trainer=ddp_cpu: DDP without find_unused_parameters (every parameter gets a gradient)."""
    from pathlib import Path

    from tests.helpers import run_train_ddp

    m = run_train_ddp(["experiment=tiny", "adapter=mosa", "adapter.bottleneck=8"], tmp_path)
    assert m["adapter"] == "mosa"
    assert m["train_loss_first"] > 0 and m["train_loss_last"] > 0  # finite, both epochs ran
    assert "find_unused_parameters=True" not in m["log"]
    from safetensors.torch import load_file

    saved = load_file(str(Path(m["out_dir"]) / "adapter" / "adapter.safetensors"))
    assert any(k.endswith("up.delta") and v.abs().sum() > 0 for k, v in saved.items())
    assert (Path(m["out_dir"]) / "adapter" / "adapter.safetensors").is_file()


def test_sparse_update_with_adamw_and_what_momentum_does():
    """issue 15, with the optimizer the recipes use (AdamW). Step 1: only the active expert's entries
    and bias move (Adam's moments of the others are zero, so their update is 0/(0+eps) = 0; weight
    decay 0). Step 2 with another expert: the first expert's entries *keep moving* (their first
    moment decays by β1 but is not zero) -- the reference's N copies with ``grad=None`` would be
    skipped instead (see the module docstring); entries of neither expert never move. With weight
    decay every non-zero Δ entry shrinks by (1 − lr·wd), active or not."""
    model = tiny(share="down", consistency_weight=0.0, dropout=0.0)
    with torch.no_grad():
        for b in mosa_of(model).bottlenecks():
            b.up.delta.normal_(0, 0.1)
    splits = mosa_of(model).split_layers()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))

    def step(expert):
        for s in splits:
            s.active = expert
        before = [s.delta.detach().clone() for s in splits]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        zoo.before_optimizer_step(model)
        opt.step()
        return [s.delta.detach() != d for s, d in zip(splits, before)]

    first = step(0)
    for s, changed in zip(splits, first):
        assert changed.any() and not (changed & ~s.mask(0)).any()
    second = step(1)
    for s, changed in zip(splits, second):
        assert (changed & s.mask(0)).any(), "momentum moves the previously active expert's entries"
        assert not (changed & ~(s.mask(0) | s.mask(1))).any(), "an entry of neither expert moved"
    # decoupled weight decay: inactive non-zero entries shrink by exactly (1 - lr*wd) in a step
    for g in opt.param_groups:
        g["weight_decay"] = 0.5
    s = splits[0]
    never = ~(s.mask(0) | s.mask(1) | s.mask(2))
    d0 = s.delta.detach().clone()
    step(2)
    torch.testing.assert_close(s.delta.detach()[never], d0[never] * (1 - 1e-2 * 0.5))
