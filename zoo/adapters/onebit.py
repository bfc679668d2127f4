"""1-bit and low-bit adapters: Bi-AdaptFormer and Bi-LoRA — Jie, Wang, Deng, "Revisiting the
Parameter Efficiency of Adapters from the Perspective of Precision Redundancy", ICCV 2023
(arXiv 2307.16867). Reference code: github.com/JieShibo/PETL-ViT, ``binary_adapter/``.

**Quantiser** (:class:`QLinear`, no bias). A full-precision latent weight ``W`` is fake-quantised
in every forward, with scalar statistics of the whole matrix::

    μ = mean(W),  σ = std(W),  Wn = (W − μ) / (σ + 1e-5)
    W_used = Q(Wn) · σ + μ,          y = x W_usedᵀ

``Q`` maps ``Wn`` to the nearest cell of a fixed codebook for a standard normal (levels ``c``,
thresholds ``p``); the reference writes it as ``Σ_i δ_i sign(Wn − p_i)`` with
``δ_i = (c_i − c_{i−1})/2``, which equals ``c[bucket(Wn)]``. Straight-through estimator:
``∂W_used/∂Wn = σ`` as if ``Q`` were the identity; gradients also reach ``W`` through μ and σ
(they are not detached). At one bit: ``W_used = μ + 0.6745 σ sign(W − μ)``.

**Codebook** (:func:`gaussian_codebook`): the fixed point of 500 Lloyd-style iterations under
N(0, 1) where thresholds are midpoints of levels and each level is the conditional *median* of
its cell, ``c_k = Φ⁻¹((Φ(p_k) + Φ(p_{k+1}))/2)``: it minimises the expected L1 error (1 bit:
±0.6745; 2 bits: ±0.3778, ±1.2657 with thresholds 0, ±0.8217). ``bits`` ∈ {1, 2, 4, 8, 32};
32 means a plain fp32 Linear (zero-initialised up-projection).

**Adapters** (``base``):

* ``adaptformer`` (Bi-AdaptFormer): parallel to every block's MLP, reading the residual stream
  ``x`` (the input of ``norm2``): ``x ← x + MLP(LN2(x)) + s · Up(Dropout(ReLU(Down(x))))``, no
  biases, no LayerNorm, dropout 0.1.
* ``lora`` (Bi-LoRA): ``q += s · Up_q(Dropout(Down_q(x)))`` and likewise for ``v`` on the
  attention input; no non-linearity. Mergeable: ``W_q += s · Up_used Down_used``.

Init (bits < 32): Down has ``nn.Linear``'s default init, Up ``trunc_normal(std=1e-3, ±2e-3)`` —
not zero, because the standardised quantiser would turn zeros into ±const anyway; so the model
is *not* exactly unchanged at init. ``dim`` = 32 and the scale ``s`` is chosen per task from
{0.01, 0.1, 1, 10, 100} (:data:`PAPER_SCALES` lists the values we know; default 0.1).

**Bi-Head** (``head_bits``, :class:`QuantizedHead`): the paper's "Bi-Head" rows replace the
classifier head by a 1-bit ``QLinear(d, num_classes)`` — the same per-matrix standardisation,
codebook and STE as the adapters, a fresh ``nn.Linear``-default latent weight and **no bias**
(reference ``main.py``: ``vit.head = QLinear(768, num_classes, 1)``; its head is 1 bit whatever
the adapters' ``bits``). ``head_bits`` = ``None`` (or 32) keeps the task's fp32 head; 1, 2, 4, 8
quantise it; ``head_bias=True`` adds an fp32 bias (not in the reference). The head lives outside
the backbone, so it is wrapped in :meth:`OneBit.attach_model` (the ``apply_adapter`` hook that sees
the whole model, e.g. ``zoo.ImageClassifier``); the original head is kept at ``head.base``,
frozen, and comes back on ``unload``. Merging (``base=lora``) writes the dequantised head weight
(and bias, or zeros) into that original Linear, so ``merge_adapters(unload=True)`` leaves a plain
``nn.Linear`` head with the same predictions.

**Storage** (``export_state``/``import_state``): each QLinear is written as its code indices
bit-packed ``8/bits`` per byte (first element in the low bits) plus ``(μ, σ)`` as float32 — one
``uint8`` tensor and one ``(M, 2)`` float32 tensor per adapter — so the artifact is
``bits · #weights / 8 + 8 · #matrices`` bytes plus the head and a small header. With a quantised
head its codes join the same tensors (``head_bits · #head weights / 8 + 8`` bytes, plus 4 bytes
per class for ``head_bias``) instead of the fp32 head. Loading
restores the codes exactly (:meth:`QLinear.load_codes`): the model reproduces the saved
predictions bit for bit and re-exports the same bytes. Calling ``.train()`` drops the codes;
training continues from latent weights that re-quantise to the same codes and (μ, σ)
(:func:`latent_for_codes`) — not from the dequantised values, whose std is 0.6745 σ at one bit,
so re-quantising them would shrink the function (``adapter.init_from`` would continue from a
different model).

Reconstructed / differing from the reference:

* ``Q`` uses ``bucketize`` (a weight exactly on a threshold goes to the upper level; the
  reference's ``sign(0) = 0`` would give the midpoint, a value outside the codebook).
* The STE is a custom autograd function, so the forward value is exactly a codebook value
  (``Q.detach() + Wn − Wn.detach()`` can differ from it in the last bit).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.adapter import Bottleneck, InputTap, ParallelAdapter, site_dim
from zoo.adapters.base import Adapter, WrappedLayer, dropout_option, int_option
from zoo.adapters.lora import _rows, group_by_module
from zoo.sites import SiteError, unwrap

BITS = (1, 2, 4, 8, 32)
BASES = ("adaptformer", "lora")
EPS = 1e-5
# Per-task scale s of the reference configs (configs/<method>/<dataset>-bit1-dim32.yaml), as far
# as the method notes record them; other tasks: search {0.01, 0.1, 1, 10, 100}.
PAPER_SCALES = {"adaptformer": {"cifar": 0.1, "svhn": 10.0, "caltech101": 10.0, "dtd": 0.01}}


@lru_cache(maxsize=None)
def gaussian_codebook(bits: int, iters: int = 500) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(levels, thresholds)`` of the L1-optimal ``2**bits``-level quantiser of N(0, 1).

    Lloyd-style iterations: thresholds = midpoints of neighbouring levels; each level = the
    median of its cell, ``Φ⁻¹((Φ(p_lo) + Φ(p_hi)) / 2)``. Starts from equal-probability levels.
    """
    if bits not in BITS or bits == 32:
        raise ValueError(f"codebooks exist for bits in {BITS[:-1]}, got {bits}")
    n = 2 ** bits
    levels = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    for _ in range(iters):
        thr = (levels[1:] + levels[:-1]) / 2
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.special.ndtr(thr), torch.ones(1, dtype=torch.float64)])
        levels = torch.special.ndtri((cdf[1:] + cdf[:-1]) / 2)
    thr = (levels[1:] + levels[:-1]) / 2
    return tuple(levels.tolist()), tuple(thr.tolist())


class _STE(torch.autograd.Function):
    """Forward: the quantised value (exactly a codebook level); backward: the identity."""

    @staticmethod
    def forward(ctx, wn, levels, thresholds):
        return levels[torch.bucketize(wn, thresholds)]

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class QLinear(nn.Module):
    """A bias-free Linear whose weight is fake-quantised to ``bits`` (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bits: int = 1, device=None, dtype=None):
        super().__init__()
        if bits not in BITS or bits == 32:
            raise ValueError(f"QLinear bits must be one of {BITS[:-1]} (32 = use nn.Linear), got {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        levels, thr = gaussian_codebook(bits)
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("thresholds", torch.tensor(thr, dtype=torch.float32, device=device), persistent=False)
        self._codes: torch.Tensor | None = None  # set by load_codes: (indices, mean, std)
        self._stats: torch.Tensor | None = None

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight.float()
        return w.mean(), w.std()

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, [μ, σ])`` the forward uses and export stores: the loaded codes if any, else
        those of the current latent weight."""
        if self._codes is not None:
            return self._codes, self._stats
        with torch.no_grad():
            mu, sd = self.stats()
            idx = torch.bucketize((self.weight.float() - mu) / (sd + EPS), self.thresholds)
        return idx, torch.stack([mu, sd])

    def dequantize(self, idx: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        return (self.levels[idx] * stats[1] + stats[0]).to(self.weight.dtype)

    def used_weight(self) -> torch.Tensor:
        if self._codes is not None:  # loaded codes, until the module is put in training mode
            return self.dequantize(self._codes, self._stats)
        mu, sd = self.stats()
        wn = (self.weight.float() - mu) / (sd + EPS)
        return (_STE.apply(wn, self.levels, self.thresholds) * sd + mu).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.used_weight())

    @torch.no_grad()
    def load_codes(self, idx: torch.Tensor, stats: torch.Tensor) -> None:
        """Use stored codes for evaluation (exact reload) and set a latent weight that
        re-quantises to the same codes with the same (μ, σ) (see :func:`latent_for_codes`), so
        ``.train()`` and ``adapter.init_from`` continue from the saved function."""
        self._codes = idx.to(self.weight.device).long().view(self.out_features, self.in_features)
        self._stats = stats.to(self.weight.device, torch.float32)
        self.weight.copy_(latent_for_codes(self._codes, self._stats, self.levels, self.thresholds).to(self.weight.dtype))

    def train(self, mode: bool = True):
        # loaded codes serve inference and re-export bit for bit; training continues from the
        # latent weight load_codes set, which quantises to the same function
        if mode:
            self._codes = self._stats = None
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


@torch.no_grad()
def latent_for_codes(idx: torch.Tensor, stats: torch.Tensor, levels: torch.Tensor, thresholds: torch.Tensor,
                     iters: int = 200) -> torch.Tensor:
    """A latent weight ``W = μ + σ z`` whose quantisation is the stored codes: ``mean(z) = 0``,
    ``std(z) = 1`` and every ``z`` in its code's cell, so μ and σ recomputed from ``W`` are the
    stored ones and ``Q((W − μ)/σ)`` gives ``idx`` back.

    The dequantised values themselves are *not* such a weight: at one bit they have std
    ``0.6745 σ``, so re-quantising them shrinks the function by 0.6745. ``z`` starts at the code
    levels and alternates standardisation with clamping into each cell (a margin away from the
    thresholds); two-level codes converge in one step.
    """
    mu, sd = float(stats[0]), float(stats[1])
    if sd == 0.0 or idx.numel() < 2:
        return torch.full(idx.shape, mu, dtype=torch.float32, device=idx.device)
    thr = thresholds.double()
    inf = torch.tensor([float("inf")], dtype=torch.float64, device=thr.device)
    # the forward standardises with σ + EPS, i.e. sees z·k: clamp z to the cells divided by k
    k, margin = sd / (sd + EPS), 1e-3
    lo = (torch.cat([-inf, thr])[idx] + margin) / k
    hi = (torch.cat([thr, inf])[idx] - margin) / k
    lo = torch.minimum(lo, hi)
    z = levels.double()[idx]
    for _ in range(iters):
        z = (z - z.mean()) / z.std()
        zc = torch.maximum(torch.minimum(z, hi), lo)
        if torch.equal(zc, z):
            break
        z = zc
    w = (mu + sd * z).float()
    mu2, sd2 = w.mean(), w.std()
    if not torch.equal(torch.bucketize((w - mu2) / (sd2 + EPS), thresholds.to(w.device)), idx):
        raise ValueError("could not reconstruct a latent weight for the stored 1-bit codes "
                         "(the codes are not a quantisation of any weight matrix)")
    return w


def make_linear(in_f: int, out_f: int, bits: int, up: bool, like: torch.Tensor) -> nn.Module:
    """A projection of the adapter: QLinear (bits < 32) or a bias-free fp32 Linear, reference init."""
    if bits == 32:
        m = nn.Linear(in_f, out_f, bias=False, device=like.device, dtype=like.dtype)
        if up:
            nn.init.zeros_(m.weight)
        return m
    m = QLinear(in_f, out_f, bits, device=like.device, dtype=like.dtype)
    if up:
        nn.init.trunc_normal_(m.weight, std=1e-3, a=-2e-3, b=2e-3)
    return m


def used_weight(m: nn.Module) -> torch.Tensor:
    return m.used_weight() if isinstance(m, QLinear) else m.weight


class BinaryBottleneck(Bottleneck):
    """Bi-AdaptFormer's branch: ``s · Up(Dropout(ReLU(Down(x))))`` with bias-free (Q)Linears."""

    def __init__(self, dim: int, hidden: int, bits: int, scale: float, dropout: float, like: torch.Tensor):
        super().__init__(dim, hidden, act="relu", scale=scale, dropout=dropout, layernorm=False)
        self.down = make_linear(dim, hidden, bits, up=False, like=like)
        self.up = make_linear(hidden, dim, bits, up=True, like=like)


class BinaryLoRALinear(WrappedLayer):
    """Bi-LoRA on row slices of a (fused) Linear: ``out[s] += scale · Up_s(Dropout(Down_s(x)))``."""

    def __init__(self, base: nn.Module, hidden: int, bits: int, scale: float, dropout: float,
                 slices: dict[str, slice | None]):
        super().__init__(base)
        lin = unwrap(base)
        if not isinstance(lin, nn.Linear):
            raise SiteError(f"Bi-LoRA needs an nn.Linear, got {type(lin).__name__}")
        self.scale, self.slices = scale, dict(slices)
        self.dropout = nn.Dropout(dropout)
        self.down = nn.ModuleDict({k: make_linear(lin.in_features, hidden, bits, False, lin.weight) for k in self.slices})
        self.up = nn.ModuleDict({k: make_linear(hidden, _rows(s, lin.out_features), bits, True, lin.weight)
                                 for k, s in self.slices.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        for k, s in self.slices.items():
            delta = self.up[k](self.dropout(self.down[k](x))) * self.scale
            if s is None:
                out = out + delta
            else:
                out[..., s] = out[..., s] + delta
        return out

    def delta_weight(self) -> torch.Tensor:
        lin = unwrap(self.base)
        dw = torch.zeros_like(lin.weight)
        for k, s in self.slices.items():
            d = self.scale * used_weight(self.up[k]) @ used_weight(self.down[k])
            dw[s if s is not None else slice(None)] += d
        return dw

    def merge_into_base(self) -> None:
        unwrap(self.base).weight += self.delta_weight()

    def unmerge_from_base(self) -> None:
        unwrap(self.base).weight -= self.delta_weight()


class QuantizedHead(WrappedLayer):
    """Bi-Head: a :class:`QLinear` classifier (optional fp32 bias) in place of the Linear ``base``.

    ``base`` (the task's original head) is kept, unused and frozen, for ``unload``; merging
    writes the dequantised weight into it (and restores it on unmerge).
    """

    def __init__(self, base: nn.Linear, bits: int, bias: bool = False):
        super().__init__(base)
        w = base.weight
        self.in_features, self.out_features = base.in_features, base.out_features
        # a fresh latent weight with nn.Linear's default init, as the reference's new QLinear head
        # (a zero-initialised head would have σ = 0, where std's gradient is undefined)
        self.q = QLinear(base.in_features, base.out_features, bits, device=w.device, dtype=w.dtype)
        self.bias = nn.Parameter(torch.zeros(base.out_features, device=w.device, dtype=w.dtype)) if bias else None
        self._stash: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return F.linear(x, self.q.used_weight(), self.bias)

    def merge_into_base(self) -> None:
        lin = self.base
        if lin.bias is None and self.bias is not None:
            raise SiteError("cannot merge a Bi-Head with a bias into a head Linear without one")
        self._stash = (lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone())
        lin.weight.copy_(self.q.used_weight())
        if lin.bias is not None:
            lin.bias.copy_(self.bias if self.bias is not None else torch.zeros_like(lin.bias))

    def unmerge_from_base(self) -> None:
        w, b = self._stash
        self.base.weight.copy_(w)
        if b is not None:
            self.base.bias.copy_(b)
        self._stash = None


@register_adapter("onebit")
class OneBit(Adapter):
    """Low-bit (default 1-bit) AdaptFormer or LoRA adapters with packed storage."""

    supports_slices = True
    paper = "Jie, Wang, Deng, ICCV 2023 (arXiv 2307.16867): Bi-AdaptFormer / Bi-LoRA"

    def __init__(self, base: str = "adaptformer", bits: int = 1, dim: int = 32, scale: float = 0.1,
                 dropout: float = 0.1, targets: list[str] = ("q", "v"), layers="all",
                 head_bits: int | None = None, head_bias: bool = False):
        super().__init__()
        if base not in BASES:
            raise ValueError(f"unknown base {base!r}; valid options: {', '.join(BASES)}")
        if int(bits) not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        self.base, self.bits, self.dim = base, int(bits), int_option("onebit", "dim", dim)
        dropout_option("onebit", dropout)
        self.scale, self.dropout, self.targets, self.layers = float(scale), float(dropout), list(targets), layers
        if head_bits is not None and int(head_bits) not in BITS:
            raise ValueError(f"head_bits must be None or one of {BITS}, got {head_bits}")
        self.head_bits = None if head_bits is None or int(head_bits) == 32 else int(head_bits)
        self.head_bias = bool(head_bias)
        self.root: nn.Module | None = None  # the model whose head is quantised (names of export)
        self._head_flags: list[tuple[nn.Parameter, bool]] = []
        self.mergeable = base == "lora"  # the LoRA branch is linear; AdaptFormer's has a ReLU

    def attach(self, backbone) -> None:
        if self.base == "adaptformer":
            for mlp, norm in zip(self.sites("mlp", self.layers), self.sites("norm2", self.layers)):
                like = next(mlp.base_module.parameters())
                tap = self.replace(norm, InputTap(norm.module))
                branch = BinaryBottleneck(site_dim(mlp.module), self.dim, self.bits, self.scale, self.dropout, like)
                self.replace(mlp, ParallelAdapter(mlp.module, branch, tap))
        else:
            bad = [t for t in self.targets if t not in ("q", "k", "v", "qkv", "o", "fc1", "fc2")]
            if bad:
                raise SiteError(f"Bi-LoRA attaches to Linear sites, not {bad}")
            for group in group_by_module(self.sites(self.targets, self.layers)):
                slices = {s.kind: s.out_slice for s in group}
                self.replace(group[0], BinaryLoRALinear(group[0].module, self.dim, self.bits, self.scale, self.dropout, slices))

    def attach_model(self, model: nn.Module) -> None:
        """Bi-Head: quantise ``model.head`` (a Linear) when ``head_bits`` is set."""
        if self.head_bits is None:
            return
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Linear):
            raise SiteError(
                f"head_bits={self.head_bits} quantises the model's Linear `head`, but "
                f"{type(model).__name__}.head is {type(head).__name__}; apply the adapter to a "
                "zoo.ImageClassifier, or use head_bits=None")
        # the original head stays inside the wrapper, unused: freeze it (so it is neither trained
        # nor saved) and give its flags back on unload
        self._head_flags = [(p, p.requires_grad) for p in head.parameters()]
        for p in head.parameters():
            p.requires_grad_(False)
        self.replace_attr(model, "head", QuantizedHead(head, self.head_bits, self.head_bias))
        self.root = model

    def unload(self) -> None:
        super().unload()
        for p, flag in self._head_flags:
            p.requires_grad_(flag)
        self._head_flags, self.root = [], None

    # ------------------------------------------------------------------ packed storage
    def qlinears(self) -> list[tuple[str, QLinear]]:
        """``(path, module)`` of every QLinear, in module order; paths are relative to the model
        with the quantised head if there is one, else to the backbone."""
        assert self.backbone is not None
        root = self.root if self.root is not None else self.backbone
        ours = {id(q) for m in self.modules for q in m.modules() if isinstance(q, QLinear)}
        return [(n, q) for n, q in root.named_modules() if id(q) in ours]

    def _key(self, prefix: str, what: str) -> str:
        return f"{prefix}{self.name}.{self.backbone.adapters.index(self)}.{what}"

    def export_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        qs = self.qlinears()
        if not qs:  # bits = 32: plain fp32 tensors
            return state
        first = qs[0][0] + ".weight"
        found = [k for k in state if k == first or k.endswith("." + first)]
        if len(found) != 1:
            raise KeyError(f"cannot locate {first!r} in the state dict to pack it")
        prefix = found[0][: len(found[0]) - len(first)]
        state = dict(state)
        packed, stats = [], []
        for name, q in qs:
            state.pop(prefix + name + ".weight")
            idx, st = q.codes()
            packed.append(pack_bits(idx.flatten(), q.bits))
            stats.append(st)
        state[self._key(prefix, "codes")] = torch.cat(packed)
        state[self._key(prefix, "stats")] = torch.stack(stats).float()
        return state

    def import_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        qs = self.qlinears()
        if not qs:
            return state
        suffix = self._key("", "codes")
        found = [k for k in state if k == suffix or k.endswith("." + suffix)]
        if len(found) != 1:
            raise KeyError(f"the artifact has no packed codes {suffix!r} for this onebit adapter")
        prefix = found[0][: len(found[0]) - len(suffix)]
        state = dict(state)
        codes, stats = state.pop(self._key(prefix, "codes")), state.pop(self._key(prefix, "stats"))
        if stats.shape != (len(qs), 2):
            raise ValueError(f"packed stats have shape {tuple(stats.shape)}, this adapter has {len(qs)} matrices")
        offset = 0
        for (name, q), st in zip(qs, stats):
            n = q.weight.numel()
            nbytes = math.ceil(n * q.bits / 8)
            q.load_codes(unpack_bits(codes[offset:offset + nbytes], q.bits, n), st)
            offset += nbytes
            state[prefix + name + ".weight"] = q.weight.detach().clone()
        if offset != codes.numel():
            raise ValueError(f"packed codes hold {codes.numel()} bytes, this adapter needs {offset}")
        return state


def pack_bits(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes < 2**bits into uint8, ``8 // bits`` per byte, first element lowest."""
    per = 8 // bits
    idx = idx.to(torch.int32).cpu()
    pad = (-idx.numel()) % per
    idx = torch.cat([idx, idx.new_zeros(pad)]).view(-1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (idx << shifts).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    vals = (packed.to(torch.int32).cpu().unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return vals.flatten()[:n].long()
