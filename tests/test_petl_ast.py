"""Every registered adapter on a tiny AST, and the PETL-AST adapters' mathematics."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.helpers import assert_refuses, refuses
from zoo.adapters.conformer import ConformerConv
from zoo.adapters.lora import LoRALinear
from zoo.adapters.prefix import PrefixAttention
from zoo.sites import SiteError

T = 40  # frames: grid (12, 3), 38 tokens


def tiny(**kw):
    opts = dict(model="deit_tiny_distilled_patch16_224", pretrained=False, max_length=T, embed_dim=32, depth=2, num_heads=2)
    opts.update(kw)
    return zoo.create_backbone("ast", **opts)


def batches(n=2, b=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, T, 128, generator=g), torch.randint(0, 5, (b,), generator=g)) for _ in range(n)]


# small settings for adapters whose defaults assume ViT-B widths or need a data stage
SMALL = {"mhr": {"n_splits": 4}, "miss": {"rank": 8}, "shira": {"rank": 4}, "colora": dict(finetune_steps=2, finetune_lr=1e-2, faig_steps=2, faig_batches=1)}


@pytest.mark.parametrize("name", zoo.list_adapters())
def test_every_adapter_attaches_forwards_and_backwards_on_ast(name):
    model = zoo.ImageClassifier(tiny(), 5)
    if refuses(name, "ast"):
        return assert_refuses(model, name, **SMALL.get(name, {}))
    zoo.apply_adapter(model, name, **SMALL.get(name, {}))
    zoo.prepare_adapters(model, batches())
    x, y = batches(1)[0]
    model.train()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]
    assert any(p.grad.abs().sum() > 0 for n, p in trainable if not n.startswith("head."))  or name == "linear"
    frozen = [p for n, p in model.backbone.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


# --------------------------------------------------------------------------- bottleneck (PETL-AST)
def _block_manual(blk, x, a_attn=None, a_mlp=None, placement="parallel"):
    """One timm block with adapters as PETL-AST writes them (LN = the sub-block's norm)."""
    attn, mlp = zoo.sites.unwrap(blk.attn), zoo.sites.unwrap(blk.mlp)
    n1 = blk.norm1(x)
    a = attn(n1)
    if a_attn is not None:
        a = a + (a_attn(n1) if placement == "parallel" else a_attn(a))
    x1 = x + a
    n2 = blk.norm2(x1)
    m = mlp(n2)
    if a_mlp is not None:
        m = m + (a_mlp(n2) if placement == "parallel" else a_mlp(m))
    return x1 + m


@pytest.mark.parametrize("style", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("placement", ["parallel", "sequential"])
def test_bottleneck_styles_and_placements(style, placement):
    bb = tiny().eval()
    tokens = torch.randn(2, 38, 32)
    blk0 = bb.model.blocks[0]
    ref0 = blk0(tokens)
    zoo.apply_adapter(bb, "adapter", style=style, placement=placement, reduction_rate=8)
    blk = bb.model.blocks[0]
    assert torch.allclose(blk(tokens), ref0, atol=1e-6)  # zero up-projection: unchanged at init
    mods = bb.adapters[0].modules
    assert len(mods) == 2 * (2 if style == "houlsby" else 1)
    for m in mods:
        assert m.adapter.down.out_features == 4  # round(32 / 8)
        assert m.adapter.down.weight.abs().sum() > 0 and m.adapter.up.weight.abs().sum() == 0  # only up is zero
        torch.nn.init.normal_(m.adapter.up.weight)
    a_mlp = blk.mlp.adapter
    a_attn = blk.attn.adapter if style == "houlsby" else None
    with torch.no_grad():
        assert torch.allclose(blk(tokens), _block_manual(blk, tokens, a_attn, a_mlp, placement), atol=1e-5)


def test_adaptformer_cannot_be_sequential_and_bad_options_are_named():
    with pytest.raises(ValueError, match="adaptformer is parallel"):
        zoo.apply_adapter(tiny(), "adapter", style="adaptformer", placement="sequential")
    with pytest.raises(ValueError, match="valid: sequential, parallel"):
        zoo.apply_adapter(tiny(), "adapter", placement="diagonal")


# --------------------------------------------------------------------------- conformer adapter
def test_conformer_module_math():
    torch.manual_seed(0)
    m = ConformerConv(32, 4, kernel_size=31, zero_init=False).train()
    x = torch.randn(2, 38, 32)
    h = x.transpose(1, 2)
    h = F.conv1d(h, m.pw1.weight, m.pw1.bias)
    h = h[:, :4] * torch.sigmoid(h[:, 4:])  # GLU over channels
    h = F.conv1d(h, m.dw.weight, m.dw.bias, padding=15, groups=4)
    mu, var = h.mean(dim=(0, 2), keepdim=True), h.var(dim=(0, 2), unbiased=False, keepdim=True)
    h = (h - mu) / torch.sqrt(var + m.bn.eps) * m.bn.weight[:, None] + m.bn.bias[:, None]
    h = F.conv1d(F.silu(h), m.pw2.weight, m.pw2.bias)
    assert torch.allclose(m(x), h.transpose(1, 2), atol=1e-5)
    assert m.dw.weight.shape == (4, 1, 31)
    with pytest.raises(ValueError, match="odd"):
        ConformerConv(32, 4, kernel_size=30)


def test_conformer_adapter_on_ast_counts_and_identity():
    bb = tiny().eval()
    x = torch.randn(2, T, 128)
    with torch.no_grad():
        y = bb(x)
    zoo.apply_adapter(bb, "conformer", reduction_rate=8)  # b = 4, Pfeiffer parallel (PETL-AST default)
    with torch.no_grad():
        assert torch.allclose(bb(x), y, atol=1e-6)
    d, b, k = 32, 4, 31
    per = (d * 2 * b + 2 * b) + (b * k + b) + 2 * b + (b * d + d)
    assert zoo.count_parameters(bb)[0] == 2 * per  # one adapter per block, 2 blocks
    assert all(type(m).__name__ == "ParallelAdapter" and isinstance(m.adapter, ConformerConv) for m in bb.adapters[0].modules)


# --------------------------------------------------------------------------- LoRA, PETL-AST parameterisation
def test_lora_reduction_rate_and_mirrored_init():
    bb = tiny().eval()
    x = torch.randn(2, T, 128)
    with torch.no_grad():
        y = bb(x)
    zoo.apply_adapter(bb, "lora", reduction_rate=4, alpha=8, init="mirrored")
    w = bb.adapters[0].modules[0]
    assert isinstance(w, LoRALinear) and w.rank == 8 and w.scaling == 8 / 4  # r = 32 / RR, alpha / RR
    assert set(w.slices) == {"q", "v"}
    assert w.lora_A.abs().sum() == 0 and all(b.abs().sum() > 0 for b in w.lora_B.values())
    with torch.no_grad():
        assert torch.allclose(bb(x), y, atol=1e-6)
        w.lora_A.normal_()
        changed = bb(x)
    zoo.merge_adapters(bb)
    with torch.no_grad():
        assert torch.allclose(bb(x), changed, atol=1e-4)


# --------------------------------------------------------------------------- prompt tuning that replaces DIST
@pytest.mark.parametrize("mode", ["deep", "shallow"])
def test_prompts_replace_the_dist_token(mode):
    bb = tiny(pooling="mean").eval()
    zoo.apply_adapter(bb, "vpt", mode=mode, num_tokens=5, replace_prefix=1)
    x = torch.randn(2, T, 128)
    with torch.no_grad():
        tok = bb.forward_features(x)
        assert tok.shape[1] == 1 + 5 + 36  # CLS, prompts, patches: DIST is gone
        assert torch.allclose(bb(x), tok.mean(1))
        bb.model.dist_token.add_(10.0)  # DIST no longer reaches the output
        assert torch.equal(bb.forward_features(x), tok)
    with pytest.raises(SiteError, match="may replace 0..1"):
        zoo.apply_adapter(tiny(), "vpt", replace_prefix=2)


# --------------------------------------------------------------------------- prefix tuning
def test_prefix_equals_attention_over_extra_key_value_tokens():
    bb = tiny().eval()
    attn = bb.model.blocks[0].attn
    x, e = torch.randn(2, 38, 32), torch.randn(1, 6, 32)
    with torch.no_grad():
        ref = attn(torch.cat([x, e.expand(2, -1, -1)], dim=1))[:, :38]  # the extra tokens also as queries
    zoo.apply_adapter(bb, "prefix", num_tokens=6)
    wrapped = bb.model.blocks[0].attn
    assert isinstance(wrapped, PrefixAttention)
    with torch.no_grad():
        kv = attn.qkv(e)[0]
        wrapped.prefix_k.copy_(kv[:, 32:64])
        wrapped.prefix_v.copy_(kv[:, 64:])
        assert torch.allclose(wrapped(x), ref, atol=1e-5)
    assert zoo.count_parameters(bb)[0] == 2 * 2 * 6 * 32
    bound = math.sqrt(6 / (3 * 16 * 16 + 32))
    assert bb.model.blocks[1].attn.prefix_k.abs().max() <= bound


def test_prefix_refuses_windowed_sam_attention():
    sam = zoo.create_backbone("sam", pretrained=False, img_size=64, embed_dim=32, depth=1, num_heads=2,
                              global_attn_indexes=(), window_size=2)
    with pytest.raises(SiteError, match="prefix tuning needs timm ViT attention"):
        zoo.apply_adapter(sam, "prefix")


def test_bench_has_ast_rows(tmp_path):
    from bench import adapters as bench_adapters

    res = bench_adapters.main(["--backbone", "ast", "--model", "deit_tiny_distilled_patch16_224", "--max-length", "40",
                               "--depth", "1", "--batch-size", "2", "--steps", "1", "--repeats", "1", "--warmup", "0",
                               "--memory", "skip", "--adapters", "lora", "conformer", "--out", str(tmp_path), "--quiet"])
    rows = {r["label"]: r for r in res["rows"]}
    d, r = 192, 8
    assert rows["lora"]["trainable"] == 2 * r * (d + d)  # q and v slices of one block
    assert rows["conformer"]["trainable"] == (d * 4 + 4) + (2 * 31 + 2) + 2 * 2 + (2 * d + d)  # b = round(192/96) = 2
    assert "40 frames (AST)" in (tmp_path / "results.md").read_text()


def test_conformer_artifact_keeps_batchnorm_statistics(tmp_path):
    torch.manual_seed(0)
    model = zoo.ImageClassifier(tiny(), 5)
    zoo.apply_adapter(model, "conformer", reduction_rate=8, zero_init=False)
    model.train()
    for x, _ in batches(3):
        model(x)  # BatchNorm running statistics move away from (0, 1)
    model.eval()
    x = batches(1)[0][0]
    with torch.no_grad():
        want = model(x)
    zoo.save_adapter(model, tmp_path / "art")
    torch.manual_seed(0)
    fresh = zoo.ImageClassifier(tiny(), 5)  # the same random base weights
    zoo.load_adapter(fresh, tmp_path / "art")
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(x), want, atol=1e-6)
