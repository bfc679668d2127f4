"""Segmentation with PEFT: SAM's mask decoder (SAMed / SALT recipes), an smp decoder head, metrics,
losses and data (plain PyTorch; the Lightning task is ``tasks/segmentation.py``)."""
from zoo.seg.sam import SamPromptDecoder, SamSegmenter, logits_to_labels, prompts_from_mask, upsample

__all__ = ["SamPromptDecoder", "SamSegmenter", "logits_to_labels", "prompts_from_mask", "upsample"]
