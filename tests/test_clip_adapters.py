"""Every registered adapter on the CLIP visual tower with head=zeroshot|linear (or a clear refusal),
and the text-tower adapters with head=text."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.helpers import assert_refuses, refuses
from tests.clip_helpers import IMG, tiny_clip
from zoo.zeroshot import CLIPClassifier, check_head

NAMES = ["red circle", "blue star", "green square"]
SMALL = {"adapter": {"bottleneck": 8}, "mosa": {"bottleneck": 8}, "onebit": {"dim": 8}, "salt": {"r_lora": 4},
         "mhr": {"n_skills": 2}, "colora": {"budget": None}, "coop": {"n_ctx": 4}, "miss": {"rank": 8},
         "shira": {"rank": 4}, "s2ft": {"head_ratio": 0.5, "channel_ratio": 0.05}}
REFUSE_VISUAL = {"coop": "train CLIP's text tower, but head=.* uses fixed class features; use head=text"}
TEXT_TOWER = ["lora", "comp_lora", "mask_tuning", "salt", "bitfit", "ssf", "hydra", "adapter", "coop",
              "miss", "shira", "loldu", "s2ft", "compacter"]


def _run(model, x, y):
    model.train()
    logits = model(x)
    ctx = zoo.StepContext(model=model, inputs=x, targets=y, outputs=logits, loss_fn=F.cross_entropy, forward=model)
    loss = F.cross_entropy(logits, y)
    extra = zoo.extra_loss(model, ctx)
    (loss if extra is None else loss + extra).backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0]


def _prepare(model, name, x, y):
    if name == "colora":
        zoo.prepare_adapters(model, [(x, y)])


# CoLoRA's contribution analysis takes ~10 s here: its second head runs with `make test-slow`
CASES = [pytest.param(n, h, marks=pytest.mark.slow) if (n, h) == ("colora", "linear") else (n, h)
         for n in zoo.list_adapters() for h in ("zeroshot", "linear")]


@pytest.mark.parametrize("name,head", CASES)
def test_every_adapter_on_the_visual_tower(name, head):
    torch.manual_seed(0)
    model = CLIPClassifier(tiny_clip(), NAMES, head=head)
    x, y = torch.randn(4, 3, IMG, IMG), torch.tensor([0, 1, 2, 0])
    if refuses(name, "clip"):
        return assert_refuses(model, name, **SMALL.get(name, {}))
    zoo.apply_adapter(model, name, **SMALL.get(name, {}))
    _prepare(model, name, x, y)  # CoLoRA builds its trainable factors here
    if name == "linear" and head == "zeroshot":
        with pytest.raises(ValueError, match="nothing trains: .*'linear'.* use head=linear"):
            check_head(model)
        return
    if name in REFUSE_VISUAL:
        with pytest.raises(ValueError, match=REFUSE_VISUAL[name]):
            check_head(model)
        return
    check_head(model)
    grads = _run(model, x, y)
    assert grads, f"{name}: nothing received a gradient"
    assert all(n.startswith(("backbone.model.visual.", "head.")) for n in grads), grads  # no text-tower weight


@pytest.mark.parametrize("name", TEXT_TOWER)
def test_text_tower_adapters_train_through_the_text_head(name):
    torch.manual_seed(0)
    model = CLIPClassifier(tiny_clip(), NAMES, head="text")
    x, y = torch.randn(4, 3, IMG, IMG), torch.tensor([0, 1, 2, 0])
    cfg = {**SMALL.get(name, {}), **({"patch_embed": False} if name == "mask_tuning" else {})}
    zoo.apply_adapter(model, name, **cfg, **({} if name == "coop" else {"tower": "text"}))
    check_head(model)
    grads = _run(model, x, y)
    assert grads and not any(n.startswith("backbone.model.visual.") for n in grads), f"{name}: gradients {grads}"


@pytest.mark.parametrize("name", ["vpt", "q_adapter"])
def test_token_adapters_refuse_the_text_tower(name):
    with pytest.raises(zoo.SiteError, match="tower 'text' has no site 'tokens'"):
        zoo.apply_adapter(CLIPClassifier(tiny_clip(), NAMES, head="text"), name, tower="text")
