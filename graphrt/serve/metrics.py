"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""
from __future__ import annotations

import time

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Sessions open and streaming, chunks and frames sent, chunk latency and time to first frame,
    batch sizes stepped, queue depth (chunks made and not yet acknowledged), device memory."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.sessions_open = Gauge("graphrt_sessions_open", "sessions holding a slot", registry=r)
        self.sessions_streaming = Gauge("graphrt_sessions_streaming", "sessions with a stream attached", registry=r)
        self.chunks_sent = Counter("graphrt_chunks_sent", "chunks sent whole to clients", registry=r)
        self.frames_sent = Counter("graphrt_frames_sent", "JPEG frames sent to clients", registry=r)
        self.chunk_latency = Histogram("graphrt_chunk_latency_seconds", "from the batched DiT step to the "
                                       "chunk's JPEG frames ready", buckets=_LATENCY, registry=r)
        self.first_frame = Histogram("graphrt_time_to_first_frame_seconds", "from POST /v1/sessions to the "
                                     "first frame sent", buckets=_LATENCY, registry=r)
        self.batch = Histogram("graphrt_batch_size", "sessions per batched step",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.queue_depth = Gauge("graphrt_queue_depth", "chunks made and not yet acknowledged, all sessions",
                                 registry=r)
        self.device_memory = Gauge("graphrt_device_memory_bytes", "device bytes allocated (CUDA; on the "
                                   "CPU the Engine's weights + K/V + prompt cache)", registry=r)
        self._memory_at = float("-inf")

    def observe(self, service) -> None:
        """Refresh the gauges from the service's sessions (worker thread)."""
        with service.lock:
            sessions = list(service.sessions.values())
            depth = sum(s.made - s.acked - 1 for s in sessions)
        self.sessions_open.set(len(sessions))
        self.sessions_streaming.set(sum(s.connected for s in sessions))
        self.queue_depth.set(max(depth, 0))
        now = time.monotonic()
        if now - self._memory_at > 1.0:        # the Engine's report walks every weight: once a second
            self._memory_at = now
            engine = service.pipe.engine
            if engine.device.type == "cuda":
                self.device_memory.set(torch.cuda.memory_allocated(engine.device))
            else:
                m = engine.memory()
                self.device_memory.set(m.weights + m.kv.total + m.prompt_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
