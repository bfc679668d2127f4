"""LoRA-GA: equality with peft's ``init_lora_weights="lora_ga"`` on a shared cached gradient, the
reference variant's factors, the gradient pass, identity at init and merge."""
import copy

import pytest
import torch
import torch.nn.functional as F

import zoo

from .conftest import tiny_vit

peft = pytest.importorskip("peft")


@pytest.fixture
def seeded_svd(monkeypatch):
    """svd_lowrank is randomised: seed the global RNG before every call, in peft and here alike."""
    orig = torch.svd_lowrank

    def svd(*a, **kw):
        torch.manual_seed(123)
        return orig(*a, **kw)

    monkeypatch.setattr(torch, "svd_lowrank", svd)


def _zoo(rank, alpha, **kw):
    torch.manual_seed(0)
    bb = tiny_vit()
    zoo.apply_adapter(bb, "lora_ga", rank=rank, alpha=alpha, targets=["fc1"], layers=[0], **kw)
    return bb


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("ArBr", "unit"), ("A2rBr", "gd_scale"),
                                             ("ArB2r", "weight_svd")])
def test_same_init_forward_and_merge_as_peft(seeded_svd, direction, scale):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraGAConfig

    rank, alpha = 4, 8.0
    bb = _zoo(rank, alpha, variant="peft", direction=direction, scale=scale)
    plain = copy.deepcopy(zoo.remove_adapters(copy.deepcopy(bb)).model)
    G = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))  # the shared cached gradient
    plain.blocks[0].mlp.fc1._peft_loraga_grad = G.clone()
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["blocks.0.mlp.fc1"], init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(direction=direction, scale=scale))
    pm = get_peft_model(plain, cfg)
    a = zoo.adapters_of(bb)[0]
    a.init_from_gradients([G])
    ours, theirs = a.modules[0], pm.base_model.model.blocks[0].mlp.fc1
    torch.testing.assert_close(ours.lora_A, theirs.lora_A["default"].weight)
    torch.testing.assert_close(ours.lora_B["fc1"], theirs.lora_B["default"].weight)
    # peft offsets W0 in place; here W0 stays and s·B0A0 is subtracted: the same effective weight
    w0 = ours.linear().weight
    torch.testing.assert_close(w0 - ours.scaling * ours.init_Bt.t() @ ours.init_A, theirs.base_layer.weight,
                               rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # after training moved B: the same function
        for b in (ours.lora_B["fc1"], theirs.lora_B["default"].weight):
            b.add_(0.05 * torch.ones_like(b))
    x = torch.randn(2, 3, 32, 32)
    bb.eval(), pm.eval()
    with torch.no_grad():
        want = pm(x)
        torch.testing.assert_close(bb.model(x), want, rtol=1e-4, atol=1e-5)
        zoo.merge_adapters(bb, unload=False)
        pm.merge_adapter()
        torch.testing.assert_close(bb.model(x), pm(x), rtol=1e-4, atol=1e-5)
        zoo.unmerge_adapters(bb)
        torch.testing.assert_close(bb.model(x), want, rtol=1e-4, atol=1e-5)


def test_reference_variant_scales_both_factors(seeded_svd):
    rank, gamma = 4, 16.0
    bb = _zoo(rank, 8.0)
    G = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    a = zoo.adapters_of(bb)[0]
    a.init_from_gradients([G])
    U, S, V = torch.svd_lowrank(G, q=4 * rank, niter=4)
    f = 256 ** 0.25 / gamma ** 0.5
    m = a.modules[0]
    torch.testing.assert_close(m.lora_A, V[:, :rank].t() * f)  # A0 = V[:, :r]ᵀ · d_out^¼/√γ
    torch.testing.assert_close(m.lora_B["fc1"], U[:, rank:2 * rank] * f)  # B0 = U[:, r:2r] · d_out^¼/√γ


def test_gradient_pass_averages_the_task_loss_gradient_and_starts_at_identity():
    torch.manual_seed(0)
    model = zoo.ImageClassifier(tiny_vit(), 3)
    zoo.apply_adapter(model, "lora_ga", rank=2, batches=3)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    a = zoo.adapters_of(model)[0]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ref = copy.deepcopy(model)
    w = [m.linear().weight for m in zoo.adapters_of(ref)[0].modules]
    for p in w:
        p.requires_grad_(True)
    ref.train()
    for x, y in [batches[0], batches[1], batches[0]]:  # 3 batches, cycling the loader
        F.cross_entropy(ref(x), y).backward()
    got = a.estimate_gradients(model, batches, None)
    for G, p in zip(got, w):
        torch.testing.assert_close(G, p.grad / 3)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())

    x = batches[0][0]
    model.eval()
    before = model(x)
    zoo.prepare_adapters(model, batches)
    assert all(m.lora_B[k].abs().sum() > 0 for m in a.modules for k in m.lora_B)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)  # the offset keeps the model unchanged
    A0 = [m.init_A.clone() for m in a.modules]
    zoo.prepare_adapters(model, batches)  # initialised once (a resumed run's checkpoint then loads A, B, A0, B0)
    assert all(torch.equal(x, m.init_A) for x, m in zip(A0, a.modules))


def test_artifact_keeps_the_offset(tmp_path):
    torch.manual_seed(0)
    model = zoo.ImageClassifier(tiny_vit(), 3)
    zoo.apply_adapter(model, "lora_ga", rank=2, batches=1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))
    zoo.prepare_adapters(model, [(x, y)])
    with torch.no_grad():
        for m in zoo.adapters_of(model)[0].modules:
            m.lora_B["q"].add_(0.1)
    model.eval()
    want = model(x)
    zoo.save_adapter(model, tmp_path / "a")
    other = zoo.ImageClassifier(tiny_vit(), 3)
    other.load_state_dict({k: v for k, v in zoo.remove_adapters(copy.deepcopy(model)).state_dict().items()})
    zoo.load_adapter(other, tmp_path / "a")
    other.eval()
    torch.testing.assert_close(other(x), want)
