"""The adapter contract: plain ``nn.Module`` pieces plus a thin object that attaches them.

An :class:`Adapter` is one method applied to one backbone. ``attach`` builds modules at
named sites (:mod:`zoo.sites`); everything it builds subclasses :class:`AdapterModule`, and a
module that wraps an original layer keeps it at ``.base`` so that the original weights keep
their place and ``unload`` can put them back.

Optional capabilities (each a no-op by default, called by tasks without knowing the method):

* ``merge()`` / ``unmerge()``: fold the adapter into the base weights and back.
* ``prepare(model, dataloader[, loss_fn])``: a data-driven stage before training. A method whose stage
  needs the task's loss (a gradient pass: LoRA-GA) declares a ``loss_fn`` parameter; tasks pass
  ``loss_fn(batch) -> scalar`` (their training loss on one batch of ``dataloader``); a plain caller that
  passes none gets :func:`default_batch_loss`.
* ``on_train_step(step)``: before each training step's forward, with the optimizer-step count (DyLoRA
  samples its rank here; a function of ``step`` so that a resumed run and every DDP rank agree).
* ``make_optimizer(groups, lr, weight_decay, betas, eps)``: replace the optimizer (GaLore, LoRA-Pro):
  return a ``torch.optim.Optimizer`` over ``groups`` (those of :func:`zoo.param_groups`) or ``None``
  (AdamW). Its ``state_dict`` must hold only tensors and numbers, so that checkpoints resume it.
* ``extra_loss(ctx)``: a regulariser added to the task loss; ``ctx`` is a :class:`StepContext`.
* ``before_optimizer_step()``: gradient surgery after backward, before the optimizer step.
* ``param_groups(lr, weight_decay)``: optimizer groups with their own learning rates.
* ``set_task(task_ids)``: the current batch's task id(s), for task-routed methods (MHR).
* ``export_state(state)`` / ``import_state(state)``: method-specific storage in the artifact.
* ``attach_model(model)``: called after ``attach(backbone)`` with the whole model the user passed to
  ``apply_adapter`` (e.g. a ``zoo.ImageClassifier``), for methods that also change modules outside
  the backbone (a head). Such modules go in with :meth:`Adapter.replace_attr`, so ``unload``
  restores them.

Every adapter also takes ``train_also`` (peft's ``modules_to_save`` for the backbone's norms): a list of
:data:`TRAIN_ALSO` names whose base parameters train beside the method -- ``norm1`` / ``norm2`` (the
LayerNorm before attention / before the MLP in every block; HF AST's ``layernorm_before`` /
``layernorm_after``) and ``final_norm`` (the norm after the last block; HF AST's ``layernorm``). They are
the backbone's own tensors, trained in place: the artifact stores them (every trainable parameter is
saved), ``adapter.json`` records the list, so loading rebuilds the same model and restores them; a merged
export carries them as base weights. PETL-AST (Cappellazzo et al., MLSP 2024) trains these besides each
method (``experiment=petl_ast/*``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from zoo.sites import Layers, Site, find_sites


class AdapterModule(nn.Module):
    """Marker base class for modules an adapter creates.

    Tensors under an ``AdapterModule`` belong to the adapter artifact, except those under
    its ``base`` child (the wrapped original layer).
    """

    wraps_base = True  # zoo.sites.unwrap follows ``.base`` through modules with this mark


class WrappedLayer(AdapterModule):
    """An adapter module that wraps an original layer kept at ``self.base``.

    Subclasses implement ``forward`` and, when mergeable, ``merge_into_base``/``unmerge_from_base``.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.merged = False

    def merge(self) -> None:
        if not self.merged:
            with torch.no_grad():
                self.merge_into_base()
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            with torch.no_grad():
                self.unmerge_from_base()
            self.merged = False

    def linear(self) -> nn.Linear:
        """The original Linear under this wrapper (and any wrappers below it)."""
        return inner_layer(self.base, nn.Linear, type(self).__name__)

    def merge_into_base(self) -> None:  # pragma: no cover - overridden by mergeable wrappers
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def unmerge_from_base(self) -> None:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} cannot be unmerged")


def inner_layer(module: nn.Module, kind: type = nn.Linear, who: str = "this adapter") -> nn.Module:
    """Follow ``.base`` through wrappers to the original layer, which must be a ``kind``."""
    from zoo.sites import SiteError

    m = module
    while isinstance(m, WrappedLayer):
        m = m.base
    if not isinstance(m, kind):
        raise SiteError(f"{who} wraps {kind.__name__} layers, got {type(m).__name__}")
    return m


@dataclass
class StepContext:
    """What ``extra_loss`` sees of a training step.

    ``forward`` re-runs the model on ``inputs`` (for methods with a second pass, e.g. MoSA);
    ``loss_fn(logits, targets)`` is the task loss.
    """

    model: nn.Module
    inputs: Any
    targets: Any
    outputs: Any
    loss: torch.Tensor | None = None
    loss_fn: Callable | None = None
    forward: Callable | None = None
    batch: Any = None
    extras: dict = field(default_factory=dict)


TRAIN_ALSO = ("norm1", "norm2", "final_norm")  # what an adapter's ``train_also`` may name


def train_also_option(who: str, value: Any) -> list[str]:
    """``train_also`` as a list of :data:`TRAIN_ALSO` names (``None`` / ``[]``: nothing more trains)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (dict, bytes)) or not hasattr(value, "__iter__") or hasattr(value, "keys"):
        raise ValueError(f"adapter {who!r}: train_also must be a list of names ({', '.join(TRAIN_ALSO)}), got {value!r}")
    names = list(value)  # a list, tuple or Hydra ListConfig
    bad = [n for n in names if not isinstance(n, str) or n not in TRAIN_ALSO]
    if bad:
        raise ValueError(f"adapter {who!r}: unknown train_also name(s) {bad}; valid: {', '.join(TRAIN_ALSO)}")
    return list(dict.fromkeys(names))  # in the given order, each once


class Adapter:
    """Base class of every method. Subclasses set ``name`` and implement ``attach``.

    The constructor's keyword arguments are the method's config; they are recorded (with their
    defaults) in :attr:`config` and written to ``adapter.json``.
    """

    name: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    paper: ClassVar[str] = ""
    # q, k, v are *row slices* of a fused qkv Linear (``Site.out_slice``). An adapter that wraps
    # whole modules would silently adapt all of qkv (twice for targets=[q, v]); only adapters that
    # handle ``out_slice`` set this, and :meth:`sites` refuses slice sites for the others.
    supports_slices: ClassVar[bool] = False

    def __init__(self, **config: Any):
        self.config: dict[str, Any] = config
        self.modules: list[AdapterModule] = []  # every module this adapter created
        self._replaced: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attr, original)
        self.backbone: nn.Module | None = None
        self.merged = False
        self.tower = None  # which towers (multi-tower backbones, or a model's other towers); see from_config
        self.train_also: list[str] = []  # backbone norms that train too (TRAIN_ALSO); see from_config

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, **config: Any) -> "Adapter":
        sig = inspect.signature(cls.__init__)
        params = [k for k, p in sig.parameters.items()
                  if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        # ``tower`` is a site-selection option every adapter has: which towers of a multi-tower
        # backbone (clip: visual | text | both; zoo.sites.find_sites) or which of the model's towers
        # (SAM: encoder | decoder; zoo.api.resolve_tower). It goes to ``self.sites``, not to the
        # method's constructor, and is recorded only when given.
        tower = config.pop("tower", None)
        # ``train_also`` likewise belongs to every adapter (the backbone norms that train beside the method,
        # :meth:`mark_train_also`); recorded only when it names something
        train_also = train_also_option(cls.name, config.pop("train_also", None))
        unknown = [k for k in config if k not in params]
        if unknown:
            raise TypeError(
                f"adapter {cls.name!r} got unknown option(s) {unknown}; valid options: {', '.join(params)}"
            )
        bound = sig.bind_partial(None, **config)
        bound.apply_defaults()
        full = {k: v for k, v in bound.arguments.items() if k != "self"}
        obj = cls(**config)
        obj.config = _plain(full)
        if tower not in (None, "encoder"):  # SAM: encoder = the backbone itself
            obj.tower = tower
            obj.config["tower"] = _plain(tower) if not isinstance(tower, str) else tower
        if train_also:
            obj.train_also = train_also
            obj.config["train_also"] = list(train_also)
        return obj

    def own_tower(self):
        """The tower selection to pass to ``self.backbone`` (its ``tower_named_parameters``, ``find_sites``).

        Towers of the backbone itself (CLIP's) are selected by ``self.tower``; a model's other towers (SAM's
        decoder) were resolved to their own view by ``zoo.api.resolve_tower`` (``tower_view``), which is then
        ``self.backbone`` and takes no tower."""
        return None if getattr(self, "tower_view", False) else self.tower

    def sites(self, targets, layers: Layers = "all") -> list[Site]:
        from zoo.sites import SiteError

        assert self.backbone is not None
        if not isinstance(targets, str) and not list(targets):  # [] would adapt nothing and train nothing
            from zoo.sites import SITE_KINDS

            raise SiteError(f"adapter {self.name!r}: targets=[] selects no site; give at least one of "
                            f"{', '.join(SITE_KINDS)}")
        sites = find_sites(self.backbone, targets, layers, self.own_tower())
        sliced = sorted({s.kind for s in sites if s.out_slice is not None})
        if sliced and not self.supports_slices:
            raise SiteError(
                f"adapter {self.name!r} wraps whole layers, but {sliced} are row slices of this backbone's fused "
                f"qkv projection; target 'qkv' instead (or handle Site.out_slice and set supports_slices = True)")
        return sites

    def replace(self, site: Site, new: AdapterModule) -> AdapterModule:
        """Put ``new`` at ``site`` (it usually wraps ``site.module``) and remember how to undo it."""
        self._replaced.append((site.parent, site.attr, site.module))
        site.replace(new)
        self.modules.append(new)
        return new

    def add_module(self, owner: nn.Module, attr: str, module: AdapterModule) -> AdapterModule:
        """Register a new module as ``owner.attr`` (e.g. prompt tokens on the backbone)."""
        if hasattr(owner, attr):
            raise ValueError(f"{type(owner).__name__} already has an attribute {attr!r}")
        owner.add_module(attr, module)
        self._replaced.append((owner, attr, None))
        self.modules.append(module)
        return module

    def replace_attr(self, owner: nn.Module, attr: str, new: AdapterModule) -> AdapterModule:
        """Put ``new`` at ``owner.attr`` (a module outside the backbone's sites, e.g. a task head)
        and remember how to undo it."""
        old = getattr(owner, attr)
        self._replaced.append((owner, attr, old))
        setattr(owner, attr, new)
        self.modules.append(new)
        return new

    def attach(self, backbone: nn.Module) -> None:
        raise NotImplementedError

    def attach_model(self, model: nn.Module) -> None:
        """Change modules outside the backbone (no-op by default).

        ``apply_adapter`` calls it after ``attach(backbone)`` with the whole model it was given
        (an ``ImageClassifier``, or the backbone itself), before ``mark_trainable``. Replace
        modules with :meth:`replace_attr` so that ``unload`` restores them.
        """

    # ------------------------------------------------------------------ parameters
    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        seen = set()
        for m in self.modules:
            for name, p in m.named_parameters():
                if (name == "base" or name.startswith("base.")) or id(p) in seen:
                    continue
                seen.add(id(p))
                yield p

    def mark_trainable(self) -> None:
        """Default: every parameter the adapter created trains; the base stays frozen."""
        for p in self.adapter_parameters():
            p.requires_grad_(True)

    def train_also_modules(self) -> list[nn.Module]:
        """The backbone modules ``train_also`` names (under any adapter wrappers: the original ones).

        ``norm1`` / ``norm2``: that norm of every block (of this adapter's towers); ``final_norm``: the
        backbone's :meth:`~zoo.backbones.base.Backbone.final_norm`. A name this backbone lacks is one
        :class:`~zoo.sites.SiteError` listing the names it has."""
        from zoo.sites import SiteError, unwrap

        if not self.train_also:
            return []
        bb = self.backbone

        def resolve(name: str) -> list[nn.Module]:
            if name == "final_norm":
                final = getattr(bb, "final_norm", lambda: None)()
                if final is None:
                    raise SiteError(name)
                return [unwrap(final)]
            return [s.base_module for s in self.sites(name, "all")]

        out: list[nn.Module] = []
        for name in self.train_also:
            try:
                out.extend(resolve(name))
            except SiteError:
                have = []
                for k in TRAIN_ALSO:
                    try:
                        resolve(k)
                        have.append(k)
                    except SiteError:
                        pass
                raise SiteError(f"adapter {self.name!r}: train_also={name!r}: backbone {getattr(bb, 'family', '?')!r} has "
                                f"no {name}; valid here: {', '.join(have) or 'none'}") from None
        return out

    def mark_train_also(self) -> None:
        """Let the parameters of :meth:`train_also_modules` train (after :meth:`mark_trainable`)."""
        for m in self.train_also_modules():
            for p in m.parameters():
                p.requires_grad_(True)

    # ------------------------------------------------------------------ merge / unload
    def merge(self) -> None:
        if not self.mergeable:
            raise NotMergeableError(f"adapter {self.name!r} cannot be merged into the base weights")
        for m in self.modules:
            if isinstance(m, WrappedLayer):
                m.merge()
        self.merged = True

    def unmerge(self) -> None:
        for m in reversed(self.modules):
            if isinstance(m, WrappedLayer):
                m.unmerge()
        self.merged = False

    def unload(self) -> None:
        """Remove every module this adapter created, restoring the originals (merged or not)."""
        for parent, attr, original in reversed(self._replaced):
            if original is None:
                delattr(parent, attr)
            else:
                setattr(parent, attr, original)
        self._replaced.clear()
        self.modules.clear()

    # ------------------------------------------------------------------ optional hooks
    def prepare(self, model: nn.Module, dataloader) -> None:
        """Data-driven stage before training (no-op by default). Declare a third parameter
        ``loss_fn=None`` to receive the task's ``loss_fn(batch) -> scalar``."""

    def on_train_step(self, step: int) -> None:
        """Called before each training forward with the number of optimizer steps taken so far."""

    def make_optimizer(self, groups: list[dict], lr: float, weight_decay: float, betas=(0.9, 0.999),
                       eps: float = 1e-8) -> torch.optim.Optimizer | None:
        """An optimizer that replaces AdamW over ``groups``; ``None``: AdamW (default)."""
        return None

    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        return None

    def before_optimizer_step(self) -> None:
        pass

    def set_task(self, task_ids: torch.Tensor | int | None) -> None:
        """The task id(s) of the next forward: an int, a ``(B,)`` tensor (one per sample) or ``None``."""

    def param_groups(self, lr: float, weight_decay: float) -> list[dict] | None:
        """Optimizer groups for this adapter's parameters; ``None`` means 'the default group'."""
        return None

    def export_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state

    def import_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state

    def after_load(self) -> None:
        """Called by ``load_adapter`` once the artifact's tensors are in the model (no-op by default)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"


# ---------------------------------------------------------------------- option validation
# Every adapter checks its options in ``__init__`` with these, so a bad value is one clear
# ``ValueError`` naming the option, never a silent cast (``rank=2.7`` must not become 2).

def int_option(who: str, name: str, value: Any, lo: int | None = 1, hi: int | None = None) -> int:
    """``value`` as an int in ``lo..hi``; refuses bools, non-integral floats and strings."""
    return check_int(f"adapter {who!r}: {name}", value, lo, hi)


def float_option(who: str, name: str, value: Any, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite float in the interval (``lo_open``/``hi_open``: exclusive ends)."""
    return check_float(f"adapter {who!r}: {name}", value, lo, hi, lo_open, hi_open)


def check_int(label: str, value: Any, lo: int | None = 1, hi: int | None = None) -> int:
    """``value`` as an int in ``lo..hi``, or ``ValueError("<label> must be an integer ..., got ...")``
    (the checker behind :func:`int_option`; ``tasks.options`` uses it for task and data configs)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok and isinstance(value, float) and value.is_integer():  # 16.0 from YAML / CLI arithmetic
        value, ok = int(value), True
    rng = (f" in {lo}..{hi}" if hi is not None else f" >= {lo}") if lo is not None else ""
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{label} must be an integer{rng}, got {value!r}")
    return int(value)


def check_float(label: str, value: Any, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite float in the interval, or ``ValueError("<label> must be a finite number ...")``."""
    import math

    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if not bad:
        v = float(value)
        bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        lb = "" if lo is None else ("(" if lo_open else "[") + f"{lo}"
        ub = "" if hi is None else f"{hi}" + (")" if hi_open else "]")
        rng = f" in {lb or '(-inf'}, {ub or 'inf)'}" if (lo is not None or hi is not None) else ""
        raise ValueError(f"{label} must be a finite number{rng}, got {value!r}")
    return float(value)


def dropout_option(who: str, value: Any, name: str = "dropout") -> float:
    return float_option(who, name, value, 0.0, 1.0, hi_open=True)


def rank_fits(who: str, name: str, rank: int, d_in: int, d_out: int, where: str = "") -> None:
    """A low-rank factor of a ``d_out × d_in`` matrix has rank at most ``min(d_in, d_out)``."""
    if rank > min(d_in, d_out):
        raise ValueError(
            f"{who}: {name}={rank} exceeds min(d_in, d_out) = min({d_in}, {d_out}) = {min(d_in, d_out)}"
            f"{' at ' + where if where else ''}; a larger rank only adds parameters (choose {name} <= {min(d_in, d_out)})"
        )


def default_batch_loss(model: nn.Module):
    """``loss_fn(batch)`` for a plain ``(inputs, targets, ...)`` loader: cross-entropy for integer
    targets, MSE for targets shaped like the outputs (what ``prepare`` uses when no task gives its loss)."""
    import torch.nn.functional as F

    def loss_fn(batch) -> torch.Tensor:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise TypeError("prepare(model, dataloader) without loss_fn expects batches (inputs, targets, ...); "
                            "pass loss_fn(batch) -> loss for other batches")
        device = next(model.parameters()).device
        x, y = batch[0].to(device), batch[1].to(device)
        out = model(x)
        # F.cross_entropy takes (N, C) with (N,) and (N, C, H, W) with (N, H, W) alike
        return F.cross_entropy(out, y) if not y.is_floating_point() else F.mse_loss(out, y)

    return loss_fn


class NotMergeableError(RuntimeError):
    """Raised when merging an adapter whose function is not a weight reparameterisation."""


def _plain(obj: Any) -> Any:
    """Turn tuples/OmegaConf containers into JSON-friendly lists and dicts."""
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or (hasattr(obj, "__iter__") and not isinstance(obj, (str, bytes))):
        return [_plain(v) for v in obj]
    return obj
