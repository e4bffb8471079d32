"""Every clock read of the bench happens here: :class:`Clock` marks (CUDA events on CUDA; wall and
thread CPU time on the CPU), :func:`time_fn` (the median of a callable's run time), the wall and
process-CPU clocks of the end-to-end bench, and the statistics and warnings every bench derives
from the samples (percentiles, spread of per-video medians, noisy and busy-machine warnings),
with the torch thread count and the load average they are read under."""
from __future__ import annotations

import contextlib
import os
import statistics
import time

import torch

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


def percentile(xs, q):
    """The ``q`` quantile of ``xs`` (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def spread(values, groups) -> list[float]:
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


def noisy_warning(p90: float, median: float, samples: int, unit: str) -> str | None:
    """A warning when the p90 of ``samples`` ``unit`` s is far above their median (not one distribution)."""
    ratio = p90 / median
    if ratio > NOISY_P90:
        return (f"p90 is {ratio:.1f}x the median over {samples} {unit}: noisy timings "
                "(another process, or more threads than free cores?)")
    return None


def busy_warning(wall_ms: float, cpu_ms: float, advice: str = "") -> str | None:
    """A warning when, at one torch thread, wall time is far above the CPU time: the process
    waited for a core."""
    busy = wall_ms / max(cpu_ms, 1e-9)
    if torch.get_num_threads() == 1 and busy > BUSY_WALL_OVER_CPU:
        return f"wall time is {busy:.1f}x the CPU time: the process waited for a core (the machine is busy){advice}"
    return None


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def wall() -> float:
    """Wall seconds (``time.perf_counter``)."""
    return time.perf_counter()


def process_cpu() -> float:
    """CPU seconds of the whole process, every thread (``time.process_time``)."""
    return time.process_time()


def time_fn(fn, iters: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls after one untimed call: CUDA events
    around each call on CUDA, wall time on the CPU."""
    fn()
    times = []
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with ``n`` torch threads (None: as they are), then put the count back."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
