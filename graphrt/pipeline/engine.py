"""Chunked video generation for causal DiTs, a persistent engine, and multi-session batching.

A chunk is N denoising forwards of a few-step flow-matching schedule (predict the flow, step to
x0, re-noise to the next timestep) and then one clean-context forward that writes the chunk's
K/V into the cache. :class:`Engine` keeps a model, its cache and its captured graphs across
videos and batches the active sessions into the next batch bucket each step.

Graph granularity (``mode``):

- ``"eager"``: the graph-safe forward, no graphs.
- ``"forward"``: one graph per DiT forward per bucket; scheduler arithmetic runs eagerly.
- ``"chunk"``: one graph per whole chunk: every denoising forward, the scheduler arithmetic,
  the noise, the cache pass and the position update in one replay.

All three run the same chunk function, so they agree bit for bit on one device.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

import graphrt
from graphrt.capture.buckets import Buckets
from graphrt.errors import CacheError, InputError
from graphrt.kv import RollingKVCache, StaticKVCache
from graphrt.pipeline.schedule import FlowMatchSchedule, denoise_chunk

MODES = ("eager", "forward", "chunk")


@dataclass
class Session:
    """One video being generated: its slab, seed, prompt and progress (host-side bookkeeping)."""

    id: int
    slab: int
    seed: int
    num_chunks: int | None
    chunk: int = 0                       # chunks done

    @property
    def done(self) -> bool:
        return self.num_chunks is not None and self.chunk >= self.num_chunks


@dataclass
class EngineStats:
    chunks: int = 0                      # session-chunks produced
    steps: int = 0                       # engine steps (batched chunk rounds)
    dispatches: int = 0                  # host calls into graphs or eager chunk functions
    prompt_hits: int = 0
    prompt_misses: int = 0
    rows_padded: int = 0


class Engine:
    """A persistent causal-DiT generator: one cache, graphs captured once, many videos.

    >>> engine = Engine(model, max_sessions=4, batch_sizes=(1, 2, 4), mode="chunk").prewarm()
    >>> video = engine.generate(context, num_chunks=7, seed=0)          # [1, C, F, H, W]
    >>> a = engine.open(ctx_a, seed=1, prompt="a cat"); b = engine.open(ctx_b, seed=2)
    >>> outs = engine.step()                                           # one chunk each, batched

    ``window=(frames, sink_frames)`` uses a :class:`RollingKVCache` for videos past
    ``max_frames``. ``backend``/``inductor``/``verify`` are passed to :func:`graphrt.compile`.
    """

    def __init__(self, model, *, max_sessions: int = 1, batch_sizes: Sequence[int] | None = None,
                 mode: str = "chunk", schedule: FlowMatchSchedule | None = None, window: tuple[int, int] | None = None,
                 backend: str = "auto", inductor: bool = False, verify: int = 0, progress: bool = True):
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}", expected=MODES, got=mode)
        cfg = self.cfg = model.cfg
        self.model, self.mode = model, mode
        self.schedule = schedule or FlowMatchSchedule()
        self.batch_sizes = tuple(sorted(batch_sizes or _powers_of_two(max_sessions)))
        if self.batch_sizes[-1] < 1 or max_sessions < 1:
            raise InputError("max_sessions and batch sizes must be >= 1", got=(max_sessions, self.batch_sizes))
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        kw = dict(num_slabs=max_sessions, max_batch=self.batch_sizes[-1])
        if window is not None and window[0] - window[1] < cfg.chunk_frames:
            raise CacheError(f"window={window}: the ring (window minus sink frames) must hold a whole chunk "
                             f"of {cfg.chunk_frames} frames", fix="use a larger window or a smaller sink")
        if window is None:
            self.cache = StaticKVCache.for_model(model, **kw)
        else:
            self.cache = RollingKVCache.for_model(model, window_frames=window[0], sink_frames=window[1], **kw)
        self.shape = (cfg.out_dim, cfg.chunk_frames, cfg.height, cfg.width)
        n, slabs = len(self.schedule.steps), max_sessions + 1
        self.seeds = torch.zeros(slabs, dtype=torch.long, device=self.device)
        self.t_table = torch.zeros(slabs, n, device=self.device)
        self.sigma_table = torch.zeros(slabs, n, device=self.device)
        self.context_t = torch.full((self.batch_sizes[-1],), self.schedule.context_t, device=self.device)
        self.sessions: dict[int, Session] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._prompts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mark: Callable | None = None    # optional phase callback (timing); not called inside graphs
        frames, limit = cfg.chunk_frames, self.cache.slab_frames
        self.kv_choices = tuple(sorted({min(c * frames, limit) for c in range(1, -(-limit // frames) + 1)}))
        exact = (True, False) if self.batch_sizes[-1] > 1 else (True,)
        opts = dict(backend=backend, inductor=inductor, verify=verify, progress=progress)
        self._forward = model
        self._chunk_fn = self._chunk
        if mode == "forward":
            self._forward = graphrt.compile(model, buckets=Buckets(
                self.batch_sizes, batch_args=("x", "t", "cond"),
                static_args={"kv_frames": self.kv_choices, "kv_exact": exact}), **opts)
        elif mode == "chunk":
            self._chunk_fn = graphrt.compile(self._chunk, states=[self.cache], buckets=Buckets(
                static_args={"batch": self.batch_sizes, "kv_frames": self.kv_choices, "exact": exact}), **opts)

    # -- the chunk function (graph-safe) --------------------------------------------------------
    def _chunk(self, cond=None, *, batch: int, kv_frames: int, exact: bool) -> torch.Tensor:
        """One chunk for rows ``0..batch`` of the block table: denoise, cache pass, advance."""
        cache = self.cache
        bt = cache.block_table[:batch]
        pos = cache.frames.index_select(0, bt)
        kw = dict(cache=cache, kv_frames=kv_frames, kv_exact=exact, cond=None if cond is None else cond[:batch])

        def forward(x, t):
            return self._forward(x.to(self.dtype), t, **kw)

        mark = None if self.mode == "chunk" else self.mark      # nothing host-side inside a captured chunk
        x0 = denoise_chunk(forward, self.seeds.index_select(0, bt), pos, self.t_table.index_select(0, bt),
                           self.sigma_table.index_select(0, bt), self.shape, mark)
        clean = x0.to(self.dtype)
        self._forward(clean, self.context_t[:batch], **kw)      # writes the clean K/V
        cache.commit(batch, self.cfg.chunk_frames)
        return clean

    # -- sessions -----------------------------------------------------------------------------
    def _prompt_kv(self, context: torch.Tensor | None, prompt: str | None):
        """Cross-attention K/V for a context; with a ``prompt`` key they are cached, and a repeat
        skips the encoding. A key reused for a different context is an error, never a silent hit."""
        if prompt is not None and prompt in self._prompts:
            cached_ctx, k, v = self._prompts[prompt]
            if context is not None:
                context = context.to(self.device, self.dtype)
                if context.shape != cached_ctx.shape or not torch.equal(context, cached_ctx):
                    raise InputError(f"prompt key {prompt!r} was cached for a different text context",
                                     fix="use one key per distinct context (or pass context=None to reuse it)")
            self.stats.prompt_hits += 1
            return k, v
        self.stats.prompt_misses += 1
        context = context.to(self.device, self.dtype)
        k, v = self.model.encode_prompt(context)
        if prompt is not None:
            self._prompts[prompt] = (context, k[:, 0], v[:, 0])
        return k[:, 0], v[:, 0]

    def open(self, context: torch.Tensor | None = None, *, seed: int = 0, prompt: str | None = None,
             num_chunks: int | None = None, schedule: FlowMatchSchedule | None = None) -> Session:
        """Start a video. ``context`` [1, L, text_dim] (or [L, text_dim]); with ``prompt`` its
        cross-attention K/V are cached under that key, and a repeated prompt skips the work."""
        cfg = self.cfg
        if context is None and (prompt is None or prompt not in self._prompts):
            raise InputError("open() needs a text context (or a prompt key seen before)")
        if context is not None:
            if context.dim() == 2:
                context = context[None]
            if context.dim() != 3 or context.shape[0] != 1 or context.shape[2] != cfg.text_dim \
                    or context.shape[1] > cfg.text_len:
                raise InputError("text context has the wrong shape",
                                 expected=f"[1, <= {cfg.text_len}, {cfg.text_dim}]", got=list(context.shape))
        limit = None if isinstance(self.cache, RollingKVCache) else cfg.num_chunks
        if num_chunks is not None and limit is not None and num_chunks > limit:
            raise CacheError(f"a video of {num_chunks} chunks does not fit max_frames={cfg.max_frames} "
                             f"({limit} chunks of {cfg.chunk_frames} frames)",
                             fix="build the Engine with window=(frames, sink_frames) for longer videos")
        if not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise InputError("seed must be an int in [0, 2**63)", got=seed)
        schedule = schedule or self.schedule
        if len(schedule.steps) != len(self.schedule.steps):
            raise InputError("every session must take the same number of denoising steps",
                             expected=len(self.schedule.steps), got=len(schedule.steps))
        kv = self._prompt_kv(context, prompt)
        slab = self.cache.acquire()
        self.cache.set_cross(slab, *kv)
        self.seeds[slab] = seed
        self.t_table[slab] = torch.tensor(schedule.timesteps)
        self.sigma_table[slab] = torch.tensor(schedule.sigmas)
        s = Session(next(self._ids), slab, seed, num_chunks)
        self.sessions[s.id] = s
        return s

    def close(self, session: Session) -> None:
        """End a video and free its slab for the next one."""
        if self.sessions.pop(session.id, None) is None:
            raise InputError(f"session {session.id} is not open")
        self.cache.release(session.slab)

    def step(self, sessions: Sequence[Session] | None = None, cond: dict[int, torch.Tensor] | None = None
             ) -> dict[int, torch.Tensor]:
        """Run one chunk for each active session (default: all not done), batched.

        Sessions may stand at different chunks; padding rows go to the scratch slab. ``cond``
        maps session id -> [F, cond_dim] conditioning for this chunk. Returns session id ->
        latents [1, C, F, H, W] (a copy).
        """
        active = [s for s in (sessions if sessions is not None else self.sessions.values()) if not s.done]
        if not active:
            return {}
        cond = cond or {}
        groups = _chunks(active, self.batch_sizes[-1])
        inputs = [self._cond(g, cond) for g in groups]  # every check before any work: an error disturbs no one
        rolling = isinstance(self.cache, RollingKVCache)
        for s in active:
            if self.sessions.get(s.id) is not s:
                raise InputError(f"session {s.id} is not open in this engine")
            if not rolling and (s.chunk + 1) * self.cfg.chunk_frames > self.cfg.max_frames:
                raise CacheError(f"session {s.id} is at the end of its slab ({self.cfg.max_frames} frames)",
                                 fix="close it, or build the Engine with window=(frames, sink_frames)")
        out: dict[int, torch.Tensor] = {}
        for group, cond_t in zip(groups, inputs):
            out.update(self._step_group(group, cond_t))
        self.stats.steps += 1
        return out

    def _step_group(self, group: list[Session], cond_t: torch.Tensor | None) -> dict[int, torch.Tensor]:
        frames = self.cfg.chunk_frames
        batch = next(b for b in self.batch_sizes if b >= len(group))
        kv = [min((s.chunk + 1) * frames, self.cache.slab_frames) for s in group]
        # exact: every real row attends exactly kv_frames frames (padded rows read scratch; discarded)
        kv_frames, exact = max(kv), len(set(kv)) == 1
        self.cache.bind([s.slab for s in group])
        x0 = self._chunk_fn(cond_t, batch=batch, kv_frames=kv_frames, exact=exact)
        self.stats.dispatches += 1 if self.mode == "chunk" else len(self.schedule.steps) + 1
        self.stats.chunks += len(group)
        self.stats.rows_padded += batch - len(group)
        out = {}
        for i, s in enumerate(group):
            out[s.id] = x0[i:i + 1].clone()
            s.chunk += 1
        return out

    def _cond(self, group, cond):
        """Per-row conditioning [max_batch, F, cond_dim] (padding rows zero), or None."""
        if self.model.cfg.cond_dim == 0:
            if cond:
                raise InputError("cond was given but the model was built with cond_dim=0")
            return None
        shape = (self.cfg.chunk_frames, self.cfg.cond_dim)
        rows = []
        for s in group:
            c = cond.get(s.id)
            if c is None or tuple(c.shape) != shape:
                raise InputError(f"session {s.id} needs cond for this chunk", expected=list(shape),
                                 got=None if c is None else list(c.shape))
            rows.append(c)
        rows += [torch.zeros(shape, dtype=self.dtype, device=rows[0].device)] * (self.batch_sizes[-1] - len(group))
        out = torch.stack([r.to(rows[0].device, self.dtype) for r in rows])
        if out.device.type == "cpu" and self.device.type == "cuda":
            out = out.pin_memory()        # an async copy: the host does not wait for queued chunks
        return out.to(self.device, non_blocking=True)

    # -- whole videos -----------------------------------------------------------------------------
    def stream(self, context: torch.Tensor, num_chunks: int, seed: int | Sequence[int] = 0,
               prompt: str | Sequence[str] | None = None) -> Iterator[torch.Tensor]:
        """Generate ``num_chunks`` chunks for ``context`` [B, L, text_dim], yielding each chunk's
        latents [B, C, F, H, W] as soon as it is done. ``seed``: one int (row i gets seed + i) or
        one per row; ``prompt``: a key (or one per row) for the prompt cache."""
        if not isinstance(context, torch.Tensor) or context.dim() != 3:
            raise InputError("context must be [B, L, text_dim]", got=getattr(context, "shape", type(context).__name__),
                             fix="add the batch dimension: context[None]")
        rows = context.shape[0]
        seeds = [seed + i for i in range(rows)] if isinstance(seed, int) else list(seed)
        if isinstance(prompt, str) and rows > 1:
            raise InputError("one prompt key per context row", expected=f"a list of {rows} keys", got=prompt)
        prompts = [prompt] * rows if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(seeds) != rows or len(prompts) != rows:
            raise InputError("one seed and one prompt key per context row", expected=rows,
                             got=(len(seeds), len(prompts)))
        sessions = []
        try:
            for i in range(rows):
                sessions.append(self.open(context[i:i + 1], seed=seeds[i], num_chunks=num_chunks,
                                          prompt=prompts[i]))
            for _ in range(num_chunks):
                out = self.step(sessions)
                yield torch.cat([out[s.id] for s in sessions])
        finally:
            for s in sessions:
                self.close(s)

    def generate(self, context: torch.Tensor, num_chunks: int, seed: int | Sequence[int] = 0,
                 prompt: str | None = None) -> torch.Tensor:
        """Latents [B, C, num_chunks * chunk_frames, H, W] for ``context`` [B, L, text_dim]."""
        return torch.cat(list(self.stream(context, num_chunks, seed, prompt)), dim=2)

    def prewarm(self) -> "Engine":
        """Capture every bucket (batch sizes x KV lengths x exact/masked) now, then seal."""
        if self.mode == "eager":
            return self
        b = self.batch_sizes[-1]
        cond = None if self.cfg.cond_dim == 0 else torch.zeros(b, self.cfg.chunk_frames, self.cfg.cond_dim,
                                                                device=self.device, dtype=self.dtype)
        if self.mode == "chunk":
            self._chunk_fn.prewarm(cond, batch=b, kv_frames=self.kv_choices[0], exact=True)
        else:
            x = torch.zeros(b, *self.shape, device=self.device, dtype=self.dtype)
            self._forward.prewarm(x, self.context_t[:b], cache=self.cache, kv_frames=self.kv_choices[0],
                                  kv_exact=True, cond=cond)
        return self

    def reset(self) -> None:
        """Close every session (free all slabs); graphs stay captured."""
        for s in list(self.sessions.values()):
            self.close(s)

    @property
    def graphs(self):
        """The GraphedModule serving this engine (None in eager mode)."""
        return self._chunk_fn if self.mode == "chunk" else self._forward if self.mode == "forward" else None


def _powers_of_two(n: int) -> tuple[int, ...]:
    sizes = [1]
    while sizes[-1] < n:
        sizes.append(min(sizes[-1] * 2, n))
    return tuple(sizes)


def _chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]
