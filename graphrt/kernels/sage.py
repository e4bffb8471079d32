"""SageAttention-style attention: int8 Q·Kᵀ, float softmax and P·V.

The recipe of SageAttention (Zhang et al., 2024): K is smoothed (its mean over tokens subtracted,
which leaves the softmax unchanged, since ``q·mean(k)`` is the same for every key of a query),
Q (pre-multiplied by ``head_dim**-0.5 * log2(e)``) and K are quantized to int8 with one scale
per block of tokens, Q·Kᵀ runs in int8 with int32 accumulation, and softmax (in base 2) and P·V
run in floating point with P in V's dtype and a float32 accumulator.

:func:`sage_attention` is the custom op ``graphrt::sage_attention``: on CUDA it runs the Triton
kernel below; elsewhere it runs :func:`sage_reference`, the same quantized operands in aten ops
(int8 products summed exactly in float32, softmax in float32). :func:`sage_triton` runs the
kernel directly; with ``TRITON_INTERPRET=1`` Triton's interpreter runs it on the CPU (the tests).
Layout ``[B, H, L, D]``; ``seqlens`` (int [B], on the device) masks keys at or past each row's
length.
"""
from __future__ import annotations

import functools
import math
import os

import torch

BLOCK_M, BLOCK_N = 64, 64          # query and key tokens per block: one int8 scale each
_LOG2E = 1.4426950408889634


def quantize_qk(q, k, block_m: int = BLOCK_M, block_n: int = BLOCK_N):
    """Smoothed, per-block int8 ``q``, ``k`` [B, H, L, D] and their float32 scales [B, H, blocks]
    (``q`` scaled by ``D**-0.5 * log2(e)`` first, so the kernel's scores are in base 2)."""
    k = k.float() - k.float().mean(dim=2, keepdim=True)
    q = q.float() * (q.shape[-1] ** -0.5 * _LOG2E)
    return (*_per_block_int8(q, block_m), *_per_block_int8(k, block_n))


def _per_block_int8(x, block):
    b, h, n, d = x.shape
    pad = -n % block
    xb = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(b, h, (n + pad) // block, block * d)
    scale = xb.abs().amax(-1).clamp_min(1e-12) / 127
    xq = (xb / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
    return xq.view(b, h, n + pad, d)[:, :, :n].contiguous(), scale


def sage_reference(q, k, v, seqlens=None, block_m: int = BLOCK_M, block_n: int = BLOCK_N):
    """The kernel's arithmetic in aten ops: int8 Q·Kᵀ (exact in float32), base-2 softmax in float32."""
    qi, qs, ki, ks = quantize_qk(q, k, block_m, block_n)
    lq, lk = q.shape[2], k.shape[2]
    qs = qs.repeat_interleave(block_m, dim=-1)[..., :lq]
    ks = ks.repeat_interleave(block_n, dim=-1)[..., :lk]
    s = (qi.float() @ ki.float().transpose(-1, -2)) * qs[..., :, None] * ks[..., None, :]
    if seqlens is not None:
        valid = torch.arange(lk, device=q.device) < seqlens[:, None]
        s = s.masked_fill(~valid[:, None, None, :], -math.inf)
    p = torch.softmax(s * math.log(2), dim=-1)
    return (p @ v.float()).to(v.dtype)


@torch.library.custom_op("graphrt::sage_attention", mutates_args=())
def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor | None = None,
                   block_m: int = BLOCK_M, block_n: int = BLOCK_N) -> torch.Tensor:
    """int8-QK attention of ``q`` [B, H, Lq, D] over ``k``, ``v`` [B, H, Lk, D] -> [B, H, Lq, D]."""
    return sage_reference(q, k, v, seqlens, block_m, block_n)


@sage_attention.register_fake
def _(q, k, v, seqlens=None, block_m=BLOCK_M, block_n=BLOCK_N):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


@sage_attention.register_kernel("cuda")
def _(q, k, v, seqlens=None, block_m=BLOCK_M, block_n=BLOCK_N):
    return sage_triton(q, k, v, seqlens, block_m, block_n)


def sage_triton(q, k, v, seqlens=None, block_m: int = BLOCK_M, block_n: int = BLOCK_N):
    """The Triton kernel (CUDA; the CPU under ``TRITON_INTERPRET=1``)."""
    import triton

    b, h, lq, d = q.shape
    lk = k.shape[2]
    qi, qs, ki, ks = quantize_qk(q, k, block_m, block_n)
    v = v.contiguous()
    out = torch.empty((b, h, lq, v.shape[-1]), device=q.device, dtype=v.dtype)
    sl = seqlens.to(torch.int32) if seqlens is not None else torch.zeros(1, device=q.device, dtype=torch.int32)
    # Triton 3.9's interpreter returns garbage from a bfloat16 tl.dot (measured: errors of 1e10);
    # interpreted, P·V widens its 16-bit operands to float32 first, which gives the products a
    # 16-bit tensor core gives (exact) with the same float32 accumulation
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    kernel = _kernel(interpret)
    kernel[(triton.cdiv(lq, block_m), b * h)](
        qi, qs.contiguous(), ki, ks.contiguous(), v, sl, out, h, lq, lk, qs.shape[-1], ks.shape[-1],
        D=d, DV=v.shape[-1], BM=block_m, BN=block_n, HAS_SEQLENS=seqlens is not None,
        PV_IEEE=v.dtype == torch.float32 or interpret)
    return out


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel, built on first use (``triton.jit`` reads ``TRITON_INTERPRET`` when it
    decorates, so one build per setting)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _sage_fwd(Q, QS, K, KS, V, SL, O, H, Lq, Lk, NQB, NKB, D: tl.constexpr, DV: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, HAS_SEQLENS: tl.constexpr, PV_IEEE: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        offs_dv = tl.arange(0, DV)
        offs_n = tl.arange(0, BN)
        q = tl.load(Q + bh * Lq * D + offs_m[:, None] * D + offs_d[None, :], mask=offs_m[:, None] < Lq, other=0)
        q_scale = tl.load(QS + bh * NQB + pid_m)
        kv_len = Lk
        if HAS_SEQLENS:
            kv_len = tl.load(SL + bh // H)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, DV], tl.float32)
        for start in range(0, Lk, BN):
            n = start + offs_n
            k = tl.load(K + bh * Lk * D + n[None, :] * D + offs_d[:, None], mask=n[None, :] < Lk, other=0)
            k_scale = tl.load(KS + bh * NKB + start // BN)
            s = tl.dot(q, k).to(tl.float32) * (q_scale * k_scale)          # int8 x int8 -> int32
            s = tl.where(n[None, :] < kv_len, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + bh * Lk * DV + n[:, None] * DV + offs_dv[None, :], mask=n[:, None] < Lk, other=0)
            if PV_IEEE:         # P rounded to V's dtype, both widened: the 16-bit MMA's exact products
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32),
                                                    input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(O + bh * Lq * DV + offs_m[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty),
                 mask=offs_m[:, None] < Lq)

    return _sage_fwd
