"""Regularized mask tuning (R-AMT): Zheng, Wu et al., "Regularized Mask Tuning: Uncovering Hidden
Knowledge in Pre-trained Vision-Language Models", ICCV 2023 (arXiv 2307.15049); reference code
github.com/wuw2019/R-AMT (``code/modules/masklayers.py``, ``code/trainers/masktuning.py``).

No weight is changed: every masked weight ``W`` (frozen) gets a real-valued score ``S`` of the same
shape (trainable) and is replaced by a binary selection of itself::

    M = 1[S > τ]                     (straight-through: ∂M/∂S := 1)
    W_eff = M ⊙ W

``S`` starts at the constant ``init_score`` = 1e-2 > τ = 5e-3, so ``M`` is all ones and the model
starts exactly at the pretrained function. Masked sites, as in the reference: the attention
projections (Wq, Wk, Wv — row blocks of the fused qkv Linear — and Wo) of every block, plus the
patch-embedding convolution; biases, norms and embeddings stay frozen and unmasked.

Losses and gradients per step (reference ``masktuning.py``)::

    L_a = CE(f_M(x), y) + β · Σ_layers ||S_layer||_2          (β = reg_weight = 1e-4; plain L2 norm)
    L_b = -Σ softmax(t/T) · log softmax(f_M(x)/T) · T²       (t = logits of the unmasked model)
    g_a = ∇_S L_a,  g_b = ∇_S L_b
    P   = ½ (1 + sign(g_a) · (g_a + g_b) / (|g_a| + |g_b| + 1e-8))  ∈ [0, 1]
    grad = ((1 - λ) + λ · 1[P > U]) · g_a,   U ~ Uniform(0, 1) element-wise

Only ``g_a`` is applied; ``g_b`` (distillation towards the frozen teacher) only decides which elements
of ``g_a`` are dropped (gradient-dropout regularisation, GDR). In this library the task's backward
produces ``g_a`` (task loss + the ``extra_loss`` score regulariser); ``extra_loss`` additionally runs
the teacher (the same model with every mask switched off, under ``no_grad``) and computes ``g_b``
with ``torch.autograd.grad``; ``before_optimizer_step`` applies GDR to ``S.grad``.

Adaptations to this library (the reference is CLIP zero-shot with a fixed text head):

* the teacher is the backbone without masks plus the model's *current* head (``ctx.forward`` with the
  masks disabled), since classification heads here are trained rather than built from text;
* ``gdr_lambda`` defaults to 0.3 (the reference README's value for most 16-shot datasets; it uses
  1.0 for ImageNet/SUN397/Food101 and other settings — the assignment is ambiguous);
* under DDP, ``g_b`` is averaged over ranks and ``U`` comes from a generator seeded identically on
  every rank, so all replicas take the same step.

**Learning rate.** Scores start only ``init_score − τ`` = 5e-3 above the threshold and Adam moves
each by about ``lr`` per step, so the task default lr 1e-3 zeroes about half of the masks within
ten steps (every score whose gradient points down crosses τ after ~5 steps). Use the paper's
protocol, ``experiment=mask_tuning_paper`` (Adam lr 8e-5, weight decay 0, 30 epochs, batch 32).

**Teacher.** The teacher is the *deterministic* unmasked model: its forward runs with every module
in eval mode (no stochastic depth, no dropout), as the reference's frozen CLIP, so that teacher and
student differ by the masks only; the previous train/eval flags are restored afterwards.

Merging multiplies each base weight by its binary mask (the original is kept for an exact
``unmerge``). The artifact stores each mask bit-packed (8 weights per byte) instead of the float
scores; loading restores scores at ``init_score`` (kept) or ``2τ - init_score`` (dropped), which
reproduces the same binary masks (the real-valued scores themselves are not kept, as in the paper).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, StepContext, WrappedLayer
from zoo.sites import LINEAR_SITES, SiteError

@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Every module of ``model`` in eval mode (no drop-path / dropout), flags restored after."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, flag in flags:
            m.training = flag


PACKED_SUFFIX = "mask_packed"
SHAPE_SUFFIX = "mask_shape"
SCORE_NAME = "score"
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


class Binarize(torch.autograd.Function):
    """``1[s > τ]`` forward, identity backward (the reference's ``Binarizer``)."""

    @staticmethod
    def forward(ctx, score: torch.Tensor, threshold: float) -> torch.Tensor:
        return (score > threshold).to(score.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def packbits(mask: torch.Tensor) -> torch.Tensor:
    """Flatten a boolean tensor and pack it 8 per byte (MSB first, like ``numpy.packbits``)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpackbits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= int(s)
    bits = (packed.reshape(-1, 1) & _BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(-1)[:n].reshape(shape)


def gradient_dropout(g_a: torch.Tensor, g_b: torch.Tensor, lam: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """GDR: ``((1 - λ) + λ · 1[P > U]) · g_a`` with the agreement probability ``P`` of g_a and g_b."""
    p = 0.5 * (1 + torch.sign(g_a) * (g_a + g_b) / (g_a.abs() + g_b.abs() + 1e-8))
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)
    return ((1 - lam) + lam * (p > u).to(g_a.dtype)) * g_a


class MaskedWeight(WrappedLayer):
    """A frozen Linear or Conv2d whose weight (or chosen output rows of it) is binary-masked."""

    def __init__(self, base: nn.Module, rows: list[slice] | None, init_score: float, threshold: float):
        super().__init__(base)
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise SiteError(
                f"mask_tuning masks the weight of an nn.Linear or nn.Conv2d, got {type(base).__name__} "
                "(apply mask_tuning before adapters that wrap the same layer)"
            )
        self.threshold = float(threshold)
        w = base.weight
        if rows is None:
            index = None
            shape = tuple(w.shape)
        else:  # a subset of output rows (e.g. q and v of a fused qkv): scores for those rows only
            index = torch.cat([torch.arange(w.shape[0])[s] for s in rows]).to(w.device)
            shape = (len(index),) + tuple(w.shape[1:])
        self.register_buffer("rows", index, persistent=False)
        self.score = nn.Parameter(torch.full(shape, float(init_score), device=w.device, dtype=w.dtype))
        self.register_buffer("original_weight", None, persistent=False)  # set while merged
        self.enabled = True  # False: behave as the unmasked base (the GDR teacher)

    def mask(self) -> torch.Tensor:
        """The binary mask over the selected rows (straight-through gradient to ``score``)."""
        return Binarize.apply(self.score, self.threshold)

    def full_mask(self) -> torch.Tensor:
        m = self.mask()
        if self.rows is None:
            return m
        full = torch.ones_like(self.base.weight)
        return full.index_copy(0, self.rows, m)

    def masked_weight(self) -> torch.Tensor:
        return self.base.weight * self.full_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.base(x)
        w = self.masked_weight()
        if isinstance(self.base, nn.Linear):
            return F.linear(x, w, self.base.bias)
        return self.base._conv_forward(x, w, self.base.bias)

    def merge_into_base(self) -> None:
        self.original_weight = self.base.weight.detach().clone()
        self.base.weight.copy_(self.masked_weight())

    def unmerge_from_base(self) -> None:
        self.base.weight.copy_(self.original_weight)
        self.original_weight = None


@register_adapter("mask_tuning")
class MaskTuning(Adapter):
    """Binary weight masks with STE, an L2 score regulariser and gradient dropout (R-AMT)."""

    mergeable = True
    supports_slices = True
    paper = "Zheng, Wu et al., Regularized Mask Tuning (R-AMT), ICCV 2023"

    def __init__(self, targets: list[str] = ("q", "k", "v", "o"), layers="all", patch_embed: bool = True,
                 init_score: float = 1e-2, threshold: float = 5e-3, reg_weight: float = 1e-4,
                 gdr_lambda: float = 0.3, gdr_temperature: float = 1.0, seed: int = 0):
        super().__init__()
        if not init_score > threshold:
            raise ValueError(f"init_score ({init_score}) must exceed threshold ({threshold}) so that the masks start all ones")
        if not 0.0 <= gdr_lambda <= 1.0:
            raise ValueError(f"gdr_lambda must be in [0, 1], got {gdr_lambda}")
        if gdr_temperature <= 0:
            raise ValueError(f"gdr_temperature must be positive, got {gdr_temperature}")
        self.targets, self.layers, self.patch_embed = list(targets), layers, bool(patch_embed)
        self.init_score, self.threshold = float(init_score), float(threshold)
        self.reg_weight, self.gdr_lambda, self.gdr_temperature = float(reg_weight), float(gdr_lambda), float(gdr_temperature)
        self.seed = int(seed)
        self.teacher_grads: list[torch.Tensor | None] = []  # g_b per masked layer, set by extra_loss
        self._teacher_count = 0  # micro-batches averaged into teacher_grads since the last step
        self._generators: dict[str, torch.Generator] = {}

    # ------------------------------------------------------------------ construction
    def attach(self, backbone) -> None:
        bad = [t for t in self.targets if t not in LINEAR_SITES]
        if bad:
            raise SiteError(f"mask_tuning masks Linear sites {LINEAR_SITES}, not {bad}")
        if not self.targets and not self.patch_embed:
            raise ValueError("mask_tuning needs at least one target or patch_embed=True")
        if self.patch_embed and self._image_tower_selected(backbone):
            site = backbone.patch_embed_site()
            self.replace(site, MaskedWeight(site.module, None, self.init_score, self.threshold))
        groups: dict[tuple[int, str], list] = {}
        for s in self.sites(self.targets, self.layers) if self.targets else []:
            groups.setdefault((id(s.parent), s.attr), []).append(s)
        for group in groups.values():
            slices = [s.out_slice for s in group]
            rows = None if any(sl is None for sl in slices) or _covers(slices, group[0].base_module) else slices
            self.replace(group[0], MaskedWeight(group[0].module, rows, self.init_score, self.threshold))

    def _image_tower_selected(self, backbone) -> bool:
        """The patch embedding belongs to the backbone's first (image) tower: ``tower=text`` leaves it alone."""
        from zoo.sites import select_towers

        if self.tower is None or getattr(self, "tower_view", False):
            return True
        towers = tuple(getattr(backbone, "towers", ()) or ())
        return not towers or towers[0] in select_towers(backbone, self.tower)

    def masked(self) -> list[MaskedWeight]:
        return [m for m in self.modules if isinstance(m, MaskedWeight)]

    def scores(self) -> list[nn.Parameter]:
        return [m.score for m in self.masked()]

    @contextlib.contextmanager
    def masks_disabled(self) -> Iterator[None]:
        """Run the model as the frozen pretrained network (the GDR teacher)."""
        mods = self.masked()
        old = [m.enabled for m in mods]
        for m in mods:
            m.enabled = False
        try:
            yield
        finally:
            for m, e in zip(mods, old):
                m.enabled = e

    # ------------------------------------------------------------------ training hooks
    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        """β Σ ||S||_2; also stores g_b = ∇_S KD(student, teacher) for :meth:`before_optimizer_step`."""
        scores = self.scores()
        if self.gdr_lambda > 0 and torch.is_grad_enabled():
            self._accumulate(self._teacher_gradients(ctx, scores))
        if self.reg_weight == 0:
            return None
        return self.reg_weight * sum(torch.linalg.vector_norm(s) for s in scores)

    def _teacher_gradients(self, ctx: StepContext, scores: list[nn.Parameter]) -> list[torch.Tensor | None]:
        student = ctx.outputs
        if not isinstance(student, torch.Tensor):
            raise TypeError(
                f"mask_tuning's gradient dropout needs the step's logits as a tensor in ctx.outputs, got "
                f"{type(student).__name__}; set gdr_lambda=0 to train without it"
            )
        if not student.requires_grad:
            return []
        forward = ctx.forward if ctx.forward is not None else ctx.model
        with torch.no_grad(), self.masks_disabled(), _eval_mode(ctx.model):
            teacher = forward(ctx.inputs)
        t = self.gdr_temperature
        kd = -(F.softmax(teacher.float() / t, -1) * F.log_softmax(student.float() / t, -1)).sum(-1).mean() * t * t
        live = [s for s in scores if s.requires_grad]
        grads = torch.autograd.grad(kd, live, retain_graph=True, allow_unused=True)
        by_id = {id(s): g for s, g in zip(live, grads)}
        return [by_id.get(id(s)) for s in scores]

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Scores train without weight decay (the reference uses Adam, wd 0): decoupled decay would
        pull every score below τ and act as a second, unintended sparsifier."""
        return [{"params": self.scores(), "lr": lr, "weight_decay": 0.0}]

    def _accumulate(self, grads: list[torch.Tensor | None]) -> None:
        """Running mean of g_b over the micro-batches of one optimizer step (gradient accumulation
        averages g_a the same way), so one step's g_b matches its g_a."""
        if not grads:
            return
        if not self.teacher_grads:
            self.teacher_grads, self._teacher_count = list(grads), 1
            return
        self._teacher_count += 1
        w = 1.0 / self._teacher_count
        self.teacher_grads = [
            g if old is None else old if g is None else old + (g - old) * w
            for old, g in zip(self.teacher_grads, grads)
        ]

    def before_optimizer_step(self) -> None:
        """Gradient dropout on every score's ``.grad`` (g_a) using the stored teacher gradients (g_b)."""
        teacher_grads, self.teacher_grads, self._teacher_count = self.teacher_grads, [], 0  # one step each
        if self.gdr_lambda == 0 or not teacher_grads:
            return
        scores = self.scores()
        if len(scores) != len(teacher_grads):
            raise RuntimeError("mask_tuning: stored teacher gradients do not match the masked layers")
        dist = _distributed()
        for s, g_b in zip(scores, teacher_grads):
            if s.grad is None:
                continue
            if g_b is None:
                g_b = torch.zeros_like(s.grad)
            if dist is not None:  # g_a is already averaged by DDP; average g_b the same way
                g_b = g_b.contiguous()
                dist.all_reduce(g_b)
                g_b /= dist.get_world_size()
            s.grad.copy_(gradient_dropout(s.grad, g_b.to(s.grad.dtype), self.gdr_lambda, self._generator(s.device)))

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)  # same seed on every rank: identical U, identical updates
            self._generators[key] = g
        return self._generators[key]

    # ------------------------------------------------------------------ statistics
    def sparsity(self) -> float:
        """Fraction of masked weights that are currently zeroed."""
        with torch.no_grad():
            zeros = sum(int((m.score <= m.threshold).sum()) for m in self.masked())
            total = sum(m.score.numel() for m in self.masked())
        return zeros / max(total, 1)

    # ------------------------------------------------------------------ artifact: bit-packed masks
    def export_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        owners = {m.score.data_ptr(): m for m in self.masked()}
        out = {}
        for k, v in state.items():
            m = owners.get(v.data_ptr()) if k.endswith("." + SCORE_NAME) else None
            if m is None:
                out[k] = v
                continue
            stem = k[: -len(SCORE_NAME)]
            out[stem + PACKED_SUFFIX] = packbits(v > m.threshold).cpu()
            out[stem + SHAPE_SUFFIX] = torch.tensor(list(v.shape), dtype=torch.int64)
        return out

    def import_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Packed masks -> ``score`` tensors that reproduce them (``init_score`` kept, ``2τ - init_score`` dropped)."""
        from zoo.checkpoint import AdapterMismatchError  # not at module level: zoo.checkpoint imports the adapters

        dropped = 2 * self.threshold - self.init_score  # as far below τ as init_score is above it
        out = {}
        for k, v in state.items():
            if k.endswith("." + SHAPE_SUFFIX):
                continue
            if not k.endswith("." + PACKED_SUFFIX):
                out[k] = v
                continue
            stem = k[: -len(PACKED_SUFFIX)]
            shape_key = stem + SHAPE_SUFFIX
            if shape_key not in state:
                raise AdapterMismatchError(f"packed mask {k!r} has no {shape_key!r} in the artifact")
            shape = tuple(int(s) for s in state[shape_key].tolist())
            n = 1
            for s in shape:
                n *= s
            if v.dtype != torch.uint8 or v.numel() != (n + 7) // 8:
                raise AdapterMismatchError(f"packed mask {k!r}: {v.numel()} bytes ({v.dtype}) cannot hold a mask of shape {shape}")
            keep = unpackbits(v, shape)
            out[stem + SCORE_NAME] = torch.where(keep, torch.tensor(self.init_score), torch.tensor(dropped))
        return out


def _covers(slices: list[slice], linear: nn.Module) -> bool:
    """Whether the row slices together select every output row (q, k and v of a fused qkv)."""
    n = linear.weight.shape[0]
    rows = set()
    for s in slices:
        rows.update(range(*s.indices(n)))
    return len(rows) == n


def _distributed():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None
