"""Loading pretrained weights safely, and failing clearly when the hub cannot be reached."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched (offline, no hub access) or read."""


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never unpickling objects.

    Torch files go through ``torch.load(weights_only=True)``; a top-level ``model_state_dict``/
    ``state_dict``/``model`` entry (MORPH / Lightning / timm training checkpoints) is unwrapped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # an unsafe pickle or a corrupt file
        raise WeightsUnavailableError(f"could not read {path} as a weights-only torch file: {e}") from e
    for key in ("model_state_dict", "state_dict", "model", "module"):  # model_state_dict: MORPH's .pth
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


@contextmanager
def hub_errors(what: str, hint: str) -> Iterator[None]:
    """Turn a hub/network failure inside the block into a :class:`WeightsUnavailableError`."""
    try:
        yield
    except WeightsUnavailableError:
        raise
    except Exception as e:  # hub clients raise many types (httpx, requests, OSError, LocalEntryNotFound)
        offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
        reason = type(e).__name__ + (f": {str(e).splitlines()[0][:200]}" if str(e) else "")
        raise WeightsUnavailableError(
            f"could not download pretrained weights for {what} "
            f"({'HF_HUB_OFFLINE is set' if offline else 'the hub is unreachable'}; {reason}).\n{hint}"
        ) from None
