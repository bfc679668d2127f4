"""SHiRA: Sparse High-Rank Adapters.

Bhardwaj, Paul, Soltani et al., "Sparse High Rank Adapters", NeurIPS 2024 (arXiv 2406.13175);
reference: peft ``tuners/shira`` (``ShiraConfig``).

A frozen Linear ``y = W0 x + b`` fine-tunes a fixed sparse set ``Ω`` of its own weights::

    W = W0 + s · S(θ, Ω),     S ∈ R^{d_out×d_in} sparse, S[Ω] = θ,   |Ω| = r · (d_in + d_out)

(the budget of a rank-``r`` LoRA, but the update is high-rank). ``θ = 0`` at init (unchanged model;
``init=random`` draws N(0, 1) as peft's ``init_weights=False``, for tests). ``s`` (``scale``) is 1 in
training and may be changed for inference. As in peft the layer runs ``F.linear(x, W0 + s·S, b)``
(one GEMM; over another adapter's wrapper: ``base(x) + F.linear(x, s·S)``). Mergeable: merge adds
``s·S`` to ``W0``, unmerge subtracts it.

Masks (``mask``):

* ``random`` (peft's only mask, the paper's SHiRA-Rand): a CPU ``torch.Generator`` seeded with ``seed``
  draws ``randperm(d_out·d_in)[:|Ω|]``; the indices are then read back in row-major order
  (``torch.where(mask)``), and ``θ`` follows that order, exactly as peft, so a state dict maps 1:1.
  Every layer of one shape gets the same pattern (one seed, as peft).
* ``weight`` (the paper's SHiRA-WM): the ``|Ω|`` entries of ``W0`` with the largest magnitude.

The paper's gradient-based masks (SHiRA-Grad, SHiRA-SNIP) need a calibration pass and are not built
here. The indices are part of the artifact (a persistent buffer), so a loaded adapter cannot land
on other positions. On a fused ``qkv`` projection each targeted slice (q, k, v) gets its own mask
over its own rows, as peft on separate ``query``/``value`` projections.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, WrappedLayer, float_option, int_option
from zoo.adapters.linear_sites import linear_site_groups
from zoo.adapters.lora import _rows

MASKS = ("random", "weight")


def shira_mask(weight: torch.Tensor, rank: int, mask: str = "random", seed: int | None = 0) -> torch.Tensor:
    """``(2, |Ω|)`` row/column indices of the trainable entries of ``weight`` (row-major order)."""
    d_out, d_in = weight.shape
    n = rank * (d_in + d_out)
    if mask == "random":  # peft's mask_functions.random_mask, same generator and draw
        g = torch.Generator()
        if seed is not None:
            g.manual_seed(int(seed))
        idx = torch.randperm(d_out * d_in, generator=g)[:n]
    else:  # SHiRA-WM: the largest-magnitude weights
        idx = weight.detach().abs().flatten().float().cpu().topk(n).indices
    flat = torch.zeros(d_out * d_in, dtype=torch.bool)
    flat[idx] = True
    rows, cols = torch.where(flat.view(d_out, d_in))
    return torch.stack([rows, cols]).to(torch.int64)


class SHiRALinear(WrappedLayer):
    """A frozen Linear plus sparse trainable entries on chosen output row slices (``None`` = all)."""

    def __init__(self, base: nn.Module, rank: int, mask: str = "random", seed: int | None = 0,
                 slices: dict[str, slice | None] | None = None, scale: float = 1.0, init: str = "zero",
                 where: str = ""):
        super().__init__(base)
        lin = self.linear()
        w = lin.weight
        self.rank, self.scale = rank, float(scale)
        self.slices = dict(slices or {"all": None})
        self.shira_weight = nn.ParameterDict()
        for k, s in self.slices.items():
            rows = _rows(s, lin.out_features)
            n = rank * (lin.in_features + rows)
            if n > rows * lin.in_features:
                raise ValueError(
                    f"SHiRA: rank={rank} asks for r*(d_in+d_out) = {n} trainable entries, more than the "
                    f"{rows}x{lin.in_features} weight has{' at ' + where if where else ''}; choose rank <= "
                    f"{rows * lin.in_features // (lin.in_features + rows)}")
            idx = shira_mask(w if s is None else w[s], rank, mask, seed)
            if s is not None:
                idx[0] += s.indices(lin.out_features)[0]  # rows of the fused weight
            # int32 as peft stores them (a third of the artifact at 4 + 4 + 4 bytes per entry); int64 at use
            self.register_buffer(f"indices_{k}", idx.to(w.device, torch.int32))
            vals = torch.zeros(n, device=w.device, dtype=w.dtype)
            if init == "random":
                vals.normal_()
            self.shira_weight[k] = nn.Parameter(vals)

    def delta_weight(self) -> torch.Tensor:
        """``s · S(θ, Ω)`` as a dense ``d_out × d_in`` matrix (differentiable in θ)."""
        w = self.linear().weight
        idx = torch.cat([getattr(self, f"indices_{k}") for k in self.slices], 1).long()
        vals = torch.cat([self.shira_weight[k] for k in self.slices]) * self.scale
        return w.new_zeros(w.shape).index_put((idx[0], idx[1]), vals.to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        dw = self.delta_weight()
        if type(self.base) is nn.Linear:  # peft's forward: one GEMM with W0 + s·S
            return F.linear(x, self.base.weight + dw, self.base.bias)
        return self.base(x) + F.linear(x, dw)

    def merge_into_base(self) -> None:
        self.linear().weight += self.delta_weight()

    def unmerge_from_base(self) -> None:
        self.linear().weight -= self.delta_weight()


@register_adapter("shira")
class SHiRA(Adapter):
    """SHiRA sparse high-rank updates on Linear sites (default q and v, peft's ViT targets)."""

    mergeable = True
    supports_slices = True
    paper = "Bhardwaj et al., Sparse High Rank Adapters, NeurIPS 2024"

    def __init__(self, rank: int = 32, mask: str = "random", seed: int | None = 0, scale: float = 1.0,
                 targets: list[str] = ("q", "v"), layers="all", init: str = "zero"):
        super().__init__()
        if mask not in MASKS:
            raise ValueError(f"unknown SHiRA mask {mask!r}; valid: {', '.join(MASKS)} (random: SHiRA-Rand, "
                             "weight: SHiRA-WM, largest |W0|)")
        if init not in ("zero", "random"):
            raise ValueError(f"unknown SHiRA init {init!r}; valid: zero (unchanged model at init), random (tests)")
        self.rank, self.mask, self.init = int_option("shira", "rank", rank), mask, init
        self.seed = None if seed is None else int_option("shira", "seed", seed, lo=0)
        self.scale = float_option("shira", "scale", scale)
        self.targets, self.layers = list(targets), layers

    def attach(self, backbone) -> None:
        for site, slices in linear_site_groups(self, "SHiRA"):
            self.replace(site, SHiRALinear(site.module, self.rank, self.mask, self.seed, slices, self.scale, self.init,
                                           site.path))
