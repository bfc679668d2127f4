"""zoo.MultiAdapter: several adapters on one frozen backbone, one mixed batch.

Each sample's output must equal its adapter's own model, on every backbone, with low-rank methods
batched (one shared pass) and the others grouped, heads with different class counts in one batch.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import zoo
from tests.clip_helpers import IMG as CLIP_IMG, tiny_clip
from tests.conftest import tiny_vit
from tests.seg_helpers import IMG as SAM_IMG, tiny_sam_backbone
from zoo.multi_adapter import BatchedConv2d, BatchedLinear

ATOL, RTOL = 2e-5, 1e-4


def perturb(model: nn.Module, std: float = 0.1) -> nn.Module:
    """Every trainable tensor moved off its init (B = 0 at init would make every adapter the identity)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)
    return model.eval()


def adapted(base, head=None, methods=(), seed=0):
    """A standalone model on an independent copy of ``base``'s weights: ``head(backbone)`` + methods."""
    torch.manual_seed(seed)
    bb = copy.deepcopy(base)
    model = head(bb) if head else bb
    for name, cfg in methods:
        zoo.apply_adapter(model, name, **cfg)
    return perturb(model)


def check(base, models: dict, x, names, tmp_path=None, save=(), tasks=None):
    """Serve ``models`` (``save``: these through artifact folders); every sample equals its own model
    and differs from the other adapters' outputs of the same shape (so a mis-routed sample fails)."""
    specs = {n: zoo.save_adapter(m, tmp_path / n) if n in save else m for n, m in models.items()}
    ma = zoo.MultiAdapter(base, specs, tasks=tasks)
    with torch.no_grad():
        outs = ma.outputs(x, names)
        refs = {n: m(x) for n, m in models.items()}
    for i, n in enumerate(names):
        torch.testing.assert_close(outs[i], refs[n][i], atol=ATOL, rtol=RTOL, msg=lambda m: f"sample {i} ({n}): {m}")
        for other, r in refs.items():
            if other != n and r[i].shape == outs[i].shape:
                assert (r[i] - outs[i]).abs().max() > 1e-3, f"sample {i} ({n}) equals adapter {other!r}'s output"
    return ma, outs


def batched_layers(ma):
    return [m for m in ma.shared.modules() if isinstance(m, (BatchedLinear, BatchedConv2d))]


# ---------------------------------------------------------------------------- every backbone


def test_vit_mixed_methods_and_heads(tmp_path):
    base = tiny_vit()
    clf = lambda c: (lambda bb: zoo.ImageClassifier(bb, c))
    models = {
        "lora": adapted(base, clf(3), [("lora", dict(rank=4))], 1),
        "lora.r2": adapted(base, clf(7), [("lora", dict(rank=2, targets=["q", "k", "v", "o", "fc1"]))], 2),
        "hydra": adapted(base, clf(5), [("hydra", {})], 3),
        "salt": adapted(base, clf(4), [("salt", dict(rank=2, r_lora=4))], 4),
        "comp_lora": adapted(base, clf(3), [("comp_lora", dict(rank=2, k=2, dropout=0.0))], 5),
        "onebit": adapted(base, clf(3), [("onebit", dict(base="lora", head_bits=1))], 6),  # Bi-Head: head-side module
        "mhr": adapted(base, clf(3), [("mhr", dict(n_splits=2, n_skills=2, n_tasks=3))], 7),
        "lora+hydra": adapted(base, clf(3), [("lora", dict(rank=2)), ("hydra", dict(targets=["fc1"]))], 8),
        "vpt": adapted(base, clf(3), [("vpt", {})], 9),
        "bitfit": adapted(base, clf(2), [("bitfit", {})], 10),
        "ssf": adapted(base, clf(3), [("ssf", {})], 11),
    }
    zoo.set_task(models["mhr"], 2)
    names = ["lora", "hydra", "salt", "vpt", "bitfit", "comp_lora", "onebit", "mhr", "lora.r2", "ssf",
             "lora+hydra", "salt", "lora", "vpt"]
    x = torch.randn(len(names), 3, 32, 32)
    ma, outs = check(base, models, x, names, tmp_path, save=("lora", "hydra", "salt", "onebit", "bitfit"),
                     tasks={"mhr": 2})
    routing = ma.routing()
    assert [n for n, r in routing.items() if r == "batched"] == [
        "lora", "lora.r2", "hydra", "salt", "comp_lora", "onebit", "mhr", "lora+hydra"]
    assert routing["bitfit"] == "grouped: trains base weights"
    assert routing["vpt"].startswith("grouped: vpt: PromptedBlock")
    # forward pads logits of smaller heads with -inf (argmax stays in the sample's own classes)
    with torch.no_grad():
        y = ma(x, names)
    assert y.shape == (len(names), 7)
    for i, o in enumerate(outs):
        torch.testing.assert_close(y[i, :o.shape[0]], o)
        assert torch.isinf(y[i, o.shape[0]:]).all()


def test_one_backbone_pass_for_all_batched_samples_and_shared_weights():
    base = tiny_vit()
    fp = base.fingerprint()
    clf = lambda bb: zoo.ImageClassifier(bb, 3)
    models = {f"a{i}": adapted(base, clf, [("lora", dict(rank=2 + i))], i) for i in range(3)}
    models["bitfit"] = adapted(base, clf, [("bitfit", {})], 9)
    models["full"] = adapted(base, clf, [("full", {})], 10)  # trains (and stores) every base weight
    ma = zoo.MultiAdapter(base, models)
    calls = []
    ma.shared.register_forward_hook(lambda *a: calls.append(1))
    layer = batched_layers(ma)[0]
    layer_calls = []
    layer.register_forward_hook(lambda m, i, o: layer_calls.append(i[0].shape[0]))
    with torch.no_grad():
        ma(torch.randn(6, 3, 32, 32), ["a0", "a1", "a2", "a2", "a0", "bitfit"])
    assert len(calls) == 1 and layer_calls == [5]  # the five batched samples in one pass, each layer once
    # the base weights are stored once: every copy holds the very same tensors, and nothing wrote into them
    shared = {p.data_ptr() for p in base.parameters()}
    assert all(p.data_ptr() in shared for p in ma.shared.parameters())
    bitfit_bb = zoo.find_backbone(ma.entries["bitfit"].model)
    own = [n for n, p in bitfit_bb.named_parameters() if p.data_ptr() not in shared]
    assert own and all(n.endswith("bias") for n in own)  # BitFit's trained biases are its own copies
    base.reset_fingerprint()
    assert base.fingerprint() == fp
    with torch.no_grad():  # and the full fine-tune still serves its own weights
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(ma(x, ["full", "a1"])[0], models["full"](x)[0], atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_clip_visual_heads_and_text_tower_adapter():
    from tests.test_clip_heads import NAMES, TEMPLATES
    from zoo.zeroshot import CLIPClassifier

    base = tiny_clip()
    models = {
        "linear": adapted(base, lambda bb: zoo.ImageClassifier(bb, 4), [("lora", dict(rank=2))], 1),
        "salt": adapted(base, lambda bb: zoo.ImageClassifier(bb, 5), [("salt", dict(rank=2, r_lora=4))], 2),
        # text-tower LoRA: the head re-encodes the class prompts (encode_text runs with this adapter)
        "text": adapted(base, lambda bb: CLIPClassifier(bb, NAMES, TEMPLATES, head="text"),
                        [("lora", dict(rank=2, tower="both"))], 3),
        "coop": adapted(base, lambda bb: CLIPClassifier(bb, NAMES, TEMPLATES, head="text"), [("coop", dict(n_ctx=2))], 4),
    }
    names = ["linear", "text", "salt", "coop", "text", "linear"]
    ma, _ = check(base, models, torch.randn(len(names), 3, CLIP_IMG, CLIP_IMG), names)
    assert ma.routing()["text"] == "batched" and ma.routing()["coop"].startswith("grouped")


def test_ast_mixed(tmp_path):
    from tests.test_ast import tiny_ast

    base = tiny_ast()
    clf = lambda c: (lambda bb: zoo.ImageClassifier(bb, c))
    mlp_head = lambda c: (lambda bb: zoo.LayerNormLinearClassifier(bb, c))  # AST's own head: LayerNorm, then Linear
    models = {"lora": adapted(base, clf(3), [("lora", dict(rank=2))], 1),
              "hydra": adapted(base, clf(6), [("hydra", {})], 2),
              "prefix": adapted(base, clf(3), [("prefix", {})], 3),
              "ast_head": adapted(base, mlp_head(4), [("lora", dict(rank=2))], 4)}
    names = ["lora", "ast_head", "prefix", "hydra", "ast_head", "lora"]
    ma, _ = check(base, models, torch.randn(len(names), 100, 128), names, tmp_path, save=("hydra", "ast_head"))
    assert ma.routing()["prefix"].startswith("grouped") and ma.routing()["ast_head"] == "batched"
    assert type(ma.entries["ast_head"].view) is zoo.LayerNormLinearClassifier  # rebuilt from its adapter.json


def test_sam_encoder_windowed_attention_and_segmenter_heads():
    """SAM's windowed blocks fold windows into the batch (rows = B·windows): ids repeat per window."""
    base = tiny_sam_backbone()
    models = {"lora": adapted(base, None, [("lora", dict(rank=2))], 1),
              "salt": adapted(base, None, [("salt", dict(rank=2, r_lora=4))], 2),
              "hydra": adapted(base, None, [("hydra", {})], 3),
              "adapter": adapted(base, None, [("adapter", {})], 4)}
    names = ["lora", "salt", "adapter", "hydra", "lora"]
    ma, _ = check(base, models, torch.randn(len(names), 3, SAM_IMG, SAM_IMG), names)
    assert ma.routing()["adapter"].startswith("grouped")


@pytest.mark.slow
def test_sam_segmenters_with_decoder_tower_adapters():
    base = tiny_sam_backbone()
    seg = lambda c: (lambda bb: _segmenter(bb, c))
    models = {"two": adapted(base, seg(2), [("lora", dict(rank=2)), ("lora", dict(rank=2, tower="decoder"))], 1),
              "three": adapted(base, seg(3), [("hydra", {})], 2)}
    names = ["two", "three", "two"]
    check(base, models, torch.randn(len(names), 3, SAM_IMG, SAM_IMG), names)


def _segmenter(bb, classes):
    from tests.seg_helpers import DECODER
    from zoo.backbones.sam_decoder import SamSegmenter

    return SamSegmenter(bb, classes, decoder=dict(DECODER))


def test_morph_axial_attention(tmp_path):
    from tests.test_morph import tiny_morph

    base = tiny_morph().eval()
    t = ["q", "k", "v", "o", "fc1", "fc2"]
    models = {"lora": adapted(base, None, [("lora", dict(rank=2, targets=t))], 1),
              "hydra": adapted(base, None, [("hydra", dict(targets=["o", "fc2"]))], 2),
              "level1": adapted(base, None, [("morph_ft", dict(level=1))], 3)}
    names = ["lora", "level1", "hydra", "lora"]
    ma, _ = check(base, models, torch.randn(len(names), 2, 1, 1, 1, 8, 16), names, tmp_path, save=("lora",))
    assert ma.routing()["level1"] == "grouped: trains base weights"


def test_nafnet_conv_lora_dense_and_depthwise():
    from tests.test_nafnet import CONV_TARGETS, randomize_blocks, tiny

    base = tiny()
    randomize_blocks(base)
    base.eval()
    models = {"all": adapted(base, None, [("lora", dict(rank=2, targets=CONV_TARGETS))], 1),  # incl. depthwise
              "pw": adapted(base, None, [("lora", dict(rank=3, targets=["conv_pw", "fc2"]))], 2),
              "bitfit": adapted(base, None, [("bitfit", {})], 3)}  # the only other method a CNN takes
    names = ["all", "bitfit", "pw", "all"]
    ma, _ = check(base, models, torch.randn(len(names), 3, 16, 16), names)
    assert ma.routing()["bitfit"].startswith("grouped") and ma.routing()["all"] == "batched"
    assert any(isinstance(m, BatchedConv2d) and m.dW is not None for m in batched_layers(ma))


# ---------------------------------------------------------------------------- artifacts and refusals


def test_from_artifacts_and_predict_batch(tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit().model.state_dict().items()}, str(weights))
    base = tiny_vit(weights=str(weights), pretrained=None)
    folders = {}
    for i, c in enumerate((3, 5)):
        m = adapted(base, lambda bb, c=c: zoo.ImageClassifier(bb, c), [("lora", dict(rank=2))], i)
        folders[f"task{i}"] = (zoo.save_adapter(m, tmp_path / f"task{i}"), m)
    with pytest.raises(zoo.hub.EntryNotFoundError, match="pass weights="):  # a local base file is not in the zoo
        zoo.MultiAdapter.from_artifacts([f for f, _ in folders.values()])
    with pytest.raises(ValueError, match="under one name"):
        zoo.MultiAdapter.from_artifacts([folders["task0"][0]] * 2, weights=weights)
    ma = zoo.MultiAdapter.from_artifacts([f for f, _ in folders.values()], weights=weights)
    assert ma.names() == ["task0", "task1"]
    x = torch.randn(5, 3, 32, 32)
    names = ["task1", "task0", "task0", "task1", "task1"]
    preds = ma.predict_batch(x, names, batch_size=2)
    with torch.no_grad():
        for i, n in enumerate(names):
            torch.testing.assert_close(preds[i], folders[n][1](x[i:i + 1])[0], atol=ATOL, rtol=RTOL)


def test_refuses_other_base_weights_in_one_line(tmp_path):
    base = tiny_vit()
    torch.manual_seed(123)
    other = tiny_vit()  # same architecture, other weights
    good = adapted(base, None, [("lora", {})], 1)
    bad = zoo.save_adapter(adapted(other, None, [("lora", {})], 2), tmp_path / "bad")
    with pytest.raises(zoo.AdapterMismatchError, match="'bad' was trained on other base weights") as e:
        zoo.MultiAdapter(base, {"good": good, "bad": bad})
    assert "\n" not in str(e.value)
    with pytest.raises(zoo.AdapterMismatchError, match="'good' was trained on other base weights"):
        zoo.MultiAdapter(other, {"good": good, "bad": bad})  # the other way round: 'good' is refused
    # nothing was written into either backbone, and they carry no adapter
    assert not base.adapters and not other.adapters


def test_bad_inputs_are_one_clear_line():
    base = tiny_vit()
    m = adapted(base, None, [("lora", {})], 1)
    ma = zoo.MultiAdapter(base, {"a": m})
    with pytest.raises(zoo.UnknownNameError, match=r"unknown adapter\(s\) \['b'\]; this MultiAdapter serves: a"):
        ma(torch.randn(2, 3, 32, 32), ["a", "b"])
    with pytest.raises(ValueError, match="2 samples but 1 adapter names"):
        ma(torch.randn(2, 3, 32, 32), ["a"])
    with pytest.raises(RuntimeError, match="for inference"):
        ma.train()
    with pytest.raises(ValueError, match="has adapters"):
        zoo.MultiAdapter(m, {"a": m})
    # logits of different class counts are padded; a classifier's logits and a backbone's features are not
    clf = adapted(base, lambda bb: zoo.ImageClassifier(bb, 3), [("lora", {})], 3)
    mixed = zoo.MultiAdapter(base, {"a": m, "clf": clf})
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"different shapes \[\(3,\), \(64,\)\]; use .outputs"):
        mixed(x, ["a", "clf"])
    assert [tuple(o.shape) for o in mixed.outputs(x, ["a", "clf"])] == [(64,), (3,)]
    multi = adapted(base, None, [("mhr", dict(n_splits=2, n_skills=2, n_tasks=3))], 2)
    with pytest.raises(ValueError, match=r"MHR adapter over 3 tasks: give its task id"):
        zoo.MultiAdapter(base, {"m": multi})


def test_a_registered_low_rank_form_is_batched(monkeypatch):
    """A new method's wrapper joins the shared pass once it registers its form (before: grouped), and
    registering it keeps the built-in forms."""
    from zoo.adapters.lora import LoRA, LoRALinear
    from zoo.multi_adapter import LOW_RANK_FORMS, LinearTerms, register_low_rank

    class ScaledLoRALinear(LoRALinear):  # a 'new method': LoRA with its delta doubled
        def forward(self, x):
            return self.base(x) + 2 * self.scaling * (x @ self.effective_A().t()) @ self.stacked_B_t()

    monkeypatch.setattr(zoo.ADAPTERS, "_entries", dict(zoo.ADAPTERS._entries))  # registrations end with the test
    monkeypatch.setattr("zoo.multi_adapter.LOW_RANK_FORMS", dict(LOW_RANK_FORMS))

    @zoo.register_adapter("scaled_lora")
    class ScaledLoRA(LoRA):
        def attach(self, backbone):
            super().attach(backbone)
            for m in self.modules:
                m.__class__ = ScaledLoRALinear

    base = tiny_vit()
    models = {"new": adapted(base, None, [("scaled_lora", dict(rank=2))], 1),
              "lora": adapted(base, None, [("lora", dict(rank=2))], 2)}
    assert zoo.MultiAdapter(base, models).routing()["new"] == "grouped: scaled_lora: ScaledLoRALinear has no batched low-rank form"
    register_low_rank(ScaledLoRALinear)(lambda m, task: LinearTerms(A=m.effective_A(), Bt=2 * m.scaling * m.stacked_B_t()))
    ma, _ = check(base, models, torch.randn(3, 3, 32, 32), ["new", "lora", "new"])
    assert ma.routing() == {"new": "batched", "lora": "batched"}
