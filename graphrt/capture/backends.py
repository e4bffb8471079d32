"""Graph backends: what "capture once, replay many" means on each device.

Every backend captures ``flat_fn(*static_inputs) -> [output tensors]`` once and then
``replay()`` returns the same static output tensors, refreshed.

- :class:`CudaGraph`: ``torch.cuda.CUDAGraph``; warm-up on a side stream, one memory pool shared
  by all buckets (owned by the :class:`~graphrt.capture.capture.Runtime`).
- :class:`CpuGraph`: CPU emulation. The aten ops are traced once over the static buffers
  (``make_fx``, real tensors) and replayed with every Python-side value frozen at capture,
  exactly as a CUDA graph freezes kernel arguments. A host value that leaks into the captured
  region therefore gives a wrong replay on the CPU too: a Python number, and also a 0-dim host
  tensor (``x * self.scale`` with a plain tensor attribute, a scheduler's ``sigmas[i]``), whose
  value CUDA passes as a kernel argument. Replayed by the FX interpreter it is for fidelity, not
  speed (about what eager costs); with ``inductor`` the trace is compiled
  (:mod:`graphrt.capture.aot`: by default one AOTInductor package per bucket, kept on disk).
- :class:`EagerGraph`: no graph; runs the function on the static inputs (a control).

Every run during capture goes through the capture's :class:`~graphrt.capture.undo.Sandbox` (one
with no roots when none is given), so it leaves no trace in any tensor; compiled runs roll back
what the recorded trace wrote.

Outputs: both graph backends write their outputs into one arena per runtime that every bucket
shares, so an output is valid until the next replay of *any* bucket (on CUDA, as with vLLM's
shared outputs; on the CPU, the same lifetime, so code that keeps an output too long fails
there first). Clone what you keep, or compile with ``clone_outputs=True``.
"""
from __future__ import annotations

import contextlib

import torch

from graphrt.capture.aot import CompiledTrace
from graphrt.capture.undo import Sandbox
from graphrt.errors import CaptureError

BACKENDS = ("cuda-graph", "cpu-graph", "eager")


class EagerGraph:
    def __init__(self, flat_fn, inputs, runtime, frozen_on_host=None, sandbox=None):
        self.fn, self.inputs = flat_fn, inputs

    def replay(self):
        return self.fn(*self.inputs)


def _one_fake_mode():
    """One FakeTensorMode for a whole ``make_fx`` trace: real-tensor tracing otherwise builds a
    mode (and walks the Python stack) for every op's metadata, which is most of its cost."""
    try:
        from torch._guards import TracingContext, tracing
        from torch._subclasses.fake_tensor import FakeTensorMode

        return tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True)))
    except (ImportError, TypeError):
        return contextlib.nullcontext()


# Custom ops that an inductor build on the CPU sees through: op -> its reference in plain aten ops.
# A fused op's compiled kernel runs on CUDA; on the CPU it would be one opaque call between the
# kernels inductor generates, so the trace records its reference there and inductor fuses that with
# its neighbours (:func:`decompose_on_cpu`).
CPU_DECOMPOSITIONS: dict = {}


def decompose_on_cpu(op, reference) -> None:
    """Have CPU inductor builds trace ``op`` (an ``OpOverload``) as ``reference`` (same signature and
    results, plain aten ops). Eager runs and graphs without inductor still call ``op``."""
    CPU_DECOMPOSITIONS[op] = reference


def trace(flat_fn, inputs, inductor: bool, frozen_on_host=None, sandbox: Sandbox | None = None,
          options: dict | None = None, decompositions: dict | None = None):
    """The aten ops of one call over ``inputs``, every Python value frozen (``make_fx``, real
    tensors: it runs once), optionally compiled by inductor. Each bucket gets its own GraphModule,
    so compiling many buckets never hits dynamo's recompile limit.

    ``frozen_on_host(t) -> bool`` names the tensor constants that live on the host of a CUDA model:
    their value is frozen (copied) here, as a CUDA graph bakes a host scalar into a kernel
    argument. Host tables are frozen too: ``sigmas[i]`` of a host ``sigmas`` runs on the host once,
    at capture, and its value is what every replay uses.
    Inductor's own CUDA graphs stay off: the trace runs inside graphrt's graph; so does freezing,
    which would fold runtime state read as attributes (caches, positions) into constants.
    ``options``: inductor's (``capture.aot.inductor_options``; default those two off).
    ``decompositions``: ops traced as their references (``make_fx``'s decomposition table).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    with _one_fake_mode():
        traced = make_fx(flat_fn, decomposition_table=decompositions or None, tracing_mode="real")
        gm = (sandbox or Sandbox({})).run(traced, *inputs)
    if frozen_on_host is not None:
        for name, t in list(gm.named_buffers()):
            if "." not in name and frozen_on_host(t):
                gm.register_buffer(name, t.clone())
    if inductor:
        opts = {"triton.cudagraphs": False, "freezing": False} if options is None else options
        return torch.compile(gm, fullgraph=True, dynamic=False, options=opts)
    return gm


class CpuGraph:
    def __init__(self, flat_fn, inputs, runtime, frozen_on_host=None, sandbox=None):
        sandbox = sandbox or Sandbox({})
        self.inputs = inputs
        self.run = trace(flat_fn, inputs, False, frozen_on_host, sandbox,
                         decompositions=CPU_DECOMPOSITIONS if runtime.inductor else None)
        if runtime.inductor:
            self.run = CompiledTrace(self.run, inputs, runtime.inductor, runtime.disk, options=runtime.options)
        self.disk_hit = getattr(self.run, "disk_hit", None)       # True/False: loaded from / stored to disk
        first = (sandbox.run_opaque if runtime.inductor else sandbox.run)(self.run, *inputs)   # compiles, if inductor
        self.outputs = runtime.output_slots(first)
        for static, out in zip(self.outputs, first):
            static.copy_(out)

    def replay(self):
        for static, out in zip(self.outputs, self.run(*self.inputs)):
            static.copy_(out)
        return self.outputs


def root_cause(error: BaseException) -> BaseException:
    """The first error of a chain: a failed CUDA capture raises "operation failed due to a
    previous error during capture" from ``capture_end``, with the real cause as its context."""
    seen = {id(error)}
    while True:
        nxt = error.__cause__ or error.__context__
        if nxt is None or id(nxt) in seen:
            return error
        seen.add(id(nxt))
        error = nxt


# "thread_local": only this thread's unsafe calls (a sync, a pageable copy) fail the capture; the default
# "global" mode also fails it when another thread runs CUDA work meanwhile (a decode worker, a server's
# other requests), so a lazy capture beside them would fail
CAPTURE_ERROR_MODE = "thread_local"


class CudaGraph:
    """One ``torch.cuda.CUDAGraph`` over the runtime's shared pool, captured on the runtime's
    device. A failed capture leaves the process as it found it: the caller's stream is current
    again (``torch.cuda.graph`` does not restore it when ``capture_end`` raises), the allocator no
    longer routes to the pool, the default generator is out of capture mode, and the error names
    its first cause."""

    def __init__(self, flat_fn, inputs, runtime, frozen_on_host=None, sandbox=None):
        sandbox = sandbox or Sandbox({})
        self.device = runtime.device
        self.inputs = inputs
        compiled = runtime.inductor or runtime.opaque
        warm = sandbox.run_opaque if compiled else sandbox.run
        with torch.cuda.device(self.device):
            # keep the compiled callable: the graph replays its kernels and reads its constants
            self.fn = trace(flat_fn, inputs, True, None, sandbox, runtime.options) if runtime.inductor else flat_fn
            if runtime.opaque:        # compiled inside: one watched (uncompiled) run records what it writes
                sandbox.run(flat_fn, *inputs)
            caller = torch.cuda.current_stream()
            stream = runtime.side_stream()
            stream.wait_stream(caller)
            with torch.cuda.stream(stream):
                for _ in range(runtime.warmup):
                    outs = warm(self.fn, *inputs)
            caller.wait_stream(stream)
            self.outputs = runtime.output_slots(outs)
            del outs
            self.graph = torch.cuda.CUDAGraph()
            with sandbox.unexecuted():            # no kernel runs; Python could still rebind state
                self._capture(stream, caller, runtime)

    def _capture(self, stream, caller, runtime):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()          # as torch.cuda.graph does: give the graph's pool room
        torch.cuda.set_stream(stream)
        try:
            self.graph.capture_begin(pool=runtime.memory_pool(), capture_error_mode=CAPTURE_ERROR_MODE)
            error = None
            try:
                for static, out in zip(self.outputs, self.fn(*self.inputs)):
                    static.copy_(out)
            except Exception as e:        # end the capture first, then report the first error
                error = e
            try:
                self.graph.capture_end()
            except Exception as e:
                _stop_allocating_to_pool(self.device, runtime.memory_pool())
                _end_generator_capture(self.device)
                error = error or e
            if error is not None:
                raise error
        except Exception as e:
            cause = root_cause(e)
            first_line = (str(cause).strip().splitlines() or [""])[0]
            raise CaptureError(
                f"CUDA graph capture failed: {type(cause).__name__}: {first_line}",
                fix="a captured region may not sync with the host or copy from pageable host memory: run "
                    "graphrt.check(fn, *args) on these inputs to find the line (compile(check=True) does it "
                    "before capture); the caller's stream and state are restored, so fixing and retrying is safe"
            ) from cause
        finally:
            torch.cuda.set_stream(caller)     # torch.cuda.graph leaves the side stream current if capture_end raises

    def replay(self):
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.outputs


def _stop_allocating_to_pool(device, pool) -> None:
    """After a capture that never ended, tell the allocator to stop routing to its pool (what
    ``capture_end`` would have done). Best effort: the binding's name differs across versions."""
    with contextlib.suppress(Exception):
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        for name in ("_cuda_endAllocateToPool", "_cuda_endAllocateCurrentStreamToPool"):
            fn = getattr(torch._C, name, None)
            if fn is not None:
                fn(index, pool)
                return


def _end_generator_capture(device) -> None:
    """A ``capture_end`` that raises skips the random generators' capture epilogue: the default
    CUDA generator stays in capture mode and every later eager random op fails ("Offset increment
    outside graph capture"). A tiny capture that succeeds ends it. Best effort, on a side stream."""
    with contextlib.suppress(Exception):
        scratch = torch.zeros(1, device=device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(torch.cuda.Stream(device)):
            graph.capture_begin(capture_error_mode=CAPTURE_ERROR_MODE)
            scratch.add_(1)
            graph.capture_end()


GRAPH_CLASSES = {"cuda-graph": CudaGraph, "cpu-graph": CpuGraph, "eager": EagerGraph}
