"""Tiny random base models built the usual way (timm, open_clip, transformers) and the zoo models on
the same weights, for the export tests. Offline, seconds on a CPU."""
from __future__ import annotations

from functools import partial

import torch
from safetensors.torch import save_file
from torch import nn

import zoo

VIT = dict(embed_dim=32, depth=2, num_heads=2, img_size=32)
AST = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, max_length=100,
           num_mel_bins=128)
FAMILIES = ("vit", "sam", "clip", "ast")


def _perturb(module: nn.Module, scale: float = 0.2, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every tensor distinct (LN weights off 1, biases off 0) so a swapped key shows
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def library_model(family: str, num_classes: int = 0, seed: int = 0) -> nn.Module:
    """The base model as its own library builds it (random weights, perturbed)."""
    torch.manual_seed(seed)
    if family == "vit":
        m = __import__("timm").create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **VIT)
    elif family == "sam":
        from tests.seg_helpers import ENCODER_KW, IMG

        m = __import__("timm").create_model("samvit_base_patch16", pretrained=False, img_size=IMG, num_classes=0,
                                            norm_layer=partial(nn.LayerNorm, eps=1e-6), **ENCODER_KW)
    elif family == "clip":
        from tests.clip_helpers import tiny_open_clip

        m = tiny_open_clip()
    else:
        import transformers

        m = transformers.ASTModel(transformers.ASTConfig(**AST))
    _perturb(m, 0.05 if family in ("sam", "clip") else 0.2, seed)
    return m.eval()


def zoo_backbone(family: str, base: nn.Module, tmp_path):
    """The zoo backbone on ``base``'s weights (through the zoo's own weight loading where it has one)."""
    if family == "vit":
        f = tmp_path / "vit.safetensors"
        save_file({k: v.contiguous() for k, v in base.state_dict().items() if not k.startswith("head.")}, str(f))
        return zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, weights=str(f), **VIT)
    if family == "sam":
        from tests.seg_helpers import tiny_sam_backbone

        f = tmp_path / "sam.safetensors"
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(f))
        return tiny_sam_backbone(weights=str(f))
    if family == "clip":
        from tests.clip_helpers import tiny_clip

        bb = tiny_clip()
        bb.model.load_state_dict(base.state_dict())
        return bb
    f = tmp_path / "ast"
    f.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(f / "model.safetensors"))
    return zoo.create_backbone("ast", model="deit_tiny_distilled_patch16_224", embed_dim=32, depth=2, num_heads=2,
                               pretrained=False, max_length=100, weights=str(f))


def example_input(family: str, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = {"vit": (batch, 3, 32, 32), "sam": (batch, 3, 64, 64), "clip": (batch, 3, 32, 32), "ast": (batch, 100, 128)}
    return torch.randn(shape[family], generator=g)


def zoo_features(family: str, bb, x: torch.Tensor) -> torch.Tensor:
    """What the base model's own forward gives, computed by the zoo backbone."""
    if family == "sam":
        return bb.feature_map(x)
    return bb(x)  # vit: pooled pre-logits; clip: encode_image; ast: (CLS + DIST) / 2


def library_features(family: str, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if family == "vit":
        return base.forward_head(base.forward_features(x), pre_logits=True)
    if family == "sam":
        return base.forward_features(x)
    if family == "clip":
        return base.encode_image(x)
    return base(input_values=x).pooler_output


def train_a_little(model: nn.Module, seed: int = 3) -> None:
    """Give every trainable tensor a nonzero random value (LoRA's B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def folder_files(folder) -> dict:
    """Every entry under ``folder``: a file's bytes, None for a folder (a temporary one left behind shows)."""
    from pathlib import Path

    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def disk_full_at(monkeypatch, name: str) -> None:
    """Make ``Path.write_bytes`` / ``write_text`` fail with ENOSPC on the temporary file of ``name``
    (``zoo.io.atomic_path``'s ``.<name>.…tmp``), as a full disk would; ``monkeypatch.undo()`` ends it."""
    from pathlib import Path

    real = {"write_bytes": Path.write_bytes, "write_text": Path.write_text}

    def full(method):
        def write(self, data, *a, **k):
            if self.name.startswith(f".{name}."):
                raise OSError(28, "No space left on device")
            return real[method](self, data, *a, **k)
        return write

    for method in real:
        monkeypatch.setattr(Path, method, full(method))


def crash_at_rename(monkeypatch, dest) -> None:
    """Make ``os.replace`` onto ``dest`` fail (EIO), as a crash just before the last rename of a set would
    leave the folder; the other renames happen. ``monkeypatch.undo()`` ends it."""
    import os
    from pathlib import Path

    real = os.replace

    def replace(src, dst):
        if Path(dst) == Path(dest):
            raise OSError(5, "Input/output error", str(src))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
