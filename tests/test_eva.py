"""EVA: the same layers, ranks, scales and forward as peft's ``init_lora_weights="eva"`` for the same
``eva_state_dict``; the PCA it computes; the rank redistribution; identity at init; the artifact."""
import copy

import pytest
import torch

import zoo
from zoo.adapters.eva import RunningPCA

from .conftest import tiny_vit

peft = pytest.importorskip("peft")
KEYS = ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"]


def _state(ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.linalg.qr(torch.randn(64, 64, generator=g))[0][:r] for k, r in zip(KEYS, ranks)}


@pytest.mark.parametrize("adjust", [True, False])
def test_same_layers_ranks_scales_and_forward_as_peft(adjust):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import EvaConfig, initialize_lora_eva_weights

    torch.manual_seed(0)
    bb = tiny_vit()
    pm = get_peft_model(copy.deepcopy(bb.model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["qkv", "fc1"], init_lora_weights="eva",
        eva_config=EvaConfig(adjust_scaling_factors=adjust)))
    zoo.apply_adapter(bb, "eva", rank=4, alpha=8.0, targets=["qkv", "fc1"], adjust_scaling_factors=adjust)
    ranks = [6, 0, 4, 2]  # redistributed: one layer above r, one dropped, one below
    sd = _state(ranks)
    initialize_lora_eva_weights(pm, eva_state_dict={f"base_model.model.{k}": v.clone() for k, v in sd.items()})
    a = zoo.adapters_of(bb)[0]
    a.load_eva_state_dict({f"model.{k}": v for k, v in sd.items()})
    assert a.ranks == {f"model.{k}": r for k, r in zip(KEYS, ranks)} and a.config["ranks"] == a.ranks
    ours = {m.eva_key.removeprefix("model."): m for m in a.modules}
    theirs = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(ours) == set(theirs) == {k for k, r in zip(KEYS, ranks) if r}
    for k, m in ours.items():
        t = theirs[k]
        assert m.rank == t.r["default"]
        assert m.scaling == pytest.approx(t.scaling["default"])
        torch.testing.assert_close(m.lora_A, t.lora_A["default"].weight)
        assert not m.lora_B[next(iter(m.lora_B))].any()
        with torch.no_grad():
            b = torch.randn_like(t.lora_B["default"].weight)
            t.lora_B["default"].weight.copy_(b)
            m.lora_B[next(iter(m.lora_B))].copy_(b)
    x = torch.randn(2, 3, 32, 32)
    bb.eval(), pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(bb.model(x), pm(x), rtol=1e-4, atol=1e-5)
        zoo.merge_adapters(bb, unload=False)
        pm.merge_adapter()
        torch.testing.assert_close(bb.model(x), pm(x), rtol=1e-4, atol=1e-5)


def test_running_pca_is_the_exact_pca_of_the_data_seen():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 8, generator=g) @ torch.randn(8, 8, generator=g) + 3.0
    p = RunningPCA(8, 4)
    for chunk in X.split(70):
        p.update(chunk)
    Xc = (X - X.mean(0)).double()
    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    cos = (p.components * Vh[:4]).sum(1).abs()
    assert (cos > 1 - 1e-8).all()
    torch.testing.assert_close(p.singular_values, S[:4])
    torch.testing.assert_close(p.ratios, (S[:4] ** 2 / (S ** 2).sum()))


def test_components_agree_with_peft_get_eva_state_dict():
    """peft's randomised incremental PCA and the exact running PCA span the same top components."""
    from peft import LoraConfig
    from peft.tuners.lora import EvaConfig, get_eva_state_dict

    torch.manual_seed(0)
    bb = tiny_vit()
    g = torch.Generator().manual_seed(1)
    # images with a few dominant directions (well separated variances), so the top components are well defined
    pat = torch.randn(3, 3, 32, 32, generator=g)
    scale = torch.tensor([8.0, 3.0, 1.0])[None, :, None, None, None]
    data = [(torch.randn(16, 3, 1, 1, 1, generator=g) * scale * pat).sum(1) + 0.05 * torch.randn(16, 3, 32, 32, generator=g)
            for _ in range(6)]
    net = copy.deepcopy(bb.model).eval()
    cfg = LoraConfig(r=2, target_modules=["fc1"], init_lora_weights="eva", eva_config=EvaConfig(tau=0.999))
    theirs = get_eva_state_dict(net, data, cfg, forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None,
                                prepare_layer_inputs_fn=None, show_progress_bar=False)
    zoo.apply_adapter(bb, "eva", rank=2, targets=["fc1"], tau=0.999)
    ours = zoo.adapters_of(bb)[0].eva_state_dict(bb, data, loss_fn=lambda x: bb(x))
    for k, v in theirs.items():
        mine = ours[f"model.{k}"]
        assert mine.shape == v.shape
        cos = (mine * v).sum(1).abs() / (mine.norm(dim=1) * v.norm(dim=1))
        assert (cos > 0.99).all(), (k, cos)


def test_rank_redistribution_keeps_the_budget_and_follows_explained_variance():
    torch.manual_seed(0)
    model = zoo.ImageClassifier(tiny_vit(), 3)
    zoo.apply_adapter(model, "eva", rank=4, targets=["fc1", "fc2"], whiten=True)
    a = zoo.adapters_of(model)[0]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    x = batches[0][0]
    model.eval()
    before = model(x)
    zoo.prepare_adapters(model, batches)
    assert sum(a.ranks.values()) == 4 * 4 and set(a.ranks.values()) != {4}  # the budget moved between layers
    torch.testing.assert_close(model(x), before)  # B = 0: unchanged at init
    trainable = zoo.count_parameters(model.backbone)[0]
    dims = {"fc1": (64, 256), "fc2": (256, 64)}
    assert trainable == sum(r * sum(dims[k.split(".")[-1]]) for k, r in a.ranks.items())
    # whitened rows: A_l = V_l[:r_l] / sqrt(sigma), so rows are orthogonal with norms 1/sqrt(sigma)
    m = a.modules[0]
    gram = m.lora_A @ m.lora_A.t()
    torch.testing.assert_close(gram, torch.diag(gram.diagonal()), atol=1e-5, rtol=0)
    assert not torch.allclose(gram.diagonal(), torch.ones(m.rank))


def test_artifact_rebuilds_the_redistributed_ranks(tmp_path):
    torch.manual_seed(0)
    model = zoo.ImageClassifier(tiny_vit(), 3)
    zoo.apply_adapter(model, "eva", rank=4, targets=["fc1", "fc2"])
    g = torch.Generator().manual_seed(0)
    zoo.prepare_adapters(model, [(torch.randn(8, 3, 32, 32, generator=g), torch.zeros(8, dtype=torch.long))] * 2)
    with torch.no_grad():
        for m in zoo.adapters_of(model)[0].modules:
            m.lora_B[next(iter(m.lora_B))].normal_()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    zoo.save_adapter(model, tmp_path / "a")
    other = zoo.ImageClassifier(tiny_vit(), 3)
    other.load_state_dict(zoo.remove_adapters(copy.deepcopy(model)).state_dict())
    zoo.load_adapter(other, tmp_path / "a")
    other.eval()
    assert zoo.adapters_of(other)[0].ranks == zoo.adapters_of(model)[0].ranks
    torch.testing.assert_close(other(x), want)


def test_train_biases_trains_the_backbone_biases_too():
    model = zoo.ImageClassifier(tiny_vit(), 3)
    zoo.apply_adapter(model, "eva", rank=2, train_biases=True)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    biases = {n for n, _ in model.backbone.named_parameters() if n.endswith(".bias")}
    assert biases <= trainable and all(n.endswith(".bias") or "lora_" in n for n in trainable)
