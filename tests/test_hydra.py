"""Hydra (arXiv 2309.06922): forward, merge formula, parameter count, artifacts, configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import zoo
from zoo.adapters.hydra import HydraLinear
from zoo.sites import SiteError

ROOT = Path(__file__).resolve().parents[1]


def tiny_vit(seed: int = 0, depth: int = 2):
    torch.manual_seed(seed)
    return zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32, depth=depth)


def perturb(module: nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Give every adapter tensor a non-trivial value (up-projections start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def train_steps(model: nn.Module, steps: int = 4, lr: float = 1e-2) -> list[float]:
    torch.manual_seed(3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    opt = torch.optim.AdamW([g for g in zoo.param_groups(model, lr, 1e-4)])
    model.train()
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def test_branch_forward_is_the_paper_formula():
    torch.manual_seed(0)
    lin = nn.Linear(12, 20)
    m = HydraLinear(lin, par_rank=3, seq_rank=2, scale=0.7)
    perturb(m.par)
    perturb(m.seq, seed=2)
    x = torch.randn(4, 5, 12)
    y0 = x @ lin.weight.T + lin.bias
    P = (x @ m.par.down.weight.T + m.par.down.bias) @ m.par.up.weight.T + m.par.up.bias
    S = (y0 @ m.seq.down.weight.T + m.seq.down.bias) @ m.seq.up.weight.T + m.seq.up.bias
    torch.testing.assert_close(m(x), y0 + 0.7 * P + 0.7 * S)


def test_identity_at_init_and_init_scheme():
    bb = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    ref = bb(x)
    zoo.apply_adapter(bb, "hydra")
    assert torch.equal(bb(x), ref)
    m = bb.model.blocks[0].mlp.fc2
    assert isinstance(m, HydraLinear)
    for br in (m.par, m.seq):
        assert torch.count_nonzero(br.up.weight) == 0 and torch.count_nonzero(br.up.bias) == 0
        assert torch.count_nonzero(br.down.bias) == 0
        # xavier-uniform bound sqrt(6 / (fan_in + fan_out)); the draw is not all zeros
        bound = (6 / (br.down.in_features + br.down.out_features)) ** 0.5
        assert br.down.weight.abs().max() <= bound and br.down.weight.abs().max() > bound / 2


def _expected_count(d: int, hidden: int, depth: int, rp: int, rs: int, bias: bool) -> int:
    def branch(d_in, d_out, r):
        return r * d_in + d_out * r + ((r + d_out) if bias else 0)

    per_block = (branch(d, d, rp) + branch(d, d, rs)) + (branch(hidden, d, rp) + branch(d, d, rs))  # o, fc2
    return depth * per_block


@pytest.mark.parametrize("rp,rs,bias", [(2, 2, True), (4, 8, False)])
def test_parameter_count_matches_formula(rp, rs, bias):
    bb = tiny_vit(depth=3)
    zoo.apply_adapter(bb, "hydra", par_rank=rp, seq_rank=rs, bias=bias)
    trainable, _ = zoo.count_parameters(bb)
    assert trainable == _expected_count(192, 768, 3, rp, rs, bias)


def test_merge_is_the_formula_and_unmerge_is_exact():
    torch.manual_seed(0)
    lin = nn.Linear(12, 20).requires_grad_(False)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    m = HydraLinear(lin, par_rank=3, seq_rank=2, scale=1.3).eval()
    perturb(m)
    x = torch.randn(6, 12)
    before = m(x)
    m.merge()
    s = 1.3
    Ap, dp, Bp, up = m.par.down.weight, m.par.down.bias, m.par.up.weight, m.par.up.bias
    As, ds, Bs, us = m.seq.down.weight, m.seq.down.bias, m.seq.up.weight, m.seq.up.bias
    with torch.no_grad():
        torch.testing.assert_close(lin.weight, w0 + s * (Bp @ Ap + Bs @ As @ w0))
        torch.testing.assert_close(lin.bias, b0 + s * (Bs @ As @ b0 + Bp @ dp + up + Bs @ ds + us))
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin(x), before, rtol=1e-5, atol=1e-5)
    m.unmerge()
    assert torch.equal(lin.weight, w0) and torch.equal(lin.bias, b0)
    assert torch.equal(m(x), before)


def test_merge_on_a_bias_free_layer_adds_then_removes_the_bias():
    torch.manual_seed(0)
    lin = nn.Linear(10, 10, bias=False).requires_grad_(False)
    m = HydraLinear(lin).eval()
    perturb(m)
    x = torch.randn(3, 10)
    before = m(x)
    m.merge()
    assert lin.bias is not None and not lin.bias.requires_grad
    torch.testing.assert_close(lin(x), before, rtol=1e-5, atol=1e-5)
    m.unmerge()
    assert lin.bias is None


def test_merged_equals_unmerged_after_training_and_unloads_to_plain_model():
    bb = tiny_vit()
    keys = set(bb.state_dict())
    model = zoo.ImageClassifier(bb, 5)
    zoo.apply_adapter(model, "hydra", scale=0.5, dropout=0.2)
    hydra_before = {n: p.detach().clone() for n, p in model.named_parameters() if "par." in n or "seq." in n}
    losses = train_steps(model)
    assert losses[-1] < losses[0]
    changed = [n for n, p in model.named_parameters() if n in hydra_before and not torch.equal(p, hydra_before[n])]
    assert len(changed) == len(hydra_before)  # every adapter tensor trained (incl. the zero-init ups)
    from tests.integration import assert_merge_keeps_outputs

    assert_merge_keeps_outputs(model, torch.randn(3, 3, 32, 32), keys, rtol=1e-4, atol=1e-5)


def test_merge_refuses_over_an_unmerged_adapter_below():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8).requires_grad_(False)
    inner = HydraLinear(lin)
    outer = HydraLinear(inner)
    with pytest.raises(RuntimeError, match="merge the adapters applied before"):
        outer.merge()
    perturb(inner)
    perturb(outer, seed=4)
    x = torch.randn(2, 8)
    before = outer(x)
    inner.merge()
    outer.merge()
    torch.testing.assert_close(lin(x), before, rtol=1e-5, atol=1e-5)
    outer.unmerge()
    inner.unmerge()
    torch.testing.assert_close(outer(x), before)


def test_gradients_reach_only_hydra_and_head():
    model = zoo.ImageClassifier(tiny_vit(), 5)
    zoo.apply_adapter(model, "hydra")
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for n, p in model.named_parameters():
        is_adapter = ".par." in n or ".seq." in n or n.startswith("head.")
        assert p.requires_grad == is_adapter, n
        assert (p.grad is not None) == is_adapter, n


def test_artifact_round_trip(tmp_path):
    model = zoo.ImageClassifier(tiny_vit(), 5)
    zoo.apply_adapter(model, "hydra", par_rank=3, scale=2.0)
    perturb(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    zoo.save_adapter(model, tmp_path / "a")
    fresh = zoo.ImageClassifier(tiny_vit(), 5).eval()
    zoo.load_adapter(fresh, tmp_path / "a")
    assert zoo.adapters_of(fresh)[0].config["par_rank"] == 3
    torch.testing.assert_close(fresh(x), out)


def test_bad_options_name_the_valid_ones():
    with pytest.raises(ValueError, match="xavier, normal, kaiming"):
        zoo.apply_adapter(tiny_vit(), "hydra", init="orthogonal")
    with pytest.raises(SiteError, match="qkv, o, fc1, fc2"):
        zoo.apply_adapter(tiny_vit(), "hydra", targets=["q"])
    with pytest.raises(TypeError, match="valid options"):
        zoo.apply_adapter(tiny_vit(), "hydra", rank=2)


# The reference's per-dataset values (extremebird/Hydra vtab1k/configs/hydra_both/<dataset>.yaml, as
# tabulated in the method spec): dataset -> (lr, wd, scale, dropout, batch size). Every config is
# checked against its own row (issue 15: a range check passed with any row swapped).
HYDRA_VTAB = {
    "cifar": (5e-4, 1e-4, 0.1, 0.2, 16), "caltech101": (1e-3, 1e-4, 4, 0.1, 32), "dtd": (1e-3, 1e-4, 0.1, 0.2, 32),
    "oxford_flowers102": (5e-3, 1e-4, 0.1, 0, 64), "oxford_iiit_pet": (1e-3, 1e-4, 0.1, 0, 32),
    "svhn": (1e-3, 1e-4, 3, 0, 16), "sun397": (1e-3, 1e-4, 0.1, 0.2, 64), "patch_camelyon": (5e-3, 1e-4, 0.1, 0.2, 64),
    "eurosat": (5e-4, 1e-4, 0.1, 0.2, 64), "resisc45": (5e-3, 1e-4, 0.1, 0.2, 64),
    "diabetic_retinopathy": (5e-4, 1e-4, 4.5, 0.2, 64), "clevr_count": (5e-4, 1e-4, 1.5, 0.2, 64),
    "clevr_dist": (5e-4, 1e-4, 0.1, 0, 16), "dmlab": (1e-3, 1e-4, 4.5, 0.2, 64), "kitti": (5e-4, 1e-4, 4.5, 0.2, 64),
    "dsprites_loc": (1e-3, 1e-4, 4.5, 0.2, 16), "dsprites_ori": (1e-3, 1e-4, 2.5, 0.2, 64),
    "smallnorb_azi": (5e-3, 1e-5, 3, 0.2, 64), "smallnorb_ele": (5e-4, 1e-4, 1, 0.2, 64),
}


def test_vtab_experiments_compose_with_the_reference_values():
    from tests.helpers import compose_config

    files = sorted((ROOT / "conf/experiment/hydra_vtab").glob("*.yaml"))
    assert len(files) == 19  # the VTAB-1k suite
    for f in files:
        assert f.read_text().startswith("# @package _global_")
        cfg = compose_config([f"experiment=hydra_vtab/{f.stem}"])
        assert cfg.adapter.name == "hydra" and cfg.task.dataset == f.stem and cfg.task.max_epochs == 100
        assert cfg.adapter.par_rank == cfg.adapter.seq_rank == 2
        assert cfg.task.optimizer.lr in (5e-4, 1e-3, 5e-3) and cfg.task.optimizer.weight_decay in (1e-4, 1e-5)
        assert cfg.adapter.scale > 0 and cfg.adapter.dropout in (0.0, 0.1, 0.2)
        assert cfg.data.batch_size in (16, 32, 64)
        got = (cfg.task.optimizer.lr, cfg.task.optimizer.weight_decay, cfg.adapter.scale, cfg.adapter.dropout, cfg.data.batch_size)
        assert got == pytest.approx(HYDRA_VTAB[f.stem], rel=1e-9, abs=0), f.stem  # its own row of the table
        assert cfg.backbone.kwargs.drop_path_rate == 0.1
        assert (cfg.task.scheduler.cosine_epochs, cfg.task.scheduler.warmup_lr_init) == (500, 1e-6)  # timm t_initial
        kwargs = {k: v for k, v in cfg.adapter.items() if k != "name"}
        zoo.adapters.ADAPTERS.get("hydra").from_config(**kwargs)

