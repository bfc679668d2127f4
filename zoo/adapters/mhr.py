"""Poly / MHR / MHR-z / MHR-μ: routing over an inventory of LoRA skills.

Caccia, Ponti, Su, Pereira, Le Roux, Sordoni, "Multi-Head Adapter Routing for Cross-Task
Generalization", NeurIPS 2023 (arXiv 2211.03831); Poly = Ponti et al., "Combining Parameter-
efficient Modules for Task-level Generalisation", EACL 2023. Reference code: microsoft/mttl at
the camera-ready commit c66b20d6 (``SkilledLoRA``, ``PolytroponSelector``, ``AverageSelector``).

Every adapted Linear ``W: d_in -> d_out`` (each of q/k/v separately when they are slices of a
fused qkv, as they are separate Linears in the paper's T5) gets an inventory of ``m`` LoRA skills
split into ``h`` heads, and per-task routing logits::

    A ∈ R^{h × m × d_in/h × r},  B ∈ R^{h × m × r × d_out/h},  Z ∈ R^{n_tasks × h·m}

    s[k, j]   = σ(Z[t, k, j])                 (eval, or gumbel=False: plain sigmoid)
              = RelaxedBernoulli(1, Z[t,k,j])  (training with gumbel=True: Gumbel-sigmoid sample)
    w[k, j]   = s[k, j] / (Σ_j s[k, j] + 1e-12)
    A_t       = concat_k Σ_j w[k, j] A[k, j]    (stacked along input rows   -> d_in × r)
    B_t       = concat_k Σ_j w[k, j] B[k, j]    (concatenated along outputs -> r × d_out)
    y         = W x + b + (alpha / r) · (x A_t) B_t

A and B are mixed **separately** (the product is not averaged). Init as in mttl:
``A ~ U(±sqrt(1/3)/sqrt(d_in))``, ``B = 0`` (so the model is unchanged at init),
``Z ~ U(±1e-3)``. Routing logits get their own optimizer group (``routing_lr``, 0.1 in the paper,
vs 1e-3 for the inventory; no weight decay).

Variants (``variant``):

* ``poly``  — ``h = 1``; inventory and routing train (multi-task pre-training).
* ``mhr``   — ``h = n_splits`` heads (64 in the paper); inventory and routing train.
* ``mhr_z`` — only the routing logits train; the inventory is frozen. For few-shot transfer,
  build it with ``n_tasks=1`` and call :func:`load_inventory` with the multi-task artifact: the
  inventory is copied and the task's routing row is the fresh ``U(±1e-3)`` one, as mttl's
  ``resize_module_logits(1)`` does.
* ``mhr_mu`` — the average adapter, routing discarded: every wrapped Linear is a single LoRA
  (:class:`~zoo.adapters.lora.LoRALinear`) with ``A_μ = concat_k mean_j A[k, j]`` and
  ``B_μ = concat_k mean_j B[k, j]`` once :func:`load_inventory` has filled it (mttl's
  ``AverageSelector`` gives the same function with fixed weights 1/m; the spec asks for the
  collapsed form).

Task ids: ``zoo.set_task(model, task_ids)`` before the forward (an int or a tensor of shape
``(B,)``, one id per sample; ``None`` = task 0). When a Linear sees ``k·B`` rows (SAM's windowed
attention folds windows into the batch, sample-major), each id is repeated ``k`` times, as
mttl's ``repeat_interleave``. Merging folds ``ΔW_t = (alpha/r) (A_t B_t)ᵀ`` for the single task
currently set (task 0 if none), using the deterministic sigmoid routing.

The multi-task -> few-shot protocol of the paper runs with ``python train.py task=multitask
adapter=mhr`` (``tasks/multitask.py``: task ids per sample, a head per task, then ``mhr_z`` /
``mhr_mu`` transfer to a held-out task).

Reconstructed / simplified (no primary text needed beyond the code): the paper's "finegrained"
router granularity only (one routing matrix per adapted Linear, per q/k/v slice); the optional
average-correction, shared skill, straight-through and routing dropout of mttl are not
implemented. Paper defaults (T0): ``n_skills=8, rank=1, alpha=1``, all attention and FFN Linears
(here ``q k v o fc1 fc2``), plain sigmoid routing (SuperNI configs use Gumbel: ``gumbel=True``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributions import RelaxedBernoulli

from zoo.adapters import register_adapter
from zoo.adapters.base import Adapter, WrappedLayer, int_option
from zoo.adapters.lora import LoRALinear, _rows, group_by_module
from zoo.adapters.lowrank import fusable, lowrank_linear
from zoo.sites import LINEAR_SITES, SiteError

VARIANTS = ("poly", "mhr", "mhr_z", "mhr_mu")
EPS = 1e-12  # mttl's global EPS in the routing normalisation


def skill_init_(a: torch.Tensor, d_in: int) -> torch.Tensor:
    """mttl's LoRA A init: ``U(±gain/sqrt(d_in))`` with ``gain = calculate_gain('leaky_relu', sqrt 5)``."""
    std = nn.init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(d_in)
    with torch.no_grad():
        return a.uniform_(-std, std)


class TaskState:
    """The current batch's task ids, shared by every module of one adapter (not a tensor of the model)."""

    def __init__(self, n_tasks: int):
        self.n_tasks = n_tasks
        self.ids: torch.Tensor | None = None
        self.single: int | None = 0  # the task id when every sample has the same one
        self.batch: int | None = None  # images in the backbone's current forward (set by a pre-hook)

    def set(self, task_ids) -> None:
        if task_ids is None:
            self.ids, self.single = None, 0
            return
        ids = torch.as_tensor(task_ids).long().reshape(-1)
        if ids.numel() == 0:
            raise ValueError("set_task got an empty set of task ids")
        lo, hi = int(ids.min()), int(ids.max())  # one sync per step; also validates the ids
        if lo < 0 or hi >= self.n_tasks:
            raise ValueError(f"task id(s) out of range [{lo}, {hi}]: this MHR adapter has n_tasks={self.n_tasks} (ids 0..{self.n_tasks - 1})")
        self.ids = ids
        self.single = lo if lo == hi else None

    def per_row(self, rows: int) -> torch.Tensor:
        """One task id per leading row of an activation with ``rows`` rows."""
        assert self.ids is not None
        b = self.ids.numel()
        if rows % b:
            raise ValueError(f"MHR: {b} task ids set but the layer input has {rows} rows (not a multiple)")
        return self.ids.repeat_interleave(rows // b) if rows != b else self.ids


def routing_weights(logits: torch.Tensor, heads: int, skills: int, gumbel: bool) -> torch.Tensor:
    """``(..., h·m)`` logits -> ``(..., h, m)`` normalised weights (Poly's selector)."""
    z = logits.view(*logits.shape[:-1], heads, skills)
    s = RelaxedBernoulli(torch.tensor(1.0, device=z.device, dtype=z.dtype), logits=z).rsample() if gumbel else torch.sigmoid(z)
    return s / (s.sum(-1, keepdim=True) + EPS)


def mix(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix the inventory per head and concatenate the heads.

    ``w``: ``(h, m)`` or ``(b, h, m)``; ``A``: ``(h, m, d_in/h, r)``; ``B``: ``(h, m, r, d_out/h)``.
    Returns ``A_t (…, d_in, r)`` and ``B_t (…, r, d_out)``.
    """
    lead = w.shape[:-2]
    h, _, dh, r = A.shape
    A_t = torch.einsum("...qs,qsdr->...qdr", w, A).reshape(*lead, h * dh, r)
    B_t = torch.einsum("...qs,qsrd->...rqd", w, B).reshape(*lead, r, h * B.shape[-1])
    return A_t, B_t


class MHRLinear(WrappedLayer):
    """A frozen Linear plus a routed skill inventory per output slice (q/k/v of a fused qkv)."""

    def __init__(self, base: nn.Module, slices: dict[str, slice | None], task: TaskState, n_tasks: int,
                 n_skills: int, n_splits: int, rank: int, alpha: float, gumbel: bool):
        super().__init__(base)
        lin = self.linear()
        if not isinstance(lin, nn.Linear):
            raise SiteError(f"MHR needs an nn.Linear, got {type(lin).__name__}")
        self.task = task
        self.slices = dict(slices)
        self.heads, self.skills, self.rank, self.gumbel = n_splits, n_skills, rank, gumbel
        self.scaling = alpha / rank
        d_in = lin.in_features
        kw = dict(device=lin.weight.device, dtype=lin.weight.dtype)
        self.mhr_A, self.mhr_B, self.routing = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        for k, s in self.slices.items():
            d_out = _rows(s, lin.out_features)
            if d_in % n_splits or d_out % n_splits:
                raise SiteError(f"MHR: n_splits={n_splits} must divide d_in={d_in} and d_out={d_out} of {k!r}")
            self.mhr_A[k] = nn.Parameter(skill_init_(torch.empty(n_splits, n_skills, d_in // n_splits, rank, **kw), d_in))
            self.mhr_B[k] = nn.Parameter(torch.zeros(n_splits, n_skills, rank, d_out // n_splits, **kw))
            self.routing[k] = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills, **kw).uniform_(-1e-3, 1e-3))
        self._merged_task: int | None = None
        self.batched_mix = True  # False: mix slice by slice (see task_adapters)
        self.fused = True  # False: base(x) + delta composed (see zoo.adapters.lowrank)
        self._cache: tuple | None = None  # (key, A, Bt) in eval, see cached_adapters

    def task_adapter(self, key: str, task: int | torch.Tensor, repeat: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_t, B_t)`` of slice ``key`` for one task id (an int) or per-image ids (a tensor),
        each image's adapter repeated for its ``repeat`` rows (SAM's windows)."""
        w = routing_weights(self.routing[key][task], self.heads, self.skills, self.gumbel and self.training)
        if repeat > 1:  # one Gumbel sample per image, shared by all of its windows
            w = w.repeat_interleave(repeat, 0)
        return mix(w, self.mhr_A[key], self.mhr_B[key])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        # One adapter for the whole batch when every row has the same task and no per-sample
        # Gumbel noise is drawn; otherwise one (A_t, B_t) per row and batched matmuls.
        if self.task.single is not None and not (self.gumbel and self.training):
            return self.shared_forward(x, self.task.single)
        out = self.base(x)
        # per image, not per row: windowed backbones (SAM) run each image as several rows
        rows = x.shape[0]
        if self.task.ids is not None:
            task = self.task.ids
            if rows % task.numel():
                raise ValueError(f"MHR: {task.numel()} task ids set but the layer input has {rows} rows (not a multiple)")
        else:
            b = self.task.batch
            task = x.new_zeros(b if b and rows % b == 0 else rows, dtype=torch.long)
        repeat = rows // task.numel()
        xb = x.reshape(x.shape[0], -1, x.shape[-1])
        for key, s in self.slices.items():
            A_t, B_t = self.task_adapter(key, task, repeat)
            delta = torch.bmm(torch.bmm(xb, A_t), B_t).reshape(*x.shape[:-1], B_t.shape[-1]) * self.scaling
            if s is None:
                out = out + delta
            else:
                out[..., s] = out[..., s] + delta
        return out

    def shared_forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """``base(x)`` plus the delta of every slice for one task: the mixed adapters of all slices
        as one ``(n·r, d_in)`` A and one ``(n·r, d_out)`` Bᵀ that is zero off each slice's rows
        (:meth:`task_adapters`), so the layer does two thin matmuls and no in-place slice writes,
        fused with the base Linear (:mod:`zoo.adapters.lowrank`) when that applies."""
        A, Bt = self.cached_adapters(task) if self._use_cache() else self.task_adapters(task)
        if self.fused and fusable(self.base, x):
            return lowrank_linear(x, self.base, A, Bt, self.scaling)
        return self.base(x) + ((x @ A.t()) * self.scaling) @ Bt

    def task_adapters(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, Bᵀ)`` of all slices for one task id: ``A (n·r, d_in)`` (slice i's ``A_tᵀ`` in rows
        ``i·r..``), ``Bᵀ (n·r, d_out)`` (slice i's ``B_t`` on its output columns, zeros elsewhere).

        The routing of every slice and head is normalised at once and the inventory mixed by one
        batched einsum over (slice, head) for A and one for B (instead of two per slice);
        ``batched_mix=False`` mixes slice by slice with :func:`mix` (the reference for the tests).
        """
        keys, r, d_out = list(self.slices), self.rank, self.linear().out_features
        n = len(keys)
        if self.batched_mix and len({tuple(self.mhr_B[k].shape) for k in keys}) == 1:
            logits = torch.stack([self.routing[k][task] for k in keys]) if n > 1 else self.routing[keys[0]][task][None]
            w = routing_weights(logits, self.heads, self.skills, self.gumbel and self.training)  # (n, h, m)
            A = torch.stack([self.mhr_A[k] for k in keys]) if n > 1 else self.mhr_A[keys[0]][None]
            B = torch.stack([self.mhr_B[k] for k in keys]) if n > 1 else self.mhr_B[keys[0]][None]
            A_all = torch.einsum("nqs,nqsdr->nrqd", w, A).reshape(n * r, -1)
            B_t = torch.einsum("nqs,nqsrd->nrqd", w, B).reshape(n, r, -1)  # slice i's B_t (r, d_out_i)
        else:
            mixed = [self.task_adapter(key, task) for key in keys]
            A_all = torch.cat([a.t() for a, _ in mixed], dim=0)
            B_t = [b for _, b in mixed]
        if list(self.slices.values()) == [None]:
            return A_all, B_t[0]
        Bt = A_all.new_zeros(n * r, d_out)
        for i, s in enumerate(self.slices.values()):
            Bt[i * r:(i + 1) * r, slice(None) if s is None else s] = B_t[i]
        return A_all, Bt

    # ------------------------------------------------------------------ eval cache
    def _use_cache(self) -> bool:
        """Eval mode without gradients to the adapter: the mixed adapters are constant."""
        return not self.training and not (torch.is_grad_enabled() and any(p.requires_grad for p in self._cache_inputs()))

    def _cache_inputs(self) -> list[torch.Tensor]:
        return [*self.mhr_A.values(), *self.mhr_B.values(), *self.routing.values()]

    def cached_adapters(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`task_adapters` formed once per task and reused until a parameter changes (identity
        and in-place version counter: optimizer steps, ``load_state_dict``, ``copy_``) or the module
        changes mode (``.train()`` / ``.eval()``), as SALT's cached W′."""
        key = (task, tuple((id(t), t._version, t.dtype, t.device) for t in self._cache_inputs()))
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                A, Bt = self.task_adapters(task)
            self._cache = (key, A.detach(), Bt.detach())
        return self._cache[1], self._cache[2]

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def delta_weight(self, task: int) -> torch.Tensor:
        """``ΔW_t = (alpha/r) (A_t B_t)ᵀ`` scattered into the fused weight's rows (sigmoid routing)."""
        lin = self.linear()
        dw = torch.zeros_like(lin.weight)
        training, self.training = self.training, False  # merge uses the deterministic routing
        try:
            for key, s in self.slices.items():
                A_t, B_t = self.task_adapter(key, task)
                d = self.scaling * (A_t @ B_t).t()
                if s is None:
                    dw += d
                else:
                    dw[s] += d
        finally:
            self.training = training
        return dw

    def merge_into_base(self) -> None:
        if self.task.single is None:
            raise ValueError("MHR merges one task's adapter: call zoo.set_task(model, task_id) with a single task first")
        self._merged_task = self.task.single
        self.linear().weight += self.delta_weight(self._merged_task)

    def unmerge_from_base(self) -> None:
        self.linear().weight -= self.delta_weight(self._merged_task)
        self._merged_task = None


@register_adapter("mhr")
class MHR(Adapter):
    """Poly / MHR routing over a LoRA skill inventory (default: MHR, T0 settings, every Linear)."""

    mergeable = True
    supports_slices = True
    paper = "Caccia et al., Multi-Head Adapter Routing for Cross-Task Generalization, NeurIPS 2023"

    def __init__(self, variant: str = "mhr", n_tasks: int = 1, n_skills: int = 8, n_splits: int | None = None,
                 rank: int = 1, alpha: float = 1.0, gumbel: bool = False, routing_lr: float = 0.1,
                 targets: list[str] = ("q", "k", "v", "o", "fc1", "fc2"), layers="all"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown MHR variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
        if n_splits is None:  # None = the variant's default: Poly is one head, MHR 64 (the paper)
            n_splits = 1 if variant == "poly" else 64
        if variant == "poly" and n_splits != 1:
            raise ValueError(f"variant 'poly' is MHR with one head: n_splits must be 1 (or null), got {n_splits}")
        for opt, val in (("n_tasks", n_tasks), ("n_skills", n_skills), ("n_splits", n_splits), ("rank", rank)):
            int_option("mhr", opt, val)
        self.variant, self.n_tasks, self.n_skills, self.n_splits = variant, int(n_tasks), int(n_skills), int(n_splits)
        self.rank, self.alpha, self.gumbel, self.routing_lr = int(rank), float(alpha), bool(gumbel), float(routing_lr)
        self.targets, self.layers = list(targets), layers
        self.task = TaskState(self.n_tasks)
        self.inventory_loaded = False  # set by load_inventory / load_adapter; mhr_z needs it

    @classmethod
    def from_config(cls, **config: Any) -> "MHR":
        obj = super().from_config(**config)
        obj.config["n_splits"] = obj.n_splits  # record the resolved head count in adapter.json
        return obj

    def attach(self, backbone) -> None:
        bad = [t for t in self.targets if t not in LINEAR_SITES]
        if bad:
            raise SiteError(f"MHR attaches to Linear sites {LINEAR_SITES}, not {bad}")
        for group in group_by_module(self.sites(self.targets, self.layers)):
            slices = {s.kind: s.out_slice for s in group}
            if self.variant == "mhr_mu":
                module = LoRALinear(group[0].module, self.rank, self.alpha, 0.0, slices)
                skill_init_(module.lora_A, module.linear().in_features)  # mttl's init (fresh start only)
            else:
                module = MHRLinear(group[0].module, slices, self.task, self.n_tasks, self.n_skills,
                                   self.n_splits, self.rank, self.alpha, self.gumbel)
            module.train(backbone.training)  # follow the model's mode (Gumbel sampling is training-only)
            self.replace(group[0], module)
        if self.gumbel:  # routing samples once per image: remember how many images this forward has
            self._hook = backbone.register_forward_pre_hook(self._note_batch)

    def _note_batch(self, module, args) -> None:
        x = args[0] if args else None
        self.task.batch = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else None

    def unload(self) -> None:
        hook = getattr(self, "_hook", None)
        if hook is not None:
            hook.remove()
            self._hook = None
        super().unload()

    def prepare(self, model: nn.Module, dataloader) -> None:
        if self.variant == "mhr_z" and not self.inventory_loaded:
            raise ValueError(
                "adapter.variant=mhr_z trains only routing logits over a frozen skill inventory, but no inventory "
                "was loaded (it would train only the head): start from a multi-task artifact (task=multitask runs "
                "stage 1 first, or adapter.init_from=<mhr artifact>), or use variant=mhr / poly")

    def after_load(self) -> None:
        self.inventory_loaded = True

    def routing_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules if isinstance(m, MHRLinear) for p in m.routing.values()]

    def mark_trainable(self) -> None:
        if self.variant == "mhr_z":  # MHR-z: only the task's routing logits; the inventory is frozen
            for p in self.adapter_parameters():
                p.requires_grad_(False)
            for p in self.routing_parameters():
                p.requires_grad_(True)
        else:
            super().mark_trainable()

    def set_task(self, task_ids) -> None:
        self.task.set(task_ids)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict] | None:
        routing = [p for p in self.routing_parameters() if p.requires_grad]
        return [{"params": routing, "lr": self.routing_lr, "weight_decay": 0.0}] if routing else None


# ---------------------------------------------------------------------- few-shot transfer

def load_inventory(model: nn.Module, source: str | Path | tuple[dict[str, torch.Tensor], dict[str, Any]]) -> nn.Module:
    """Initialise the MHR adapter on ``model`` from a multi-task artifact (few-shot transfer).

    ``source`` is an artifact folder (from :func:`zoo.save_adapter`) or ``(tensors, adapter.json
    dict)``. The inventory (A, B) is copied; routing stays the fresh ``U(±1e-3)`` rows of the new
    adapter (MHR, MHR-z) or is discarded (MHR-μ: each LoRA gets ``A_μ``, ``B_μ``). Heads and
    other tensors of the artifact are ignored. The source must use the same targets, layers and
    rank (and, unless the target is MHR-μ, the same n_skills and n_splits).
    """
    from zoo.api import adapters_of
    from zoo.checkpoint import read_adapter_config, read_adapter_weights

    if isinstance(source, (str, Path)):
        meta = read_adapter_config(source)
        state = read_adapter_weights(source, meta)  # the same hash / NaN checks as load_adapter
    else:
        state, meta = source
    src = [m["config"] for m in meta.get("methods", []) if m["name"] == "mhr"]
    if len(src) != 1 or src[0]["variant"] == "mhr_mu":
        raise ValueError(f"load_inventory needs an artifact with one MHR inventory (variant poly/mhr/mhr_z), got methods {meta.get('methods')}")
    src = src[0]
    dst = [a for a in adapters_of(model) if isinstance(a, MHR)]
    if len(dst) != 1:
        raise ValueError("load_inventory: attach exactly one 'mhr' adapter to the model first")
    dst = dst[0]
    for k in ("targets", "layers", "rank"):
        if src[k] != dst.config[k]:
            raise ValueError(f"load_inventory: artifact has {k}={src[k]!r}, this adapter {dst.config[k]!r}")
    if dst.variant != "mhr_mu":
        for k in ("n_skills", "n_splits"):
            if src[k] != getattr(dst, k):
                raise ValueError(f"load_inventory: artifact has {k}={src[k]!r}, this adapter {getattr(dst, k)!r}")

    names = {id(m): n for n, m in model.named_modules()}
    with torch.no_grad():
        for m in dst.modules:
            prefix = names[id(m)]
            for i, key in enumerate(m.slices):
                try:
                    A, B = state[f"{prefix}.mhr_A.{key}"], state[f"{prefix}.mhr_B.{key}"]
                except KeyError as e:
                    raise ValueError(f"load_inventory: the artifact has no inventory for {prefix} [{key}]") from e
                if isinstance(m, MHRLinear):
                    m.mhr_A[key].copy_(A)
                    m.mhr_B[key].copy_(B)
                else:  # MHR-μ: the average adapter, heads concatenated (LoRALinear stores Aᵀ, Bᵀ)
                    A_mu, B_mu = mix(torch.full(A.shape[:2], 1.0 / A.shape[1], dtype=A.dtype), A, B)
                    r = m.rank
                    m.lora_A[i * r:(i + 1) * r].copy_(A_mu.t())
                    m.lora_B[key].copy_(B_mu.t())
    dst.inventory_loaded = True
    return model


def fewshot_adapter(adapter: dict[str, Any], variant: str, inventory_meta: dict[str, Any]) -> dict[str, Any]:
    """The stage-2 adapter config of the multi-task -> few-shot protocol: ``adapter`` in its transfer
    ``variant`` with one task, and the stage-1 inventory's *resolved* ``n_splits`` (``null`` means
    1 for poly but 64 for the others, so stage 2 must not re-resolve it)."""
    src = [m["config"] for m in inventory_meta.get("methods", []) if m.get("name") == "mhr"]
    out = {**adapter, "variant": variant, "n_tasks": 1}
    if src:
        out["n_splits"] = src[0]["n_splits"] if variant != "poly" else 1
    return out
