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

        try:
            sd = load_file(str(path))
        except Exception as e:  # truncated or not safetensors
            raise WeightsUnavailableError(f"could not read {path} as safetensors: {type(e).__name__}: {e}") from None
        _check_finite(sd, path)
        return sd
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # an unsafe pickle or a corrupt file
        raise WeightsUnavailableError(f"could not read {path} as a weights-only torch file: {_reason(e)}") from e
    for key in ("model_state_dict", "state_dict", "model", "module"):  # model_state_dict: MORPH's .pth
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if isinstance(sd, dict):
        _check_finite({k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and not k.endswith("attn_mask")}, path)
    return sd


def _reason(e: BaseException) -> str:
    """``torch.load``'s refusal in one line: its several-paragraph weights-only message reduced to the
    unpickler's own reason (the command lines print one line per error)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        text = "refused by the weights-only unpickler: " + text
    return " ".join(text.split()) or type(e).__name__


def _check_finite(sd: dict[str, torch.Tensor], path: Path) -> None:
    from zoo.io import check_finite

    try:
        check_finite(sd, path)
    except ValueError as e:
        raise WeightsUnavailableError(str(e)) from None


_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub's host accepts a TCP connection (one probe per process)."""
    import socket
    import urllib.parse

    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    if host not in _REACHABLE:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]


@contextmanager
def _offline_hub() -> Iterator[None]:
    """HF_HUB_OFFLINE for the block: the hub client uses its cache only, with no retries."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        yield
        return
    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], constants.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


@contextmanager
def hub_errors(what: str, hint: str) -> Iterator[None]:
    """Turn a hub/network failure inside the block into a :class:`WeightsUnavailableError`.

    When the hub's host cannot even be reached (no network), the block runs with the hub client
    in offline mode: cached weights still load, and missing ones fail at once instead of after
    ~50 s of retry warnings.
    """
    offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
    unreachable = not offline and not hub_reachable()
    try:
        with (_offline_hub() if unreachable else _nullcontext()):
            yield
    except WeightsUnavailableError:
        raise
    except Exception as e:  # hub clients raise many types (httpx, requests, OSError, LocalEntryNotFound)
        reason = type(e).__name__ + (f": {str(e).splitlines()[0][:200]}" if str(e) else "")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub is unreachable" + (" (no network)" if unreachable else "")
        raise WeightsUnavailableError(
            f"could not download pretrained weights for {what} ({why}; {reason}).\n{hint}"
        ) from None


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield
