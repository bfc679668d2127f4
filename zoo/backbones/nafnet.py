"""NAFNet (Chen, Chu, Zhang, Sun, "Simple Baselines for Image Restoration", ECCV 2022) as a zoo backbone.

The architecture follows megvii-research/NAFNet@2b4af71 ``basicsr/models/archs/NAFNet_arch.py``
(described in the team spec ``reference/audio_seg_restoration.md`` (internal, not shipped) §3.3), with the same module
names, so an official checkpoint's ``params`` state dict loads unchanged (``weights=``):

* ``LayerNorm2d``: per pixel, mean and variance over the channels, eps 1e-6, per-channel affine.
  (The reference writes its backward by hand; plain autograd computes the same gradient.)
* ``SimpleGate``: split the channels in two halves, ``x1 · x2``.
* ``NAFBlock(c)``: ``y = inp + β·conv3(SCA(SG(conv2(conv1(norm1(inp))))))`` with conv1 a 1×1 c→2c,
  conv2 a 3×3 depthwise conv on 2c channels, SCA ``x · conv1×1(avgpool(x))`` (no sigmoid), conv3 a
  1×1 c→c; then ``out = y + γ·conv5(SG(conv4(norm2(y))))`` (conv4 1×1 c→2c, conv5 1×1 c→c).
  β = γ = 0 at init, so every block starts as the identity.
* ``NAFNet``: 3×3 intro conv, per encoder stage NAFBlocks then a 2×2 stride-2 conv (c→2c), middle
  blocks, per decoder stage a bias-free 1×1 conv (c→2c) + PixelShuffle(2), the encoder skip added,
  NAFBlocks; a 3×3 ending conv plus the global input residual. Inputs are zero-padded (bottom/right)
  to a multiple of ``2**len(enc_blk_nums)`` and the output cropped back.

Layouts (``layout=``, from the reference's ``options/train``): ``sidd`` enc [2,2,4,8], middle 12,
dec [2,2,2,2] (29.16M parameters at width 32); ``gopro`` enc [1,1,1,28], middle 1, dec [1,1,1,1]
(17.11M at width 32); ``tiny`` enc [1,1], middle 1, dec [1,1] (tests and CPU demos); or
``custom`` with ``enc_blk_nums``/``middle_blk_num``/``dec_blk_nums`` given.

A restoration backbone is the whole image-to-image model: ``forward(x)`` returns the restored
image (same shape as ``x``); there is no pooled feature and no head.

Sites (:mod:`zoo.sites`), per NAFBlock in forward order (encoders, middle, decoders):

==============  ==========  =================================================
``norm1/norm2``  norm1/2     LayerNorm2d before each branch
``conv_pw``      conv1       1×1 c→2c, the spatial branch's pointwise expansion
``conv_dw``      conv2       3×3 depthwise (groups = 2c)
``conv_sca``     sca.1       1×1 c→c of the simplified channel attention
``o``            conv3       1×1 c→c, the spatial branch's output projection
``fc1/fc2``      conv4/5     the FFN branch's 1×1 convs (a per-pixel MLP)
==============  ==========  =================================================

There is no ``q/k/v/qkv`` (no attention), no ``attn``/``mlp`` sub-module (the branches are
sequences of ops inside ``NAFBlock.forward``, kept so to keep the reference's state-dict names) and
no ``tokens``: adapters that need them are refused by :func:`zoo.sites.find_sites` with the list of
sites above. The convolutions outside the blocks (``model.intro``, ``model.ending``,
``model.downs.*``, ``model.ups.*.0``) are reachable by name (CoLoRA's ``modules`` patterns).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zoo.backbones.base import Backbone, _resolve
from zoo.backbones.weights import WeightsUnavailableError, load_state_dict_file
from zoo.sites import unwrap

LAYOUTS: dict[str, tuple[list[int], int, list[int]]] = {
    "sidd": ([2, 2, 4, 8], 12, [2, 2, 2, 2]),
    "gopro": ([1, 1, 1, 28], 1, [1, 1, 1, 1]),
    "tiny": ([1, 1], 1, [1, 1]),
}

NAF_SITES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "conv_pw": "conv1",
    "conv_dw": "conv2",
    "conv_sca": "sca.1",
    "o": "conv3",
    "fc1": "conv4",
    "fc2": "conv5",
}


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW map (NAFNet's ``LayerNorm2d``)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) / (var + self.eps).sqrt()
        return self.weight.view(1, -1, 1, 1) * y + self.bias.view(1, -1, 1, 1)


class SimpleGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return x1 * x2


class NAFBlock(nn.Module):
    def __init__(self, c: int, dw_expand: int = 2, ffn_expand: int = 2, drop_out_rate: float = 0.0):
        super().__init__()
        dw = c * dw_expand
        self.conv1 = nn.Conv2d(c, dw, 1, bias=True)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw, bias=True)
        self.conv3 = nn.Conv2d(dw // 2, c, 1, bias=True)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1, bias=True))
        self.sg = SimpleGate()
        ffn = ffn_expand * c
        self.conv4 = nn.Conv2d(c, ffn, 1, bias=True)
        self.conv5 = nn.Conv2d(ffn // 2, c, 1, bias=True)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.dropout1 = nn.Dropout(drop_out_rate) if drop_out_rate > 0 else nn.Identity()
        self.dropout2 = nn.Dropout(drop_out_rate) if drop_out_rate > 0 else nn.Identity()
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(self.norm1(inp)))
        x = self.sg(x)
        x = x * self.sca(x)
        x = self.dropout1(self.conv3(x))
        y = inp + x * self.beta
        x = self.conv5(self.sg(self.conv4(self.norm2(y))))
        return y + self.dropout2(x) * self.gamma


class NAFNet(nn.Module):
    def __init__(self, img_channel: int = 3, width: int = 16, middle_blk_num: int = 1,
                 enc_blk_nums: list[int] = (), dec_blk_nums: list[int] = (), drop_out_rate: float = 0.0):
        super().__init__()
        if len(enc_blk_nums) != len(dec_blk_nums):
            raise ValueError(f"NAFNet needs as many decoder as encoder stages (enc_blk_nums={list(enc_blk_nums)}, "
                             f"dec_blk_nums={list(dec_blk_nums)})")
        self.intro = nn.Conv2d(img_channel, width, 3, padding=1, bias=True)
        self.ending = nn.Conv2d(width, img_channel, 3, padding=1, bias=True)
        self.encoders, self.decoders = nn.ModuleList(), nn.ModuleList()
        self.middle_blks, self.ups, self.downs = nn.Sequential(), nn.ModuleList(), nn.ModuleList()
        chan = width
        for num in enc_blk_nums:
            self.encoders.append(nn.Sequential(*[NAFBlock(chan, drop_out_rate=drop_out_rate) for _ in range(num)]))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, 2))
            chan *= 2
        self.middle_blks = nn.Sequential(*[NAFBlock(chan, drop_out_rate=drop_out_rate) for _ in range(middle_blk_num)])
        for num in dec_blk_nums:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, chan * 2, 1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(chan, drop_out_rate=drop_out_rate) for _ in range(num)]))
        self.padder_size = 2 ** len(self.encoders)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        _, _, h, w = inp.shape
        p = self.padder_size
        inp = F.pad(inp, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.intro(inp)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle_blks(x)
        for decoder, up, skip in zip(self.decoders, self.ups, skips[::-1]):
            x = decoder(up(x) + skip)
        x = self.ending(x) + inp
        return x[:, :, :h, :w]


def block_paths(net: NAFNet) -> list[str]:
    """Module paths of every NAFBlock in forward order (relative to the NAFNet)."""
    out = [f"encoders.{s}.{j}" for s, stage in enumerate(net.encoders) for j in range(len(stage))]
    out += [f"middle_blks.{j}" for j in range(len(net.middle_blks))]
    out += [f"decoders.{s}.{j}" for s, stage in enumerate(net.decoders) for j in range(len(stage))]
    return out


class NAFNetBackbone(Backbone):
    """``zoo.create_backbone("nafnet", width=32, layout="sidd")``: an image-to-image restoration model."""

    family = "nafnet"
    image_to_image = True  # forward(x) is the restored image (task=restoration checks this)
    site_map = NAF_SITES
    token_layout = "nchw"  # a CNN: no token sequence, no 'tokens' site

    def __init__(self, width: int = 32, layout: str = "sidd", enc_blk_nums: list[int] | None = None,
                 middle_blk_num: int | None = None, dec_blk_nums: list[int] | None = None, img_channel: int = 3,
                 drop_out_rate: float = 0.0, weights: str | None = None, pretrained: bool = False,
                 model: str | None = None, img_size: int | None = None):
        """``model``: the name recorded in artifacts (default ``nafnet_w<width>_<layout>``); ``img_size``:
        the nominal input size of ``data_config`` (NAFNet takes any size)."""
        if layout not in (*LAYOUTS, "custom"):
            raise ValueError(f"unknown NAFNet layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}, custom")
        if pretrained and not weights:
            raise WeightsUnavailableError(
                "NAFNet has no weights hub here: give a local file with backbone.weights=/path/NAFNet-SIDD-width32.pth "
                "(the official checkpoints' 'params' state dict, or a .safetensors), or use backbone.pretrained=false")
        enc, mid, dec = LAYOUTS.get(layout, (None, None, None))
        enc = list(enc_blk_nums) if enc_blk_nums is not None else enc
        mid = int(middle_blk_num) if middle_blk_num is not None else mid
        dec = list(dec_blk_nums) if dec_blk_nums is not None else dec
        if enc is None or mid is None or dec is None:
            raise ValueError("layout=custom needs enc_blk_nums, middle_blk_num and dec_blk_nums")
        if int(width) < 1 or int(width) % 2:
            raise ValueError(f"NAFNet width must be a positive even number, got {width}")
        net = NAFNet(img_channel, int(width), mid, enc, dec, float(drop_out_rate))
        if weights:
            load_nafnet_weights(net, weights)
        build = dict(width=int(width), layout=layout, enc_blk_nums=enc, middle_blk_num=mid, dec_blk_nums=dec,
                     img_channel=img_channel, drop_out_rate=float(drop_out_rate))
        tag = f"file:{Path(weights).name}" if weights else None
        super().__init__(net, model or f"nafnet_w{int(width)}_{layout}", tag, build)
        self.feature_dim = img_channel
        self.img_channel = img_channel
        size = int(img_size or 256)
        self.data_config = dict(input_size=(img_channel, size, size), mean=(0.0,) * img_channel,
                                std=(1.0,) * img_channel)
        self._paths = block_paths(net)

    # ------------------------------------------------------------------ structure
    def blocks_path(self) -> str:
        return "model"

    def blocks_container(self) -> nn.ModuleList:
        # a fresh, unregistered list: the blocks stay where the reference keeps them
        return _Blocks([self.model.get_submodule(p) for p in self._paths])

    def block_sites(self, i: int) -> dict[str, tuple[nn.Module, str, slice | None, str]]:
        prefix = f"model.{self._paths[i]}"
        block = unwrap(self.model.get_submodule(self._paths[i]))
        table = {}
        for kind, rel in self.site_map.items():
            parent, attr = _resolve(block, rel)
            table[kind] = (parent, attr, None, f"{prefix}.{rel}")
        return table

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _Blocks(list):
    """A plain list of blocks (``len`` and indexing are all ``Backbone`` needs)."""


def load_nafnet_weights(net: NAFNet, path: str) -> None:
    """Load an official NAFNet checkpoint (``{'params': state_dict}``) or a plain / safetensors state dict."""
    sd = load_state_dict_file(path)
    for key in ("params", "params_ema"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    own = net.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise WeightsUnavailableError(f"{path} does not fit this NAFNet (check width/layout): shapes differ, "
                                      f"e.g. {'; '.join(wrong[:3])}")
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"{path} does not fit this NAFNet (check width/layout): missing {missing[:6]}"
            f"{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")


__all__ = ["NAFNet", "NAFBlock", "NAFNetBackbone", "LayerNorm2d", "SimpleGate", "LAYOUTS", "load_nafnet_weights"]
