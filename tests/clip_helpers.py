"""Tiny random open_clip configs for the CLIP tests (seconds to build, offline)."""
from __future__ import annotations

import zoo

TINY = dict(embed_dim=32,
            vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
            text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2))
IMG = 32


def tiny_clip(**kw):
    opts = dict(model="ViT-B-16", pretrained=None, **TINY)
    opts.update(kw)
    return zoo.create_backbone("clip", **opts)


def tiny_open_clip(**kw):
    import open_clip

    return open_clip.create_model("ViT-B-16", pretrained=None, **{**TINY, **kw})
