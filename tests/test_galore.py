"""GaLore: the reference optimizer step on a small layer, the low-rank update, resume, what trains."""
import math

import pytest
import torch
from torch import nn

import zoo
from zoo.adapters.galore import GaLoreAdamW

from .conftest import tiny_vit
from .helpers import assert_optimizer_resumes_exactly


def reference_steps(W, grads, rank, gap, scale, lr, wd, betas=(0.9, 0.999), eps=1e-6):
    """galore_torch.GaLoreAdamW (proj_type std) on one 2-D weight, written out from the paper / reference."""
    W = W.clone()
    m = v = P = None
    for t, G in enumerate(grads):
        tall = G.shape[0] >= G.shape[1]
        if t % gap == 0:
            U, S, Vh = torch.linalg.svd(G, full_matrices=False)
            P = Vh[:rank] if tall else U[:, :rank]
        R = G @ P.t() if tall else P.t() @ G
        m = (1 - betas[0]) * R if m is None else betas[0] * m + (1 - betas[0]) * R
        v = (1 - betas[1]) * R * R if v is None else betas[1] * v + (1 - betas[1]) * R * R
        k = t + 1
        step = lr * math.sqrt(1 - betas[1] ** k) / (1 - betas[0] ** k)
        N = m / (v.sqrt() + eps)
        W = W - step * scale * (N @ P if tall else P @ N)
        W = W - lr * wd * W
    return W


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_optimizer_matches_the_reference_step(shape):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(*shape))
    grads = [torch.randn(*shape) for _ in range(5)]
    opt = GaLoreAdamW([{"params": [w], "galore_rank": 3, "update_proj_gap": 2, "scale": 0.5}], lr=0.1, weight_decay=0.01)
    want = reference_steps(w.detach(), grads, 3, 2, 0.5, 0.1, 0.01)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    torch.testing.assert_close(w.detach(), want, rtol=1e-5, atol=1e-6)


def test_first_update_lies_in_the_gradient_top_subspace():
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(10, 6))
    before = w.detach().clone()
    G = torch.randn(10, 6)
    opt = GaLoreAdamW([{"params": [w], "galore_rank": 2, "update_proj_gap": 10, "scale": 1.0}], lr=0.1)
    w.grad = G
    opt.step()
    delta = w.detach() - before
    _, _, Vh = torch.linalg.svd(G)
    Q = Vh[:2]
    assert torch.linalg.matrix_rank(delta) == 2
    torch.testing.assert_close(delta @ (torch.eye(6) - Q.t() @ Q), torch.zeros(10, 6), atol=1e-6, rtol=0)


def _model(**kw):
    torch.manual_seed(0)
    model = zoo.ImageClassifier(tiny_vit(), 3)
    zoo.apply_adapter(model, "galore", rank=2, update_proj_gap=2, **kw)
    return model


def test_resume_from_saved_state_equals_an_uninterrupted_run():
    # the projector was refreshed at step 2; the resumed run refreshes it again at step 4
    opt = assert_optimizer_resumes_exactly(_model, n_steps=5, split=3)
    assert any("projector" in st for st in opt.state.values())


def test_what_trains_and_the_groups():
    model = _model()
    a = zoo.adapters_of(model)[0]
    assert len(a.weights) == 2 * 4  # qkv, proj, fc1, fc2 of each block
    assert all(p.requires_grad for p in model.backbone.parameters())  # train_rest: full-parameter
    groups = zoo.param_groups(model, 1e-3, 0.01)
    assert groups[0]["galore_rank"] == 2 and {id(p) for p in groups[0]["params"]} == {id(w) for w in a.weights}
    assert all("galore_rank" not in g for g in groups[1:])
    assert isinstance(zoo.build_optimizer(model, groups, 1e-3, 0.01), GaLoreAdamW)

    only = _model(train_rest=False, targets=["fc1", "fc2"])
    trainable = {n for n, p in only.backbone.named_parameters() if p.requires_grad}
    assert trainable == {f"model.blocks.{i}.mlp.{k}.weight" for i in range(2) for k in ("fc1", "fc2")}


def test_q_v_slices_mean_the_fused_layer_and_missing_kinds_are_skipped():
    model = _model(targets=["q", "v", "k"])  # all three are rows of one qkv: one weight per block
    assert len(zoo.adapters_of(model)[0].weights) == 2
    with pytest.raises(zoo.SiteError, match="none of its target sites"):
        zoo.apply_adapter(zoo.ImageClassifier(tiny_vit(), 3), "galore", targets=["conv_dw"])


def test_two_optimizer_replacing_adapters_are_refused():
    model = _model()
    zoo.apply_adapter(model, "lora_pro", rank=2)
    with pytest.raises(ValueError, match="each replace the optimizer"):
        zoo.build_optimizer(model, zoo.param_groups(model, 1e-3, 0.0), 1e-3, 0.0)


def test_sam_decoder_tower():
    from .test_sam_seg import IMG, tiny_segmenter

    model = tiny_segmenter(num_classes=2)
    zoo.apply_adapter(model, "galore", tower="decoder", rank=2)
    a = zoo.adapters_of(model)[0]
    dec = {id(p) for p in a.backbone.parameters()}
    assert a.weights and all(id(w) in dec for w in a.weights)  # the two-way transformer's q/k/v/o and MLP
    assert not any(p.requires_grad for p in model.backbone.parameters())  # the encoder stays frozen
    opt = zoo.build_optimizer(model, zoo.param_groups(model, 1e-3, 0.0), 1e-3, 0.0)
    model(torch.randn(2, 3, IMG, IMG)).float().pow(2).mean().backward()
    opt.step()
