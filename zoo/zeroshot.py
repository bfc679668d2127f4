"""Zero-shot classifiers from class names × prompt templates, and the CLIP heads built on them.

CLIP (Radford et al., ICML 2021) classifies an image by cosine similarity with the text
embeddings of its class prompts. For class ``c`` and templates ``t_1..t_T`` (e.g. "a photo of a {}.")::

    w_c = normalize( (1/T) Σ_j normalize(f_text(t_j(c))) )          (the ensemble: open_clip / CoOp)
    logits_c(x) = s · ⟨normalize(f_img(x)), w_c⟩,   s = exp(logit_scale) (learned) or a fixed 100 (CLIP-LoRA)

:func:`zeroshot_weights` builds ``W = [w_1..w_C]`` with open_clip's ``build_zero_shot_classifier``
(``_`` in class names becomes a space first, as CoOp and CLIP-LoRA do) and caches it on disk per
(model, weights tag, dataset) -- the key also hashes the weights' fingerprint, class names and
templates, so a different random init or prompt set never reuses a stale file.

Heads (:class:`CLIPClassifier` ``head=``):

* ``zeroshot``: ``W`` frozen (a buffer), cosine logits × scale -- the untuned CLIP classifier;
* ``linear``: a Linear layer on the normalised image feature initialised to ``W`` (bias 0), so
  its logits equal zero-shot at init and then train (the "LP initialised from text" baseline);
* ``text``: the text tower stays in the graph -- class features are recomputed from the prompts
  at every forward, so text-side adapters (LoRA / Comp-LoRA on ``tower=text|both``, CoOp) train,
  as CLIP-LoRA does ("text features recomputed at every step").

Adapters that own the prompt (CoOp) expose ``class_prompts(classnames, templates)`` (``[class][prompt]``,
the same number of prompts per class); every prompt built here
goes through :func:`class_prompts`, so zero-shot evaluation with such an adapter uses its prompts.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("zeroshot", "linear", "text")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def clean_prompt_name(name: str) -> str:
    """Prompt-time cleaning every CoOp-family method applies: ``_`` → space."""
    return name.replace("_", " ")


def class_prompts(backbone, classnames: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """The prompts of each class (``[class][template]``), or an attached adapter's own (CoOp)."""
    names = [clean_prompt_name(c) for c in classnames]
    for a in getattr(backbone, "adapters", []):
        if hasattr(a, "class_prompts"):
            return a.class_prompts(names, list(templates or []))
    if not templates:
        raise ValueError("zero-shot prompts need at least one template (e.g. 'a photo of a {}.')")
    return [[t.format(c) for t in templates] for c in names]


def _check(backbone, classnames) -> None:
    if not classnames:
        raise ValueError("zero-shot classification needs the class names (got none); give the dataset's class names")
    if not hasattr(backbone, "encode_text"):
        raise ValueError(f"backbone {getattr(backbone, 'family', type(backbone).__name__)!r} has no text tower; "
                         "zero-shot heads need backbone=clip")
    backbone.require_text("a zero-shot classifier")


def zeroshot_weights(backbone, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                     dataset: str | None = None, cache_dir: str | os.PathLike | None = None,
                     batch_classes: int = 10) -> torch.Tensor:
    """``W`` (C × D, rows L2-normalised): templates averaged per class, via open_clip's builder.

    With ``cache_dir`` (and no adapter attached) the result is read from / written to
    ``cache_dir/<model>--<tag>--<dataset>--<hash>.safetensors``.
    """
    import open_clip

    _check(backbone, classnames)
    prompts = class_prompts(backbone, classnames, templates)
    cache = None
    if cache_dir is not None and not backbone.adapters:
        key = hashlib.sha256(json.dumps([backbone.fingerprint(), prompts]).encode()).hexdigest()[:16]
        tag = str(backbone.weights_tag or "random").replace("/", "_").replace(":", "_")
        cache = Path(cache_dir) / f"{backbone.model_name}--{tag}--{dataset or 'custom'}--{key}.safetensors"
        if cache.is_file():
            from safetensors.torch import load_file

            return load_file(str(cache))["weights"]
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    # one "template" per prompt position: the builder formats each template with the class name,
    # so pass the already-built prompts as callables indexed by class
    index = {c: i for i, c in enumerate(classnames)}
    n_t = len(prompts[0])
    tmpl = [(lambda c, j=j: prompts[index[c]][j]) for j in range(n_t)]
    w = open_clip.build_zero_shot_classifier(backbone, backbone.tokenizer, list(classnames), tmpl,
                                             num_classes_per_batch=batch_classes, device=device).t().contiguous()
    backbone.train(was_training)
    if cache is not None:
        from safetensors.torch import save_file

        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_file({"weights": w.detach().cpu()}, str(tmp))
        os.replace(tmp, cache)
    return w


def cosine_logits(image_features: torch.Tensor, class_weights: torch.Tensor, scale) -> torch.Tensor:
    return scale * F.normalize(image_features, dim=-1) @ class_weights.t()


class _ScaleMixin:
    """``logit_scale=None``: CLIP's learned temperature exp(logit_scale) (frozen); a number: fixed."""

    def scale(self) -> torch.Tensor | float:
        if self.fixed_scale is not None:
            return self.fixed_scale
        return self.__dict__["backbone"].logit_scale.detach()


class ZeroShotHead(_ScaleMixin, nn.Module):
    def __init__(self, backbone, weights: torch.Tensor, logit_scale: float | None = None):
        super().__init__()
        self.__dict__["backbone"] = backbone  # a reference, not a submodule
        self.register_buffer("weights", weights.detach().clone(), persistent=False)
        self.fixed_scale = logit_scale

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return cosine_logits(f, self.weights, self.scale())


class LinearFromTextHead(_ScaleMixin, nn.Module):
    """``s · (W' f̂ + b)`` with ``W'`` initialised to the zero-shot ``W`` and ``b = 0`` (trains)."""

    def __init__(self, backbone, weights: torch.Tensor, logit_scale: float | None = None):
        super().__init__()
        self.__dict__["backbone"] = backbone
        self.fc = nn.Linear(weights.shape[1], weights.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weights)
            self.fc.bias.zero_()
        self.fixed_scale = logit_scale

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.scale() * self.fc(F.normalize(f, dim=-1))


class TextHead(_ScaleMixin, nn.Module):
    """Class features recomputed through the (adapted) text tower at every forward."""

    def __init__(self, backbone, classnames: Sequence[str], templates: Sequence[str], logit_scale: float | None = None):
        super().__init__()
        _check(backbone, classnames)
        self.__dict__["backbone"] = backbone
        self.classnames, self.templates = list(classnames), list(templates)
        self.fixed_scale = logit_scale
        self.__dict__["_tokens"] = (None, None)

    def tokens(self) -> torch.Tensor:
        bb = self.__dict__["backbone"]
        key = tuple(id(a) for a in bb.adapters)
        if self.__dict__["_tokens"][0] != key:  # prompts change when a prompt-owning adapter attaches
            prompts = class_prompts(bb, self.classnames, self.templates)
            self.__dict__["_tokens"] = (key, (bb.tokenize([p for ps in prompts for p in ps]), len(prompts[0])))
        return self.__dict__["_tokens"][1]

    def class_weights(self) -> torch.Tensor:
        bb = self.__dict__["backbone"]
        tokens, n_t = self.tokens()
        t = bb.encode_text(tokens.to(next(bb.parameters()).device), normalize=True)
        t = t.view(len(self.classnames), n_t, -1).mean(1)
        return F.normalize(t, dim=-1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return cosine_logits(f, self.class_weights(), self.scale())


from zoo.heads import register_head  # noqa: E402


@register_head("clip")
class CLIPClassifier(nn.Module):
    """A CLIP backbone + a text-derived head (``zeroshot`` | ``linear`` | ``text``), see the module doc.

    ``logit_scale``: ``None`` uses CLIP's learned temperature; CLIP-LoRA fixes it to 100.
    """

    def __init__(self, backbone, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                 head: str = "zeroshot", logit_scale: float | None = None, dataset: str | None = None,
                 cache_dir: str | os.PathLike | None = None):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head={head!r}; valid CLIP heads: {', '.join(HEADS)}")
        _check(backbone, classnames)
        self.backbone = backbone
        self.num_classes, self.head_type = len(classnames), head
        self.classnames, self.templates = list(classnames), list(templates)
        self.logit_scale = None if logit_scale is None else float(logit_scale)
        if head == "text":
            self.head = TextHead(backbone, classnames, templates, self.logit_scale)
        else:
            w = zeroshot_weights(backbone, classnames, templates, dataset=dataset, cache_dir=cache_dir)
            cls = ZeroShotHead if head == "zeroshot" else LinearFromTextHead
            self.head = cls(backbone, w, self.logit_scale)

    def head_spec(self) -> dict:
        return {"type": "clip", "head": self.head_type, "num_classes": self.num_classes,
                "logit_scale": self.logit_scale, "classnames": self.classnames, "templates": self.templates}

    @classmethod
    def from_spec(cls, backbone, spec: dict) -> "CLIPClassifier":
        return cls(backbone, spec["classnames"], spec["templates"], head=spec["head"], logit_scale=spec["logit_scale"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def text_tower_trains(backbone) -> bool:
    """Whether any trainable parameter lives in CLIP's text tower (then only ``head=text`` uses it)."""
    text_prefixes = ("model.transformer.", "model.text.", "model.token_embedding")
    return any(p.requires_grad and n.startswith(text_prefixes) for n, p in backbone.named_parameters())


def check_head(model: CLIPClassifier) -> None:
    """Refuse a setup where the text tower trains but the head never runs it (head=zeroshot|linear)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"nothing trains: adapter(s) {[a.name for a in model.backbone.adapters]} with "
                         f"head={model.head_type} (a frozen head); use head=linear for a linear probe")
    if model.head_type != "text" and text_tower_trains(model.backbone):
        names = [a.name for a in model.backbone.adapters]
        raise ValueError(f"adapter(s) {names} train CLIP's text tower, but head={model.head_type} uses fixed class "
                         "features; use head=text (class features recomputed through the text tower)")
