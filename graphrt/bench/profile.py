"""The CUDA profiler's view of one steady chunk: device time by kernel (:func:`kernel_table`), the
attention kernel that ran, and how busy the GPU was (:func:`profile_chunk`)."""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from graphrt.bench.driver import Driver
from graphrt.bench.timing import wall


ATTENTION_FAMILIES = (("cudnn", ("cudnn",)), ("sdpa-flash", ("pytorch_flash::",)),
                      ("sdpa-efficient", ("fmha_cutlass",)), ("flex", ("flex_attention",)),
                      ("flash-attn", ("flash_fwd", "flash::")))


def kernel_table(kernels: list[tuple[str, float]], top: int = 8) -> dict:
    """One chunk's device time by kernel: ``kernels`` is (name, microseconds) per kernel launch.

    Returns the total ms, the ``top`` kernels by time (name, calls, ms, share) and the attention
    kernels by family (:data:`ATTENTION_FAMILIES`: which SDPA kernel really ran, and its share)."""
    by_name: dict[str, list] = {}
    for name, us in kernels:
        row = by_name.setdefault(name, [0, 0.0])
        row[0] += 1
        row[1] += us
    total_us = sum(us for _, us in by_name.values()) or 1.0
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    attention: dict[str, dict] = {}
    for name, (calls, us) in rows:
        low = name.lower()
        family = next((f for f, keys in ATTENTION_FAMILIES if any(k in low for k in keys)), None)
        if family is not None:
            a = attention.setdefault(family, {"calls": 0, "ms": 0.0})
            a["calls"] += calls
            a["ms"] += us / 1e3
    for a in attention.values():
        a["share"] = a["ms"] * 1e3 / total_us
    return {"total_ms": total_us / 1e3,
            "top": [{"name": n[:160], "calls": c, "ms": us / 1e3, "share": us / total_us} for n, (c, us) in rows[:top]],
            "attention": attention}


def profile_chunk(driver: Driver, context, seed, chunk: int = 6) -> tuple[float | None, dict | None]:
    """Kernel time / wall time over chunk number ``chunk`` of a video (1-based; the 6th, the
    published comparison point, by default; at least the 2nd: the first opens the session), and
    its kernels (:func:`kernel_table`, with ``"chunk"`` naming the chunk), from the profiler (CUDA only)."""
    chunk = max(chunk, 2)
    it = driver.stream(context, chunk, seed)
    for _ in range(chunk - 1):                 # session set-up and the chunks before: not profiled
        next(it)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = wall()
        next(it)
        torch.cuda.synchronize()
        seconds = wall() - t0
    for _ in it:
        pass
    kernels = []
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            kernels.append((e.name, getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))))
    if not kernels or sum(us for _, us in kernels) == 0:
        driver.notes.append("the profiler saw no kernels (graph replays may be invisible to it)")
        return None, None
    table = dict(kernel_table(kernels), chunk=chunk)
    return table["total_ms"] / 1e3 / seconds, table
