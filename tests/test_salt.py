"""SALT (arXiv 2503.16055): singular-value map, counts, merge, factored forward, regulariser, artifacts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import zoo
from zoo.adapters.base import StepContext
from zoo.adapters.salt import SALTLinear, canonical_svd
from zoo.sites import SiteError

ROOT = Path(__file__).resolve().parents[1]


def tiny_vit(seed: int = 0, depth: int = 2):
    torch.manual_seed(seed)
    return zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=depth)


def perturb(m: SALTLinear, seed: int = 1) -> None:
    """Move a, b, X, Y away from init, far enough that both ReLUs clip something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.scale.add_(torch.randn(m.scale.shape, generator=g) * 0.5)
        m.shift.copy_(torch.randn(m.shift.shape, generator=g) * m.S[: m.rank].max())
        m.X.add_(torch.randn(m.X.shape, generator=g) * 0.1)
        m.Y.copy_(torch.randn(m.Y.shape, generator=g) * 0.1)


def test_identity_at_init_is_exact():
    bb = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    ref = bb(x)
    zoo.apply_adapter(bb, "salt", r_lora=8)
    assert torch.equal(bb(x), ref)
    m = bb.model.blocks[0].attn.qkv
    assert torch.count_nonzero(m.Y) == 0 and torch.equal(m.scale, torch.ones_like(m.scale))
    assert torch.count_nonzero(m.shift) == 0 and torch.count_nonzero(m.X) == m.X.numel()


def test_forward_is_u_relu_sigma_vt():
    torch.manual_seed(0)
    lin = nn.Linear(24, 40).requires_grad_(False)
    m = SALTLinear(lin, ratio=0.25, r_lora=3)
    perturb(m)
    r, S = m.rank, m.S
    top = m.scale * S[:r] + m.shift
    res = torch.diag(S[r:]) + m.X @ m.Y
    assert (top < 0).any() and (res < 0).any()  # both ReLUs are active in this check
    sig = torch.zeros(m.k, m.k)
    sig[:r, :r] = torch.diag(top)
    sig[r:, r:] = res
    w_new = m.U @ torch.relu(sig) @ m.Vh
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(m(x), x @ w_new.T + lin.bias, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.adapted_weight(), w_new)


def test_svd_is_taken_from_the_loaded_weights_with_fixed_signs():
    bb = tiny_vit()
    with torch.no_grad():  # "load" other weights before attaching: the SVD must see them
        bb.model.blocks[0].mlp.fc1.weight.mul_(3.0).add_(1.0)
    zoo.apply_adapter(bb, "salt", r_lora=4)
    m = bb.model.blocks[0].mlp.fc1
    w = m.base.weight
    torch.testing.assert_close(m.U @ torch.diag(m.S) @ m.Vh, w, rtol=1e-4, atol=1e-4)
    idx = m.U.abs().argmax(0)
    assert (m.U.gather(0, idx[None]) > 0).all()
    # the sign convention is a function of the weight alone: the basis of -W flips U, not V
    U2, S2, V2 = canonical_svd(-w)
    torch.testing.assert_close(S2, m.S)
    torch.testing.assert_close(V2, -m.Vh, rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        w.mul_(2.0)
    m.recompute_svd()
    torch.testing.assert_close(m.S, 2 * S2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(ratio=0.1, r_lora=8), dict(rank=7, r_lora=5), dict(ratio=0.5, r_lora=1)])
def test_trainable_count_per_layer(kw):
    bb = tiny_vit()
    zoo.apply_adapter(bb, "salt", **kw)
    d, hidden = 192, 768
    total = 0
    for site, (dout, din) in {"qkv": (3 * d, d), "proj": (d, d), "fc1": (hidden, d), "fc2": (d, hidden)}.items():
        m = getattr(bb.model.blocks[1].attn if site in ("qkv", "proj") else bb.model.blocks[1].mlp, site)
        k = min(dout, din)
        r = kw["rank"] if "rank" in kw else max(1, int(k * kw["ratio"]))
        rl = kw["r_lora"]
        assert m.rank == r
        n = sum(p.numel() for p in m.parameters() if p.requires_grad)
        assert n == 2 * r + 2 * (k - r) * rl
        total += n
    assert zoo.count_parameters(bb)[0] == 2 * total


def test_merge_and_unmerge_are_exact():
    torch.manual_seed(0)
    lin = nn.Linear(24, 40).requires_grad_(False)
    w0 = lin.weight.detach().clone()
    m = SALTLinear(lin, rank=5, r_lora=4)
    perturb(m)
    x = torch.randn(7, 24)
    before = m(x)
    m.merge()
    torch.testing.assert_close(lin.weight, m.adapted_weight(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-5)
    m.unmerge()
    assert torch.equal(lin.weight, w0)
    assert torch.equal(m(x), before)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every new tensor an aten op computes (views of existing tensors such
    as the transpose of the frozen weight inside ``F.linear`` are not computed results)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def _weight_sized(shapes, d_out, d_in):
    return [(f, s) for f, s in shapes if len(s) >= 2 and s[-2:] in ((d_out, d_in), (d_in, d_out))]


def test_training_step_never_materialises_a_weight_sized_matrix():
    d_in, d_out = 24, 40  # batch dims chosen not to collide with these
    torch.manual_seed(0)
    m = SALTLinear(nn.Linear(d_in, d_out).requires_grad_(False), ratio=0.25, r_lora=3)
    perturb(m)
    x = torch.randn(3, 5, d_in)
    with ShapeRecorder() as rec:
        (m(x).square().mean() + m.regulariser()).backward()
    assert m.Y.grad is not None and m.X.grad is not None and m.scale.grad is not None
    assert any(s == (m.k - m.rank, m.k - m.rank) for _, s in rec.shapes)  # the recorder sees matmuls
    assert _weight_sized(rec.shapes, d_out, d_in) == []
    with ShapeRecorder() as control:  # the check would catch a forward that forms W' (or ΔW)
        nn.functional.linear(x, m.adapted_weight())
    assert _weight_sized(control.shapes, d_out, d_in)


def test_regulariser_matches_definition_and_has_finite_gradient_at_init():
    torch.manual_seed(0)
    m = SALTLinear(nn.Linear(24, 40).requires_grad_(False), ratio=0.25, r_lora=3)
    m.regulariser().backward()  # Y = 0 and a σ + b = σ at init: R = 0, gradients must not be NaN
    assert m.regulariser().item() == 0
    assert all(torch.isfinite(p.grad).all() for p in (m.scale, m.shift, m.X, m.Y))
    perturb(m)
    s = m.S[: m.rank]
    want = torch.linalg.norm(torch.diag(m.scale * s + m.shift) - torch.diag(s)) + torch.linalg.norm(m.X @ m.Y)
    torch.testing.assert_close(m.regulariser(), want)


def test_extra_loss_is_weighted_sum_over_layers():
    bb = tiny_vit()
    zoo.apply_adapter(bb, "salt", r_lora=4, reg_multiplier=0.01)
    layers = [m for m in bb.modules() if isinstance(m, SALTLinear)]
    assert len(layers) == 8
    for i, m in enumerate(layers):
        perturb(m, seed=i)
    ctx = StepContext(model=bb, inputs=None, targets=None, outputs=None)
    torch.testing.assert_close(zoo.extra_loss(bb, ctx), 0.01 * sum(m.regulariser() for m in layers))
    bb0 = tiny_vit()
    zoo.apply_adapter(bb0, "salt", r_lora=4)  # reg_multiplier 0 (released config): no extra loss
    assert zoo.extra_loss(bb0, ctx) is None


def test_gradients_reach_only_salt_parameters_and_artifact_holds_only_them(tmp_path):
    model = zoo.ImageClassifier(tiny_vit(), 5)
    zoo.apply_adapter(model, "salt", r_lora=4)
    for m in model.modules():
        if isinstance(m, SALTLinear):
            perturb(m)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for n, p in model.named_parameters():
        trains = n.split(".")[-1] in ("scale", "shift", "X", "Y") or n.startswith("head.")
        assert p.requires_grad == trains and (p.grad is not None) == trains, n
    state = zoo.adapter_state_dict(model)
    assert {k.split(".")[-1] for k in state} == {"scale", "shift", "X", "Y", "weight", "bias"}
    assert all(k.startswith("head.") for k in state if k.split(".")[-1] in ("weight", "bias"))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    zoo.save_adapter(model, tmp_path / "a")
    fresh = zoo.ImageClassifier(tiny_vit(), 5).eval()
    zoo.load_adapter(fresh, tmp_path / "a")  # the SVD is recomputed from the base weights
    torch.testing.assert_close(fresh(x), out)


def test_merged_equals_unmerged_after_training():
    bb = tiny_vit()
    keys = set(bb.state_dict())
    model = zoo.ImageClassifier(bb, 5)
    zoo.apply_adapter(model, "salt", r_lora=4, reg_multiplier=0.01)
    torch.manual_seed(3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    opt = torch.optim.AdamW(zoo.param_groups(model, 1e-2, 1e-4))
    losses = []
    for _ in range(4):
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        total = loss + zoo.extra_loss(model, StepContext(model, x, y, out, loss))
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.backbone.model.blocks[0].mlp.fc2.Y.abs().sum() > 0
    model.eval()
    from tests.integration import assert_merge_keeps_outputs

    assert_merge_keeps_outputs(model, torch.randn(3, 3, 32, 32), keys, rtol=1e-4, atol=1e-4)


def test_bad_options_are_explained():
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        zoo.apply_adapter(tiny_vit(), "salt", ratio=0.0)
    with pytest.raises(ValueError, match="rank must be in 1..192"):
        zoo.apply_adapter(tiny_vit(), "salt", rank=500)
    with pytest.raises(SiteError, match="qkv, o, fc1, fc2"):
        zoo.apply_adapter(tiny_vit(), "salt", targets=["v"])


def test_adapter_config_composes_into_the_constructor():
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/adapter/salt.yaml"))
    assert cfg.pop("name") == "salt"
    a = zoo.adapters.ADAPTERS.get("salt").from_config(**cfg)
    assert a.config["targets"] == ["qkv", "o", "fc1", "fc2"] and a.ratio == 0.1 and a.rank is None


def test_tiny_run_trains_reloads_and_merges(tmp_path):
    """experiment=tiny end to end with the regulariser on: loss goes down, the artifact (only
    a, b, X, Y + head; the SVD is recomputed) reproduces the run's validation accuracy, and
    merging the trained adapter does not change the logits."""
    from safetensors.torch import load_file

    from tests.helpers import run_train
    from tests.integration import check_trained_artifact

    overrides = ["experiment=tiny", "adapter=salt", "adapter.r_lora=8", "adapter.reg_multiplier=0.01"]
    m = run_train(overrides, tmp_path)
    assert m["adapter"] == "salt" and m["train_loss_last"] < m["train_loss_first"]
    names = load_file(str(Path(m["out_dir"]) / "adapter" / "adapter.safetensors")).keys()
    assert {n.split(".")[-1] for n in names if not n.startswith("head.")} == {"scale", "shift", "X", "Y"}
    model = check_trained_artifact(overrides, m)
    assert all(torch.count_nonzero(mod.Y) > 0 for mod in model.modules() if isinstance(mod, SALTLinear))


@pytest.mark.slow  # two 2-process runs; `make test-slow` runs it
def test_ddp_cpu_runs_hydra_and_salt(tmp_path):
    """trainer=ddp_cpu (two processes) for both methods; each rank recomputes SALT's SVD at attach."""
    from tests.helpers import run_train_ddp

    for name, extra in (("hydra", []), ("salt", ["adapter.r_lora=8", "adapter.reg_multiplier=0.01"])):
        m = run_train_ddp(["experiment=tiny", f"adapter={name}", "trainer.limit_train_batches=4", *extra],
                          tmp_path / name)
        from tests.integration import assert_val_accuracy

        assert m["adapter"] == name
        assert_val_accuracy(m, 200)
        assert m["train_loss_last"] < m["train_loss_first"]
        assert (Path(m["out_dir"]) / "adapter" / "adapter.safetensors").is_file()
