"""MORPH (Rautela et al., "MORPH: Shape-agnostic PDE Foundation Models", arXiv 2509.21670) as a zoo backbone.

The network is :class:`zoo.backbones.morph_model.ViT3DRegression` (a clean reimplementation of
lanl/MORPH's model, parity-tested against a golden fixture). This module adds the zoo's view of it:

* ``forward(vol)`` -> the next-frame prediction ``y (B, F, C, D, H, W)`` for UPTF-7 input
  ``(B, t, F, C, D, H, W)`` (MORPH's decoder is part of the pretrained model, so it is the "head");
  ``forward_features(vol)`` -> the transformer tokens ``z (B, t, n, dim)``; ``forward_all`` -> ``(enc, z, y)``.
* Sites, per block: ``q k v`` (row slices of each axial attention's fused ``qkv``), ``qkv``, ``o`` on
  each of the four axial attentions selected by ``axes``. ``auto`` (default) is ``t d h w`` when the
  model takes more than one context frame (``max_ar > 1``) and ``d h w`` otherwise: the time attention
  never runs with one frame, so adapters there would never train (and DDP would reject their unused
  parameters). MORPH's own LoRA also wraps ``attn_t`` at max_ar 1; ``axes=[t,d,h,w]`` reproduces that
  (and its trainable-parameter counts). Further: ``fc1 fc2``, ``attn`` (the
  whole axial attention), ``mlp``, ``norm1 norm2``. No ``tokens`` site: tokens live on a
  (t, D', H', W') grid that prompt tokens would break, so token adapters refuse.
  Model-level MORPH sites (``extra_site_kinds``): ``patch_proj`` (the shared patch Linear),
  ``field_q field_k field_v field_o`` (field cross-attention projections), ``decoder`` (the output
  Linear), ``conv_in`` / ``conv`` (the component-wise Conv3d layers).
* Weights: ``pretrained=True`` downloads the released checkpoint of the size from the HF Hub
  (``mahindrautela/MORPH``, subfolder ``models/FM``; L needs ``max_ar=16``, its default);
  ``weights=`` a local ``.pth``/``.safetensors`` file or ``hf:<repo>/<path>``. Reference key names
  are mapped (:func:`~zoo.backbones.morph_model.from_reference`); torch files are read
  ``weights_only=True``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from zoo.backbones.base import Backbone
from zoo.backbones.morph_model import AXES, SIZES, ViT3DRegression, config_for, from_reference
from zoo.backbones.weights import WeightsUnavailableError, hub_errors, load_state_dict_file
from zoo.sites import Site, unwrap

HF_REPO = "mahindrautela/MORPH"
HF_SUBFOLDER = "models/FM"
RELEASED = {
    "Ti": "morph-Ti-FM-max_ar1_ep225.pth",
    "S": "morph-S-FM-max_ar1_ep225.pth",
    "M": "morph-M-FM-max_ar1_ep290_latestbatch.pth",
    "L": "morph-L-FM-max_ar16_ep189_latestbatch.pth",
}

MORPH_SITES = {
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
    "attn": "axial_attn",
    "mlp": "mlp",
    "norm1": "norm1",
    "norm2": "norm2",
}
# model-level sites: kind -> path inside ViT3DRegression
MORPH_EXTRA_SITES = {
    "patch_proj": "patch_embedding.projection",
    "field_q": "patch_embedding.field_attn.q_proj",
    "field_k": "patch_embedding.field_attn.k_proj",
    "field_v": "patch_embedding.field_attn.v_proj",
    "field_o": "patch_embedding.field_attn.out_proj",
    "decoder": "decoder.linear",
    "conv_in": "patch_embedding.conv_features.input_proj",
    "conv": "patch_embedding.conv_features.conv_stack",
}


def resolve_weights(model: str, pretrained: bool, weights: str | None) -> Path | None:
    """Local path of the weights to load (downloading from the hub if asked), or None."""
    if weights:
        if str(weights).startswith("hf:"):
            repo_path = str(weights)[3:].split("/")
            if len(repo_path) < 3:
                raise ValueError(f"weights={weights!r}: expected hf:<owner>/<repo>/<path in repo>")
            return _download("/".join(repo_path[:2]), "/".join(repo_path[2:]), None, weights)
        return Path(weights).expanduser()
    if not pretrained:
        return None
    if model not in RELEASED:
        raise ValueError(f"MORPH-{model} has no released checkpoint (released: {', '.join(RELEASED)}); "
                         "use backbone.pretrained=false or backbone.weights=/path/to/file")
    return _download(HF_REPO, RELEASED[model], HF_SUBFOLDER, f"MORPH-{model}")


def _download(repo: str, filename: str, subfolder: str | None, what: str) -> Path:
    hint = ("Download it where the hub is reachable, e.g. `huggingface-cli download mahindrautela/MORPH "
            f"{(subfolder + '/') if subfolder else ''}{filename}`, then pass backbone.weights=/path/to/{Path(filename).name} "
            "(or train from scratch with backbone.pretrained=false).")
    with hub_errors(what, hint):
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo, filename=filename, subfolder=subfolder))


def load_morph_weights(net: ViT3DRegression, path: Path) -> None:
    """Load a reference (lanl/MORPH) or zoo-named state dict into ``net``, strictly."""
    sd = load_state_dict_file(path)
    if any(".base." in k or "in_proj_weight" in k or k.startswith("module.") for k in sd):
        sd = from_reference(sd)
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        hint = ""
        if any(k.startswith("pos_encoding") for k in shapes[:1] + [s.split()[0] for s in shapes]):
            hint = " (the positional table's time axis is max_ar: set backbone.max_ar to the checkpoint's, 16 for L)"
        raise WeightsUnavailableError(
            f"{path} does not fit MORPH({net.cfg.dim=}, {net.cfg.depth=}): missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}, shape mismatches {shapes[:4]}{hint}"
        )
    net.load_state_dict(sd)


class MORPHBackbone(Backbone):
    """MORPH ``model=Ti|S|M|Lt|L|XL`` (+ overrides such as ``dim``/``depth`` for tiny test models)."""

    family = "morph"
    site_map = MORPH_SITES
    token_layout = "grid"
    patch_embed_path = "model.patch_embedding.projection"
    extra_site_kinds = tuple(MORPH_EXTRA_SITES)

    def __init__(self, model: str = "Ti", pretrained: bool = True, weights: str | None = None,
                 axes: Sequence[str] | str = "auto", **overrides: Any):
        cfg = config_for(model, **overrides)
        if axes in (None, "auto"):  # the time attention can only run when the model takes > 1 frame
            axes = list(AXES) if cfg.max_ar > 1 else ["d", "h", "w"]
        axes = [str(a).lower() for a in ([axes] if isinstance(axes, str) else axes)]
        bad = [a for a in axes if a not in AXES]
        if bad or not axes:
            raise ValueError(f"axes={axes}: choose a non-empty subset of {list(AXES)} (or auto)")
        path = resolve_weights(model, pretrained, weights)  # before building: fail fast, without allocating XL
        net = ViT3DRegression(cfg)
        if path is not None:
            load_morph_weights(net, path)
        tag = None if path is None else (f"file:{Path(weights).name}" if weights and not str(weights).startswith("hf:")
                                          else f"hf:{path.name}")
        super().__init__(net, model, tag, {**{k: v for k, v in overrides.items() if v is not None}, "axes": axes})
        self.axes = axes
        self.cfg = cfg
        self.feature_dim = cfg.dim
        self.patch_size = 8
        self.data_config = {"layout": "UPTF-7 (B, t, F, C, D, H, W)", "max_fields": 3, "max_components": 3,
                            "spatial_multiple": 8, "max_ar": cfg.max_ar}

    def blocks_container(self) -> nn.Module:
        return self.model.transformer_blocks

    def blocks_path(self) -> str:
        return "model.transformer_blocks"

    def block_sites(self, i: int):
        table: dict[str, Any] = super().block_sites(i)
        prefix = f"{self.blocks_path()}.{i}.axial_attn"
        attn = unwrap(unwrap(self.blocks_container()[i]).axial_attn)
        for kind in ("q", "k", "v", "qkv", "o"):
            table[kind] = []
        for ax in self.axes:
            mha = unwrap(getattr(attn, f"attn_{ax}"))
            d = unwrap(mha.qkv).out_features // 3
            table["qkv"].append((mha, "qkv", None, f"{prefix}.attn_{ax}.qkv"))
            for j, kind in enumerate("qkv"):
                table[kind].append((mha, "qkv", slice(j * d, (j + 1) * d), f"{prefix}.attn_{ax}.qkv[{kind}]"))
            table["o"].append((mha, "o", None, f"{prefix}.attn_{ax}.o"))
        return table

    def extra_sites(self, kind: str) -> list[Site]:
        rel = MORPH_EXTRA_SITES[kind]
        parent: nn.Module = self.model
        parts = rel.split(".")
        for p in parts[:-1]:
            parent = unwrap(getattr(parent, p))
        if kind == "conv":  # every Conv3d of the stack
            stack = unwrap(getattr(parent, parts[-1]))
            return [Site(kind, -1, stack, str(j), f"model.{rel}.{j}") for j, m in enumerate(stack)
                    if isinstance(unwrap(m), nn.Conv3d)]
        return [Site(kind, -1, parent, parts[-1], f"model.{rel}")]

    # ------------------------------------------------------------------ forward
    def forward_all(self, vol: torch.Tensor):
        return self.model(vol)

    def forward_features(self, vol: torch.Tensor) -> torch.Tensor:
        return self.model(vol)[1]

    def forward(self, vol: torch.Tensor) -> torch.Tensor:
        return self.model(vol)[2]

    # ------------------------------------------------------------------ parameter roles
    def tuning_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """MORPH's fine-tuning roles over the base parameters: ``norm`` (every LayerNorm, blocks and
        decoder), ``pos`` (the positional table), ``embed`` (conv, projection, field attention),
        ``decoder`` (decoder.linear), ``blocks`` (the rest)."""
        groups: dict[str, list] = {"norm": [], "pos": [], "embed": [], "decoder": [], "blocks": []}
        from zoo.adapters.base import AdapterModule

        norms = {id(p) for m in self.model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        added = {id(p) for m in self.model.modules() if isinstance(m, AdapterModule)
                 for n, p in m.named_parameters() if not (n == "base" or n.startswith("base."))}
        for name, p in self.model.named_parameters():
            name = name.replace(".base.", ".")
            if id(p) in added:
                continue
            if id(p) in norms:
                groups["norm"].append((name, p))
            elif name.startswith("pos_encoding."):
                groups["pos"].append((name, p))
            elif name.startswith("patch_embedding."):
                groups["embed"].append((name, p))
            elif name.startswith("decoder."):
                groups["decoder"].append((name, p))
            else:
                groups["blocks"].append((name, p))
        return groups


__all__ = ["MORPHBackbone", "RELEASED", "HF_REPO", "SIZES", "resolve_weights", "load_morph_weights"]
