"""DyLoRA: one LoRA block whose every rank truncation is usable (Valipour et al., "DyLoRA:
Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation",
EACL 2023; reference ``huawei-noah/Efficient-NLP`` ``DyLoRA/loralib``).

LoRA factors ``A ∈ R^{r×d_in}`` (Kaiming-uniform), ``B ∈ R^{d_out×r}`` (zeros). Each training step one
rank index ``b ~ Uniform{0, …, r−1}`` is drawn for the whole model and only the first ``b+1``
components take part, both factors scaled by ``√(r/(b+1))``::

    ΔW_b = (α/r) · (r/(b+1)) · B[:, :b+1] A[:b+1, :] = α/(b+1) · B[:, :b+1] A[:b+1, :]

``frozen=True`` (the reference GLUE scripts): components ``0..b−1`` enter through ``.detach()``, so
only component ``b`` (column ``b`` of B, row ``b`` of A) gets gradient. Unused components get a zero
gradient, not none, so AdamW's momentum and weight decay still move them, as in the reference (its
factors are single tensors sliced per step).

Evaluation (``eval()``) and ``merge`` use ``eval_rank`` (default ``rank``): the same formula with
``b = eval_rank − 1`` and no detach; any ``eval_rank ≤ rank`` can be chosen after training.

The training-loop hook: :meth:`DyLoRA.on_train_step` (called by the tasks before each training
forward, ``zoo.on_train_step``) draws ``b`` from a generator seeded with ``(seed, step)``: a function of
the optimizer-step count, so every DDP rank and a run resumed from a checkpoint draw the same ranks as
an uninterrupted run (the reference draws ``torch.randint(0, r)`` from the global RNG in a Trainer
callback). A training forward before any ``on_train_step`` uses the full rank.

Trainable parameters: ``r (d_in + d_out)`` per adapted Linear (per q / v slice on a fused qkv).
Defaults: r = 8, α = 16, targets q and v (the reference's RoBERTa query / value).
"""
from __future__ import annotations

import torch
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, dropout_option, float_option, int_option
from zoo.adapters.linear_sites import linear_site_groups
from zoo.adapters.lora import LoRALinear


class DyLoRALinear(LoRALinear):
    """:class:`LoRALinear` whose factors are truncated to the first ``b+1`` components (``b`` set by the
    adapter each step in training, ``eval_rank − 1`` otherwise), with DyLoRA's ``r/(b+1)`` rescaling."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, slices=None,
                 frozen: bool = True, eval_rank: int | None = None):
        super().__init__(base, rank, alpha, dropout, slices)
        self.frozen = frozen
        self.eval_rank = rank if eval_rank is None else eval_rank
        self.train_b = rank - 1  # until the adapter's on_train_step sets it
        self._for_merge = False

    def active_b(self) -> int:
        return self.train_b if (self.training and not self._for_merge) else self.eval_rank - 1

    def _masks(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(self.rank, device=self.lora_A.device).repeat(len(self.slices))
        return idx <= b, idx < b

    def effective_A(self) -> torch.Tensor:
        b = self.active_b()
        used, before = self._masks(b)
        a = self.lora_A
        if self.frozen and self.training and not self._for_merge:
            a = torch.where(before[:, None], a.detach(), a)  # only component b learns
        # the r/(b+1) rescaling rides on A (a scalar: the product and both factors' gradients are those
        # of the reference's √(r/(b+1)) on each factor)
        return a * (used.to(a.dtype) * (self.rank / (b + 1)))[:, None]

    def effective_B(self, key: str) -> torch.Tensor:
        b = self.active_b()
        bm = self.lora_B[key]
        if self.frozen and self.training and not self._for_merge:
            before = torch.arange(self.rank, device=bm.device) < b
            bm = torch.where(before[None, :], bm.detach(), bm)
        return bm * (torch.arange(self.rank, device=bm.device) <= b).to(bm.dtype)[None, :]

    def delta_weight(self) -> torch.Tensor:
        self._for_merge = True  # merge folds the evaluation rank's delta
        try:
            return super().delta_weight()
        finally:
            self._for_merge = False


@register_adapter("dylora")
class DyLoRA(Adapter):
    """DyLoRA: LoRA trained at a rank sampled each step, usable at every rank up to ``rank``."""

    mergeable = True
    supports_slices = True
    paper = "Valipour et al., DyLoRA, EACL 2023"

    def __init__(self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets: list[str] = ("q", "v"),
                 layers="all", frozen: bool = True, eval_rank: int | None = None, seed: int = 0):
        super().__init__()
        self.rank = int_option("dylora", "rank", rank)
        self.alpha = float_option("dylora", "alpha", alpha)
        self.dropout = dropout_option("dylora", dropout)
        self.eval_rank = self.rank if eval_rank is None else int_option("dylora", "eval_rank", eval_rank, 1, self.rank)
        if not isinstance(frozen, bool):
            raise ValueError(f"adapter 'dylora': frozen must be true or false, got {frozen!r}")
        self.frozen, self.seed = frozen, int_option("dylora", "seed", seed, lo=0)
        self.targets, self.layers = list(targets), layers
        self.sampled: int | None = None  # the b of the current training step

    def attach(self, backbone) -> None:
        for site, slices in linear_site_groups(self, "DyLoRA"):
            self.replace(site, DyLoRALinear(site.module, self.rank, self.alpha, self.dropout, slices,
                                                self.frozen, self.eval_rank))

    def sample_rank(self, step: int) -> int:
        """``b ~ Uniform{0, …, r−1}`` for optimizer step ``step`` (a pure function of seed and step)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        return int(torch.randint(0, self.rank, (1,), generator=g))

    def on_train_step(self, step: int) -> None:
        self.sampled = self.sample_rank(step)
        for m in self.modules:
            m.train_b = self.sampled

    def set_eval_rank(self, eval_rank: int) -> None:
        """Choose the rank used in evaluation and merge (any ``1..rank``, no retraining)."""
        eval_rank = int_option("dylora", "eval_rank", eval_rank, 1, self.rank)
        if self.merged:
            raise RuntimeError("unmerge before changing DyLoRA's eval_rank")
        self.eval_rank = eval_rank
        self.config["eval_rank"] = eval_rank
        for m in self.modules:
            m.eval_rank = eval_rank
