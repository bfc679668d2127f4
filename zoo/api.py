"""The library's front door: attach, count, merge and remove adapters on any backbone."""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from zoo.adapters import ADAPTERS
from zoo.adapters.base import Adapter, NotMergeableError, StepContext
from zoo.backbones.base import Backbone
from zoo.sites import SiteError


def find_backbone(model: nn.Module) -> Backbone:
    """The :class:`Backbone` in ``model`` (the model itself, or its first Backbone submodule)."""
    if isinstance(model, Backbone):
        return model
    for m in model.modules():
        if isinstance(m, Backbone):
            return m
    raise TypeError(f"{type(model).__name__} contains no zoo Backbone; build one with zoo.create_backbone(...)")


def adapters_of(model: nn.Module) -> list[Adapter]:
    """The adapters attached to ``model``'s backbone, in the order they were applied."""
    return find_backbone(model).adapters


def list_adapters(describe: bool = False) -> list[str] | dict[str, str]:
    """The registered adapter names; ``describe=True``: ``{name: one-line description (paper)}``."""
    if not describe:
        return ADAPTERS.names()
    out = {}
    for n in ADAPTERS.names():
        cls = ADAPTERS.get(n)
        line = next((ln.strip() for ln in (cls.__doc__ or "").splitlines() if ln.strip()), "")
        out[n] = line + (f" ({cls.paper})" if cls.paper else "")
    return out


def apply_adapter(model: nn.Module, name: str, **config: Any) -> nn.Module:
    """Attach adapter ``name`` to ``model``'s backbone, in place, and return ``model``.

    The first adapter freezes the backbone's own weights; the adapter then marks what it
    trains (its new parameters, or base parameters for ``full``/``bitfit``). Modules outside
    the backbone (a task head) are left as they are, unless the method's ``attach_model`` hook
    (called with ``model``) replaces them, e.g. ``onebit``'s 1-bit head.
    """
    cls = ADAPTERS.get(name)
    bb = find_backbone(model)
    adapter = cls.from_config(**config)
    snap = ModelState(model)
    try:
        if not bb.adapters:
            bb.fingerprint()  # of the base weights, before anything changes
            for p in bb.parameters():
                p.requires_grad_(False)
        target = resolve_tower(model, bb, adapter.tower)
        adapter.tower_view = target is not bb  # the tower was resolved to its own site provider
        attach_adapter(adapter, target, model)
    except BaseException:
        snap.restore(model)  # a failed attach leaves no parameter frozen that was not before
        raise
    bb.adapters.append(adapter)
    snap.match_mode(model)
    return model


class ModelState:
    """What attaching adapters changes on a model: its adapters, ``requires_grad`` flags and the
    set of modules. ``restore`` undoes every adapter attached since, and the flags; ``match_mode``
    puts modules created since in the model's current train/eval mode (a model in ``eval()`` must
    not get dropout-active adapter modules)."""

    def __init__(self, model: nn.Module):
        self.adapters = list(adapters_of(model))
        self.flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
        self.modules = {id(m) for m in model.modules()}

    def restore(self, model: nn.Module) -> None:
        bb = find_backbone(model)
        for a in reversed(bb.adapters):
            if not any(a is b for b in self.adapters):
                a.unmerge()
                a.unload()
        bb.adapters[:] = self.adapters
        for p, flag in self.flags.values():
            p.requires_grad_(flag)

    def match_mode(self, model: nn.Module) -> None:
        for m in model.modules():
            if id(m) not in self.modules:
                m.training = model.training


def resolve_tower(model: nn.Module, bb: Backbone, tower) -> nn.Module:
    """The site provider an adapter with the ``tower`` option attaches to.

    * a model with towers of its own (``zoo.backbones.sam_decoder.SamSegmenter``: ``encoder`` | ``decoder``, the
      mask decoder's two-way transformer) gives them as :class:`Backbone` views (``model.tower``);
    * a backbone with several towers (CLIP: ``visual`` | ``text`` | ``both``; CoCa: ``visual`` |
      ``decoder``) is its own provider:
      ``Adapter.sites`` selects its towers (:func:`zoo.sites.find_sites`);
    * anything else has one tower and refuses the option.
    """
    if tower is None:
        return bb
    if not isinstance(model, Backbone) and callable(getattr(model, "tower", None)):
        return model.tower(tower)
    if getattr(bb, "towers", ()):
        return bb
    raise SiteError(
        f"tower={tower!r}: backbone {bb.family!r} has a single tower and {type(model).__name__} has only its "
        f"backbone's blocks; towers exist on clip (visual | text | both), coca (visual | decoder) and on SAM's segmenter (encoder | decoder). "
        f"Leave tower unset"
    )


def attach_adapter(adapter: Adapter, target: nn.Module, model: nn.Module | None = None) -> Adapter:
    """Attach ``adapter`` to ``target`` (then, if given, ``attach_model(model)`` with the whole model)
    and mark what trains; on failure, undo what was attached."""
    adapter.backbone = target
    try:
        adapter.attach(target)
        if model is not None:
            adapter.attach_model(model)
        adapter.train_also_modules()  # a name this backbone lacks fails here, before anything trains
    except Exception:
        adapter.unload()
        raise
    adapter.mark_trainable()
    adapter.mark_train_also()
    return adapter


def remove_adapters(model: nn.Module) -> nn.Module:
    """Detach every adapter without merging: the backbone's original modules come back."""
    bb = find_backbone(model)
    for a in reversed(bb.adapters):
        a.unmerge()
        a.unload()
    bb.adapters.clear()
    for p in bb.parameters():  # back to a frozen plain backbone (undoes full / bitfit marking)
        p.requires_grad_(False)
    return model


def merge_adapters(model: nn.Module, unload: bool = True) -> nn.Module:
    """Fold every attached adapter into the base weights.

    With ``unload=True`` the wrappers are removed: the backbone is the plain model again, with
    its original parameter names, and costs exactly what the plain backbone costs.
    Raises :class:`NotMergeableError` (changing nothing) if any adapter is not mergeable.
    """
    bb = find_backbone(model)
    bad = [a.name for a in bb.adapters if not a.mergeable]
    if bad:
        raise NotMergeableError(
            f"adapter(s) {bad} are not reparameterisations of the weights and cannot be merged; "
            f"mergeable adapters: {', '.join(n for n in ADAPTERS.names() if ADAPTERS.get(n).mergeable)}"
        )
    for a in bb.adapters:
        a.merge()
    if unload:
        for a in reversed(bb.adapters):
            a.unload()
        bb.adapters.clear()
        bb.reset_fingerprint()  # the weights are now base + delta
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters` (``unload=False``): subtract the deltas again."""
    for a in reversed(adapters_of(model)):
        a.unmerge()
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each shared tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


# ---------------------------------------------------------------------- training hooks
# Tasks call these without knowing which adapters are attached; each is a plain function so
# that it can be tested without Lightning.

def prepare_adapters(model: nn.Module, dataloader, loss_fn=None) -> None:
    """Run every adapter's data-driven stage. ``loss_fn(batch) -> scalar``: the task's training loss on
    one batch (tasks pass theirs; default :func:`zoo.adapters.base.default_batch_loss`); it reaches the
    adapters whose ``prepare`` declares a ``loss_fn`` parameter."""
    import inspect

    from zoo.adapters.base import default_batch_loss

    for a in adapters_of(model):
        if "loss_fn" in inspect.signature(a.prepare).parameters:
            a.prepare(model, dataloader, loss_fn=loss_fn or default_batch_loss(model))
        else:
            a.prepare(model, dataloader)


def on_train_step(model: nn.Module, step: int) -> None:
    """Before each training forward: ``step`` = optimizer steps taken so far (DyLoRA's rank sampler)."""
    for a in adapters_of(model):
        a.on_train_step(step)


OPTIMIZERS = ("adamw", "adam")


def build_optimizer(model: nn.Module, groups: list[dict], lr: float, weight_decay: float,
                    betas=(0.9, 0.999), eps: float = 1e-8, name: str = "adamw") -> torch.optim.Optimizer:
    """The training optimizer over ``groups``: AdamW (decoupled weight decay), or ``name="adam"``: Adam with
    the decay added to the gradient (L2, ``torch.optim.Adam(weight_decay=...)``, as AST's ``traintest.py``),
    unless an attached adapter replaces it (GaLore's projected Adam, LoRA-Pro's adjusted-gradient optimizer).
    Two that do are refused."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    made = [(a.name, o) for a in adapters_of(model)
            if (o := a.make_optimizer(groups, lr, weight_decay, tuple(betas), float(eps))) is not None]
    if len(made) > 1:
        raise ValueError(f"adapters {[n for n, _ in made]} each replace the optimizer; attach only one of them")
    if made:
        return made[0][1]
    algo = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return algo(groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=float(eps))


def extra_loss(model: nn.Module, ctx: StepContext) -> torch.Tensor | None:
    total = None
    for a in adapters_of(model):
        loss = a.extra_loss(ctx)
        if loss is not None:
            total = loss if total is None else total + loss
    return total


def before_optimizer_step(model: nn.Module) -> None:
    for a in adapters_of(model):
        a.before_optimizer_step()


def set_task(model: nn.Module, task_ids: torch.Tensor | int | None) -> None:
    """Tell every attached adapter which task the next forward's samples belong to.

    ``task_ids``: an int (the whole batch), a ``(B,)`` tensor (one id per sample) or ``None``
    (forget; task-routed adapters then use task 0). Adapters without task routing ignore it.
    Call it before each forward of a multi-task batch.
    """
    for a in adapters_of(model):
        a.set_task(task_ids)


def param_groups(model: nn.Module, lr: float, weight_decay: float, decay_1d: bool = False) -> list[dict]:
    """Optimizer groups over the trainable parameters only.

    Adapters may claim their parameters in groups of their own (e.g. MHR's routing logits with
    a larger learning rate); every other trainable parameter goes to a default group, with
    weight decay off for biases, norms and 1-d tensors (as timm's ``param_groups_weight_decay``),
    unless ``decay_1d`` (every parameter decays, as ``Adam(model.parameters(), weight_decay=...)`` in
    AST's and PETL-AST's training scripts).
    """
    groups: list[dict] = []
    claimed: set[int] = set()
    for a in adapters_of(model):
        for g in a.param_groups(lr, weight_decay) or []:
            params = [p for p in g["params"] if p.requires_grad and id(p) not in claimed]
            claimed.update(id(p) for p in params)
            if params:
                groups.append({**g, "params": params})
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in claimed:
            continue
        claimed.add(id(p))
        (no_decay if not decay_1d and (p.ndim <= 1 or name.endswith(".bias")) else decay).append(p)
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


def iter_adapter_modules(model: nn.Module) -> Iterator[nn.Module]:
    for a in adapters_of(model):
        yield from a.modules
