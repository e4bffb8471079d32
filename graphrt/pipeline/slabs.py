"""Slabs and memory for the Engine: how many slabs a memory budget holds, the suspended sessions'
host copies (suspend/resume), and the report of where an engine's bytes are (:class:`EngineMemory`).

A slab holds one resident session's K/V; the Engine's tables (seeds, timesteps, sigmas) keep one
row per slab beside it. This module owns their bytes; :mod:`graphrt.pipeline.engine` owns the
sessions that use them.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Callable

import torch

from graphrt.errors import CacheError, InputError
from graphrt.kv import KVMemory
from graphrt.offload import HostCopy


@dataclass(frozen=True)
class EngineMemory:
    """Where an engine's bytes are: weights, the K/V cache (see :class:`~graphrt.kv.KVMemory`),
    the graph pool (CUDA graphs only; None elsewhere) and the suspended sessions' host copies.

    ``linear_dtype`` is the Engine's (``"bf16"``: the model's own dtype); with ``"fp8"``,
    ``weights_unquantized`` is the weights' bytes before :func:`graphrt.quantize` (None otherwise)."""

    weights: int
    kv: KVMemory
    graph_pool: int | None
    host_suspended: int
    suspended_sessions: int
    prompts: int = 0                     # prompts in the prompt cache (cross-attention K/V kept on the device)
    prompt_bytes: int = 0
    recache_bytes: int = 0               # the re-cache's staging rows (one set per engine; kept latents: kv.latents)
    linear_dtype: str = "bf16"
    weights_unquantized: int | None = None

    @property
    def device_total(self) -> int:
        return self.weights + self.kv.total + (self.graph_pool or 0) + self.prompt_bytes + self.recache_bytes

    def __str__(self) -> str:
        mib = 2 ** 20
        pool = "-" if self.graph_pool is None else f"{self.graph_pool / mib:,.1f} MiB"
        fp8 = "" if self.weights_unquantized is None else \
            f" ({self.linear_dtype} linears; {self.weights_unquantized / mib:,.1f} MiB unquantized)"
        return (f"weights {self.weights / mib:,.1f} MiB{fp8} | K/V ({self.kv.kv_dtype}) {self.kv.slabs} slabs x "
                f"{self.kv.per_session / mib:,.1f} MiB per session (kept latents {self.kv.latents / mib:,.2f} MiB) "
                f"+ scratch {self.kv.scratch / mib:,.1f} MiB | "
                f"graph pool {pool} | prompt cache {self.prompts} x "
                f"{self.prompt_bytes / max(self.prompts, 1) / mib:,.1f} MiB | host: {self.suspended_sessions} suspended, "
                f"{self.host_suspended / mib:,.1f} MiB")


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: the CUDA driver's count plus what PyTorch's caching allocator holds
    unused (it serves new tensors from that first), or the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def powers_of_two(n: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``n`` (``n`` itself last): the default batch buckets for ``n`` slabs."""
    sizes = [1]
    while sizes[-1] < n:
        sizes.append(min(sizes[-1] * 2, n))
    return tuple(sizes)


def budget_bytes(budget: int | float, device: torch.device) -> int:
    """``memory_budget`` in bytes: bytes as given, or a fraction in (0, 1] of the free memory of ``device``."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0 or \
            (isinstance(budget, float) and budget > 1):
        raise InputError("memory_budget must be bytes (an int > 0) or a fraction of free memory in (0, 1]",
                         got=budget)
    return int(budget * free_memory(device)) if isinstance(budget, float) else budget


def refuse_static_over_budget(new_cache: Callable, cfg, device: torch.device, budget: int | float | None,
                              max_batch: int) -> None:
    """A static cache holds every session's whole video (``cfg.max_frames``) from the start: refuse
    one whose single session does not fit ``budget`` (``memory_budget``; None: the free memory of
    ``device``) before anything is allocated, naming the most chunks that fit and the rolling cache
    that makes any length. ``new_cache(num_slabs=, max_batch=, device=, max_frames=)`` builds it."""
    nbytes = free_memory(device) if budget is None else budget_bytes(budget, device)

    def need(chunks: int) -> int:
        return new_cache(num_slabs=1, max_batch=max_batch, device="meta",
                         max_frames=chunks * cfg.chunk_frames).memory().total

    total = need(cfg.num_chunks)
    if total <= nbytes:
        return
    lo, hi = 0, cfg.num_chunks        # need(lo) fits (or lo == 0), need(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid) <= nbytes else (lo, mid)
    where = "memory_budget" if budget is not None else f"the free memory of {torch.device(device)}"
    most, cf = lo * cfg.chunk_frames, cfg.chunk_frames
    raise CacheError(
        f"a static K/V cache for videos of {cfg.num_chunks} chunks (max_frames={cfg.max_frames}) needs "
        f"{total:,} bytes for one session, more than {where} ({nbytes:,} bytes): it holds at most {lo} chunk(s)"
        + ("" if lo else " (it holds no session)"),
        expected=f"<= {lo} chunk(s) of {cfg.chunk_frames} frames in a static cache", got=f"{cfg.num_chunks} chunks",
        fix=(f"use a rolling cache, which makes videos of any length: Engine(..., window=(frames, sink_frames)) "
             f"with frames <= {most}, e.g. window=({min(most, 7 * cf)}, {cf if most >= 2 * cf else 0}); or build "
             f"the model with max_frames <= {most}") if lo else
            "raise the budget, use kv_dtype='int8' or 'float8_e4m3fn', or a smaller model")


PROMPT_SHARE = 8          # the prompt cache's bytes by default: 1/8 of the memory budget (or of free memory)


def prompt_share(budget: int | float | None, prompt_cache_bytes: int | None,
                 device: torch.device) -> tuple[int | None, int]:
    """The memory budget left for the slabs, and the prompt cache's byte bound. By default the
    prompt cache gets 1/:data:`PROMPT_SHARE` of ``budget`` and the slabs the rest; without a budget
    1/:data:`PROMPT_SHARE` of the device's free memory now. ``prompt_cache_bytes`` given: that bound,
    taken from the budget too."""
    if prompt_cache_bytes is not None and (isinstance(prompt_cache_bytes, bool) or
                                           not isinstance(prompt_cache_bytes, int) or prompt_cache_bytes < 0):
        raise InputError("prompt_cache_bytes must be an int >= 0 (bytes of prompts kept; None: a share of the "
                         "memory budget)", got=prompt_cache_bytes)
    if budget is None:
        return None, prompt_cache_bytes if prompt_cache_bytes is not None else free_memory(device) // PROMPT_SHARE
    nbytes = budget_bytes(budget, device)
    if nbytes == 0:                       # a fraction of nothing: the slabs' own check says it holds no session
        return budget, 0
    limit = prompt_cache_bytes if prompt_cache_bytes is not None else nbytes // PROMPT_SHARE
    if limit and limit >= nbytes:
        raise InputError(f"prompt_cache_bytes={limit:,} leaves nothing of memory_budget ({nbytes:,} bytes) "
                         "for the K/V slabs", fix="a smaller prompt_cache_bytes, or a larger memory_budget")
    return nbytes - limit, limit


def num_slabs(new_cache: Callable, device: torch.device, max_sessions: int | None, budget: int | float | None,
              batch_sizes: tuple[int, ...] | None) -> int:
    """Slabs to allocate: ``max_sessions``, or as many as the K/V cache fits in ``budget`` (bytes, or a
    fraction in (0, 1] of the free memory of ``device``). ``new_cache(num_slabs=, max_batch=, device=)``
    builds the cache (on the meta device here, to size it)."""
    if budget is None:
        return 1 if max_sessions is None else max_sessions
    nbytes = budget_bytes(budget, device)
    max_batch = max(batch_sizes) if batch_sizes else 1
    probe = new_cache(num_slabs=1, max_batch=max_batch, device="meta").memory()
    fit = probe.slabs_within(nbytes)
    slabs = fit if max_sessions is None else min(fit, max_sessions)
    if batch_sizes is None:       # the default buckets grow with the slabs: so does the block table
        while slabs > 1 and new_cache(num_slabs=slabs, max_batch=slabs, device="meta").memory().total > nbytes:
            slabs -= 1
    if slabs < 1:
        raise CacheError(f"memory_budget={nbytes:,} bytes holds no session",
                         expected=f">= {probe.total:,} bytes: {probe.per_session:,} per session "
                                  f"({probe.kv_dtype} K/V) + {probe.scratch + probe.state:,} scratch and state",
                         fix="raise the budget, use kv_dtype='int8' or 'float8_e4m3fn', or a smaller window")
    return slabs


class HostSlabs:
    """Suspended sessions' slabs in host memory, keyed by session id: pinned copies made on a side
    stream on CUDA (the host does not wait), loaded back into any slab."""

    def __init__(self, device: torch.device):
        self.device = device
        self._copies: dict[int, HostCopy] = {}
        self._stream = None

    def _copy_stream(self):
        if self.device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def save(self, key: int, views: dict[str, torch.Tensor]):
        """Copy ``views`` to host memory under ``key``; returns the stream the copy runs on (or None)."""
        stream = self._copy_stream()
        self._copies[key] = HostCopy.save(views, stream)
        return stream

    def load(self, key: int, views: dict[str, torch.Tensor]) -> None:
        """Copy the host copy under ``key`` back into ``views`` and drop it."""
        self._copies.pop(key).load(views, self._copy_stream())

    def drop(self, key: int) -> None:
        del self._copies[key]

    def __getitem__(self, key: int) -> HostCopy:
        return self._copies[key]

    def __len__(self) -> int:
        return len(self._copies)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._copies.values())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
