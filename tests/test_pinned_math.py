"""Tests that pin what a mutation audit (issue 24) found unpinned: each names the one-line bug it catches, and
each was checked to fail with that bug planted (then reverted). VTAB's per-protocol list files and their
disjointness are in ``tests/test_bad_data.py``.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo

from .conftest import tiny_vit


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Every adapter parameter random (SSF's scales around 1), so that each delta is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("lora_" in n or n.endswith((".scale", ".shift"))):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if n.endswith(".scale") else 0.0))


# ------------------------------------------------------------------------------ layers=int
def test_integer_layers_selects_the_last_n_blocks():
    """Bug caught: ``layers=n`` taking the first n blocks (``range(n)``) or n+1 of them."""
    from zoo.sites import select_layers

    assert select_layers(2, 5) == [3, 4] and select_layers(5, 5) == [0, 1, 2, 3, 4]
    bb = tiny_vit(depth=4)
    m = zoo.ImageClassifier(bb, 3)
    zoo.apply_adapter(m, "lora", rank=2, targets=["qkv"], layers=1)
    wrapped = sorted(n for n, mod in bb.named_modules() if type(mod).__name__ == "LoRALinear")
    assert wrapped == ["model.blocks.3.attn.qkv"], wrapped


# ------------------------------------------------------------------------------ stacked merge / unmerge
def test_unmerging_stacked_mergeable_adapters_restores_w0():
    """LoRA then SSF on the same qkv: merged W = γ ⊙ (W0 + ΔW_lora). Bug caught: unmerging in the order of
    merging (LoRA first) leaves W0 + ΔW − ΔW/γ; skipping one adapter leaves its delta."""
    torch.manual_seed(0)
    m = zoo.ImageClassifier(tiny_vit(), 3)
    zoo.apply_adapter(m, "lora", rank=2, alpha=4, targets=["qkv"])
    zoo.apply_adapter(m, "ssf", targets=["qkv"])
    _randomize(m)
    qkv = [mod for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and ".qkv" in n]
    assert len(qkv) == 2  # one per block, under both wrappers
    w0 = [q.weight.detach().clone() for q in qkv]
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        y = m(x)
        zoo.merge_adapters(m, unload=False)
        assert not torch.allclose(qkv[0].weight, w0[0])
        torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)  # the merged weights are the same function
        zoo.unmerge_adapters(m)
    for q, w in zip(qkv, w0):
        torch.testing.assert_close(q.weight, w, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ LoRA's ΔW on its own
def test_lora_delta_is_alpha_over_r_times_ba():
    """ΔW = (α/r)·B A and y = W0 x + b + ΔW x, checked on one layer against the formula written out.
    Bug caught: a dropped 1/r (α·BA), α/√r outside rslora, or A/B swapped."""
    from zoo.adapters.lora import LoRALinear

    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    lora = LoRALinear(base, rank=4, alpha=6.0, dropout=0.0)
    with torch.no_grad():
        lora.lora_A.normal_()
        lora.lora_B["all"].normal_()
    A, B = lora.lora_A.detach(), lora.lora_B["all"].detach()
    expected = (6.0 / 4) * B @ A
    torch.testing.assert_close(lora.delta_weight(), expected)
    x = torch.randn(5, 12)
    for fused in (True, False):
        lora.fused = fused
        torch.testing.assert_close(lora(x), x @ (base.weight + expected).t() + base.bias, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ AdaptFormer's scale
def test_adaptformer_default_scale_is_0_1():
    """AdaptFormer (Chen et al., NeurIPS 2022): y = MLP(x) + 0.1 · up(relu(down(x))). Bug caught: scale 1.0
    (the Houlsby default) for style=adaptformer."""
    torch.manual_seed(0)
    m = zoo.ImageClassifier(tiny_vit(depth=1), 3)
    zoo.apply_adapter(m, "adapter", style="adaptformer", bottleneck=4)
    par = next(mod for mod in m.modules() if type(mod).__name__ == "ParallelAdapter")
    bott = next(mod for mod in par.modules() if type(mod).__name__ == "Bottleneck")
    assert bott.scale == 0.1
    with torch.no_grad():
        for p in bott.parameters():
            p.normal_()
    x = torch.randn(2, 5, 64)
    branch = bott.up(F.relu(bott.down(x)))
    torch.testing.assert_close(bott(x), 0.1 * branch)


# ------------------------------------------------------------------------------ VPT-deep's positions
def test_vpt_deep_prompts_sit_after_the_class_token_and_are_replaced_each_block():
    """Block i sees [CLS, P_i, patches] with the previous block's prompt outputs dropped. Bugs caught: prompts
    inserted before CLS or after the patches, or block i keeping block i-1's prompt outputs (mean pooling
    and a permutation-equivariant block hide the order)."""
    torch.manual_seed(0)
    bb = tiny_vit(depth=2)
    m = zoo.ImageClassifier(bb, 3)
    zoo.apply_adapter(m, "vpt", mode="deep", num_tokens=3)
    blocks = [mod for mod in m.modules() if type(mod).__name__ == "PromptedBlock"]
    assert len(blocks) == 2
    ins, outs = [], []
    for b in blocks:
        b.base.register_forward_pre_hook(lambda mod, args: ins.append(args[0].detach()))
        b.base.register_forward_hook(lambda mod, args, out: outs.append(out.detach()))
    m.eval()
    with torch.no_grad():
        m(torch.randn(2, 3, 32, 32))
    n_patches = (32 // 8) ** 2
    for i, (b, x) in enumerate(zip(blocks, ins)):
        assert x.shape[1] == 1 + 3 + n_patches
        torch.testing.assert_close(x[:, 1:4], b.prompt.detach().expand(2, -1, -1))  # P_i right after CLS
    # block 1: CLS and patches are block 0's outputs, block 0's prompt outputs are gone
    torch.testing.assert_close(ins[1][:, :1], outs[0][:, :1])
    torch.testing.assert_close(ins[1][:, 4:], outs[0][:, 4:])


# ------------------------------------------------------------------------------ CoOp's middle position
def test_coop_middle_position_with_an_odd_context():
    """CoOp's PromptLearner: half_n_ctx = n_ctx // 2, so with M = 5 the class sits after V_1 V_2.
    Bug caught: ``round(M / 2)`` or ``(M + 1) // 2`` (3 context vectors first)."""
    from zoo.adapters.coop import layout_index

    L = 12  # token embeddings 0..11, context 12..16; prompt [SOS] p1..p5 c1 c2 . [EOS] pad pad
    assert layout_index("middle", 5, 2, L) == [0, 12, 13, 6, 7, 14, 15, 16, 8, 9, 10, 11]
    assert layout_index("middle", 1, 2, 6) == [0, 2, 3, 6, 4, 5]  # M = 1: nothing before the class


# ------------------------------------------------------------------------------ MoSA's symmetric KL
def test_mosa_symmetric_kl_gradients_stop_at_the_targets():
    """½[KL(sg(p2)‖p1) + KL(sg(p1)‖p2)], batchmean: ∂/∂z1 = ½ (p1 − p2) / B and ∂/∂z2 = ½ (p2 − p1) / B.
    Bugs caught: a missing stop-gradient (∂/∂z1 gains the other term), or the stop-gradient on the wrong
    side (``.detach()`` on the pass being trained: no gradient)."""
    from zoo.adapters.mosa import symmetric_kl

    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    loss = symmetric_kl(z1, z2)
    p1, p2 = z1.softmax(1).detach(), z2.softmax(1).detach()
    kl = lambda p, q: (p * (p.log() - q.log())).sum(1).mean()  # noqa: E731  KL(p‖q)
    torch.testing.assert_close(loss.detach(), 0.5 * (kl(p2, p1) + kl(p1, p2)))
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    torch.testing.assert_close(g1, 0.5 * (p1 - p2) / 4)
    torch.testing.assert_close(g2, 0.5 * (p2 - p1) / 4)


# ------------------------------------------------------------------------------ SAM's LayerNorm eps
def test_sam_encoder_layernorms_use_eps_1e_6():
    """segment_anything's image encoder uses LayerNorm(eps=1e-6); timm's samvit default is 1e-5. A 1e-5 output
    tolerance on order-1 activations hides the difference, so the modules are checked, and one LayerNorm
    on a low-variance input shows it matters. Bug caught: SAM_LN_EPS = 1e-5 or the norm_layer not passed."""
    from zoo.backbones.sam import SAM_LN_EPS

    from .seg_helpers import tiny_sam_backbone

    assert SAM_LN_EPS == 1e-6
    bb = tiny_sam_backbone()
    lns = [mod for mod in bb.modules() if isinstance(mod, nn.LayerNorm)]
    assert lns and all(mod.eps == 1e-6 for mod in lns), sorted({mod.eps for mod in lns})
    x = torch.randn(3, 64) * 1e-3  # variance 1e-6: eps 1e-5 would shrink the output by √11
    ref = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(F.layer_norm(x, (64,), eps=lns[0].eps), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ NaN guard on extra_loss
def test_nan_extra_loss_stops_training_even_when_the_task_loss_is_finite(monkeypatch):
    """Bug caught: the guard checking ``loss`` only, so a NaN consistency / regulariser loss trains on."""
    from tasks.base import NonFiniteLossError
    from tasks.classification import ClassificationTask

    bb = {"name": "vit", "model": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32,
          "kwargs": {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}}
    task = ClassificationTask(bb, {"name": "lora", "rank": 2}, num_classes=3)
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    monkeypatch.setattr(task, "log", lambda *a, **k: None)
    monkeypatch.setattr(zoo, "extra_loss", lambda model, ctx: torch.tensor(0.5))
    loss = task.training_step(batch, 0)
    assert math.isfinite(float(loss))
    task.on_before_backward(loss)  # the one finite-loss check (Lightning calls it before backward)
    monkeypatch.setattr(zoo, "extra_loss", lambda model, ctx: torch.tensor(float("nan")))
    loss = task.training_step(batch, 0)  # the loss the step returns must carry the extra term
    with pytest.raises(NonFiniteLossError, match="became nan"):
        task.on_before_backward(loss)
