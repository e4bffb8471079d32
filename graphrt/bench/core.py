"""The measurements behind ``python -m graphrt.bench``: every mode on one config, side by side.

Modes (all on the same weights, text context and seeds):

- ``reference``: ``ReferenceWan``, eager, with its host reads (the "before" picture);
- ``eager``: the graph-safe ``CausalWan``, eager;
- ``graphs``: one graph per DiT forward per bucket (CUDA graphs; the CPU emulation on the CPU);
- ``chunk-graph``: one graph per whole chunk (denoising forwards, scheduler, noise, cache pass);
- ``graphs+inductor``: ``graphs`` with each bucket compiled by inductor before capture;
- ``compile``: the peer, ``torch.compile(mode="reduce-overhead")`` of the graph-safe model on
  CUDA, plain ``torch.compile`` on the CPU.

Per mode: first-chunk latency (capture/compile included), steady per-chunk latency (median and
p90) split into the denoising forwards and the cache pass where the mode exposes the boundary,
video frames per second, host reads per chunk (counted by the checker), graphs, capture seconds,
peak memory, max error against ``reference`` and speedups against ``reference`` and ``eager``.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
import traceback
from datetime import datetime, timezone
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from graphrt.errors import ConfigError, GraphrtError
from graphrt.models.wan import CausalWan, ReferenceWan, WanConfig, load_checkpoint
from graphrt.pipeline import Engine, FlowMatchSchedule, reference_stream
from graphrt.tolerance import max_rel_err

MODES = ("reference", "eager", "graphs", "chunk-graph", "graphs+inductor", "compile")
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

    def config(self, chunks: int | None = None) -> WanConfig:
        n = chunks or self.chunks
        return WanConfig.preset(self.model, height=self.height, width=self.width, chunk_frames=self.chunk_frames,
                                max_frames=n * self.chunk_frames)


PRESETS = {
    "tiny": Preset("tiny", 8, 8, 3, 2, dtype="float32", repeats=3),
    "wan-1.3b-480p": Preset("wan-1.3b", 60, 104, 3, 7),       # 480x832 video: 1560 tokens per latent frame
    "wan-1.3b-240p-f1": Preset("wan-1.3b", 30, 52, 1, 7),     # 240x416, one latent frame per chunk
    "wan-14b-480p": Preset("wan-14b", 60, 104, 3, 7),
}


@dataclass
class BenchConfig:
    preset: str = "auto"
    device: str | None = None
    batch: int = 1
    chunks: int | None = None
    steps: int | None = None
    dtype: str | None = None
    attention: str = "auto"
    modes: tuple[str, ...] = MODES
    checkpoint: str | None = None
    repeats: int | None = None
    seed: int = 0
    progress: bool = True

    def resolve(self) -> tuple[str, Preset, torch.device, torch.dtype]:
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        name = self.preset if self.preset != "auto" else ("wan-1.3b-480p" if device.type == "cuda" else "tiny")
        if name not in PRESETS:
            raise ConfigError(f"unknown bench preset {name!r}", expected=sorted(PRESETS) + ["auto"], got=name)
        unknown = set(self.modes) - set(MODES)
        if unknown:
            raise ConfigError(f"unknown mode(s) {sorted(unknown)}", expected=MODES)
        p = PRESETS[name]
        dtype = getattr(torch, self.dtype or p.dtype)
        return name, p, device, dtype


@dataclass
class ModeResult:
    first_chunk_ms: float | None = None
    chunk_ms_median: float | None = None
    chunk_ms_p90: float | None = None
    denoise_ms_median: float | None = None
    cache_pass_ms_median: float | None = None
    fps: float | None = None
    host_reads_per_chunk: float | None = None
    graphs: int | None = None
    capture_s: float | None = None
    peak_mem_bytes: int | None = None
    gpu_busy: float | None = None
    max_err_vs_reference: float | None = None
    speedup_vs_reference: float | None = None
    speedup_vs_eager: float | None = None
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    def to_json(self) -> dict:
        if self.skipped:
            return {"skipped": self.skipped}
        d = asdict(self)
        d.pop("skipped")
        if not d["notes"]:
            d.pop("notes")
        return d


class Clock:
    """Time marks: CUDA events on CUDA (no sync between marks), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1000.0


def _percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class Driver:
    """One mode: how to prepare it (capture) and how to stream a video, chunk by chunk."""

    def __init__(self, mode: str, causal: CausalWan, ref: ReferenceWan, schedule: FlowMatchSchedule, batch: int,
                 progress: bool):
        self.mode, self.ref, self.schedule = mode, ref, schedule
        self.engine: Engine | None = None
        self.notes: list[str] = []
        self.mark: Callable | None = None
        if mode == "reference":
            return
        engine_mode = {"eager": "eager", "graphs": "forward", "chunk-graph": "chunk",
                       "graphs+inductor": "forward", "compile": "eager"}[mode]
        model = causal
        if mode == "compile":
            cuda = next(causal.parameters()).is_cuda
            model = torch.compile(causal, mode="reduce-overhead" if cuda else None, dynamic=False)
            self.notes.append(("torch.compile(mode='reduce-overhead')" if cuda else "torch.compile (default mode)")
                              + "; first chunk includes one warm-up video that compiles every shape")
        self.engine = Engine(model, max_sessions=batch, batch_sizes=(batch,), mode=engine_mode, schedule=schedule,
                             inductor=mode == "graphs+inductor", progress=progress)
        self.engine.mark = self._on_mark
        if mode == "compile":  # the cache is state, not input: let cudagraph trees keep its addresses
            cache = self.engine.cache
            for t in (*cache.state().values(), *cache.k, *cache.v, cache.cross_k, cache.cross_v):
                torch._dynamo.mark_static_address(t)

    def context(self):
        """Settings a mode runs under: the peer may recompile once per KV length (as graphrt keeps
        one graph per bucket) and must never fall back to eager silently."""
        if self.mode == "compile":
            return torch._dynamo.config.patch(recompile_limit=64)
        return contextlib.nullcontext()

    def _on_mark(self, name):
        if self.mark is not None:
            self.mark(name)

    def prepare(self, context, chunks, seed):
        """Capture (graph modes) or compile (the peer: one untimed video, so every shape is compiled)."""
        if self.engine is not None:
            self.engine.prewarm()
        if self.mode == "compile":
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


def _host_reads_per_chunk(driver: Driver, context, seed) -> float | None:
    """Host reads of one steady chunk (the second of a video: no session set-up in it)."""
    from graphrt.capture.hostreads import HostReadRecorder

    if driver.mode == "compile":
        driver.notes.append("host reads not counted: the checker's hooks change what torch.compile traces")
        return None
    recorder = HostReadRecorder()
    it = driver.stream(context, 2, seed)
    next(it)
    try:
        with recorder:
            next(it)
    except Exception as e:
        if driver.mode != "graphs+inductor":
            raise
        # on the CPU each replay enters inductor's compiled code, which refuses to run under the hooks
        driver.notes.append(f"replay not countable under the checker ({type(e).__name__}); "
                            "graphrt.check ran on every captured bucket and found 0")
        return 0.0
    finally:
        for _ in it:
            pass
    return float(recorder.report().count)


def _gpu_busy(driver: Driver, context, seed) -> float | None:
    """Kernel time / wall time over one steady chunk, from the profiler (CUDA only)."""
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
    kernel_us = 0.0
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            kernel_us += getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
    if kernel_us == 0:
        driver.notes.append("the profiler saw no kernels (graph replays may be invisible to it)")
        return None
    return kernel_us / 1e6 / wall


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
    totals = [clock.ms(r[2], r[4]) for r in steady]
    res.chunk_ms_median = statistics.median(totals)
    res.chunk_ms_p90 = _percentile(totals, 0.9)
    if all(r[3] is not None for r in steady):
        res.denoise_ms_median = statistics.median(clock.ms(r[2], r[3]) for r in steady)
        res.cache_pass_ms_median = statistics.median(clock.ms(r[3], r[4]) for r in steady)
    else:
        res.notes.append("denoise/cache split not observable: the whole chunk is one replay")
    res.fps = context.shape[0] * chunk_frames * VIDEO_FRAMES_PER_LATENT / (res.chunk_ms_median / 1000.0)
    stats = driver.graph_stats
    if stats is not None:
        res.graphs, res.capture_s = stats.captures, round(stats.capture_seconds, 3)
    elif driver.mode in ("reference", "eager"):
        res.graphs, res.capture_s = 0, 0.0
    if device.type == "cuda":
        res.peak_mem_bytes = torch.cuda.max_memory_allocated()
        try:
            res.gpu_busy = _gpu_busy(driver, context, seed)
        except Exception as e:  # the profiler is optional evidence, not a reason to fail the run
            res.notes.append(f"gpu_busy not measured: {type(e).__name__}: {e}")
    else:
        res.notes.append("peak memory is measured on CUDA only")
    res.host_reads_per_chunk = _host_reads_per_chunk(driver, context, seed)
    if driver.mode == "compile" and device.type == "cuda":
        skips = torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)
        if skips:
            res.notes.append(f"cudagraph trees skipped {skips} graph(s): those ran without CUDA graphs")
    return res, video


def run(cfg: BenchConfig, on_mode: Callable[[str, ModeResult, dict], None] | None = None) -> dict:
    """Run the selected modes on one config and return the JSON summary.

    ``on_mode(mode, result, summary)`` is called after each mode with the summary so far, so a
    caller can save partial results of a run that may be cut short."""
    name, preset, device, dtype = cfg.resolve()
    chunks = cfg.chunks or preset.chunks
    steps = cfg.steps or preset.steps
    repeats = preset.repeats if cfg.repeats is None else cfg.repeats
    wcfg = preset.config(chunks)
    torch.manual_seed(cfg.seed)
    ref = ReferenceWan(wcfg).to(device, dtype).eval()
    if cfg.checkpoint:
        load_checkpoint(ref, cfg.checkpoint)
    causal = CausalWan(wcfg, attention=cfg.attention).to(device, dtype).eval()
    causal.load_state_dict(ref.state_dict(), assign=True)   # one copy of the weights, shared by both models
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
        "preset": name,
        "config": {"model": preset.model, "dim": wcfg.dim, "num_layers": wcfg.num_layers, "num_heads": wcfg.num_heads,
                   "latent": [wcfg.height, wcfg.width], "frame_tokens": wcfg.frame_tokens,
                   "chunk_frames": wcfg.chunk_frames, "chunks": chunks, "steps": steps, "batch": cfg.batch,
                   "dtype": str(dtype).removeprefix("torch."), "attention": attention,
                   "repeats": repeats, "seed": cfg.seed},
        "modes": {},
    }
    results: dict[str, ModeResult] = {}
    videos: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for mode in cfg.modes:
            try:
                driver = Driver(mode, causal, ref, schedule, cfg.batch, cfg.progress)
                with driver.context():
                    results[mode], videos[mode] = measure(driver, context, chunks, repeats, cfg.seed, clock,
                                                          wcfg.chunk_frames, device)
            except Exception as e:
                traceback.print_exc()    # the whole story on stderr; the summary keeps one line
                results[mode] = ModeResult(skipped=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
            driver = None                # free this mode's cache and graphs before the next one
            gc.collect()
            if mode in ("compile", "graphs+inductor"):
                torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            summary["modes"] = _compare(results, videos)
            if on_mode is not None:
                on_mode(mode, results[mode], summary)
    return summary


def _compare(results: dict[str, ModeResult], videos: dict[str, torch.Tensor]) -> dict:
    """Errors against reference and speedups against reference and eager, for the modes run so far."""
    for mode, r in results.items():
        if r.skipped:
            continue
        if "reference" in videos:
            r.max_err_vs_reference = max_rel_err(videos[mode].float(), videos["reference"].float())
        for base, attr in (("reference", "speedup_vs_reference"), ("eager", "speedup_vs_eager")):
            if base in results and not results[base].skipped:
                setattr(r, attr, results[base].chunk_ms_median / r.chunk_ms_median)
    return {m: r.to_json() for m, r in results.items()}

