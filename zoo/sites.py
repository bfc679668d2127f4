"""Sites: one vocabulary for where adapters attach, on every backbone.

A backbone describes each transformer block with the same names (see DESIGN.md):

==========  ===============================================================
``q k v``   query/key/value projections (row slices of a fused ``qkv`` Linear)
``qkv``     the fused projection as one Linear
``o``       attention output projection
``fc1 fc2`` the MLP's Linears
``attn``    the whole attention sub-block (for sequential adapters)
``mlp``     the whole MLP sub-block (for sequential / parallel adapters)
``norm1``   the LayerNorm feeding ``attn``;  ``norm2``: the one feeding ``mlp``
``tokens``  the token sequence entering the block (prompts, query tokens)
==========  ===============================================================

Convolutional blocks (NAFNet) add three kinds for convolutions without a transformer
counterpart, and map their 1×1 output projection / per-pixel MLP convs to ``o``/``fc1``/``fc2``:

============  =============================================================
``conv_pw``   the pointwise (1×1) conv that feeds a depthwise conv
``conv_dw``   the depthwise (grouped) spatial conv
``conv_sca``  the 1×1 conv of a channel-attention (squeeze) branch
``conv1``     the first dense spatial (k×k) conv of a residual / decoder block (U-Net)
``conv2``     the second one
============  =============================================================

Adapters ask for sites by these names and a layer selection, never by module path. A site
is resolved through any wrappers already attached (``.base`` chains), so adapters stack.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence, Union

from torch import nn

SITE_KINDS = ("q", "k", "v", "qkv", "o", "fc1", "fc2", "attn", "mlp", "norm1", "norm2", "tokens",
              "conv_pw", "conv_dw", "conv_sca", "conv1", "conv2")
LINEAR_SITES = ("q", "k", "v", "qkv", "o", "fc1", "fc2")
CONV_SITES = ("conv_pw", "conv_dw", "conv_sca", "conv1", "conv2")  # sites that are only ever convolutions

Layers = Union[str, int, Sequence[int], None]


class SiteError(ValueError):
    """A requested site or layer does not exist on this backbone."""


@dataclass
class Site:
    """A named place in block ``layer`` where an adapter may attach.

    ``parent.attr`` is the module there (possibly already wrapped by another adapter);
    ``out_slice`` selects the output rows of a fused projection for ``q``/``k``/``v``.
    """

    kind: str
    layer: int
    parent: nn.Module
    attr: str
    path: str
    out_slice: slice | None = None

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.attr)

    @property
    def base_module(self) -> nn.Module:
        """The original module under any wrappers."""
        return unwrap(self.module)

    def replace(self, new: nn.Module) -> None:
        setattr(self.parent, self.attr, new)


def unwrap(module: nn.Module) -> nn.Module:
    """Follow ``.base`` of adapter wrappers down to the original module."""
    from zoo.adapters.base import AdapterModule  # local: adapters import sites

    while isinstance(module, AdapterModule) and isinstance(getattr(module, "base", None), nn.Module):
        module = module.base
    return module


def select_layers(layers: Layers, depth: int) -> list[int]:
    """``all`` | an int ``n`` (the last n blocks) | a list of indices (negative allowed)."""
    if layers is None or layers == "all":
        return list(range(depth))
    if isinstance(layers, int):
        if not 0 < layers <= depth:
            raise SiteError(f"layers={layers}: expected 1..{depth} (the last n blocks) or a list of indices")
        return list(range(depth - layers, depth))
    if isinstance(layers, str):
        raise SiteError(f"layers={layers!r}: expected 'all', an int, or a list of block indices")
    out = []
    for i in layers:
        j = int(i) + depth if int(i) < 0 else int(i)
        if not 0 <= j < depth:
            raise SiteError(f"layer {i} out of range: this backbone has {depth} blocks (0..{depth - 1})")
        out.append(j)
    return sorted(set(out))


def normalize_targets(targets: Iterable[str] | str) -> list[str]:
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    bad = [t for t in targets if t not in SITE_KINDS]
    if bad:
        raise SiteError(f"unknown site(s) {bad}; valid sites: {', '.join(SITE_KINDS)}")
    return targets


def find_sites(backbone, targets: Iterable[str] | str, layers: Layers = "all") -> list[Site]:
    """Resolve ``targets`` (site kinds) on ``layers`` of ``backbone`` into :class:`Site` objects.

    Raises :class:`SiteError` naming the site when the backbone lacks it.
    """
    targets = normalize_targets(targets)
    blocks = backbone.blocks()
    idx = select_layers(layers, len(blocks))
    sites: list[Site] = []
    for i in idx:
        table = backbone.block_sites(i)
        for kind in targets:
            if kind not in table:
                raise SiteError(
                    f"backbone {backbone.family!r} ({backbone.model_name}) has no site {kind!r}; "
                    f"its sites are: {', '.join(k for k in SITE_KINDS if k in table)}"
                )
            parent, attr, out_slice, path = table[kind]
            sites.append(Site(kind, i, parent, attr, path, out_slice))
    return sites
