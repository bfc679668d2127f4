"""Lightning checkpoints written atomically, and read without unpickling.

Lightning's ``TorchCheckpointIO`` streams ``torch.save`` straight into the destination, so a full
disk or a kill mid-write leaves a truncated ``last.ckpt`` that ``ckpt_path=last`` then picks up.
:class:`AtomicCheckpointIO` writes to a temporary file in the same folder and renames it over the
destination only when complete (:func:`zoo.io.atomic_path`); loads use ``weights_only=True``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from zoo.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        with atomic_path(Path(path)) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = True) -> dict[str, Any]:
        return load_checkpoint(path, map_location)


def load_checkpoint(path, map_location: Any | None = "cpu") -> dict[str, Any]:
    """A Lightning checkpoint with ``weights_only=True``; a truncated or foreign file is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, an unsafe pickle, not a checkpoint at all
        reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise ValueError(f"{path} cannot be read as a weights-only checkpoint ({type(e).__name__}: {reason}); "
                         f"it is truncated, not a checkpoint, or holds objects other than tensors") from None
