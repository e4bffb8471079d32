"""Per-dtype tolerances for "equal within the dtype's precision", and the error measure they bound."""
from __future__ import annotations

import torch

_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def tolerance(dtype: torch.dtype) -> float:
    """Max relative error (see :func:`max_rel_err`) two implementations of one forward may differ by."""
    return _TOL.get(dtype, 0.0)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|``, in float64: scale-free, and strict on the largest values."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()  # host-read-ok: a test/bench measure


def rms_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64: the typical error, where :func:`max_rel_err` is the worst
    (in bf16 the worst is often one rounding step of the largest value, whatever else differs)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()  # host-read-ok: a test/bench measure
