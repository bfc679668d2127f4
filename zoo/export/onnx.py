"""ONNX export for inference, through torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``).

What the graph computes (inputs -> outputs):

The batch axis is dynamic (SAM's graphs take one image).

* ViT / AST / any ``zoo.ImageClassifier``: ``input`` (images ``(B, 3, H, W)``; AST fbanks ``(B, T, F)``)
  -> ``logits`` (or the pooled feature for a bare backbone);
* CLIP's zero-shot classifier (``zoo.zeroshot.CLIPClassifier``): ``input`` images -> ``logits`` (the class
  text embeddings are constants in the graph);
* SAM (``zoo.backbones.sam_decoder.SamSegmenter``): in ``semantic`` mode ``input`` -> the K+1 class logits; otherwise the image
  encoder + prompt encoder + mask decoder with a point prompt (:class:`SamPointPrompt`): ``input``
  ``(1, 3, H, W)``, ``point_coords`` ``(1, N, 2)`` (pixels of the input), ``point_labels`` ``(1, N)``
  (1 foreground, 0 background) -> ``masks`` ``(1, 1, H/4, W/4)`` logits and ``iou`` ``(1, 1)``.

``merged=None`` (the default) merges the adapters into the weights first when every method can merge
(a graph with no adapter ops; the model passed in is not changed) and exports the adapted modules
otherwise; ``True`` insists on merging, ``False`` keeps the adapters' own ops.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from zoo.export.naming import ExportError
from zoo.io import write_together


class SamPointPrompt(nn.Module):
    """SAM's image encoder, prompt encoder and mask decoder for one image and one set of points.

    The point embedding is segment_anything's ``PromptEncoder._embed_points`` (with its padding point,
    as ``SamSegmenter`` calls it without boxes) written with ``torch.where`` instead of in-place
    boolean-mask writes, as segment_anything's own ``SamOnnxModel`` does, so the graph has no
    data-dependent indexing. The output is the single-mask logit (mask token 0), as
    ``SamSegmenter(x, points=...)`` in ``prompted`` mode.
    """

    def __init__(self, segmenter: nn.Module):
        super().__init__()
        self.backbone = segmenter.backbone
        self.prompt_encoder = segmenter.decoder.prompt_encoder
        self.mask_decoder = segmenter.decoder.mask_decoder

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        coords = torch.cat([coords + 0.5, torch.zeros_like(coords[:, :1])], dim=1)
        labels = torch.cat([labels.to(coords.dtype), -torch.ones_like(labels[:, :1], dtype=coords.dtype)], dim=1)
        emb = pe.pe_layer.forward_with_coords(coords, pe.input_image_size)
        lab = labels[..., None]
        emb = torch.where(lab == -1, pe.not_a_point_embed.weight.expand_as(emb), emb)
        emb = emb + torch.where(lab == 0, pe.point_embeddings[0].weight, torch.zeros_like(emb))
        emb = emb + torch.where(lab == 1, pe.point_embeddings[1].weight, torch.zeros_like(emb))
        return emb

    def forward(self, image: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor):
        emb = self.backbone.forward_features(image)
        pe = self.prompt_encoder
        sparse = self.embed_points(point_coords, point_labels)
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *pe.image_embedding_size)
        masks, iou = self.mask_decoder.predict_masks(image_embeddings=emb, image_pe=pe.get_dense_pe(),
                                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
        return masks[:, :1], iou[:, :1]


def graph_of(model: nn.Module) -> tuple[nn.Module, tuple, list[str], list[str]]:
    """``(module to export, example inputs, input names, output names)`` for ``model``."""
    from zoo.api import find_backbone

    bb = find_backbone(model)
    if type(model).__name__ == "SamSegmenter" and model.mode != "semantic":
        if model.mode == "text":
            raise ExportError("SAM's text-prompt mode runs a CLIP text tower per class; export mode=prompted or semantic")
        size = bb.img_size
        return (SamPointPrompt(model), (torch.randn(1, 3, size, size), torch.tensor([[[size / 2, size / 3]]]),
                                        torch.ones(1, 1, dtype=torch.int64)),
                ["input", "point_coords", "point_labels"], ["masks", "iou"])
    if bb.family == "ast":
        x = torch.randn(1, bb.max_length, bb.num_mel_bins)
    else:
        x = torch.randn(1, *bb.data_config["input_size"])
    return model, (x,), ["input"], ["logits" if model is not bb else "features"]


def export_onnx(model: nn.Module, path: str | os.PathLike, merged: bool | None = None) -> Path:
    """Write ``model`` (in eval mode) as an ONNX graph to ``path`` (module docstring)."""
    from zoo.api import find_backbone
    from zoo.export.merged import merged_copy

    bb = find_backbone(model)
    can_merge = all(a.mergeable for a in bb.adapters)
    if merged or (merged is None and can_merge and bb.adapters):
        model = merged_copy(model)  # refuses a method that cannot merge, naming it
        bb = find_backbone(model)
    was_training = model.training
    model.eval()
    module, args, inputs, outputs = graph_of(model)
    module.eval()
    # timm's SAM attention calls scaled_dot_product_attention on 3-D (B·heads, N, d) tensors, which the
    # exporter's SDPA translation (onnxscript) refuses ("only 4D query, key, and value are supported"):
    # export timm's own unfused path (the same softmax(q·kᵀ·scale + rel-pos bias)·v) instead
    unfused = [m for m in bb.modules() if getattr(m, "fused_attn", False) and bb.family == "sam"]
    for m in unfused:
        m.fused_attn = False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            # the batch axis stays free (SAM: one image, as segment_anything's own ONNX decoder)
            dynamic = None if bb.family == "sam" else ({0: torch.export.Dim("batch", min=1, max=4096)},)
            program = torch.onnx.export(module, args, dynamo=True, input_names=inputs, output_names=outputs,
                                        dynamic_shapes=dynamic, optimize=True, verbose=False)
    except Exception as e:
        raise ExportError(f"torch's dynamo ONNX exporter failed on this {bb.family} model: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        model.train(was_training)
        for m in unfused:
            m.fused_attn = True
    # model.onnx and the weights torch puts beside it past 2 GB (model.onnx.data) as one set, model.onnx last
    # (onnxruntime opens it first and reads the weights it names): a failed write leaves the previous export
    # whole, a crash no model.onnx beside other weights; a model.onnx.data of an earlier, larger export goes
    write_together(path.parent, {path.name: lambda dest: program.save(str(dest))}, last=path.name,
                   stale=[f"{path.name}.data"])
    return path
