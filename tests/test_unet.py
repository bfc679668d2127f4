"""The smp U-Net restoration backbone: residual forward, sites, frozen BatchNorm, every adapter."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from tests.helpers import assert_refuses, refuses
from zoo.adapters.lora import LoRAConv2d


@pytest.fixture(scope="module")
def make():
    def build(seed=0):
        torch.manual_seed(seed)
        return zoo.create_backbone("unet", encoder="resnet18", encoder_depth=3)
    return build


def test_forward_is_residual_and_keeps_odd_sizes(make):
    bb = make()
    x = torch.rand(2, 3, 21, 19)
    assert bb(x).shape == x.shape
    with torch.no_grad():  # a zero output conv: the residual U-Net is the identity
        head = bb.model.segmentation_head[0]
        head.weight.zero_()
        head.bias.zero_()
    torch.testing.assert_close(bb.eval()(x), x)
    assert bb.depth == 7  # layer1.{0,1}, layer2.{0,1} (depth 3 uses them) + 3 decoder blocks
    assert zoo.find_sites(bb, "conv2", layers=[-1])[0].path == "model.decoder.blocks.2.conv2.0"
    with pytest.raises(zoo.SiteError, match="has no site 'q'; its sites are: conv1, conv2"):
        zoo.find_sites(bb, "q")


def test_frozen_batchnorm_keeps_its_statistics(make):
    bb = make()
    zoo.apply_adapter(bb, "lora", rank=2, targets=["conv1", "conv2"])
    bb.train()
    bn = bb.model.encoder.bn1
    before = bn.running_mean.clone()
    bb(torch.rand(2, 3, 16, 16) * 5)
    assert not bn.training and torch.equal(bn.running_mean, before)
    full = make()
    zoo.apply_adapter(full, "full")
    full.train()
    full(torch.rand(2, 3, 16, 16) * 5)
    assert full.model.encoder.bn1.training and not torch.equal(full.model.encoder.bn1.running_mean, before)


def test_lora_merges_exactly(make):
    bb = make().eval()
    x = torch.rand(1, 3, 16, 16)
    zoo.apply_adapter(bb, "lora", rank=2, targets=["conv1", "conv2"])
    with torch.no_grad():
        for m in bb.modules():
            if isinstance(m, LoRAConv2d):
                m.lora_B.normal_(0, 0.05)
        adapted = bb(x)
    zoo.merge_adapters(bb, unload=True)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), adapted, rtol=1e-4, atol=1e-5)


def test_every_registered_adapter_works_or_refuses(make):
    works = {"full": {}, "bitfit": {}, "linear": {}, "lora": dict(rank=2, targets=["conv1", "conv2"]),
             "colora": dict(targets=["conv1", "conv2"], finetune_steps=1, faig_steps=1, faig_batches=1),
             "galore": dict(rank=2, targets=["conv1", "conv2"])}  # GaLore: the dense kernels as C_out × C_in·k·k
    x = torch.rand(2, 3, 16, 16)
    for name in zoo.list_adapters():
        bb = make()
        if refuses(name, "unet"):
            assert_refuses(bb, name)
            continue
        if name not in works:
            with pytest.raises(zoo.SiteError, match="has no site"):
                zoo.apply_adapter(bb, name)
            continue
        zoo.apply_adapter(bb, name, **works[name])
        zoo.prepare_adapters(bb, [(x, x)])
        trainable = [p for p in bb.parameters() if p.requires_grad]
        assert bool(trainable) == (name != "linear"), name
        if trainable:
            F.l1_loss(bb.train()(x), x).backward()
            assert all(p.grad is not None for p in trainable), name
