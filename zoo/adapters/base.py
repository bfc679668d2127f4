"""The adapter contract: plain ``nn.Module`` pieces plus a thin object that attaches them.

An :class:`Adapter` is one method applied to one backbone. ``attach`` builds modules at
named sites (:mod:`zoo.sites`); everything it builds subclasses :class:`AdapterModule`, and a
module that wraps an original layer keeps it at ``.base`` so that the original weights keep
their place and ``unload`` can put them back.

Optional capabilities (each a no-op by default, called by tasks without knowing the method):

* ``merge()`` / ``unmerge()``: fold the adapter into the base weights and back.
* ``prepare(model, dataloader)``: a data-driven stage before training.
* ``extra_loss(ctx)``: a regulariser added to the task loss; ``ctx`` is a :class:`StepContext`.
* ``before_optimizer_step()``: gradient surgery after backward, before the optimizer step.
* ``param_groups(lr, weight_decay)``: optimizer groups with their own learning rates.
* ``set_task(task_ids)``: the current batch's task id(s), for task-routed methods (MHR).
* ``export_state(state)`` / ``import_state(state)``: method-specific storage in the artifact.
* ``attach_model(model)``: called after ``attach(backbone)`` with the whole model the user passed to
  ``apply_adapter`` (e.g. a ``zoo.ImageClassifier``), for methods that also change modules outside
  the backbone (a head). Such modules go in with :meth:`Adapter.replace_attr`, so ``unload``
  restores them.
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


class Adapter:
    """Base class of every method. Subclasses set ``name`` and implement ``attach``.

    The constructor's keyword arguments are the method's config; they are recorded (with their
    defaults) in :attr:`config` and written to ``adapter.json``.
    """

    name: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    paper: ClassVar[str] = ""

    def __init__(self, **config: Any):
        self.config: dict[str, Any] = config
        self.modules: list[AdapterModule] = []  # every module this adapter created
        self._replaced: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attr, original)
        self.backbone: nn.Module | None = None
        self.merged = False
        self.tower: str | None = None  # set by from_config(tower=...)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, **config: Any) -> "Adapter":
        # ``tower`` is common to every method: which of the model's towers it attaches to
        # (``None``: the backbone's blocks; ``"decoder"``: SAM's mask-decoder transformer).
        tower = config.pop("tower", None)
        sig = inspect.signature(cls.__init__)
        params = [k for k, p in sig.parameters.items()
                  if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
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
        if tower not in (None, "encoder"):
            obj.tower = str(tower)
            obj.config["tower"] = obj.tower
        return obj

    def sites(self, targets, layers: Layers = "all") -> list[Site]:
        assert self.backbone is not None
        return find_sites(self.backbone, targets, layers)

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
        """Data-driven stage before training (no-op by default)."""

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"


class NotMergeableError(RuntimeError):
    """Raised when merging an adapter whose function is not a weight reparameterisation."""


def _plain(obj: Any) -> Any:
    """Turn tuples/OmegaConf containers into JSON-friendly lists and dicts."""
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or (hasattr(obj, "__iter__") and not isinstance(obj, (str, bytes))):
        return [_plain(v) for v in obj]
    return obj
