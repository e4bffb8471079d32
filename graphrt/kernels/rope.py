"""RMS norm, and RMS norm + RoPE, of the attention's q and k in one pass.

Wan normalises q and k over the full model width (all heads at once) in float32 with a float32
weight, rounds to the model dtype, splits heads, then rotates each (even, odd) pair by per-token
angles in float32 and rounds again. Unfused that is about ten kernels over float32 copies of q;
fused it is one read of the projection and one write of the rotated heads.
"""
from __future__ import annotations

import torch

from graphrt.kernels._launch import kernels, rows, use_triton


def apply_rope(x, cos, sin):
    """Rotate pairs of ``x`` [B, L, H, D] by angles given as ``cos``/``sin`` [B, L, 1, D/2] (float32)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def rms_norm_reference(x, weight, eps: float):
    """RMS norm over the last dim in float32, weight included; output in ``x``'s dtype (one rounding)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()).type_as(x)


def rms_norm_rope_reference(x, weight, cos, sin, heads: int, eps: float):
    """The unfused ops: :func:`rms_norm_reference`, heads split off, then :func:`apply_rope`."""
    return apply_rope(rms_norm_reference(x, weight, eps).unflatten(-1, (heads, -1)), cos, sin)


def _launch(x, weight, cos, sin, eps, heads):
    x = x.contiguous()
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rope = cos is not None
    if rope:        # one row of D/2 angles per token, like x's rows
        shape = (*x.shape[:-1], 1, cos.shape[-1])
        cos, sin = (t.expand(shape).reshape(-1, cos.shape[-1]) for t in (cos, sin))
    if rows(x):
        k = kernels()
        k.launch(k.rms_rope_kernel, x, rows(x), x, weight, cos if rope else x, sin if rope else x, out,
                 rows(x), n, n // heads // 2, eps, ROPE=rope, BLOCK=k.block(n // 2))
    return out


@torch.library.custom_op("graphrt::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm of ``x`` [..., N] (float32 math, float32 ``weight`` [N]) in ``x``'s dtype, one kernel."""
    if not use_triton(x):
        return rms_norm_reference(x, weight, eps)
    return _launch(x, weight, None, None, eps, 1)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("graphrt::rms_norm_rope", mutates_args=())
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                  eps: float) -> torch.Tensor:
    """RMS norm of ``x`` [B, L, N] then RoPE by ``cos``/``sin`` [B, L, 1, D/2] (float32) ->
    [B, L, heads, D] in ``x``'s dtype, one kernel (see :func:`rms_norm_rope_reference`)."""
    if not use_triton(x):
        return rms_norm_rope_reference(x, weight, cos, sin, heads, eps)
    return _launch(x, weight, cos, sin, eps, heads).unflatten(-1, (heads, -1))


@rms_norm_rope.register_fake
def _(x, weight, cos, sin, heads, eps):
    return torch.empty((*x.shape[:-1], heads, x.shape[-1] // heads), dtype=x.dtype, device=x.device)
