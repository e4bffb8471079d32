"""How the bench runs one mode: :class:`Driver` builds its Engine (or the reference, or a
``torch.compile`` peer), prepares it (capture, compile) and streams a video chunk by chunk;
:func:`host_reads_per_chunk` counts one steady chunk's host reads."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from graphrt.bench.presets import INDUCTOR_MODES, PEERS, BenchConfig
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
        if mode == "reference":
            return
        engine_mode = {"eager": "eager", "graphs": "forward", "chunk-graph": "chunk", "graphs+inductor": "forward",
                       "chunk-graph+inductor": "chunk", "compile": "eager", "compile-chunk": "eager"}[mode]
        cuda = next(causal.parameters()).is_cuda
        # each peer as strong as a user would make it: CUDA graphs on CUDA; inductor's C++ wrapper on
        # the CPU (faster than its Python wrapper: bench/results/design-numbers.md)
        how = dict(dynamic=False, **({"mode": "reduce-overhead"} if cuda else {"options": {"cpp_wrapper": True}}))
        said = "torch.compile(mode='reduce-overhead')" if cuda else "torch.compile(options={'cpp_wrapper': True})"
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
                      inductor=self.mode in INDUCTOR_MODES, progress=self.cfg.progress, kv_dtype=self.kv_dtype,
                      cache_dir=self.cfg.cache_dir, kv_buckets=self.cfg.kv_buckets, linear_dtype=self.linear_dtype)

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
