"""The non-SAM alternative head: an smp decoder over the image encoder's intermediate features.

SAM's encoder is plain (every block at stride 16), so the head reads four block outputs (the
global-attention blocks by default, as ViTDet / DPT do with ViTs) and:

* ``dpt``: ``smp``'s ``DPTDecoder`` (Ranftl et al., "Vision Transformers for Dense Prediction",
  ICCV 2021) reassembles them to strides 4/8/16/32 with its own learned resampling, fuses, and
  ``DPTSegmentationHead`` upsamples to the input size;
* ``fpn``: ``smp``'s ``FPNDecoder`` (Kirillov et al., Panoptic FPN) over a *simple feature pyramid*
  made by resizing the four maps bilinearly to strides 4/8/16/32 (a reconstruction: ViTDet uses
  learned deconvolutions), then ``smp``'s ``SegmentationHead`` (x4 upsampling).

* ``unet``: ``smp``'s ``UnetDecoder`` (Ronneberger et al., MICCAI 2015) needs a hierarchical encoder;
  :class:`SimpleFeaturePyramid` builds one from the *last* block's single-scale map as ViTDet does
  (Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection", ECCV 2022):
  stride 4 = two 2x2 stride-2 deconvolutions (LayerNorm + GELU between), stride 8 = one, stride 16 =
  the map itself, stride 32 = 2x2 max-pooling; each level then a 1x1 conv + LayerNorm and a 3x3 conv +
  LayerNorm to ``channels``. The UNet's fifth skip (stride 2, which ViTDet does not build) is three
  deconvolutions, the same pattern extended (a reconstruction). smp's ``SegmentationHead`` (3x3 conv)
  at the input resolution.

Output: ``(B, K+1, H, W)`` class logits at the input resolution. Everything in the head trains;
the encoder is adapted by the zoo adapters as usual.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.backbones.sam import SAMBackbone
from zoo.heads import register_head

SMP_DECODERS = ("dpt", "fpn", "unet")


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid from one stride-16 map ``(B, dim, h, w)``: ``scales`` are the
    up-sampling factors (8 = stride 2, 4, 2, 1, 0.5 = stride 32); returns the maps finest first."""

    def __init__(self, dim: int, channels: int, scales: tuple[float, ...] = (8.0, 4.0, 2.0, 1.0, 0.5)):
        super().__init__()
        from timm.layers import LayerNorm2d

        self.scales = tuple(float(s) for s in scales)
        self.stages = nn.ModuleList()
        for scale in self.scales:
            layers: list[nn.Module] = []
            width = dim
            if scale > 1:
                n = int(round(math.log2(scale)))
                if 2 ** n != scale:
                    raise ValueError(f"pyramid scale {scale} is not a power of 2")
                for j in range(n):
                    layers.append(nn.ConvTranspose2d(width, width // 2, 2, stride=2))
                    width //= 2
                    if j < n - 1:
                        layers += [LayerNorm2d(width), nn.GELU()]
            elif scale == 0.5:
                layers.append(nn.MaxPool2d(2, stride=2))
            elif scale != 1:
                raise ValueError(f"pyramid scale {scale}: valid are powers of 2 >= 1 and 0.5")
            layers += [nn.Conv2d(width, channels, 1, bias=False), LayerNorm2d(channels),
                       nn.Conv2d(channels, channels, 3, padding=1, bias=False), LayerNorm2d(channels)]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [stage(x) for stage in self.stages]


def default_indices(backbone: SAMBackbone) -> list[int]:
    """The global-attention blocks (window size 0); else four evenly spaced blocks."""
    blocks = backbone.blocks()
    glob = [i for i, b in enumerate(blocks) if getattr(b, "window_size", 1) == 0]
    if len(glob) >= 4:
        return glob[-4:]
    depth = len(blocks)
    # four evenly spaced blocks (a shallow encoder repeats some: each feeds one pyramid level)
    return [max(0, round(depth * (j + 1) / 4) - 1) for j in range(4)]


@register_head("smp_unet")
@register_head("smp_fpn")
@register_head("smp_dpt")
class SmpSegmenter(nn.Module):
    """``backbone`` (SAM encoder) + an smp decoder (``dpt`` | ``fpn`` | ``unet``) -> ``(B, K+1, H, W)``."""

    def __init__(self, backbone: SAMBackbone, num_classes: int, decoder: str = "dpt", indices: list[int] | None = None,
                 channels: int = 256):
        super().__init__()
        if decoder not in SMP_DECODERS:
            raise ValueError(f"unknown smp decoder {decoder!r}; valid: {', '.join(SMP_DECODERS)}")
        self.backbone, self.num_classes, self.decoder_name = backbone, int(num_classes), decoder
        self.channels = int(channels)
        if decoder == "unet":
            self.indices = list(indices) if indices is not None else [backbone.depth - 1]
            if len(self.indices) != 1:
                raise ValueError(f"the smp UNet head reads 1 block output (its pyramid is built from it); got {self.indices}")
        else:
            self.indices = list(indices) if indices is not None else default_indices(backbone)
            if len(self.indices) != 4:
                raise ValueError(f"the smp head reads 4 block outputs; got indices {self.indices} "
                                 f"(the encoder has {backbone.depth} blocks)")
        dim = backbone.model.embed_dim
        out = self.num_classes + 1
        if decoder == "dpt":
            from segmentation_models_pytorch.decoders.dpt.decoder import DPTDecoder, DPTSegmentationHead

            self.decoder = DPTDecoder(encoder_out_channels=[dim] * 4, encoder_output_strides=[16] * 4,
                                      encoder_has_prefix_tokens=False, readout="ignore",
                                      intermediate_channels=[channels // 4, channels // 2, channels, channels],
                                      fusion_channels=channels)
            self.head = DPTSegmentationHead(channels, out, upsampling=2)
        elif decoder == "unet":
            from segmentation_models_pytorch.base import SegmentationHead
            from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder

            if dim % 8:
                raise ValueError(f"the UNet pyramid halves the width 3 times: embed_dim {dim} must be a multiple of 8")
            self.pyramid = SimpleFeaturePyramid(dim, channels)
            # smp's defaults (256, 128, 64, 32, 16) for channels=256, scaled with channels
            dec = [max(8, channels >> i) for i in range(5)]
            self.decoder = UnetDecoder(encoder_channels=[3] + [channels] * 5, decoder_channels=dec, n_blocks=5)
            self.head = SegmentationHead(dec[-1], out, kernel_size=3)
        else:
            from segmentation_models_pytorch.base import SegmentationHead
            from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder

            seg = max(32, channels // 64 * 32)  # smp's GroupNorm(32, .) needs a multiple of 32
            self.decoder = FPNDecoder(encoder_channels=[3, dim, dim, dim, dim], encoder_depth=4,
                                      pyramid_channels=channels, segmentation_channels=seg, dropout=0.0)
            self.head = SegmentationHead(seg, out, kernel_size=1, upsampling=4)

    def head_spec(self) -> dict:
        return {"type": f"smp_{self.decoder_name}", "num_classes": self.num_classes, "indices": self.indices,
                "channels": self.channels}

    @classmethod
    def from_spec(cls, backbone: SAMBackbone, spec: dict) -> "SmpSegmenter":
        return cls(backbone, int(spec["num_classes"]), decoder=spec["type"].split("_", 1)[1],
                   indices=spec.get("indices"), channels=int(spec.get("channels", 256)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.block_outputs(x, self.indices)
        if self.decoder_name == "unet":  # [input, strides 2, 4, 8, 16, 32]: smp's encoder layout
            return self.head(self.decoder([x, *self.pyramid(feats[0])]))
        if self.decoder_name == "dpt":
            return self.head(self.decoder(feats, [None] * 4))
        g = feats[0].shape[-1]
        pyramid = [F.interpolate(f, size=(g * 16 // s, g * 16 // s), mode="bilinear", align_corners=False)
                   for f, s in zip(feats, (4, 8, 16, 32))]
        return self.head(self.decoder([x, *pyramid]))
