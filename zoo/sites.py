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

Adapters ask for sites by these names and a layer selection, never by module path. A block may
hold several sites of one kind (MORPH: ``q`` of each axial attention), and a backbone may add
model-level kinds of its own (``extra_site_kinds``, resolved by ``backbone.extra_sites(kind)``). A site
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
    tower: str | None = None  # on multi-tower backbones (CLIP: visual / text), the site's tower

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
    """Follow ``.base`` of adapter wrappers down to the original module.

    A wrapper is a module whose class sets ``wraps_base = True`` (:class:`zoo.adapters.base.AdapterModule`
    does): sites sit below adapters in the layering, so they recognise wrappers by that mark, not by import.
    """
    while getattr(module, "wraps_base", False) and isinstance(getattr(module, "base", None), nn.Module):
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


def normalize_targets(targets: Iterable[str] | str, extra: Sequence[str] = ()) -> list[str]:
    """Check site names; ``extra`` are a backbone's own model-level kinds (``extra_site_kinds``)."""
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    bad = [t for t in targets if t not in SITE_KINDS and t not in extra]
    if bad:
        raise SiteError(f"unknown site(s) {bad}; valid sites: {', '.join((*SITE_KINDS, *extra))}")
    return targets


Towers = Union[str, Sequence[str], None]
ALL_TOWERS = ("both", "all")


def select_towers(backbone, tower: Towers = None) -> list[str | None]:
    """Which towers of ``backbone`` a site selection covers.

    ``None`` is the backbone's default (its first tower; the only one on single-tower backbones);
    a tower name, a list of names, or ``both``/``all`` (every tower this instance has built).
    """
    names = tuple(getattr(backbone, "towers", ()) or ())
    if tower is None:
        return [names[0]] if names else [None]
    if not names:
        raise SiteError(
            f"tower={tower!r}: backbone {backbone.family!r} has a single tower; the tower option selects "
            "among the towers of multi-tower backbones (e.g. clip: visual | text | both)"
        )
    built = tuple(backbone.available_towers())
    wanted = list(built) if isinstance(tower, str) and tower in ALL_TOWERS else (
        [tower] if isinstance(tower, str) else list(tower))
    for t in wanted:
        if t not in names:
            raise SiteError(f"unknown tower {t!r} on backbone {backbone.family!r}; valid: "
                            f"{' | '.join(names + ALL_TOWERS[:1])}")
        if t not in built:
            raise SiteError(f"tower {t!r} is not built in this {backbone.family!r} backbone (built: "
                            f"{', '.join(built)}); build it with the {t} tower (e.g. backbone.towers=[{', '.join(names)}])")
    return wanted


def find_sites(backbone, targets: Iterable[str] | str, layers: Layers = "all", tower: Towers = None) -> list[Site]:
    """Resolve ``targets`` (site kinds) on ``layers`` of ``backbone`` into :class:`Site` objects.

    ``tower`` selects the towers of a multi-tower backbone (:func:`select_towers`); ``layers`` then
    applies to each selected tower's own blocks. Raises :class:`SiteError` naming the site when the
    backbone (or that tower) lacks it.
    """
    extra = tuple(getattr(backbone, "extra_site_kinds", ()))
    targets = normalize_targets(targets, extra)
    sites: list[Site] = []
    for t in select_towers(backbone, tower):
        blocks = backbone.blocks(t) if t is not None else backbone.blocks()
        idx = select_layers(layers, len(blocks))
        for i in idx:
            table = backbone.block_sites(i, t) if t is not None else backbone.block_sites(i)
            for kind in targets:
                if kind in extra:
                    continue
                if kind not in table:
                    where = f" tower {t!r}" if t is not None else ""
                    raise SiteError(
                        f"backbone {backbone.family!r} ({backbone.model_name}){where} has no site {kind!r}; "
                        f"its sites are: {', '.join(k for k in (*SITE_KINDS, *extra) if k in table or k in extra)}"
                    )
                entry = table[kind]
                # a block may hold several modules of one kind (SAM's decoder layer: three attentions,
                # MORPH's four axial attentions)
                for parent, attr, out_slice, path in entry if isinstance(entry, list) else [entry]:
                    sites.append(Site(kind, i, parent, attr, path, out_slice, t))
    for kind in targets:  # model-level sites (layer -1), once whatever the layer selection
        if kind in extra:
            sites.extend(backbone.extra_sites(kind))
    return sites
