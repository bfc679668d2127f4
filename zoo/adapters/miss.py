"""MiSS: Matrix Shard Sharing (ex-Bone / DiSHA).

Kang, Yin, "MiSS: Revisiting the Trade-off in LoRA with an Efficient Shard-Sharing Structure",
arXiv 2409.15371 (v1 "Bone: Block-Affine Adaptation of Large Language Models"); reference: peft
``tuners/miss`` (``MissConfig``), which superseded peft's ``BoneConfig``.

A frozen Linear ``y = W0 x + b`` (``W0 ∈ R^{d_out×d_in}``) gets one trainable shard ``D`` that every
column block of width ``r`` shares (``variant``):

* ``balance`` (default): ``D ∈ R^{r×d_out}``; the input is cut into ``⌈d_in/r⌉`` chunks of length ``r``
  (the last zero-padded) and summed, ``x̄ = Σ_j x[j·r:(j+1)·r] ∈ R^r``, and

      y = W0 x + b + Dᵀ x̄,        ΔW = [Dᵀ | Dᵀ | … | Dᵀ[:, :d_in mod r]]   (r·d_out parameters)

  (when ``r`` does not divide ``d_in`` the last block of ΔW is ``Dᵀ`` truncated to the remainder).
* ``mini``: ``D ∈ R^{r×mini_r}`` tiled ``d_out/mini_r`` times along the outputs, then as ``balance``
  (``r·mini_r`` parameters; needs ``d_out mod mini_r = 0``).
* ``bat``: ``D ∈ R^{(d_out/r)×r×r}``; each ``r×r`` block ``W_ij`` of ``W0`` (output block i, input block j)
  becomes ``W_ij + W_ij D_i + D_i``: a non-linear (in D) update across shards, so the layer runs with the
  materialised weight ``F.linear(x, W0 + ΔW)``; ``unmerge`` solves ``W = (W' − D_i)(I + D_i)^{-1}``.
  Needs ``r`` to divide both ``d_in`` and ``d_out``.

``D = 0`` at init (peft's ``init_weights=True``), so the model is unchanged; ``init=random``
(Kaiming-uniform, peft's ``init_weights=False``) exists for tests. Dropout acts on the summed input
(``balance``/``mini``; ``bat`` has none, as in peft). On a fused ``qkv`` projection each targeted row
slice (q, k, v) gets its own shard, exactly as on a separate projection (HF ViT's ``query``/``value``,
peft's ViT targets). Mergeable in all three variants. Nothing here is a reconstruction.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, WrappedLayer, dropout_option, int_option
from zoo.adapters.linear_sites import linear_site_groups
from zoo.adapters.lora import _rows

VARIANTS = ("balance", "mini", "bat")


class MiSSLinear(WrappedLayer):
    """A frozen Linear plus one MiSS shard per output row slice (``None`` = all rows)."""

    def __init__(self, base: nn.Module, rank: int, variant: str = "balance", mini_r: int = 1,
                 dropout: float = 0.0, slices: dict[str, slice | None] | None = None, init: str = "zero",
                 where: str = ""):
        super().__init__(base)
        lin = self.linear()
        d_in, d_out = lin.in_features, lin.out_features
        self.rank, self.variant, self.mini_r = rank, variant, mini_r
        self.slices = dict(slices or {"all": None})
        at = f" at {where}" if where else ""
        if rank > d_in:
            raise ValueError(f"MiSS: rank={rank} exceeds d_in={d_in}{at} (the shard width r must be <= d_in)")
        shapes = {}
        for k, s in self.slices.items():
            rows = _rows(s, d_out)
            if variant == "bat" and (d_in % rank or rows % rank):
                raise ValueError(f"MiSS variant=bat needs rank to divide d_in and d_out, got rank={rank}, "
                                 f"d_in={d_in}, d_out={rows}{at}; choose a divisor or variant=balance")
            if variant == "mini" and rows % mini_r:
                raise ValueError(f"MiSS variant=mini needs mini_r to divide d_out, got mini_r={mini_r}, d_out={rows}{at}")
            shapes[k] = {"balance": (rank, rows), "mini": (rank, mini_r), "bat": (rows // rank, rank, rank)}[variant]
        w = lin.weight
        self.miss_block = nn.ParameterDict({k: nn.Parameter(torch.zeros(*shp, device=w.device, dtype=w.dtype))
                                            for k, shp in shapes.items()})
        if init == "random":  # peft init_weights=False (tests): Kaiming-uniform
            for p in self.miss_block.values():
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # -------------------------------------------------------------- the shard as applied
    def _shard(self, key: str) -> torch.Tensor:
        """``balance``/``mini``: the ``(r, rows)`` matrix that multiplies x̄ (``mini`` tiled)."""
        d = self.miss_block[key]
        if self.variant == "mini":
            d = d.repeat(1, _rows(self.slices[key], self.linear().out_features) // self.mini_r)
        return d

    def _shard_full(self) -> torch.Tensor:
        """All slices' shards side by side, ``(r, d_out)``, zero outside each slice's rows."""
        if list(self.slices.values()) == [None]:
            return self._shard(next(iter(self.slices)))
        lin = self.linear()
        out = self.miss_block[next(iter(self.slices))].new_zeros(self.rank, lin.out_features)
        for k, s in self.slices.items():
            out[:, slice(None) if s is None else s] += self._shard(k)
        return out

    def _bat_delta(self, w0: torch.Tensor) -> torch.Tensor:
        """``bat``: ΔW with blocks ``W_ij D_i + D_i`` (rows outside the slices: zero)."""
        r, dw = self.rank, torch.zeros_like(w0)
        for k, s in self.slices.items():
            d = self.miss_block[k].to(w0.dtype)
            ws = w0 if s is None else w0[s]
            blocks = ws.reshape(ws.shape[0] // r, r, ws.shape[1] // r, r).permute(2, 0, 1, 3)  # (j, i, r, r)
            delta = (blocks @ d + d).permute(1, 2, 0, 3).reshape(ws.shape)
            if s is None:
                dw = dw + delta
            else:
                dw = dw.index_put((torch.arange(w0.shape[0], device=w0.device)[s],), delta, accumulate=True)
        return dw

    def delta_weight(self) -> torch.Tensor:
        """ΔW with ``W0 + ΔW`` the adapted weight (every variant)."""
        lin = self.linear()
        if self.variant == "bat":
            return self._bat_delta(lin.weight)
        d_in = lin.in_features
        shard_t = self._shard_full().t()  # (d_out, r)
        return shard_t.repeat(1, -(-d_in // self.rank))[:, :d_in].to(lin.weight.dtype)

    # -------------------------------------------------------------- forward / merge
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.variant == "bat":
            lin = self.linear()
            dw = self._bat_delta(lin.weight)
            if type(self.base) is nn.Linear:  # the weight as peft materialises it (one GEMM)
                return F.linear(x, lin.weight + dw, lin.bias)
            return self.base(x) + F.linear(x, dw)
        out = self.base(x)
        r, h = self.rank, x
        if h.shape[-1] % r:
            h = F.pad(h, (0, r - h.shape[-1] % r))
        h = self.dropout(h)  # after the padding, as peft (the same mask under the same RNG state)
        xbar = h.reshape(*h.shape[:-1], h.shape[-1] // r, r).sum(-2)
        return out + xbar @ self._shard_full().to(x.dtype)

    def merge_into_base(self) -> None:
        lin = self.linear()
        lin.weight += self.delta_weight()

    def unmerge_from_base(self) -> None:
        lin = self.linear()
        if self.variant != "bat":
            lin.weight -= self.delta_weight()
            return
        r = self.rank
        for k, s in self.slices.items():  # W = (W' − D_i)(I + D_i)^{-1}, solved in float64
            d = self.miss_block[k].double()
            ws = (lin.weight if s is None else lin.weight[s]).double()
            blocks = ws.reshape(ws.shape[0] // r, r, ws.shape[1] // r, r).permute(2, 0, 1, 3)
            eye = torch.eye(r, dtype=d.dtype, device=d.device)
            # X (I + D) = B  <=>  (I + D)ᵀ Xᵀ = Bᵀ
            orig = torch.linalg.solve((eye + d).transpose(-1, -2), (blocks - d).transpose(-1, -2)).transpose(-1, -2)
            orig = orig.permute(1, 2, 0, 3).reshape(ws.shape).to(lin.weight.dtype)
            if s is None:
                lin.weight.copy_(orig)
            else:
                lin.weight[s] = orig


@register_adapter("miss")
class MiSS(Adapter):
    """MiSS (ex-Bone) shard-shared updates on Linear sites (default q and v, peft's ViT targets)."""

    mergeable = True
    supports_slices = True
    paper = "Kang & Yin, MiSS (ex-Bone), arXiv 2409.15371"

    def __init__(self, rank: int = 64, variant: str = "balance", mini_r: int = 1, dropout: float = 0.0,
                 targets: list[str] = ("q", "v"), layers="all", init: str = "zero"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown MiSS variant {variant!r}; valid: {', '.join(VARIANTS)}")
        if init not in ("zero", "random"):
            raise ValueError(f"unknown MiSS init {init!r}; valid: zero (the paper, unchanged model), random (tests)")
        self.rank, self.mini_r = int_option("miss", "rank", rank), int_option("miss", "mini_r", mini_r)
        self.variant, self.dropout, self.init = variant, dropout_option("miss", dropout), init
        self.targets, self.layers = list(targets), layers

    def attach(self, backbone) -> None:
        for site, slices in linear_site_groups(self, "MiSS"):
            self.replace(site, MiSSLinear(site.module, self.rank, self.variant, self.mini_r, self.dropout, slices,
                                          self.init, site.path))

