"""S-SAM / SALT text prompts: a class name's CLIP text embedding as a sparse prompt token for SAM.

Paranjape et al., "S-SAM: SVD-based Fine-Tuning of Segment Anything Model for Medical Image
Segmentation" (MICCAI 2024) and Elsayed et al., "SALT" (arXiv 2503.16055) share one code base
(BioMedIA-MBZUAI/SALT@7314877, ``model.py`` ``Prompt_Adapted_SAM``). Per (image, label name):

    t   = CLIP_text(name)                                  (ViT-B/32 text tower, frozen; D = 512)
    s   = BatchNorm1d(ReLU(W t + b))                       ("Text_Embedding_Affine", D -> 256)
    s  += e_k          only with ``learned=True``          (S-SAM "prompttuning": per-class embeddings,
                                                            Xavier-uniform, no longer SALT's default)
    sparse = [prompt_encoder(no prompts).sparse ; s]       (one token; NUM_TEXT_REPEAT = 1)
    dense  = no_mask_embed;  mask = MaskDecoder(..., multimask_output=False)   (token 0's mask)

so each class gives one binary mask logit. The BatchNorm runs over the batch of (image, name)
pairs, as in the reference, where every batch row is one pair; here every image is paired with all
K names, so the normalised batch is the K embeddings, each repeated B times (with K = 1 that is B
identical rows: the token is then BatchNorm's shift in training, as in the reference's binary
datasets). CLIP is frozen in the reference (``requires_grad=False`` for every ``clip`` parameter),
so the K text embeddings are computed once here (:func:`class_text_embeddings`) and kept as a buffer.

The embeddings come from the zoo's CLIP backbone (``zoo.create_backbone("clip", ...)``, open_clip;
the name is the text, with `_` read as a space, as ``clip.tokenize(x_text)`` in the reference) or from a precomputed
safetensors file (:func:`save_text_embeddings`; tensor ``embeddings`` (K, D), metadata ``names``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from zoo.adapters.base import AdapterModule

DEFAULT_CLIP = {"model": "ViT-B-32", "pretrained": "openai"}  # the reference's clip.load("ViT-B/32")


def class_text_embeddings(class_names: Sequence[str], clip: dict | None = None,
                          embeddings: str | os.PathLike | None = None) -> torch.Tensor:
    """``(K, D)`` text embeddings of ``class_names`` (unnormalised ``encode_text``, as the reference).

    ``embeddings``: a file written by :func:`save_text_embeddings` (its names must be the class
    names, in order). Else ``clip``: options of ``zoo.create_backbone("clip", ...)`` (default
    ViT-B-32 / openai; offline, give ``pretrained: null`` with a local ``weights`` file, or a
    precomputed file).
    """
    names = [str(n) for n in class_names]
    if not names:
        raise ValueError("text prompts need the class names: set task.class_names")
    if embeddings is not None:
        return load_text_embeddings(embeddings, names)
    import zoo

    cfg = {**DEFAULT_CLIP, **dict(clip or {})}
    cfg.pop("towers", None)
    bb = zoo.create_backbone("clip", **cfg)
    bb.eval()
    with torch.no_grad():
        tokens = bb.tokenizer([n.replace("_", " ") for n in names])
        return bb.encode_text(tokens).float().detach().cpu()


def save_text_embeddings(path: str | os.PathLike, class_names: Sequence[str], emb: torch.Tensor) -> Path:
    """Write ``emb (K, D)`` with the class names (safetensors metadata), atomically."""
    from zoo.io import atomic_write_bytes, safetensors_bytes

    if emb.ndim != 2 or emb.shape[0] != len(class_names):
        raise ValueError(f"embeddings {tuple(emb.shape)} do not match {len(class_names)} class names")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = safetensors_bytes({"embeddings": emb.detach().float().cpu().contiguous()},
                             {"names": json.dumps([str(n) for n in class_names])})
    return atomic_write_bytes(path, data)


def load_text_embeddings(path: str | os.PathLike, class_names: Sequence[str]) -> torch.Tensor:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text embeddings file not found: {path} (write one with "
                                f"python -m zoo.backbones.sam_text_prompt --names ... --out {path})")
    with safe_open(str(path), "pt") as f:
        names = json.loads((f.metadata() or {}).get("names", "[]"))
        emb = f.get_tensor("embeddings")
    if names != list(class_names):
        raise ValueError(f"{path} holds embeddings of {names}, but the class names are {list(class_names)}; "
                         "write the file for these names (same order)")
    return emb.float()


class TextPromptEncoder(AdapterModule):
    """The K class names' CLIP embeddings (a buffer) -> ``(B·K, 1, out_dim)`` sparse prompt tokens.

    An ``AdapterModule`` so that its buffers (the embeddings, BatchNorm's running statistics) go into
    the artifact with the trained affine layer.
    """

    def __init__(self, embeddings: torch.Tensor, out_dim: int = 256, learned: bool = False):
        super().__init__()
        if embeddings.ndim != 2:
            raise ValueError(f"text embeddings must be (K, D), got {tuple(embeddings.shape)}")
        k, d = embeddings.shape
        self.register_buffer("text_embeddings", embeddings.detach().float().clone())
        self.affine = nn.Sequential(nn.Linear(d, out_dim), nn.ReLU(), nn.BatchNorm1d(out_dim))
        self.learned = None
        if learned:
            self.learned = nn.Parameter(torch.zeros(k, out_dim))
            nn.init.xavier_uniform_(self.learned)

    @property
    def num_classes(self) -> int:
        return self.text_embeddings.shape[0]

    def forward(self, batch: int) -> torch.Tensor:
        """Tokens for every (image, class) pair, image-major: row ``i·K + k``."""
        t = self.text_embeddings.repeat(batch, 1)  # (B·K, D): the reference's batch of (image, name) rows
        if self.training and t.shape[0] < 2:
            raise ValueError("text prompts' BatchNorm needs at least 2 (image, class) pairs per training batch; "
                             "use data.batch_size >= 2")
        s = self.affine(t)
        if self.learned is not None:
            s = s + self.learned.repeat(batch, 1)
        return s[:, None, :]


def main(argv: list[str] | None = None) -> None:
    """``python -m zoo.backbones.sam_text_prompt --names liver spleen --out emb.safetensors [--model ViT-B-32
    --pretrained openai | --weights file]``: precompute class-name embeddings (needs the CLIP weights)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--names", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=DEFAULT_CLIP["model"])
    ap.add_argument("--pretrained", default=DEFAULT_CLIP["pretrained"])
    ap.add_argument("--weights", default=None)
    a = ap.parse_args(argv)
    clip = {"model": a.model, "pretrained": None if a.weights else a.pretrained, "weights": a.weights}
    emb = class_text_embeddings(a.names, clip)
    print(save_text_embeddings(a.out, a.names, emb))


if __name__ == "__main__":
    main()
