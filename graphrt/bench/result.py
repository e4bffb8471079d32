"""One mode's result (:class:`ModeResult`) and what is derived from the results: the steady-state
statistics of a mode's chunk times, errors and speedups between modes, and the goal (graphrt's
fastest graph mode against the strongest ``torch.compile`` peer)."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from graphrt.bench.output import result_json
from graphrt.bench.presets import FP8_SUFFIX, GRAPH_MODES, PEERS
from graphrt.bench.timing import Clock, busy_warning, noisy_warning, percentile, spread
from graphrt.tolerance import max_rel_err, rms_rel_err


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
    chunk6_ms: float | None = None               # the 6th chunk (the published comparison point), median
    chunk6_cpu_ms: float | None = None           # the same in thread CPU time (CPU runs)
    kernel_path: str | None = None               # "aten" or "fused": the model's kernel_path in this mode
    fused_ops: str | None = None                 # fused modes: "triton", "triton interpreter" or "aten reference"
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
    attention_kernel: str | None = None          # graphrt.attention.kernel_name at the comparison chunk's shapes
    max_err_vs_bf16: float | None = None         # a "<mode>:fp8" row against "<mode>" (linears in the model dtype)
    rms_err_vs_bf16: float | None = None
    speedup_vs_reference: float | None = None
    speedup_vs_eager: float | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)   # numbers not to trust as they stand
    skipped: str | None = None

    def to_json(self) -> dict:
        return result_json(self, optional=("max_err_vs_unquantized", "rms_err_vs_unquantized", "kernels", "fused_ops",
                                           "max_err_vs_bf16", "rms_err_vs_bf16"))


def steady_times(res: ModeResult, clock: Clock, steady: list, videos: list | None = None) -> None:
    """Median and p90 of the steady chunks (marks ``(start, denoised, end)``), CPU time next to
    wall time on the CPU, the spread of the per-video medians (``videos[i]``: the video chunk
    ``i`` belongs to), and a warning when the numbers say the machine was busy."""
    videos = videos if videos is not None else [0] * len(steady)
    totals = [clock.ms(start, end) for start, _, end in steady]
    res.steady_chunks = len(totals)
    res.chunk_ms_median = statistics.median(totals)
    res.chunk_ms_p90 = percentile(totals, 0.9)
    res.chunk_ms_spread = spread(totals, videos)
    if all(mid is not None for _, mid, _ in steady):
        res.denoise_ms_median = statistics.median(clock.ms(start, mid) for start, mid, _ in steady)
        res.cache_pass_ms_median = statistics.median(clock.ms(mid, end) for _, mid, end in steady)
    else:
        res.notes.append("denoise/cache split not observable: the whole chunk is one replay")
    noisy = noisy_warning(res.chunk_ms_p90, res.chunk_ms_median, len(totals), "chunks")
    if noisy:
        res.warnings.append(noisy)
    if not clock.cuda:
        cpu = [clock.cpu_ms(start, end) for start, _, end in steady]
        res.chunk_cpu_ms_median = statistics.median(cpu)
        res.chunk_cpu_ms_p90 = percentile(cpu, 0.9)
        res.chunk_cpu_ms_spread = spread(cpu, videos)
        busy = busy_warning(res.chunk_ms_median, res.chunk_cpu_ms_median)
        if busy:
            res.warnings.append(busy)


def chunk_time(r: ModeResult) -> float:
    """The steady chunk time speedups compare: thread CPU time on the CPU, wall (events) on CUDA."""
    return r.chunk_cpu_ms_median if r.chunk_cpu_ms_median is not None else r.chunk_ms_median


def compare(results: dict[str, ModeResult], videos: dict[str, torch.Tensor]) -> dict:
    """Errors against reference (and the unquantized run) and speedups, for the modes run so far."""
    for mode, r in results.items():
        if r.skipped:
            continue
        if "reference" in videos:
            r.max_err_vs_reference = max_rel_err(videos[mode].float(), videos["reference"].float())
        base8 = mode.removesuffix(FP8_SUFFIX)
        if base8 != mode and base8 in videos:
            r.max_err_vs_bf16 = max_rel_err(videos[mode].float(), videos[base8].float())
            r.rms_err_vs_bf16 = rms_rel_err(videos[mode].float(), videos[base8].float())
        if "unquantized" in videos and mode != "reference":
            r.max_err_vs_unquantized = max_rel_err(videos[mode].float(), videos["unquantized"].float())
            r.rms_err_vs_unquantized = rms_rel_err(videos[mode].float(), videos["unquantized"].float())
        for base, attr in (("reference", "speedup_vs_reference"), ("eager", "speedup_vs_eager")):
            if base in results and not results[base].skipped:
                setattr(r, attr, chunk_time(results[base]) / chunk_time(r))
    return {m: r.to_json() for m, r in results.items()}


def goal_summary(results: dict[str, ModeResult]) -> dict | None:
    """graphrt's fastest graph mode against the strongest torch.compile peer (the clock of
    ``summary["clocks"]["speedups"]``): ``ratio`` > 1 means graphrt is faster."""
    ran = {m: r for m, r in results.items() if not r.skipped}
    graphs = [m for m in GRAPH_MODES if m in ran]
    peers = [m for m in PEERS if m in ran]
    if not graphs or not peers:
        return None
    best = min(graphs, key=lambda m: chunk_time(ran[m]))
    peer = min(peers, key=lambda m: chunk_time(ran[m]))
    return {"best_graph_mode": best, "strongest_peer": peer, "ratio": chunk_time(ran[peer]) / chunk_time(ran[best]),
            "best_ms": chunk_time(ran[best]), "peer_ms": chunk_time(ran[peer]), "target": 1.2}
