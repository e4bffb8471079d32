"""The measurements behind ``python -m graphrt.bench``: every mode on one config, side by side.

Modes (all on the same weights, text context and seeds):

- ``reference``: ``ReferenceWan``, eager, with its host reads (the "before" picture);
- ``eager``: the graph-safe ``CausalWan``, eager;
- ``graphs``: one graph per DiT forward per bucket (CUDA graphs; the CPU emulation on the CPU);
- ``chunk-graph``: one graph per whole chunk (denoising forwards, scheduler, noise, cache pass);
- ``graphs+inductor``: ``graphs`` with each bucket compiled by inductor before capture;
- ``chunk-graph+inductor``: ``chunk-graph`` with each whole chunk compiled by inductor: on the
  CPU one AOTInductor package per bucket (no Python between kernels), kept in a disk cache; on
  CUDA inductor's kernels captured in graphrt's CUDA graph;
- ``compile``: a peer, ``torch.compile`` of the graph-safe model, one compile per forward
  (``mode="reduce-overhead"`` on CUDA; on the CPU with inductor's C++ wrapper, its faster one);
- ``compile-chunk``: a peer, ``torch.compile`` of the whole chunk function (the same settings).

Both peers are what a strong user would write; graphrt's graph modes are measured against the
faster of the two (``summary["goal"]``).

Per mode: first-chunk latency (capture/compile included), steady per-chunk latency (median and
p90) split into the denoising forwards and the cache pass where the mode exposes the boundary,
on the CPU the thread CPU time per chunk next to the wall time, the spread of the per-video
medians (min, median, max over the repeats), video frames per second, host reads per chunk
(counted by the checker; pinned async uploads apart), graphs, capture seconds (cold, and warm:
a second engine started on the same disk cache), peak memory (in the steady state, and while
capturing), max error against ``reference`` and speedups against ``reference`` and ``eager``.
``summary["clocks"]`` names the clock behind every time field; speedups use thread CPU time on
the CPU (the machine is shared) and CUDA events on CUDA.

On the CPU the bench runs torch at one thread unless told otherwise: on a shared machine the
ratios between modes swing by an order of magnitude at the default thread count, while one
thread gives stable, comparable numbers. A mode whose p90 is far above its median, or whose
wall time is far above its CPU time, gets a warning (the machine was busy); the JSON records the
load average at the start and the end.

With ``kv_dtype`` (``int8``, ``float8_e4m3fn``) every graph-safe mode runs on a quantized cache;
the summary's ``kv`` entry gives the bytes per session against the model dtype's, the cache's
write/read time per layer (and what quantization adds per chunk), and each mode's error against
an unquantized eager run of the same video (``max_err_vs_unquantized``, ``rms_err_vs_unquantized``).

With ``sp`` = N > 1 (``torchrun --nproc-per-node N``) every rank runs every mode on the
sequence-parallel ``CausalWan`` (:mod:`graphrt.parallel`); ``reference`` stays whole on each rank.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import statistics
import tempfile
import time
import traceback
from datetime import datetime, timezone
from dataclasses import dataclass, field
from typing import Callable

import torch

from graphrt.bench.output import result_json
from graphrt.errors import ConfigError, GraphrtError
from graphrt.kv import StaticKVCache, resolve_kv_dtype
from graphrt.models.wan import CausalWan, ReferenceWan, WanConfig, load_checkpoint
from graphrt.parallel import init_distributed, sequence_parallel
from graphrt.pipeline import Engine, FlowMatchSchedule, reference_stream
from graphrt.tolerance import max_rel_err, rms_rel_err

MODES = ("reference", "eager", "graphs", "chunk-graph", "graphs+inductor", "chunk-graph+inductor", "compile",
         "compile-chunk")
GRAPH_MODES = ("graphs", "chunk-graph", "graphs+inductor", "chunk-graph+inductor")
PEERS = ("compile", "compile-chunk")
INDUCTOR_MODES = ("graphs+inductor", "chunk-graph+inductor")
VIDEO_FRAMES_PER_LATENT = 4


@dataclass(frozen=True)
class Preset:
    model: str                 # WanConfig preset
    height: int                # latent size
    width: int
    chunk_frames: int
    chunks: int
    steps: int = 4
    dtype: str = "bfloat16"
    repeats: int = 1           # extra whole videos timed after the first (steady-state samples)
    layers: int | None = None  # fewer layers than the model preset (a CPU-sized slice of a wide model)

    def config(self, chunks: int | None = None) -> WanConfig:
        n = chunks or self.chunks
        extra = {} if self.layers is None else {"num_layers": self.layers}
        return WanConfig.preset(self.model, height=self.height, width=self.width, chunk_frames=self.chunk_frames,
                                max_frames=n * self.chunk_frames, **extra)


PRESETS = {
    "tiny": Preset("tiny", 8, 8, 3, 2, dtype="float32", repeats=3),
    "wan-1.3b-480p": Preset("wan-1.3b", 60, 104, 3, 7),       # 480x832 video: 1560 tokens per latent frame
    "wan-1.3b-240p-f1": Preset("wan-1.3b", 30, 52, 1, 7),     # 240x416, one latent frame per chunk
    # Wan 1.3B width (dim 1536, 12 heads, ffn 8960, text 512 x 4096) at 64x64 video, one latent
    # frame per chunk, 2 of its 30 layers: CPU-sized, so every mode compiles in minutes
    "wan-1.3b-width-cpu": Preset("wan-1.3b", 8, 8, 1, 3, dtype="float32", repeats=4, layers=2),
    "wan-14b-480p": Preset("wan-14b", 60, 104, 3, 7),
}


@dataclass
class BenchConfig:
    preset: str = "auto"
    device: str | None = None
    batch: int = 1
    chunks: int | None = None
    steps: int | None = None
    layers: int | None = None      # fewer transformer layers than the preset (a slice of the model)
    dtype: str | None = None
    attention: str = "auto"
    modes: tuple[str, ...] = MODES
    checkpoint: str | None = None
    repeats: int | None = None
    seed: int = 0
    threads: int | None = None     # torch threads; None: 1 on the CPU (stable timings), torch's own on CUDA
    cache_dir: str | None = None   # compiled graphs on disk; None: a fresh folder for this run (cold means cold)
    kv_buckets: str = "auto"       # Engine(kv_buckets=...): "per-length", "max" (one graph per batch size), "auto"
    head_to_head: bool = True      # CPU: rerun the goal's two modes in turn (the same load for both)
    progress: bool = True
    kv_dtype: str | None = None           # None: the model dtype
    sp: int = 1                # sequence-parallel ranks (under torchrun); every rank runs, rank 0 reports

    def resolve(self) -> tuple[str, Preset, torch.device, torch.dtype]:
        """Check every setting up front; raise :class:`ConfigError` naming the first bad one."""
        device = _device(self.device)
        name = self.preset if self.preset != "auto" else ("wan-1.3b-480p" if device.type == "cuda" else "tiny")
        if name not in PRESETS:
            raise ConfigError(f"unknown bench preset {name!r}", expected=sorted(PRESETS) + ["auto"], got=name)
        if not self.modes:
            raise ConfigError("no mode to run", expected=f"a comma-separated subset of {','.join(MODES)}")
        if not isinstance(self.sp, int) or self.sp < 1:
            raise ConfigError("--sp must be an int >= 1", got=self.sp)
        unknown = set(self.modes) - set(MODES)
        if unknown:
            raise ConfigError(f"unknown mode(s) {sorted(unknown)}", expected=MODES)
        if len(set(self.modes)) != len(self.modes):
            raise ConfigError("a mode is listed twice", got=",".join(self.modes))
        for what, value, least in (("batch", self.batch, 1), ("chunks", self.chunks, 1), ("steps", self.steps, 1),
                                   ("layers", self.layers, 1),
                                   ("repeats", self.repeats, 0), ("threads", self.threads, 1)):
            if value is not None and (not isinstance(value, int) or value < least):
                raise ConfigError(f"--{what} must be an int >= {least}", got=value)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= 2 ** 63 - self.batch:
            raise ConfigError("--seed must be an int in [0, 2**63 - batch] (row i of the batch gets seed + i)",
                              got=self.seed)
        from graphrt.pipeline.engine import KV_BUCKETS

        if self.kv_buckets not in KV_BUCKETS:
            raise ConfigError(f"unknown --kv-buckets {self.kv_buckets!r}", expected=KV_BUCKETS)
        if self.cache_dir is not None and not os.path.isdir(self.cache_dir):
            raise ConfigError("--cache-dir is not a folder", got=self.cache_dir, fix="create it first")
        if self.checkpoint is not None and not os.path.exists(self.checkpoint):
            raise ConfigError("checkpoint not found", got=self.checkpoint,
                              fix="pass a Wan 2.1 .safetensors file or a folder of shards")
        p = PRESETS[name]
        dtype = getattr(torch, self.dtype or p.dtype)
        resolve_kv_dtype(self.kv_dtype, dtype)
        return name, p, device, dtype


def _device(name: str | None) -> torch.device:
    """``None`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``; anything else is a ConfigError."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}", expected="cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"the bench runs on cpu or cuda, not {device.type}", got=name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ConfigError(f"device {name!r} is not available: this machine has {count} CUDA device(s)",
                              fix="use --device cpu, or run on a machine with a GPU")
    return device


@dataclass
class ModeResult:
    first_chunk_ms: float | None = None
    chunk_ms_median: float | None = None
    chunk_ms_p90: float | None = None
    chunk_cpu_ms_median: float | None = None     # thread CPU time per steady chunk (CPU runs)
    chunk_cpu_ms_p90: float | None = None
    chunk_ms_spread: list | None = None          # [min, median, max] of the per-video medians (wall)
    chunk_cpu_ms_spread: list | None = None      # the same in thread CPU time (CPU runs)
    steady_chunks: int | None = None             # samples behind the medians
    chunk_ms_by_index: list | None = None        # median per chunk index (chunk 0 also opens the session)
    chunk_cpu_ms_by_index: list | None = None    # the same in thread CPU time (CPU runs)
    denoise_ms_median: float | None = None
    cache_pass_ms_median: float | None = None
    fps: float | None = None
    host_reads_per_chunk: float | None = None
    uploads_per_chunk: float | None = None       # pinned non-blocking copies: no sync, not reads
    graphs: int | None = None
    capture_s: float | None = None               # cold: nothing compiled on disk yet
    warm_capture_s: float | None = None          # a second engine on the same disk cache
    disk_hits: int | None = None                 # graphs the second engine loaded from disk
    peak_mem_bytes: int | None = None            # steady state: the timed videos, after capture
    capture_peak_mem_bytes: int | None = None    # while capturing / compiling (prepare)
    gpu_busy: float | None = None
    kernels: dict | None = None                  # CUDA: one steady chunk's device time by kernel (see kernel_table)
    max_err_vs_reference: float | None = None
    max_err_vs_unquantized: float | None = None
    rms_err_vs_unquantized: float | None = None
    speedup_vs_reference: float | None = None
    speedup_vs_eager: float | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)   # numbers not to trust as they stand
    skipped: str | None = None

    def to_json(self) -> dict:
        return result_json(self, optional=("max_err_vs_unquantized", "rms_err_vs_unquantized", "kernels"))


# -- timing: every clock read of the bench happens here ------------------------------------------------
NOISY_P90 = 1.5          # p90 / median above this: the samples are not one distribution
BUSY_WALL_OVER_CPU = 1.3  # at one thread, wall / CPU time above this: the process waited for a core


class Clock:
    """Time marks. On CUDA a mark is a CUDA event (no sync between marks); on the CPU it is
    ``(perf_counter, thread_time)``: wall time and the CPU time of this thread, which at one
    torch thread is the work itself, so wall above it is time spent waiting for a core."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter(), time.thread_time()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        """Wall milliseconds from mark ``a`` to mark ``b``."""
        return a.elapsed_time(b) if self.cuda else (b[0] - a[0]) * 1000.0

    def cpu_ms(self, a, b) -> float | None:
        """This thread's CPU milliseconds from ``a`` to ``b`` (None on CUDA)."""
        return None if self.cuda else (b[1] - a[1]) * 1000.0


def _percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _spread(values, groups) -> list[float]:
    """[min, median, max] of the per-group medians (a group: the steady chunks of one video)."""
    by: dict = {}
    for v, g in zip(values, groups):
        by.setdefault(g, []).append(v)
    medians = [statistics.median(vs) for vs in by.values()]
    return [min(medians), statistics.median(medians), max(medians)]


def clocks(device: torch.device) -> dict[str, str]:
    """The clock behind each time field of a mode's result (``summary["clocks"]``)."""
    wall = "CUDA events (device time between marks)" if device.type == "cuda" else "wall: time.perf_counter"
    named = {f: wall for f in ("chunk_ms_median", "chunk_ms_p90", "chunk_ms_spread", "chunk_ms_by_index",
                               "denoise_ms_median", "cache_pass_ms_median")}
    named.update(first_chunk_ms=wall, capture_s="wall: time.perf_counter", warm_capture_s="wall: time.perf_counter")
    if device.type != "cuda":
        named.update({f: "thread CPU time: time.thread_time (this thread only; at one torch thread, the work)"
                      for f in ("chunk_cpu_ms_median", "chunk_cpu_ms_p90", "chunk_cpu_ms_spread",
                                "chunk_cpu_ms_by_index")})
    named["speedups"] = named["chunk_cpu_ms_median"] if device.type != "cuda" else wall
    return named


def _steady_times(res: "ModeResult", clock: Clock, steady: list, videos: list | None = None) -> None:
    """Median and p90 of the steady chunks (marks ``(start, denoised, end)``), CPU time next to
    wall time on the CPU, the spread of the per-video medians (``videos[i]``: the video chunk
    ``i`` belongs to), and a warning when the numbers say the machine was busy."""
    videos = videos if videos is not None else [0] * len(steady)
    totals = [clock.ms(start, end) for start, _, end in steady]
    res.steady_chunks = len(totals)
    res.chunk_ms_median = statistics.median(totals)
    res.chunk_ms_p90 = _percentile(totals, 0.9)
    res.chunk_ms_spread = _spread(totals, videos)
    if all(mid is not None for _, mid, _ in steady):
        res.denoise_ms_median = statistics.median(clock.ms(start, mid) for start, mid, _ in steady)
        res.cache_pass_ms_median = statistics.median(clock.ms(mid, end) for _, mid, end in steady)
    else:
        res.notes.append("denoise/cache split not observable: the whole chunk is one replay")
    ratio = res.chunk_ms_p90 / res.chunk_ms_median
    if ratio > NOISY_P90:
        res.warnings.append(f"p90 is {ratio:.1f}x the median over {len(totals)} chunks: noisy timings "
                            "(another process, or more threads than free cores?)")
    if not clock.cuda:
        cpu = [clock.cpu_ms(start, end) for start, _, end in steady]
        res.chunk_cpu_ms_median = statistics.median(cpu)
        res.chunk_cpu_ms_p90 = _percentile(cpu, 0.9)
        res.chunk_cpu_ms_spread = _spread(cpu, videos)
        busy = res.chunk_ms_median / max(res.chunk_cpu_ms_median, 1e-9)
        if torch.get_num_threads() == 1 and busy > BUSY_WALL_OVER_CPU:
            res.warnings.append(f"wall time is {busy:.1f}x the CPU time: the process waited for a core "
                                "(the machine is busy)")


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Run with ``n`` torch threads (None: as they are), then put the count back."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class Driver:
    """One mode: how to prepare it (capture) and how to stream a video, chunk by chunk."""

    def __init__(self, mode: str, causal: CausalWan, ref: ReferenceWan, schedule: FlowMatchSchedule,
                 cfg: BenchConfig, kv_dtype: str | None = None):
        self.mode, self.ref, self.schedule, self.causal, self.cfg = mode, ref, schedule, causal, cfg
        self.kv_dtype = kv_dtype
        self.engine: Engine | None = None
        self.notes: list[str] = []
        self.mark: Callable | None = None
        if mode == "reference":
            return
        engine_mode = {"eager": "eager", "graphs": "forward", "chunk-graph": "chunk", "graphs+inductor": "forward",
                       "chunk-graph+inductor": "chunk", "compile": "eager", "compile-chunk": "eager"}[mode]
        cuda = next(causal.parameters()).is_cuda
        # each peer as strong as a user would make it: CUDA graphs on CUDA; inductor's C++ wrapper on
        # the CPU (measured 1.1-1.3x faster than its Python wrapper on the tiny whole chunk)
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
                      cache_dir=self.cfg.cache_dir, kv_buckets=self.cfg.kv_buckets)

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


def _host_reads_per_chunk(driver: Driver, context, seed, chunks: int) -> tuple[float, float | None] | None:
    """Host reads and async uploads (the pinned block-table copy: no sync) of one steady chunk
    (the second of a video: no session set-up in it), or of the only chunk of a one-chunk video."""
    from graphrt.capture import HostReadRecorder

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


def _profile_chunk(driver: Driver, context, seed) -> tuple[float | None, dict | None]:
    """Kernel time / wall time over one steady chunk, and its kernels (:func:`kernel_table`),
    from the profiler (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    it = driver.stream(context, 2, seed)
    next(it)                                   # session set-up and the first chunk: not profiled
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        next(it)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    for _ in it:
        pass
    kernels = []
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            kernels.append((e.name, getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))))
    if not kernels or sum(us for _, us in kernels) == 0:
        driver.notes.append("the profiler saw no kernels (graph replays may be invisible to it)")
        return None, None
    table = kernel_table(kernels)
    return table["total_ms"] / 1e3 / wall, table


def measure(driver: Driver, context, chunks: int, repeats: int, seed: int, clock: Clock, chunk_frames: int,
            device: torch.device) -> tuple[ModeResult, torch.Tensor]:
    res = ModeResult(notes=driver.notes)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    marks: dict = {}
    driver.mark = lambda name: marks.__setitem__(name, clock.mark())
    clock.sync()
    t0 = clock.mark()
    driver.prepare(context, chunks, seed)
    if device.type == "cuda":
        res.capture_peak_mem_bytes = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()       # what follows is the steady state
    rows = []
    video = None
    for rep in range(1 + repeats):
        parts = []
        it = driver.stream(context, chunks, seed)
        for c in range(chunks):
            marks.clear()
            start = clock.mark()
            parts.append(next(it))
            rows.append((rep, c, start, marks.get("denoised"), clock.mark()))
        for _ in it:
            pass
        if video is None:
            video = torch.cat(parts, dim=2)
    driver.mark = None
    clock.sync()
    res.first_chunk_ms = clock.ms(t0, rows[0][4])
    # steady: every chunk but the first of each video (which also opens the sessions)
    steady = [r for r in rows if r[1] > 0] or [r for r in rows if (r[0], r[1]) != (0, 0)]
    if not steady:                 # one chunk, no repeats: the first chunk is all there is
        steady = rows
        res.notes.append("a single chunk was timed: steady numbers include capture/compilation")
    _steady_times(res, clock, [r[2:] for r in steady], [r[0] for r in steady])
    # per chunk index (the KV length grows with it), over the videos after the first
    by_index = [[r for r in rows if r[1] == c and (r[0] > 0 or repeats == 0)] for c in range(chunks)]
    res.chunk_ms_by_index = [statistics.median(clock.ms(r[2], r[4]) for r in rs) for rs in by_index]
    if not clock.cuda:
        res.chunk_cpu_ms_by_index = [statistics.median(clock.cpu_ms(r[2], r[4]) for r in rs) for rs in by_index]
    res.fps = context.shape[0] * chunk_frames * VIDEO_FRAMES_PER_LATENT / (res.chunk_ms_median / 1000.0)
    stats = driver.graph_stats
    if stats is not None:
        res.graphs, res.capture_s = stats.captures, round(stats.capture_seconds, 3)
    elif driver.mode in ("reference", "eager"):
        res.graphs, res.capture_s = 0, 0.0
    if device.type == "cuda":
        res.peak_mem_bytes = torch.cuda.max_memory_allocated()
        try:
            res.gpu_busy, res.kernels = _profile_chunk(driver, context, seed)
            if res.kernels is not None:
                att = ", ".join(f"{f} {a['ms']:.1f} ms ({100 * a['share']:.0f}%)"
                                for f, a in res.kernels["attention"].items()) or "none recognised (see kernels.top)"
                res.notes.append(f"attention kernels in one steady chunk: {att}")
        except Exception as e:  # the profiler is optional evidence, not a reason to fail the run
            res.notes.append(f"gpu_busy not measured: {type(e).__name__}: {e}")
    else:
        res.notes.append("peak memory is measured on CUDA only")
    res.host_reads_per_chunk, res.uploads_per_chunk = _host_reads_per_chunk(driver, context, seed, chunks) \
        or (None, None)
    if driver.mode in INDUCTOR_MODES and device.type == "cpu":
        warm_s, res.disk_hits, first = driver.warm_start(context, seed)
        res.warm_capture_s = round(warm_s, 3)
        if not torch.equal(first, video[:, :, :chunk_frames]):
            res.warnings.append("a second engine started on the same compiled graphs gave a different first chunk")
    elif driver.mode in INDUCTOR_MODES:
        res.notes.append("warm capture measured on the CPU only: graphrt's disk cache holds CPU packages (on CUDA "
                         "inductor's own caches serve a second start)")
    if driver.mode == "compile" and device.type == "cuda":
        skips = torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)
        if skips:
            res.notes.append(f"cudagraph trees skipped {skips} graph(s): those ran without CUDA graphs")
    return res, video


def run(cfg: BenchConfig, on_mode: Callable[[str, ModeResult, dict], None] | None = None) -> dict:
    """Run the selected modes on one config and return the JSON summary.

    ``on_mode(mode, result, summary)`` is called after each mode with the summary so far, so a
    caller can save partial results of a run that may be cut short. Settings and the model
    (checkpoint included) are checked before any mode runs: those errors raise; a mode that
    fails is recorded as ``skipped`` with its reason."""
    name, preset, device, dtype = cfg.resolve()
    threads = cfg.threads if cfg.threads is not None else (1 if device.type == "cpu" else None)
    with _torch_threads(threads), contextlib.ExitStack() as stack:
        if cfg.cache_dir is None:      # cold means cold, for graphrt and the torch.compile peers alike
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="graphrt-bench-cache-"))
            cfg = dataclasses.replace(cfg, cache_dir=os.path.join(tmp, "graphrt"))
            os.makedirs(cfg.cache_dir)
            stack.enter_context(_env(TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor")))
            caches = "cold: a fresh graphrt disk cache and a fresh inductor cache for this run"
        else:
            caches = f"warm allowed: graphrt disk cache {cfg.cache_dir}, inductor's own cache"
        return _run(cfg, name, preset, device, dtype, on_mode, caches)


@contextlib.contextmanager
def _env(**values: str):
    """Environment variables set for the block, restored after (inductor reads its cache folder
    from ``TORCHINDUCTOR_CACHE_DIR`` at each compile)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run(cfg: BenchConfig, name: str, preset: Preset, device: torch.device, dtype: torch.dtype, on_mode,
         caches: str) -> dict:
    chunks = cfg.chunks or preset.chunks
    steps = cfg.steps or preset.steps
    repeats = preset.repeats if cfg.repeats is None else cfg.repeats
    wcfg = preset.config(chunks)
    if cfg.sp > 1:
        device = _join_ranks(cfg.sp, device)
    if cfg.layers is not None:
        wcfg = wcfg.replace(num_layers=cfg.layers)
    torch.manual_seed(cfg.seed)
    ref = ReferenceWan(wcfg).to(device, dtype).eval()
    if cfg.checkpoint:
        load_checkpoint(ref, cfg.checkpoint)
    causal = CausalWan(wcfg, attention=cfg.attention).to(device, dtype).eval()
    causal.load_state_dict(ref.state_dict(), assign=True)   # one copy of the weights, shared by both models
    if cfg.sp > 1:
        sequence_parallel(causal)              # the reference stays whole on every rank: the error baseline
    schedule = FlowMatchSchedule(steps=tuple(1000.0 * (1 - i / steps) for i in range(steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    context = torch.randn(cfg.batch, wcfg.text_len, wcfg.text_dim, generator=gen).to(device, dtype)
    clock = Clock(device)
    try:
        attention = causal.attention_backend
    except GraphrtError:                # every mode will say why it was skipped
        attention = f"{cfg.attention} (unavailable)"
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "load_avg": {"cpus": os.cpu_count(), "start": _load(), "end": None},   # 1, 5, 15 minutes
        "preset": name,
        "config": {"model": preset.model, "dim": wcfg.dim, "num_layers": wcfg.num_layers, "num_heads": wcfg.num_heads,
                   "latent": [wcfg.height, wcfg.width], "frame_tokens": wcfg.frame_tokens,
                   "chunk_frames": wcfg.chunk_frames, "chunks": chunks, "steps": steps, "batch": cfg.batch,
                   "dtype": str(dtype).removeprefix("torch."), "attention": attention,
                   "repeats": repeats, "seed": cfg.seed, "sp": cfg.sp, "kv_buckets": cfg.kv_buckets,
                   "kv_bytes_per_rank": _kv_bytes(causal, cfg.batch, cfg.kv_dtype)},
        "clocks": clocks(device),
        "caches": caches,
        "modes": {},
    }
    quantized = resolve_kv_dtype(cfg.kv_dtype, dtype) != dtype
    summary["config"]["kv_dtype"] = str(resolve_kv_dtype(cfg.kv_dtype, dtype)).removeprefix("torch.")
    if cfg.sp > 1:
        summary["device"] += f" x {cfg.sp} ranks ({torch.distributed.get_backend()})"
    results: dict[str, ModeResult] = {}
    videos: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if quantized:
            summary["kv"] = _kv_summary(wcfg, cfg, dtype, device, steps, causal.kv_heads)
            plain = Driver("eager", causal, ref, schedule, cfg)
            videos["unquantized"] = torch.cat(list(plain.stream(context, chunks, cfg.seed)), dim=2)
            plain = None
        for mode in cfg.modes:
            try:
                driver = Driver(mode, causal, ref, schedule, cfg, None if mode == "reference" else cfg.kv_dtype)
                with driver.context():
                    results[mode], videos[mode] = measure(driver, context, chunks, repeats, cfg.seed, clock,
                                                          wcfg.chunk_frames, device)
            except Exception as e:
                traceback.print_exc()    # the whole story on stderr; the summary keeps one line
                results[mode] = ModeResult(skipped=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
            driver = None                # free this mode's cache and graphs before the next one
            gc.collect()
            if mode in PEERS + INDUCTOR_MODES:
                torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            summary["modes"] = _compare(results, videos)
            summary["goal"] = _goal(results)
            summary["load_avg"]["end"] = _load()
            if on_mode is not None:
                on_mode(mode, results[mode], summary)
        goal = summary["goal"]
        if goal is not None and device.type == "cpu" and cfg.head_to_head:
            pair = (goal["best_graph_mode"], goal["strongest_peer"])
            try:
                goal["head_to_head"] = head_to_head(pair, causal, ref, schedule, cfg, context, chunks,
                                                    max(repeats, 1), clock)
            except Exception as e:
                traceback.print_exc()
                goal["head_to_head"] = {"skipped": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"}
            summary["load_avg"]["end"] = _load()
    return summary


def _kv_summary(wcfg: WanConfig, cfg: BenchConfig, dtype: torch.dtype, device: torch.device, steps: int,
                heads: int) -> dict:
    """Bytes per session, plain and quantized, and the cache's write/read cost per layer, for a
    cache of ``heads`` self-attention heads (H/N on each of N sequence-parallel ranks)."""
    from graphrt.bench.attention import kv_cache_costs

    def per_session(kv_dtype):
        return StaticKVCache.for_config(wcfg, dtype=dtype, kv_dtype=kv_dtype, num_heads=heads,
                                        device="meta").memory().per_session

    plain, quant = per_session(None), per_session(cfg.kv_dtype)
    costs = kv_cache_costs(wcfg, device, dtype, cfg.kv_dtype, cfg.batch, forwards_per_chunk=steps + 1,
                           num_heads=heads)
    return {"kv_dtype": cfg.kv_dtype, "bytes_per_session": quant, "bytes_per_session_plain": plain,
            "ratio": quant / plain, "costs": costs}


def _join_ranks(sp: int, device: torch.device) -> torch.device:
    """Join the torchrun process group (NCCL on CUDA, gloo on the CPU); its size must be ``sp``."""
    device = init_distributed(device)
    world = torch.distributed.get_world_size()
    if world != sp:
        raise ConfigError(f"--sp {sp} but {world} ranks were launched", expected=sp, got=world,
                          fix=f"launch with torchrun --nproc-per-node {sp} -m graphrt.bench --sp {sp}")
    return device


def _kv_bytes(causal: CausalWan, batch: int, kv_dtype: str | None) -> int | None:
    """K/V cache bytes per rank of the Engine the modes build: the same cache, sized on the meta
    device (H/N heads on N ranks, kv_dtype, flash-attn's pages). None when it cannot be built
    (an attention backend that is unavailable here: every mode says why)."""
    try:
        return StaticKVCache.for_model(causal, num_slabs=batch, kv_dtype=kv_dtype, device="meta").memory().total
    except GraphrtError:
        return None


def head_to_head(pair: tuple[str, str], causal, ref, schedule, cfg: BenchConfig, context, chunks: int, videos: int,
                 clock: Clock) -> dict:
    """Two modes again, one video each in turn (A B A B ...), thread CPU time per steady chunk.

    Modes measured one after the other meet different loads: on a shared machine another
    process's memory traffic slows a memory-bound chunk's CPU time too (at the 1.3B width the
    same mode moved by 7% between runs). In turn, both meet the same load; the goal's ratio
    is this one where it was measured.
    """
    drivers = {m: Driver(m, causal, ref, schedule, cfg, cfg.kv_dtype) for m in pair}
    times: dict[str, list[float]] = {m: [] for m in pair}
    with contextlib.ExitStack() as stack:
        for d in drivers.values():
            stack.enter_context(d.context())
            d.prepare(context, chunks, cfg.seed)
        for _ in range(videos):
            for m, d in drivers.items():
                it = d.stream(context, chunks, cfg.seed)
                for c in range(chunks):
                    start = clock.mark()
                    next(it)
                    end = clock.mark()
                    if c > 0 or chunks == 1:
                        times[m].append(clock.cpu_ms(start, end))
                for _ in it:
                    pass
    med = {m: statistics.median(ts) for m, ts in times.items()}
    best, peer = pair
    return {"order": "one video each in turn", "videos": videos, "steady_chunks": len(times[best]),
            "best_ms": med[best], "peer_ms": med[peer], "ratio": med[peer] / med[best],
            "best_cpu_ms_spread": [min(times[best]), med[best], max(times[best])],
            "peer_cpu_ms_spread": [min(times[peer]), med[peer], max(times[peer])]}


def _chunk_time(r: ModeResult) -> float:
    """The steady chunk time speedups compare: thread CPU time on the CPU, wall (events) on CUDA."""
    return r.chunk_cpu_ms_median if r.chunk_cpu_ms_median is not None else r.chunk_ms_median


def _compare(results: dict[str, ModeResult], videos: dict[str, torch.Tensor]) -> dict:
    """Errors against reference (and the unquantized run) and speedups, for the modes run so far."""
    for mode, r in results.items():
        if r.skipped:
            continue
        if "reference" in videos:
            r.max_err_vs_reference = max_rel_err(videos[mode].float(), videos["reference"].float())
        if "unquantized" in videos and mode != "reference":
            r.max_err_vs_unquantized = max_rel_err(videos[mode].float(), videos["unquantized"].float())
            r.rms_err_vs_unquantized = rms_rel_err(videos[mode].float(), videos["unquantized"].float())
        for base, attr in (("reference", "speedup_vs_reference"), ("eager", "speedup_vs_eager")):
            if base in results and not results[base].skipped:
                setattr(r, attr, _chunk_time(results[base]) / _chunk_time(r))
    return {m: r.to_json() for m, r in results.items()}


def _goal(results: dict[str, ModeResult]) -> dict | None:
    """graphrt's fastest graph mode against the strongest torch.compile peer (the clock of
    ``summary["clocks"]["speedups"]``): ``ratio`` > 1 means graphrt is faster."""
    ran = {m: r for m, r in results.items() if not r.skipped}
    graphs = [m for m in GRAPH_MODES if m in ran]
    peers = [m for m in PEERS if m in ran]
    if not graphs or not peers:
        return None
    best = min(graphs, key=lambda m: _chunk_time(ran[m]))
    peer = min(peers, key=lambda m: _chunk_time(ran[m]))
    return {"best_graph_mode": best, "strongest_peer": peer, "ratio": _chunk_time(ran[peer]) / _chunk_time(ran[best]),
            "best_ms": _chunk_time(ran[best]), "peer_ms": _chunk_time(ran[peer]), "target": 1.2}

