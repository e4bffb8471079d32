"""Capture one bucket: check for host reads, warm up, capture, and leave no trace in the state.

The :class:`Runtime` owns what captures share (backend, CUDA memory pool, side stream, flags),
so nothing here is global. :func:`capture` runs the whole procedure for one bucket in a
:class:`~graphrt.capture.undo.Sandbox`, whose write log undoes every write of every run (positions,
lengths, block tables and K/V rows alike), inside each runtime state's capture guard (a KV cache
sends the warm-ups' writes to its scratch slab).
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from graphrt.capture.backends import BACKENDS, GRAPH_CLASSES
from graphrt.capture.hostreads import HostReadRecorder, device_tensors
from graphrt.capture.state import CaptureGuarded
from graphrt.capture.tensors import storage_key
from graphrt.capture.undo import Sandbox, root_values, roots_of
from graphrt.errors import BackendUnavailableError, CaptureError, GraphrtWarning, HostReadError


@dataclass
class Runtime:
    """What all captures of one compiled module share: the backend, the device, the CUDA memory
    pool and side stream, and the output arena (every bucket's outputs live in it, so an output
    is valid until the next replay of any bucket)."""

    backend: str                     # "cuda-graph" | "cpu-graph" | "eager"
    inductor: bool | str = False     # False, or inductor's wrapper: "aoti" | "cpp-wrapper" | "python" (capture/aot.py)
    options: dict | None = None      # inductor's options (capture/aot.py inductor_options); None: graphrt's own
    opaque: bool = False             # the function runs compiled code (replay/once.py): watched runs see its eager twin
    warmup: int = 2                  # eager runs before a CUDA capture (allocator, cuBLAS, autotune)
    check_host_reads: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    disk: Any = None                 # DiskCache of compiled artifacts (capture/diskcache.py), or None
    _pool: Any = field(default=None, repr=False)
    _stream: Any = field(default=None, repr=False)
    _arenas: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise BackendUnavailableError(f"unknown graph backend {self.backend!r}", expected=BACKENDS + ("auto",),
                                          got=self.backend)
        if self.backend == "cuda-graph" and not torch.cuda.is_available():
            raise BackendUnavailableError("backend 'cuda-graph' needs a CUDA device and none is available",
                                          fix="use backend='cpu-graph' (CPU emulation) or 'auto'")
        if self.warmup < 1:
            raise CaptureError("warmup must be at least 1: the capture sizes its outputs from a warm-up run",
                               got=self.warmup)
        self.device = torch.device(self.device)
        if self.backend == "cuda-graph" and self.device.type != "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def memory_pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def pool_bytes(self) -> int | None:
        """Bytes the allocator holds for this runtime's graph pool (all buckets share it); None
        under ``PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync``, which keeps no snapshots."""
        if self._pool is None:
            return 0
        if getattr(torch.cuda, "get_allocator_backend", lambda: "native")() != "native":
            return None
        pool = tuple(self._pool)
        return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                   if tuple(seg.get("segment_pool_id", ())) == pool)

    def side_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def output_slots(self, tensors) -> list[torch.Tensor]:
        """Static outputs shaped like ``tensors``, as views of the arena all buckets share: a
        replay of any bucket overwrites them (on CUDA and in the CPU emulation alike)."""
        align = 256
        slots, offsets, need = [], [], {}
        for t in tensors:
            at = need.get(t.device, 0)
            offsets.append(at)
            need[t.device] = at + -(-t.numel() * t.element_size() // align) * align
        for device, n in need.items():
            arena = self._arenas.get(device)
            if arena is None or arena.numel() < n:
                self._arenas[device] = torch.empty(max(n, align), dtype=torch.uint8, device=device)
        for t, at in zip(tensors, offsets):
            raw = self._arenas[t.device][at:at + t.numel() * t.element_size()]
            slots.append(raw.view(t.dtype).view(t.shape))
        return slots


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
    undo_bytes: int = 0          # the most one run before the real call wrote (and capture saved to undo it)

    def outputs(self, tensors):
        it = iter(tensors)
        leaves = [next(it) if c is None else c for c in self.out_consts]
        return pytree.tree_unflatten(leaves, self.out_spec)


@contextlib.contextmanager
def capture_guards(states):
    """Enter each runtime state's own capture guard (:class:`~graphrt.capture.state.CaptureGuarded`:
    a KV cache points every row at its scratch slab), so warm-up writes land in scratch. Undoing the
    writes is the sandbox's write log's (:mod:`graphrt.capture.undo`), for these states as for any
    tensor the function reaches."""
    with contextlib.ExitStack() as stack:
        for s in states:
            if isinstance(s, CaptureGuarded):
                stack.enter_context(s.capture_guard())
        yield


@contextlib.contextmanager
def rng_guard(device: torch.device):
    """Put the random generators back as they were: a check, warm-up and capture that draw
    random numbers must not shift the user's seeded stream."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def capture(runtime: Runtime, fn: Callable, rebuild: Callable, inputs: list[torch.Tensor], states,
            where: str, roots: dict | None = None, names: list[str] | None = None) -> Captured:
    """Capture ``fn(*rebuild(inputs))`` over the static ``inputs`` (a list of tensors).

    ``rebuild(tensors) -> (args, kwargs)`` puts the tensors back into the call's structure; ``roots``
    names the call's argument objects (a cache passed in); ``names`` the argument path of each input.
    A function that writes into a tensor argument is refused: the graph writes into its static copy,
    so the caller's tensor would never change (see :func:`refuse_argument_writes`). Every run before the real call (check,
    warm-ups, trace) runs in a :class:`~graphrt.capture.undo.Sandbox`: its writes are undone and a
    rebound attribute is refused. Refuses a forward with host reads, host values or host tensors (the report names each
    file:line) and warns when it draws random numbers (each replay draws new ones).
    """
    out_info: dict[str, Any] = {}

    def flat_fn(*tensors):
        args, kwargs = rebuild(tensors)
        leaves, spec = pytree.tree_flatten(fn(*args, **kwargs))
        out_info["spec"] = spec
        out_info["consts"] = [None if isinstance(x, torch.Tensor) else x for x in leaves]
        return [x for x in leaves if isinstance(x, torch.Tensor)]

    reachable = roots_of(fn)                     # the owner, closure cells, globals
    known = device_tensors(states, inputs, list((roots or {}).values()), through=root_values(reachable))
    t0 = time.perf_counter()
    sandbox = Sandbox(reachable | (roots or {}), where)
    with torch.no_grad(), rng_guard(runtime.device), capture_guards(states):
        if runtime.check_host_reads:
            recorder = HostReadRecorder(known=known)

            def checked(*tensors):               # the sandbox's undo runs after the recorder stops
                with recorder:
                    flat_fn(*tensors)

            sandbox.run(checked, *inputs)
            report = recorder.report()
            if not report.ok:
                raise HostReadError(report)
            refuse_argument_writes(sandbox.last, inputs, names, where)
            if report.notes:
                warnings.warn(f"{where} draws random numbers at "
                              f"{', '.join(s.where for s in report.notes)}: every replay draws new ones, so a "
                              "replay never equals an eager rerun (verify will differ)", GraphrtWarning, stacklevel=3)
        stored = {storage_key(t) for t in known}
        # With the checker on, a table the capture reads passed it: device ops read it (index_select
        # of the Engine's seed and timestep tables), so on CUDA it lives on the device and every
        # replay reads it live. Only a host scalar, or any host tensor when the checker is off
        # (``sigmas[i]`` of a host table), is frozen as a CUDA graph freezes it.
        frozen_on_host = None if runtime.backend == "cuda-graph" else (
            lambda t: not isinstance(t, torch.nn.Parameter) and storage_key(t) not in stored
            and (t.dim() == 0 or not runtime.check_host_reads))
        try:
            if sandbox.last is None:            # no check ran: one recorded run finds the outputs and the writes
                sandbox.run(flat_fn, *inputs)
                refuse_argument_writes(sandbox.last, inputs, names, where)
            graph = GRAPH_CLASSES[runtime.backend](flat_fn, inputs, runtime, frozen_on_host, sandbox)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if isinstance(e, CaptureError):
                raise
            raise CaptureError(f"capturing {where} failed: {type(e).__name__}: {e}",
                               fix="run the function eagerly with these inputs to see the error; "
                                   "graphrt.check(fn, ...) lists host reads") from e
    return Captured(graph, out_info["spec"], out_info["consts"], time.perf_counter() - t0, sandbox.peak_bytes)


def refuse_argument_writes(log, inputs: list[torch.Tensor], names: list[str] | None, where: str) -> None:
    """Refuse a run that wrote into a tensor that came in as an argument (``pos.add_(1)`` on an argument
    ``pos``, ``state["cache"].index_copy_`` on a dict argument's tensor).

    Every call copies its tensor arguments into static buffers and the graph reads and writes those:
    the write would land in the buffer, the caller's tensor would never change, and the next call would
    copy its stale values back in. State the call updates must be used live instead: an attribute of an
    object argument (a cache, a dataclass) or a module buffer."""
    if log is None or not inputs:
        return
    storages = {storage_key(t): i for i, t in enumerate(inputs) if t.numel() > 0}
    hit: dict[int, str] = {}
    for r in log.regions:
        i = storages.get(storage_key(r.tensor))
        if i is not None:
            hit.setdefault(i, r.op)
    if not hit:
        return
    paths = [f"{names[i] if names else f'tensor input {i}'} ({op})" for i, op in sorted(hit.items())]
    raise CaptureError(
        "the captured function writes into tensor argument(s): a replay writes into graphrt's static copy, "
        "so the caller's tensor would never change and the next call would copy its old values back in",
        where=where, expected="tensor arguments only read", got="written: " + ", ".join(paths),
        fix="keep state the call updates where the graph uses it live: an attribute of an object argument "
            "(a cache or state object, a dataclass) or a module buffer; or return the new value instead of "
            "writing it into the argument")
