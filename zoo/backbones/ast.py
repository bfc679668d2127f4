"""The Audio Spectrogram Transformer (AST) as a zoo backbone, built on a timm DeiT.

Gong, Chung, Glass, "AST: Audio Spectrogram Transformer", Interspeech 2021 (arXiv 2104.01778);
reference code ``YuanGongND/ast`` (src/models/ast_models.py) and HF ``transformers.ASTModel``.

The model is timm's ``VisionTransformerDistilled`` (CLS + DIST tokens) with

* a 1-channel ``Conv2d(1, D, 16, stride=(fstride, tstride))`` patch embedding (stride 10 in both
  axes: 6-sample overlap) on the fbank laid out as ``[B, 1, F=128, T]``; the token order is
  frequency-major with time inner, ``f = (F - 16) // fstride + 1``, ``t = (T - 16) // tstride + 1``;
* a position table of ``f·t + 2`` entries for the configured ``max_length`` T;
* LayerNorm eps 1e-12 when HF AST weights are loaded (timm's 1e-6 would differ slightly);
* pooling ``cls_dist`` = (tok0 + tok1)/2 (original AST, HF ``pooler_output``; the default),
  ``cls`` = tok0, or ``mean`` = the mean of all tokens (PETL-AST's ``final_output='ALL'``).

Inputs are fbanks ``[B, T, F]`` (HF ``input_values``), or already ``[B, 1, F, T]``.

Weights (:func:`imagenet_to_ast`, :func:`move_grid`, :func:`convert_hf_state_dict`):

* ``pretrained=true``: ImageNet DeiT through timm, transferred as the original AST does: the RGB
  patch kernel summed over its input channels; the 2-D position grid centre-cut (or bilinearly
  interpolated when larger) on each axis; the CLS/DIST position entries kept.
* ``weights=<path | Hub id>``: an HF AST checkpoint (``ASTModel`` / ``ASTForAudioClassification``,
  legacy ``encoder.layer.N.attention.attention.query`` keys or transformers-5 ``layers.N.attention.q_proj``
  keys), the original AST release (``module.v.*``) or a timm-keyed file; read with safetensors or
  ``torch.load(weights_only=True)``. Its grid is read from the checkpoint (:func:`checkpoint_grid`: its
  ``config.json``, or AudioSet's 12×101) and moved to this model's grid with the original AST rule
  (``ast_models.py``): each axis centre-cut when shorter, bilinearly interpolated when longer, time first.

Sites are the timm ViT's (``q k v`` slices of the fused qkv, ``o fc1 fc2 attn mlp norm1 norm2 tokens``),
so every adapter attaches unchanged. ``num_prefix_tokens`` is 2 (CLS, DIST).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.backbones.vit import TimmBackbone
from zoo.backbones.weights import WeightsUnavailableError, hub_errors, load_state_dict_file

POOLINGS = ("cls_dist", "cls", "mean")


def grid_size(num_mel_bins: int, max_length: int, patch: int = 16, fstride: int = 10, tstride: int = 10) -> tuple[int, int]:
    """``(f, t)``: patches along frequency and time for a ``[F, T]`` fbank (AST's get_shape)."""
    if num_mel_bins < patch or max_length < patch:
        raise ValueError(
            f"AST needs at least one {patch}x{patch} patch: num_mel_bins={num_mel_bins}, max_length={max_length} "
            f"(set backbone.max_length >= {patch})"
        )
    return (num_mel_bins - patch) // fstride + 1, (max_length - patch) // tstride + 1


def _cut_or_interp(grid: torch.Tensor, f: int, t: int, cut_when_equal: bool) -> torch.Tensor:
    """The original AST rule on a ``[1, D, f0, t0]`` grid: time axis first, then frequency.

    An axis that shrinks is centre-cut from ``int(n0/2) - int(n/2)``; one that grows is bilinearly
    interpolated (``align_corners=False``) together with the other axis's current size.
    """
    f0, t0 = grid.shape[-2:]
    if t < t0 or (cut_when_equal and t == t0):
        s = t0 // 2 - t // 2
        grid = grid[:, :, :, s:s + t]
    elif t != t0:
        grid = F.interpolate(grid, size=(f0, t), mode="bilinear")
    if f < f0 or (cut_when_equal and f == f0):
        s = f0 // 2 - f // 2
        grid = grid[:, :, s:s + f, :]
    elif f != f0:
        grid = F.interpolate(grid, size=(f, t), mode="bilinear")
    return grid


def move_grid(pos_embed: torch.Tensor, old: tuple[int, int], new: tuple[int, int], prefix: int = 2) -> torch.Tensor:
    """Move an AST position table ``(1, prefix + f0·t0, D)`` from grid ``old`` to ``new``
    (the original AST rule for AudioSet checkpoints: cut the centre of the time axis when shorter,
    interpolate when longer; the same on frequency). Prefix entries are kept."""
    f0, t0 = old
    if pos_embed.shape[1] != prefix + f0 * t0:
        raise ValueError(f"position table has {pos_embed.shape[1]} entries, expected {prefix} + {f0}x{t0}")
    if tuple(new) == (f0, t0):
        return pos_embed
    d = pos_embed.shape[-1]
    grid = pos_embed[:, prefix:].reshape(1, f0, t0, d).permute(0, 3, 1, 2)
    grid = _cut_or_interp(grid, new[0], new[1], cut_when_equal=False)
    return torch.cat([pos_embed[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)


def imagenet_to_ast(proj_weight: torch.Tensor, pos_embed: torch.Tensor, old: tuple[int, int],
                    new: tuple[int, int], prefix: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet DeiT → AST (ast_models.py): kernel ``(D,3,p,p)`` summed to ``(D,1,p,p)``; the
    ``h0×w0`` grid (rows = frequency, columns = time) centre-cut when ``n <= n0`` else interpolated."""
    w = proj_weight.sum(dim=1, keepdim=True)
    f0, t0 = old
    d = pos_embed.shape[-1]
    grid = pos_embed[:, prefix:].reshape(1, f0, t0, d).permute(0, 3, 1, 2)
    grid = _cut_or_interp(grid, new[0], new[1], cut_when_equal=True)
    pos = torch.cat([pos_embed[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)
    return w, pos


# --------------------------------------------------------------------------- HF conversion
_HF_PREFIXES = ("audio_spectrogram_transformer.", "model.", "module.")
_LAYER_RULES = (  # (legacy, transformers-5) -> timm, inside one layer
    (("attention.output.dense", "attention.o_proj"), "attn.proj"),
    (("intermediate.dense", "mlp.fc1"), "mlp.fc1"),
    (("output.dense", "mlp.fc2"), "mlp.fc2"),
    (("layernorm_before",), "norm1"),
    (("layernorm_after",), "norm2"),
)
_QKV = {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
        "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}


def convert_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF AST keys (legacy or transformers-5), the original AST release (``module.v.``) or timm keys
    → timm ``VisionTransformerDistilled`` keys. Heads (``classifier.*``, ``mlp_head.*``) are dropped."""
    if any(k.startswith("module.v.") for k in sd):  # original YuanGongND/ast release
        return {k[len("module.v."):]: v for k, v in sd.items() if k.startswith("module.v.")}
    if "pos_embed" in sd and any(k.startswith("blocks.") for k in sd):  # already timm
        return {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist."))}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, val in sd.items():
        k = key
        for p in _HF_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        if k.startswith("classifier."):
            continue
        simple = {
            "embeddings.cls_token": "cls_token",
            "embeddings.distillation_token": "dist_token",
            "embeddings.position_embeddings": "pos_embed",
            "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
            "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
            "layernorm.weight": "norm.weight",
            "layernorm.bias": "norm.bias",
        }
        if k in simple:
            out[simple[k]] = val
            continue
        for head in ("encoder.layer.", "layers."):
            if k.startswith(head):
                idx, rest = k[len(head):].split(".", 1)
                sub, kind = rest.rsplit(".", 1)  # kind: weight | bias
                if sub in _QKV:
                    qkv.setdefault((int(idx), kind), {})[_QKV[sub]] = val
                    break
                for names, timm_name in _LAYER_RULES:
                    if sub in names:
                        out[f"blocks.{idx}.{timm_name}.{kind}"] = val
                        break
                else:
                    raise WeightsUnavailableError(f"unknown AST checkpoint key {key!r}")
                break
        else:
            raise WeightsUnavailableError(f"unknown AST checkpoint key {key!r} (expected HF ASTModel keys)")
    for (idx, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise WeightsUnavailableError(f"AST checkpoint layer {idx} has {sorted(parts)} of q/k/v {kind}")
        out[f"blocks.{idx}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# The AudioSet release's grid (128 mel bins x 1024 frames, strides 10): ast_models.py reshapes its table to
# 12 x 101 whatever the new geometry; the HF MIT/ast-finetuned-audioset-* checkpoints share it.
AUDIOSET_GRID = (12, 101)


def _checkpoint_config(weights: str) -> dict | None:
    """The HF ``config.json`` beside local weights (a folder, or a file's folder), if any."""
    import json

    p = Path(os.path.expanduser(str(weights)))
    for c in ((p / "config.json") if p.is_dir() else p.with_name("config.json"),):
        if c.is_file():
            try:
                return json.loads(c.read_text())
            except ValueError:
                return None
    return None


def checkpoint_grid(weights: str, n: int, new: tuple[int, int], patch: int = 16) -> tuple[int, int]:
    """The (frequency, time) grid of a checkpoint's ``n`` patch positions, from the checkpoint itself: its
    ``config.json`` (``num_mel_bins``, ``max_length``, strides), else the AudioSet grid 12x101 for 1212
    positions (as AST's ``ast_models.py``), else the new grid when the counts agree. Anything else cannot
    be told apart (3x404 or 4x303 ...) and is refused rather than guessed."""
    cfg = _checkpoint_config(weights)
    if cfg and {"num_mel_bins", "max_length"} <= set(cfg):
        g = grid_size(int(cfg["num_mel_bins"]), int(cfg["max_length"]), int(cfg.get("patch_size", patch)),
                      int(cfg.get("frequency_stride", 10)), int(cfg.get("time_stride", 10)))
        if g[0] * g[1] == n:
            return g
    if n == AUDIOSET_GRID[0] * AUDIOSET_GRID[1]:
        return AUDIOSET_GRID
    if n == new[0] * new[1]:
        return tuple(new)
    # the demo AST is written by a recipe whose geometry may change between versions (stride 10 -> 16)
    fix = ("; it was pretrained with another geometry than conf/backbone/ast_demo.yaml: delete it and run "
           "`python train.py experiment=audio_upstream` again" if Path(str(weights)).name == "ast_demo.safetensors"
           else "; put the checkpoint's config.json (num_mel_bins, max_length, frequency_stride, time_stride) "
           "beside it so its grid is known")
    raise WeightsUnavailableError(
        f"{weights}: its position table has {n} patch positions, which is neither the AudioSet grid "
        f"{AUDIOSET_GRID[0]}x{AUDIOSET_GRID[1]} nor this model's {new[0]}x{new[1]}{fix}")


def read_ast_weights(weights: str) -> dict[str, torch.Tensor]:
    """A file, a directory (``model.safetensors`` / ``pytorch_model.bin``) or a Hub id (``MIT/ast-...``)."""
    p = Path(os.path.expanduser(str(weights)))
    if p.is_file():
        return load_state_dict_file(p)
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                return load_state_dict_file(p / name)
        raise WeightsUnavailableError(f"{p} holds neither model.safetensors nor pytorch_model.bin")
    if str(weights).count("/") != 1 or str(weights).startswith((".", "/", "~")):
        hint = " (the demo AST: run `python train.py experiment=audio_upstream` once)" if p.name == "ast_demo.safetensors" else ""
        raise WeightsUnavailableError(f"AST weights not found: {weights} is neither a file, a directory nor a Hub id{hint}")
    hint = ("Download it where the hub is reachable (huggingface-cli download "
            f"{weights}) and pass the folder as backbone.weights=/path/to/folder, or use backbone.weights=null.")
    with hub_errors(f"AST checkpoint {weights!r}", hint):
        from huggingface_hub import hf_hub_download

        try:
            return load_state_dict_file(hf_hub_download(str(weights), "model.safetensors"))
        except WeightsUnavailableError:
            raise
        except Exception as e:
            if "EntryNotFound" not in type(e).__name__:
                raise
            return load_state_dict_file(hf_hub_download(str(weights), "pytorch_model.bin"))


class ASTBackbone(TimmBackbone):
    """AST on timm's distilled DeiT. ``forward(x)`` → pooled feature; ``forward_features(x)`` → tokens."""

    family = "ast"
    token_layout = "nld"

    def __init__(
        self,
        model: str = "deit_base_distilled_patch16_384",
        pretrained: bool = True,
        weights: str | None = None,
        max_length: int = 1024,
        num_mel_bins: int = 128,
        fstride: int = 10,
        tstride: int = 10,
        pooling: str = "cls_dist",
        layer_norm_eps: float | None = None,
        img_size: Any = None,
        **kwargs: Any,
    ):
        # img_size is accepted and ignored: the input geometry is max_length x num_mel_bins (generic
        # rebuilders such as eval.py pass an image size to every backbone)
        if pooling not in POOLINGS:
            raise ValueError(f"unknown AST pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
        if "distilled" not in model:
            raise ValueError(f"AST needs a distilled DeiT (CLS + DIST tokens), e.g. deit_base_distilled_patch16_384; got {model!r}")
        sd = convert_hf_state_dict(read_ast_weights(weights)) if weights else None
        if pretrained and sd is not None:
            pretrained = False  # the AST checkpoint replaces every ImageNet tensor anyway
        # img_size only sizes timm's initial table; it is replaced below
        super().__init__(model, pretrained, None, None, **kwargs)
        net = self.model
        p = net.patch_embed.patch_size[0]
        f, t = grid_size(num_mel_bins, max_length, p, fstride, tstride)
        old_grid = tuple(net.patch_embed.grid_size)
        proj = net.patch_embed.proj
        conv = nn.Conv2d(1, proj.out_channels, p, stride=(fstride, tstride))
        with torch.no_grad():
            if pretrained:  # ImageNet → AST transfer
                w, pos = imagenet_to_ast(proj.weight, net.pos_embed, old_grid, (f, t))
                conv.weight.copy_(w)
                conv.bias.copy_(proj.bias)
            else:  # AST's from-scratch table: trunc_normal(0.02)
                pos = torch.empty(1, f * t + 2, net.embed_dim)
                nn.init.trunc_normal_(pos, std=0.02)
        net.patch_embed.proj = conv
        net.patch_embed.img_size = None  # no divisibility check: overlapping 10-stride patches
        net.patch_embed.grid_size = (f, t)
        net.patch_embed.num_patches = f * t
        net.pos_embed = nn.Parameter(pos.detach().clone())
        if sd is not None:
            self.checkpoint_grid = checkpoint_grid(weights, sd["pos_embed"].shape[1] - 2, (f, t))
            sd["pos_embed"] = move_grid(sd["pos_embed"], self.checkpoint_grid, (f, t))
            self._load(sd, str(weights))
            local = Path(os.path.expanduser(str(weights))).exists()
            self.weights_tag = f"file:{Path(str(weights)).name}" if local else f"hub:{weights}"
        eps = layer_norm_eps if layer_norm_eps is not None else (1e-12 if sd is not None else None)
        if eps is not None:
            for m in net.modules():
                if isinstance(m, nn.LayerNorm):
                    m.eps = float(eps)
        # the geometry goes into the recorded build options, so an artifact rebuilds the same model
        self.build_kwargs.update(max_length=max_length, num_mel_bins=num_mel_bins, fstride=fstride, tstride=tstride,
                                 pooling=pooling, layer_norm_eps=layer_norm_eps)
        self.grid = (f, t)
        self.max_length, self.num_mel_bins, self.pooling = max_length, num_mel_bins, pooling
        self.num_prefix_tokens = 2
        self.patch_size = p
        self.data_config = {"input_size": (max_length, num_mel_bins), "layout": "[T, F] fbank"}

    def _load(self, sd: dict[str, torch.Tensor], source: str) -> None:
        own = self.model.state_dict()
        bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
        if bad:
            raise WeightsUnavailableError(
                f"{source} does not fit {self.model_name}: shape mismatch at {bad[:4]} "
                f"(e.g. {bad[0]}: file {tuple(sd[bad[0]].shape)} vs model {tuple(own[bad[0]].shape)}); "
                "pick the timm model with the checkpoint's width/depth")
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith(("head.", "head_dist."))]
        if missing or unexpected:
            raise WeightsUnavailableError(f"{source} does not fit {self.model_name}: missing {missing[:6]}, unexpected {unexpected[:6]}")

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # [B, T, F] -> [B, 1, F, T]
            x = x.unsqueeze(1).transpose(2, 3)
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"AST takes fbanks [B, T, F] or [B, 1, F, T], got {tuple(x.shape)}")
        if tuple(x.shape[2:]) != (self.num_mel_bins, self.max_length):
            raise ValueError(
                f"AST built for {self.max_length} frames x {self.num_mel_bins} mel bins got an fbank of "
                f"{x.shape[3]} frames x {x.shape[2]} bins; pad/cut to backbone.max_length in the front end")
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self._layout(x))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls_dist":
            return (tokens[:, 0] + tokens[:, 1]) / 2
        if self.pooling == "cls":
            return tokens[:, 0]
        return tokens.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))

