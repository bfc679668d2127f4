"""open_clip CoCa as a zoo backbone for (video) captioning.

CoCa: Yu et al., "CoCa: Contrastive Captioners are Image-Text Foundation Models", TMLR 2022
(arXiv 2205.01917), in open_clip's implementation (``coca_ViT-B-32`` / ``coca_ViT-L-14``, tags
``laion2b_s13b_b90k`` and ``mscoco_finetuned_laion2b_s13b_b90k``).

The zoo's sites are those of the CLIP visual tower (:class:`zoo.backbones.clip.CLIPBackbone`,
same vocabulary: q,k,v,qkv,o,fc1,fc2,attn,mlp,norm1,norm2,tokens,patch_embed), so every adapter
attaches to ``model.visual.transformer.resblocks`` unchanged. The text tower and the multimodal
text decoder are frozen by default (``freeze_text=True``): the paper setting of Q-Adapter is a
frozen captioner whose *vision* encoder is adapted.

Video (``encode_video``; ``frames`` is (B, T, 3, H, W)), three frame-fusion choices following the
reference notes (``shared/reference/clip_fewshot_captioning.md`` §2.3):

* ``flatten`` (default; VideoCoCa, Yan et al., arXiv 2212.04979): every frame goes through the
  ViT, the T·(1+HW) tokens are concatenated and CoCa's *pretrained* attentional pooler reads
  them all, giving the usual (latent, image_embs) with 255 tokens (B-32) whatever T is;
* ``pool``: per-frame (latent, image_embs), averaged over T;
* ``concat``: per-frame image_embs concatenated to T·255 cross-attention tokens (latent
  averaged). The decoder's cross-attention has no positional encoding, so frame order is not
  visible in ``concat``/``flatten``. ``temporal_embedding=N`` adds a learnable embedding ``e_t``
  (N frame slots) to frame t's tokens, the option the reference notes give for (A) and (C): with
  ``flatten`` to frame t's ViT tokens (width) before the attentional pooler (VideoCoCa's place),
  with ``concat`` to frame t's caption tokens (embed_dim) before concatenation. It is
  **zero-initialised**, so the model starts exactly as without it, and the captioning task trains
  it whatever the adapter. ``pool`` refuses it (a per-frame constant averaged away).

Towers (the zoo's ``tower`` option, :func:`zoo.sites.select_towers`): ``visual`` (the default:
Q-Adapter's placement) and ``decoder``, the multimodal text decoder (``model.text_decoder``):
decoder block i is its causal self-attention block ``resblocks[i]`` together with its
cross-attention block ``cross_attn[i]`` (keys/values = image_embs), so ``q``/``k``/``v``/``qkv``/
``o``/``fc1``/``fc2``/``attn``/``mlp``/``norm1``/``norm2`` name two modules each (self, cross):
``adapter=lora tower=decoder`` is LoRA on the decoder's self- and cross-attention, the reference's
other PEFT placement (§2.3). The text encoder (``model.text``) and the logit scale belong to no
tower.

``vocab`` (a list of words; reconstruction for tiny models): the model's token table holds only
pad, the words' open_clip BPE tokens, SOT and EOT (in that order), ``vocab_size`` is set to that
count and ``tokenize``/``decode``/generation map between open_clip's ids and the compact ones.
The embedded tiny CoCa uses it so its softmax has ~20 entries instead of 49,408.

Generation: greedy / top-k / top-p decoding is the loop of open_clip's ``CoCa.generate`` written
out in plain torch (same min-length, repetition-penalty and warper semantics, same sampling
calls; a test checks token-for-token equality with open_clip's ``generate`` where it can run),
because open_clip 3.3's ``generate`` asserts on any transformers outside 4.41–4.56 (the
``caption`` extra pins ``transformers>=4.41,<4.57``). Beam search is open_clip's own diverse
beam search (``transformers.BeamSearchScorer``); without that transformers window it refuses
with one line naming the pin.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from zoo.backbones.base import Backbone
from zoo.backbones.clip import (CLIPBackbone, create_pretrained_open_clip, open_clip_quietly, replace_multihead_attention,
                                visual_tower_layout)
from zoo.backbones.weights import load_state_dict_file
from zoo.heads import register_head

FUSIONS = ("flatten", "pool", "concat")
VISUAL, DECODER = "visual", "decoder"
DECODING = ("greedy", "top_k", "top_p", "beam_search")
COCA_MODELS = ("coca_ViT-B-32", "coca_ViT-L-14")
SOT, EOT = 49406, 49407


class CoCaBackbone(Backbone):
    """open_clip ``CoCa`` (whole model in ``self.model``); sites on ``model.visual``.

    ``forward(x)`` gives the normalised contrastive image latent (``feature_dim = embed_dim``);
    ``forward_features(x)`` gives ``image_embs`` (the attentional pooler's caption tokens).
    Both accept images (B, 3, H, W) or videos (B, T, 3, H, W).
    """

    family = "coca"
    site_map = CLIPBackbone.site_map
    fused_qkv = CLIPBackbone.fused_qkv
    patch_embed_path = "model.visual.conv1"
    token_layout = "nld"

    def __init__(self, model: str = "coca_ViT-B-32", pretrained: str | None = "mscoco_finetuned_laion2b_s13b_b90k",
                 weights: str | None = None, fusion: str = "flatten", freeze_text: bool = True,
                 img_size: int | None = None, temporal_embedding: int = 0, vocab: list[str] | None = None,
                 **kwargs: Any):
        import open_clip

        if img_size is not None and "vision_cfg" not in kwargs:
            kwargs["force_image_size"] = int(img_size)
        table = _vocab_table(vocab) if vocab else None
        if table is not None:  # the compact token table sets both text vocab sizes
            for cfg in ("text_cfg", "multimodal_cfg"):
                given = (kwargs.get(cfg) or {}).get("vocab_size")
                if given not in (None, len(table)):
                    logging.getLogger(__name__).info("CoCa %s.vocab_size=%s replaced by the compact vocabulary's %d "
                                                     "tokens (backbone.vocab)", cfg, given, len(table))
                kwargs[cfg] = dict(kwargs.get(cfg) or {}, vocab_size=len(table))

        coca_names = [m for m in open_clip.list_models() if m.startswith("coca")]
        if model not in coca_names:
            raise ValueError(f"unknown CoCa model {model!r}; valid models: {', '.join(coca_names)}")
        if fusion not in FUSIONS:
            raise ValueError(f"unknown frame fusion {fusion!r}; valid fusions: {', '.join(FUSIONS)}")
        if temporal_embedding and fusion == "pool":
            raise ValueError("backbone.temporal_embedding needs backbone.fusion=flatten or concat (got fusion=pool): "
                             "averaging the frames leaves only the mean of the per-frame embeddings, a constant")
        if pretrained and not weights:
            coca = create_pretrained_open_clip(model, pretrained, "coca", **kwargs)
        else:
            with open_clip_quietly(no_hub_weights=True):  # random on purpose, or the file loaded below
                coca = open_clip.create_model(model, pretrained=None, **kwargs)
            if weights:
                sd = load_state_dict_file(weights)
                missing, unexpected = coca.load_state_dict(sd, strict=False)
                if unexpected or len(missing) == len(coca.state_dict()):
                    raise ValueError(f"{weights} is not a CoCa {model} state dict "
                                     f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
        if type(coca).__name__ != "CoCa":
            raise ValueError(f"{model} did not build an open_clip CoCa (got {type(coca).__name__})")
        if not (pretrained or weights):
            # open_clip 3.3 never runs MultimodalTransformer.init_parameters (it reads a missing
            # ``self.transformer``), leaving the decoder's output projection as torch.empty memory:
            # give it the init that method intends, so random models are seed-deterministic
            dec = coca.text_decoder
            nn.init.normal_(dec.text_projection, std=dec.width ** -0.5)
        visual = coca.visual
        if not hasattr(visual, "transformer") or not visual.transformer.batch_first:
            raise ValueError(f"{model}: only batch-first ViT vision towers are supported")
        # the explicit MHA inside the ViT blocks and the decoder's self/cross-attention blocks (the
        # two towers' sites; same outputs, tested against open_clip); the attentional pooler's MHA
        # has kdim != embed_dim and stays open_clip's own
        replace_multihead_attention(visual.transformer)
        replace_multihead_attention(coca.text_decoder)
        tag = f"file:{Path(weights).name}" if weights else (pretrained or None)
        build = dict(kwargs, fusion=fusion)
        if temporal_embedding:
            build["temporal_embedding"] = int(temporal_embedding)
        if vocab:
            build["vocab"] = list(vocab)
            for cfg in ("text_cfg", "multimodal_cfg"):
                build[cfg] = {k: v for k, v in build[cfg].items() if k != "vocab_size"}  # set by the vocab
        super().__init__(coca, model, tag, build)
        self.fusion = fusion
        # e_t, zero-init: the backbone starts as the order-blind concat (a new weight, not in the
        # fingerprint of the base model, which covers self.model only)
        dim = visual.transformer.width if fusion == "flatten" else visual.output_dim
        self.temporal_embedding = nn.Parameter(torch.zeros(int(temporal_embedding), dim)) if temporal_embedding else None
        self.register_buffer("token_table", table, persistent=False)
        if table is not None:
            to_compact = torch.full((int(table.max()) + 1,), -1, dtype=torch.long)
            to_compact[table] = torch.arange(len(table))
            self.register_buffer("to_compact", to_compact, persistent=False)
        self.sot_id, self.eot_id = (len(table) - 2, len(table) - 1) if table is not None else (SOT, EOT)
        for k, v in visual_tower_layout(visual).items():
            setattr(self, k, v)
        self.context_length = coca.context_length
        self.pad_id = coca.pad_id
        # the base text weights, fixed now: adapters attached later on the decoder tower add
        # parameters under model.text_decoder that are theirs, not the decoder's
        self.__dict__["_text_params"] = [*self.model.text.parameters(), *self.model.text_decoder.parameters(),
                                         self.model.logit_scale]
        if freeze_text:
            for p in self.text_parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------ structure
    towers = (VISUAL, DECODER)

    def blocks_container(self) -> nn.Module:
        return self.model.visual.transformer.resblocks

    def blocks_path(self) -> str:
        return "model.visual.transformer.resblocks"

    def tower_blocks(self, tower: str | None = None):
        if tower in (None, VISUAL):
            return self.blocks_container(), self.blocks_path(), True
        if tower == DECODER:
            return self.model.text_decoder.resblocks, "model.text_decoder.resblocks", False
        raise ValueError(f"unknown tower {tower!r}; valid: {', '.join(self.towers)}")

    def block_sites(self, i: int, tower: str | None = None):
        """Vision block i's sites, or (``tower="decoder"``) decoder layer i's: every kind names the
        self-attention block's module and the cross-attention block's, in that order."""
        if tower != DECODER:
            return super().block_sites(i, tower)
        dec = self.model.text_decoder
        table: dict[str, list] = {}
        for part, blocks in (("resblocks", dec.resblocks), ("cross_attn", dec.cross_attn)):
            prefix = f"model.text_decoder.{part}.{i}"
            for kind, (parent, attr, out_slice, rel) in _block_table(self, blocks[i]).items():
                table.setdefault(kind, []).append((parent, attr, out_slice, f"{prefix}.{rel}"))
        return table

    def parameter_tower(self, name: str) -> str | None:
        if name.startswith("model.visual."):
            return VISUAL
        if name.startswith("model.text_decoder."):
            return DECODER
        return None  # the text encoder, the logit scale, the temporal embedding: no tower's

    def text_parameters(self) -> Iterator[nn.Parameter]:
        """The text tower's, the multimodal decoder's and the logit scale's own weights (frozen by
        default; adapters' parameters on the decoder tower are not among them)."""
        yield from self.__dict__["_text_params"]

    def fusion_parameters(self) -> Iterator[nn.Parameter]:
        """New weights of the frame fusion (the temporal embedding), trained with any adapter."""
        if self.temporal_embedding is not None:
            yield self.temporal_embedding

    # ------------------------------------------------------------------ vision
    def encode_video(self, frames: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent (B, E), image_embs (B, N, E)) for images (B,3,H,W) or videos (B,T,3,H,W)."""
        v = self.model.visual
        if frames.dim() == 4:
            frames = frames.unsqueeze(1)
        if frames.dim() != 5:
            raise ValueError(f"expected images (B,3,H,W) or videos (B,T,3,H,W), got shape {tuple(frames.shape)}")
        b, t = frames.shape[:2]
        x = v.transformer(v._embeds(frames.flatten(0, 1)))  # (B·T, 1+HW, width)
        if self.fusion == "flatten":
            x = x.reshape(b, t, *x.shape[1:])
            if self.temporal_embedding is not None:
                x = x + self._frame_embedding(t)[:, None, :]
            pooled, tokens = v._pool(x.flatten(1, 2))
        else:
            pooled, tokens = v._pool(x)
            pooled = pooled.reshape(b, t, -1).mean(1)
            tokens = tokens.reshape(b, t, *tokens.shape[1:])
            if self.temporal_embedding is not None:  # concat (pool refuses it at construction)
                tokens = tokens + self._frame_embedding(t)[:, None, :]
            tokens = tokens.mean(1) if self.fusion == "pool" else tokens.flatten(1, 2)
        latent = pooled @ v.proj if v.proj is not None else pooled
        return (F.normalize(latent, dim=-1) if normalize else latent), tokens

    def _frame_embedding(self, t: int) -> torch.Tensor:
        if t > len(self.temporal_embedding):
            raise ValueError(f"{t} frames but backbone.temporal_embedding has {len(self.temporal_embedding)} "
                             "frame slots: raise it to at least data.num_frames")
        return self.temporal_embedding[:t]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_video(x)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_video(x)[0]

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        import open_clip

        ids = open_clip.tokenize(list(texts), context_length=self.context_length)
        if self.token_table is None:
            return ids
        known = ids < len(self.to_compact)
        compact = torch.where(known, self.to_compact[ids.clamp(max=len(self.to_compact) - 1)], -1)
        if (compact < 0).any():
            bad = sorted({open_clip.decode(torch.tensor([int(i)])).strip() for i in ids[compact < 0]})
            raise ValueError(f"caption word(s) {bad} are not in this CoCa's vocabulary (backbone.vocab); "
                             f"known: {' '.join(self.build_kwargs['vocab'])}")
        return compact

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token ids -> strings: drop ``<start_of_text>``, cut at ``<end_of_text>`` (open_clip README)."""
        import open_clip

        if self.token_table is not None:
            ids = self.token_table.to(ids.device)[ids]
        out = []
        for row in ids.tolist():
            row = [i for i in row if i != 0]
            text = open_clip.decode(torch.tensor(row, dtype=torch.long)) if row else ""
            out.append(text.split("<end_of_text>")[0].replace("<start_of_text>", "").strip())
        return out

    def caption_logits(self, frames: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced decoder logits (B, L-1, V) and labels ``text[:, 1:]`` (open_clip CoCa.forward)."""
        latent, embs = self.encode_video(frames)
        out = self.model(None, text, image_latent=latent, image_embs=embs)
        return out["logits"], out["labels"]

    def caption_loss(self, frames: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """CoCa's captioning loss: token cross-entropy, padding (id 0) ignored (open_clip CoCaLoss)."""
        logits, labels = self.caption_logits(frames, text)
        return F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=self.pad_id)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, frames: torch.Tensor, method: str = "greedy", seq_len: int = 30, max_seq_len: int = 77,
                 temperature: float = 1.0, top_k: int = 1, top_p: float = 0.1, num_beams: int = 6,
                 num_beam_groups: int = 3, min_seq_len: int = 5, repetition_penalty: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Caption token ids (B, ≤ seq_len), starting with SOT; finished rows are padded with 0.

        ``method``: greedy (argmax; open_clip's ``top_k`` with k=1) | top_k | top_p | beam_search.
        """
        if method not in DECODING:
            raise ValueError(f"unknown decoding method {method!r}; valid methods: {', '.join(DECODING)}")
        if seq_len <= min_seq_len:
            raise ValueError(f"seq_len ({seq_len}) must be larger than min_seq_len ({min_seq_len})")
        was_training = self.training
        self.eval()
        try:
            if method == "beam_search":
                return self._beam_search(frames, seq_len=seq_len, num_beams=num_beams, num_beam_groups=num_beam_groups,
                                         min_seq_len=min_seq_len, repetition_penalty=repetition_penalty)
            return self._sample(frames, method, seq_len, max_seq_len, temperature, top_k, top_p, min_seq_len,
                                repetition_penalty, generator)
        finally:
            self.train(was_training)

    def _sample(self, frames, method, seq_len, max_seq_len, temperature, top_k, top_p, min_seq_len,
                repetition_penalty, generator) -> torch.Tensor:
        """open_clip ``CoCa.generate``'s top-k/top-p loop, with transformers' processors in torch."""
        latent, embs = self.encode_video(frames)
        b, dev, pad = latent.shape[0], latent.device, self.pad_id
        sot, eot = self.sot_id, self.eot_id
        out = torch.full((b, 1), sot, dtype=torch.long, device=dev)
        while True:
            x = out[:, -max_seq_len:]
            cur_len = x.shape[1]
            logits = self.model(None, x, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
            done = (out[:, -1] == eot) | (out[:, -1] == pad)
            sample = torch.full((b, 1), pad, dtype=torch.long, device=dev)
            if done.all():
                break
            scores = logits[~done]
            ids = x[~done]
            if cur_len < min_seq_len:  # MinLengthLogitsProcessor
                scores[:, eot] = -float("inf")
            if repetition_penalty != 1.0:  # RepetitionPenaltyLogitsProcessor
                s = scores.gather(1, ids)
                scores = scores.scatter(1, ids, torch.where(s < 0, s * repetition_penalty, s / repetition_penalty))
            if method == "top_p":
                scores = _top_p(scores, top_p)
            else:
                scores = _top_k(scores, 1 if method == "greedy" else top_k)
            if cur_len + 1 == seq_len:
                sample[~done] = eot
            elif method == "greedy":
                sample[~done] = scores.argmax(-1, keepdim=True)
            else:
                probs = F.softmax(scores / temperature, dim=-1)
                sample[~done] = torch.multinomial(probs, 1, generator=generator)
            out = torch.cat([out, sample], dim=-1)
            if out.shape[1] >= seq_len:  # MaxLengthCriteria
                break
        return out

    def _beam_search(self, frames, **kw) -> torch.Tensor:
        from open_clip import coca_model

        if not coca_model._has_transformers:
            raise RuntimeError(
                "beam search runs open_clip's CoCa.generate, which needs transformers>=4.41,<4.57 "
                f"(installed: {_transformers_version()}); install the 'caption' extra or use method=greedy|top_k|top_p"
            )
        with self._video_encoder():
            return self.model.generate(frames, generation_type="beam_search", fixed_output_length=False,
                                       sot_token_id=self.sot_id, eos_token_id=self.eot_id, **kw)

    @contextmanager
    def _video_encoder(self):
        """Let open_clip's own ``generate`` read videos: its ``_encode_image`` becomes ours."""
        self.model._encode_image = lambda images, normalize=True: self.encode_video(images, normalize)
        try:
            yield
        finally:
            del self.model._encode_image


def _vocab_table(words: list[str]) -> torch.Tensor:
    """Compact id -> open_clip BPE id: pad (0), the words' tokens (sorted), SOT, EOT."""
    import open_clip

    if isinstance(words, str) or not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"backbone.vocab must be a list of words, got {words!r}")
    ids = open_clip.tokenize([" ".join(words)], context_length=4 * len(words) + 2)[0]
    body = sorted({int(i) for i in ids if int(i) not in (0, SOT, EOT)})
    return torch.tensor([0, *body, SOT, EOT], dtype=torch.long)


def _block_table(bb: Backbone, block: nn.Module) -> dict:
    """``kind -> (parent, attr, out_slice, relative path)`` of one open_clip residual block."""
    from zoo.backbones.base import _resolve
    from zoo.sites import unwrap

    block = unwrap(block)
    table = {kind: (*_resolve(block, rel), None, rel) for kind, rel in bb.site_map.items()}
    parent, attr = _resolve(block, bb.fused_qkv)
    d = unwrap(getattr(parent, attr)).out_features // 3
    table["qkv"] = (parent, attr, None, bb.fused_qkv)
    for j, kind in enumerate("qkv"):
        table[kind] = (parent, attr, slice(j * d, (j + 1) * d), f"{bb.fused_qkv}[{kind}]")
    return table


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """transformers ``TopKLogitsWarper`` (min_tokens_to_keep=1)."""
    k = min(max(int(k), 1), scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, -float("inf"))


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers ``TopPLogitsWarper`` (min_tokens_to_keep=1): keep the smallest set with mass ≥ top_p."""
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))


def _transformers_version() -> str:
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:
        return "none"


@register_head("coca_captioner")
class CoCaCaptioner(nn.Module):
    """A :class:`CoCaBackbone` as a captioner (the "head" of the captioning task; it adds no weights).

    ``forward({"frames", "text"})`` -> teacher-forced logits (B, L-1, V) (labels are ``text[:, 1:]``);
    ``forward(frames)`` -> the image/video latent; ``generate(frames, **options)`` -> token ids.
    """

    def __init__(self, backbone: CoCaBackbone):
        super().__init__()
        self.backbone = backbone  # a CoCaBackbone (the captioning task checks backbone=coca)

    def head_spec(self) -> dict:
        return {"type": "coca_captioner"}

    @classmethod
    def from_spec(cls, backbone: CoCaBackbone, spec: dict) -> "CoCaCaptioner":
        return cls(backbone)

    def forward(self, x):
        if isinstance(x, dict):
            return self.backbone.caption_logits(x["frames"], x["text"])[0]
        return self.backbone(x)

    def generate(self, frames: torch.Tensor, **options: Any) -> torch.Tensor:
        return self.backbone.generate(frames, **options)
