"""Where a fused op runs: its Triton kernel on CUDA (and on the CPU under ``TRITON_INTERPRET=1``),
its aten reference otherwise."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from graphrt.errors import InputError


@functools.cache
def triton_available() -> bool:
    """Triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    """Run the Triton kernel for a tensor on ``t``'s device: CUDA, or the CPU under Triton's interpreter."""
    if not triton_available():
        return False
    return t.device.type == "cuda" or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def kernels():
    """The Triton kernel module, imported on first use (Triton is an optional dependency)."""
    return importlib.import_module("graphrt.kernels._triton")


def rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def batch_rows(x: torch.Tensor, t: torch.Tensor | None, what: str) -> tuple[torch.Tensor | None, int]:
    """A per-batch-row vector ``t`` (shape broadcastable to [B, 1, N] for ``x`` [B, L, N]) as a view
    with unit inner stride, and its batch stride (0 when shared by every row)."""
    if t is None:
        return None, 0
    b, _, n = x.shape
    try:
        t = t.expand(b, 1, n)
    except RuntimeError:
        raise InputError(f"{what} does not broadcast to the tokens' batch rows", expected=[b, 1, n],
                         got=list(t.shape)) from None
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0)
