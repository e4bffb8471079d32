"""LayerNorm + modulation + the cast to the model dtype in one pass.

Wan's modulated norm is ``(LN(x.float()) * (1 + scale) + shift).type_as(x)`` with ``scale`` and
``shift`` float32 per batch row: unfused, a cast up, the norm, two elementwise ops on a float32
copy and a cast down; fused, one read of ``x`` and one write of the result.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from graphrt.errors import InputError
from graphrt.kernels._launch import batch_rows, kernels, rows, use_triton


def check_modulation(scale, shift) -> None:
    if (scale is None) != (shift is None):
        raise InputError("modulation needs both scale and shift", got=f"scale={scale is not None}, "
                         f"shift={shift is not None}", fix="pass both, or neither for a plain norm")


def layer_norm_mod_reference(x, weight, bias, scale, shift, eps: float):
    """The unfused ops: float32 LayerNorm (optional float32 weight/bias), then ``* (1 + scale) + shift``
    when given, rounded to ``x``'s dtype."""
    check_modulation(scale, shift)
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    h = F.layer_norm(x.float(), x.shape[-1:], w, b, eps)
    if scale is not None:
        h = h * (1 + scale) + shift
    return h.type_as(x)


def residual_norm(x, y, gate, weight, bias, scale, shift, eps, norm: bool):
    """Launch the Triton kernel: ``x + y * gate`` (when ``y`` is given) and/or the modulated norm."""
    check_modulation(scale, shift)
    x = x.contiguous()
    if x.dim() != 3:        # per-row vectors are per batch row of [B, L, N]
        x = x.reshape(1, -1, x.shape[-1])
    y = None if y is None else y.contiguous().view(x.shape)
    gate, gate_bs = batch_rows(x, gate, "gate")
    scale, scale_bs = batch_rows(x, scale, "scale")
    shift, shift_bs = batch_rows(x, shift, "shift")
    xout = torch.empty_like(x) if y is not None else None
    hout = torch.empty_like(x) if norm else None
    n = x.shape[-1]
    if rows(x):
        any_, k = x, kernels()
        k.launch(
            k.residual_norm_kernel, x, rows(x), x, y if y is not None else any_, gate if gate is not None else any_,
            weight if weight is not None else any_, bias if bias is not None else any_,
            scale if scale is not None else any_, shift if shift is not None else any_,
            xout if xout is not None else any_, hout if hout is not None else any_,
            rows(x), n, x.shape[1], eps, gate_bs, scale_bs, shift_bs,
            HAS_RES=y is not None, HAS_GATE=gate is not None, HAS_NORM=norm, HAS_W=weight is not None,
            HAS_B=bias is not None, HAS_MOD=scale is not None, BLOCK=k.block(n))
    return xout, hout


@torch.library.custom_op("graphrt::layer_norm_mod", mutates_args=())
def layer_norm_mod(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """LayerNorm of ``x`` [B, L, N] in float32, then ``* (1 + scale) + shift`` (float32 [B, 1, N],
    both or neither), in ``x``'s dtype: one kernel (see :func:`layer_norm_mod_reference`)."""
    if not use_triton(x):
        return layer_norm_mod_reference(x, weight, bias, scale, shift, eps)
    return residual_norm(x, None, None, weight, bias, scale, shift, eps, norm=True)[1].view(x.shape)


@layer_norm_mod.register_fake
def _(x, weight, bias, scale, shift, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)
