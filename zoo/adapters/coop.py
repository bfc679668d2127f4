"""CoOp: Context Optimization (Zhou, Yang, Loy, Liu, "Learning to Prompt for Vision-Language Models",
IJCV 2022; code ``KaiyangZhou/CoOp`` ``trainers/coop.py``, ``PromptLearner``).

The hand-written prompt "a photo of a {class}." is replaced by ``M`` learnable context vectors
``V = [V]_1 … [V]_M`` (word-embedding sized). CoOp's options, all built:

* ``class_specific`` (CoOp's ``CSC``): ``false`` = one context shared by all classes, ``V ∈ R^{M×d}``
  (the paper's unified context); ``true`` = one context per class, ``V ∈ R^{C×M×d}``. Trainable
  parameters: ``M·d``, or ``C·M·d``.
* ``class_token_position`` (CoOp's ``CLASS_TOKEN_POSITION``), with ``[CLS_c]`` the class name's
  tokens and ``h = ⌊M/2⌋``::

        end:    [SOS] V_1 … V_M [CLS_c] . [EOS]
        middle: [SOS] V_1 … V_h [CLS_c] V_{h+1} … V_M . [EOS]
        front:  [SOS] [CLS_c] V_1 … V_M . [EOS]

* ``ctx_init`` (CoOp's ``CTX_INIT``): initialise ``V`` from the token embeddings of these words
  (``M`` = their number, e.g. "a photo of a"), otherwise ``V ~ N(0, 0.02²)`` (the generic context).

As in CoOp, each class's prompt is tokenised as ``"<prefix> {class}."`` (prefix = ``M`` X's, or
``ctx_init``), ``[CLS_c]`` spans ``len(tokenizer.encode(class))`` tokens right after the prefix, and
the rows are re-assembled from ``prefix`` (SOS), ``ctx`` and ``suffix`` (class, ".", EOS, padding)
before the positional embedding is added; the end-of-text position does not move, so CLIP's
pooling is unchanged. Here the re-assembly is one ``gather`` over ``[token embeddings ; context]``
per row (index built from the class's name length), identical to CoOp's concatenations (tested).

The context only trains when the class text features go through the text tower at each step
(``head=text`` in :class:`zoo.zeroshot.CLIPClassifier`). Every prompt built by :mod:`zoo.zeroshot`
comes from :meth:`CoOp.class_prompts`, which also registers the prompt's token row with the
embedding: only registered rows receive the context, any other text passes through unchanged.

With ``class_specific=true`` the class list is the one of the model the adapter is attached to
(``CLIPClassifier.classnames``; or the ``classnames`` option, recorded in ``adapter.json``). Classes
outside it (held-out datasets, base-to-new's new classes) have no learned context in CoOp; they are
prompted with the dataset's hand-written templates through the (frozen) text tower, so their
zero-shot accuracy is the untuned model's (a log line says so).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, WrappedLayer
from zoo.sites import SiteError

log = logging.getLogger(__name__)
POSITIONS = ("end", "middle", "front")


def _inner_embedding(module: nn.Module) -> nn.Embedding:
    while isinstance(module, WrappedLayer):
        module = module.base
    return module


def layout_index(position: str, n_ctx: int, name_len: int, length: int) -> list[int]:
    """Where each output position reads from ``[token embeddings (0..L-1) ; context (L..L+M-1)]``.

    The prompt was tokenised as ``[SOS] p_1..p_M c_1..c_n . [EOS] pad…`` (p = placeholder):
    ``end`` keeps that order with ``p → V``; ``middle`` puts the class between the two halves of
    ``V``; ``front`` puts it right after SOS (CoOp's ``PromptLearner.forward``).
    """
    ctx = [length + i for i in range(n_ctx)]
    cls = list(range(1 + n_ctx, 1 + n_ctx + name_len))
    rest = list(range(1 + n_ctx + name_len, length))
    if position == "end":
        return [0] + ctx + cls + rest
    if position == "middle":
        h = n_ctx // 2
        return [0] + ctx[:h] + cls + ctx[h:] + rest
    if position == "front":
        return [0] + cls + ctx + rest
    raise ValueError(f"class_token_position={position!r}; valid: {', '.join(POSITIONS)}")


class ContextEmbedding(WrappedLayer):
    """The text token embedding with CoOp's context spliced into the registered prompt rows.

    ``ctx``: ``(M, d)`` shared, or ``(C, M, d)`` class-specific. :meth:`register` records, per prompt
    token row, its class index and name length; ``forward`` gathers each registered row from
    ``[embeddings ; its context]`` with :func:`layout_index`, unregistered rows are left as they are.
    """

    def __init__(self, base: nn.Embedding, n_ctx: int, position: str, n_cls: int | None = None,
                 init: torch.Tensor | None = None, init_std: float = 0.02):
        super().__init__(base)
        emb = _inner_embedding(self.base)
        self.n_ctx, self.position = n_ctx, position
        shape = (n_ctx, emb.embedding_dim) if n_cls is None else (n_cls, n_ctx, emb.embedding_dim)
        self.ctx = nn.Parameter(torch.empty(shape, device=emb.weight.device, dtype=emb.weight.dtype))
        with torch.no_grad():
            if init is not None:
                self.ctx.copy_(init.expand(shape))
            else:
                nn.init.normal_(self.ctx, std=init_std)
        self._rows: dict[bytes, tuple[int, int]] = {}  # token row -> (class index or -1, name length)
        self._index: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def class_specific(self) -> bool:
        return self.ctx.dim() == 3

    def register(self, tokens: torch.Tensor, classes: Sequence[int], name_lens: Sequence[int]) -> None:
        for key, c, n in zip(_keys(tokens), classes, name_lens):
            self._rows[key] = (int(c), int(n))

    def _layout(self, name_len: int, length: int, device) -> torch.Tensor:
        key = (name_len, length)
        if key not in self._index:
            self._index[key] = torch.tensor(layout_index(self.position, self.n_ctx, name_len, length))
        return self._index[key].to(device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.base(tokens)
        found = [self._rows.get(k) for k in _keys(tokens)]
        rows = [i for i, f in enumerate(found) if f is not None]
        if not rows:
            return e
        b, length, d = e.shape
        if self.class_specific:
            ctx = self.ctx[torch.tensor([found[i][0] for i in rows], device=e.device)]
        else:
            ctx = self.ctx.unsqueeze(0).expand(len(rows), -1, -1)
        sel = torch.tensor(rows, device=e.device)
        both = torch.cat([e[sel], ctx.to(e.dtype)], dim=1)  # (R, L + M, d)
        index = torch.stack([self._layout(found[i][1], length, e.device) for i in rows])
        spliced = both.gather(1, index.unsqueeze(-1).expand(-1, -1, d))
        return e.index_copy(0, sel, spliced)


def _keys(tokens: torch.Tensor) -> list[bytes]:
    """One key per prompt row: its tokens without the trailing padding, so a row registered at the
    full context length is found in the text tower's shortened batch (``encode_text`` cuts padding)."""
    t = tokens.detach().to("cpu", torch.int64).numpy()  # one transfer for the batch
    return [np.trim_zeros(row, "b").tobytes() for row in t]


@register_adapter("coop")
class CoOp(Adapter):
    """Learnable prompt context on CLIP's text tower (CoOp's PromptLearner: shared or class-specific
    context, class token at the end, middle or front)."""

    paper = "Zhou et al., CoOp, IJCV 2022"

    def __init__(self, n_ctx: int = 16, class_token_position: str = "end", class_specific: bool = False,
                 ctx_init: str | None = None, init_std: float = 0.02, classnames: list[str] | None = None):
        super().__init__()
        if class_token_position not in POSITIONS:
            raise ValueError(f"class_token_position={class_token_position!r}; valid: {', '.join(POSITIONS)}")
        if not isinstance(class_specific, bool):
            raise ValueError(f"class_specific must be true or false (got {class_specific!r})")
        if ctx_init:
            if class_specific:  # CoOp's code silently ignores CSC when CTX_INIT is set; say so instead
                raise ValueError("ctx_init with class_specific=true: CoOp initialises only a shared context from "
                                 "words; use one of them")
            n_ctx = len(ctx_init.replace("_", " ").split(" "))
        if int(n_ctx) < 1:
            raise ValueError(f"CoOp needs n_ctx >= 1 context vectors (got {n_ctx})")
        self.n_ctx, self.position, self.class_specific = int(n_ctx), class_token_position, class_specific
        self.ctx_init = ctx_init.replace("_", " ") if ctx_init else None
        self.init_std = float(init_std)
        self.classnames = list(classnames) if classnames else None
        self.embedding: ContextEmbedding | None = None
        self._warned: set[str] = set()

    @property
    def prefix(self) -> str:
        return self.ctx_init or " ".join(["X"] * self.n_ctx)

    def attach(self, backbone) -> None:
        if not hasattr(backbone, "token_embedding_site"):
            raise SiteError(f"CoOp learns the prompt of a CLIP text tower; backbone {backbone.family!r} has none "
                            "(use backbone=clip)")
        if self.tower not in (None, "text"):
            raise SiteError(f"CoOp lives on the text tower only (got tower={self.tower!r})")
        site = backbone.token_embedding_site()
        if 1 + self.n_ctx + 3 > backbone.context_length:
            raise ValueError(f"n_ctx={self.n_ctx} leaves no room for the class name in a "
                             f"{backbone.context_length}-token context")
        tok = backbone.tokenize(self.prefix)[0]
        if int((tok != 0).sum()) != self.n_ctx + 2:  # SOS + M prefix tokens + EOS
            raise ValueError(f"the tokenizer does not map {self.prefix!r} to {self.n_ctx} tokens; CoOp's context "
                             "needs one token per word")
        self._site = site
        if not self.class_specific or self.classnames:
            self._build(len(self.classnames) if self.class_specific else None)

    def attach_model(self, model: nn.Module) -> None:
        if self.embedding is not None:
            return
        names = getattr(model, "classnames", None)
        if not names:
            raise ValueError("class_specific=true needs the class names: attach CoOp to a zoo.zeroshot.CLIPClassifier "
                             "(task=fewshot) or give adapter.classnames=[...]")
        self.classnames = list(names)
        self.config["classnames"] = list(names)  # adapter.json: the class order of the learned contexts
        self._build(len(names))

    def _build(self, n_cls: int | None) -> None:
        init = None
        if self.ctx_init:
            emb = _inner_embedding(self._site.module)
            words = self.backbone.tokenize(self.ctx_init)[0, 1:1 + self.n_ctx].to(emb.weight.device)
            init = emb.weight[words].detach()
        self.embedding = ContextEmbedding(self._site.module, self.n_ctx, self.position, n_cls, init, self.init_std)
        self.replace(self._site, self.embedding)

    def class_prompts(self, classnames: Sequence[str], templates: Sequence[str] = ()) -> list[list[str]]:
        """Per class, CoOp's prompt ``"<prefix> {class}."`` (registered with the embedding, which splices
        the context in); with a class-specific context, classes without one get ``templates``."""
        if self.embedding is None:
            raise RuntimeError("CoOp is not attached")
        index = {c.replace("_", " "): i for i, c in enumerate(self.classnames or [])}
        names = [c.replace("_", " ") for c in classnames]
        known = [not self.class_specific or n in index for n in names]
        if not all(known):
            missing = [n for n, k in zip(names, known) if not k]
            if not templates:
                raise ValueError(f"CoOp's class-specific context has no context for {missing[:3]} and no template "
                                 "was given for them")
            key = ",".join(missing[:3])
            if key not in self._warned:
                self._warned.add(key)
                log.info("CoOp class-specific context: %d class(es) without a learned context (e.g. %r) are prompted "
                         "with the hand-written template(s) (untuned text)", len(missing), missing[0])
        prompts = [f"{self.prefix} {n}." for n in names]
        coop = [(i, n) for i, (n, k) in enumerate(zip(names, known)) if k]
        if coop:
            tok = self.backbone.tokenizer
            rows = self.backbone.tokenize([prompts[i] for i, _ in coop])
            lens = [len(tok.encode(n)) if hasattr(tok, "encode") else _name_len(self.backbone, n) for _, n in coop]
            classes = [index[n] if self.class_specific else -1 for _, n in coop]
            self.embedding.register(rows, classes, lens)
        if all(known):
            return [[p] for p in prompts]
        # one row per template for every class (the builder averages per class; copies of CoOp's prompt average to it)
        return [[prompts[i]] * len(templates) if k else [t.format(n) for t in templates]
                for i, (n, k) in enumerate(zip(names, known))]


def _name_len(backbone, name: str) -> int:
    """Tokens of ``name`` alone (SOS/EOS excluded), for tokenizers without ``encode``."""
    return int((backbone.tokenize(name)[0] != 0).sum()) - 2
