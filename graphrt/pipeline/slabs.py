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
    the graph pool (CUDA graphs only; None elsewhere) and the suspended sessions' host copies."""

    weights: int
    kv: KVMemory
    graph_pool: int | None
    host_suspended: int
    suspended_sessions: int
    prompts: int = 0                     # prompts in the prompt cache (cross-attention K/V kept on the device)
    prompt_bytes: int = 0
    recache_bytes: int = 0               # the re-cache's staging rows (one set per engine; kept latents: kv.latents)

    @property
    def device_total(self) -> int:
        return self.weights + self.kv.total + (self.graph_pool or 0) + self.prompt_bytes + self.recache_bytes

    def __str__(self) -> str:
        mib = 2 ** 20
        pool = "-" if self.graph_pool is None else f"{self.graph_pool / mib:,.1f} MiB"
        return (f"weights {self.weights / mib:,.1f} MiB | K/V ({self.kv.kv_dtype}) {self.kv.slabs} slabs x "
                f"{self.kv.per_session / mib:,.1f} MiB per session (kept latents {self.kv.latents / mib:,.2f} MiB) "
                f"+ scratch {self.kv.scratch / mib:,.1f} MiB | "
                f"graph pool {pool} | prompt cache {self.prompts} x "
                f"{self.prompt_bytes / max(self.prompts, 1) / mib:,.1f} MiB | host: {self.suspended_sessions} suspended, "
                f"{self.host_suspended / mib:,.1f} MiB")


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: the CUDA driver's count, or the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
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


def num_slabs(new_cache: Callable, device: torch.device, max_sessions: int | None, budget: int | float | None,
              batch_sizes: tuple[int, ...] | None) -> int:
    """Slabs to allocate: ``max_sessions``, or as many as the K/V cache fits in ``budget`` (bytes, or a
    fraction in (0, 1] of the free memory of ``device``). ``new_cache(num_slabs=, max_batch=, device=)``
    builds the cache (on the meta device here, to size it)."""
    if budget is None:
        return 1 if max_sessions is None else max_sessions
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0 or \
            (isinstance(budget, float) and budget > 1):
        raise InputError("memory_budget must be bytes (an int > 0) or a fraction of free memory in (0, 1]",
                         got=budget)
    nbytes = int(budget * free_memory(device)) if isinstance(budget, float) else budget
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
