"""Tiny SAM-architecture models for the segmentation tests (random weights, seconds on a CPU)."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

# one small SAM: 64 px input, 4x4 grid, window 2, one global block, 32-d neck and decoder
IMG, DIM, DEPTH, HEADS, WINDOW, GLOBAL, NECK = 64, 32, 2, 2, 2, (1,), 32
DECODER = dict(mlp_dim=64, num_heads=2, iou_head_hidden_dim=32)
ENCODER_KW = dict(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, window_size=WINDOW, global_attn_indexes=GLOBAL,
                  neck_chans=NECK)


def build_reference_sam(img: int = IMG, num_multimask_outputs: int = 3, seed: int = 0):
    """segment_anything's own ``Sam`` in the tiny config, every tensor random (rel-pos too)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    grid = img // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=img, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                                      mlp_ratio=4.0, out_chans=NECK, qkv_bias=True,
                                      norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                                      window_size=WINDOW, global_attn_indexes=GLOBAL),
        prompt_encoder=PromptEncoder(embed_dim=NECK, image_embedding_size=(grid, grid), input_image_size=(img, img),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=num_multimask_outputs,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=NECK, mlp_dim=DECODER["mlp_dim"],
                                                               num_heads=DECODER["num_heads"]),
                                 transformer_dim=NECK, iou_head_depth=3,
                                 iou_head_hidden_dim=DECODER["iou_head_hidden_dim"]),
    )
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "gaussian" not in name:
                p.add_(torch.randn_like(p) * 0.1)
    return sam.eval()


def save_reference_sam(path: Path, **kw) -> tuple[nn.Module, Path]:
    sam = build_reference_sam(**kw)
    path = Path(path)
    torch.save(sam.state_dict(), path)
    return sam, path


def tiny_sam_backbone(weights: str | None = None, img: int = IMG):
    import zoo

    return zoo.create_backbone("sam", model="samvit_base_patch16", pretrained=False, weights=weights,
                               img_size=img, **ENCODER_KW)


def tiny_segmenter(num_classes: int = 2, weights: str | None = None, img: int = IMG, **kw):
    from zoo.backbones.sam_decoder import SamSegmenter

    return SamSegmenter(tiny_sam_backbone(weights, img), num_classes, decoder=dict(DECODER), **kw)
