"""Q-Adapter (reconstruction): identity at init, no token leak, trainable set, gates, training."""
import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.adapters.q_adapter import QAdapter, QueryBlock
from zoo.sites import SiteError

torch.set_num_threads(1)


def tiny(depth=3, seed=0):
    torch.manual_seed(seed)
    return zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=depth)


def qblocks(bb):
    return [b for b in bb.model.blocks if isinstance(b, QueryBlock)]


@pytest.mark.parametrize("gate", ["tanh", "channel", "sigmoid"])
def test_identity_at_init(gate):
    bb = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    ref_tokens, ref_pooled = bb.forward_features(x), bb(x)
    zoo.apply_adapter(bb, "q_adapter", num_queries=4, proj_dim=8, gate=gate)
    assert torch.allclose(bb.forward_features(x), ref_tokens, atol=1e-5)
    assert torch.allclose(bb(x), ref_pooled, atol=1e-5)
    for blk in qblocks(bb):  # the gated term is exactly zero at init
        q = torch.randn(2, 4, blk.dim)
        h = blk.up(F.gelu(blk.down(torch.randn(2, 5, blk.dim))))
        assert torch.count_nonzero(blk.gate_value(q) * h) == 0


def test_tokens_do_not_attend_to_queries():
    """One-way mask: with the gate closed, no choice of query values changes the output."""
    bb = tiny().eval()
    zoo.apply_adapter(bb, "q_adapter", num_queries=4, proj_dim=8)
    x = torch.randn(2, 3, 32, 32)
    out = bb.forward_features(x)
    with torch.no_grad():
        for blk in qblocks(bb):
            blk.queries.mul_(100).add_(3)
    assert torch.allclose(bb.forward_features(x), out, atol=1e-6)
    with torch.no_grad():  # ...while an open gate does let the queries in
        for blk in qblocks(bb):
            blk.alpha.fill_(1.0)
    assert not torch.allclose(bb.forward_features(x), out, atol=1e-3)


@pytest.mark.parametrize("layers", ["all", [0, 2], 1])
def test_queries_never_leak_into_the_sequence(layers):
    bb = tiny()
    x = torch.randn(2, 3, 32, 32)
    n = bb.forward_features(x).shape
    zoo.apply_adapter(bb, "q_adapter", num_queries=7, proj_dim=8, layers=layers)
    with torch.no_grad():
        for blk in qblocks(bb):
            blk.alpha.fill_(0.5)
    assert bb.forward_features(x).shape == n
    seen = []
    hooks = [blk.register_forward_hook(lambda m, i, o: seen.append((i[0].shape[1], o.shape[1]))) for blk in bb.model.blocks]
    bb(x)
    for h in hooks:
        h.remove()
    assert all(a == b == n[1] for a, b in seen)  # every block's input and output keep the length


@pytest.mark.parametrize("gate", ["tanh", "channel", "sigmoid"])
def test_trainable_set_is_queries_gates_projections(gate):
    bb = tiny(depth=4)
    zoo.apply_adapter(bb, "q_adapter", num_queries=5, proj_dim=6, gate=gate, layers=[1, 3])
    d = bb.feature_dim
    gate_names = ["gate.weight", "gate.bias"] if gate == "sigmoid" else ["alpha"]
    per = ["queries", "down.weight", "down.bias", "up.weight", "up.bias"] + gate_names
    names = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert names == {f"model.blocks.{i}.{p}" for i in (1, 3) for p in per}
    gate_n = {"tanh": 1, "channel": d, "sigmoid": d + 1}[gate]
    per_block = 5 * d + (d * 6 + 6) + (6 * d + d) + gate_n
    assert QAdapter.params_per_block(d, 5, 6, gate) == per_block
    assert zoo.count_parameters(bb)[0] == 2 * per_block


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="valid gates: tanh, channel, sigmoid"):
        zoo.apply_adapter(tiny(), "q_adapter", gate="relu")
    with pytest.raises(SiteError, match="out of range"):
        zoo.apply_adapter(tiny(), "q_adapter", layers=[7])
    with pytest.raises(TypeError, match="valid options"):
        zoo.apply_adapter(tiny(), "q_adapter", queries=3)


def test_training_opens_the_gate_and_reaches_only_adapter_params():
    torch.manual_seed(0)
    model = zoo.ImageClassifier(tiny(depth=2), 4)
    zoo.apply_adapter(model, "q_adapter", num_queries=4, proj_dim=8)
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if not p.requires_grad}
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    opt = torch.optim.Adam(zoo.param_groups(model, 1e-2, 0.0))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    blocks = qblocks(model.backbone)
    assert all(b.alpha.abs().item() > 0 for b in blocks)
    assert all(b.queries.grad is not None and b.queries.grad.abs().sum() > 0 for b in blocks)
    for n, p in model.backbone.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n])


def test_not_mergeable_and_unload_restores_blocks():
    bb = tiny()
    x = torch.randn(2, 3, 32, 32)
    originals = list(bb.model.blocks)
    zoo.apply_adapter(bb, "q_adapter", num_queries=2, proj_dim=4)
    with pytest.raises(zoo.NotMergeableError):
        zoo.merge_adapters(bb)
    zoo.remove_adapters(bb)
    assert list(bb.model.blocks) == originals
    assert bb.forward_features(x).shape[1] == 5


def test_artifact_round_trip(tmp_path):
    bb = tiny()
    zoo.apply_adapter(bb, "q_adapter", num_queries=3, proj_dim=4, gate="channel")
    with torch.no_grad():
        for blk in qblocks(bb):
            blk.alpha.uniform_(-1, 1)
    x = torch.randn(2, 3, 32, 32)
    out = bb.forward_features(x)
    zoo.save_adapter(bb, tmp_path / "a")
    fresh = tiny()
    zoo.load_adapter(fresh, tmp_path / "a")
    assert torch.allclose(fresh.forward_features(x), out, atol=1e-6)


# ---------------------------------------------------------------------- integration (train.py's job)
def test_q_adapter_config_run_and_artifact_round_trip(tmp_path):
    from pathlib import Path

    import lightning as L

    from tasks.runner import build_task
    from tests.helpers import compose_config, run_train

    overrides = ["experiment=tiny", "adapter=q_adapter"]
    cfg = compose_config(overrides)
    assert cfg.adapter.name == "q_adapter" and cfg.adapter.num_queries == 16 and cfg.adapter.gate == "tanh"
    m = run_train(overrides, tmp_path)
    assert m["train_loss_last"] < m["train_loss_first"]
    out = Path(m["out_dir"])
    (best,) = [p for p in (out / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    ckpt = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    L.seed_everything(cfg.seed)
    fresh = build_task(cfg).model
    zoo.remove_adapters(fresh)
    zoo.load_adapter(fresh, out / "adapter")
    loaded = dict(fresh.named_parameters())
    trained = {k[len("model."):]: v for k, v in ckpt.items()}
    assert set(trained) == {n for n, p in fresh.named_parameters() if p.requires_grad}
    for k, v in trained.items():
        assert torch.equal(loaded[k], v), k
    assert any(float(v.abs().max()) > 0 for k, v in trained.items() if k.endswith(".alpha"))  # the gate opened
