"""Gate + residual, optionally with the next modulated LayerNorm, in one pass.

Each Wan block ends a branch with ``(x.float() + y * gate).type_as(x)`` and starts the next one
with a norm of that same ``x``: fused, ``x`` and ``y`` are read once and the new ``x`` and the
next branch's input are written once, where the unfused ops make four float32 copies.
"""
from __future__ import annotations

from typing import Optional

import torch

from graphrt.kernels._launch import use_triton
from graphrt.kernels.norm import layer_norm_mod_reference, residual_norm


def gate_residual_reference(x, y, gate):
    """The unfused ops: ``(x.float() + y * gate).type_as(x)`` (gate float32 [B, 1, N]), or ``x + y``."""
    return x + y if gate is None else (x.float() + y * gate).type_as(x)


def gate_residual_norm_reference(x, y, gate, weight, bias, scale, shift, eps: float):
    """The unfused ops: :func:`gate_residual_reference`, then the modulated norm of its result."""
    xn = gate_residual_reference(x, y, gate)
    return xn, layer_norm_mod_reference(xn, weight, bias, scale, shift, eps)


@torch.library.custom_op("graphrt::gate_residual", mutates_args=())
def gate_residual(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    """``x + y * gate`` in float32, rounded to ``x``'s dtype (``x + y`` without a gate): one kernel."""
    if not use_triton(x):
        return gate_residual_reference(x, y, gate)
    return residual_norm(x, y, gate, None, None, None, None, 0.0, norm=False)[0].view(x.shape)


@gate_residual.register_fake
def _(x, y, gate):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("graphrt::gate_residual_norm", mutates_args=())
def gate_residual_norm(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor],
                       weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                       shift: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(new ``x``, the next branch's input): :func:`gate_residual` then
    :func:`~graphrt.kernels.layer_norm_mod` of the rounded result, one kernel."""
    if not use_triton(x):
        return gate_residual_norm_reference(x, y, gate, weight, bias, scale, shift, eps)
    xn, h = residual_norm(x, y, gate, weight, bias, scale, shift, eps, norm=True)
    return xn.view(x.shape), h.view(x.shape)


@gate_residual_norm.register_fake
def _(x, y, gate, weight, bias, scale, shift, eps):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device))
