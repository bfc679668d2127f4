import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here; tests must never reach for it


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_vit(**kw):
    import zoo

    opts = dict(model="vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
    opts.update(kw)
    return zoo.create_backbone("vit", **opts)


@pytest.fixture
def vit():
    return tiny_vit()
