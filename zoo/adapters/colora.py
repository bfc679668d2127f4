"""CoLoRA: contribution-based LoRA (per-layer ranks from FAIG contributions).

Park, Kim, Chun, "Contribution-based Low-Rank Adaptation with Pre-training Model for Real Image
Restoration", ECCV 2024 (arXiv 2408.01099). No official code was found; the rank rule is not in
any retrievable text. **The allocation below is a reconstruction** (the team spec ``methods/colora.md`` (internal, not shipped)
§5.2–5.3) with its uncertain choices as options. PROD pre-training is not part of this adapter.

``prepare(model, dataloader)`` does, once, before training:

1. **Brief fine-tune.** A deep copy of ``model`` is fine-tuned for ``finetune_steps`` AdamW steps
   (``finetune=all``: every parameter, the spec's "full fine-tune"; ``targets``: only the adapted
   layers plus whatever already trains, e.g. the head). This gives θ_t; θ_b are the weights before.
2. **FAIG** (Xie et al., "Finding Discriminative Filters for Specific Degradations in Blind SR",
   NeurIPS 2021). Along the straight path θ(a) = a·θ_b + (1−a)·θ_t, a = m/M, m = 0..M−1
   (``faig_steps`` = M; the FAIG reference uses 100), for every fine-tuned parameter::

       FAIG_j = | (1/M) Σ_m ∂L(θ(a_m))/∂θ_j · (θ_b,j − θ_t,j) |

   with L the task loss summed over the batch (FAIG uses a summed MSE; classification uses summed
   cross-entropy, ``loss=auto`` picks CE for integer labels and MSE for dense targets). The
   absolute value is taken per batch and averaged over ``faig_batches`` batches (the reference
   takes it per image). The layer contribution ``c_i`` is the sum of |FAIG| over the layer's
   kernel entries (``reduce=sum``) or the mean over its output filters of each filter's sum
   (``reduce=mean``). Under torch.distributed the contributions are averaged over processes so
   every process allocates the same ranks.
3. **Ranks.** ``ĉ_i = c_i / max_j c_j`` (``normalize``: max | minmax | sum), the learnable ratio
   ``δ_i = clip(γ·(α·ĉ_i + β), δ_min, 1)`` and the parameter-matched rank
   ``r_i = clip(⌊δ_i · d_out·d_in / (d_out + d_in)⌋, min_rank, min(d_out, d_in))`` (``d_in`` = C_in·k·k
   for a convolution), so layer i trains about δ_i of its weight count. γ is the largest scale
   for which ``Σ_i r_i (d_out + d_in) ≤ budget · Σ_i d_out·d_in`` (``budget`` = 0.07: the paper's
   "about 7%", here of the adapted layers' weights, biases not counted); this is the spec's
   "tune α and β to the budget" along the ray (α, β), so with a budget only β/α and δ_min shape
   the allocation. ``budget=null`` uses α and β as given (γ = 1).
4. **LoRA** with those ranks on every adapted layer: :class:`~zoo.adapters.lora.LoRALinear` for a
   Linear, :class:`~zoo.adapters.lora.LoRAConv2d` for a Conv2d (the kernel factored as
   ``C_out × C_in·k·k``: A a conv with r output channels, B a 1×1 conv). ``ΔW = (lora_alpha/r)·BA``,
   ``lora_alpha=null`` means ``lora_alpha = r`` (scale 1 at every rank). Mergeable.

The allocated ranks are stored in the config (``ranks``: layer name -> rank), so the artifact
JSON holds them and ``zoo.load_adapter`` rebuilds the same shapes without ``prepare``; ``prepare``
does nothing when ``ranks`` is set.

**Before prepare** ``attach`` resolves and validates the target layers but inserts nothing: the
model is the frozen backbone, exactly as before (a placeholder of uniform rank would make a run
that forgot ``prepare`` silently train a different method). The adapter's parameters exist, and
are trainable, only after ``prepare`` (or when ``ranks`` is given).

**Targets.** On a zoo Backbone: site kinds (``targets``, default the per-Linear sites of the
spec's ViT reading: qkv, o, fc1, fc2) on ``layers``. Anywhere (a zoo Backbone or a plain
``nn.Module`` CNN such as NAFNet): ``modules``, fnmatch patterns over module names relative to
the backbone (e.g. ``["encoders.*.conv*", "*.fc1"]``); matched Linear and Conv2d layers are
adapted. On a plain module without ``modules``, every Linear and ungrouped Conv2d is adapted
("LoRA is added to each layer"). Use :func:`apply_to_module` to attach to a plain module.
Grouped (e.g. depthwise) convolutions are not supported.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, AdapterModule, dropout_option, int_option
from zoo.adapters.lora import LoRAConv2d, LoRALinear
from zoo.sites import Site, SiteError, find_sites, unwrap

NORMALIZE = ("max", "minmax", "sum")
REDUCE = ("sum", "mean")
FINETUNE = ("all", "targets")
LOSSES = ("auto", "ce", "mse")


# ---------------------------------------------------------------------------------- allocation
def normalize_contributions(c: dict[str, float], how: str = "max") -> dict[str, float]:
    """ĉ_i from c_i; all-equal (or all-zero) contributions give ĉ_i = 1 (a uniform allocation)."""
    if how not in NORMALIZE:
        raise ValueError(f"normalize={how!r}; valid: {', '.join(NORMALIZE)}")
    vals = list(c.values())
    hi, lo, tot = max(vals), min(vals), sum(vals)
    if hi <= 0 or hi == lo:
        return {k: 1.0 for k in c}
    if how == "max":
        return {k: v / hi for k, v in c.items()}
    if how == "minmax":
        return {k: (v - lo) / (hi - lo) for k, v in c.items()}
    return {k: v / tot for k, v in c.items()}


def allocate_ranks(contrib: dict[str, float], shapes: dict[str, tuple[int, int]], budget: float | None = 0.07,
                   alpha: float = 1.0, beta: float = 0.0, delta_min: float = 0.0, min_rank: int = 1) -> dict[str, int]:
    """Per-layer ranks from normalised contributions ``contrib`` and ``shapes`` (name -> (d_out, d_in)).

    See the module docstring, step 3. Raises ``ValueError`` if ``min_rank`` everywhere already
    exceeds the budget.
    """

    def ranks_for(gamma: float) -> dict[str, int]:
        out = {}
        for n, (d_out, d_in) in shapes.items():
            delta = min(max(gamma * (alpha * contrib[n] + beta), delta_min), 1.0)
            r = math.floor(delta * d_out * d_in / (d_out + d_in) + 1e-9)
            out[n] = min(max(min_rank, r), min(d_out, d_in))
        return out

    def cost(ranks: dict[str, int]) -> int:
        return sum(r * sum(shapes[n]) for n, r in ranks.items())

    if budget is None:
        return ranks_for(1.0)
    limit = budget * sum(d_out * d_in for d_out, d_in in shapes.values())
    if cost(ranks_for(0.0)) > limit:
        raise ValueError(
            f"budget={budget} is too small: rank {min_rank} (min_rank) on the {len(shapes)} adapted layers "
            f"already needs {cost(ranks_for(0.0))} parameters > {limit:.0f}; raise budget or adapt fewer layers"
        )
    lo, hi = 0.0, 1.0
    while cost(ranks_for(hi)) <= limit:  # grow until infeasible (or every δ_i saturates at 1)
        lo, hi = hi, hi * 2
        if hi > 1e12:
            return ranks_for(lo)
    for _ in range(100):  # the largest feasible γ (cost is a non-decreasing step function of γ)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(ranks_for(mid)) <= limit else (lo, mid)
    return ranks_for(lo)


# ---------------------------------------------------------------------------------- FAIG
def task_loss(kind: str, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    if kind == "auto":
        kind = "ce" if not targets.is_floating_point() else "mse"
    if kind == "ce":
        if outputs.ndim == 4 and targets.ndim == 3 and tuple(targets.shape[-2:]) != tuple(outputs.shape[-2:]):
            # dense labels vs lower-resolution logits (SAM's mask decoder): nearest-resize the labels
            targets = F.interpolate(targets[:, None].float(), size=tuple(outputs.shape[-2:]), mode="nearest")[:, 0].long()
        return F.cross_entropy(outputs, targets, reduction=reduction)
    if outputs.shape != targets.shape:
        raise ValueError(f"loss=mse needs targets shaped like the outputs, got {tuple(targets.shape)} vs {tuple(outputs.shape)}")
    return F.mse_loss(outputs, targets, reduction=reduction)


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"CoLoRA.prepare expects batches (inputs, targets, ...) and a loss on the model's output "
                    f"(its FAIG fine-tune); got {type(batch).__name__} batches (e.g. captioning's "
                    f"{{frames, caption}}): CoLoRA is not supported on this task")


def cycle(dataloader) -> Iterator[Any]:
    while True:
        empty = True
        for b in dataloader:
            empty = False
            yield b
        if empty:
            raise ValueError("CoLoRA.prepare got an empty dataloader")


@torch.no_grad()
def _set_path(params: dict[str, nn.Parameter], theta_b: dict, theta_t: dict, a: float) -> None:
    for n, p in params.items():
        p.copy_(a * theta_b[n] + (1 - a) * theta_t[n])


def path_gradients(model: nn.Module, params: dict[str, nn.Parameter], theta_b: dict, theta_t: dict,
                   wrt: list[str], x: torch.Tensor, y: torch.Tensor, loss: str, steps: int) -> dict[str, torch.Tensor]:
    """``(1/M) Σ_m ∂L(θ(m/M))/∂θ`` for the parameters ``wrt``, with θ(a) = a θ_b + (1−a) θ_t over ``params``.

    Leaves ``params`` at θ_t. ``L`` is the summed task loss on ``(x, y)``.
    """
    acc = {n: torch.zeros_like(params[n]) for n in wrt}
    for m in range(steps):
        _set_path(params, theta_b, theta_t, m / steps)
        # allow_unused: a layer the batch never reaches (MORPH's time attention on one-frame input)
        # has no path-integrated gradient, i.e. contribution 0
        grads = torch.autograd.grad(task_loss(loss, model(x), y, reduction="sum"), [params[n] for n in wrt],
                                    allow_unused=True)
        for n, g in zip(wrt, grads):
            if g is not None:
                acc[n] += g
    _set_path(params, theta_b, theta_t, 0.0)
    return {n: g / steps for n, g in acc.items()}


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Run under ``seed`` without disturbing the caller's RNG streams."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------- adapter
@register_adapter("colora")
class CoLoRA(Adapter):
    """LoRA with per-layer ranks from FAIG contributions, allocated under a parameter budget."""

    mergeable = True
    paper = "Park, Kim, Chun, CoLoRA, ECCV 2024 (arXiv 2408.01099)"

    def __init__(self, budget: float | None = 0.07, alpha: float = 1.0, beta: float = 0.0, delta_min: float = 0.0,
                 min_rank: int = 1, normalize: str = "max", reduce: str = "sum", lora_alpha: float | None = None,
                 dropout: float = 0.0, finetune: str = "all", finetune_steps: int = 100, finetune_lr: float = 1e-4,
                 faig_steps: int = 20, faig_batches: int = 2, loss: str = "auto", seed: int = 0,
                 targets: list[str] = ("qkv", "o", "fc1", "fc2"), layers="all", modules: list[str] | None = None,
                 ranks: dict[str, int] | None = None):
        super().__init__()
        for opt, val, valid in (("normalize", normalize, NORMALIZE), ("reduce", reduce, REDUCE),
                                ("finetune", finetune, FINETUNE), ("loss", loss, LOSSES)):
            if val not in valid:
                raise ValueError(f"{opt}={val!r}; valid: {', '.join(valid)}")
        if budget is not None and not 0 < budget <= 1:
            raise ValueError(f"budget={budget}: a fraction of the adapted layers' weights in (0, 1], or null")
        for opt, val, lo in (("min_rank", min_rank, 1), ("faig_steps", faig_steps, 1), ("faig_batches", faig_batches, 1),
                             ("finetune_steps", finetune_steps, 0)):
            int_option("colora", opt, val, lo)
        dropout_option("colora", dropout)
        for k, v in dict(ranks or {}).items():
            int_option("colora", f"ranks[{k!r}]", v, 0)
        self.budget, self.alpha, self.beta = budget, float(alpha), float(beta)
        self.delta_min, self.min_rank = float(delta_min), int(min_rank)
        self.normalize, self.reduce, self.loss = normalize, reduce, loss
        self.lora_alpha, self.dropout = lora_alpha, float(dropout)
        self.finetune, self.finetune_steps, self.finetune_lr = finetune, int(finetune_steps), float(finetune_lr)
        self.faig_steps, self.faig_batches, self.seed = int(faig_steps), int(faig_batches), int(seed)
        self.targets, self.layers = list(targets), layers
        self.module_patterns = None if modules is None else ([modules] if isinstance(modules, str) else list(modules))
        self.ranks = None if ranks is None else {str(k): int(v) for k, v in dict(ranks).items()}
        self.targets_found: list[Site] = []
        self.contributions: dict[str, float] | None = None  # raw c_i from the last prepare

    # ------------------------------------------------------------------ targets
    def resolve_targets(self, root: nn.Module) -> list[Site]:
        from zoo.backbones.base import Backbone

        if self.tower is not None and not getattr(self, "tower_view", False) and not isinstance(root, Backbone):
            raise SiteError(f"colora: tower={self.tower!r} selects towers of a zoo backbone; this model is a "
                            f"{type(root).__name__} (name its layers with modules=[...] instead)")
        if self.module_patterns is not None:
            if self.tower is not None and not getattr(self, "tower_view", False):
                raise SiteError(f"colora: modules={self.module_patterns} names layers directly; tower={self.tower!r} "
                                f"cannot also select them (give one of the two)")
            sites = self._match_modules(root)
        elif isinstance(root, Backbone):  # the tower option selects the towers, as for every adapter
            sites = find_sites(root, self.targets, self.layers, None if getattr(self, "tower_view", False) else self.tower)
            sliced = [s.kind for s in sites if s.out_slice is not None]
            if sliced:
                raise SiteError(f"CoLoRA allocates one rank per whole layer; use 'qkv' rather than the slices {sorted(set(sliced))}")
        else:
            sites = [_site(root, n) for n, m in _plain_modules(root)
                     if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
        for s in sites:
            m = unwrap(s.module)
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                raise SiteError(f"CoLoRA adapts Linear and Conv2d layers; {s.path} is a {type(m).__name__}")
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise SiteError(f"{s.path}: grouped convolutions (groups={m.groups}) are not supported")
        if not sites:
            raise SiteError("CoLoRA found no Linear or Conv2d layer to adapt")
        return sites

    def _match_modules(self, root: nn.Module) -> list[Site]:
        names = [(n, m) for n, m in _plain_modules(root) if isinstance(m, (nn.Linear, nn.Conv2d))]
        sites = []
        for pat in self.module_patterns:
            hits = [n for n, _ in names if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise SiteError(f"modules pattern {pat!r} matches no Linear/Conv2d layer; "
                                f"some layer names: {', '.join(n for n, _ in names[:12])}")
            sites += [_site(root, n) for n in hits if n not in {s.path for s in sites}]
        return sites

    @staticmethod
    def layer_shape(site: Site) -> tuple[int, int]:
        w = unwrap(site.module).weight
        return w.shape[0], w[0].numel()  # (d_out, d_in·k·k)

    # ------------------------------------------------------------------ attach
    def attach(self, backbone: nn.Module) -> None:
        self.targets_found = self.resolve_targets(backbone)
        if self.ranks is not None:
            self._insert(self.ranks)
        # else: nothing yet; prepare() allocates the ranks and inserts the LoRA modules

    def _insert(self, ranks: dict[str, int]) -> None:
        names = [s.path for s in self.targets_found]
        if set(ranks) != set(names):
            raise SiteError(f"ranks do not match the target layers: missing {sorted(set(names) - set(ranks))[:8]}, "
                            f"unknown {sorted(set(ranks) - set(names))[:8]}")
        for s in self.targets_found:
            r = ranks[s.path]
            lora_alpha = float(r if self.lora_alpha is None else self.lora_alpha)
            cls = LoRALinear if isinstance(unwrap(s.module), nn.Linear) else LoRAConv2d
            self.replace(s, cls(s.module, r, lora_alpha, self.dropout))

    @property
    def prepared(self) -> bool:
        return self.ranks is not None

    # ------------------------------------------------------------------ prepare
    def prepare(self, model: nn.Module, dataloader) -> None:
        if self.prepared:
            return  # ranks known (prepared before, or loaded from an artifact)
        device = next(model.parameters()).device
        with seeded(self.seed, device):
            self.contributions = self.layer_contributions(model, dataloader)
            c = dict(self.contributions)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                t = torch.tensor(list(c.values()), dtype=torch.float64, device=device)
                torch.distributed.all_reduce(t)  # same ranks (same shapes) in every process
                c = dict(zip(c, (t / torch.distributed.get_world_size()).tolist()))
            shapes = {s.path: self.layer_shape(s) for s in self.targets_found}
            ranks = allocate_ranks(normalize_contributions(c, self.normalize), shapes, self.budget,
                                   self.alpha, self.beta, self.delta_min, self.min_rank)
            self._insert(ranks)  # LoRA A drawn under the seed: prepare is deterministic
        self.ranks = ranks
        self.config["ranks"] = dict(ranks)
        self.mark_trainable()

    def layer_contributions(self, model: nn.Module, dataloader) -> dict[str, float]:
        """c_i: FAIG of each target layer between ``model`` and a briefly fine-tuned copy of it."""
        where = {id(unwrap(s.module)): s.path for s in self.targets_found}
        qual = {where[id(m)]: n for n, m in model.named_modules() if id(m) in where}
        if len(qual) != len(where):
            raise ValueError("prepare(model, ...): model does not contain the layers this adapter was attached to")
        work = copy.deepcopy(model)
        layers = {path: work.get_submodule(qn) for path, qn in qual.items()}
        names = {id(p): n for n, p in work.named_parameters()}
        weight_of = {path: names[id(m.weight)] for path, m in layers.items()}
        if self.finetune == "all":
            tuned = {n for n, p in work.named_parameters() if p.is_floating_point()}
        else:
            tuned = {n for n, p in work.named_parameters() if p.requires_grad}
            tuned |= {names[id(p)] for m in layers.values() for p in m.parameters(recurse=False)}
        params = {n: p for n, p in work.named_parameters() if n in tuned}
        for n, p in work.named_parameters():
            p.requires_grad_(n in tuned)

        theta_b = {n: p.detach().clone() for n, p in params.items()}
        batches = cycle(dataloader)
        work.train()
        opt = torch.optim.AdamW(params.values(), lr=self.finetune_lr, weight_decay=0.0)
        for _ in range(self.finetune_steps):
            x, y = (t.to(next(iter(params.values())).device) for t in split_batch(next(batches)))
            loss = task_loss(self.loss, work(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        del opt
        theta_t = {n: p.detach().clone() for n, p in params.items()}

        work.eval()
        for p in work.parameters():
            p.requires_grad_(False)
        wrt = list(weight_of.values())
        for n in wrt:
            params[n].requires_grad_(True)
        scores = {path: 0.0 for path in layers}
        batches = cycle(dataloader)
        for _ in range(self.faig_batches):
            x, y = (t.to(theta_b[wrt[0]].device) for t in split_batch(next(batches)))
            ig = path_gradients(work, params, theta_b, theta_t, wrt, x, y, self.loss, self.faig_steps)
            for path, n in weight_of.items():
                faig = (ig[n] * (theta_b[n] - theta_t[n])).abs()
                per_filter = faig.flatten(1).sum(1)
                s = per_filter.sum() if self.reduce == "sum" else per_filter.mean()
                scores[path] += float(s) / self.faig_batches
        return scores

    # ------------------------------------------------------------------ optimizer
    def param_groups(self, lr: float, weight_decay: float):
        if not self.prepared:
            import warnings

            warnings.warn("CoLoRA: building optimizer groups before prepare(); no LoRA layer is attached yet. "
                          "Call zoo.prepare_adapters(model, dataloader) first.", stacklevel=2)
        return None


def _plain_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules of ``root`` outside any adapter module (wrappers of another method are skipped)."""
    def walk(m: nn.Module, prefix: str):
        for name, child in m.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, AdapterModule):
                continue
            yield path, child
            yield from walk(child, path)

    yield from walk(root, "")


def _site(root: nn.Module, name: str) -> Site:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    return Site("module", -1, parent, attr, name, None)


def apply_to_module(module: nn.Module, **config: Any) -> CoLoRA:
    """Attach CoLoRA to any ``nn.Module`` (e.g. a restoration CNN), freezing its own weights.

    Returns the adapter; then ``adapter.prepare(module_or_wrapper, dataloader)``, train, and
    ``adapter.merge()`` / ``adapter.unload()`` as usual.
    """
    from zoo.api import attach_adapter

    for p in module.parameters():
        p.requires_grad_(False)
    return attach_adapter(CoLoRA.from_config(**config), module)
