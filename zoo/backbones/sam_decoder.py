"""SAM as a segmenter: timm image encoder (a zoo backbone) + segment_anything's prompt encoder and
mask decoder (the task head).

Kirillov et al., "Segment Anything", ICCV 2023 (``segment_anything`` package). Two modes:

* ``semantic`` (SAMed: Zhang & Liu, arXiv 2304.13785): the decoder is built with
  ``num_multimask_outputs = K`` so it has K+1 mask tokens (background + K classes); it is called
  with no prompts (empty sparse embeddings, the learned ``no_mask_embed`` as dense embedding) and
  *all* K+1 masks are returned as class logits ``(B, K+1, 4h, 4w)`` at a quarter of the input
  resolution ("low-res"). ``mask_tokens``, ``output_hypernetworks_mlps`` and ``iou_prediction_head``
  are not loaded from the checkpoint (SAMed re-initialises them, whatever K).
* ``prompted`` (interactive-SAM fine-tuning, e.g. MedSAM): per image, one prompt per class present in
  the ground truth (a positive point or a box, :func:`prompts_from_mask`); the decoder's single-mask
  output (token 0, SAM's ``multimask_output=False``) is that class's binary logit. Classes without a
  prompt get the constant logit ``EMPTY_LOGIT`` (no prompt, no mask). Output ``(B, K, 4h, 4w)``.

The decoder head trains according to ``train_decoder``: ``all`` (SAMed: prompt encoder + mask
decoder), ``no_transformer`` (SAMed_s: the two-way transformer frozen, adapted by
``tower=decoder`` LoRA), ``norms`` (only LayerNorms, as SALT's "norms trainable"), ``none``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.backbones.sam import SAMBackbone, SamDecoderTower, is_sam_checkpoint
from zoo.backbones.weights import WeightsUnavailableError, load_state_dict_file
from zoo.heads import register_head

MODES = ("semantic", "prompted", "text")
BINARY_MODES = ("prompted", "text")  # per-class binary logits (K channels), not K+1 softmax
TRAIN_DECODER = ("all", "no_transformer", "norms", "none")
PROMPTS = ("point", "box")
REINIT_KEYS = ("mask_tokens", "output_hypernetworks_mlps", "iou_prediction_head")
EMPTY_LOGIT = -20.0


def _segment_anything():
    try:
        from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise ImportError("SAM's mask decoder needs segment_anything: pip install -e '.[seg]' "
                          "(or pip install segment-anything --no-deps)") from e
    return MaskDecoder, PromptEncoder, TwoWayTransformer


class SamPromptDecoder(nn.Module):
    """segment_anything's ``PromptEncoder`` + ``MaskDecoder`` (TwoWayTransformer), sized like SAM's
    ``build_sam`` (dim 256, depth 2, MLP 2048, 8 heads, mask_in_chans 16, IoU head 3x256)."""

    def __init__(self, embed_dim: int = 256, img_size: int = 1024, grid: int = 64, num_multimask_outputs: int = 3,
                 depth: int = 2, mlp_dim: int = 2048, num_heads: int = 8, mask_in_chans: int = 16,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256):
        super().__init__()
        MaskDecoder, PromptEncoder, TwoWayTransformer = _segment_anything()
        self.config = dict(embed_dim=embed_dim, img_size=img_size, grid=grid, num_multimask_outputs=num_multimask_outputs,
                           depth=depth, mlp_dim=mlp_dim, num_heads=num_heads, mask_in_chans=mask_in_chans,
                           iou_head_depth=iou_head_depth, iou_head_hidden_dim=iou_head_hidden_dim)
        self.prompt_encoder = PromptEncoder(embed_dim=embed_dim, image_embedding_size=(grid, grid),
                                            input_image_size=(img_size, img_size), mask_in_chans=mask_in_chans)
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=num_multimask_outputs,
            transformer=TwoWayTransformer(depth=depth, embedding_dim=embed_dim, mlp_dim=mlp_dim, num_heads=num_heads),
            transformer_dim=embed_dim, iou_head_depth=iou_head_depth, iou_head_hidden_dim=iou_head_hidden_dim,
        )

    def load_sam_state(self, state: dict[str, torch.Tensor], source: str, reinit_heads: bool) -> list[str]:
        """Load ``prompt_encoder.* / mask_decoder.*`` of a SAM checkpoint; return the keys left at init.

        With ``reinit_heads`` the mask tokens, hypernetwork MLPs and IoU head keep their fresh
        initialisation (SAMed). Any other missing key or shape mismatch is an error naming it.
        """
        want = {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
        if not want:
            raise WeightsUnavailableError(
                f"{source} has no prompt_encoder.* / mask_decoder.* tensors: give the original SAM checkpoint "
                f"(sam_vit_b_01ec64.pth) or a decoder file saved from it as decoder_weights="
            )
        own = self.state_dict()
        skip = [k for k in own if reinit_heads and any(f"mask_decoder.{r}" in k for r in REINIT_KEYS)]
        missing = [k for k in own if k not in want and k not in skip]
        shapes = [f"{k}: file {tuple(want[k].shape)}, model {tuple(own[k].shape)}"
                  for k in own if k in want and k not in skip and want[k].shape != own[k].shape]
        if missing or shapes:
            raise WeightsUnavailableError(
                f"{source}: the decoder does not match this SAM (decoder dim {self.config['embed_dim']}, "
                f"{self.config['num_multimask_outputs'] + 1} mask tokens); use the decoder of the same SAM size "
                f"as the encoder. " + (f"missing {missing[:5]} " if missing else "") + "; ".join(shapes[:3])
            )
        self.load_state_dict({k: v for k, v in want.items() if k in own and k not in skip}, strict=False)
        return skip

    def dense_pe(self) -> torch.Tensor:
        return self.prompt_encoder.get_dense_pe()


@register_head("sam_mask_decoder")
class SamSegmenter(nn.Module):
    """``backbone`` (:class:`SAMBackbone`) + SAM's prompt encoder and mask decoder.

    ``forward(x)`` (semantic) -> ``(B, K+1, 4h, 4w)`` logits; ``forward(x, points=, boxes=)`` in
    prompted mode -> ``(B, K, 4h, 4w)``. ``decoder_weights``: a SAM checkpoint (default: the
    backbone's ``weights`` file when it is one) or ``None`` for a fresh decoder.
    """

    def __init__(self, backbone: SAMBackbone, num_classes: int, mode: str = "semantic",
                 decoder_weights: str | None = "auto", train_decoder: str = "all", reinit_heads: bool | None = None,
                 decoder: dict | None = None, text: dict | None = None):
        super().__init__()
        if not isinstance(backbone, SAMBackbone):
            raise ValueError(f"SamSegmenter needs backbone=sam, got {getattr(backbone, 'family', type(backbone).__name__)!r}")
        if mode not in MODES:
            raise ValueError(f"unknown SAM mode {mode!r}; valid: {', '.join(MODES)}")
        if train_decoder not in TRAIN_DECODER:
            raise ValueError(f"unknown train_decoder {train_decoder!r}; valid: {', '.join(TRAIN_DECODER)}")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1 foreground classes (got {num_classes})")
        self.backbone = backbone
        self.num_classes, self.mode, self.train_decoder = int(num_classes), mode, train_decoder
        dec_cfg = dict(decoder or {})
        dec_cfg.setdefault("num_multimask_outputs", self.num_classes if mode == "semantic" else 3)
        self.decoder = SamPromptDecoder(embed_dim=backbone.out_chans, img_size=backbone.img_size,
                                        grid=backbone.grid_size[0], **dec_cfg)
        if decoder_weights == "auto":
            decoder_weights = backbone.weights_path
            if decoder_weights and not is_sam_checkpoint(load_state_dict_file(decoder_weights)):
                decoder_weights = None  # a timm encoder file: the decoder starts fresh unless given
        self.decoder_weights = str(decoder_weights) if decoder_weights else None
        self.reinit_heads = (mode == "semantic") if reinit_heads is None else bool(reinit_heads)
        self.text = self._text_prompts(text) if mode == "text" else None
        if self.decoder_weights:
            if not Path(self.decoder_weights).is_file():
                raise FileNotFoundError(f"decoder_weights file not found: {self.decoder_weights}")
            self.decoder.load_sam_state(load_state_dict_file(self.decoder_weights), self.decoder_weights, self.reinit_heads)
        else:
            # a fresh decoder: draw the Fourier-feature matrix (a buffer, never in an artifact) from a
            # fixed generator, so a rebuilt model (eval.py, from_zoo) has the same one (SAM: N(0, 1))
            pe = self.decoder.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
            pe.copy_(torch.randn(pe.shape, generator=torch.Generator().manual_seed(0)))
        self._mark_decoder()
        if self.text is not None:
            self.text.requires_grad_(True)  # SALT trains the text affine layer ("Text_Embedding_Affine")
        self.__dict__["_towers"] = {}

    def _text_prompts(self, text: dict | None):
        """The :class:`~zoo.backbones.sam_text_prompt.TextPromptEncoder` of ``text`` = ``{class_names, clip |
        embeddings, learned}`` (or ``{dim}`` when rebuilding from an artifact, which holds the embeddings)."""
        from zoo.backbones.sam_text_prompt import TextPromptEncoder, class_text_embeddings

        t = dict(text or {})
        if t.get("dim") is not None and not t.get("class_names"):
            emb = torch.zeros(self.num_classes, int(t["dim"]))  # filled by load_adapter
        else:
            names = t.get("class_names")
            if not names or len(names) != self.num_classes:
                raise ValueError(f"sam.mode=text needs the {self.num_classes} class names (task.class_names), "
                                 f"got {names}")
            emb = class_text_embeddings(names, t.get("clip"), t.get("embeddings"))
        return TextPromptEncoder(emb, self.backbone.out_chans, bool(t.get("learned", False)))

    # ------------------------------------------------------------------ training / towers
    def _mark_decoder(self) -> None:
        for name, p in self.decoder.named_parameters():
            if self.train_decoder == "all":
                train = True
            elif self.train_decoder == "no_transformer":
                train = ".transformer." not in f".{name}"
            elif self.train_decoder == "norms":
                train = "norm" in name
            else:
                train = False
            p.requires_grad_(train)

    towers = ("encoder", "decoder")

    def tower(self, name: str):
        """The site provider for ``tower=name``: the image encoder or the decoder's transformer."""
        if name == "encoder":
            return self.backbone
        if name != "decoder":
            raise ValueError(f"unknown tower {name!r}; SAM has: {', '.join(self.towers)}")
        if "decoder" not in self._towers:
            self._towers["decoder"] = SamDecoderTower(self.decoder.mask_decoder.transformer, self.backbone)
        return self._towers["decoder"]

    def head_spec(self) -> dict[str, Any]:
        spec = {"type": "sam_mask_decoder", "mode": self.mode, "num_classes": self.num_classes,
                "train_decoder": self.train_decoder, "reinit_heads": self.reinit_heads, **self.decoder.config}
        if self.text is not None:
            spec["text"] = {"dim": int(self.text.text_embeddings.shape[1]), "learned": self.text.learned is not None}
        return spec

    @classmethod
    def from_spec(cls, backbone: SAMBackbone, spec: dict[str, Any]) -> "SamSegmenter":
        """Rebuild from an artifact's ``head`` record; frozen decoder parts come from the
        backbone's SAM checkpoint (``decoder_weights="auto"``), trained ones from the artifact."""
        derived = ("embed_dim", "img_size", "grid")
        import inspect

        params = inspect.signature(SamPromptDecoder.__init__).parameters
        dec = {k: v for k, v in spec.items() if k in params and k not in derived}
        return cls(backbone, int(spec["num_classes"]), mode=spec.get("mode", "semantic"),
                   train_decoder=spec.get("train_decoder", "all"), reinit_heads=spec.get("reinit_heads"), decoder=dec,
                   text=spec.get("text"))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None = None,
                boxes: torch.Tensor | None = None, present: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.backbone.forward_features(x)
        if self.mode == "semantic":
            return self.decode_semantic(emb)
        if self.mode == "text":
            return self.decode_text(emb)
        return self.decode_prompted(emb, points, boxes, present)

    def decode_semantic(self, emb: torch.Tensor) -> torch.Tensor:
        """No prompts; all K+1 mask tokens' masks (SAMed ``forward`` with the slicing removed)."""
        pe, md = self.decoder.prompt_encoder, self.decoder.mask_decoder
        sparse, dense = pe(points=None, boxes=None, masks=None)  # batch 1, broadcast over images
        masks, _ = md.predict_masks(image_embeddings=emb, image_pe=pe.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
        return masks

    def decode_text(self, emb: torch.Tensor) -> torch.Tensor:
        """One text token per class (S-SAM / SALT ``Prompt_Adapted_SAM.forward``): sparse = [no-prompt
        sparse (empty); affine(CLIP(name))], dense = ``no_mask_embed``, mask token 0 per class."""
        B, K = emb.shape[0], self.num_classes
        pe, md = self.decoder.prompt_encoder, self.decoder.mask_decoder
        sparse, dense = pe(points=None, boxes=None, masks=None)  # (1, 0, C), (1, C, h, w)
        tokens = self.text(B)  # (B·K, 1, C), image-major
        out = []
        for i in range(B):
            sp = torch.cat([sparse.expand(K, -1, -1), tokens[i * K:(i + 1) * K]], dim=1)
            masks, _ = md.predict_masks(image_embeddings=emb[i:i + 1], image_pe=pe.get_dense_pe(),
                                        sparse_prompt_embeddings=sp, dense_prompt_embeddings=dense)
            out.append(masks[:, 0])  # multimask_output=False
        return torch.stack(out)

    def decode_prompted(self, emb: torch.Tensor, points, boxes, present) -> torch.Tensor:
        """Per image, one prompt per present class -> that class's single-mask logit."""
        if points is None and boxes is None:
            raise ValueError("mode=prompted needs points or boxes (zoo.backbones.sam_decoder.prompts_from_mask builds them from a mask)")
        B, K = emb.shape[0], self.num_classes
        if present is None:
            present = torch.ones(B, K, dtype=torch.bool, device=emb.device)
        pe, md = self.decoder.prompt_encoder, self.decoder.mask_decoder
        g = 4 * emb.shape[-1]
        out = emb.new_full((B, K, g, g), EMPTY_LOGIT)
        for i in range(B):
            ks = present[i].nonzero().flatten()
            if len(ks) == 0:
                continue
            pts = None if points is None else (points[0][i, ks], points[1][i, ks])
            bxs = None if boxes is None else boxes[i, ks]
            sparse, dense = pe(points=pts, boxes=bxs, masks=None)
            masks, _ = md.predict_masks(image_embeddings=emb[i:i + 1], image_pe=pe.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
            out[i, ks] = masks[:, 0]
        return out

    def predict(self, x: torch.Tensor, size: tuple[int, int] | None = None, **prompts) -> torch.Tensor:
        """Class-index map ``(B, H, W)`` at ``size`` (default: the input size)."""
        logits = upsample(self(x, **prompts), size or tuple(x.shape[-2:]))
        return logits_to_labels(logits, self.mode)


    def predict_image(self, image: torch.Tensor, pipeline: str = "longest_side", **prompts) -> torch.Tensor:
        """Class-index map ``(H, W)`` of one image ``(3, H, W)`` in [0, 1] at its own size, through SAM's
        predictor pipeline (``longest_side``: resize the longest side, normalise, pad; :mod:`zoo.backbones.sam_transforms`)
        or a square resize (``square``, SAMed's)."""
        from zoo.backbones.sam_transforms import predict_image

        dc = self.backbone.data_config
        logits = predict_image(lambda x: self(x, **prompts), image, int(self.backbone.img_size), dc.get("mean"),
                               dc.get("std"), pipeline)
        return logits_to_labels(logits, self.mode)[0]


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, ``align_corners=False`` (SAM's ``postprocess_masks``)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def logits_to_labels(logits: torch.Tensor, mode: str = "semantic") -> torch.Tensor:
    """semantic: argmax over K+1 channels; prompted / text: the best class whose logit is > 0, else 0."""
    if mode == "semantic":
        return logits.argmax(1)
    best, idx = logits.max(1)
    return torch.where(best > 0, idx + 1, torch.zeros_like(idx))


def prompts_from_mask(mask: torch.Tensor, num_classes: int, kind: str = "point", jitter: int = 0,
                      generator: torch.Generator | None = None):
    """Prompts for classes 1..K of index masks ``(B, H, W)`` in pixel (x, y) coordinates.

    ``point``: the class pixel farthest from the class border (chessboard distance; a random class
    pixel when ``jitter`` > 0 in training); ``box``: the tight box, each side moved by up to
    ``jitter`` pixels (MedSAM perturbs boxes by 0-20 px). Returns ``(points, boxes, present)`` with
    points ``((B, K, 1, 2), (B, K, 1))`` or ``None``, boxes ``(B, K, 4)`` or ``None``, present ``(B, K)``.
    """
    if kind not in PROMPTS:
        raise ValueError(f"unknown prompt kind {kind!r}; valid: {', '.join(PROMPTS)}")
    B, H, W = mask.shape
    present = torch.zeros(B, num_classes, dtype=torch.bool)
    coords = torch.zeros(B, num_classes, 1, 2)
    boxes = torch.zeros(B, num_classes, 4)
    for b in range(B):
        for k in range(1, num_classes + 1):
            m = mask[b] == k
            if not m.any():
                continue
            present[b, k - 1] = True
            ys, xs = m.nonzero(as_tuple=True)
            if kind == "box":
                box = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()
                if jitter:
                    box += torch.randint(-jitter, jitter + 1, (4,), generator=generator).float()
                    box = box.clamp(min=0).clamp(max=torch.tensor([W - 1, H - 1, W - 1, H - 1]).float())
                boxes[b, k - 1] = box
            else:
                if jitter:
                    j = int(torch.randint(len(xs), (1,), generator=generator))
                    y, x = ys[j], xs[j]
                else:
                    y, x = _deepest_pixel(m)
                coords[b, k - 1, 0] = torch.tensor([float(x), float(y)])  # SAM adds the 0.5 itself
    if kind == "box":
        return None, boxes, present
    labels = torch.ones(B, num_classes, 1, dtype=torch.long)
    return (coords, labels), None, present


def _deepest_pixel(m: torch.Tensor) -> tuple[int, int]:
    """The pixel of mask ``m`` with the largest chessboard distance to the background (erosion)."""
    cur = m.float()[None, None]
    last = cur
    while cur.sum() > 0:
        last = cur
        cur = -F.max_pool2d(-F.pad(cur, (1, 1, 1, 1), value=0.0), 3, stride=1)
    ys, xs = last[0, 0].nonzero(as_tuple=True)
    j = len(ys) // 2
    return int(ys[j]), int(xs[j])


def sam_state_dict(model: SamSegmenter) -> dict[str, torch.Tensor]:
    """The model in segment_anything's key layout (``image_encoder.*`` with ``mlp.lin*``,
    ``prompt_encoder.*``, ``mask_decoder.*``): the inverse of timm's SAM checkpoint filter.
    Adapters must be merged or absent (the plain weights are written)."""
    if model.backbone.adapters:
        raise ValueError("merge or remove the adapters first (zoo.merge_adapters(model, unload=True))")
    state = {}
    for k, v in model.backbone.model.state_dict().items():
        if k.startswith("head."):
            continue
        state["image_encoder." + k.replace("mlp.fc", "mlp.lin")] = v.detach().cpu().contiguous()
    for k, v in model.decoder.state_dict().items():
        state[k] = v.detach().cpu().contiguous()
    return state


def save_sam_checkpoint(model: SamSegmenter, path: str | Path) -> Path:
    """Write :func:`sam_state_dict` as a torch file (tensors only: loads with ``weights_only=True``)."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(sam_state_dict(model), tmp)
    os.replace(tmp, path)
    return path
