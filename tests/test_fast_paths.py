"""Every fast path equals the straightforward computation it replaces: forward and gradients.

No timing here (the speed-ups are measured by ``python -m bench.adapters``); these tests pin that
the faster arithmetic computes the same function, and that caches are dropped when they go stale.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import zoo
from zoo.adapters.mhr import MHRLinear
from zoo.adapters.salt import SALTLinear

torch.set_num_threads(1)


def tiny_classifier(depth: int = 2, seed: int = 0) -> zoo.ImageClassifier:
    torch.manual_seed(seed)
    bb = zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             depth=depth, embed_dim=64, num_heads=2)
    return zoo.ImageClassifier(bb, 3)


def randomise_adapter(model: nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Move every adapter tensor away from its init (zero B etc.) so the deltas are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in zoo.api.iter_adapter_modules(model):
            for name, p in m.named_parameters():
                if not name.startswith("base."):
                    p.add_(torch.randn(p.shape, generator=g) * scale)


def loss_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    F.cross_entropy(out, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads, x.grad.clone()


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    out_a, g_a, xg_a = a
    out_b, g_b, xg_b = b
    torch.testing.assert_close(out_a, out_b, rtol=rtol, atol=atol)
    assert g_a.keys() == g_b.keys() and len(g_a) > 0
    for n in g_a:
        torch.testing.assert_close(g_a[n], g_b[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")
    torch.testing.assert_close(xg_a, xg_b, rtol=rtol, atol=atol)


def batch(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)


# ----------------------------------------------------------------------------------- MHR
@pytest.mark.parametrize("targets", [["q", "k", "v", "o", "fc1", "fc2"], ["qkv", "fc2"]])
def test_mhr_one_task_batch_equals_per_sample_path(targets):
    """One task in the batch: (A_t, B_t) mixed once per layer and all slices in two matmuls,
    against the per-sample path (one mixed adapter per row, batched matmuls, per-slice writes)."""
    model = tiny_classifier()
    zoo.apply_adapter(model, "mhr", n_tasks=3, n_skills=3, n_splits=4, rank=2, alpha=2.0, targets=targets)
    randomise_adapter(model)
    model.train()
    adapter = zoo.api.adapters_of(model)[0]
    x, y = batch(3)
    zoo.set_task(model, 2)
    assert adapter.task.single == 2  # the fast path is the one taken
    fast = loss_and_grads(model, x, y)
    adapter.task.single = None  # same ids (2, 2, 2), but per sample
    slow = loss_and_grads(model, x, y)
    assert_same(fast, slow)


def count_ops(model: nn.Module, x: torch.Tensor, op=torch.ops.aten.addmm_) -> int:
    """How many calls of ``op`` a no-grad forward runs (default: the fused low-rank ops' in-place
    ``addmm_``): which path is taken."""
    class Count(torch.utils._python_dispatch.TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func.overloadpacket is op
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(x)
    return Count.n


def set_flags(model: nn.Module, **flags) -> None:
    for m in zoo.api.iter_adapter_modules(model):
        for k, v in flags.items():
            if hasattr(m, k):
                setattr(m, k, v)


@pytest.mark.parametrize("targets", [["q", "k", "v", "o", "fc1", "fc2"], ["qkv", "fc2"], ["v"]])
def test_mhr_batched_mix_and_fused_op_equal_the_per_slice_composition(targets):
    """All slices and heads mixed by one batched einsum, and base + delta as one fused op, against
    mixing slice by slice with ``mix`` and composing ``base(x) + delta``: forward and gradients."""
    model = tiny_classifier()
    zoo.apply_adapter(model, "mhr", n_tasks=2, n_skills=3, n_splits=4, rank=2, alpha=2.0, targets=targets)
    randomise_adapter(model)
    model.train()
    zoo.set_task(model, 1)
    x, y = batch(3)
    n_layers = len(list(zoo.api.iter_adapter_modules(model)))
    assert count_ops(model, x) == n_layers
    fast = loss_and_grads(model, x, y)
    set_flags(model, batched_mix=False, fused=False)
    assert count_ops(model, x) == 0
    slow = loss_and_grads(model, x, y)
    assert_same(fast, slow)
    set_flags(model, batched_mix=True, fused=False)  # each change alone
    assert_same(loss_and_grads(model, x, y), slow)
    set_flags(model, batched_mix=False, fused=True)
    assert_same(loss_and_grads(model, x, y), slow)


def test_mhr_eval_cache_is_reused_and_dropped_when_stale():
    """Eval without gradients forms the mixed adapters once per task and reuses them; a parameter
    change (optimizer step, copy_), another task or .train() gives a fresh one."""
    model = tiny_classifier()
    zoo.apply_adapter(model, "mhr", n_tasks=2, n_skills=3, n_splits=4, rank=2, targets=["qkv", "fc1"])
    randomise_adapter(model)
    layer = next(m for m in zoo.api.iter_adapter_modules(model) if isinstance(m, MHRLinear))
    x, _ = batch(2)

    def reference():  # the uncached computation (eval mode, gradients enabled)
        with torch.enable_grad():
            return model(x).detach()

    model.eval()
    zoo.set_task(model, 1)
    with torch.no_grad():
        first = model(x)
        cached = layer._cache
        assert cached is not None and cached[0][0] == 1
        torch.testing.assert_close(first, reference(), rtol=1e-5, atol=1e-6)
        model(x)
        assert layer._cache is cached  # reused, not re-formed
        layer.mhr_B["qkv"].add_(0.5)  # an in-place change (as an optimizer step) invalidates it
        changed = model(x)
        assert layer._cache is not cached
        assert not torch.allclose(changed, first)
        torch.testing.assert_close(changed, reference(), rtol=1e-5, atol=1e-6)
        zoo.set_task(model, 0)
        torch.testing.assert_close(model(x), reference(), rtol=1e-5, atol=1e-6)
        assert layer._cache[0][0] == 0
    model.train()
    assert layer._cache is None


# ----------------------------------------------------------------------------------- fused low-rank op
def test_lowrank_op_gradients_match_finite_differences():
    """The fused op's hand-written backward against torch's numerical gradients (float64), with every
    input requiring grad, with and without bias, scaling != 1."""
    from zoo.adapters.lowrank import _LowRankLinear

    g = torch.Generator().manual_seed(0)
    for bias in (True, False):
        x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
        b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
        a = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
        bt = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda *t: _LowRankLinear.apply(*t, 0.7), (x, w, b, a, bt))
        want = x @ w.t() + (0 if b is None else b) + ((x @ a.t()) * 0.7) @ bt
        torch.testing.assert_close(_LowRankLinear.apply(x, w, b, a, bt, 0.7), want)
        # a separate branch input (LoRA dropout: x_b = dropout(x)), every input requiring grad
        xb = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x_, w_, b_, a_, bt_, xb_: _LowRankLinear.apply(x_, w_, b_, a_, bt_, 0.7, xb_),
                                        (x, w, b, a, bt, xb))
        want = x @ w.t() + (0 if b is None else b) + ((xb @ a.t()) * 0.7) @ bt
        torch.testing.assert_close(_LowRankLinear.apply(x, w, b, a, bt, 0.7, xb), want)


@pytest.mark.parametrize("name,config", [
    ("lora", {}),
    ("lora", {"targets": ["qkv", "o", "fc1", "fc2"], "rank": 3, "alpha": 6.0}),
    ("comp_lora", {"dropout": 0.0}),  # dropout > 0: test_lora_dropout_fused_op_equals_composition
    ("colora", {"ranks": "uneven"}),
])
def test_lora_fused_op_equals_composition(name, config):
    """LoRALinear's fused path (LoRA, Comp-LoRA, CoLoRA's per-layer ranks) against ``base(x) + delta``
    composed by autograd: forward and gradients of every trainable tensor and of the input."""
    if config.get("ranks") == "uneven":
        probe = tiny_classifier()
        zoo.apply_adapter(probe, "colora")
        paths = [s.path for s in zoo.api.adapters_of(probe)[0].targets_found]
        config = {"ranks": {p: 1 + (5 * i) % 11 for i, p in enumerate(paths)}}
    model = tiny_classifier()
    zoo.apply_adapter(model, name, **config)
    randomise_adapter(model)
    model.train()
    x, y = batch(3)
    assert count_ops(model, x) == len(list(zoo.api.iter_adapter_modules(model)))
    fast = loss_and_grads(model, x, y)
    set_flags(model, fused=False)
    assert count_ops(model, x) == 0
    assert_same(fast, loss_and_grads(model, x, y))


def fused_then_composed(model: nn.Module, x, y, seed: int):
    """Loss and gradients with every adapter layer on its fused op, then with ``fused=False`` (the
    composition), each from the same RNG state (dropout masks drawn alike)."""
    assert count_ops(model, x) == len(list(zoo.api.iter_adapter_modules(model)))
    torch.manual_seed(seed)
    fast = loss_and_grads(model, x, y)
    set_flags(model, fused=False)
    assert count_ops(model, x) == 0
    torch.manual_seed(seed)
    return fast, loss_and_grads(model, x, y)


@pytest.mark.parametrize("name,config", [
    ("lora", {"dropout": 0.25, "targets": ["qkv", "fc1"]}),
    ("comp_lora", {}),  # its default dropout 0.25 (CLIP-LoRA's)
])
def test_lora_dropout_fused_op_equals_composition(name, config):
    """With dropout the fused op takes dropout(x) as the branch input and x for the base: the same
    function as ``base(x) + γ (dropout(x) Aᵀ) Bᵀ`` under the same RNG state, forward and gradients."""
    model = tiny_classifier()
    zoo.apply_adapter(model, name, **config)
    randomise_adapter(model)
    model.train()
    x, y = batch(3)
    fast, slow = fused_then_composed(model, x, y, seed=7)
    assert_same(fast, slow)
    torch.manual_seed(8)  # the dropout is live: another draw gives another output
    assert not torch.allclose(loss_and_grads(model, x, y)[0], slow[0])


# ----------------------------------------------------------------------------------- Hydra, SSF
def test_hydra_op_gradients_match_finite_differences():
    """The fused Hydra op's backward (dA_s from x without y0, dx through [A_p; A_s W]) against numerical
    gradients in float64, with biases and dropout masks, and its forward against the formula."""
    from zoo.adapters.lowrank import _HydraLinear

    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=grad)

    x, w, b = r(2, 3, 5), r(4, 5, grad=False), r(4, grad=False)
    ap, dp, bp, up = r(2, 5), r(2), r(4, 2), r(4)
    as_, ds, bs, us = r(3, 4), r(3), r(4, 3), r(4)
    mp = (torch.rand(2, 3, 2, generator=g, dtype=torch.float64) > 0.3).double() / 0.7
    ms = (torch.rand(2, 3, 3, generator=g, dtype=torch.float64) > 0.3).double() / 0.7
    for masks in ((None, None), (mp, ms)):
        def f(x_, ap_, dp_, bp_, up_, as_a, ds_, bs_, us_):
            return _HydraLinear.apply(x_, w, b, ap_, dp_, bp_, up_, as_a, ds_, bs_, us_, *masks, 0.6)
        args = (x, ap, dp, bp, up, as_, ds, bs, us)
        assert torch.autograd.gradcheck(f, args)
        y0 = x @ w.t() + b
        hp, hs = x @ ap.t() + dp, y0 @ as_.t() + ds
        if masks[0] is not None:
            hp, hs = hp * mp, hs * ms
        want = y0 + 0.6 * (hp @ bp.t() + up + hs @ bs.t() + us)
        torch.testing.assert_close(f(*args), want)


@pytest.mark.parametrize("config", [
    {},  # o, fc2, rank 2, biases
    {"targets": ["qkv", "o", "fc1", "fc2"], "dropout": 0.2},  # the VTAB configs' dropout
    {"bias": False, "par_rank": 3, "seq_rank": 5, "scale": 0.7},
])
def test_hydra_fused_op_equals_composition(config):
    """HydraLinear's fused op against ``y0 + s·(par(x) + seq(y0))`` composed by autograd, under the same
    RNG state (the dropout masks are drawn in the composition's order): forward and gradients."""
    model = tiny_classifier()
    zoo.apply_adapter(model, "hydra", **config)
    randomise_adapter(model)
    with torch.no_grad():  # timm initialises Linear biases to zero; A_s's gradient has a term in b
        for m in zoo.api.iter_adapter_modules(model):
            m.base.bias.normal_(0, 0.5)
    model.train()
    x, y = batch(3)
    assert_same(*fused_then_composed(model, x, y, seed=3))


def test_hydra_fused_op_not_used_on_a_trainable_base():
    """The fused op forms no weight gradient: a trainable base Linear takes the composition."""
    model = tiny_classifier()
    zoo.apply_adapter(model, "hydra")
    x, _ = batch(2)
    n = len(list(zoo.api.iter_adapter_modules(model)))
    assert count_ops(model, x) == n
    for m in zoo.api.iter_adapter_modules(model):
        m.base.weight.requires_grad_(True)
    assert count_ops(model, x) == 0


@pytest.mark.parametrize("config", [{}, {"init": "identity", "targets": ["norm1", "fc1", "norm2"]}])
def test_ssf_fast_paths_equal_composition(config):
    """SSF with the LayerNorm-affine fold and the fused scale-shift op against ``y * γ + β`` after the
    unchanged layer: forward and gradients (γ, β and the input)."""
    model = tiny_classifier()
    zoo.apply_adapter(model, "ssf", **config)
    randomise_adapter(model)
    model.train()
    x, y = batch(3)

    def fast_ops():  # each fast path runs one addcmul (the folded LN bias, or the op)
        return count_ops(model, x, torch.ops.aten.addcmul)

    assert fast_ops() == len(list(zoo.api.iter_adapter_modules(model)))  # every site fast
    fast = loss_and_grads(model, x, y)
    set_flags(model, fused=False)
    assert fast_ops() == 0
    assert_same(fast, loss_and_grads(model, x, y))


# ----------------------------------------------------------------------------------- SALT
def salt_layer(d_in=24, d_out=40, seed=0, **kw) -> SALTLinear:
    torch.manual_seed(seed)
    m = SALTLinear(nn.Linear(d_in, d_out).requires_grad_(False), ratio=kw.pop("ratio", 0.25), r_lora=kw.pop("r_lora", 3))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # far enough from init that both ReLUs clip something
        m.scale.add_(torch.randn(m.scale.shape, generator=g) * 0.5)
        m.shift.copy_(torch.randn(m.shift.shape, generator=g) * m.S[: m.rank].max())
        m.X.add_(torch.randn(m.X.shape, generator=g) * 0.1)
        m.Y.copy_(torch.randn(m.Y.shape, generator=g) * 0.1)
    return m


def salt_grads(m: SALTLinear, x: torch.Tensor):
    for p in m.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    out = m(x)
    (out.square().mean() + out.sum()).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    return out.detach(), grads, x.grad.clone()


def test_salt_weight_path_equals_factored_path():
    m = salt_layer()
    x = torch.randn(3, 5, 24)
    m.weight_path_cheaper = lambda tokens: True
    fast = salt_grads(m, x)
    m.fast_path = False  # always the factored forward
    slow = salt_grads(m, x)
    assert_same(fast, slow, rtol=1e-4, atol=1e-5)
    # both are the paper's W' = U ReLU(Σ') Vᵀ
    torch.testing.assert_close(fast[0], x @ m.adapted_weight().T + m.base.bias, rtol=1e-4, atol=1e-4)


def test_salt_path_choice_follows_counted_flops():
    """The cost model picks the path with fewer counted multiply-adds (forward + backward)."""
    m = salt_layer(d_in=48, d_out=96, ratio=0.1, r_lora=16)

    def counted(tokens: int, weight: bool) -> int:
        m.weight_path_cheaper = lambda t: weight
        x = torch.randn(tokens, 48)
        with FlopCounterMode(display=False) as fc:
            m(x).sum().backward()
        return fc.get_total_flops()

    for tokens in (4, 2000):
        factored, weight = counted(tokens, False), counted(tokens, True)
        del m.weight_path_cheaper  # the real rule
        assert m.weight_path_cheaper(tokens) == (weight < factored), (tokens, factored, weight)
    assert not m.weight_path_cheaper(4) and m.weight_path_cheaper(2000)


def test_salt_eval_uses_cached_weight_equal_to_unmerged():
    m = salt_layer()
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        want = m.factored_forward(x)
    m.eval()
    with torch.inference_mode():
        out = m(x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    cached = m._w_cache[1]
    torch.testing.assert_close(cached, m.adapted_weight().detach(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        m(x)
    assert m._w_cache[1] is cached  # reused, not re-formed


def test_salt_cache_invalidated_by_train_mode():
    m = salt_layer().eval()
    x = torch.randn(4, 24)
    with torch.no_grad():
        m(x)
    assert m._w_cache is not None
    m.train()
    assert m._w_cache is None
    # a training step changes the parameters; the next eval forward sees them
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(x).square().sum().backward()
    opt.step()
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.factored_forward(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change", ["in_place", "load_state_dict", "optimizer_in_eval", "base_weight"])
def test_salt_cache_invalidated_by_parameter_change(change):
    m = salt_layer().eval()
    x = torch.randn(4, 24)
    with torch.no_grad():
        before = m(x)
    if change == "in_place":
        with torch.no_grad():
            m.Y.mul_(3.0)
    elif change == "load_state_dict":
        sd = copy.deepcopy(m.state_dict())
        sd["X"] = sd["X"] * 2
        m.load_state_dict(sd)
    elif change == "optimizer_in_eval":  # still in eval mode: only the version counters move
        opt = torch.optim.SGD([m.scale, m.shift, m.X, m.Y], lr=0.5)
        m.factored_forward(x).square().sum().backward()
        opt.step()
    else:  # the frozen base weight changes (and the SVD with it)
        with torch.no_grad():
            m.base.weight.mul_(1.5)
        m.recompute_svd()
    with torch.no_grad():
        after = m(x)
        want = m.factored_forward(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-5)


def test_salt_eval_with_gradients_does_not_use_the_cache():
    m = salt_layer().eval()
    x = torch.randn(4, 24)
    m(x).sum().backward()  # eval mode, grad enabled: gradients must still reach SALT's parameters
    assert m.Y.grad is not None and m.Y.grad.abs().sum() > 0
    assert m._w_cache is None


def test_salt_model_eval_equals_merged():
    model = tiny_classifier()
    zoo.apply_adapter(model, "salt", r_lora=4)
    randomise_adapter(model, scale=0.05)
    model.eval()
    x, _ = batch(2)
    with torch.inference_mode():
        cached = model(x)
    merged = zoo.merge_adapters(copy.deepcopy(model), unload=True).eval()
    with torch.inference_mode():
        torch.testing.assert_close(cached, merged(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------- activation checkpointing
def tiny_with(adapter: str | None, drop: float = 0.1, seed: int = 0) -> zoo.ImageClassifier:
    torch.manual_seed(seed)
    bb = zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             depth=2, embed_dim=64, num_heads=2, drop_rate=drop, proj_drop_rate=drop,
                             drop_path_rate=drop)
    model = zoo.ImageClassifier(bb, 3)
    if adapter is not None:
        zoo.apply_adapter(model, adapter)
        randomise_adapter(model)
    return model.train()


@pytest.mark.parametrize("adapter", ["lora", "vpt", None])
def test_checkpoint_blocks_gives_the_same_gradients(adapter):
    """Dropout and drop-path active (RNG state is replayed in the recomputation); VPT's prompted
    blocks are wrappers in the block list, checkpointed with their prompts."""
    plain = tiny_with(adapter)
    ckpt = copy.deepcopy(plain)
    assert zoo.checkpoint_blocks(ckpt) == 2
    x, y = batch(2)
    torch.manual_seed(5)
    want = loss_and_grads(plain, x, y)
    torch.manual_seed(5)
    got = loss_and_grads(ckpt, x, y)
    assert_same(got, want, rtol=0, atol=0)  # same kernels in the same order: bitwise equal
    assert ckpt.state_dict().keys() == plain.state_dict().keys()


def test_checkpoint_blocks_recomputes_in_training_only_and_can_be_undone():
    model = tiny_with("lora", drop=0.0)
    zoo.checkpoint_blocks(model)
    calls = []
    # the block's first layer: the recomputation stops early, after the last tensor backward needs
    zoo.find_backbone(model).blocks()[0].norm1.register_forward_pre_hook(lambda *a: calls.append(1))
    x, y = batch(2)
    F.cross_entropy(model(x), y).backward()
    assert len(calls) == 2  # forward, then recomputed in backward
    calls.clear()
    copy.deepcopy(model)(x).sum().backward()  # a copy (hooks included) stays checkpointed
    assert len(calls) == 2
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(x)
    assert len(calls) == 1
    calls.clear()
    zoo.checkpoint_blocks(model, enabled=False)
    model.train()
    F.cross_entropy(model(x), y).backward()
    assert len(calls) == 1


def test_checkpoint_blocks_with_lightning_and_pickle(tmp_path):
    import pickle

    from tasks.trainer.perf import PerfOptions, perf_callbacks

    cfg = {"max_epochs": 1, "compile": False, "checkpoint_blocks": True}
    (cb,) = perf_callbacks(cfg)
    assert cfg == {"max_epochs": 1}  # Lightning's Trainer never sees the options
    assert perf_callbacks({"compile": False}) == []

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = tiny_with("lora")

    holder = Holder()
    cb.setup(None, holder, "fit")
    blocks = zoo.find_backbone(holder.model).blocks_container()
    assert all(isinstance(b, zoo.activation_checkpoint.CheckpointedBlock) for b in blocks)
    back = pickle.loads(pickle.dumps(holder.model))  # ddp_spawn pickles the model
    x, _ = batch(2)
    torch.testing.assert_close(back.eval()(x), holder.model.eval()(x))
    with pytest.raises(ValueError, match="trainer.compile"):
        PerfOptions(compile="yes")


# ------------------------------------------------------------------- torch.compile
@pytest.mark.slow  # inductor compiles C++ for a few minutes on a loaded CPU
def test_compile_matches_eager_forward_and_gradients():
    """``trainer.compile=true`` compiles the task's model in place (``nn.Module.compile``):
    same outputs and gradients as eager within float tolerance, same state_dict keys."""
    from tasks.trainer.perf import PerfOptions

    eager = tiny_with("lora", drop=0.0)
    compiled = copy.deepcopy(eager)

    class Holder(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

    PerfOptions(compile=True).setup(None, Holder(compiled), "fit")
    x, y = batch(2)
    assert_same(loss_and_grads(compiled, x, y), loss_and_grads(eager, x, y), rtol=1e-4, atol=1e-5)
    assert compiled.state_dict().keys() == eager.state_dict().keys()


@pytest.mark.parametrize("name,config", [("hydra", {}), ("ssf", {}), ("lora", {"dropout": 0.25})])
def test_fused_ops_trace_under_torch_compile(name, config):
    """Dynamo traces the hand-written autograd ops (Hydra's, SSF's, the low-rank op with a separate
    branch input): compiled with the ``aot_eager`` backend (no C++ compile) the model gives eager's
    outputs and gradients. Eval mode for the dropout row: the same function without RNG."""
    eager = tiny_classifier()
    zoo.apply_adapter(eager, name, **config)
    randomise_adapter(eager)
    eager.train(not config.get("dropout"))
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager")
    x, y = batch(3)
    assert_same(loss_and_grads(compiled, x, y), loss_and_grads(eager, x, y), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- CoLoRA
class MatmulCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm):
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_colora_per_layer_ranks_run_as_one_matmul_pair_per_layer():
    """Different ranks per layer (CoLoRA's allocation) cost two matmuls per adapted layer (x·Aᵀ, then
    ·Bᵀ), whatever the rank, and compute the LoRA delta of each layer at its own rank."""
    probe = tiny_classifier()
    zoo.apply_adapter(probe, "colora")  # no ranks: attaches nothing, resolves the target layers
    paths = [s.path for s in zoo.api.adapters_of(probe)[0].targets_found]
    ranks = {p: 1 + (7 * i) % 13 for i, p in enumerate(paths)}  # 1..13, uneven
    plain, model = tiny_classifier(), tiny_classifier()
    zoo.apply_adapter(model, "colora", ranks=ranks)
    adapter = zoo.api.adapters_of(model)[0]
    randomise_adapter(model)
    x, _ = batch(2)
    with torch.no_grad(), MatmulCounter() as base_count:
        want = plain(x)
    with torch.no_grad(), MatmulCounter() as count:
        got = model(x)
    assert count.n - base_count.n == 2 * len(paths)
    assert sorted({m.rank for m in adapter.modules}) == sorted(set(ranks.values()))
    # the same function as the merged weights W + (alpha/r) B A per layer, each at its rank
    zoo.merge_adapters(model)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, want)


def test_trainer_options_reach_the_callback_through_hydra(tmp_path):
    from tasks.trainer.perf import PerfOptions
    from tasks.runner import build_trainer
    from tests.helpers import compose_config

    cfg = compose_config(["experiment=tiny", "trainer.checkpoint_blocks=true"], tmp_path)
    trainer = build_trainer(cfg, has_val=True)  # Lightning's Trainer rejects unknown keys: they were popped
    (cb,) = [c for c in trainer.callbacks if isinstance(c, PerfOptions)]
    assert cb.checkpoint_blocks is True and cb.compile is False
    plain = build_trainer(compose_config(["experiment=tiny"], tmp_path), has_val=True)
    assert not [c for c in plain.callbacks if isinstance(c, PerfOptions)]
