"""One fused op for a frozen Linear plus a low-rank delta: ``y = x Wᵀ + b + γ (x Aᵀ) Bᵀ``.

The same function as composing ``base(x) + ((x @ A.t()) * γ) @ Bt`` (LoRA, CoLoRA, Comp-LoRA and a
one-task MHR batch all compute it), with the same multiply-adds, but without the two passes over
full-width activations that the composition adds around the thin matmuls:

* forward: the delta is accumulated into the base output inside the GEMM (``addmm_``), not
  materialised as a ``T × d_out`` tensor and added;
* backward: the input gradient of the delta is accumulated into the base's input gradient inside
  the GEMM (``addmm_``), instead of autograd summing two ``T × d_in`` gradients.

On the realistic bench profile (ViT-S/16, 224 px) these adds are ``T × 1536`` tensors on ``fc1`` /
``fc2``, which is most of what adapters on every Linear paid over their counted FLOPs. Used only
when the wrapped layer is a plain ``nn.Linear`` without hooks (otherwise the composition runs, so
stacked wrappers and hooked layers keep their behaviour).

``A``: ``(r, d_in)``, ``Bt``: ``(r, d_out)`` (contiguous, see ``LoRALinear.stacked_B_t``), γ a float.
Gradients: ``gh = γ · g B`` (``T × r``), ``dA = ghᵀ x``, ``dBt = (γ x Aᵀ)ᵀ g``, ``dx = g W + gh A``,
``dW = gᵀ x``, ``db = Σ g`` (each only when required).
"""
from __future__ import annotations

import torch
from torch import nn


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, Bt, scaling: float):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ A.t()
        if scaling != 1.0:
            h = h * scaling
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(h, Bt)
        ctx.save_for_backward(x2, weight, A, Bt, h)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, weight, A, Bt, h = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bt, _ = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        gx = gw = gb = ga = gbt = None
        gh = None
        if need_x or need_a:
            gh = g2 @ Bt.t()
            if ctx.scaling != 1.0:
                gh = gh * ctx.scaling
        if need_x:
            gx = (g2 @ weight).addmm_(gh, A).view(ctx.x_shape)
        if need_a:
            ga = gh.t() @ x2
        if need_bt:
            gbt = h.t() @ g2
        if need_w:
            gw = g2.t() @ x2
        if need_b and ctx.has_bias:
            gb = g2.sum(0)
        return gx, gw, gb, ga, gbt, None


def fusable(base: nn.Module, x: torch.Tensor) -> bool:
    """True when ``base`` is a plain ``nn.Linear`` whose forward the fused op may replace: no hooks
    (they would be skipped) and no autocast (the in-place accumulation needs one dtype)."""
    return (type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks
            and not torch.is_autocast_enabled(x.device.type) and x.dtype == base.weight.dtype)


def lowrank_linear(x: torch.Tensor, linear: nn.Linear, A: torch.Tensor, Bt: torch.Tensor, scaling: float) -> torch.Tensor:
    """``linear(x) + ((x @ A.t()) * scaling) @ Bt`` as one fused autograd op (see the module docstring)."""
    return _LowRankLinear.apply(x, linear.weight, linear.bias, A, Bt, float(scaling))
