"""Fused autograd ops for a frozen Linear plus low-rank deltas.

**LoRA form** (:func:`lowrank_linear`): ``y = x Wᵀ + b + γ (x_b Aᵀ) Bᵀ`` with ``x_b = x`` or, for LoRA
dropout, ``x_b = dropout(x)`` (the dropout acts on the branch's input only: peft, CLIP-LoRA).

The same function as composing ``base(x) + ((x_b @ A.t()) * γ) @ Bt`` (LoRA, CoLoRA, Comp-LoRA and a
one-task MHR batch all compute it), with the same multiply-adds, but without the two passes over
full-width activations that the composition adds around the thin matmuls:

* forward: the delta is accumulated into the base output inside the GEMM (``addmm_``), not
  materialised as a ``T × d_out`` tensor and added;
* backward (``x_b = x``): the input gradient of the delta is accumulated into the base's input gradient
  inside the GEMM (``addmm_``), instead of autograd summing two ``T × d_in`` gradients. With dropout
  the two input gradients reach different tensors (``x`` and ``dropout(x)``), so autograd still sums
  them after the dropout's backward; the forward saving stays.

On the realistic bench profile (ViT-S/16, 224 px) these adds are ``T × 1536`` tensors on ``fc1`` /
``fc2``, which is most of what adapters on every Linear paid over their counted FLOPs. Used only
when the wrapped layer is a plain ``nn.Linear`` without hooks (otherwise the composition runs, so
stacked wrappers and hooked layers keep their behaviour).

``A``: ``(r, d_in)``, ``Bt``: ``(r, d_out)`` (contiguous, see ``LoRALinear.stacked_B_t``), γ a float.
Gradients: ``gh = γ · g B`` (``T × r``), ``dA = ghᵀ x_b``, ``dBt = (γ x_b Aᵀ)ᵀ g``, ``dx = g W (+ gh A
when x_b = x)``, ``dx_b = gh A``, ``dW = gᵀ x``, ``db = Σ g`` (each only when required).

**Hydra form** (:func:`hydra_linear`): a parallel branch on the input and a sequential branch on the
frozen layer's output ``y0 = x Wᵀ + b`` (Kim et al. 2024, see ``zoo.adapters.hydra``)::

    y = y0 + s·(m_p ⊙ (x A_pᵀ + d_p)) B_pᵀ + s·(m_s ⊙ (y0 A_sᵀ + d_s)) B_sᵀ + s·(u_p + u_s)

(``m`` the dropout masks, scaled by 1/(1−p), or absent). Forward: both ``T × r`` branch activations
``H = [h_p, h_s]`` and the biases (a ones column) go into ``y0`` in one ``addmm_``. Backward, with
``gH = s·g [B_p, B_s] ⊙ m``: ``dx = g W + gH [A_p; A_s W]`` (the sequential branch's path through
``y0`` folded into a ``r_s × d_in`` matrix, one ``addmm_``), ``[dA_p; M] = gHᵀ x`` and
``dA_s = M Wᵀ + (Σ gh_s) bᵀ`` (because ``gh_sᵀ y0 = (gh_sᵀ x) Wᵀ + (Σ gh_s) bᵀ``: ``y0`` is never
saved), ``[dB_p, dB_s, du] = s·[H, 1]ᵀ g``, ``dd = Σ gH``. The composition instead materialises
and adds three ``T × d_out`` tensors forward, sums the input gradients of both branches and ``y0``'s
two gradients backward, and saves ``y0`` for ``A_s``'s gradient. Needs a frozen base (``W``, ``b``
without gradients); the caller checks.
"""
from __future__ import annotations

import torch
from torch import nn


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, Bt, scaling: float, xb=None):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xb2 = x2 if xb is None else xb.reshape(-1, xb.shape[-1])
        h = xb2 @ A.t()
        if scaling != 1.0:
            h = h * scaling
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(h, Bt)
        need_w, need_a = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        # keep only what backward reads: x for dW (and dA without dropout), the dropped input for dA
        ctx.save_for_backward(x2 if need_w or (need_a and xb is None) else None,
                              xb2 if need_a and xb is not None else None, weight, A, Bt, h)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        ctx.separate = xb is not None
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, xb2, weight, A, Bt, h = ctx.saved_tensors
        nig = ctx.needs_input_grad  # 6 entries when called without x_b
        need_x, need_w, need_b, need_a, need_bt = nig[:5]
        need_xb = len(nig) > 6 and nig[6]
        g2 = g.reshape(-1, g.shape[-1])
        gx = gw = gb = ga = gbt = gxb = None
        gh = None
        if (need_x and not ctx.separate) or need_xb or need_a:
            gh = g2 @ Bt.t()
            if ctx.scaling != 1.0:
                gh = gh * ctx.scaling
        if need_x:
            gx = g2 @ weight
            if not ctx.separate:
                gx.addmm_(gh, A)
            gx = gx.view(ctx.x_shape)
        if need_xb:
            gxb = (gh @ A).view(ctx.x_shape)
        if need_a:
            ga = gh.t() @ (xb2 if ctx.separate else x2)
        if need_bt:
            gbt = h.t() @ g2
        if need_w:
            gw = g2.t() @ x2
        if need_b and ctx.has_bias:
            gb = g2.sum(0)
        return (gx, gw, gb, ga, gbt, None, gxb)[:len(nig)]


def fusable(base: nn.Module, x: torch.Tensor) -> bool:
    """True when ``base`` is a plain ``nn.Linear`` whose forward the fused op may replace: no hooks
    (they would be skipped) and no autocast (the in-place accumulation needs one dtype)."""
    return (type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks
            and not torch.is_autocast_enabled(x.device.type) and x.dtype == base.weight.dtype)


def lowrank_linear(x: torch.Tensor, linear: nn.Linear, A: torch.Tensor, Bt: torch.Tensor, scaling: float,
                   x_branch: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(x) + ((x_branch @ A.t()) * scaling) @ Bt`` as one fused autograd op (see the module
    docstring); ``x_branch`` defaults to ``x`` (pass ``dropout(x)`` for LoRA dropout)."""
    return _LowRankLinear.apply(x, linear.weight, linear.bias, A, Bt, float(scaling), x_branch)


class _HydraLinear(torch.autograd.Function):
    """The Hydra form of the module docstring. Inputs: ``x, W, b, A_p, d_p, B_p, u_p, A_s, d_s, B_s,
    u_s, m_p, m_s, s`` (biases and masks may be None; ``B_*`` as ``nn.Linear.weight``, d_out × r)."""

    @staticmethod
    def forward(ctx, x, weight, bias, ap, dp, bp, up, as_, ds, bs, us, mp, ms, scale: float):
        lead, d_out = x.shape[:-1], weight.shape[0]
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        hp = torch.addmm(dp, x2, ap.t()) if dp is not None else x2 @ ap.t()
        hs = torch.addmm(ds, y, as_.t()) if ds is not None else y @ as_.t()  # y is still y0 here
        if mp is not None:
            hp, hs = hp * mp.reshape(hp.shape), hs * ms.reshape(hs.shape)
        cols, rows = [hp, hs], [bp, bs]
        if up is not None:  # the branch biases ride in the same GEMM as a ones column
            cols.append(hp.new_ones(hp.shape[0], 1))
            rows.append((up + us).unsqueeze(1))
        hcat = torch.cat(cols, 1)
        y.addmm_(hcat, torch.cat(rows, 1).t(), alpha=scale)
        ctx.save_for_backward(x2, weight, bias, ap, as_, bp, bs, hcat, mp, ms)
        ctx.scale, ctx.x_shape, ctx.rp = scale, x.shape, ap.shape[0]
        return y.view(*lead, d_out)

    @staticmethod
    def backward(ctx, g):
        x2, weight, bias, ap, as_, bp, bs, hcat, mp, ms = ctx.saved_tensors
        need = ctx.needs_input_grad
        rp, rs, s = ctx.rp, as_.shape[0], ctx.scale
        g2 = g.reshape(-1, g.shape[-1])
        gh = torch.cat([bp, bs], 1)  # d_out × r
        gh = (g2 @ gh).mul_(s)
        if mp is not None:
            gh = gh * torch.cat([mp.reshape(-1, rp), ms.reshape(-1, rs)], 1)
        ghp, ghs = gh[:, :rp], gh[:, rp:]
        out = [None] * 14
        if need[0]:
            out[0] = (g2 @ weight).addmm_(gh, torch.cat([ap, as_ @ weight])).view(ctx.x_shape)
        if need[3] or need[7]:
            ga = gh.t() @ x2  # [dA_p; (gh_sᵀ x)]
            if need[3]:
                out[3] = ga[:rp]
            if need[7]:
                gas = ga[rp:] @ weight.t()
                if bias is not None:
                    gas.addr_(ghs.sum(0), bias)
                out[7] = gas
        if need[4]:
            out[4] = ghp.sum(0)
        if need[8]:
            out[8] = ghs.sum(0)
        if need[5] or need[9] or need[6] or need[10]:
            gb = (hcat.t() @ g2).mul_(s)  # [dB_pᵀ; dB_sᵀ; du]
            out[5], out[9] = gb[:rp].t(), gb[rp:rp + rs].t()
            if hcat.shape[1] > rp + rs:
                out[6] = out[10] = gb[rp + rs]
        return tuple(out)


def hydra_linear(x: torch.Tensor, linear: nn.Linear, par: nn.Module, seq: nn.Module, scale: float,
                 masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Hydra's ``y0 + s·par(x) + s·seq(y0)`` as one fused op; ``par``/``seq`` have ``down``/``up``
    Linears (biases both present or both absent); ``masks``: the two branches' scaled dropout masks."""
    mp, ms = masks if masks is not None else (None, None)
    return _HydraLinear.apply(x, linear.weight, linear.bias, par.down.weight, par.down.bias, par.up.weight,
                              par.up.bias, seq.down.weight, seq.down.bias, seq.up.weight, seq.up.bias,
                              mp, ms, float(scale))
