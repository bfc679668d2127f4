"""open_clip CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021) as a zoo backbone: both towers, the logit scale, the tokenizer and the
preprocessing come from open_clip.

* ``forward(x)`` is ``encode_image(x)`` (the projected, unnormalised image embedding), so the
  visual-only use (VTAB with a Linear head) is unchanged; ``encode_text(tokens)`` and
  ``tokenize(texts)`` give the text side (:mod:`zoo.zeroshot` builds classifiers from them).
* Sites exist on both towers (``towers = ("visual", "text")``); adapters choose with their
  generic ``tower: visual | text | both`` option (:func:`zoo.sites.find_sites`). The text tower
  has no ``tokens`` site: its causal mask and end-of-text pooling fix the sequence length, so
  token-inserting methods (VPT, Q-Adapter) refuse there; CoOp edits the prompt embeddings instead.

open_clip blocks use ``nn.MultiheadAttention``, which reads ``in_proj_weight`` directly, so a
wrapper on a Linear would never be called. :class:`ExplicitMultiheadAttention` replaces it, in
both towers, with the same computation through explicit ``in_proj`` / ``out_proj`` Linears (tested
to give identical outputs, with the text tower's causal mask and with per-sample padding masks),
and keeps nn.MultiheadAttention's state-dict names, so ``backbone.model.state_dict()`` loads into
open_clip unchanged.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.backbones.base import Backbone
from zoo.backbones.weights import hub_errors, load_state_dict_file


class ExplicitMultiheadAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` (batch-first or not) with explicit projections."""

    def __init__(self, embed_dim: int, num_heads: int, batch_first: bool = True, bias: bool = True):
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.head_dim = embed_dim // num_heads
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        # nn.MultiheadAttention's names on disk: in_proj_weight / in_proj_bias
        self._register_state_dict_hook(_to_mha_names)
        self._register_load_state_dict_pre_hook(_from_mha_names)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "ExplicitMultiheadAttention":
        if not mha._qkv_same_embed_dim:
            raise ValueError("nn.MultiheadAttention with separate kdim/vdim is not supported")
        new = cls(mha.embed_dim, mha.num_heads, mha.batch_first, bias=mha.in_proj_bias is not None)
        new = new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            new.in_proj.weight.copy_(mha.in_proj_weight)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                new.in_proj.bias.copy_(mha.in_proj_bias)
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=False, attn_mask=None, **_):
        if not self.batch_first:
            query = query.transpose(0, 1)
            key = key.transpose(0, 1) if key is not None else None
            value = value.transpose(0, 1) if value is not None else None
        d = self.embed_dim
        if (key is None or key is query) and (value is None or value is query):
            q, k, v = self.in_proj(query).split(d, dim=-1)
        else:  # cross-attention: same projection, rows picked per input (adapters still apply)
            q = self.in_proj(query)[..., :d]
            k = self.in_proj(key)[..., d : 2 * d]
            v = self.in_proj(value)[..., 2 * d :]
        q, k, v = (rearrange(t, "b n (h e) -> b h n e", h=self.num_heads) for t in (q, k, v))
        if attn_mask is not None and attn_mask.ndim == 3:  # nn.MultiheadAttention's (B·heads, L, S) form
            attn_mask = attn_mask.view(q.shape[0], self.num_heads, *attn_mask.shape[-2:])
        mask = _sdpa_mask(attn_mask, key_padding_mask, q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = self.out_proj(rearrange(x, "b h n e -> b n (h e)"))
        if not self.batch_first:
            x = x.transpose(0, 1)
        return x, None


def _sdpa_mask(attn_mask, key_padding_mask, dtype):
    """nn.MultiheadAttention masks (bool True = blocked, or additive float) as one additive mask."""
    mask = None
    if attn_mask is not None:
        mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn_mask.to(dtype)
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :]
        kpm = torch.zeros_like(kpm, dtype=dtype).masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else kpm.to(dtype)
        mask = kpm if mask is None else mask + kpm
    return mask


def _to_mha_names(module, state_dict, prefix, local_metadata):
    for name in ("weight", "bias"):
        k = f"{prefix}in_proj.{name}"
        if k in state_dict:
            state_dict[f"{prefix}in_proj_{name}"] = state_dict.pop(k)
    return state_dict


def _from_mha_names(state_dict, prefix, *args, **kwargs):
    for name in ("weight", "bias"):
        k = f"{prefix}in_proj_{name}"
        if k in state_dict:
            state_dict[f"{prefix}in_proj.{name}"] = state_dict.pop(k)


def replace_multihead_attention(module: nn.Module) -> int:
    """Swap every ``nn.MultiheadAttention`` under ``module`` for the explicit equivalent."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            setattr(module, name, ExplicitMultiheadAttention.from_mha(child))
            n += 1
        else:
            n += replace_multihead_attention(child)
    return n


VISUAL, TEXT = "visual", "text"


def _is_path(s: str | None) -> bool:
    return bool(s) and (Path(str(s)).expanduser().is_file() or str(s).endswith((".safetensors", ".pt", ".pth", ".bin")))


def visual_tower_layout(visual: nn.Module) -> dict[str, Any]:
    """What a zoo backbone records about an open_clip ViT visual tower (CLIP's, CoCa's): pooled
    feature size, token width (VPT prompts), prefix tokens, patch size and the data config from
    open_clip's preprocessing."""
    import open_clip

    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    return {
        "feature_dim": visual.output_dim,
        "token_dim": visual.transformer.width,
        "num_prefix_tokens": 1,
        "patch_size": visual.conv1.kernel_size[0],
        "data_config": dict(input_size=(3, size, size),
                            mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                            std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
                            interpolation=cfg.get("interpolation", "bicubic")),
    }


class _OpenClipNarration(logging.Filter):
    """Drops open_clip's own records that say nothing to act on (open_clip logs on the *root* logger).

    Always its INFO narration of each build ("Parsing model identifier", "Loaded built-in ... config",
    "Instantiating model architecture", the preprocessing config, "Using default SimpleTokenizer"): it
    restates the model name and config the run already records. With ``no_hub_weights`` (the caller
    passed ``pretrained=None`` on purpose: random weights asked for, or a weights file loaded right
    after) also its warning "No pretrained weights loaded ... Model initialized randomly". Its other
    warnings stay, and so does that one whenever a pretrained tag was asked for.
    """

    def __init__(self, no_hub_weights: bool):
        super().__init__()
        import open_clip

        self.package = str(Path(open_clip.__file__).resolve().parent)
        self.no_hub_weights = no_hub_weights

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(Path(record.pathname).resolve()).startswith(self.package):
            return True
        if record.levelno < logging.WARNING:
            return False
        return not (self.no_hub_weights and record.getMessage().startswith("No pretrained weights loaded"))


@contextmanager
def open_clip_quietly(no_hub_weights: bool = False) -> Iterator[None]:
    """Around an ``open_clip.create_model`` / ``get_tokenizer`` call: see :class:`_OpenClipNarration`."""
    root = logging.getLogger()
    f = _OpenClipNarration(no_hub_weights)
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def create_pretrained_open_clip(model: str, pretrained: str, file_hint: str, **kwargs: Any):
    """``open_clip.create_model`` with hub weights: the tag checked against open_clip's list, and
    the usual one-line message (local weights or random weights) when the hub is out of reach."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise ValueError(f"open_clip {model} has no pretrained tag {pretrained!r}; valid tags: {', '.join(tags) or 'none'}")
    hint = (f"Use a local checkpoint with backbone.weights=/path/to/{file_hint}.safetensors, "
            "or random weights with backbone.pretrained=null.")
    with hub_errors(f"open_clip {model}/{pretrained}", hint), open_clip_quietly():
        return open_clip.create_model(model, pretrained=pretrained, **kwargs)


class CLIPBackbone(Backbone):
    """A whole open_clip CLIP model (``self.model``); ``forward(x)`` gives the image embedding.

    ``model``/``pretrained``: any open_clip model name and pretrained tag (``open_clip.list_pretrained()``);
    default ViT-B-16 / openai (QuickGELU is forced for the ``openai`` tag, as those weights need).
    ``pretrained`` or ``weights`` may be a local file (safetensors or a weights-only torch state
    dict of the whole model, or of the visual tower only). ``towers=[visual]`` drops the text
    tower (visual-only use, e.g. VTAB with a Linear head). Extra keyword arguments go to
    ``open_clip.create_model`` (e.g. ``force_image_size``, or ``embed_dim``/``vision_cfg``/``text_cfg``
    overrides for tiny test models).
    """

    family = "clip"
    site_map = {
        "o": "attn.out_proj",
        "fc1": "mlp.c_fc",
        "fc2": "mlp.c_proj",
        "attn": "attn",
        "mlp": "mlp",
        "norm1": "ln_1",
        "norm2": "ln_2",
    }
    fused_qkv = "attn.in_proj"
    patch_embed_path = "model.visual.conv1"
    token_layout = "nld"
    towers = (VISUAL, TEXT)

    def __init__(self, model: str = "ViT-B-16", pretrained: str | None = "openai", weights: str | None = None,
                 towers=(VISUAL, TEXT), img_size: int | None = None, **kwargs: Any):
        import open_clip

        if img_size is not None:  # the runner's generic image-size key
            kwargs.setdefault("force_image_size", int(img_size))
        if model not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model!r}; see open_clip.list_models() (e.g. ViT-B-16, ViT-B-32, ViT-L-14)")
        towers = [towers] if isinstance(towers, str) else list(towers)
        bad = [t for t in towers if t not in self.towers]
        if bad or VISUAL not in towers:
            raise ValueError(f"backbone.towers={towers}: valid are [visual] or [visual, text]")
        if _is_path(pretrained) and not weights:
            pretrained, weights = None, pretrained
        if pretrained == "openai" and not weights:
            kwargs.setdefault("force_quick_gelu", True)  # the OpenAI weights were trained with QuickGELU
        if pretrained and not weights:
            clip = create_pretrained_open_clip(model, pretrained, "open_clip_model", **kwargs)
        else:
            with open_clip_quietly(no_hub_weights=True):  # random on purpose, or the file loaded below
                clip = open_clip.create_model(model, pretrained=None, **kwargs)
            if weights:
                _load_weights(clip, weights, model)
        visual = clip.visual
        if not hasattr(visual, "transformer"):
            raise ValueError(f"{model}: only ViT visual towers are supported (got {type(visual).__name__})")
        if not visual.transformer.batch_first:
            raise ValueError("open_clip towers that are not batch-first are not supported")
        text_owner_name = "text" if hasattr(clip, "text") else ""
        if TEXT in towers:
            owner = clip.text if hasattr(clip, "text") else clip
            if not hasattr(getattr(owner, "transformer", None), "resblocks"):
                raise ValueError(f"{model}: its text tower ({type(owner).__name__}) is not an open_clip transformer; "
                                 "use backbone.towers=[visual]")
            replace_multihead_attention(owner.transformer)
        else:
            _drop_text_tower(clip)
        replace_multihead_attention(visual)
        for t in ([visual.transformer] + ([(clip.text if hasattr(clip, "text") else clip).transformer] if TEXT in towers else [])):
            # open_clip reads the cast dtype from block 0's mlp.c_fc.weight, which an adapter may have wrapped
            t.get_cast_dtype = _param_dtype(t)
        tag = f"file:{Path(weights).name}" if weights else (pretrained or None)
        build = dict(kwargs)
        if list(towers) != [VISUAL, TEXT]:
            build["towers"] = list(towers)
        super().__init__(clip, model, tag, build)
        self._text_owner_name = text_owner_name
        self.built_towers = tuple(towers)
        for k, v in visual_tower_layout(visual).items():
            setattr(self, k, v)
        self.__dict__["_tokenizer"] = None

    # ------------------------------------------------------------------ towers and sites
    def available_towers(self) -> tuple[str, ...]:
        return self.built_towers

    def text_owner(self) -> nn.Module:
        """The module holding the text tower's parts (the CLIP itself, or ``.text`` for CustomTextCLIP)."""
        self.require_text("the text tower")
        return getattr(self.model, self._text_owner_name) if self._text_owner_name else self.model

    def require_text(self, what: str) -> None:
        if TEXT not in self.built_towers:
            raise ValueError(f"{what} needs CLIP's text tower, but this backbone was built with towers=[visual]; "
                             "build it with backbone.towers=[visual,text]")

    def tower_blocks(self, tower: str | None = None):
        if tower in (None, VISUAL):
            return self.model.visual.transformer.resblocks, "model.visual.transformer.resblocks", True
        if tower == TEXT:
            from zoo.sites import SiteError

            if TEXT not in self.built_towers:
                raise SiteError("tower 'text' is not built in this clip backbone (towers=[visual]); "
                                "build it with backbone.towers=[visual,text]")
            owner = self._text_owner_name + "." if self._text_owner_name else ""
            return self.text_owner().transformer.resblocks, f"model.{owner}transformer.resblocks", False
        raise ValueError(f"unknown tower {tower!r}; valid: {', '.join(self.towers)}")

    def parameter_tower(self, name: str) -> str | None:
        if name.startswith("model.visual."):
            return VISUAL
        if name in ("model.logit_scale", "model.logit_bias"):
            return None  # shared by both towers: trains with neither selection
        return TEXT

    def blocks_container(self) -> nn.Module:
        return self.model.visual.transformer.resblocks

    def blocks_path(self) -> str:
        return "model.visual.transformer.resblocks"

    def token_embedding_site(self):
        """The text tower's token embedding (kind ``token_embedding``), where CoOp puts its context."""
        from zoo.sites import Site

        owner = self.text_owner()
        path = f"model.{self._text_owner_name + '.' if self._text_owner_name else ''}token_embedding"
        return Site("token_embedding", -1, owner, "token_embedding", path, None, TEXT)

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        v = self.model.visual
        return v.ln_post(v.transformer(v._embeds(x))) if hasattr(v, "_embeds") else v(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_image(x, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """open_clip's ``encode_text``, each prompt run only up to its pooled (end-of-text) token.

        With a causal mask and end-of-text pooling, position p sees only tokens 0..p, so the padding
        after a prompt's end-of-text token never reaches its pooled feature: prompts are grouped by
        that length n and each group runs on its first n tokens, which gives the same features (tested
        to float tolerance) for Σ n_i token positions instead of 77 per prompt ("a photo of a {}."
        prompts: 7–20 tokens). Falls back to open_clip's own forward when the text tower is not causal
        with argmax/eos pooling (or has a CLS embedding).
        """
        self.require_text("encode_text")
        owner = self.text_owner()
        lengths = _pooled_lengths(owner, tokens)
        if lengths is None:
            return self.model.encode_text(tokens, normalize=normalize)
        groups = lengths.unique()  # sorted
        if len(groups) == 1:
            return _encode_text_prefix(owner, tokens[:, :int(groups[0])], normalize)
        order = torch.argsort(lengths, stable=True)
        parts = [_encode_text_prefix(owner, tokens[order[lengths[order] == n], :int(n)], normalize) for n in groups]
        return torch.cat(parts)[torch.argsort(order)]  # back to the prompts' order

    @property
    def logit_scale(self) -> torch.Tensor:
        """The learned temperature as a multiplier, ``exp(model.logit_scale)``."""
        return self.model.logit_scale.exp()

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def tokenizer(self):
        """open_clip's tokenizer for this model (the BPE vocabulary ships with open_clip: offline)."""
        if self.__dict__["_tokenizer"] is None:
            import open_clip

            with hub_errors(f"the tokenizer of open_clip {self.model_name}", "This model's tokenizer is on the HF hub; "
                            "use a model with open_clip's built-in tokenizer (e.g. ViT-B-16)."), open_clip_quietly():
                self.__dict__["_tokenizer"] = open_clip.get_tokenizer(self.model_name, context_length=self.context_length)
        return self.__dict__["_tokenizer"]

    def tokenize(self, texts: list[str] | str) -> torch.Tensor:
        self.require_text("tokenize")
        return self.tokenizer(texts)

    def preprocess(self, is_train: bool = False):
        """open_clip's image transform for this model (train: RandomResizedCrop; eval: resize + centre crop)."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        cfg = dict(getattr(self.model.visual, "preprocess_cfg", {}) or {})
        cfg.setdefault("size", self.data_config["input_size"][1:])
        return image_transform_v2(PreprocessCfg(**cfg), is_train=is_train)


def _pool_type(owner: nn.Module) -> tuple[str | None, int | None]:
    """(pool type, eos id) of a CLIP (``text_pool_type``) or a TextTransformer (``pool_type``)."""
    if hasattr(owner, "text_pool_type"):
        return owner.text_pool_type, getattr(owner, "text_eos_id", None)
    return getattr(owner, "pool_type", None), getattr(owner, "eos_id", None)


def _is_causal(mask: torch.Tensor | None) -> bool:
    """Whether ``mask`` is exactly the causal mask (bool: True above the diagonal; float: -inf there, 0 elsewhere)."""
    if mask is None or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    upper = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, upper))
    return bool(torch.equal(torch.isneginf(mask), upper)) and not bool(mask[~upper].any())


def _pooled_lengths(owner: nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """Per prompt, its pooled position + 1, when cutting the text there is exact (causal mask,
    argmax/eos pooling, no appended CLS embedding); ``None`` otherwise."""
    pool, eos = _pool_type(owner)
    if getattr(owner, "cls_emb", None) is not None or tokens.ndim != 2 or tokens.shape[0] == 0:
        return None
    if pool == "argmax":
        pos = tokens.argmax(dim=-1)
    elif pool == "eos" and eos is not None:
        hit = tokens == eos
        if not bool(hit.any(dim=-1).all()):
            return None
        pos = hit.int().argmax(dim=-1)
    else:
        return None
    if not _is_causal(getattr(owner, "attn_mask", None)):
        return None
    return pos + 1


def _encode_text_prefix(owner: nn.Module, tokens: torch.Tensor, normalize: bool) -> torch.Tensor:
    """open_clip's text forward (CLIP.encode_text / TextTransformer.forward without a CLS embedding)
    on a prefix of length n: positional embedding and causal mask cut to n."""
    from open_clip.transformer import text_global_pool

    n = tokens.shape[1]
    cast = owner.transformer.get_cast_dtype()
    x = owner.token_embedding(tokens).to(cast) + owner.positional_embedding[:n].to(cast)
    x = owner.transformer(x, attn_mask=owner.attn_mask[:n, :n])
    x = owner.ln_final(x)
    pool, eos = _pool_type(owner)
    x = text_global_pool(x, tokens, pool, eos_token_id=eos)
    proj = owner.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return F.normalize(x, dim=-1) if normalize else x


def _param_dtype(module: nn.Module):
    def get_cast_dtype() -> torch.dtype:
        return next(module.parameters()).dtype
    return get_cast_dtype


def _drop_text_tower(clip: nn.Module) -> None:
    """Remove the text tower's modules and parameters (visual-only use)."""
    if hasattr(clip, "text"):
        del clip.text
        return
    for name in ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection"):
        if hasattr(clip, name):
            delattr(clip, name)


def is_torchscript_archive(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with ``code/`` and ``constants.pkl``), e.g.
    OpenAI's ``ViT-B-16.pt`` from ``clip.load``."""
    import zipfile

    path = Path(path).expanduser()
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


TORCHSCRIPT_REFUSAL = (
    "{path} is a TorchScript archive (OpenAI's clip.load .pt); reading it needs torch.jit.load, which "
    "deserializes and runs the archive's own code (and open_clip's loader falls back to an unrestricted "
    "pickle), so it is refused. Use backbone.pretrained=openai (the same weights through open_clip), or "
    "convert it once where you trust the file: save_file(open_clip.load_openai_model('{path}', device='cpu')"
    ".state_dict(), 'clip.safetensors'), then backbone.weights=clip.safetensors backbone.kwargs.force_quick_gelu=true")


def _load_weights(clip: nn.Module, weights: str, model: str = "ViT-B-16") -> None:
    """A local whole-model (or visual-tower-only) state dict into ``clip``, checking the names."""
    import logging

    if is_torchscript_archive(weights):
        raise ValueError(TORCHSCRIPT_REFUSAL.format(path=weights, model=model))
    sd = load_state_dict_file(weights)
    if not any(k.startswith("visual.") for k in sd):  # a visual tower on its own
        sd = {f"visual.{k}": v for k, v in sd.items()}
    res = clip.load_state_dict(sd, strict=False)
    if res.unexpected_keys:
        raise ValueError(f"{weights}: {len(res.unexpected_keys)} tensors are not in this open_clip model "
                         f"(e.g. {res.unexpected_keys[0]!r}); is it a checkpoint of another model?")
    missing_visual = [k for k in res.missing_keys if k.startswith("visual.")]
    if missing_visual:
        raise ValueError(f"{weights}: the visual tower lacks {len(missing_visual)} tensors (e.g. {missing_visual[0]!r})")
    if res.missing_keys:
        logging.getLogger(__name__).warning("%s holds no text tower: %d text tensors stay random "
                                            "(fine for visual-only use)", weights, len(res.missing_keys))
