"""GaLore: full-parameter training with Adam run in a low-rank projection of each gradient
(Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024;
reference ``jiaweizzhao/GaLore`` ``galore_torch/adamw.py``, ``galore_projector.py``).

For a target weight ``W ∈ R^{m×n}`` with gradient ``G`` (``proj_type="std"``)::

    m ≥ n:  Q = Vᵀ[:r] of svd(G),  R = G Qᵀ  (m×r);   otherwise  P = U[:, :r],  R = Pᵀ G  (r×n)
    M ← β1 M + (1−β1) R,   V ← β2 V + (1−β2) R²            (Adam moments on R only)
    N = M / (√V + ε),   Ĝ = α · N Q   (or α · P N)
    W ← W − η_t Ĝ,   η_t = η √(1−β2^t) / (1−β1^t),   then  W ← W − η λ W     (decoupled decay, after)

The projector is recomputed from the current gradient when ``step % update_proj_gap == 0`` (step counted
before the update); the moments are neither reset nor rotated when the subspace changes (as the
reference). Every other trainable parameter gets the same optimizer without projection (the reference's
``AdamW`` for ``regular_params``: bias-corrected step size, ε on the uncorrected √V, decay after the step).

**Targets.** The Linear layers of each block's attention and MLP (the reference's ``attn``/``mlp``
modules): sites ``qkv q k v o fc1 fc2``, whole layers (a q/k/v row slice of a fused qkv resolves to the
fused layer); kinds a backbone does not have are skipped. A convolution site (NAFNet's 1×1 ``o``/``fc1``/
``fc2``) is projected as its kernel flattened to ``C_out × (C_in·k·k)`` — a reconstruction (the reference's
tensor variant, Tucker via tensorly, is not used). ``train_rest=True`` (the reference's fine-tuning
scripts) trains every other backbone parameter with plain Adam as well: GaLore is a full fine-tuning
method whose optimizer state is low-rank on the targets; the artifact holds the trained weights, as
``full``'s does.

The training-loop hook: :meth:`GaLore.param_groups` puts the targets in a group with ``galore_rank``,
``update_proj_gap`` and ``scale``; :meth:`GaLore.make_optimizer` (``zoo.build_optimizer``, used by every
task) returns :class:`GaLoreAdamW` over all groups. Its state (step, projector, moments) is tensors and
ints, so a Lightning checkpoint resumes it exactly.

Defaults (the reference's RoBERTa GLUE fine-tuning): rank 4, scale 4, gap 500 (pre-training: 128, 0.25, 200).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from zoo.adapters import register_adapter
from zoo.adapters.baselines import _NoModules
from zoo.adapters.base import float_option, int_option
from zoo.sites import SITE_KINDS, SiteError, unwrap

TARGETS = ("qkv", "q", "k", "v", "o", "fc1", "fc2")


def galore_projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """The reference's ``std`` projector of a 2-D gradient: ``Vᵀ[:r]`` (r×n) if m ≥ n else ``U[:, :r]`` (m×r)."""
    g = grad.float()
    U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    return (Vh[:rank] if g.shape[0] >= g.shape[1] else U[:, :rank]).to(grad.dtype)


def project(grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    return grad @ proj.t() if grad.shape[0] >= grad.shape[1] else proj.t() @ grad


def project_back(low: torch.Tensor, proj: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return low @ proj if shape[0] >= shape[1] else proj @ low


class GaLoreAdamW(torch.optim.Optimizer):
    """The reference ``GaLoreAdamW``: groups with ``galore_rank`` are projected (module docstring), the
    others get its plain AdamW step. State: ``step`` (int), ``projector``, ``exp_avg``, ``exp_avg_sq``."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            rank = group.get("galore_rank")
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                shape2d = None
                if rank is not None:
                    g2 = grad.reshape(grad.shape[0], -1)  # a conv kernel as C_out × (C_in·k·k)
                    shape2d = g2.shape
                    if "projector" not in state or state["step"] % group["update_proj_gap"] == 0:
                        state["projector"] = galore_projector(g2, min(rank, min(shape2d)))
                    grad = project(g2, state["projector"])
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    t = state["step"]
                    step_size = step_size * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
                norm_grad = exp_avg / denom
                if rank is not None:
                    norm_grad = (project_back(norm_grad, state["projector"], shape2d) * group["scale"]).view_as(p)
                p.add_(norm_grad, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


@register_adapter("galore")
class GaLore(_NoModules):
    """GaLore: full-parameter training, Adam in a rank-``rank`` projection of each target gradient."""

    paper = "Zhao et al., GaLore, ICML 2024"

    def __init__(self, rank: int = 4, scale: float = 4.0, update_proj_gap: int = 500,
                 targets: list[str] = TARGETS, layers="all", train_rest: bool = True, eps: float = 1e-6):
        super().__init__()
        self.rank = int_option("galore", "rank", rank)
        self.scale = float_option("galore", "scale", scale, lo=0.0, lo_open=True)
        self.update_proj_gap = int_option("galore", "update_proj_gap", update_proj_gap)
        self.eps = float_option("galore", "eps", eps, lo=0.0, lo_open=True)
        bad = [t for t in targets if t not in SITE_KINDS]
        if bad:
            raise ValueError(f"adapter 'galore': unknown target(s) {bad}; valid: {', '.join(SITE_KINDS)}")
        if not isinstance(train_rest, bool):
            raise ValueError(f"adapter 'galore': train_rest must be true or false, got {train_rest!r}")
        self.targets, self.layers, self.train_rest = list(targets), layers, train_rest
        self.weights: list[nn.Parameter] = []

    def attach(self, backbone) -> None:
        self.backbone = backbone
        found, missing = {}, []
        for kind in self.targets:
            try:
                sites = self.sites_whole([kind])
            except SiteError:
                missing.append(kind)
                continue
            for s in sites:
                layer = unwrap(s.module)
                w = getattr(layer, "weight", None)
                if not isinstance(w, nn.Parameter) or w.ndim < 2:
                    raise SiteError(f"GaLore projects 2-D (or conv) weights; {s.path} is a {type(layer).__name__}")
                found[id(w)] = w
        if not found:
            raise SiteError(f"GaLore found none of its target sites {self.targets} on backbone "
                            f"{getattr(backbone, 'family', type(backbone).__name__)!r}")
        self.weights = list(found.values())

    def sites_whole(self, kinds):
        """Sites of ``kinds``; row slices of a fused qkv count as the fused layer (GaLore projects whole weights)."""
        from zoo.sites import find_sites

        return find_sites(self.backbone, kinds, self.layers, self.own_tower())

    def mark_trainable(self) -> None:
        if self.train_rest:
            for _, p in self.backbone.tower_named_parameters(self.own_tower()):
                p.requires_grad_(True)
        for w in self.weights:
            w.requires_grad_(True)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        return [{"params": self.weights, "lr": lr, "weight_decay": weight_decay, "galore_rank": self.rank,
                 "update_proj_gap": self.update_proj_gap, "scale": self.scale}]

    def make_optimizer(self, groups, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
        # the reference optimizer's own eps (1e-6, HF AdamW's) unless the adapter sets another
        return GaLoreAdamW(groups, lr=lr, betas=betas, eps=self.eps, weight_decay=weight_decay)
