"""Q-Adapter: Chen, Nguyen, Komamizu, Ide, "Visual Query Adapter for Extracting Textually-related
Features in Video Captioning", ACM MM Asia 2025 (arXiv 2510.10022).

**Mostly a reconstruction.** No public code exists. From the abstract [paper]: the vision encoder
stays frozen; learnable *query tokens* and a *gating layer* are inserted into it; about 1.4 % of the
parameters train. Everything else below is this library's reading of that sentence (see
``shared/methods/q_adapter.md``), with the uncertain choices exposed as options.

Per selected block ``l`` of the frozen encoder (``layers``), with tokens ``x ∈ R^{N×d}``::

    Q_l ∈ R^{M×d}                                     learnable queries (num_queries = M)
    [x', q'] = Block_l([x ; Q_l], mask)               queries read every token through the frozen
                                                      MHSA/MLP; tokens do not read the queries
    a   = softmax(LN(x') LN(q')^T / sqrt(d))          parameter-free pooling of the query outputs
    h   = W_up · GELU(W_down · LN(a q') + b_down) + b_up        W_down ∈ R^{r×d}, r = proj_dim
    out = x' + g_l · h                                the gate injects the query summary back
    gate = "tanh":    g_l = tanh(α_l),  α_l ∈ R, α_l = 0 at init (closed, Flamingo-style)
           "channel": g_l = tanh(α_l) ∈ R^d per channel, α_l = 0 at init
           "sigmoid": g_l = σ(w_l · mean(q') + b_l) per sample, with W_up = 0 at init
                      (the "standard sigmoid gate" of an unreliable summary; it cannot be
                      closed by itself, so the projection starts at zero instead)

The query tokens are new at every selected block and dropped after it, so the sequence leaving
each block (and ``forward_features``) has the backbone's usual length. What is reconstructed:
the one-way attention mask (it makes the closed gate an exact identity, the spec's requirement
that training starts at the pretrained function — with plain concatenation the patch tokens
would attend to the queries), the pooling of query outputs into every token (prefix and patch
tokens alike), the low-rank projection, the gate forms, the query init (normal, std 0.02) and
the defaults M = 16, r = 56 on all blocks, chosen to meet the paper's budget: on ViT-B/16 that is
12 · (16·768 + 2·56·768 + 56 + 768 + 1) = 1,189,548 parameters, 1.39 % of the 85.8 M backbone.

The module is task-independent: it changes the encoder's tokens only (classification heads,
captioning bridges etc. read the encoder output as usual). Not mergeable (it adds computation).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, WrappedLayer, int_option
from zoo.sites import SiteError

GATES = ("tanh", "channel", "sigmoid")


class QueryBlock(WrappedLayer):
    """A frozen transformer block that also processes ``M`` learnable queries and injects their
    gated, projected summary back into its output tokens."""

    def __init__(self, base: nn.Module, dim: int, num_queries: int, proj_dim: int, gate: str):
        super().__init__(base)
        if gate not in GATES:
            raise ValueError(f"unknown Q-Adapter gate {gate!r}; valid gates: {', '.join(GATES)}")
        ref = next(base.parameters())
        kw = dict(device=ref.device, dtype=ref.dtype)
        self.dim, self.num_queries, self.gate_type = dim, num_queries, gate
        self.queries = nn.Parameter(torch.empty(num_queries, dim, **kw))
        nn.init.normal_(self.queries, std=0.02)
        self.down = nn.Linear(dim, proj_dim, **kw)
        self.up = nn.Linear(proj_dim, dim, **kw)
        if gate == "sigmoid":
            self.gate = nn.Linear(dim, 1, **kw)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
            nn.init.zeros_(self.up.weight)  # σ(·) > 0 is never closed: start the projection at zero
            nn.init.zeros_(self.up.bias)
        else:
            self.alpha = nn.Parameter(torch.zeros(1 if gate == "tanh" else dim, **kw))

    def gate_value(self, q_out: torch.Tensor) -> torch.Tensor:
        """``g`` broadcastable to (B, N, d)."""
        if self.gate_type == "sigmoid":
            return torch.sigmoid(self.gate(q_out.mean(1))).unsqueeze(1)  # (B, 1, 1)
        return torch.tanh(self.alpha)

    def forward(self, x: torch.Tensor, *args, attn_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if attn_mask is not None:
            raise NotImplementedError("Q-Adapter blocks do not combine with an attention mask from the model yet")
        b, n, _ = x.shape
        m = self.num_queries
        q = self.queries.unsqueeze(0).expand(b, -1, -1).to(x.dtype)
        # one-way visibility: token rows may not attend to query columns; queries see everything
        mask = x.new_zeros(n + m, n + m)
        mask[:n, n:] = float("-inf")
        z = self.base(torch.cat([x, q], dim=1), *args, attn_mask=mask, **kwargs)
        x_out, q_out = z[:, :n], z[:, n:]
        attn = torch.softmax(_ln(x_out) @ _ln(q_out).transpose(1, 2) / math.sqrt(self.dim), dim=-1)
        h = self.up(F.gelu(self.down(_ln(attn @ q_out))))
        return x_out + self.gate_value(q_out) * h


def _ln(t: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters (keeps the trainable set to queries, gates, projections)."""
    return F.layer_norm(t, t.shape[-1:])


def block_dim(backbone, layer: int) -> int:
    norm = backbone.block_sites(layer)["norm1"]
    mod = getattr(norm[0], norm[1])
    shape = getattr(mod, "normalized_shape", None)
    if not shape:
        raise SiteError(f"cannot infer the token width of block {layer} from {type(mod).__name__}")
    return int(shape[0])


@register_adapter("q_adapter")
class QAdapter(Adapter):
    """Learnable query tokens and a closed-init gate in each selected block (a reconstruction)."""

    paper = "Chen et al., Visual Query Adapter (Q-Adapter), ACM MM Asia 2025"

    def __init__(self, num_queries: int = 16, proj_dim: int = 56, gate: str = "tanh", layers="all"):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"unknown Q-Adapter gate {gate!r}; valid gates: {', '.join(GATES)}")
        int_option("q_adapter", "num_queries", num_queries)
        int_option("q_adapter", "proj_dim", proj_dim)
        self.num_queries, self.proj_dim, self.gate, self.layers = int(num_queries), int(proj_dim), gate, layers

    def attach(self, backbone) -> None:
        if backbone.token_layout != "nld":
            raise SiteError(
                f"backbone {backbone.family!r} has no site 'tokens' (its tokens are {backbone.token_layout}); "
                "Q-Adapter needs (batch, tokens, dim) blocks"
            )
        for s in self.sites("tokens", self.layers):
            dim = block_dim(backbone, s.layer)
            self.replace(s, QueryBlock(s.module, dim, self.num_queries, self.proj_dim, self.gate))

    @staticmethod
    def params_per_block(dim: int, num_queries: int, proj_dim: int, gate: str) -> int:
        """M·d + (d·r + r) + (r·d + d) + gate (1 | d | d + 1)."""
        gate_n = {"tanh": 1, "channel": dim, "sigmoid": dim + 1}[gate]
        return num_queries * dim + 2 * dim * proj_dim + proj_dim + dim + gate_n
