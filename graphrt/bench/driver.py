"""How the bench runs one mode: :class:`Driver` builds its Engine (or the reference, or a
``torch.compile`` peer), prepares it (capture, compile) and streams a video chunk by chunk;
:func:`host_reads_per_chunk` counts one steady chunk's host reads."""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch

from graphrt.bench.presets import FUSED_MODES, INDUCTOR_MODES, PEERS, BenchConfig, kernels_for
from graphrt.capture import HostReadRecorder
from graphrt.models.wan import CausalWan, ReferenceWan
from graphrt.pipeline import Engine, FlowMatchSchedule, reference_stream


class Driver:
    """One mode: how to prepare it (capture) and how to stream a video, chunk by chunk."""

    def __init__(self, mode: str, causal: CausalWan, ref: ReferenceWan, schedule: FlowMatchSchedule,
                 cfg: BenchConfig, kv_dtype: str | None = None, linear_dtype: str | None = None):
        self.mode, self.ref, self.schedule, self.causal, self.cfg = mode, ref, schedule, causal, cfg
        self.kv_dtype, self.linear_dtype = kv_dtype, linear_dtype
        self.engine: Engine | None = None
        self.notes: list[str] = []
        self.mark: Callable | None = None
        self.kernel_path, self.fused_ops = "aten", None      # the reference is upstream Wan's aten ops
        if mode == "reference":
            return
        causal = self.causal = with_kernels(causal, kernels_for(mode))
        self.kernel_path = causal.kernel_path
        if self.kernel_path == "fused":
            self.fused_ops = fused_ops_run(next(causal.parameters()).device)
            if self.fused_ops != "triton":
                self.notes.append("fused ops traced as their aten reference and fused by inductor (their Triton "
                                  "kernels run on CUDA): the same math as aten")
        engine_mode = {"eager": "eager", "graphs": "forward", "chunk-graph": "chunk", "graphs+inductor": "forward",
                       "chunk-graph+inductor": "chunk", "graphs+fused": "forward", "chunk-graph+fused": "chunk",
                       "compile": "eager", "compile-chunk": "eager"}[mode]
        cuda = next(causal.parameters()).is_cuda
        # each peer as strong as a user would make it: CUDA graphs on CUDA; inductor's C++ wrapper on
        # the CPU (faster than its Python wrapper: bench/results/design-numbers.md)
        # sequence-parallel on the CPU: inductor's C++ wrappers cannot call the functional collectives
        # (an AOTInductor package hangs in them, cpp_wrapper refuses them), so every inductor mode,
        # graphrt's (the Engine picks it) and the peers', runs inductor's Python wrapper there
        sp_cpu = not cuda and cfg.sp > 1
        how = dict(dynamic=False, **({"mode": "reduce-overhead"} if cuda else
                                     {} if sp_cpu else {"options": {"cpp_wrapper": True}}))
        said = "torch.compile(mode='reduce-overhead')" if cuda else (
            "torch.compile() (Python wrapper: sequence-parallel)" if sp_cpu else
            "torch.compile(options={'cpp_wrapper': True})")
        if sp_cpu and mode in INDUCTOR_MODES:
            self.notes.append("inductor's Python wrapper: sequence-parallel on the CPU (the C++ wrappers cannot "
                              "call the collectives)")
        model = causal
        if mode == "compile":
            model = torch.compile(causal, **how)
            self.notes.append(f"{said} of the model, one compile per forward shape; first chunk includes one "
                              "warm-up video that compiles every shape")
        self.engine = self._engine(model, engine_mode)
        if mode == "compile-chunk":
            # what a user would do with the engine's chunk function: compile all of it, scheduler included
            self.engine.use_chunk_function(torch.compile(self.engine.chunk_function, fullgraph=True, **how))
            self.notes.append(f"{said} of the whole chunk function (fullgraph); first chunk includes one warm-up "
                              "video that compiles every shape; denoise/cache split not observable")
        else:   # a callback inside the compiled chunk would break its graph
            self.engine.mark = self._on_mark
        if mode in PEERS:  # the cache is state, not input: let cudagraph trees keep its addresses
            cache = self.engine.cache
            for t in cache.tensors().values():
                torch._dynamo.mark_static_address(t)

    def _engine(self, model, engine_mode: str) -> Engine:
        batch = self.cfg.batch
        return Engine(model, max_sessions=batch, batch_sizes=(batch,), mode=engine_mode, schedule=self.schedule,
                      inductor=self.inductor(model), progress=self.cfg.progress, kv_dtype=self.kv_dtype,
                      cache_dir=self.cfg.cache_dir, kv_buckets=self.cfg.kv_buckets, linear_dtype=self.linear_dtype)

    def inductor(self, model) -> bool | str:
        """The mode's ``Engine(inductor=...)``: the fused modes run the Engine's CUDA default
        (``"once"``: one compile for every bucket) on CUDA and an AOTInductor package per bucket on
        the CPU, as the ``+inductor`` modes do (``True``: a compile per bucket); the rest none."""
        if self.mode in FUSED_MODES and next(model.parameters()).is_cuda:
            return "once"
        return self.mode in INDUCTOR_MODES

    def warm_start(self, context, seed) -> tuple[float, int, torch.Tensor]:
        """Start a second engine of this mode on the same disk cache, as a second process would:
        its capture seconds, the graphs it loaded from disk, and its first chunk."""
        engine = self._engine(self.causal, self.engine.mode)
        engine.prewarm()
        first = next(iter(engine.stream(context, 1, seed)))
        stats = engine.graphs.stats
        return stats.capture_seconds, stats.disk_hits, first

    def context(self):
        """Settings a mode runs under: a peer may recompile once per KV length (as graphrt keeps
        one graph per bucket) and must never fall back to eager silently."""
        if self.mode in PEERS:
            return torch._dynamo.config.patch(recompile_limit=64)
        return contextlib.nullcontext()

    def _on_mark(self, name):
        if self.mark is not None:
            self.mark(name)

    def prepare(self, context, chunks, seed):
        """Capture (graph modes) or compile (the peers: one untimed video, so every shape is compiled)."""
        if self.engine is not None:
            self.engine.prewarm()
        if self.mode in PEERS:
            for _ in self.stream(context, chunks, seed):
                pass

    def stream(self, context, chunks, seed):
        if self.engine is None:
            return reference_stream(self.ref, context, chunks, seed, self.schedule, mark=self._on_mark)
        return self.engine.stream(context, chunks, seed)

    @property
    def graph_stats(self):
        g = self.engine.graphs if self.engine is not None else None
        return None if g is None else g.stats


def with_kernels(model: CausalWan, kernels: str) -> CausalWan:
    """``model`` running the ``kernels`` path (``"aten"`` or ``"fused"``): itself when it already
    does, else a shallow copy sharing its weights and submodules (only ``kernels`` differs), so
    the modes of one run compare kernel paths on the same weights. Its submodules are the
    model's own: swap them (``graphrt.quantize``) on the model before any twin is made, once."""
    if model.kernels == kernels:
        return model
    twin = copy.copy(model)
    twin.kernels = kernels
    return twin


def fused_ops_run(device: torch.device) -> str:
    """What the fused ops of a fused mode (inductor-compiled) run on ``device``: ``"triton"``
    (CUDA: their kernels, between inductor's) or ``"aten reference in inductor"`` (the CPU:
    inductor traces each op as its reference and fuses it, :func:`graphrt.capture.decompose_on_cpu`)."""
    from graphrt.kernels import triton_available

    return "triton" if device.type == "cuda" and triton_available() else "aten reference in inductor"


def host_reads_per_chunk(driver: Driver, context, seed, chunks: int) -> tuple[float, float | None] | None:
    """Host reads and async uploads (the pinned block-table copy: no sync) of one steady chunk
    (the second of a video: no session set-up in it), or of the only chunk of a one-chunk video."""
    if driver.mode in PEERS:
        driver.notes.append("host reads not counted: the checker's hooks change what torch.compile traces")
        return None
    recorder = HostReadRecorder()
    steady = chunks >= 2
    it = driver.stream(context, 2 if steady else 1, seed)
    if steady:
        next(it)
    else:
        driver.notes.append("host reads counted on the only chunk, which also opens the session(s)")
    try:
        with recorder:
            next(it)
    except Exception as e:
        if driver.mode not in INDUCTOR_MODES:
            raise
        # on the CPU each replay enters inductor's compiled code, which refuses to run under the hooks
        driver.notes.append(f"replay not countable under the checker ({type(e).__name__}); "
                            "graphrt.check ran on every captured bucket and found 0")
        return 0.0, None
    finally:
        for _ in it:
            pass
    report = recorder.report()
    return float(report.count), float(report.uploads)


# attention kernel families by kernel name, first match wins (SDPA's cuDNN, flash and memory-efficient
# kernels, FlexAttention's triton template, flash-attn's own)
