"""A segmentation_models_pytorch U-Net as a second image-to-image restoration backbone.

``smp.Unet(encoder, encoder_weights=None, in_channels=3, classes=3)`` (Ronneberger et al., MICCAI
2015; the smp implementation, not a fork) used as a restoration network: ``forward(x) = x +
unet(x)`` (a global input residual, as NAFNet) with the input padded (edge-replicated) to a
multiple of ``2**encoder_depth`` and the output cropped back. Encoder weights: none (random) or a
local file (``weights=``, this model's state dict); the ImageNet encoders smp downloads are not
used (no network here).

Sites (:mod:`zoo.sites`): the blocks are the encoder's residual blocks that the forward uses
(``encoder.layerX.Y``, X < ``encoder_depth``, of the ResNet encoders) then the decoder blocks (``decoder.blocks.i``); ``conv1``/``conv2`` are each
block's two dense 3×3 convolutions (for a decoder block the conv inside its Conv-BN-ReLU). There
is no attention, token sequence or LayerNorm: adapters needing those are refused by
:func:`zoo.sites.find_sites`. Other convolutions (the stem, downsample shortcuts, the output conv)
are reachable by name (CoLoRA's ``modules``).

BatchNorm: a frozen BatchNorm stays in eval mode while the model trains (its running statistics
belong to the frozen base; updating them would change the base outside the adapter artifact).
BatchNorms with trainable parameters (``adapter=full``) train as usual.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zoo.backbones.base import Backbone, _resolve
from zoo.backbones.weights import WeightsUnavailableError, load_state_dict_file
from zoo.sites import unwrap

UNET_SITES = {"conv1": "conv1", "conv2": "conv2"}


class UNetBackbone(Backbone):
    """``zoo.create_backbone("unet", encoder="resnet18")``: an image-to-image restoration model."""

    family = "unet"
    image_to_image = True
    site_map = UNET_SITES
    token_layout = "nchw"

    def __init__(self, encoder: str = "resnet18", encoder_depth: int = 5,
                 decoder_channels: list[int] | None = None, img_channel: int = 3, residual: bool = True,
                 weights: str | None = None, pretrained: bool = False, model: str | None = None,
                 img_size: int | None = None):
        import segmentation_models_pytorch as smp

        if pretrained and not weights:
            raise WeightsUnavailableError("the U-Net backbone does not download encoder weights here: give a local "
                                          "file with backbone.weights=... or use backbone.pretrained=false")
        depth = int(encoder_depth)
        decoder_channels = list(decoder_channels or [256, 128, 64, 32, 16][-depth:])
        try:
            net = smp.Unet(encoder, encoder_depth=depth, encoder_weights=None, in_channels=img_channel,
                           classes=img_channel, decoder_channels=decoder_channels)
        except KeyError as e:
            raise ValueError(f"unknown smp encoder {encoder!r} ({e}); e.g. resnet18, resnet34") from None
        for k in range(depth, 5):  # smp keeps every ResNet stage; drop those a shallower U-Net never runs
            if isinstance(getattr(net.encoder, f"layer{k}", None), nn.Module):
                setattr(net.encoder, f"layer{k}", nn.Identity())
        if weights:
            sd = load_state_dict_file(weights)
            missing, unexpected = net.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise WeightsUnavailableError(f"{weights} does not fit this U-Net: missing {missing[:5]}, "
                                              f"unexpected {unexpected[:5]}")
        build = dict(encoder=encoder, encoder_depth=depth, decoder_channels=decoder_channels,
                     img_channel=img_channel, residual=bool(residual))
        super().__init__(net, model or f"unet_{encoder}", f"file:{Path(weights).name}" if weights else None, build)
        self.feature_dim = self.img_channel = img_channel
        self.residual, self.multiple = bool(residual), 2 ** depth
        size = int(img_size or 256)
        self.data_config = dict(input_size=(img_channel, size, size), mean=(0.0,) * img_channel, std=(1.0,) * img_channel)
        # encoder stages the forward uses: layer1 .. layer{depth-1} (the stem is stage 1)
        used = {f"encoder.layer{k}" for k in range(1, depth)}
        self._paths = [n for n, m in net.named_modules()
                       if (n.rsplit(".", 1)[0] in used) or (n.startswith("decoder.blocks.") and n.count(".") == 2)]
        for p in self._paths:
            blk = net.get_submodule(p)
            if not all(hasattr(blk, a) for a in ("conv1", "conv2")):
                raise ValueError(f"smp encoder {encoder!r}: block {p} has no conv1/conv2; use a ResNet encoder")

    # ------------------------------------------------------------------ structure
    def blocks_path(self) -> str:
        return "model"

    def blocks_container(self) -> list:
        return [self.model.get_submodule(p) for p in self._paths]

    def block_sites(self, i: int) -> dict[str, tuple[nn.Module, str, slice | None, str]]:
        block = unwrap(self.model.get_submodule(self._paths[i]))
        table = {}
        for kind, rel in self.site_map.items():
            parent, attr = _resolve(block, rel)
            target = unwrap(getattr(parent, attr))
            if isinstance(target, nn.Sequential):  # decoder Conv2dReLU: (conv, bn, relu)
                parent, attr = target, "0"
                rel = f"{rel}.0"
            table[kind] = (parent, attr, None, f"model.{self._paths[i]}.{rel}")
        return table

    # ------------------------------------------------------------------ forward
    def train(self, mode: bool = True) -> "UNetBackbone":
        super().train(mode)
        if mode:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        k = self.multiple
        xp = F.pad(x, (0, (k - w % k) % k, 0, (k - h % k) % k), mode="replicate")
        out = self.model(xp)
        if self.residual:
            out = out + xp
        return out[..., :h, :w]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)
