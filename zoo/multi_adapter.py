"""Many adapters, one batch: serve several task adapters on one frozen backbone.

``MultiAdapter(backbone, {"name": artifact_or_model, ...})`` keeps one copy of the frozen base
weights and, per adapter, its adapter tensors and its task head. ``forward(x, adapter=[...])``
routes each sample to its adapter:

* **batched** adapters (every module they put in the backbone has a low-rank form, see
  :func:`low_rank_form`) share ONE backbone pass. At every adapted layer a :class:`BatchedLinear`
  (or :class:`BatchedConv2d`) holds the stacked factors of all batched adapters and gathers each
  sample's own (S-LoRA / Punica style, "gather, then batched matmul", no Python loop over samples)::

      y_i = W x_i + b + (x_i A_{a(i)}ᵀ) B_{a(i)}ᵀ                      LoRA, Comp-LoRA, MHR, Bi-LoRA, CoLoRA
            + (y0_i A'_{a(i)}ᵀ) B'_{a(i)}ᵀ + c_{a(i)}                 Hydra's sequential branch and biases
            + ((x_i V) D_{a(i)}ᵀ) Uᵀ                                   SALT (W = U Σ Vᵀ shared by all adapters)

  with ``a(i)`` the sample's adapter and zero factors for an adapter that does not touch the layer.
  Factors of different ranks are zero-padded to the layer's largest rank. SALT's correction
  ``U Δ Vᵀ`` is not low-rank (its ReLU acts elementwise on a k×k block), but ``U`` and ``V`` are
  the base weight's singular vectors, the same for every SALT adapter of one base, so only the
  k×k core ``Δ`` is gathered per sample.
* **grouped** adapters (prompts, bottleneck adapters, SSF, methods that train base weights such as
  BitFit / full fine-tuning, an artifact stacking two wrappers on one layer, ...) run their own model
  on their sub-batch: one forward per such adapter present in the batch.

Heads are per adapter and always run on their adapter's samples (a head's class count is its own).
Each sample's output equals running its adapter alone (``tests/test_multi_adapter.py``), up to
float rounding (the batched layers add the same terms in another order).

The artifacts must be trained on the same base weights: family, model, weights tag and the sha256
fingerprint of the base weights (``adapter.json``) are checked against the backbone, and a
mismatch is refused in one line. A ``MultiAdapter`` is for inference: built in eval mode, it refuses
``.train()``; its factors are a snapshot of the adapters at construction.

For ``python -m zoo predict --adapters ...`` (:func:`zoo.predict.predict_many`):
:meth:`MultiAdapter.from_artifacts` builds one from artifact folders or zoo names (the backbone from
the first artifact's record), and :meth:`MultiAdapter.predict_batch` maps inputs + one adapter name
per sample to per-sample outputs.
"""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters.base import WrappedLayer
from zoo.backbones.base import Backbone
from zoo.checkpoint import AdapterMismatchError
from zoo.registry import UnknownNameError

# ---------------------------------------------------------------------------- low-rank forms


@dataclass
class LinearTerms:
    """One adapter's correction at a Linear, in the forms :class:`BatchedLinear` batches.

    ``y = y0 + (x Aᵀ) Bt + (y0 A_outᵀ) Bt_out + bias + ((x Vhᵀ) Dᵀ) Uᵀ`` with ``y0 = base(x)``;
    every scale is folded into ``Bt`` / ``Bt_out`` / ``D``; absent terms are ``None``.
    """

    A: torch.Tensor | None = None  # (r, d_in)
    Bt: torch.Tensor | None = None  # (r, d_out)
    A_out: torch.Tensor | None = None  # (r', d_out)
    Bt_out: torch.Tensor | None = None  # (r', d_out)
    bias: torch.Tensor | None = None  # (d_out,)
    U: torch.Tensor | None = None  # (d_out, k), shared by all adapters of one base
    Vh: torch.Tensor | None = None  # (k, d_in), shared
    D: torch.Tensor | None = None  # (k, k), per adapter


@dataclass
class ConvTerms:
    """One adapter's correction at a Conv2d: ``B ⊛ conv(x; A)`` (``A``: r×C_in×kh×kw, ``B``: C_out×r,
    scale folded in) or, for a grouped conv, ``conv(x; dW)`` with the full kernel delta."""

    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    dW: torch.Tensor | None = None


def _lora_linear(m, task) -> LinearTerms:
    # LoRA, Comp-LoRA (projected factors), MHR-μ, CoLoRA's Linear layers
    return LinearTerms(A=m.effective_A(), Bt=m.stacked_B_t() * m.scaling)


def _lora_conv(m, task) -> ConvTerms:
    conv = m.conv()
    if conv.groups != 1:  # the module itself runs the materialised delta there (see LoRAConv2d)
        return ConvTerms(dW=m.delta_weight())
    return ConvTerms(A=m.lora_A, B=m.lora_B * m.scaling)


def _mhr(m, task) -> LinearTerms:
    A, Bt = m.task_adapters(int(task))  # eval: the deterministic sigmoid routing of the task
    return LinearTerms(A=A, Bt=Bt * m.scaling)


def _hydra(m, task) -> LinearTerms:
    s = m.scale
    bias = [t for t in (m.par.bias_term(), m.seq.bias_term()) if t is not None]
    return LinearTerms(A=m.par.down.weight, Bt=s * m.par.up.weight.t(), A_out=m.seq.down.weight,
                       Bt_out=s * m.seq.up.weight.t(), bias=s * sum(bias) if bias else None)


def _binary_lora(m, task) -> LinearTerms:
    from zoo.adapters.onebit import used_weight

    lin = m.base
    downs = [used_weight(m.down[k]) for k in m.slices]  # (h, d_in) each; the codes when loaded
    A = torch.cat(downs)
    Bt = A.new_zeros(A.shape[0], lin.out_features)  # zeros off each slice's output rows
    r0 = 0
    for (k, s), down in zip(m.slices.items(), downs):
        Bt[r0:r0 + down.shape[0], slice(None) if s is None else s] = used_weight(m.up[k]).t() * m.scale
        r0 += down.shape[0]
    return LinearTerms(A=A, Bt=Bt)


def _salt(m, task) -> LinearTerms:
    r, k = m.rank, m.k
    D = m.S.new_zeros(k, k)
    D[:r, :r] = torch.diag(m.top_delta())
    if k > r:
        D[r:, r:] = m.residual_delta()
    return LinearTerms(U=m.U, Vh=m.Vh, D=D)


def _forms() -> dict[type, Callable]:
    from zoo.adapters.comp_lora import CompLoRALinear
    from zoo.adapters.hydra import HydraLinear
    from zoo.adapters.lora import LoRAConv2d, LoRALinear
    from zoo.adapters.mhr import MHRLinear
    from zoo.adapters.onebit import BinaryLoRALinear
    from zoo.adapters.salt import SALTLinear

    return {LoRALinear: _lora_linear, CompLoRALinear: _lora_linear, LoRAConv2d: _lora_conv, MHRLinear: _mhr,
            HydraLinear: _hydra, BinaryLoRALinear: _binary_lora, SALTLinear: _salt}


#: forms registered with :func:`register_low_rank` (wrapper class -> ``fn(module, task_id) -> LinearTerms |
#: ConvTerms``); they take precedence over the built-in ones of :func:`_forms`. Exact classes only (a subclass
#: may change the forward).
LOW_RANK_FORMS: dict[type, Callable] = {}
_BUILTIN_FORMS: dict[type, Callable] | None = None


def register_low_rank(cls: type):
    """Decorator: ``@register_low_rank(MyLinear)`` on ``fn(module, task) -> LinearTerms | ConvTerms``
    makes a new method's wrapper run in the shared batched pass (until then it runs grouped)."""
    def deco(fn):
        LOW_RANK_FORMS[cls] = fn
        return fn
    return deco


def low_rank_form(module: nn.Module) -> Callable | None:
    """The function giving ``module``'s batched terms, or None (then its adapter runs grouped)."""
    global _BUILTIN_FORMS
    if _BUILTIN_FORMS is None:  # lazily: the adapter modules import zoo
        _BUILTIN_FORMS = _forms()
    return LOW_RANK_FORMS.get(type(module)) or _BUILTIN_FORMS.get(type(module))


# ---------------------------------------------------------------------------- routing state


class Route:
    """Which adapter slot each row of the current batched pass uses, shared by every batched layer.

    ``ids``: one slot per sample (a layer seeing ``k·B`` rows, e.g. SAM's windows folded into the
    batch sample-major, repeats each id ``k`` times); ``spans``: ``(slot, start, end)`` of each slot's
    contiguous samples (the batched pass orders samples by adapter); ``single``: one slot for every row.
    """

    def __init__(self):
        self.ids: torch.Tensor | None = None
        self.spans: list[tuple[int, int, int]] = []
        self.single: int | None = None

    @contextlib.contextmanager
    def using(self, ids: torch.Tensor | None = None, spans: list | None = None, single: int | None = None
              ) -> Iterator[None]:
        prev = self.ids, self.spans, self.single
        self.ids, self.spans, self.single = ids, list(spans or []), single
        try:
            yield
        finally:
            self.ids, self.spans, self.single = prev

    def rows(self, n: int) -> torch.Tensor | int:
        if self.single is not None:
            return self.single
        if self.ids is None:
            raise RuntimeError("a MultiAdapter's batched layers run only inside MultiAdapter.forward")
        b = self.ids.numel()
        if n == b:
            return self.ids
        if n % b:
            raise ValueError(f"MultiAdapter: {b} samples routed but a layer input has {n} rows (not a multiple)")
        return self.ids.repeat_interleave(n // b)


def _stack(parts: list[torch.Tensor | None], shape_of: Callable[[torch.Tensor], tuple], n: int,
           like: torch.Tensor) -> torch.Tensor | None:
    """Stack per-slot tensors into ``(n, *shape)``, zero-padding dim 0 of each part to the largest
    (the rank); ``None`` slots are zeros. ``None`` when no slot has the term."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    tail = shape_of(present[0])[1:]
    rmax = max(p.shape[0] for p in present)
    out = like.new_zeros(n, rmax, *tail)
    for i, p in enumerate(parts):
        if p is not None:
            out[i, :p.shape[0]] = p.detach().to(out.dtype)
    return out


class BatchedLinear(nn.Module):
    """A frozen Linear plus the low-rank terms of several adapters, one chosen per sample."""

    def __init__(self, base: nn.Linear, terms: list[LinearTerms | None], route: Route):
        super().__init__()
        self.base, self.route = base, route
        n, w = len(terms), base.weight
        # stored (slots, d_in, r) / (slots, r, d_out): the layouts bmm reads without a transpose
        At = _stack([None if t is None or t.A is None else t.A for t in terms], lambda p: p.shape, n, w)
        self.register_buffer("At", None if At is None else At.transpose(1, 2).contiguous())
        self.register_buffer("Bt", _stack([None if t is None else t.Bt for t in terms], lambda p: p.shape, n, w))
        Ao = _stack([None if t is None else t.A_out for t in terms], lambda p: p.shape, n, w)
        self.register_buffer("At_out", None if Ao is None else Ao.transpose(1, 2).contiguous())
        self.register_buffer("Bt_out", _stack([None if t is None else t.Bt_out for t in terms], lambda p: p.shape, n, w))
        bias = [None if t is None or t.bias is None else t.bias[None] for t in terms]
        b = _stack(bias, lambda p: p.shape, n, w)
        self.register_buffer("bias", None if b is None else b[:, 0])
        cores = [t for t in terms if t is not None and t.D is not None]
        if cores:
            U, Vh = cores[0].U, cores[0].Vh
            if any(not (torch.equal(t.U, U) and torch.equal(t.Vh, Vh)) for t in cores[1:]):
                raise AdapterMismatchError("SALT adapters of one MultiAdapter have different singular bases at a layer "
                                           "(their base weights differ)")
            k = U.shape[1]
            Dt = w.new_zeros(n, k, k)
            for i, t in enumerate(terms):
                if t is not None and t.D is not None:
                    Dt[i] = t.D.detach().t()
            self.register_buffer("U", U.detach().clone())
            self.register_buffer("Vh", Vh.detach().clone())
            self.register_buffer("Dt", Dt)
            self.has_core = [t is not None and t.D is not None for t in terms]
        else:
            self.U = self.Vh = self.Dt = self.has_core = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self.base(x)
        ids = self.route.rows(x.shape[0])
        single = isinstance(ids, int)  # every row one adapter: plain matmuls with its factors
        if single:
            xs, ys, mm = x, y0, torch.matmul
        else:  # (rows, tokens, d) and one gathered factor per row
            xs, ys, mm = x.reshape(x.shape[0], -1, x.shape[-1]), y0.reshape(y0.shape[0], -1, y0.shape[-1]), torch.bmm
        delta = None
        if self.At is not None:
            delta = mm(mm(xs, self.At[ids]), self.Bt[ids])
        if self.At_out is not None:  # Hydra's sequential branch reads the frozen layer's output
            d = mm(mm(ys, self.At_out[ids]), self.Bt_out[ids])
            delta = d if delta is None else delta + d
        if self.Dt is not None and (not single or self.has_core[ids]):
            delta = self._core(xs, ids, single, delta, ys.shape)
        if self.bias is not None:
            d = self.bias[ids] if single else self.bias[ids][:, None, :]
            delta = d if delta is None else delta + d
        return y0 if delta is None else y0 + delta.reshape(y0.shape)

    def _core(self, xs, ids, single: bool, delta, shape):
        """SALT's ``((x V) Dᵀ) Uᵀ`` (shared singular bases, k×k core per adapter). It costs about three
        Linears per row, so it runs only on the rows of adapters that have one: per such adapter on its
        contiguous span of rows (a loop over SALT adapters, not samples; no k×k gather per sample)."""
        if single:
            d = F.linear(F.linear(xs, self.Vh) @ self.Dt[ids], self.U)
            return d if delta is None else delta + d
        out = delta if delta is not None else xs.new_zeros(shape)  # a fresh tensor of ours: add in place
        rep = xs.shape[0] // self.route.ids.numel()
        for slot, a, b in self.route.spans:
            if self.has_core[slot]:
                rows = slice(a * rep, b * rep)
                out[rows] += F.linear(F.linear(xs[rows], self.Vh) @ self.Dt[slot], self.U)
        return out


class BatchedConv2d(nn.Module):
    """A frozen Conv2d plus several adapters' conv LoRA, one per sample: the batch runs as one
    grouped convolution (``groups = B``) with each sample's own factors."""

    def __init__(self, base: nn.Conv2d, terms: list[ConvTerms | None], route: Route):
        super().__init__()
        self.base, self.route = base, route
        n, w = len(terms), base.weight
        self.register_buffer("A", _stack([None if t is None else t.A for t in terms], lambda p: p.shape, n, w))
        B = _stack([None if t is None or t.B is None else t.B.t() for t in terms], lambda p: p.shape, n, w)
        self.register_buffer("B", None if B is None else B.transpose(1, 2).contiguous())  # (n, C_out, r)
        dW = [None if t is None or t.dW is None else t.dW[None] for t in terms]
        d = _stack(dW, lambda p: p.shape, n, w)
        self.register_buffer("dW", None if d is None else d[:, 0])

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        c = self.base
        if c.padding_mode != "zeros":
            return F.conv2d(F.pad(x, c._reversed_padding_repeated_twice, mode=c.padding_mode), weight, None,
                            c.stride, 0, c.dilation, groups)
        return F.conv2d(x, weight, None, c.stride, c.padding, c.dilation, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ids = self.route.rows(x.shape[0])
        g = self.base.groups
        if isinstance(ids, int):
            if self.A is not None:
                y = y + F.conv2d(self._conv(x, self.A[ids], 1), self.B[ids][:, :, None, None])
            if self.dW is not None:
                y = y + self._conv(x, self.dW[ids], g)
            return y
        if ids.numel() != x.shape[0]:
            raise ValueError("MultiAdapter: a convolution saw a batch folded with other dimensions")
        b, c, hh, ww = x.shape
        xg = x.reshape(1, b * c, hh, ww)
        if self.A is not None:
            A = self.A[ids]  # (B, r, C_in, kh, kw)
            h = self._conv(xg, A.reshape(-1, *A.shape[2:]), b)
            h = h.reshape(b, A.shape[1], *h.shape[2:])
            y = y + torch.einsum("brhw,bor->bohw", h, self.B[ids])
        if self.dW is not None:
            dW = self.dW[ids]  # (B, C_out, C_in/g, kh, kw)
            d = self._conv(xg, dW.reshape(-1, *dW.shape[2:]), b * g)
            y = y + d.reshape(b, -1, *d.shape[2:])
        return y


# ---------------------------------------------------------------------------- the backbone seen by a head


class _BackboneView(nn.Module):
    """What a batched adapter's head sees as ``self.backbone``: the shared batched backbone, routed.

    ``forward`` / ``forward_features`` / ``feature_map`` / ``block_outputs`` called with the adapter's
    own rows of the current batch return those rows of ONE shared pass over every batched sample;
    any other call (e.g. CLIP's ``encode_text`` of the class prompts) runs with this adapter on
    every row. Attributes (``feature_dim``, ...) are the backbone's.
    """

    ROUTED = ("forward", "forward_features", "feature_map", "block_outputs")

    def __init__(self, owner: "MultiAdapter", slot: int):
        super().__init__()
        self.__dict__["_owner"] = owner  # not a submodule (no cycle in .modules())
        self.slot = slot

    def forward(self, x, *args, **kwargs):
        return self._owner._backbone_call(self.slot, "forward", x, args, kwargs)

    def forward_features(self, x, *args, **kwargs):
        return self._owner._backbone_call(self.slot, "forward_features", x, args, kwargs)

    def feature_map(self, x, *args, **kwargs):
        return self._owner._backbone_call(self.slot, "feature_map", x, args, kwargs)

    def block_outputs(self, x, *args, **kwargs):
        return self._owner._backbone_call(self.slot, "block_outputs", x, args, kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        owner = self.__dict__["_owner"]
        attr = getattr(owner.shared, name)
        if callable(attr) and not isinstance(attr, nn.Module):
            slot = self.slot

            def call(*a, **kw):
                with owner.route.using(single=slot):
                    return attr(*a, **kw)
            return call
        return attr


def _take(out: Any, rows) -> Any:
    """Rows ``rows`` of a backbone/head output (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(out, torch.Tensor):
        return out[rows]
    if isinstance(out, (tuple, list)):
        return type(out)(_take(o, rows) for o in out)
    if isinstance(out, dict):
        return {k: _take(v, rows) for k, v in out.items()}
    raise TypeError(f"MultiAdapter cannot split a {type(out).__name__} output by sample")


@dataclass
class _Run:
    x: torch.Tensor  # the batched samples
    ids: torch.Tensor  # their slots
    rows: dict[int, torch.Tensor]  # slot -> positions in x
    inputs: dict[int, torch.Tensor]  # slot -> x[rows] (the object handed to that slot's head)
    spans: list[tuple[int, int, int]]  # (slot, start, end): x is ordered by adapter
    cache: dict


# ---------------------------------------------------------------------------- entries


@dataclass
class _Entry:
    name: str
    model: nn.Module | None  # the adapted model on a weight-sharing backbone copy (grouped adapters)
    batched: bool
    reason: str  # why it is grouped ('' when batched)
    slot: int = -1  # index among the batched adapters
    view: nn.Module | None = None  # the head model around a _BackboneView (batched adapters)
    classifier: bool = False  # its head records a class count (its outputs are logits)


def share_copy(backbone: Backbone) -> Backbone:
    """A structural copy of ``backbone`` whose parameters and buffers ARE the backbone's tensors."""
    memo = {id(t): t for t in (*backbone.parameters(), *backbone.buffers())}
    return copy.deepcopy(backbone, memo)


def _one_line_fingerprint(name: str, want: dict, bb: Backbone) -> None:
    have = {"family": bb.family, "model": bb.model_name, "weights_tag": bb.weights_tag}
    for k, v in have.items():
        if want.get(k) != v:
            raise AdapterMismatchError(f"adapter {name!r} was trained on {k} {want.get(k)!r}, the served backbone is {v!r}")
    fp = want.get("fingerprint")
    if fp and fp != bb.fingerprint():
        raise AdapterMismatchError(
            f"adapter {name!r} was trained on other base weights (fingerprint {fp[:12]}…) than the served backbone "
            f"({bb.fingerprint()[:12]}…); every adapter of a MultiAdapter must share the same base weights")


class MultiAdapter(nn.Module):
    """One frozen backbone, several adapters and heads; ``forward(x, adapter=[name per sample])``.

    ``adapters``: ``{name: artifact}`` where an artifact is an artifact folder, a zoo name
    (``zoo.hub.resolve``) or an already adapted model (its backbone must carry the same base
    weights). ``tasks``: ``{name: task id}`` for MHR artifacts with several tasks.
    """

    def __init__(self, backbone: Backbone, adapters: Mapping[str, Any], tasks: Mapping[str, int] | None = None,
                 check_fingerprint: bool = True):
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise TypeError(f"MultiAdapter needs a zoo Backbone (zoo.create_backbone), got {type(backbone).__name__}")
        if backbone.adapters:
            raise ValueError(f"MultiAdapter needs the plain backbone; this one has adapters "
                             f"{[a.name for a in backbone.adapters]} attached")
        if not adapters:
            raise ValueError("MultiAdapter needs at least one adapter ({name: artifact folder | zoo name | model})")
        tasks = dict(tasks or {})
        unknown = sorted(set(tasks) - set(adapters))
        if unknown:
            raise UnknownNameError(f"tasks given for unknown adapter(s) {unknown}; adapters: {', '.join(adapters)}")
        for p in backbone.parameters():
            p.requires_grad_(False)
        backbone.fingerprint()  # once, before any copy (copies inherit it)
        self.base = backbone.eval()
        self.route = Route()
        self.check_fingerprint = check_fingerprint
        entries = [self._load(str(name), spec, tasks.get(name)) for name, spec in adapters.items()]
        batched = [e for e in entries if e.batched]
        for i, e in enumerate(batched):
            e.slot = i
        self.shared = self._build_shared(batched)  # the backbone copy with the batched layers
        for e in batched:
            e.view = self._head_view(e)
            e.model = None  # its backbone copy is no longer needed: the shared pass replaces it
        self.entries = {e.name: e for e in entries}
        # registered (for .to(device)) in lists: adapter names may hold dots, which ModuleDict refuses
        self.grouped_models = nn.ModuleList(e.model for e in entries if not e.batched)
        self.heads = nn.ModuleList(e.view for e in batched)
        self._run: _Run | None = None
        super().train(False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_artifacts(cls, artifacts: Mapping[str, Any] | Sequence[Any], weights: str | os.PathLike | None = None,
                       tasks: Mapping[str, int] | None = None, check_fingerprint: bool = True) -> "MultiAdapter":
        """Build the backbone the first artifact records (``weights``: a local base-weights file) and
        serve every artifact on it. A sequence is named by each folder's (or zoo entry's) name."""
        from zoo.checkpoint import read_adapter_config
        from zoo.hub import resolve
        from zoo.hub.load import artifact_backbone

        if not isinstance(artifacts, Mapping):
            items = list(artifacts)
            artifacts = {Path(str(a)).name if Path(str(a)).expanduser().is_dir() else str(a).split(":")[-1]: a
                         for a in items}
            if len(artifacts) != len(items):
                raise ValueError(f"from_artifacts: two artifacts would be served under one name ({items}); "
                                 "pass {name: artifact} instead")
        if not artifacts:
            raise ValueError("MultiAdapter.from_artifacts needs at least one artifact")
        first = next(iter(artifacts.values()))
        if isinstance(first, nn.Module):
            raise TypeError("from_artifacts takes artifact folders or zoo names; pass models to MultiAdapter(backbone, ...)")
        folder = resolve(first)
        meta = read_adapter_config(folder)
        # as zoo.from_zoo builds it: the recorded base-weights file (a local run's), or the run's seed for random weights
        return cls(artifact_backbone(meta, folder, weights), artifacts, tasks, check_fingerprint)

    def _load(self, name: str, spec: Any, task: int | None) -> _Entry:
        import zoo
        from zoo.checkpoint import CONFIG_NAME, read_adapter_config, recorded_key
        from zoo.hub import resolve
        from zoo.hub.load import artifact_head_model

        with contextlib.ExitStack() as stack:
            if isinstance(spec, nn.Module):  # an adapted model: through a temporary artifact (the same checks)
                src = zoo.find_backbone(spec)
                if src._fingerprint is None and src.adapters:
                    raise AdapterMismatchError(f"adapter {name!r}: its backbone has no base-weight fingerprint "
                                               "(adapters attached without zoo.apply_adapter)")
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                zoo.save_adapter(spec, folder)
            else:
                folder = resolve(spec)
            meta = read_adapter_config(folder)
            if self.check_fingerprint:
                _one_line_fingerprint(name, meta.get("backbone", {}), self.base)
            bb = share_copy(self.base)
            model = artifact_head_model(bb, meta, folder)
            shared = {id(p) for p in self.base.parameters()}
            for i, m in enumerate(meta["methods"]):
                with recorded_key(folder / CONFIG_NAME, f"methods[{i}]"):
                    zoo.apply_adapter(model, m["name"], **(m.get("config") or {}))
            trains_base = self._unshare_trained(bb, shared)
            zoo.load_adapter(model, folder, check_fingerprint=self.check_fingerprint)
        model.eval()
        self._set_task(name, model, task)
        reason = "trains base weights" if trains_base else self._grouping_reason(model, bb)
        head = meta.get("head") or {}
        return _Entry(name, model, batched=not reason, reason=reason, classifier="num_classes" in head)

    @staticmethod
    def _unshare_trained(bb: Backbone, shared: set[int]) -> bool:
        """Give every shared base tensor the adapter trains (BitFit, full, SALT's norms...) a copy of its
        own before loading, so no artifact writes into the shared weights. True if there was one."""
        slots = [(mod, pname, p) for mod in bb.modules() for pname, p in mod._parameters.items()
                 if p is not None and id(p) in shared]
        own = {id(p): (p, nn.Parameter(p.detach().clone())) for _, _, p in slots if p.requires_grad}
        for mod, pname, p in slots:  # every place a trained tensor sits (tied weights too) gets the copy
            if id(p) in own:
                mod._parameters[pname] = own[id(p)][1]
        for p, _ in own.values():
            p.requires_grad_(False)
        return bool(own)

    @staticmethod
    def _set_task(name: str, model: nn.Module, task: int | None) -> None:
        import zoo

        mhr = [a for a in zoo.adapters_of(model) if a.name == "mhr" and a.variant != "mhr_mu"]
        if not mhr:
            if task is not None:
                raise ValueError(f"adapter {name!r}: a task id was given but it has no MHR routing")
            return
        n = mhr[0].n_tasks
        if task is None and n > 1:
            raise ValueError(f"adapter {name!r} is an MHR adapter over {n} tasks: give its task id (tasks={{{name!r}: 0..{n - 1}}})")
        zoo.set_task(model, 0 if task is None else int(task))

    @staticmethod
    def _grouping_reason(model: nn.Module, bb: Backbone) -> str:
        """'' when every module the adapters put in the backbone has a low-rank form, else why not."""
        import zoo

        inside = {id(m) for m in bb.modules()}
        for a in zoo.adapters_of(model):
            for m in a.modules:
                if id(m) not in inside:
                    continue  # a head-side module (e.g. Bi-Head): runs with the adapter's head
                if low_rank_form(m) is None:
                    return f"{a.name}: {type(m).__name__} has no batched low-rank form"
                if isinstance(m.base, WrappedLayer):
                    return f"{a.name}: {type(m).__name__} stacked on another adapter's {type(m.base).__name__}"
                if getattr(m, "merged", False):
                    return f"{a.name}: merged into its copy of the base weights"
        return ""

    def _build_shared(self, batched: list[_Entry]) -> Backbone:
        import zoo

        shared = share_copy(self.base)
        sites: dict[str, list] = {}
        for e in batched:
            bb = zoo.find_backbone(e.model)
            names = {id(m): n for n, m in bb.named_modules()}
            task = self._task_of(e.model)
            for a in zoo.adapters_of(e.model):
                for m in a.modules:
                    if id(m) not in names:
                        continue
                    with torch.no_grad():
                        terms = low_rank_form(m)(m, task)
                    sites.setdefault(names[id(m)], [None] * len(batched))[e.slot] = terms
        for path, terms in sites.items():
            parent_path, _, attr = path.rpartition(".")
            parent = shared.get_submodule(parent_path) if parent_path else shared
            base = getattr(parent, attr)
            kind = BatchedConv2d if isinstance(terms[next(i for i, t in enumerate(terms) if t is not None)], ConvTerms) \
                else BatchedLinear
            setattr(parent, attr, kind(base, terms, self.route))
        return shared.eval()

    @staticmethod
    def _task_of(model: nn.Module) -> int:
        import zoo

        for a in zoo.adapters_of(model):
            if a.name == "mhr" and getattr(a, "task", None) is not None and a.task.single is not None:
                return a.task.single
        return 0

    def _head_view(self, e: _Entry) -> nn.Module:
        """``e``'s head model with its ``backbone`` child replaced by a :class:`_BackboneView`."""
        import zoo

        bb = zoo.find_backbone(e.model)
        if e.model is bb:  # no head: the backbone's own output
            return _BackboneView(self, e.slot)
        view = copy.copy(e.model)
        view._modules = dict(e.model._modules)
        attr = next((k for k, v in view._modules.items() if v is bb), None)
        if attr is None:
            raise TypeError(f"adapter {e.name!r}: its head model {type(e.model).__name__} does not hold the backbone "
                            "as a direct child")
        view._modules[attr] = _BackboneView(self, e.slot)
        return view

    # ------------------------------------------------------------------ inspection
    def names(self) -> list[str]:
        return list(self.entries)

    def routing(self) -> dict[str, str]:
        """``{name: 'batched' | 'grouped: <reason>'}``."""
        return {n: "batched" if e.batched else f"grouped: {e.reason}" for n, e in self.entries.items()}

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("MultiAdapter serves adapters for inference; train each adapter on its own model")
        return super().train(False)

    # ------------------------------------------------------------------ forward
    def _backbone_call(self, slot: int, method: str, x, args: tuple, kwargs: dict):
        run = self._run
        if run is not None and slot in run.inputs and x is run.inputs[slot]:
            key = (method, repr(args), repr(sorted(kwargs.items())))
            if key not in run.cache:  # one pass over every batched sample, per backbone method
                # (one adapter in the batch: its plain matmuls, no per-sample gather)
                with self.route.using(ids=run.ids, spans=run.spans) if len(run.rows) > 1 \
                        else self.route.using(single=slot):
                    run.cache[key] = self._shared_method(method)(run.x, *args, **kwargs)
            return _take(run.cache[key], run.rows[slot])
        with self.route.using(single=slot):  # the head transformed its input, or called outside forward
            return self._shared_method(method)(x, *args, **kwargs)

    def _shared_method(self, method: str) -> Callable:
        return self.shared if method == "forward" else getattr(self.shared, method)  # __call__: hooks run

    def outputs(self, x: torch.Tensor, adapter: str | Sequence[str]) -> list[Any]:
        """One output per sample (its adapter's head output for that sample)."""
        n = x.shape[0]
        names = [adapter] * n if isinstance(adapter, str) else list(adapter)
        if len(names) != n:
            raise ValueError(f"MultiAdapter: {n} samples but {len(names)} adapter names")
        bad = sorted({a for a in names if a not in self.entries})
        if bad:
            raise UnknownNameError(f"unknown adapter(s) {bad}; this MultiAdapter serves: {', '.join(self.entries)}")
        out: list[Any] = [None] * n
        pos: dict[str, list[int]] = {}
        for i, a in enumerate(names):
            pos.setdefault(a, []).append(i)
        dev = x.device
        batched = [(self.entries[a], p) for a, p in pos.items() if self.entries[a].batched]
        if batched:
            order = [i for _, p in batched for i in p]
            xb = x[torch.tensor(order, device=dev)]
            ids = torch.cat([torch.full((len(p),), e.slot, dtype=torch.long) for e, p in batched]).to(dev)
            rows, inputs, spans, r0 = {}, {}, [], 0
            for e, p in batched:
                rows[e.slot] = torch.arange(r0, r0 + len(p), device=dev)
                inputs[e.slot] = xb[r0:r0 + len(p)]
                spans.append((e.slot, r0, r0 + len(p)))
                r0 += len(p)
            self._run = _Run(xb, ids, rows, inputs, spans, {})
            try:
                for e, p in batched:
                    res = e.view(inputs[e.slot])
                    for j, i in enumerate(p):
                        out[i] = _take(res, j)
            finally:
                self._run = None
        for a, p in pos.items():
            e = self.entries[a]
            if e.batched:
                continue
            res = e.model(x[torch.tensor(p, device=dev)])
            for j, i in enumerate(p):
                out[i] = _take(res, j)
        return out

    def forward(self, x: torch.Tensor, adapter: str | Sequence[str]) -> torch.Tensor:
        """Route sample ``i`` to adapter ``adapter[i]`` (one name: the whole batch) and stack the outputs.

        Classifier logits (heads that record a class count) of different class counts are padded with
        ``-inf`` to the largest (as :class:`zoo.MultiHeadClassifier` does: argmax and softmax see only the
        sample's own classes); other outputs must have one shape (else use :meth:`outputs`, one per sample).
        """
        outs = self.outputs(x, adapter)
        if not all(isinstance(o, torch.Tensor) for o in outs):
            raise TypeError("MultiAdapter.forward stacks tensor outputs; use .outputs(x, adapter) for these heads")
        shapes = {tuple(o.shape) for o in outs}
        if len(shapes) == 1:
            return torch.stack(outs)
        names = [adapter] if isinstance(adapter, str) else set(adapter)
        if all(o.dim() == 1 for o in outs) and all(self.entries[a].classifier for a in names):
            width = max(o.shape[0] for o in outs)
            return torch.stack([F.pad(o, (0, width - o.shape[0]), value=float("-inf")) for o in outs])
        raise ValueError(f"MultiAdapter.forward: the adapters' outputs have different shapes {sorted(shapes)}; "
                         "use .outputs(x, adapter) for one output per sample")

    @torch.inference_mode()
    def predict_batch(self, inputs: torch.Tensor, adapter_names: Sequence[str], batch_size: int | None = None
                      ) -> list[Any]:
        """Per-sample outputs (on the CPU) of ``inputs`` routed by ``adapter_names`` (one per sample),
        in chunks of ``batch_size`` (default: all at once): the call ``python -m zoo predict
        --adapters`` makes (:func:`zoo.predict.predict_many`: several artifacts, a per-sample adapter column)."""
        names = list(adapter_names)
        if len(names) != inputs.shape[0]:
            raise ValueError(f"predict_batch: {inputs.shape[0]} inputs but {len(names)} adapter names")
        dev = next(iter(self.base.parameters())).device
        step = batch_size or max(1, len(names))
        res: list[Any] = []
        for s in range(0, len(names), step):
            outs = self.outputs(inputs[s:s + step].to(dev), names[s:s + step])
            res.extend(_to_cpu(o) for o in outs)
        return res


def _to_cpu(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.cpu()
    if isinstance(out, (tuple, list)):
        return type(out)(_to_cpu(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_cpu(v) for k, v in out.items()}
    return out
