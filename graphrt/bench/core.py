"""The measurements behind ``python -m graphrt.bench``: every mode on one config, side by side.

This module runs them (:func:`run`, :func:`measure`, :func:`head_to_head`); the modes, presets and
settings live in :mod:`~graphrt.bench.presets`, one mode's set-up in :mod:`~graphrt.bench.driver`,
the clocks in :mod:`~graphrt.bench.timing`, results and comparisons in :mod:`~graphrt.bench.result`,
the CUDA profiler's kernel table in :mod:`~graphrt.bench.profile`.

Modes (all on the same weights, text context and seeds):

- ``reference``: ``ReferenceWan``, eager, with its host reads (the "before" picture);
- ``eager``: the graph-safe ``CausalWan``, eager;
- ``graphs``: one graph per DiT forward per bucket (CUDA graphs; the CPU emulation on the CPU);
- ``chunk-graph``: one graph per whole chunk (denoising forwards, scheduler, noise, cache pass);
- ``graphs+fused``, ``chunk-graph+fused``: the GPU default path, ``graphs+inductor`` and
  ``chunk-graph+inductor`` on the model built with ``kernels="fused"`` (graphrt's fused custom ops
  between inductor's kernels; every other mode uses ``kernels="aten"``, like for like on the same
  weights). On CUDA the fused ops run their Triton kernels; on the CPU inductor traces each one as
  its aten reference and fuses it itself (each mode's ``fused_ops`` says which), so the default mode
  list has them on CUDA only;
- ``graphs+inductor``: ``graphs`` with each bucket compiled by inductor before capture;
- ``chunk-graph+inductor``: ``chunk-graph`` with each whole chunk compiled by inductor: on the
  CPU one AOTInductor package per bucket (no Python between kernels), kept in a disk cache; on
  CUDA inductor's kernels captured in graphrt's CUDA graph;
- ``compile``: a peer, ``torch.compile`` of the graph-safe model, one compile per forward
  (``mode="reduce-overhead"`` on CUDA; on the CPU with inductor's C++ wrapper, its faster one);
- ``compile-chunk``: a peer, ``torch.compile`` of the whole chunk function (the same settings).

Both peers are what a strong user would write; graphrt's graph modes are measured against the
faster of the two (``summary["goal"]``).

Per mode: its kernel path (``kernel_path``), first-chunk latency (capture/compile included), steady
per-chunk latency (median and p90) split into the denoising forwards and the cache pass where the
mode exposes the boundary, the 6th chunk's (``chunk6_ms``: KV 18 latent frames at 480p, the
published comparison point; the chunk profiled on CUDA), on the CPU the thread CPU time per chunk
next to the wall time, the spread of the per-video
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
import traceback
from datetime import datetime, timezone
from typing import Callable

import torch

from graphrt.bench.attention import kv_cache_costs
from graphrt.bench.driver import Driver, host_reads_per_chunk
from graphrt.attention import kernel_name
from graphrt.bench.output import one_line
from graphrt.bench.presets import (COMPARISON_CHUNK, FP8_SUFFIX, INDUCTOR_MODES, MODES, PEERS, PRESETS,
                                   VIDEO_FRAMES_PER_LATENT, BenchConfig, Preset)
from graphrt.bench.profile import profile_chunk
from graphrt.bench.result import ModeResult, compare, goal_summary, steady_times
from graphrt.bench.timing import Clock, clocks, load_average, torch_threads
from graphrt.errors import ConfigError, GraphrtError
from graphrt.kv import StaticKVCache, resolve_kv_dtype
from graphrt.models.wan import CausalWan, ReferenceWan, WanConfig, load_checkpoint
from graphrt.parallel import init_distributed, sequence_parallel
from graphrt.pipeline import FlowMatchSchedule
from graphrt.quant import quantize

__all__ = ["MODES", "PRESETS", "BenchConfig", "ModeResult", "head_to_head", "measure", "run"]


def measure(driver: Driver, context, chunks: int, repeats: int, seed: int, clock: Clock, chunk_frames: int,
            device: torch.device) -> tuple[ModeResult, torch.Tensor]:
    res = ModeResult(notes=driver.notes, kernel_path=driver.kernel_path, fused_ops=driver.fused_ops)
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
    steady_times(res, clock, [r[2:] for r in steady], [r[0] for r in steady])
    # per chunk index (the KV length grows with it), over the videos after the first
    by_index = [[r for r in rows if r[1] == c and (r[0] > 0 or repeats == 0)] for c in range(chunks)]
    res.chunk_ms_by_index = [statistics.median(clock.ms(r[2], r[4]) for r in rs) for rs in by_index]
    if not clock.cuda:
        res.chunk_cpu_ms_by_index = [statistics.median(clock.cpu_ms(r[2], r[4]) for r in rs) for rs in by_index]
    if chunks >= COMPARISON_CHUNK:
        res.chunk6_ms = res.chunk_ms_by_index[COMPARISON_CHUNK - 1]
        if res.chunk_cpu_ms_by_index is not None:
            res.chunk6_cpu_ms = res.chunk_cpu_ms_by_index[COMPARISON_CHUNK - 1]
    res.fps = context.shape[0] * chunk_frames * VIDEO_FRAMES_PER_LATENT / (res.chunk_ms_median / 1000.0)
    stats = driver.graph_stats
    if stats is not None:
        res.graphs, res.capture_s = stats.captures, round(stats.capture_seconds, 3)
    elif driver.mode in ("reference", "eager"):
        res.graphs, res.capture_s = 0, 0.0
    if device.type == "cuda":
        res.peak_mem_bytes = torch.cuda.max_memory_allocated()
        try:
            res.gpu_busy, res.kernels = profile_chunk(driver, context, seed, min(chunks, COMPARISON_CHUNK))
            if res.kernels is not None:
                att = ", ".join(f"{f} {a['ms']:.1f} ms ({100 * a['share']:.0f}%)"
                                for f, a in res.kernels["attention"].items()) or "none recognised (see kernels.top)"
                res.notes.append(f"attention kernels in chunk {res.kernels['chunk']}: {att}")
        except Exception as e:  # the profiler is optional evidence, not a reason to fail the run
            res.notes.append(f"gpu_busy not measured: {type(e).__name__}: {e}")
    else:
        res.notes.append("peak memory is measured on CUDA only")
    res.host_reads_per_chunk, res.uploads_per_chunk = host_reads_per_chunk(driver, context, seed, chunks) \
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
    cfg = cfg.with_modes()
    name, preset, device, dtype = cfg.resolve()
    threads = cfg.threads if cfg.threads is not None else (1 if device.type == "cpu" else None)
    with torch_threads(threads), contextlib.ExitStack() as stack:
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
    # today's modes run kernels="aten"; the fused modes a twin of this model (driver.with_kernels)
    causal = CausalWan(wcfg, attention=cfg.attention, kernels="aten").to(device, dtype).eval()
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
        "load_avg": {"cpus": os.cpu_count(), "start": load_average(), "end": None},   # 1, 5, 15 minutes
        "preset": name,
        "config": {"model": preset.model, "dim": wcfg.dim, "num_layers": wcfg.num_layers, "num_heads": wcfg.num_heads,
                   "latent": [wcfg.height, wcfg.width], "frame_tokens": wcfg.frame_tokens,
                   "chunk_frames": wcfg.chunk_frames, "chunks": chunks, "steps": steps, "batch": cfg.batch,
                   "dtype": str(dtype).removeprefix("torch."), "attention": attention,
                   "repeats": repeats, "seed": cfg.seed, "sp": cfg.sp, "kv_buckets": cfg.kv_buckets,
                   "kv_bytes_per_rank": _kv_bytes(causal, cfg.batch, cfg.kv_dtype)},
        "comparison_point": comparison_point(wcfg, chunks),
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
        causal8 = _fp8_model(causal, ref, wcfg, cfg, device, dtype) if cfg.linear_dtype == "fp8" else None
        for mode in cfg.rows:        # with fp8: each mode beside its fp8 run, on the same preset and video
            how = mode.removesuffix(FP8_SUFFIX)
            model, linear_dtype = (causal8, "fp8") if how != mode else (causal, None)
            try:
                driver = Driver(how, model, ref, schedule, cfg, None if how == "reference" else cfg.kv_dtype,
                                linear_dtype=linear_dtype)
                with driver.context():
                    results[mode], videos[mode] = measure(driver, context, chunks, repeats, cfg.seed, clock,
                                                          wcfg.chunk_frames, device)
                results[mode].attention_kernel = attention_kernel(driver, model, wcfg, cfg.batch, chunks)
            except Exception as e:
                traceback.print_exc()    # the whole story on stderr; the summary keeps one line
                results[mode] = ModeResult(skipped=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
            driver = None                # free this mode's cache and graphs before the next one
            gc.collect()
            if how in PEERS + INDUCTOR_MODES:
                torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            summary["modes"] = compare(results, videos)
            summary["goal"] = goal_summary(results)
            summary["load_avg"]["end"] = load_average()
            if on_mode is not None:
                on_mode(mode, results[mode], summary)
        target = summary["goal"]
        if target is not None and device.type == "cpu" and cfg.head_to_head:
            pair = (target["best_graph_mode"], target["strongest_peer"])
            try:
                target["head_to_head"] = head_to_head(pair, causal, ref, schedule, cfg, context, chunks,
                                                    max(repeats, 1), clock)
            except Exception as e:
                traceback.print_exc()
                target["head_to_head"] = {"skipped": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"}
            summary["load_avg"]["end"] = load_average()
    return summary


def comparison_point(wcfg: WanConfig, chunks: int) -> dict:
    """The published comparison point: the 6th chunk of a video, whose KV holds 6 chunks of
    latent frames (18 at 480p, 3 per chunk). Each mode's ``chunk6_ms`` is its median there
    (None when a video has fewer chunks)."""
    return {"chunk": COMPARISON_CHUNK, "kv_frames": COMPARISON_CHUNK * wcfg.chunk_frames,
            "measured": chunks >= COMPARISON_CHUNK,
            "what": "the published comparison point (Wan 1.3B, 480p, one H100: 418 ms for the fastest published "
                    "system, 4 steps + the clean KV pass; 541 ms for the official code with compile and cuDNN)"}


def attention_kernel(driver: Driver, causal: CausalWan, wcfg: WanConfig, batch: int, chunks: int) -> str | None:
    """The attention kernel a mode runs at the comparison chunk's shapes
    (:func:`graphrt.attention.kernel_name`: one chunk of queries against its KV length, masked
    under ``kv_buckets="max"``); the reference runs SDPA's own choice."""
    tokens = wcfg.chunk_frames * wcfg.frame_tokens
    kv_len = min(min(COMPARISON_CHUNK, chunks) * wcfg.chunk_frames, wcfg.max_frames) * wcfg.frame_tokens
    masked = driver.engine is not None and driver.engine.kv_buckets == "max"
    p = causal.patch_embedding.weight
    try:
        return kernel_name("sdpa" if driver.mode == "reference" else causal.attention, p.device, p.dtype,
                           q_shape=(batch, tokens, causal.kv_heads, wcfg.head_dim), kv_len=kv_len, masked=masked)
    except GraphrtError as e:
        return f"unavailable: {one_line(e)}"


def _fp8_model(causal: CausalWan, ref: ReferenceWan, wcfg: WanConfig, cfg: BenchConfig, device, dtype) -> CausalWan:
    """A CausalWan on the same weights (shared, not copied) with its linears quantized to fp8."""
    with torch.device("meta"):
        model = CausalWan(wcfg, attention=cfg.attention)
    model.load_state_dict(ref.state_dict(), assign=True)
    model.rope_tables(device)
    model.eval()
    if cfg.sp > 1:
        sequence_parallel(model)
    quantize(model, "fp8")
    return model


def _kv_summary(wcfg: WanConfig, cfg: BenchConfig, dtype: torch.dtype, device: torch.device, steps: int,
                heads: int) -> dict:
    """Bytes per session, plain and quantized, and the cache's write/read cost per layer, for a
    cache of ``heads`` self-attention heads (H/N on each of N sequence-parallel ranks)."""
    def per_session(kv_dtype):
        return StaticKVCache.for_config(wcfg, dtype=dtype, kv_dtype=kv_dtype, num_heads=heads,
                                        device="meta").memory().per_session     # the K/V alone

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
        return StaticKVCache.for_model(causal, num_slabs=batch, kv_dtype=kv_dtype, device="meta",
                                       keep_latents=True).memory().total      # the Engine keeps clean latents
    except GraphrtError:
        return None


def head_to_head(pair: tuple[str, str], causal, ref, schedule, cfg: BenchConfig, context, chunks: int, videos: int,
                 clock: Clock) -> dict:
    """Two modes again, one video each in turn (A B A B ...), thread CPU time per steady chunk.

    Modes measured one after the other meet different loads: on a shared machine another
    process's memory traffic slows a memory-bound chunk's CPU time too (how much:
    ``bench/results/design-numbers.md``). In turn, both meet the same load; the goal's ratio
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
