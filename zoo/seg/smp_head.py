"""The non-SAM alternative head: an smp decoder over the image encoder's intermediate features.

SAM's encoder is plain (every block at stride 16), so the head reads four block outputs (the
global-attention blocks by default, as ViTDet / DPT do with ViTs) and:

* ``dpt``: ``smp``'s ``DPTDecoder`` (Ranftl et al., "Vision Transformers for Dense Prediction",
  ICCV 2021) reassembles them to strides 4/8/16/32 with its own learned resampling, fuses, and
  ``DPTSegmentationHead`` upsamples to the input size;
* ``fpn``: ``smp``'s ``FPNDecoder`` (Kirillov et al., Panoptic FPN) over a *simple feature pyramid*
  made by resizing the four maps bilinearly to strides 4/8/16/32 (a reconstruction: ViTDet uses
  learned deconvolutions), then ``smp``'s ``SegmentationHead`` (x4 upsampling).

Output: ``(B, K+1, H, W)`` class logits at the input resolution. Everything in the head trains;
the encoder is adapted by the zoo adapters as usual.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.backbones.sam import SAMBackbone
from zoo.heads import register_head

SMP_DECODERS = ("dpt", "fpn")


def default_indices(backbone: SAMBackbone) -> list[int]:
    """The global-attention blocks (window size 0); else four evenly spaced blocks."""
    blocks = backbone.blocks()
    glob = [i for i, b in enumerate(blocks) if getattr(b, "window_size", 1) == 0]
    if len(glob) >= 4:
        return glob[-4:]
    depth = len(blocks)
    # four evenly spaced blocks (a shallow encoder repeats some: each feeds one pyramid level)
    return [max(0, round(depth * (j + 1) / 4) - 1) for j in range(4)]


@register_head("smp_fpn")
@register_head("smp_dpt")
class SmpSegmenter(nn.Module):
    """``backbone`` (SAM encoder) + an smp decoder (``dpt`` | ``fpn``) -> ``(B, K+1, H, W)``."""

    def __init__(self, backbone: SAMBackbone, num_classes: int, decoder: str = "dpt", indices: list[int] | None = None,
                 channels: int = 256):
        super().__init__()
        if decoder not in SMP_DECODERS:
            raise ValueError(f"unknown smp decoder {decoder!r}; valid: {', '.join(SMP_DECODERS)}")
        self.backbone, self.num_classes, self.decoder_name = backbone, int(num_classes), decoder
        self.channels = int(channels)
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
        if self.decoder_name == "dpt":
            return self.head(self.decoder(feats, [None] * 4))
        g = feats[0].shape[-1]
        pyramid = [F.interpolate(f, size=(g * 16 // s, g * 16 // s), mode="bilinear", align_corners=False)
                   for f, s in zip(feats, (4, 8, 16, 32))]
        return self.head(self.decoder([x, *pyramid]))
