"""1-bit / low-bit adapters: codebook, quantiser, STE, packed artifact size, exact reload, merge."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import zoo
from zoo.adapters.onebit import EPS, QLinear, gaussian_codebook, pack_bits, unpack_bits


def tiny(num_classes=5, depth=2, model="vit_tiny_patch16_224", **cfg):
    torch.manual_seed(0)
    bb = zoo.create_backbone("vit", model=model, pretrained=False, img_size=32, depth=depth)
    m = zoo.ImageClassifier(bb, num_classes)
    zoo.apply_adapter(m, "onebit", **cfg)
    return m


def qlinears(model):
    return [q for _, q in zoo.adapters_of(model)[0].qlinears()]


def test_codebook_matches_the_reference_table():
    levels, thr = gaussian_codebook(1)
    assert thr == (0.0,) and levels == pytest.approx((-0.6745, 0.6745), abs=1e-4)
    levels, thr = gaussian_codebook(2)
    assert levels == pytest.approx((-1.2657, -0.3778, 0.3778, 1.2657), abs=1e-4)
    assert thr == pytest.approx((-0.8217, 0.0, 0.8217), abs=1e-4)
    levels, _ = gaussian_codebook(4)
    assert len(levels) == 16 and levels[8] == pytest.approx(0.1056, abs=1e-4) and levels[-1] == pytest.approx(2.2655, abs=1e-4)
    assert len(gaussian_codebook(8)[0]) == 256
    # the L1 fixed point: every level is the median of its cell under N(0, 1)
    for bits in (1, 2, 4):
        levels, thr = (torch.tensor(v, dtype=torch.float64) for v in gaussian_codebook(bits))
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.special.ndtr(thr), torch.ones(1, dtype=torch.float64)])
        torch.testing.assert_close(torch.special.ndtr(levels), (cdf[1:] + cdf[:-1]) / 2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_used_weight_takes_exactly_2_pow_bits_values(bits):
    torch.manual_seed(0)
    q = QLinear(512, 256, bits)
    with torch.no_grad():
        q.weight.normal_(0.3, 2.0)  # Gaussian latent weights reach every cell, even 8-bit's outermost
    for mode in (True, False):
        q.train(mode)
        w = q.used_weight().detach()
        values = torch.unique(w)
        assert values.numel() == 2 ** bits
        mu, sd = q.weight.mean(), q.weight.std()
        torch.testing.assert_close(values, torch.tensor(gaussian_codebook(bits)[0]).float() * sd + mu)


def test_one_bit_is_mean_plus_scaled_sign():
    torch.manual_seed(1)
    q = QLinear(16, 8, 1)
    w = q.weight.detach()
    want = w.mean() + 0.6745 * w.std() * torch.sign(w - w.mean())
    torch.testing.assert_close(q.used_weight().detach(), want, atol=1e-4, rtol=1e-4)


def test_straight_through_gradient():
    """The latent gradient equals the reference's STE expression ``Q(Wn).detach() + Wn − Wn.detach()``
    (identity through Wn, and through μ and σ, which are not detached)."""
    torch.manual_seed(2)
    q = QLinear(12, 6, 1)
    x, r = torch.randn(5, 12), torch.randn(5, 6)
    (q(x) * r).sum().backward()
    w = q.weight.detach().clone().requires_grad_()
    mu, sd = w.mean(), w.std()
    wn = (w - mu) / (sd + EPS)
    qn = 0.6745 * torch.sign(wn.detach())
    (F.linear(x, (qn + wn - wn.detach()) * sd + mu) * r).sum().backward()
    assert q.weight.grad.abs().sum() > 0
    torch.testing.assert_close(q.weight.grad, w.grad, rtol=1e-4, atol=1e-6)
    # and it is not the gradient of a detached (no-STE) quantiser, which reaches W only via μ, σ
    v = q.weight.detach().clone().requires_grad_()
    (F.linear(x, qn * v.std() + v.mean()) * r).sum().backward()
    assert not torch.allclose(v.grad, w.grad, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_unpack_round_trip(bits):
    idx = torch.randint(0, 2 ** bits, (101,))
    packed = pack_bits(idx, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(101 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 101), idx)
    if bits == 1:  # first element in the lowest bit, as the reference
        assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1).item() == 0b10000001


def train_a_bit(model, steps=3):
    opt = torch.optim.AdamW(zoo.param_groups(model, 1e-2, 1e-4))
    model.train()
    torch.manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def saved_payload(model, path):
    """Save ``model``'s artifact to ``path``; return its tensor keys and payload bytes."""
    zoo.save_adapter(model, path)
    with safe_open(str(path / "adapter.safetensors"), "pt") as f:
        keys = set(f.keys())
        return keys, sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)


@pytest.mark.parametrize("base,bits", [("adaptformer", 1), ("lora", 2), ("adaptformer", 32)])
def test_artifact_is_packed_and_reload_is_exact(tmp_path, base, bits):
    model = tiny(base=base, bits=bits, dim=4)
    train_a_bit(model)
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    want = model(x)
    keys, payload = saved_payload(model, tmp_path)
    head = (192 * 5 + 5) * 4
    if bits == 32:  # plain fp32 Linears, no packing
        n = sum(p.numel() for p in zoo.adapters_of(model)[0].adapter_parameters())
        assert payload == n * 4 + head
    else:
        mats = qlinears(model)
        assert {k for k in keys if "onebit" in k} == {"backbone.onebit.0.codes", "backbone.onebit.0.stats"}
        assert payload == sum(math.ceil(q.weight.numel() * bits / 8) for q in mats) + 8 * len(mats) + head
    torch.manual_seed(0)
    other = zoo.ImageClassifier(zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2), 5)
    zoo.load_adapter(other, tmp_path)
    other.eval()
    assert torch.equal(other(x), want)
    if bits < 32:  # training mode drops the codes; the latent weights re-quantise to the same codes
        q = qlinears(other)[0]
        other.train()
        assert q._codes is None
        for a, b in zip(qlinears(other), qlinears(model)):
            assert torch.equal(a.codes()[0], b.codes()[0])
            torch.testing.assert_close(a.used_weight(), b.used_weight(), atol=1e-6, rtol=1e-5)
        other.eval()  # same function as the saved model, now from the latent weights
        torch.testing.assert_close(other(x), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("base,bits", [("adaptformer", 1), ("lora", 1), ("lora", 2)])
def test_reload_then_train_mode_keeps_the_function(tmp_path, base, bits):
    """issue 15: reloading, then ``.train()`` (dropout 0) must not rescale the weights (×0.6745 at
    one bit when the dequantised values were taken as latent weights), nor through init_from."""
    model = tiny(base=base, bits=bits, dim=4, dropout=0.0)
    train_a_bit(model)
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    want = model(x).detach()
    zoo.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    other = zoo.ImageClassifier(zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2), 5)
    zoo.load_adapter(other, tmp_path)
    other.train()  # the codes are dropped: the forward quantises the latent weights
    torch.testing.assert_close(other(x), want, atol=1e-5, rtol=1e-4)
    other.eval()
    torch.testing.assert_close(other(x), want, atol=1e-5, rtol=1e-4)
    zoo.save_adapter(other, tmp_path / "again")  # continuing (init_from) re-exports the same codes
    torch.manual_seed(0)
    third = zoo.ImageClassifier(zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2), 5)
    zoo.load_adapter(third, tmp_path / "again")
    third.eval()
    torch.testing.assert_close(third(x), want, atol=1e-5, rtol=1e-4)


def test_vit_b_artifact_size_matches_the_formula(tmp_path):
    """Bi-AdaptFormer_32 on ViT-B: 12 × 2 × 768 × 32 bits = 72 KB (the reference README) + stats + head."""
    model = tiny(num_classes=10, depth=12, model="vit_base_patch16_224")
    zoo.save_adapter(model, tmp_path)
    codes = 12 * 2 * 768 * 32 // 8
    assert codes == 72 * 1024
    want = codes + 8 * 24 + (768 * 10 + 10) * 4
    size = (tmp_path / "adapter.safetensors").stat().st_size
    assert want <= size <= 1.01 * want


def test_bi_lora_merge_matches_the_branch():
    model = tiny(base="lora", dim=4, scale=10.0)
    train_a_bit(model)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    want = model(x)
    zoo.merge_adapters(model, unload=False)
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
    zoo.unmerge_adapters(model)
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)


def test_bi_adaptformer_is_not_mergeable_and_counts():
    model = tiny(dim=4)
    with pytest.raises(zoo.NotMergeableError):
        zoo.merge_adapters(model)
    d, r = 192, 4
    assert sum(p.numel() for p in zoo.adapters_of(model)[0].adapter_parameters()) == 2 * 2 * d * r  # no biases
    lora = tiny(base="lora", dim=4)
    assert sum(p.numel() for p in zoo.adapters_of(lora)[0].adapter_parameters()) == 2 * 2 * (d * r + r * d)


def test_bits_32_is_plain_and_identity_at_init():
    torch.manual_seed(0)
    bb = zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    x = torch.randn(2, 3, 32, 32)
    bb.eval()
    want = bb(x)
    zoo.apply_adapter(bb, "onebit", bits=32, dim=4)
    bb.eval()
    assert not qlinears(bb)
    assert torch.equal(bb(x), want)


@pytest.mark.parametrize("cfg,msg", [({"bits": 3}, "1, 2, 4, 8, 32"), ({"base": "vpt"}, "adaptformer, lora")])
def test_bad_options_list_valid_ones(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(**cfg)


# ---------------------------------------------------------------------- through train.py's job
@pytest.mark.parametrize("base", ["adaptformer", "lora"])
def test_tiny_run_trains_and_packed_artifact_round_trips(tmp_path, base):
    from pathlib import Path

    import lightning as L
    from safetensors.torch import load_file

    from tasks.runner import build_task
    from tests.helpers import compose_config, run_train

    overrides = ["experiment=tiny", "adapter=onebit", f"adapter.base={base}", "adapter.scale=1.0"]
    m = run_train(overrides, tmp_path)
    assert m["adapter"] == "onebit"
    assert m["train_loss_last"] < m["train_loss_first"]
    art = Path(m["out_dir"]) / "adapter"
    saved = load_file(str(art / "adapter.safetensors"))
    codes = [v for k, v in saved.items() if k.endswith("onebit.0.codes")]
    assert len(codes) == 1 and codes[0].dtype == torch.uint8
    L.seed_everything(0)
    fresh = build_task(compose_config(overrides)).model
    zoo.remove_adapters(fresh)
    zoo.load_adapter(fresh, art)
    state = zoo.adapter_state_dict(fresh)  # packed again from the reloaded codes: identical bytes
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)


# ---------------------------------------------------------------------- Bi-Head (head_bits)
@pytest.mark.parametrize("head_bits", [1, 2])
def test_bi_head_weight_takes_2_pow_bits_values_and_only_it_trains(head_bits):
    from zoo.adapters.onebit import QuantizedHead

    model = tiny(dim=4, head_bits=head_bits)
    head = model.head
    assert isinstance(head, QuantizedHead) and head.bias is None  # the reference head has no bias
    assert head.q in qlinears(model) and head.q.bits == head_bits
    w = head.q.used_weight().detach()
    mu, sd = head.q.weight.mean(), head.q.weight.std()
    values = torch.unique(w)
    assert values.numel() == 2 ** head_bits
    torch.testing.assert_close(values, torch.tensor(gaussian_codebook(head_bits)[0]) * sd + mu)
    # the original head is kept for unload but frozen and not saved; the quantised latent trains
    assert not any(p.requires_grad for p in head.base.parameters()) and head.q.weight.requires_grad
    assert not any(k.startswith("head.base") or k == "head.weight" for k in zoo.adapter_state_dict(model, export=False))
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    assert head.q.weight.grad.abs().sum() > 0 and head.base.weight.grad is None
    assert model.head_spec() == {"type": "linear", "in_features": 192, "num_classes": 5}


@pytest.mark.parametrize("base,bits,head_bits,head_bias", [("adaptformer", 1, 1, False), ("lora", 2, 1, True),
                                                           ("adaptformer", 32, 2, False)])
def test_bi_head_artifact_is_packed_and_reload_is_exact(tmp_path, base, bits, head_bits, head_bias):
    model = tiny(base=base, bits=bits, dim=4, head_bits=head_bits, head_bias=head_bias)
    train_a_bit(model)
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    want = model(x)
    keys, payload = saved_payload(model, tmp_path)
    mats = qlinears(model)
    head_q = model.head.q
    assert mats[-1] is head_q  # the head joins the packed tensors (after the backbone's matrices)
    adapter_w = [q for q in mats if q is not head_q]
    if bits == 32:  # fp32 adapter matrices stay plain tensors; only the head is packed
        assert not adapter_w
        n_fp32 = sum(p.numel() for p in zoo.adapters_of(model)[0].adapter_parameters() if p is not head_q.weight)
    else:
        n_fp32 = 0
    assert {k for k in keys if "onebit" in k} == {"onebit.0.codes", "onebit.0.stats"}
    assert ("head.bias" in keys) == head_bias and "head.q.weight" not in keys and "head.weight" not in keys
    want_bytes = (sum(math.ceil(q.weight.numel() * bits / 8) for q in adapter_w) + math.ceil(192 * 5 * head_bits / 8)
                  + 8 * len(mats) + 4 * n_fp32 + (5 * 4 if head_bias else 0))
    assert payload == want_bytes
    torch.manual_seed(0)
    other = zoo.ImageClassifier(zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2), 5)
    zoo.load_adapter(other, tmp_path)  # rebuilds the Bi-Head from adapter.json through apply_adapter
    other.eval()
    assert type(other.head) is type(model.head)
    assert torch.equal(other(x), want)
    assert all(torch.equal(a, b) for a, b in zip(zoo.adapter_state_dict(other).values(), zoo.adapter_state_dict(model).values()))


def test_vit_b_bi_lora_bi_head_artifact_size_matches_the_formula(tmp_path):
    """Bi-LoRA_32 with a 1-bit head on ViT-B: bits × (adapter + head weights) / 8 + 8 per matrix + header."""
    model = tiny(num_classes=10, depth=12, model="vit_base_patch16_224", base="lora", head_bits=1)
    zoo.save_adapter(model, tmp_path)
    adapter_weights = 12 * 2 * 2 * 768 * 32
    head_weights = 768 * 10
    matrices = 12 * 2 * 2 + 1
    want = (adapter_weights + head_weights) // 8 + 8 * matrices
    assert adapter_weights // 8 == 144 * 1024  # the reference README's 144 KB of Bi-LoRA_32 codes
    size = (tmp_path / "adapter.safetensors").stat().st_size
    assert want <= size <= 1.01 * want


def test_bi_head_unload_restores_the_plain_linear_head():
    model = tiny(dim=4, head_bits=1)
    orig = model.head.base
    w0 = orig.weight.detach().clone()
    train_a_bit(model)
    zoo.remove_adapters(model)
    assert type(model.head) is torch.nn.Linear and model.head is orig
    assert torch.equal(model.head.weight, w0) and all(p.requires_grad for p in model.head.parameters())


def test_bi_lora_with_bi_head_merges_into_a_plain_linear_head():
    model = tiny(base="lora", dim=4, scale=10.0, head_bits=1)
    orig = model.head.base
    w0, b0 = orig.weight.detach().clone(), orig.bias.detach().clone()
    train_a_bit(model)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    want = model(x)
    used = model.head.q.used_weight().detach().clone()
    zoo.merge_adapters(model, unload=False)
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
    zoo.unmerge_adapters(model)  # the original head weights come back
    assert torch.equal(orig.weight, w0) and torch.equal(orig.bias, b0)
    zoo.merge_adapters(model, unload=True)
    assert type(model.head) is torch.nn.Linear and model.head is orig
    assert torch.equal(model.head.weight, used) and torch.unique(model.head.weight).numel() == 2
    assert torch.equal(model.head.bias, torch.zeros(5))  # Bi-Head has no bias
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)


def test_head_bits_needs_a_linear_head_and_valid_bits():
    from zoo.sites import SiteError

    torch.manual_seed(0)
    bb = zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    with pytest.raises(SiteError, match="zoo.ImageClassifier"):
        zoo.apply_adapter(bb, "onebit", dim=4, head_bits=1)
    assert not zoo.adapters_of(bb) and not qlinears_left(bb)  # rolled back
    with pytest.raises(ValueError, match="1, 2, 4, 8, 32"):
        tiny(head_bits=3)
    assert not isinstance(tiny(dim=4, head_bits=32).head, zoo.adapters.onebit.QuantizedHead)  # 32 = fp32 head


def qlinears_left(module):
    return [m for m in module.modules() if isinstance(m, QLinear)]


def test_tiny_run_with_bi_head_trains_and_round_trips(tmp_path):
    import lightning as L
    from pathlib import Path

    from safetensors.torch import load_file

    from tasks.runner import build_task
    from tests.helpers import compose_config, run_train

    overrides = ["experiment=tiny", "adapter=onebit", "adapter.head_bits=1", "adapter.scale=1.0"]
    m = run_train(overrides, tmp_path)
    assert m["train_loss_last"] < m["train_loss_first"]
    art = Path(m["out_dir"]) / "adapter"
    saved = load_file(str(art / "adapter.safetensors"))
    assert not any(k.startswith("head.") for k in saved)  # the 1-bit head is inside the packed codes
    L.seed_everything(0)
    fresh = build_task(compose_config(overrides)).model
    zoo.remove_adapters(fresh)
    zoo.load_adapter(fresh, art)
    state = zoo.adapter_state_dict(fresh)
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    # the frozen original head is not counted: the head's share is its quantised weight only
    assert m["trainable_params_with_head"] - m["trainable_params"] == fresh.head.q.weight.numel()
