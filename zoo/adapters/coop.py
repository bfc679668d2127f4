"""CoOp: Context Optimization (Zhou, Yang, Loy, Liu, "Learning to Prompt for Vision-Language Models",
IJCV 2022; code ``KaiyangZhou/CoOp`` ``trainers/coop.py``).

The hand-written prompt "a photo of a {class}." is replaced by ``M`` learnable context vectors
shared by all classes (the paper's unified context, ``CSC=False``)::

    t_c = [SOS] [V]_1 … [V]_M [CLASS_c] . [EOS]        (class token at the end, ``CLASS_TOKEN_POSITION=end``)

Each prompt is tokenised as ``"X X … X {class}."`` and the token embeddings at positions 1..M are
replaced by ``V`` before the positional embedding is added, exactly as CoOp's ``PromptLearner``
concatenates ``prefix``, ``ctx`` and ``suffix``. ``V`` is initialised ``N(0, 0.02²)`` (CoOp's generic
context, ``CTX_INIT=""``); defaults ``M=16`` (the paper's main setting). Everything else is frozen.

The context only trains when the class text features are computed through the text tower at each
step (``head=text`` in :class:`zoo.zeroshot.CLIPClassifier`); the zero-shot helpers use
:meth:`CoOp.class_prompts` for every prompt, so evaluation uses the learned context. Not built: the
class-specific context (``CSC=True``) and the ``middle``/``front`` class positions.
"""
from __future__ import annotations

import torch
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, WrappedLayer
from zoo.sites import SiteError


class ContextEmbedding(WrappedLayer):
    """The text token embedding with positions ``1..M`` replaced by the learned context."""

    def __init__(self, base: nn.Embedding, n_ctx: int, init_std: float):
        super().__init__(base)
        emb = self.base
        while isinstance(emb, WrappedLayer):
            emb = emb.base
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(torch.empty(n_ctx, emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype))
        nn.init.normal_(self.ctx, std=init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.base(tokens)
        ctx = self.ctx.unsqueeze(0).expand(e.shape[0], -1, -1)
        return torch.cat([e[:, :1], ctx, e[:, 1 + self.n_ctx:]], dim=1)


@register_adapter("coop")
class CoOp(Adapter):
    """Learnable prompt context on CLIP's text tower (unified context, class token at the end)."""

    paper = "Zhou et al., CoOp, IJCV 2022"

    def __init__(self, n_ctx: int = 16, class_token_position: str = "end", init_std: float = 0.02):
        super().__init__()
        if int(n_ctx) < 1:
            raise ValueError(f"CoOp needs n_ctx >= 1 context vectors (got {n_ctx})")
        if class_token_position != "end":
            raise ValueError(f"class_token_position={class_token_position!r}: only 'end' is built (CoOp's default)")
        self.n_ctx, self.init_std = int(n_ctx), float(init_std)

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
        tok = backbone.tokenize(" ".join(["X"] * self.n_ctx))[0]
        if int((tok != 0).sum()) != self.n_ctx + 2:  # SOS + M placeholders + EOS
            raise ValueError("the tokenizer does not map 'X' to one token; CoOp's placeholder prompt breaks")
        self.replace(site, ContextEmbedding(site.module, self.n_ctx, self.init_std))

    def class_prompts(self, classnames: list[str]) -> list[str]:
        """CoOp's prompt text per class: ``"X X … X {class}."`` (the X's are replaced by the context)."""
        prefix = " ".join(["X"] * self.n_ctx)
        return [f"{prefix} {c}." for c in classnames]
