"""The Conformer adapter of PETL-AST.

Cappellazzo, Falavigna, Brutti, Ravanelli, "Parameter-Efficient Transfer Learning of Audio Spectrogram
Transformers", IEEE MLSP 2024 (arXiv 2312.03694); reference ``umbertocappellazzo/PETL_AST`` src/AST_adapters.py.

The bottleneck's MLP is replaced by the convolution module of the Conformer (Gulati et al.,
Interspeech 2020), run along the token sequence ``[B, N, d]`` (channels = features):

    A(x) = PW₂( SiLU( BN( DW_k( GLU( PW₁ x ) ) ) ) ),

PW₁: Conv1d d → 2b (1×1), GLU over channels → b, DW_k: depthwise Conv1d (kernel ``k`` = 31, 'same'
padding, groups = b), BatchNorm1d(b), SiLU, PW₂: Conv1d b → d (1×1), dropout (0), with
``b = round(d / RR)`` (``reduction_rate``, PETL-AST's default 96) or ``bottleneck``.

Insertion is the bottleneck adapter's (:mod:`zoo.adapters.adapter`): ``style`` pfeiffer (MLP) /
houlsby (attention and MLP) × ``placement`` parallel (default, as PETL-AST's main.py) / sequential.
Departures from the reference code, on purpose:

* the reference computes an input LayerNorm and then overwrites its output, so no LayerNorm is
  applied; here too (``layernorm=false``), with ``layernorm=true`` available;
* the reference calls no init (src/AST_adapters.py L97-117): PyTorch's default, so its model changes at
  init; here ``PW₂`` starts at zero by default so the model is unchanged at init (our choice);
  ``zero_init=false`` is the reference's init (``experiment=petl_ast/*`` pins it).

The BatchNorm keeps running statistics (it trains in train mode, as in the reference). Not mergeable.
"""
from __future__ import annotations

import torch
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.adapter import BottleneckAdapter
from zoo.adapters.base import AdapterModule


class ConformerConv(AdapterModule):
    """Conformer convolution module on tokens ``[..., N, d]`` (any leading shape is flattened to B)."""

    def __init__(self, dim: int, inner: int, kernel_size: int = 31, dropout: float = 0.0,
                 layernorm: bool = False, zero_init: bool = True):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        self.norm = nn.LayerNorm(dim) if layernorm else nn.Identity()
        self.pw1 = nn.Conv1d(dim, 2 * inner, 1)
        self.glu = nn.GLU(dim=1)
        self.dw = nn.Conv1d(inner, inner, kernel_size, padding=kernel_size // 2, groups=inner)
        self.bn = nn.BatchNorm1d(inner)
        self.act = nn.SiLU()
        self.pw2 = nn.Conv1d(inner, dim, 1)
        self.dropout = nn.Dropout(dropout)
        if zero_init:
            nn.init.zeros_(self.pw2.weight)
            nn.init.zeros_(self.pw2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4):
            raise ValueError(f"the Conformer adapter takes tokens [B, N, d] or [B, H, W, d], got {tuple(x.shape)}")
        shape = x.shape
        h = self.norm(x).reshape(shape[0], -1, shape[-1])
        h = h.transpose(1, 2)  # [B, d, N]
        h = self.act(self.bn(self.dw(self.glu(self.pw1(h)))))
        return self.dropout(self.pw2(h)).transpose(1, 2).reshape(shape)


@register_adapter("conformer")
class ConformerAdapter(BottleneckAdapter):
    """PETL-AST's Conformer adapter (``style`` × ``placement``, ``reduction_rate``, ``kernel_size``)."""

    paper = "Cappellazzo et al., PETL of Audio Spectrogram Transformers, IEEE MLSP 2024 (Conformer adapter)"
    STYLES = ("pfeiffer", "houlsby")

    def __init__(self, style: str = "pfeiffer", placement: str = "parallel", reduction_rate: float | None = 96,
                 bottleneck: int = 8, kernel_size: int = 31, dropout: float = 0.0, layernorm: bool = False,
                 zero_init: bool = True, layers="all"):
        if style not in self.STYLES:
            raise ValueError(f"unknown conformer adapter style {style!r}; valid styles: {', '.join(self.STYLES)}")
        super().__init__(style=style, bottleneck=bottleneck, dropout=dropout, layernorm=layernorm, layers=layers,
                         placement=placement, reduction_rate=reduction_rate)
        self.kernel_size, self.zero_init = int(kernel_size), bool(zero_init)

    def make_module(self, dim: int) -> nn.Module:
        return ConformerConv(dim, self.inner_dim(dim), self.kernel_size, self.dropout, self.layernorm, self.zero_init)
