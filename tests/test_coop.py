"""CoOp's PromptLearner options (KaiyangZhou/CoOp trainers/coop.py): class-specific context (CSC),
class-token position end | middle | front, ctx_init; layouts against CoOp's own concatenations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.clip_helpers import IMG, tiny_clip
from zoo.adapters.coop import layout_index
from zoo.zeroshot import CLIPClassifier

NAMES = ["red circle", "blue star", "green square"]
D = 32  # tiny_clip's text width


def coop_model(**cfg):
    torch.manual_seed(0)
    bb = tiny_clip()
    model = CLIPClassifier(bb, NAMES, head="text")
    zoo.apply_adapter(model, "coop", **cfg)
    return model, bb, bb.adapters[0]


def coop_reference(bb, coop, names):
    """CoOp's PromptLearner.forward, transcribed: prefix (SOS) / ctx / class tokens / suffix concatenated
    per class, name lengths from the tokenizer's encode()."""
    emb = bb.model.token_embedding.base
    tokens = bb.tokenize([f"{coop.prefix} {n}." for n in names])
    e = emb(tokens)
    prefix, suffix = e[:, :1], e[:, 1 + coop.n_ctx:]
    ctx = coop.embedding.ctx
    ctx = ctx if ctx.dim() == 3 else ctx.unsqueeze(0).expand(len(names), -1, -1)
    out = []
    for i, n in enumerate(names):
        nl = len(bb.tokenizer.encode(n))
        cls_i, suf_i, h = suffix[i:i + 1, :nl], suffix[i:i + 1, nl:], coop.n_ctx // 2
        parts = {"end": [prefix[i:i + 1], ctx[i:i + 1], suffix[i:i + 1]],
                 "middle": [prefix[i:i + 1], ctx[i:i + 1, :h], cls_i, ctx[i:i + 1, h:], suf_i],
                 "front": [prefix[i:i + 1], cls_i, ctx[i:i + 1], suf_i]}[coop.position]
        out.append(torch.cat(parts, dim=1))
    return tokens, torch.cat(out)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
def test_token_layout_equals_coops_concatenation(position, csc):
    model, bb, coop = coop_model(n_ctx=4, class_token_position=position, class_specific=csc)
    with torch.no_grad():
        coop.embedding.ctx.normal_()  # distinct values everywhere: a misplaced vector shows
        prompts = [p[0] for p in coop.class_prompts(NAMES)]
        tokens, ref = coop_reference(bb, coop, NAMES)
        assert bb.tokenize(prompts).equal(tokens)
        torch.testing.assert_close(bb.model.token_embedding(tokens), ref, atol=0, rtol=0)


@pytest.mark.parametrize("csc,n_ctx", [(False, 4), (True, 4), (False, 7), (True, 2)])
def test_parameter_count_follows_the_formula(csc, n_ctx):
    model, bb, coop = coop_model(n_ctx=n_ctx, class_specific=csc)
    expected = (len(NAMES) if csc else 1) * n_ctx * D  # C·M·d (CSC) or M·d
    assert tuple(coop.embedding.ctx.shape) == ((len(NAMES), n_ctx, D) if csc else (n_ctx, D))
    assert zoo.count_parameters(model)[0] == expected
    assert coop.config["classnames"] == (NAMES if csc else None)


def hand_written(bb, texts):
    return bb.encode_text(bb.tokenize(texts))


@pytest.mark.parametrize("position,texts", [
    ("end", ["a photo of a red circle.", "a photo of a blue star.", "a photo of a green square."]),
    ("middle", ["a photo red circle of a.", "a photo blue star of a.", "a photo green square of a."]),
    ("front", ["red circle a photo of a.", "blue star a photo of a.", "green square a photo of a."]),
])
def test_known_init_gives_the_hand_written_prompt(position, texts):
    """V set to the embeddings of 'a photo of a' (placeholder prompts 'X X X X {class}.'): the text
    features equal those of the hand-written sentence with the class at that position."""
    model, bb, coop = coop_model(n_ctx=4, class_token_position=position)
    words = bb.tokenize(["a photo of a"])[0, 1:5]
    with torch.no_grad():
        coop.embedding.ctx.copy_(bb.model.token_embedding.base.weight[words])
        ours = model.head.class_weights()
        ref = F.normalize(hand_written(bb, texts), dim=-1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_class_specific_contexts_are_per_class_and_unknown_classes_use_the_template():
    model, bb, coop = coop_model(n_ctx=4, class_specific=True)
    ctxs = ["a photo of a", "a bad photo of", "art of the small"]
    with torch.no_grad():
        for i, c in enumerate(ctxs):
            words = bb.tokenize([c])[0, 1:5]
            coop.embedding.ctx[i].copy_(bb.model.token_embedding.base.weight[words])
        ours = model.head.class_weights()
        ref = F.normalize(hand_written(bb, [f"{c} {n}." for c, n in zip(ctxs, NAMES)]), dim=-1)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        # a class with no learned context (held-out, new classes): the hand-written template, untuned
        assert coop.class_prompts(["purple star"], ["a photo of a {}."]) == [["a photo of a purple star."]]
        mixed = coop.class_prompts(["blue star", "purple star"], ["a photo of a {}.", "a {}."])
        assert mixed == [["X X X X blue star."] * 2, ["a photo of a purple star.", "a purple star."]]
        with pytest.raises(ValueError, match="no context for"):
            coop.class_prompts(["purple star"])
    x, y = torch.randn(4, 3, IMG, IMG), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(model(x), y).backward()
    grad = coop.embedding.ctx.grad
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0 and grad[2].abs().sum() > 0


def test_unregistered_text_passes_through_unchanged():
    model, bb, coop = coop_model(n_ctx=4, class_token_position="middle")
    with torch.no_grad():
        t = bb.tokenize(["X X X X red circle.", "a photo of a dog."])  # never produced by class_prompts
        torch.testing.assert_close(bb.model.token_embedding(t), bb.model.token_embedding.base(t), atol=0, rtol=0)


def test_ctx_init_sets_the_context_from_words_and_bad_options_are_one_line():
    model, bb, coop = coop_model(ctx_init="a_photo of a")
    assert coop.n_ctx == 4 and coop.prefix == "a photo of a"
    words = bb.tokenize(["a photo of a"])[0, 1:5]
    torch.testing.assert_close(coop.embedding.ctx.detach(), bb.model.token_embedding.base.weight[words])
    with torch.no_grad():  # at init the prompt is the hand-written one
        torch.testing.assert_close(model.head.class_weights(),
                                   F.normalize(hand_written(bb, [f"a photo of a {n}." for n in NAMES]), dim=-1))
    with pytest.raises(ValueError, match="class_token_position='back'; valid: end, middle, front"):
        zoo.apply_adapter(CLIPClassifier(tiny_clip(), NAMES, head="text"), "coop", class_token_position="back")
    with pytest.raises(ValueError, match="ctx_init with class_specific=true"):
        zoo.apply_adapter(CLIPClassifier(tiny_clip(), NAMES, head="text"), "coop", ctx_init="a photo", class_specific=True)
    with pytest.raises(ValueError, match="class_specific=true needs the class names"):
        zoo.apply_adapter(tiny_clip(), "coop", n_ctx=4, class_specific=True)


def test_layout_index_is_a_permutation():
    for pos in ("end", "middle", "front"):
        idx = layout_index(pos, 5, 3, 16)
        assert len(idx) == 16 and sorted(idx) == sorted([0] + list(range(16, 21)) + list(range(6, 16)))
