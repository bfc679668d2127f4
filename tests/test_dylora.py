"""DyLoRA: the truncation scaling α/(b+1), frozen mode, the per-step sampler and the parameter count."""
import pytest
import torch
from torch import nn

import zoo
from zoo.adapters.dylora import DyLoRALinear

from .conftest import tiny_vit


def layer(frozen=True, rank=4, alpha=8.0):
    torch.manual_seed(0)
    m = DyLoRALinear(nn.Linear(6, 5).requires_grad_(False), rank, alpha, frozen=frozen)
    with torch.no_grad():
        m.lora_B["all"].normal_()
    return m


@pytest.mark.parametrize("b", range(4))
def test_training_forward_is_the_truncated_delta_scaled_by_alpha_over_b_plus_1(b):
    m = layer()
    m.train()
    m.train_b = b
    x = torch.randn(3, 6)
    A, B = m.lora_A, m.lora_B["all"]
    want = m.base(x) + 8.0 / (b + 1) * x @ A[:b + 1].t() @ B[:, :b + 1].t()
    torch.testing.assert_close(m(x), want)


def test_eval_and_merge_use_eval_rank():
    m = layer()
    m.eval()
    m.eval_rank = 2
    x = torch.randn(3, 6)
    A, B = m.lora_A, m.lora_B["all"]
    want = m.base(x) + 8.0 / 2 * x @ A[:2].t() @ B[:, :2].t()
    torch.testing.assert_close(m(x), want)
    m.train()
    m.train_b = 0  # merge folds the evaluation rank's delta whatever the last sampled b
    m.merge()
    torch.testing.assert_close(m.base(x), want.detach())


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_mode_trains_only_component_b(frozen):
    m = layer(frozen)
    m.train()
    m.train_b = 2
    m(torch.randn(5, 6)).square().sum().backward()
    ga, gb = m.lora_A.grad, m.lora_B["all"].grad
    active = [2] if frozen else [0, 1, 2]
    for i in range(4):
        assert (ga[i].abs().sum() > 0) == (i in active), (i, frozen)
        assert (gb[:, i].abs().sum() > 0) == (i in active), (i, frozen)
    assert m.base.weight.grad is None


def test_sampler_is_a_function_of_the_step_shared_by_every_layer():
    model = zoo.ImageClassifier(tiny_vit(), 3)
    zoo.apply_adapter(model, "dylora", rank=4, seed=3)
    a = zoo.adapters_of(model)[0]
    draws = []
    for step in range(40):
        zoo.on_train_step(model, step)
        assert {m.train_b for m in a.modules} == {a.sampled}
        draws.append(a.sampled)
    assert set(draws) == {0, 1, 2, 3}  # b ~ U{0..r-1}
    again = [a.sample_rank(s) for s in range(40)]
    assert again == draws  # a resumed run (and every DDP rank) draws the same ranks
    other = zoo.apply_adapter(zoo.ImageClassifier(tiny_vit(), 3), "dylora", rank=4, seed=4)
    assert [zoo.adapters_of(other)[0].sample_rank(s) for s in range(40)] != draws


def test_parameter_count_and_set_eval_rank():
    model = zoo.ImageClassifier(tiny_vit(), 3)
    before = zoo.count_parameters(model.backbone)[1]
    zoo.apply_adapter(model, "dylora", rank=4)
    d, blocks = 64, 2
    assert zoo.count_parameters(model.backbone)[0] == blocks * 2 * 4 * (d + d)  # q and v: r(d_in + d_out) each
    assert zoo.count_parameters(model.backbone)[1] == before + blocks * 2 * 4 * 2 * d
    a = zoo.adapters_of(model)[0]
    a.set_eval_rank(2)
    assert all(m.eval_rank == 2 for m in a.modules) and a.config["eval_rank"] == 2
    with pytest.raises(ValueError, match="eval_rank must be an integer in 1..4"):
        a.set_eval_rank(5)
