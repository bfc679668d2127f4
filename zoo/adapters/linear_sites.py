"""Target sites of adapters that wrap Linear layers and handle fused-qkv row slices (MiSS, SHiRA, LoLDU)."""
from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from zoo.adapters.lora import group_by_module
from zoo.sites import LINEAR_SITES, Site, SiteError, unwrap

SUBBLOCK_SITES = ("attn", "mlp", "norm1", "norm2", "tokens")  # whole sub-blocks / norms, not Linear layers


def slices_of(group: list[Site], who: str) -> dict[str, slice | None]:
    """``{kind: out_slice}`` of the sites on one Linear; the whole fused projection (``qkv``) and its
    q/k/v slices overlap, so asking for both is refused."""
    slices = {s.kind: s.out_slice for s in group}
    if len(slices) > 1 and None in slices.values():
        raise SiteError(f"{who}: targets {sorted(slices)} overlap on {group[0].path} (qkv is the whole fused "
                        "projection, q/k/v its row slices); target either qkv or the slices")
    return slices


def linear_site_groups(adapter, who: str) -> Iterator[tuple[Site, dict[str, slice | None]]]:
    """``(site, slices)`` per adapted Linear of ``adapter.targets`` on ``adapter.layers`` (q and v of one
    fused qkv: one site with two slices); sub-block sites and non-Linear layers are refused in one line."""
    bad = [t for t in adapter.targets if t in SUBBLOCK_SITES]
    if bad:
        raise SiteError(f"{who} attaches to Linear sites {LINEAR_SITES}, not {bad}")
    for group in group_by_module(adapter.sites(adapter.targets, adapter.layers)):
        base = unwrap(group[0].module)
        if not isinstance(base, nn.Linear):
            raise SiteError(f"{who} wraps Linear layers, got {type(base).__name__} at {group[0].path} "
                            f"({who} updates a weight matrix; convolutions are not supported)")
        yield group[0], slices_of(group, who)
