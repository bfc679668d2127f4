"""LoLDU: the reference's equations (LU of W0, W_res + σ P L_r diag(z) U_r), identity at init, both
compute paths, merge/unmerge, what trains, parameter counts (r per projection), artifacts of z only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from zoo.adapters.loldu import LoLDULinear, ldu

from .conftest import tiny_vit


def reference_weight(w0: torch.Tensor, z: torch.Tensor, r: int, alpha: float) -> torch.Tensor:
    """SKDDJ/LoLDU's LoLDUParametrization in float32: residual plus σ P L_r diag(z) U_r."""
    P, L, U = torch.linalg.lu(w0)
    D = torch.diagonal(U)
    U = U / D.unsqueeze(-1)
    s = alpha / r
    res = w0 - s * P @ L[:, :r] @ torch.diag(D[:r]) @ U[:r]
    return res + s * P @ L[:, :r] @ torch.diag(z) @ U[:r]


def test_ldu_factors_reconstruct_w0():
    w = torch.randn(12, 7, dtype=torch.float64)
    pl, z0, u = ldu(w, 7)
    torch.testing.assert_close(pl @ torch.diag(z0) @ u, w)
    assert torch.allclose(torch.diagonal(u), torch.ones(7, dtype=torch.float64))
    assert torch.equal(torch.triu(u), u)


@pytest.mark.parametrize("d_in,d_out,r", [(10, 10, 10), (16, 8, 5), (6, 14, 6)])
@pytest.mark.parametrize("dense", [True, False])
def test_forward_is_the_reference_weight(d_in, d_out, r, dense):
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out)
    m = LoLDULinear(lin, r, alpha=3.0)
    m.dense = dense
    with torch.no_grad():
        m.vector_z["all"].mul_(1 + 0.3 * torch.randn(r))
    z = m.vector_z["all"].detach()
    x = torch.randn(4, 3, d_in)
    want = x @ reference_weight(lin.weight.detach(), z, r, 3.0).t() + lin.bias
    torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-5)
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        y = m(x)
        m.merge()  # the merged weight is the reference's parametrised weight
        torch.testing.assert_close(lin.weight, reference_weight(w0, z, r, 3.0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
        m.unmerge()
        torch.testing.assert_close(lin.weight, w0, rtol=0, atol=1e-6)
        torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)


def test_identity_at_init_count_gradients_and_artifact(tmp_path):
    bb = tiny_vit()  # width 64, 2 blocks, fused qkv
    x = torch.randn(2, 3, 32, 32)
    ref = bb(x)
    zoo.apply_adapter(bb, "loldu")
    assert torch.equal(bb(x), ref)  # z = z0: exactly the pretrained model
    assert zoo.count_parameters(bb)[0] == 2 * 2 * 64  # full rank r = 64 on q and v of 2 blocks
    with torch.no_grad():
        for p in bb.parameters():
            if p.requires_grad:
                p.mul_(1.5)
        y = bb(x)
    assert not torch.allclose(y, ref, atol=1e-4)
    bb(x).pow(2).sum().backward()  # (a plain sum of LayerNorm-ed features has no gradient)
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable and all("vector_z" in n for n in trainable)
    assert all(p.grad is not None for p in bb.parameters() if p.requires_grad)
    state = zoo.adapter_state_dict(bb)
    assert set(state) == trainable  # only z: the factors are recomputed from W0
    zoo.save_adapter(bb, tmp_path)
    torch.manual_seed(0)
    other = tiny_vit()
    zoo.load_adapter(other, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(other(x), y)
        zoo.merge_adapters(bb, unload=True)
        torch.testing.assert_close(bb(x), y, rtol=1e-4, atol=1e-5)


def test_inits_rank_and_train_scale():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    _, z0, _ = ldu(lin.weight, 4)
    assert torch.equal(LoLDULinear(lin, 4, init="ones").vector_z["all"], torch.ones(4))
    const = LoLDULinear(lin, 4, init="constant").vector_z["all"]
    torch.testing.assert_close(const, torch.full((4,), float(z0.mean())))
    m = LoLDULinear(lin, 4, init="zeros", train_scale=True)
    assert set(dict(m.named_parameters())) - {"base.weight", "base.bias"} == {"vector_z.all", "scaling.all"}
    assert float(m.scaling["all"]) == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="unknown LoLDU init 'svd'"):
        zoo.apply_adapter(tiny_vit(), "loldu", init="svd")
    with pytest.raises(ValueError, match=r"rank=65 exceeds min\(d_out, d_in\)"):
        zoo.apply_adapter(tiny_vit(), "loldu", rank=65)


@pytest.mark.parametrize("dense", [True, False])
def test_a_separate_projection_keyed_by_its_site_kind(dense):
    """On backbones with separate q/v Linears (SAM's decoder) the one slice is keyed 'q', not 'all'."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    m = LoLDULinear(lin, slices={"q": None})
    m.dense = dense
    with torch.no_grad():
        m.vector_z["q"].mul_(2.0)
    x = torch.randn(3, 6)
    want = x @ reference_weight(lin.weight.detach(), m.vector_z["q"].detach(), 6, 1.0).t() + lin.bias
    torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-5)


def test_trained_scale_follows_the_reference_residual_form():
    """The reference keeps W_res = W0 − σ0 P L diag(z0) U fixed and computes W_res + σ P L diag(z) U: once σ
    moves, σ scales z, not z − z0 (a bug that scaled z − z0 would give σ no gradient at init)."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    w0 = lin.weight.detach().clone()
    pl, z0, u = (t.float() for t in ldu(w0, 4))
    m = LoLDULinear(lin, 4, init="ones", train_scale=True)
    x = torch.randn(3, 8)
    m(x).pow(2).sum().backward()
    assert m.scaling["all"].grad is not None and float(m.scaling["all"].grad.abs()) > 0
    with torch.no_grad():
        m.scaling["all"].fill_(0.7)
        m.vector_z["all"].copy_(torch.linspace(0.5, 2.0, 4))
        w_res = w0 - 0.25 * (pl * z0) @ u
        expected = w_res + 0.7 * (pl * m.vector_z["all"]) @ u
        torch.testing.assert_close(m(x), F.linear(x, expected, lin.bias), rtol=1e-5, atol=1e-5)
