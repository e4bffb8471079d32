"""Capture one bucket: check for host reads, warm up, capture, and leave no trace in the state.

The :class:`Runtime` owns what captures share (backend, CUDA memory pool, side stream, flags),
so nothing here is global. :func:`capture` runs the whole procedure for one bucket inside the
state guards of every runtime-state object (KV caches): writes during warm-up and capture land in
scratch, and positions, lengths and block tables are restored afterwards.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from graphrt.capture.backends import BACKENDS, GRAPH_CLASSES
from graphrt.errors import BackendUnavailableError, CaptureError


@dataclass
class Runtime:
    """What all captures of one compiled module share."""

    backend: str                     # "cuda-graph" | "cpu-graph" | "eager"
    inductor: bool = False
    warmup: int = 2                  # eager runs before a CUDA capture (allocator, cuBLAS, autotune)
    check_host_reads: bool = True
    _pool: Any = field(default=None, repr=False)
    _stream: Any = field(default=None, repr=False)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise BackendUnavailableError(f"unknown graph backend {self.backend!r}", expected=BACKENDS + ("auto",),
                                          got=self.backend)
        if self.backend == "cuda-graph" and not torch.cuda.is_available():
            raise BackendUnavailableError("backend 'cuda-graph' needs a CUDA device and none is available",
                                          fix="use backend='cpu-graph' (CPU emulation) or 'auto'")

    def memory_pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def pool_bytes(self) -> int:
        """Bytes the allocator holds for this runtime's graph pool (all buckets share it)."""
        if self._pool is None:
            return 0
        pool = tuple(self._pool)
        return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                   if tuple(seg.get("segment_pool_id", ())) == pool)

    def side_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "cuda-graph" if device.type == "cuda" else "cpu-graph"
    return backend


@dataclass
class Captured:
    """One captured bucket: its graph, static inputs and the structure of its outputs."""

    graph: Any
    out_spec: pytree.TreeSpec
    out_consts: list             # output leaves, None where a tensor goes
    seconds: float

    def outputs(self, tensors):
        it = iter(tensors)
        leaves = [next(it) if c is None else c for c in self.out_consts]
        return pytree.tree_unflatten(leaves, self.out_spec)


@contextlib.contextmanager
def state_guard(states):
    """Snapshot every runtime state, enter its own capture guard (if any), restore on exit.

    So warm-up, the host-read check and capture leave no trace: the known bug of static-cache
    graph replay is a capture that advances positions or writes into live caches.
    """
    snaps = [s.snapshot() for s in states]
    with contextlib.ExitStack() as stack:
        for s in states:
            if hasattr(s, "capture_guard"):
                stack.enter_context(s.capture_guard())
        try:
            yield
        finally:
            for s, snap in zip(states, snaps):
                s.restore(snap)


def capture(runtime: Runtime, fn: Callable, rebuild: Callable, inputs: list[torch.Tensor], states,
            where: str) -> Captured:
    """Capture ``fn(*rebuild(inputs))`` over the static ``inputs`` (a list of tensors).

    ``rebuild(tensors) -> (args, kwargs)`` puts the tensors back into the call's structure.
    Refuses a forward with host reads (the report names each file:line).
    """
    out_info: dict[str, Any] = {}

    def flat_fn(*tensors):
        args, kwargs = rebuild(tensors)
        leaves, spec = pytree.tree_flatten(fn(*args, **kwargs))
        out_info["spec"] = spec
        out_info["consts"] = [None if isinstance(x, torch.Tensor) else x for x in leaves]
        return [x for x in leaves if isinstance(x, torch.Tensor)]

    t0 = time.perf_counter()
    with torch.no_grad(), state_guard(states):
        if runtime.check_host_reads:
            from graphrt.capture.hostreads import check

            report = check(flat_fn, *inputs)
            if not report.ok:
                from graphrt.errors import HostReadError

                raise HostReadError(report)
        try:
            graph = GRAPH_CLASSES[runtime.backend](flat_fn, inputs, runtime)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if isinstance(e, CaptureError):
                raise
            raise CaptureError(f"capturing {where} failed: {type(e).__name__}: {e}",
                               fix="run the function eagerly with these inputs to see the error; "
                                   "graphrt.check(fn, ...) lists host reads") from e
    return Captured(graph, out_info["spec"], out_info["consts"], time.perf_counter() - t0)
