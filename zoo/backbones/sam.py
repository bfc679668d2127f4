"""SAM's image encoder (timm ``samvit_*``) as a zoo backbone, and the mask decoder as a second tower.

Kirillov et al., "Segment Anything", ICCV 2023. The encoder is timm's ``VisionTransformerSAM``
(tokens NHWC, windowed attention with decomposed relative positions, global blocks, a conv neck to
256 channels). Linear sites act on the last axis, so linear-site adapters need no special case;
there is no token sequence, so token-site adapters (prompts) refuse.

Weights come from one original ``sam_vit_{b,l,h}_*.pth`` (``weights=``; keys ``image_encoder.*`` are
mapped with timm's own ``checkpoint_filter_fn``: strip the prefix, ``mlp.lin* -> mlp.fc*``) or from
timm's ``.sa1b`` tags. Inputs other than the checkpoint's size resample, once at load time, as SAMed
does (``load_from`` in hitachinsk/SAMed ``segment_anything/build_sam.py``):

* the absolute position grid ``pos_embed (1, G, G, C)``: bilinear, ``align_corners=False``;
* every ``rel_pos_{h,w}`` table whose length differs (the global blocks: ``2*G - 1``): linear along
  the length (SAMed's 2-D bilinear on ``(1, 1, L, C)`` with the width kept is exactly this).

:class:`SamDecoderTower` exposes the mask decoder's two-way transformer with the same site names
(``q k v o`` of self-attention and both cross-attentions, ``fc1 fc2``, ``mlp``) for ``tower=decoder``.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.backbones.base import Backbone
from zoo.backbones.vit import TimmBackbone, create_timm_model
from zoo.backbones.weights import WeightsUnavailableError, load_state_dict_file
from zoo.sites import unwrap

SAM_LN_EPS = 1e-6  # segment_anything's encoder LayerNorms; timm's samvit default would be 1e-5


def is_sam_checkpoint(state: dict[str, torch.Tensor]) -> bool:
    """An original segment_anything state dict (``image_encoder.* prompt_encoder.* mask_decoder.*``)."""
    return "image_encoder.patch_embed.proj.weight" in state


def encoder_state_from_sam(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a SAM checkpoint's ``image_encoder.*`` onto timm samvit keys (timm's own filter)."""
    from timm.models.vision_transformer_sam import checkpoint_filter_fn

    return checkpoint_filter_fn(state, None)


def resample_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(1, H, W, C) -> (1, h, w, C)``, bilinear with ``align_corners=False`` (SAMed ``load_from``)."""
    if tuple(pos.shape[1:3]) == tuple(grid):
        return pos
    out = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=tuple(grid), mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).to(pos.dtype)


def resample_rel_pos(rel: torch.Tensor, length: int) -> torch.Tensor:
    """``(L, C) -> (length, C)``: linear interpolation along L (``align_corners=False``)."""
    if rel.shape[0] == length:
        return rel
    out = F.interpolate(rel.T[None].float(), size=length, mode="linear", align_corners=False)
    return out[0].T.contiguous().to(rel.dtype)


def fit_encoder_state(state: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """Resample ``pos_embed`` and ``rel_pos_*`` of ``state`` to the shapes of ``net``."""
    own = net.state_dict()
    out = dict(state)
    for k, v in state.items():
        if k not in own or own[k].shape == v.shape:
            continue
        if k == "pos_embed" and v.ndim == 4:
            out[k] = resample_pos_embed(v, tuple(own[k].shape[1:3]))
        elif ".rel_pos_" in k and v.ndim == 2 and v.shape[1] == own[k].shape[1]:
            out[k] = resample_rel_pos(v, own[k].shape[0])
    return out


def load_encoder(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load a timm- or SAM-format encoder state into ``net`` (resampling positions)."""
    if is_sam_checkpoint(state):
        state = encoder_state_from_sam(state)
    state = fit_encoder_state({k: v for k, v in state.items() if not k.startswith("head.")}, net)
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("head.")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise WeightsUnavailableError(
            f"{source} does not fit this SAM encoder ({type(net).__name__}, dim {net.embed_dim}, "
            f"depth {len(net.blocks)}): pick the model that matches the file (samvit_base/large/huge_patch16); "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {shapes[:3]}"
        )
    net.load_state_dict(state, strict=False)


class SAMBackbone(TimmBackbone):
    """``forward_features`` gives the neck's feature map (B, 256, H/16, W/16); ``forward`` its mean.

    ``weights``: a SAM checkpoint (``sam_vit_b_01ec64.pth``) or a timm samvit file; the file's
    prompt-encoder and mask-decoder tensors are read by :class:`zoo.backbones.sam_decoder.SamSegmenter` from the same
    path (``self.weights_path``). ``img_size`` other than the file's resamples positions (SAMed).
    """

    family = "sam"
    token_layout = "nhwc"

    def __init__(
        self,
        model: str = "samvit_base_patch16",
        pretrained: bool = True,
        weights: str | None = None,
        img_size: int | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=SAM_LN_EPS))
        native = None
        if pretrained and not weights and img_size is not None:
            # timm's hub loader cannot resample rel-pos tables: load at the native size, then fit
            native = create_timm_model(model, True, None, **{k: v for k, v in kwargs.items()})
        super().__init__(model, pretrained and native is None and not weights, None, img_size, **kwargs)
        self.build_kwargs.pop("norm_layer", None)
        self.weights_path = str(weights) if weights else None
        if native is not None:
            load_encoder(self.model, native.state_dict(), f"timm {model}")
            del native
        if weights:
            load_encoder(self.model, load_state_dict_file(weights), str(weights))
        from zoo.backbones.vit import weights_tag

        self.weights_tag = weights_tag(model, pretrained, weights)
        cfg = self.model.pretrained_cfg
        size = self.model.patch_embed.img_size[0]
        self.img_size = size
        self.grid_size = tuple(self.model.patch_embed.grid_size)
        self.out_chans = self.model.num_features
        self.data_config = dict(
            input_size=(3, size, size),
            mean=cfg.get("mean", (0.485, 0.456, 0.406)),
            std=cfg.get("std", (0.229, 0.224, 0.225)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x).mean(dim=(2, 3))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def block_outputs(self, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """NCHW outputs of blocks ``indices`` (before the neck), for multi-scale decoders."""
        uniq = sorted(set(indices))
        feats = self.model.forward_intermediates(x, indices=uniq, intermediates_only=True, norm=False)
        by_index = dict(zip(uniq, feats))
        return [by_index[i] for i in indices]


DECODER_ATTNS = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
DECODER_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}


class SamDecoderTower(Backbone):
    """A site view of SAM's ``TwoWayTransformer`` (the mask decoder), for ``tower=decoder``.

    Blocks are the transformer's layers (``TwoWayAttentionBlock``, 2 in SAM). In each block the
    kinds ``q k v o`` name the projections of all three attentions (self-attention, token->image
    and image->token cross-attention; the cross-attentions' internal width is half), ``fc1 fc2``
    the MLP's Linears and ``mlp`` the MLP. The final token->image attention after the layers is
    not a site (SAMed_s adapts the layers only). The decoder is post-norm and its attentions take
    (q, k, v) separately, so ``attn norm1 norm2 qkv tokens`` do not exist here.

    The view is not part of the model's module tree; wrappers go into the decoder itself, and the
    adapters are recorded on the image encoder's backbone (``adapters`` is the same list).
    """

    family = "sam_decoder"
    token_layout = "two-way (decoder tokens + image tokens)"

    def __init__(self, transformer: nn.Module, encoder: Backbone):
        super().__init__(transformer, "sam_mask_decoder.transformer", None, {})
        self.__dict__["adapters"] = encoder.adapters
        self.feature_dim = transformer.embedding_dim

    def blocks_container(self) -> nn.Module:
        return self.model.layers

    def blocks_path(self) -> str:
        return "mask_decoder.transformer.layers"

    def block_sites(self, i: int):
        layer = unwrap(self.model.layers[i])
        prefix = f"{self.blocks_path()}.{i}"
        table: dict[str, Any] = {}
        for kind, proj in DECODER_PROJ.items():
            table[kind] = [(unwrap(getattr(layer, a)), proj, None, f"{prefix}.{a}.{proj}") for a in DECODER_ATTNS]
        mlp = unwrap(layer.mlp)
        table["fc1"] = (mlp, "lin1", None, f"{prefix}.mlp.lin1")
        table["fc2"] = (mlp, "lin2", None, f"{prefix}.mlp.lin2")
        table["mlp"] = (layer, "mlp", None, f"{prefix}.mlp")
        return table

    def forward_features(self, x):  # pragma: no cover - a view, never called
        raise RuntimeError("SamDecoderTower is a site view; run the SamSegmenter")

    def fingerprint(self) -> str:  # the artifact's fingerprint is the image encoder's
        raise RuntimeError("SamDecoderTower has no fingerprint of its own")
