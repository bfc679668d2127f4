"""The backbone contract: a real model from its own library plus a uniform view of its blocks."""
from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import torch
from torch import nn

from zoo.sites import unwrap


class Backbone(nn.Module):
    """Wraps a model (``self.model``) and exposes what adapters and tasks need.

    Subclasses set ``family`` and ``site_map`` (site kind -> attribute path inside one block)
    and implement ``blocks_container`` and ``forward_features``/``forward``.

    * ``forward(x)`` returns pooled features of size ``feature_dim`` (what a classifier head reads);
    * ``forward_features(x)`` returns the backbone's dense output (tokens or a feature map);
    * ``block_sites(i)`` lists the named sites of block ``i`` (:mod:`zoo.sites`);
    * ``data_config`` gives the expected input size and normalisation.
    """

    family: ClassVar[str] = ""
    site_map: ClassVar[dict[str, str]] = {}
    fused_qkv: ClassVar[str | None] = None  # path of the fused q/k/v projection inside a block
    token_layout: ClassVar[str] = "nld"  # 'nld' (batch, tokens, dim) or 'nhwc' (SAM): for token sites
    # Multi-tower backbones (CLIP: visual + text; SAM: encoder + decoder) name their towers; the
    # first is the default an adapter attaches to. Adapters pick towers with their generic ``tower``
    # option (see :func:`zoo.sites.find_sites`); single-tower backbones leave this empty.
    towers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, model_name: str, weights_tag: str | None, build_kwargs: dict):
        super().__init__()
        self.model = model
        self.model_name = model_name
        self.weights_tag = weights_tag
        self.build_kwargs = dict(build_kwargs)
        # plain Python attributes, not submodules: adapters hold references into the model
        self.__dict__["adapters"] = []
        self.__dict__["_fingerprint"] = None

    # ------------------------------------------------------------------ structure
    feature_dim: int = 0
    num_prefix_tokens: int = 0
    data_config: dict[str, Any] = {}
    feature_stride: int = 0  # input pixels per cell of ``feature_map`` (0: no dense map)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Dense features ``(B, feature_dim, h, w)`` with ``h = H / feature_stride`` (for dense heads)."""
        raise NotImplementedError(f"backbone {self.family!r} gives no dense feature map; dense heads need one")

    def blocks_container(self) -> nn.Module:
        raise NotImplementedError

    def final_norm(self) -> nn.Module | None:
        """The norm after the last block (an adapter's ``train_also: [final_norm]``), or ``None``."""
        return None

    def blocks_path(self) -> str:
        raise NotImplementedError

    def blocks(self, tower: str | None = None) -> list[nn.Module]:
        return [unwrap(b) for b in self.tower_blocks(tower)[0]]

    def available_towers(self) -> tuple[str, ...]:
        """The towers built in this instance (a subset of ``towers``; e.g. CLIP built visual-only)."""
        return self.towers

    def tower_named_parameters(self, tower=None):
        """``(name, parameter)`` of the selected towers (all of them on single-tower backbones).

        ``tower`` is an adapter's generic tower option (:func:`zoo.sites.select_towers`); methods that
        train base weights (``full``, ``bitfit``) use it so they respect the selection too.
        """
        from zoo.sites import select_towers

        names = select_towers(self, tower)
        if names == [None]:
            yield from self.named_parameters()
            return
        for n, p in self.named_parameters():
            if self.parameter_tower(n) in names:
                yield n, p

    def parameter_tower(self, name: str) -> str | None:
        """The tower a parameter (name relative to the backbone) belongs to; ``None``: none (shared)."""
        return None

    def tower_blocks(self, tower: str | None = None) -> tuple[nn.Module, str, bool]:
        """``(blocks container, its path, whether blocks have a 'tokens' site)`` of ``tower``.

        Single-tower backbones have one answer (``tower`` is ``None``); multi-tower ones override.
        """
        return self.blocks_container(), self.blocks_path(), self.token_layout == "nld"

    @property
    def depth(self) -> int:
        return len(self.blocks_container())

    def block_sites(self, i: int, tower: str | None = None) -> dict[str, tuple[nn.Module, str, slice | None, str]]:
        """``kind -> (parent, attr, out_slice, path)`` for block ``i`` (of ``tower``, default the first)."""
        container, path, has_tokens = self.tower_blocks(tower)
        block = unwrap(container[i])
        prefix = f"{path}.{i}"
        table: dict[str, tuple[nn.Module, str, slice | None, str]] = {}
        for kind, rel in self.site_map.items():
            parent, attr = _resolve(block, rel)
            table[kind] = (parent, attr, None, f"{prefix}.{rel}")
        if self.fused_qkv is not None:
            parent, attr = _resolve(block, self.fused_qkv)
            fused = unwrap(getattr(parent, attr))
            d = fused.out_features // 3
            table["qkv"] = (parent, attr, None, f"{prefix}.{self.fused_qkv}")
            for j, kind in enumerate("qkv"):
                table[kind] = (parent, attr, slice(j * d, (j + 1) * d), f"{prefix}.{self.fused_qkv}[{kind}]")
        if has_tokens:
            table["tokens"] = (container, str(i), None, prefix)
        return table

    patch_embed_path: ClassVar[str | None] = None  # the patch-embedding conv, relative to self

    def patch_embed_site(self):
        """The patch-embedding projection (a Conv2d) as a :class:`~zoo.sites.Site` (kind ``patch_embed``)."""
        from zoo.sites import Site, SiteError

        if self.patch_embed_path is None:
            raise SiteError(f"backbone {self.family!r} has no site 'patch_embed'")
        parent, attr = _resolve(self, self.patch_embed_path)
        return Site("patch_embed", -1, parent, attr, self.patch_embed_path, None)

    # ------------------------------------------------------------------ identity
    @property
    def adapters(self) -> list:
        return self.__dict__["adapters"]

    def describe(self) -> dict[str, Any]:
        """What an adapter artifact records about its base model."""
        return {
            "family": self.family,
            "model": self.model_name,
            "weights_tag": self.weights_tag,
            "kwargs": _jsonable(self.build_kwargs),
            "fingerprint": self.fingerprint(),
        }

    def fingerprint(self) -> str:
        """sha256 over the base weights (names, shapes, dtypes, bytes), computed once.

        Computed before the first adapter attaches, so it identifies the weights an adapter was
        trained on even after ``full``/``bitfit`` change them.
        """
        if self.__dict__["_fingerprint"] is None:
            if self.adapters:
                raise RuntimeError("fingerprint must be taken before adapters are attached")
            h = hashlib.sha256()
            for name, t in self.model.state_dict().items():
                t = t.detach().to("cpu").contiguous()
                h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
            self.__dict__["_fingerprint"] = h.hexdigest()
        return self.__dict__["_fingerprint"]

    def reset_fingerprint(self) -> None:
        self.__dict__["_fingerprint"] = None

    def extra_repr(self) -> str:
        return f"family={self.family!r}, model={self.model_name!r}, adapters={[a.name for a in self.adapters]}"


def _resolve(block: nn.Module, rel: str) -> tuple[nn.Module, str]:
    """Walk a dotted path through wrappers; return (parent, last attribute)."""
    parts = rel.split(".")
    parent = block
    for p in parts[:-1]:
        parent = unwrap(getattr(parent, p))
    return parent, parts[-1]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
