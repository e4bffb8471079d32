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
- ``"fa3"``: FlashAttention 3 (Hopper), from the ``flash_attn_interface`` module of
  flash-attention's ``hopper/`` build: unmasked calls go through SDPA's flash kernel with
  ``torch.nn.attention.activate_flash_attention_impl("FA3")`` (process-wide: SDPA's flash kernel
  is FA3 from then on), masked ones through its ``flash_attn_with_kvcache``.
- ``"sage"``: int8 Q·Kᵀ attention (SageAttention's recipe): the ``sageattention`` package where
  it is installed (CUDA, unmasked calls), else :mod:`graphrt.kernels.sage` (a Triton kernel on
  CUDA, its aten reference elsewhere).

``"auto"`` resolves to the best backend available for the device; :func:`resolve` says which
and why a backend cannot serve a request, :func:`kernel_name` which kernel a setting runs. Where
PyTorch itself would put cuDNN first (:func:`cudnn_preferred`: Hopper or Blackwell with cuDNN newer
than 9.15) ``auto`` is ``"sdpa-auto"``, cuDNN first, even when flash-attn is installed: on an H200
(torch 2.11, bf16, 12 heads of 128, one 3-frame 480p chunk of queries against 1-7 chunks of keys)
cuDNN took 0.29-1.77 ms against 0.52-3.06 ms for SDPA's default flash kernel, with the same error,
and on Hopper flash-attn 2 took 0.141 ms per key frame per layer against cuDNN's 0.082
(``python -m graphrt.bench.attention``). Below cuDNN 9.15.1 nothing forces cuDNN: older cuDNN reads
out of bounds when the sequence length is not a multiple of 128 (PyTorch issue 169849), and
Wan's query lengths (4,680, 390) are not.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import types

import torch
import torch.nn.functional as F

from graphrt.capture import call_unwatched, only_watched
from graphrt.errors import BackendUnavailableError

SDPA_KERNELS = {"sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION",
                "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}
BACKENDS = ("sdpa", *SDPA_KERNELS, "flex", "flash", "fa3", "sage")
# "sdpa-auto" where PyTorch prefers cuDNN: cuDNN first, then SDPA's own order for what cuDNN refuses
_CUDNN_FIRST = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
# PyTorch's gate: cuDNN attention first only with a cuDNN newer than 9.15.0 (9.15.1 fixed the
# out-of-bounds reads at sequence lengths not a multiple of 128, PyTorch issue 169849)
CUDNN_MIN_EXCLUSIVE = 91500
FA3_MODULE = "flash_attn_interface"
FA3_INSTALL = ("the flash_attn_interface module (flash-attention's Hopper build: pip install "
               "'git+https://github.com/Dao-AILab/flash-attention.git#subdirectory=hopper')")


@functools.cache
def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _env_true(name: str) -> bool:
    """c10::utils::check_env's true: 1, on, yes, true, y (any case)."""
    return os.environ.get(name, "").strip().lower() in ("1", "on", "yes", "true", "y")


def cudnn_preferred(device: torch.device) -> bool:
    """Whether PyTorch's SDPA puts cuDNN first on ``device``: its own gate, read from
    ``check_prefer_cudnn_attention`` in ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``
    (torch 2.13): ``TORCH_CUDNN_SDPA_DEPRIORITIZED`` not set, the runtime cuDNN version above
    91500 (9.15.0), compute capability major 9 or 10, and, in builds for CUDA before 13, minor 0
    or 3."""
    device = torch.device(device)
    if device.type != "cuda" or _env_true("TORCH_CUDNN_SDPA_DEPRIORITIZED"):
        return False
    version = torch.backends.cudnn.version() or 0
    major, minor = torch.cuda.get_device_capability(device)
    cuda = tuple(int(x) for x in (torch.version.cuda or "0").split(".")[:1])
    minor_ok = minor in (0, 3) if cuda < (13,) else True
    return version > CUDNN_MIN_EXCLUSIVE and major in (9, 10) and minor_ok


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
    if backend == "fa3":
        if device.type != "cuda":
            return f"FA3 runs on CUDA (Hopper) only, the model is on {device}"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"FA3 needs float16 or bfloat16, the model is {dtype}"
        if not _has_module(FA3_MODULE):
            return f"FA3 is not installed: it needs {FA3_INSTALL}"
        return None
    if backend == "sage":
        return None          # graphrt.kernels.sage: Triton on CUDA, its aten reference elsewhere
    return f"unknown attention backend {backend!r}; known: {BACKENDS + ('auto',)}"


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map ``"auto"`` to a concrete backend, or check that the named one can run here.

    ``auto`` is ``"sdpa-auto"`` (SDPA with cuDNN first, falling back in SDPA's order) in 16-bit
    where PyTorch prefers cuDNN (:func:`cudnn_preferred`), whether or not flash-attn is installed;
    else flash-attn where it runs; else ``"sdpa"`` (SDPA's own choice). FA3 and ``sage`` are never
    picked by ``auto`` (not measured against cuDNN on this code base yet): name them.
    """
    if backend == "auto":
        device = torch.device(device)
        if dtype in (torch.float16, torch.bfloat16) and cudnn_preferred(device):
            return "sdpa-auto"
        if unavailable_reason("flash", device, dtype) is None:
            return "flash"
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
        with _sdpa_kernels(backend, q.device):
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)
    if backend == "flex":
        return _flex(qt, kt, vt, seqlens).transpose(1, 2)
    if backend == "fa3":
        return _fa3(q, k, v, seqlens)
    if backend == "sage":
        return _sage(qt, kt, vt, seqlens).transpose(1, 2)
    if backend == "flash":
        if seqlens is not None:     # dense K/V as a cache without a block table: one row per batch row
            from flash_attn import flash_attn_with_kvcache

            return flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens.to(torch.int32), causal=False)
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v)
    raise BackendUnavailableError(f"unknown attention backend {backend!r}", expected=BACKENDS, got=backend)


def _sdpa_kernels(backend: str, device: torch.device | None = None):
    """The SDPA kernel choice for ``backend``: SDPA's own, one pinned kernel, or (``sdpa-auto``,
    where PyTorch's gate allows it on ``device``) cuDNN first."""
    if backend == "sdpa":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend == "sdpa-auto":
        if device is None or not cudnn_preferred(device):     # never force cuDNN below PyTorch's gate
            return contextlib.nullcontext()
        return sdpa_kernel([getattr(SDPBackend, n) for n in _CUDNN_FIRST], set_priority=True)
    return sdpa_kernel([getattr(SDPBackend, SDPA_KERNELS[backend])])


@functools.cache
def _activate_fa3() -> None:
    """Route SDPA's flash kernel to FA3 (once per process; it stays active)."""
    from torch.nn.attention import activate_flash_attention_impl

    activate_flash_attention_impl("FA3")


def _fa3(q, k, v, seqlens):
    """FA3 on the ``[B, L, H, D]`` layout: SDPA's flash kernel with FA3 active; masked calls
    through FA3's own ``flash_attn_with_kvcache`` (SDPA's flash kernel takes no mask)."""
    if not _has_module(FA3_MODULE):
        raise BackendUnavailableError("attention backend 'fa3' cannot run here",
                                      got="FA3 is not installed", fix=f"install {FA3_INSTALL}, or use attention='auto'")
    if seqlens is not None:     # FA3 has no PyPI package (so no extra): imported by name, built from source
        fa3 = importlib.import_module(FA3_MODULE)
        return fa3.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens.to(torch.int32), causal=False)
    _activate_fa3()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _sage(q, k, v, seqlens):
    """int8-QK attention on ``[B, H, L, D]``: the sageattention package (CUDA, unmasked) where it
    is installed, else graphrt's kernel (which takes the mask on the device)."""
    if seqlens is None and q.device.type == "cuda" and _has_module("sageattention"):
        from sageattention import sageattn

        return sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    from graphrt.kernels.sage import sage_attention

    return sage_attention(q, k, v, seqlens)


def kernel_name(backend: str, device, dtype: torch.dtype, q_shape=None, kv_len: int | None = None,
                masked: bool = False) -> str:
    """The kernel an ``attention=`` setting runs for one call: ``backend`` as the model was built
    with (``"auto"`` included), on ``device`` in ``dtype``; ``q_shape`` ``[B, Lq, H, D]`` and
    ``kv_len`` give SDPA's own choice its shape (default: one 64-token query of 1 head of 64 over
    itself), ``masked`` a masked (inexact) bucket. E.g. ``"sdpa:CUDNN_ATTENTION"``,
    ``"flash-attn 2"``, ``"sage:graphrt-triton"``."""
    device = torch.device(device)
    backend = resolve(backend, device, dtype)
    if backend == "flash":
        return "flash-attn 2"
    if backend == "fa3":
        return "fa3:flash_attn_kvcache" if masked else "fa3:sdpa-flash"
    if backend == "sage":
        if not masked and device.type == "cuda" and _has_module("sageattention"):
            return "sage:sageattention"
        return "sage:graphrt-triton" if device.type == "cuda" else "sage:aten-reference"
    if backend == "flex":
        return "flex:compiled" if device.type in _COMPILED_FLEX_DEVICES else "flex:unfused"
    if backend in SDPA_KERNELS:
        return f"sdpa:{SDPA_KERNELS[backend]}"
    b, lq, h, d = q_shape or (1, 64, 1, 64)
    lk = kv_len or lq
    q = torch.empty(b, h, lq, d, device=device, dtype=dtype)
    kv = torch.empty(b, h, lk, d, device=device, dtype=dtype)
    mask = torch.ones(b, 1, 1, lk, device=device, dtype=torch.bool) if masked else None
    from torch.nn.attention import SDPBackend

    with _sdpa_kernels(backend, device):
        choice = torch._fused_sdp_choice(q, kv, kv, mask)
    return f"sdpa:{SDPBackend(choice).name}"


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
