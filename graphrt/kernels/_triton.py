"""The Triton kernels behind :mod:`graphrt.kernels` (imported only when one runs).

Two kernels over token rows, each row whole in registers, ``ROWS`` rows per program (one on a
GPU; many under the interpreter, whose cost is per program, not per element):

- ``rms_rope_kernel``: RMS norm (float32, weight included) rounded to the output dtype, then,
  with ``ROPE``, the rotation of each (even, odd) pair by the row's cos/sin (float32), rounded
  again: exactly the two roundings of the unfused ops.
- ``residual_norm_kernel``: optional residual ``x + y * gate`` (float32, rounded to ``x``'s
  dtype and written), then optional LayerNorm (float32, optional weight/bias) times
  ``1 + scale`` plus ``shift``, rounded to the output dtype.

Each kernel is built twice, compiled (for CUDA tensors) and interpreted (for CPU tensors), rather
than by ``triton.jit``, which picks one by ``TRITON_INTERPRET`` when this module is imported: the
variable then only decides whether CPU tensors use the interpreter (see
:func:`graphrt.kernels.use_triton`), and the compiled build can be checked on a machine without a
GPU. The interpreter itself works only when ``TRITON_INTERPRET=1`` is set before triton is first
imported (Triton's own ``tl.sum`` and friends are built at that import).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


def rms_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, R, N, HALF_D, eps,
                    ROPE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    j = tl.arange(0, BLOCK)[None, :]              # pair index: elements 2j and 2j+1
    mj = j < N // 2
    m = (row < R) & mj
    x_row = x_ptr + row * N
    x0 = tl.load(x_row + 2 * j, mask=m, other=0.0).to(tl.float32)
    x1 = tl.load(x_row + 2 * j + 1, mask=m, other=0.0).to(tl.float32)
    ms = (tl.sum(x0 * x0, axis=1) + tl.sum(x1 * x1, axis=1))[:, None] / N
    r = 1.0 / tl.sqrt(ms + eps)
    w0 = tl.load(w_ptr + 2 * j, mask=mj, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + 2 * j + 1, mask=mj, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    y0 = (x0 * r * w0).to(dt)
    y1 = (x1 * r * w1).to(dt)
    if ROPE:
        c = j % HALF_D
        cs = tl.load(cos_ptr + row * HALF_D + c, mask=m, other=0.0)
        sn = tl.load(sin_ptr + row * HALF_D + c, mask=m, other=0.0)
        a0 = y0.to(tl.float32)
        a1 = y1.to(tl.float32)
        y0 = (a0 * cs - a1 * sn).to(dt)
        y1 = (a0 * sn + a1 * cs).to(dt)
    out_row = out_ptr + row * N
    tl.store(out_row + 2 * j, y0, mask=m)
    tl.store(out_row + 2 * j + 1, y1, mask=m)


def residual_norm_kernel(x_ptr, y_ptr, gate_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, xout_ptr, hout_ptr,
                         R, N, L, eps, gate_bs, scale_bs, shift_bs,
                         HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_NORM: tl.constexpr,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    bt = row // L                                  # batch row of the per-row modulation
    offs = tl.arange(0, BLOCK)[None, :]
    mn = offs < N
    m = (row < R) & mn
    x = tl.load(x_ptr + row * N + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        y = tl.load(y_ptr + row * N + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_GATE:
            g = tl.load(gate_ptr + bt * gate_bs + offs, mask=m, other=0.0).to(tl.float32)
            x = x + y * g
        else:
            x = x + y
        xr = x.to(xout_ptr.dtype.element_ty)
        tl.store(xout_ptr + row * N + offs, xr, mask=m)
        x = xr.to(tl.float32)
    if HAS_NORM:
        mean = tl.sum(x, axis=1)[:, None] / N
        xc = tl.where(m, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=1)[:, None] / N
        h = xc * (1.0 / tl.sqrt(var + eps))
        if HAS_W:
            h = h * tl.load(w_ptr + offs, mask=mn, other=0.0).to(tl.float32)
        if HAS_B:
            h = h + tl.load(b_ptr + offs, mask=mn, other=0.0).to(tl.float32)
        if HAS_MOD:
            s = tl.load(scale_ptr + bt * scale_bs + offs, mask=m, other=0.0).to(tl.float32)
            t = tl.load(shift_ptr + bt * shift_bs + offs, mask=m, other=0.0).to(tl.float32)
            h = h * (1.0 + s) + t
        tl.store(hout_ptr + row * N + offs, h.to(hout_ptr.dtype.element_ty), mask=m)


_BUILT = {fn.__name__: (JITFunction(fn), InterpretedFunction(fn)) for fn in (rms_rope_kernel, residual_norm_kernel)}


def block(n: int) -> int:
    return triton.next_power_of_2(n)


def launch(kernel, x, rows: int, *args, **meta):
    """Launch ``kernel`` over ``rows`` rows of ``x`` (``BLOCK`` elements per row in registers):
    compiled with one row per program on a GPU, interpreted with up to 8 Ki elements per program
    on the CPU."""
    blk = meta.pop("BLOCK")
    cuda = x.device.type == "cuda"
    per = 1 if cuda else max(1, min(triton.next_power_of_2(rows), 8192 // blk))
    compiled, interpreted = _BUILT[kernel.__name__]
    (compiled if cuda else interpreted)[(triton.cdiv(rows, per),)](*args, ROWS=per, BLOCK=blk, **meta)
