"""S²FT: Structured Sparse Fine-Tuning ("select sparsely, compute densely").

Yang, Lin, Chen et al., "S²FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured
Sparsity", NeurIPS 2024 (arXiv 2412.06289); reference: github.com/Infini-AI-Lab/S2FT (``s2ft/s2.py``,
``experiments/train/finetune.py``). Not in peft.

A few attention heads and a few MLP hidden channels are selected; only the weight columns they own
in the *output-side* projections train::

    heads    (site o):   W_o[:, h·d_h:(h+1)·d_h] += S_h          for each selected head h
    channels (site fc2): W_fc2[:, c]             += s_c          for each selected hidden channel c

i.e. ``y = W x + b + S x_I`` with ``I`` the selected input columns and ``S ∈ R^{d_out×|I|}`` (zero at
init, so the model is unchanged; the reference's ``S2RowLinear``). On ViT the heads' columns are
``attn.proj``'s inputs (the fused ``qkv`` is not touched: a head's output enters the block only
through its ``o`` columns), the channels ``mlp.fc2``'s inputs. The reference co-permutes ``fc1`` rows
and ``fc2`` columns so each selection is one contiguous block; that changes no numerics, and here the
selected columns are gathered by index instead (the spec's index-mask form).

Selection (the reference's): global and random. ``⌊head_ratio · (#heads · #layers)⌋`` (layer, head)
pairs are drawn uniformly without replacement over all adapted attentions, and likewise
``⌊channel_ratio · Σ hidden widths⌋`` (layer, channel) pairs, from a generator seeded with ``seed``.
The defaults are the reference's LLaMA commonsense script (``o_ratio 0.052``, ``d_ratio 0.02``,
``v_ratio = u_ratio = 0``: the optional ``v`` rows and ``up`` rows are not built here). The paper's
other selection strategies (by weight, activation or gradient) are not built either. The chosen
columns are stored with the artifact. Mergeable: merge adds ``S`` into ``W[:, I]``.

On a convolutional backbone (NAFNet) the ``fc2`` site is a 1×1 convolution: its input channels are
selected the same way; ``o`` there has no heads, so ``head_ratio`` must be 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, WrappedLayer, float_option, int_option
from zoo.sites import Site, SiteError, unwrap

HEAD_ATTRS = ("num_heads", "heads", "n_heads", "num_attention_heads")


def num_heads(site: Site) -> int | None:
    """Heads of the attention that owns the ``o`` projection at ``site`` (its parent module)."""
    parent = unwrap(site.parent)
    for a in HEAD_ATTRS:
        v = getattr(parent, a, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


class S2Linear(WrappedLayer):
    """A frozen Linear (or 1×1 Conv2d) plus trainable columns ``S`` on input columns ``cols``."""

    def __init__(self, base: nn.Module, cols: torch.Tensor):
        super().__init__(base)
        layer = unwrap(base)
        w = layer.weight
        self.register_buffer("cols", cols.to(w.device, torch.int64))
        self.s2 = nn.Parameter(torch.zeros(w.shape[0], cols.numel(), device=w.device, dtype=w.dtype))
        self.conv = isinstance(layer, nn.Conv2d)

    def layer(self) -> nn.Module:
        return unwrap(self.base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        if self.conv:  # NCHW: the selected input channels through a 1×1 conv with S
            return out + F.conv2d(x.index_select(1, self.cols), self.s2[:, :, None, None])
        return out + x.index_select(-1, self.cols) @ self.s2.t()

    def delta_weight(self) -> torch.Tensor:
        w = self.layer().weight
        dw = torch.zeros_like(w)
        dw[:, self.cols] = self.s2.view(*self.s2.shape, *w.shape[2:]).to(w.dtype)
        return dw

    def merge_into_base(self) -> None:
        self.layer().weight += self.delta_weight()

    def unmerge_from_base(self) -> None:
        self.layer().weight -= self.delta_weight()


def draw(sizes: list[int], ratio: float, g: torch.Generator) -> list[list[int]]:
    """``⌊ratio · Σ sizes⌋`` flat indices drawn without replacement, mapped back per group (sorted)."""
    total = sum(sizes)
    k = int(ratio * total)
    picked = torch.randperm(total, generator=g)[:k].sort().values.tolist() if k else []
    out: list[list[int]] = [[] for _ in sizes]
    bounds, acc = [], 0
    for n in sizes:
        bounds.append(acc)
        acc += n
    gi = 0
    for p in picked:
        while gi + 1 < len(sizes) and p >= bounds[gi + 1]:
            gi += 1
        out[gi].append(p - bounds[gi])
    return out


@register_adapter("s2ft")
class S2FT(Adapter):
    """S²FT: fine-tune the ``o`` columns of randomly selected heads and ``fc2`` columns of selected channels."""

    mergeable = True
    paper = "Yang et al., S2FT: Structured Sparse Fine-Tuning, NeurIPS 2024"

    def __init__(self, head_ratio: float = 0.052, channel_ratio: float = 0.02, seed: int = 0, layers="all"):
        super().__init__()
        self.head_ratio = float_option("s2ft", "head_ratio", head_ratio, 0.0, 1.0)
        self.channel_ratio = float_option("s2ft", "channel_ratio", channel_ratio, 0.0, 1.0)
        if self.head_ratio == 0 and self.channel_ratio == 0:
            raise ValueError("adapter 's2ft': head_ratio and channel_ratio are both 0: nothing would train")
        self.seed, self.layers = int_option("s2ft", "seed", seed, lo=0), layers
        self.selected: dict[str, list[int]] = {}  # site path -> selected heads / channels

    def attach(self, backbone) -> None:
        g = torch.Generator().manual_seed(self.seed)
        plan: list[tuple[Site, torch.Tensor]] = []
        if self.head_ratio > 0:
            sites = self.sites(["o"], self.layers)
            heads = []
            for s in sites:
                layer = unwrap(s.module)
                h = num_heads(s)
                if not isinstance(layer, nn.Linear) or h is None or layer.in_features % h:
                    raise SiteError(
                        f"S2FT selects attention heads through site 'o', but {s.path} is a {type(layer).__name__} "
                        f"{'without attention heads' if h is None else f'whose {layer.in_features} inputs do not split into {h} heads'}"
                        " on this backbone; set head_ratio=0 to fine-tune fc2 channels only")
                heads.append(h)
            for s, h, chosen in zip(sites, heads, draw(heads, self.head_ratio, g)):
                d_h = unwrap(s.module).in_features // h
                self.selected[s.path] = chosen
                if chosen:
                    plan.append((s, torch.cat([torch.arange(c * d_h, (c + 1) * d_h) for c in chosen])))
        if self.channel_ratio > 0:
            sites = self.sites(["fc2"], self.layers)
            widths = []
            for s in sites:
                layer = unwrap(s.module)
                if not (isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1)
                                                          and layer.groups == 1)):
                    raise SiteError(f"S2FT selects hidden channels as input columns of a Linear or 1x1 conv at site "
                                    f"'fc2'; {s.path} is a {type(layer).__name__}")
                widths.append(layer.weight.shape[1])
            for s, chosen in zip(sites, draw(widths, self.channel_ratio, g)):
                self.selected[s.path] = chosen
                if chosen:
                    plan.append((s, torch.tensor(chosen)))
        if not plan:
            raise ValueError(f"adapter 's2ft': head_ratio={self.head_ratio} and channel_ratio={self.channel_ratio} "
                             "select no head and no channel on this backbone; raise a ratio")
        for site, cols in plan:
            self.replace(site, S2Linear(site.module, cols))
