"""The scheduler: one thread owns the :class:`VideoPipeline` and steps every live session together.

HTTP and WebSocket handlers never touch the Engine: they call :class:`Service` methods, which
either change a session's bookkeeping under one lock (acks, connects) or queue a command for the
worker thread and return a future. Each turn the worker runs the queued commands, suspends the
sessions whose client went away, closes those idle past ``idle_timeout``, and then runs ONE
batched :meth:`VideoPipeline.step` over every session that may make a chunk:

- its stream is connected (or it was just opened: the first chunks are made before the client
  connects, so the first frame is ready when it does),
- it stands at most ``ahead`` chunks past its last acknowledged chunk (a slow reader holds back only
  its own session; its unacknowledged chunks, at most ``ahead``, wait in memory, nothing is dropped),
- its video is not over.

The decode (and the JPEG encoding, on the decode thread) of chunk n overlaps the DiT's chunk n+1;
finished chunks are handed to the event loop with ``call_soon_threadsafe`` and sent in order.
"""
from __future__ import annotations

import concurrent.futures as cf
import io
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from graphrt.errors import CacheError, GraphrtError

log = logging.getLogger("graphrt.serve")


def encode_jpeg(frame: torch.Tensor, quality: int) -> bytes:
    """One uint8 ``[H, W, 3]`` frame as JPEG bytes (Pillow, fixed settings: the same frame gives the
    same bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    frame = frame.numpy()       # host-read-ok: a decoded frame, already on the host, encoded for the client
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class Chunk:
    """One chunk as the stream sends it: its header fields and the JPEG frames."""

    index: int
    prompt: str
    frames: list[bytes]
    timing: dict


@dataclass
class ServeSession:
    """A client's video: bookkeeping shared by the worker (under :attr:`Service.lock`) and the
    stream handler. ``id`` is unguessable (128 random bits) and is only ever told to its creator."""

    id: str
    prompt: str
    seed: int
    num_chunks: int | None
    created: float
    engine: object = None                # the pipeline's Session (worker thread only)
    made: int = 0                        # chunks stepped
    acked: int = -1                      # last acknowledged chunk index
    ready: dict = field(default_factory=dict)   # index -> Chunk, kept until acknowledged
    status: str = "starting"             # starting (no stream yet), streaming, disconnected, suspended, ended
    end_reason: str | None = None
    connected: bool = False
    last_seen: float = 0.0
    pending_prompt: str | None = None
    first_frame: float | None = None
    wake: Callable[[], None] | None = None   # set by the stream handler: wakes its sender
    decodes: list = field(default_factory=list)   # its queued decode futures (worker thread)

    @property
    def finished_making(self) -> bool:
        return self.end_reason is not None or (self.num_chunks is not None and self.made >= self.num_chunks)

    def state(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "seed": self.seed, "num_chunks": self.num_chunks,
                "status": self.status, "chunks_made": self.made, "chunks_delivered": self.acked + 1,
                "end_reason": self.end_reason}


class Full(Exception):
    """Every session slot is taken."""


class Service:
    """Owns the pipeline on one worker thread; see the module docstring. ``prewarm`` captures the
    graphs on the worker before :attr:`ready` turns true."""

    def __init__(self, pipe, *, ahead: int = 2, idle_timeout: float = 30.0, jpeg_quality: int = 85,
                 max_sessions: int | None = None, prewarm: bool = True, metrics=None, fps: float = 16.0):
        self.pipe, self.ahead, self.idle_timeout, self.quality = pipe, ahead, idle_timeout, jpeg_quality
        self.max_sessions = max_sessions or pipe.engine.cache.num_slabs
        self.metrics, self.fps = metrics, fps
        self.sessions: dict[str, ServeSession] = {}
        self.lock = threading.Lock()
        self.ready = False
        self.stopping = False
        self.error: BaseException | None = None
        self._commands: queue.Queue = queue.Queue()
        self._wakeup = threading.Event()
        self._prewarm = prewarm
        self.loop = None                 # the event loop that receives chunks (set by start())
        self._thread = threading.Thread(target=self._run, name="graphrt-serve", daemon=True)
        cfg = pipe.engine.cfg
        self.first_frames = self.chunk_frames = None   # pixel frames per chunk (first, then steady): warm-up
        self.shape = (cfg.height, cfg.width)           # latent size until the warm-up decodes frames

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, loop) -> None:
        self.loop = loop
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the chunk in flight and stop the worker; every session ends with reason "shutdown"."""
        self.stopping = True
        self._wakeup.set()
        self._thread.join(timeout)

    def app_streams(self) -> int:
        """Streams attached now (the app replaces this with its own count)."""
        return sum(s.connected for s in list(self.sessions.values()))

    # -- called from the event loop (never touch the engine) ------------------------------------
    def submit(self, fn: Callable) -> cf.Future:
        """Run ``fn()`` on the worker thread between steps; returns its future."""
        fut: cf.Future = cf.Future()
        if self.stopping:
            fut.set_exception(CacheError("the server is shutting down"))
            return fut
        self._commands.put((fn, fut))
        self._wakeup.set()
        return fut

    def open(self, prompt: str, seed: int, num_chunks: int | None) -> cf.Future:
        with self.lock:
            if len(self.sessions) >= self.max_sessions:
                raise Full()
            s = ServeSession(secrets.token_urlsafe(16), prompt, seed, num_chunks, time.monotonic())
            s.last_seen = s.created
            self.sessions[s.id] = s       # holds the slot until the worker has opened it (or failed)

        def do():
            try:
                s.engine = self.pipe.open(prompt, seed=seed, num_chunks=num_chunks)
            except BaseException:
                with self.lock:
                    self.sessions.pop(s.id, None)
                raise
            return s
        return self.submit(do)

    def get(self, sid: str) -> ServeSession | None:
        with self.lock:
            return self.sessions.get(sid)

    def delete(self, sid: str) -> cf.Future:
        return self.submit(lambda: self._end(self.sessions.get(sid), "deleted"))

    def ack(self, s: ServeSession, index: int) -> None:
        with self.lock:
            if index > s.acked:
                for i in range(s.acked + 1, index + 1):
                    s.ready.pop(i, None)
                s.acked = index
        self._wakeup.set()

    def connect(self, s: ServeSession, wake: Callable[[], None]) -> bool:
        """The stream handler attaches; False when another stream holds the session."""
        with self.lock:
            if s.connected:
                return False
            s.connected, s.wake, s.status = True, wake, "streaming"
        self._wakeup.set()
        return True

    def disconnect(self, s: ServeSession) -> None:
        with self.lock:
            s.connected, s.wake, s.last_seen = False, None, time.monotonic()
            if s.status != "ended":
                s.status = "disconnected"     # the worker suspends it to host memory ("suspended")
        self._wakeup.set()

    def set_prompt(self, s: ServeSession, prompt: str) -> cf.Future:
        """Switch the prompt from the next chunk made (the pipeline's ``set_prompt``)."""
        def do():
            if not hasattr(self.pipe, "set_prompt"):
                raise GraphrtError("this pipeline cannot change a session's prompt (VideoPipeline.set_prompt)")
            if s.engine is None:
                raise GraphrtError("this session has made all its chunks: no later chunk takes a new prompt")
            self.pipe.set_prompt(s.engine, prompt)
            s.prompt = prompt
        return self.submit(do)

    def stop_session(self, s: ServeSession) -> cf.Future:
        return self.submit(lambda: self._end(s, "stopped"))

    def pending(self, s: ServeSession, next_index: int) -> tuple[Chunk | None, str | None]:
        """What the sender may send now: chunk ``next_index`` once made (chunks made before an end
        are still sent), else the end reason once no further chunk will come, else nothing yet."""
        with self.lock:
            chunk = s.ready.get(next_index)
            if chunk is not None:
                return chunk, None
            if s.end_reason is not None:
                return None, s.end_reason
            if s.num_chunks is not None and next_index >= s.num_chunks:
                return None, "done"
            return None, None

    def finish(self, s: ServeSession, reason: str) -> cf.Future:
        """The stream sent ``end``: free the slot."""
        return self.submit(lambda: self._end(s, reason))

    # -- worker thread --------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            if self._prewarm:
                self.pipe.prewarm()
            self._warm_up()
            self.ready = True
            while not self.stopping:
                self._wakeup.clear()          # before looking: a wake-up set from here on is seen
                self._commands_now()
                self._housekeeping()
                if not self._step():
                    idle = getattr(self.pipe, "idle", None)     # ranks.Leader: a heartbeat to the followers
                    if idle is not None:
                        idle()
                    self._wakeup.wait(0.5)
        except BaseException as e:          # noqa: BLE001 - reported by /healthz and the log
            self.error = e
            log.exception("the serve worker stopped")
        finally:
            self.pipe.queue.drain()
            self._commands_now()
            for s in list(self.sessions.values()):
                self._end(s, "shutdown" if self.error is None else "error")
            with self.lock:
                while not self._commands.empty():
                    self._commands.get()[1].set_exception(CacheError("the server is shutting down"))
            self.ready = False

    def _warm_up(self) -> None:
        """One short video before serving: every chunk shape runs once, and the frame counts and
        size the stream advertises are the decoder's own."""
        limit = min(2, self.pipe.engine.cfg.num_chunks)
        chunks = list(self.pipe.stream("warm up", num_chunks=limit, seed=0))
        self.first_frames, self.shape = int(chunks[0].shape[0]), tuple(chunks[0].shape[1:3])
        self.chunk_frames = int(chunks[-1].shape[0])

    def _commands_now(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)

    def _end(self, s: ServeSession | None, reason: str) -> bool:
        """Close the engine session (slab freed) and drop the slot; the stream sends ``end``."""
        if s is None:
            return False
        with self.lock:
            if self.sessions.pop(s.id, None) is None:
                return False
            s.end_reason = s.end_reason or reason
            s.status = "ended"
        for fut in s.decodes:             # decodes nobody will watch: dropped unless already running
            fut.cancel()
        s.decodes.clear()
        if s.engine is not None:
            self.pipe.close(s.engine)
            s.engine = None
        self._notify(s)
        return True

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for s in list(self.sessions.values()):
            if not s.connected and now - s.last_seen > self.idle_timeout:
                self._end(s, "idle")          # never connected, or gone for idle_timeout seconds
                continue
            e = s.engine
            if e is None:
                continue
            if e.done:                        # every chunk made: the slab is free, the chunks wait to be sent
                self.pipe.close(e)
                s.engine = None
            elif not s.connected and s.status != "starting" and not e.suspended:
                self.pipe.engine.suspend(e)   # the client went away: its K/V wait in host memory
                s.status = "suspended"
            elif s.connected and e.suspended:
                self.pipe.engine.resume(e)
        if self.metrics is not None:
            self.metrics.observe(self)

    def _runnable(self, s: ServeSession) -> bool:
        e = s.engine
        if e is None or e.suspended or e.done or s.end_reason is not None:
            return False
        if not s.connected and s.status != "starting":
            return False
        return s.made < s.acked + 1 + self.ahead

    def _step(self) -> bool:
        with self.lock:
            run = [s for s in self.sessions.values() if self._runnable(s)]
        ended = [s for s in run if self.pipe.engine.at_end(s.engine)]
        for s in ended:
            s.end_reason = "limit"        # an open-ended video filled a static cache
            self._notify(s)
        run = [s for s in run if s not in ended]
        if not run:
            return False
        t0 = time.monotonic()
        futures = self.pipe.step([s.engine for s in run])
        t_dit = time.monotonic() - t0
        if self.metrics is not None:
            self.metrics.batch.observe(len(run))
        for s in run:
            index, prompt = s.made, s.prompt
            s.made += 1
            fut = futures[s.engine]
            s.decodes = [f for f in s.decodes if not f.done()] + [fut]
            fut.add_done_callback(
                lambda f, s=s, i=index, p=prompt: self._decoded(s, i, p, f, t0, t_dit, len(run)))
        return True

    def _decoded(self, s: ServeSession, index: int, prompt: str, fut: cf.Future, t0: float, t_dit: float,
                 batch: int) -> None:
        """On the decode thread: JPEG-encode the chunk and hand it to the stream."""
        if fut.cancelled():                   # the session ended first
            return
        try:
            frames = fut.result()
        except BaseException as e:          # noqa: BLE001 - the session ends; the others go on
            log.exception("decoding chunk %d of session failed", index)
            s.end_reason = f"error: {e}"
            self._notify(s)
            return
        jpegs = [encode_jpeg(f, self.quality) for f in frames]
        latency = time.monotonic() - t0
        chunk = Chunk(index, prompt, jpegs, {"dit_s": round(t_dit, 4), "chunk_s": round(latency, 4),
                                             "batch": batch})
        with self.lock:
            if index > s.acked:
                s.ready[index] = chunk
        if self.metrics is not None:
            self.metrics.chunk_latency.observe(latency)
        self._notify(s)

    def _notify(self, s: ServeSession) -> None:
        wake = s.wake
        if wake is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(wake)
