"""A small image folder of JPEGs (two colour classes) for the image-folder tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"cats": (200, 40, 40), "dogs": (40, 40, 200)}


def write_image_folder(root: Path, per_class: dict[str, int] | None = None, classes=COLOURS, size: int = 40,
                       seed: int = 0) -> Path:
    """``root/<split>/<class>/<i>.jpg``: noisy images of one colour per class (easy to tell apart)."""
    rng = np.random.default_rng(seed)
    for split, n in (per_class or {"train": 12, "val": 4, "test": 4}).items():
        for name, rgb in classes.items():
            d = root / split / name if split else root / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(rgb)[None, None] + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{name}_{i:03d}.jpg", quality=90)
    return root
