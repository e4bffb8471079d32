"""Attention over a static KV length, with device-side sequence lengths.

Backends, all on the ``[B, L, H, D]`` layout Wan uses:

- ``"sdpa"``: PyTorch SDPA with its own kernel choice. Unmasked when the bucket is exact (every
  key is valid), else a boolean mask built on the device from ``seqlens``. Works everywhere.
- ``"sdpa-cudnn"``, ``"sdpa-flash"``, ``"sdpa-efficient"``, ``"sdpa-math"``: SDPA pinned to one
  of its kernels (CUDA; ``sdpa-math`` everywhere). A pinned kernel that cannot take a call (a
  masked bucket, a dtype) raises rather than falling back silently.
- ``"flex"``: FlexAttention with a ``score_mod`` that reads ``seqlens`` on the device
  (compiled on CUDA, one compiled function per shape so dynamo's recompile limit is never hit,
  also under graphrt's checker, warm-ups and verify; flex's own unfused path on the CPU and
  under a trace).
- ``"flash"``: flash-attn's ``flash_attn_with_kvcache`` reading the slab pool in place through
  ``block_table`` and ``cache_seqlens`` (one block per batch row), when flash-attn is importable.

``"auto"`` resolves to the best backend available for the device; :func:`resolve` says which
and why a backend cannot serve a request. On Hopper (sm_90) without flash-attn that is SDPA with
cuDNN first, then SDPA's own order: on an H200 (torch 2.11, bf16, 12 heads of 128, one 3-frame
480p chunk of queries against 1-7 chunks of keys) cuDNN took 0.29-1.77 ms against 0.52-3.06 ms
for SDPA's default flash kernel, with the same error (``python -m graphrt.bench.attention``).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import types

import torch
import torch.nn.functional as F

from graphrt.capture import call_unwatched, only_watched
from graphrt.errors import BackendUnavailableError

SDPA_KERNELS = {"sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION",
                "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}
BACKENDS = ("sdpa", *SDPA_KERNELS, "flex", "flash")
# "auto" on Hopper without flash-attn: cuDNN first, then SDPA's own order for what cuDNN refuses
_CUDNN_FIRST = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


@functools.cache
def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run on ``device``/``dtype``, or None when it can."""
    device = torch.device(device)
    if backend in ("sdpa", "sdpa-math", "sdpa-auto"):
        return None
    if backend in SDPA_KERNELS:
        if device.type != "cuda":
            return f"{backend} is a CUDA kernel, the model is on {device} (use 'sdpa' or 'sdpa-math')"
        if backend in ("sdpa-cudnn", "sdpa-flash") and dtype not in (torch.float16, torch.bfloat16):
            return f"{backend} needs float16 or bfloat16, the model is {dtype}"
        return None
    if backend == "flex":
        return None if _has_flex() else f"FlexAttention is not in torch {torch.__version__} (needs >= 2.5)"
    if backend == "flash":
        if device.type != "cuda":
            return f"flash-attn runs on CUDA only, the model is on {device}"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn needs float16 or bfloat16, the model is {dtype}"
        if not _has_flash_attn():
            return "flash-attn is not installed (pip install 'graphrt[cuda]')"
        return None
    return f"unknown attention backend {backend!r}; known: {BACKENDS + ('auto',)}"


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map ``"auto"`` to a concrete backend, or check that the named one can run here.

    ``auto`` is flash-attn where it runs; else, on Hopper in 16-bit, ``"sdpa-auto"`` (SDPA with
    cuDNN first, falling back in SDPA's order); else ``"sdpa"`` (SDPA's own choice).
    """
    if backend == "auto":
        device = torch.device(device)
        if unavailable_reason("flash", device, dtype) is None:
            return "flash"
        if (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
                and torch.cuda.get_device_capability(device) == (9, 0)):
            return "sdpa-auto"
        return "sdpa"
    why = unavailable_reason(backend, device, dtype)
    if why:
        raise BackendUnavailableError(f"attention backend {backend!r} cannot run here", got=why,
                                      fix="pick another backend (attention='sdpa' works everywhere) or 'auto'")
    return backend


def valid_key_mask(seqlens: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Boolean [B, 1, 1, kv_len]: key j of row b is valid when ``j < seqlens[b]`` (device-only)."""
    return (torch.arange(kv_len, device=seqlens.device) < seqlens[:, None])[:, None, None, :]


def attend(q, k, v, seqlens: torch.Tensor | None = None, backend: str = "sdpa"):
    """Attention of ``q`` [B, Lq, H, D] over ``k``, ``v`` [B, Lk, H, D] -> [B, Lq, H, D].

    ``seqlens`` (int [B], on the device) masks keys at or past each row's length; None means
    every key is valid (the exact-bucket case: no mask, fastest kernels).
    """
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if backend == "sdpa" or backend == "sdpa-auto" or backend in SDPA_KERNELS:
        mask = None if seqlens is None else valid_key_mask(seqlens, k.shape[1])
        with _sdpa_kernels(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)
    if backend == "flex":
        return _flex(qt, kt, vt, seqlens).transpose(1, 2)
    if backend == "flash":
        if seqlens is not None:     # dense K/V as a cache without a block table: one row per batch row
            from flash_attn import flash_attn_with_kvcache

            return flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens.to(torch.int32), causal=False)
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v)
    raise BackendUnavailableError(f"unknown attention backend {backend!r}", expected=BACKENDS, got=backend)


def _sdpa_kernels(backend: str):
    """The SDPA kernel choice for ``backend``: SDPA's own, one pinned kernel, or cuDNN first."""
    if backend == "sdpa":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend == "sdpa-auto":
        return sdpa_kernel([getattr(SDPBackend, n) for n in _CUDNN_FIRST], set_priority=True)
    return sdpa_kernel([getattr(SDPBackend, SDPA_KERNELS[backend])])


# where attend(backend="flex") runs compiled flex: a constant the CPU tests widen to stand in for CUDA
_COMPILED_FLEX_DEVICES = ("cuda",)


def _flex(q, k, v, seqlens):
    """FlexAttention: compiled, one compiled function per shape, on CUDA; elsewhere, and under a
    trace (make_fx, fake tensors), flex's own unfused path.

    Under graphrt's own watching modes (the host-read check and warm-ups in a write log, verify's
    eager rerun) the compiled function runs with the watchers suspended, so every run executes
    the kernels the CUDA graph captures: verify compares like with like, and flex is compiled and
    first launched before the capture, not inside it."""
    if q.device.type in _COMPILED_FLEX_DEVICES:
        if only_watched(q, k, v, *(() if seqlens is None else (seqlens,))):
            key = (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, q.device, seqlens is not None)
            return call_unwatched(_compiled_flex(key), q, k, v, seqlens)
    return _flex_unfused(q, k, v, seqlens)


def _valid_keys(score, b, h, q_idx, kv_idx, seqlens):
    return torch.where(kv_idx < seqlens[b], score, -float("inf"))


def _no_mod(score, b, h, q_idx, kv_idx):
    return score


def _flex_unfused(q, k, v, seqlens):
    """flex_attention's unfused path, called as its higher-order op with ``seqlens`` passed as a
    buffer of the score mod (so a trace takes it as an input, never as a frozen constant), and
    without the compile-or-warn wrapper: running unfused here is deliberate."""
    try:
        from torch._higher_order_ops.flex_attention import flex_attention as flex_op
        from torch.nn.attention.flex_attention import _apply_kernel_options, _create_empty_block_mask
    except ImportError:            # another torch layout: the public function (it warns once: unfused)
        from torch.nn.attention.flex_attention import flex_attention

        if seqlens is None:
            return flex_attention(q, k, v)
        return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: _valid_keys(s, b, h, i, j, seqlens))
    block_mask = _create_empty_block_mask(q, k).as_tuple()
    options = _apply_kernel_options(q, k, v, False, None)
    scale = q.shape[-1] ** -0.5
    if seqlens is None:
        return flex_op(q, k, v, _no_mod, block_mask, scale, options)[0]
    return flex_op(q, k, v, _valid_keys, block_mask, scale, options, score_mod_other_buffers=(seqlens,))[0]


@functools.cache
def _compiled_flex(key, backend: str = "inductor"):
    """A compiled flex_attention for one shape (``key``), behind a code object of its own.

    Dynamo counts recompiles per code object: one compiled function shared by every KV length
    would recompile per shape and, past ``recompile_limit``, silently run unfused. A fresh code
    object per shape compiles each exactly once. The warning flex gives when it runs uncompiled
    is left alone, so a fallback is never silent."""
    from torch.nn.attention.flex_attention import flex_attention

    def flex(q, k, v, seqlens):
        if seqlens is None:
            return flex_attention(q, k, v)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(kv_idx < seqlens[b], score, -float("inf"))
        return flex_attention(q, k, v, score_mod=score_mod)

    fresh = types.FunctionType(flex.__code__.replace(), flex.__globals__, f"flex_attention_{abs(hash(key))}",
                               flex.__defaults__, flex.__closure__)
    return torch.compile(fresh, backend=backend, dynamic=False, fullgraph=True)


def attend_paged(q, k_pool, v_pool, block_table, seqlens):
    """flash-attn over the slab pool in place: one block (slab) per batch row.

    ``k_pool``/``v_pool`` [num_slabs + 1, stride, H, D] from ``cache.paged(layer)`` (stride a
    multiple of 256), ``block_table`` int32 [B], ``seqlens`` int32 [B] (valid tokens per row).
    """
    from flash_attn import flash_attn_with_kvcache

    return flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=seqlens,
                                   block_table=block_table[:, None], causal=False)
