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

The Engine is for inference: every public method runs without autograd history, so the
persistent cache never links one chunk (or one video) to the next, whatever the caller's
grad mode.

Memory: ``kv_dtype`` stores K/V as int8 or float8 codes with per-token-head scales (about half
the bytes of bf16); ``memory_budget`` sizes the number of slabs (resident sessions) from the
config; :meth:`Engine.suspend` moves a session's slab to host memory so that more sessions can be
open than there are slabs, and :meth:`Engine.resume` brings it back into any free slab.

Interactive sessions (:mod:`graphrt.pipeline.interactive`): :meth:`Engine.set_prompt` switches a
session's prompt, with a KV re-cache from the clean latents each slab keeps; ``open(init_latents=...)``
starts a session from given latents.
"""
from __future__ import annotations

import itertools
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from graphrt.replay import Buckets
from graphrt.replay import compile as compile_graphs
from graphrt.errors import CacheError, ConfigError, InputError
from graphrt.kv import RollingKVCache, StaticKVCache
from graphrt.pipeline import checks, interactive
from graphrt.pipeline.schedule import FlowMatchSchedule, denoise_chunk
from graphrt.pipeline.slabs import (EngineMemory, HostSlabs, num_slabs, powers_of_two, prompt_share,
                                    refuse_static_over_budget, weight_bytes)
from graphrt.threads import OneThread, one_thread

MODES = ("eager", "forward", "chunk")
KV_BUCKETS = ("auto", "per-length", "max")
LINEAR_DTYPES = (None, "bf16", "fp8")


@dataclass(eq=False)
class Session:
    """One video being generated: its slab, seed, prompt and progress (host-side bookkeeping).

    A session is its own identity: it hashes and compares as the object, so it keys
    :meth:`Engine.step`'s outputs and ``cond``, and a session of another Engine (whose ``id``
    may be the same number) is never mistaken for one of this Engine's.
    """

    id: int
    slab: int | None                     # None while suspended to host memory
    seed: int
    num_chunks: int | None
    chunk: int = 0                       # chunks done
    recache: bool = False                # its K/V are recomputed from its kept latents before its next chunk

    @property
    def done(self) -> bool:
        return self.num_chunks is not None and self.chunk >= self.num_chunks

    @property
    def suspended(self) -> bool:
        return self.slab is None


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

    >>> engine = Engine(model, max_sessions=2, batch_sizes=(1, 2), mode="chunk")
    >>> engine.num_graphs                    # 2 batch sizes x 7 KV lengths x (exact, masked) = 28
    >>> video = engine.generate(context, num_chunks=3, seed=0)          # [1, C, 9, H, W]
    >>> a = engine.open(ctx_a, seed=1, prompt="a cat"); b = engine.open(ctx_b, seed=2)
    >>> outs = engine.step()                 # {a: [1, C, F, H, W], b: ...}: one chunk each, batched

    ``context`` is the text encoder's output for a prompt: embeddings [B, L, text_dim] with
    L <= ``cfg.text_len`` (for Wan 2.1, umT5-XXL: text_dim 4096, up to 512 tokens).

    What the graphs cost is chosen here: ``mode="forward"`` and ``mode="chunk"`` capture one
    graph per (batch size, KV length, exact/masked) bucket, :attr:`num_graphs` in all:
    ``len(batch_sizes)`` x ``cfg.num_chunks`` KV lengths (the window's, with ``window``) x 2
    (1 when the largest batch is 1). Each costs a warm-up and a capture of one DiT forward
    (``"forward"``) or of a whole chunk, ``len(schedule.steps) + 1`` forwards (``"chunk"``); on
    the CPU emulation the trace dominates (measured costs per graph: ``bench/results/design-numbers.md``).
    A bucket is captured on its first use; :meth:`prewarm` captures every one up front (with a
    progress bar), so no request waits for a capture. Fewer batch sizes, fewer graphs.

    ``kv_buckets="max"`` keeps one graph per batch size: every chunk attends the whole slab,
    masked by the rows' device lengths. Free with flash-attn (its kernel reads
    ``cache_seqlens`` and skips the keys past them), so ``"auto"`` picks it there, unless
    ``kv_dtype`` quantizes the cache (then every chunk would gather and dequantize the whole
    slab, so ``"auto"`` is ``"per-length"``); with SDPA and
    flex (as written: a ``score_mod`` mask) every key is computed, up to ``cfg.num_chunks`` x
    the attention of the first chunk, so ``"auto"`` keeps one graph per KV length
    (``"per-length"``); a compiled graph is captured once and kept on disk, so its cost is paid
    once, while the compute is paid every chunk.

    ``inductor`` picks the kernels inside the graphs. ``"auto"`` (the default) is ``"once"`` on
    CUDA and ``False`` on the CPU. ``"once"``: the chunk function (``mode="chunk"``) or the model
    (``"forward"``) compiled by ``torch.compile`` once for every bucket, the KV length (and batch)
    dynamic after the first bucket, so an engine compiles 2-3 graphs, not one per bucket; each bucket
    is warmed (compile and tuning) before its capture, and inductor's own caches (FX graph, Triton
    kernels) make a second start a retrace (:mod:`graphrt.replay.once`). With the model's fused
    kernels (``CausalWan(kernels="auto")``: fused on CUDA) this is graphrt's GPU path.
    ``True`` compiles each bucket's trace on its own: on the CPU one AOTInductor package per
    whole chunk (no Python between its kernels; minutes to compile, so packages are kept in
    ``cache_dir`` across processes: None is ``$GRAPHRT_CACHE_DIR`` or ``~/.cache/graphrt``, False
    keeps none), on CUDA inductor's kernels inside the CUDA graph. ``False``: the model's own
    kernels, as eager runs them. A sequence-parallel model on the CPU compiles with inductor's
    Python wrapper (its C++ wrappers cannot call the collectives).

    ``window=(frames, sink_frames)`` uses a :class:`RollingKVCache` for videos past
    ``max_frames``. Without it the cache is static: each slab holds ``max_frames`` from the start,
    and one session that does not fit ``memory_budget`` (default: the device's free memory) is
    refused here, naming the most chunks that fit and the window to use instead. ``backend``/``inductor``/``verify``/``cache_dir`` are passed to
    :func:`graphrt.compile`. Every method runs without autograd history (inference only),
    whatever the grad mode.

    Memory: ``max_sessions`` is the number of slabs, the sessions resident on the device at once
    (default 1). ``kv_dtype`` (``"int8"``, ``"float8_e4m3fn"``; default the model dtype) stores
    self-attention K/V quantized per token and head. ``memory_budget`` (bytes, or a fraction in
    (0, 1] of the device's free memory) sizes the slabs instead: as many as fit the K/V cache in
    the budget (at most ``max_sessions`` when both are given); leave room for activations and the
    graph pool, which :meth:`memory` reports after :meth:`prewarm`. More sessions than slabs may
    be open: :meth:`suspend` and :meth:`resume` move them between host and device.

    ``prompt_cache`` (default 256, 0 keeps none) bounds the prompts whose cross-attention K/V
    :meth:`open` keeps on the device under their key (a 1.3B model in bf16: about 94 MiB each),
    and ``prompt_cache_bytes`` their bytes: by default an eighth of ``memory_budget``, which the
    slabs then do not use (without a budget, an eighth of the device's free memory at start), so
    the prompts kept count inside the budget. The least recently used is dropped first when
    either bound is passed. An open session holds its own copy in its slab, so dropping a prompt
    only means its next :meth:`open` encodes it again.

    Threads: one at a time. The cache, its block table and the graphs' static buffers are one set
    per engine, so a call that changes it (``open``, ``step``, ``close``, ``suspend``, ``resume``,
    ``prewarm``, ``reset``, ``generate``) from a second thread while another thread's call runs is
    refused with :class:`~graphrt.errors.ConcurrentCallError` (it never waits, and nothing is mixed
    silently). Drive it from one thread, e.g. a worker that owns it (as ``graphrt.serve`` does);
    the thread may change from one call to the next.

    ``linear_dtype="fp8"`` runs the model's linears in float8 (:func:`graphrt.quantize`: e4m3
    weights with per-channel scales, per-token activation scales on the device): the model is
    quantized in place here, after its weights are loaded and before any graph is captured, so
    every mode (and inductor) runs the fp8 forward. None or ``"bf16"`` leaves the linears as they
    are. :meth:`memory` reports the weight bytes before and after (fp8 halves the converted
    linears' bytes of a bf16 model).
    """

    def __init__(self, model, *, max_sessions: int | None = None, batch_sizes: Sequence[int] | None = None,
                 mode: str = "chunk", schedule: FlowMatchSchedule | None = None, window: tuple[int, int] | None = None,
                 backend: str = "auto", inductor: bool | str = "auto", verify: int = 0, progress: bool = True,
                 kv_dtype: str | torch.dtype | None = None, memory_budget: int | float | None = None,
                 cache_dir=None, kv_buckets: str = "auto", prompt_cache: int = 256, linear_dtype: str | None = None,
                 prompt_cache_bytes: int | None = None):
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}", expected=MODES, got=mode)
        if kv_buckets not in KV_BUCKETS:
            raise InputError(f"unknown kv_buckets {kv_buckets!r}", expected=KV_BUCKETS, got=kv_buckets)
        missing = [a for a in ("cfg", "encode_prompt") if not hasattr(model, a)]
        if missing or not any(True for _ in model.parameters()):
            raise InputError(f"Engine needs a causal DiT built by graphrt (CausalWan); {type(model).__name__} has "
                             f"no {' or '.join(missing) or 'parameters'}",
                             expected="a model with .cfg (WanConfig), .encode_prompt(context) and parameters",
                             got=type(model).__name__, fix="build the model with CausalWan(cfg) (or torch.compile it)")
        self.linear_dtype = linear_dtype
        self.quantized = _quantize_linears(model, linear_dtype)
        cfg = self.cfg = model.cfg
        self.model, self.mode = model, mode
        self._one_thread = OneThread("Engine")
        self.schedule = schedule or FlowMatchSchedule()
        if max_sessions is not None and (not isinstance(max_sessions, int) or max_sessions < 1):
            raise InputError("max_sessions must be an int >= 1", got=max_sessions)
        if not checks.is_int(prompt_cache) or prompt_cache < 0:
            raise InputError("prompt_cache must be an int >= 0 (prompts kept; 0 keeps none)", got=prompt_cache)
        self.prompt_cache = prompt_cache
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if window is not None and window[0] - window[1] < cfg.chunk_frames:
            raise CacheError(f"window={window}: the ring (window minus sink frames) must hold a whole chunk "
                             f"of {cfg.chunk_frames} frames", fix="use a larger window or a smaller sink")
        if window is None:
            self._new_cache = lambda **kw: StaticKVCache.for_model(model, kv_dtype=kv_dtype, keep_latents=True, **kw)
        else:
            self._new_cache = lambda **kw: RollingKVCache.for_model(model, window_frames=window[0],
                                                                    sink_frames=window[1], kv_dtype=kv_dtype,
                                                                    keep_latents=True, **kw)
        batch_sizes = checks.batch_sizes(batch_sizes)
        memory_budget, self.prompt_cache_bytes = prompt_share(memory_budget, prompt_cache_bytes, self.device)
        if window is None:            # the whole video reserved up front: refused, naming the most, when over the budget
            refuse_static_over_budget(self._new_cache, cfg, self.device, memory_budget,
                                      batch_sizes[-1] if batch_sizes else 1)
        max_sessions = num_slabs(self._new_cache, self.device, max_sessions, memory_budget, batch_sizes)
        self.batch_sizes = batch_sizes or powers_of_two(max_sessions)
        self.cache = self._new_cache(num_slabs=max_sessions, max_batch=self.batch_sizes[-1])
        # one slab: the one row is always it (or, in a warm-up, scratch): attend it in place
        self.cache.read_in_place = max_sessions == 1
        self._suspended = HostSlabs(self.device)
        self.shape = (cfg.out_dim, cfg.chunk_frames, cfg.height, cfg.width)
        n, slabs = len(self.schedule.steps), max_sessions + 1
        self.seeds = torch.zeros(slabs, dtype=torch.long, device=self.device)
        self.t_table = torch.zeros(slabs, n, device=self.device)
        self.sigma_table = torch.zeros(slabs, n, device=self.device)
        self.context_t = torch.full((self.batch_sizes[-1],), self.schedule.context_t, device=self.device)
        self.sessions: dict[int, Session] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._prompts: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self.mark: Callable | None = None    # optional phase callback (timing); not called inside graphs
        frames, limit = cfg.chunk_frames, self.cache.slab_frames
        self.kv_buckets = kv_buckets if kv_buckets != "auto" else auto_kv_buckets(model, self.cache.quantized)
        if self.kv_buckets == "max":     # one graph per batch size: the whole slab, masked by device seqlens
            self.kv_choices, kv_exact = (limit,), (False,)
        else:
            self.kv_choices = tuple(sorted({min(c * frames, limit) for c in range(1, -(-limit // frames) + 1)}))
            kv_exact = (True, False) if self.batch_sizes[-1] > 1 else (True,)
        self.kv_exact_choices = kv_exact
        inductor = self.inductor = checks.parallel_inductor(checks.engine_inductor(inductor, self.device, backend),
                                                            model, self.device)
        opts = dict(backend=backend, inductor=inductor, verify=verify, progress=progress, cache_dir=cache_dir)
        self._forward = model
        self._chunk_fn = self._chunk
        if mode == "forward":
            self._forward = compile_graphs(model, buckets=Buckets(
                self.batch_sizes, batch_args=("x", "t", "cond"),
                static_args={"kv_frames": self.kv_choices, "kv_exact": kv_exact}), **opts)
        elif mode == "chunk":
            self._chunk_fn = compile_graphs(self._chunk, states=[self.cache], buckets=Buckets(
                static_args={"batch": self.batch_sizes, "kv_frames": self.kv_choices, "kv_exact": kv_exact}), **opts)
        self._recache = interactive.Recache(self, None if mode == "eager" else opts)
        self._ranks = getattr(model, "parallel", None)     # sequence-parallel: every rank must run the same engine
        if self._ranks is not None:
            self._ranks.check_engine(self, window=window, inductor=inductor, backend=backend, verify=verify)

    @property
    def kernel_path(self) -> str:
        """The kernels around the GEMMs and attention that the model runs: ``"fused"`` (graphrt's
        custom ops: Triton on CUDA, the default there through ``CausalWan(kernels="auto")``) or
        ``"aten"``; force one with ``model.kernels = "aten"`` (or ``"fused"``) before capture."""
        return getattr(self.model, "kernel_path", "aten")

    @property
    def num_graphs(self) -> int:
        """Graphs this engine captures in all (0 in eager mode): batch sizes x KV lengths x exact/masked
    (batch sizes alone with ``kv_buckets="max"``)."""
        if self.mode == "eager":
            return 0
        return len(self.batch_sizes) * len(self.kv_choices) * len(self.kv_exact_choices)

    # -- the chunk function (graph-safe) --------------------------------------------------------
    @property
    def chunk_function(self) -> Callable[..., torch.Tensor]:
        """The graph-safe chunk function, ``fn(cond, *, batch, kv_frames, kv_exact) -> latents``: one
        chunk for rows ``0..batch`` of the bound block table (denoise, cache pass, advance). This
        is what ``mode="chunk"`` captures and ``mode="eager"`` calls; hand it to another compiler
        and give the result back with :meth:`use_chunk_function`."""
        return self._chunk

    @one_thread("use_chunk_function()")
    def use_chunk_function(self, fn: Callable[..., torch.Tensor]) -> None:
        """Let :meth:`step` call ``fn`` in place of :attr:`chunk_function`: a wrapper of it with the
        same signature and results, e.g. ``torch.compile(engine.chunk_function, fullgraph=True)``
        (the bench's ``compile-chunk`` peer). Only in ``mode="eager"``: the graph modes own the
        chunk function (they capture it, or each forward inside it)."""
        if self.mode != "eager":
            raise ConfigError(f"use_chunk_function() needs an Engine in mode='eager'; this one is mode={self.mode!r}",
                              expected="eager", got=self.mode,
                              fix="build the Engine with mode='eager' to run your own compiled chunk function")
        if not callable(fn):
            raise InputError("use_chunk_function() takes a callable", expected="fn(cond, *, batch, kv_frames, "
                             "kv_exact) -> latents", got=type(fn).__name__)
        self._chunk_fn = fn

    def _chunk(self, cond=None, *, batch: int, kv_frames: int, kv_exact: bool) -> torch.Tensor:
        """One chunk for rows ``0..batch`` of the block table: denoise, cache pass, advance."""
        cache = self.cache
        bt = cache.block_table[:batch]
        pos = cache.frames.index_select(0, bt)
        kw = dict(cache=cache, kv_frames=kv_frames, kv_exact=kv_exact, cond=None if cond is None else cond[:batch])

        def forward(x, t):
            return self._forward(x.to(self.dtype), t, **kw)

        mark = None if self.mode == "chunk" else self.mark      # nothing host-side inside a captured chunk
        x0 = denoise_chunk(forward, self.seeds.index_select(0, bt), pos, self.t_table.index_select(0, bt),
                           self.sigma_table.index_select(0, bt), self.shape, mark)
        clean = x0.to(self.dtype)
        cache.keep(batch, clean)                                # the clean latents, for a re-cache
        self._forward(clean, self.context_t[:batch], **kw)      # writes the clean K/V
        cache.commit(batch, self.cfg.chunk_frames)
        return clean

    # -- sessions -----------------------------------------------------------------------------
    def _context(self, context, where: str) -> torch.Tensor:
        return checks.text_context(self.cfg, context, where)

    def _prompt_kv(self, context: torch.Tensor | None, prompt: str | None):
        """Cross-attention K/V [layers, text_len, H, D] for a context, and what to store under
        ``prompt`` once the session opened (None on a hit). A key reused for a different context
        is an error, never a silent hit."""
        if prompt is not None and prompt in self._prompts:
            self._prompts.move_to_end(prompt)
            cached_ctx, k, v = self._prompts[prompt]
            if context is not None:
                context = self._upload(context.to(dtype=self.dtype))
                if context.shape != cached_ctx.shape or not torch.equal(context, cached_ctx):
                    raise InputError(f"prompt key {prompt!r} was cached for a different text context",
                                     fix="use one key per distinct context (or pass context=None to reuse it)")
            return k, v, None
        context = self._upload(context.to(dtype=self.dtype))
        k, v = self.model.encode_prompt(context)
        return k[:, 0], v[:, 0], (context, k[:, 0], v[:, 0])

    def _upload(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the engine's device. From the host to CUDA the copy is asynchronous, from pinned
        memory: the host does not wait for the chunks queued on the device (a pageable copy would
        block it until they finish)."""
        if t.device.type == "cpu" and self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)   # the caching host allocator keeps it alive
        return t.to(self.device)

    @one_thread("open()")
    @torch.no_grad()
    def open(self, context: torch.Tensor | None = None, *, seed: int = 0, prompt: str | None = None,
             num_chunks: int | None = None, schedule: FlowMatchSchedule | None = None,
             init_latents: torch.Tensor | None = None) -> Session:
        """Start a video and return its :class:`Session`.

        ``context``: text-encoder embeddings [1, L, text_dim] (or [L, text_dim]), L <= ``cfg.text_len``.
        With ``prompt`` its cross-attention K/V are cached under that key, and a repeated prompt
        skips the work. ``num_chunks`` (>= 1) ends the video there (:attr:`Session.done`); None
        keeps it open until closed, or until its slab is full without ``window``. Nothing is kept
        (slab, prompt key, counters) when ``open`` raises. On a sequence-parallel model every
        rank must open the same session (same arguments, same context): checked first, on every
        rank, with one small host collective.

        ``init_latents`` [1, C, n * chunk_frames, H, W] (the layout :meth:`step` returns, in the model
        dtype) start the video from given frames: they count as its first n chunks (positions and
        the next chunk's noise are those the session would have drawn had it made them, and
        ``num_chunks`` counts them), and the clean pass writes their K/V (a re-cache, batched
        with the others, before the session's next chunk). The first chunk :meth:`step` returns is
        the first new one. Checked before anything is written.
        """
        if self._ranks is not None:      # first, on the raw arguments, so every check below fails alike on every rank
            self._ranks.check_open(context, seed=seed, prompt=prompt, num_chunks=num_chunks, schedule=schedule)
        if prompt is not None and not isinstance(prompt, str):
            raise InputError("prompt must be a str key (or None)", got=type(prompt).__name__)
        if context is None and (prompt is None or prompt not in self._prompts):
            raise InputError("open() needs a text context (or a prompt key seen before)")
        if context is not None:
            context = self._context(context, "open()")
            checks.finite_context(context, "open()")
            if context.shape[0] != 1:
                raise InputError("open() starts one video: one context row", expected="[1, L, text_dim]",
                                 got=list(context.shape), fix="open one session per row (or use stream())")
        if num_chunks is not None and (not checks.is_int(num_chunks) or num_chunks < 1):
            raise InputError("num_chunks must be an int >= 1 (or None for an open-ended video)", got=num_chunks)
        self._check_video(num_chunks, [seed])
        if init_latents is not None:
            interactive.check_geometry(self.cfg, self.cache, "open(init_latents=...)",
                                       fix="open the session without init_latents")
            init_latents = interactive.check_init_latents(self.cfg, self, init_latents, num_chunks)
        schedule = schedule or self.schedule
        if len(schedule.steps) != len(self.schedule.steps):
            raise InputError("every session must take the same number of denoising steps",
                             expected=len(self.schedule.steps), got=len(schedule.steps))
        if not self.cache.free_slabs:
            raise CacheError(f"all {self.cache.num_slabs} slabs are in use",
                             fix="close a session, or engine.suspend(session) one to host memory; or build the "
                                 "Engine with a larger max_sessions or memory_budget")
        slab = self.cache.acquire()
        try:
            k, v, new = self._prompt_kv(context, prompt)
            self.cache.set_cross(slab, k, v)
        except BaseException:
            self.cache.release(slab)
            raise
        self._remember_prompt(prompt, new)
        self.seeds[slab] = seed
        self.t_table[slab] = self._upload(torch.tensor(schedule.timesteps, device="cpu"))
        self.sigma_table[slab] = self._upload(torch.tensor(schedule.sigmas, device="cpu"))
        s = Session(next(self._ids), slab, seed, num_chunks)
        if init_latents is not None:
            interactive.start_from(self, s, init_latents)
        self.sessions[s.id] = s
        return s

    @one_thread("set_prompt()")
    @torch.no_grad()
    def set_prompt(self, session: Session, context: torch.Tensor | None, *, prompt: str | None = None,
                   recache: bool = True) -> None:
        """Switch a session's prompt: from its next chunk its cross-attention reads ``context``
        ([1, L, text_dim], or [L, text_dim]; None with a ``prompt`` key seen before), through the
        prompt cache under ``prompt`` as in :meth:`open`.

        With ``recache`` the self-attention K/V of the frames the session still attends (its sink
        and window; every frame of a static cache) are recomputed under the new prompt before its
        next chunk, from its kept clean latents (LongLive's KV re-cache: see
        :mod:`graphrt.pipeline.interactive`); sessions switched before the same :meth:`step` are
        re-cached batched, one captured graph per (batch, length) bucket in the graph modes.
        Without it only cross-attention changes. Other sessions are not touched. The session
        must be open, resident (not suspended) and not finished. On a sequence-parallel model
        every rank must switch alike (same session, context and arguments).
        """
        self._check_open([session], "set_prompt()")
        if session.suspended:
            raise CacheError(f"set_prompt(): session {session.id} is suspended to host memory",
                             fix="engine.resume(session) first, then switch its prompt")
        if session.done:
            raise InputError(f"set_prompt(): session {session.id} is finished ({session.chunk} of "
                             f"{session.num_chunks} chunks): no chunk is left to take the prompt",
                             fix="open a new session (or open with num_chunks=None for an open-ended video)")
        if prompt is not None and not isinstance(prompt, str):
            raise InputError("set_prompt(): prompt must be a str key (or None)", got=type(prompt).__name__)
        if context is None and (prompt is None or prompt not in self._prompts):
            raise InputError("set_prompt() needs a text context (or a prompt key seen before)")
        if context is not None:
            context = self._context(context, "set_prompt()")
            checks.finite_context(context, "set_prompt()")
            if context.shape[0] != 1:
                raise InputError("set_prompt() switches one session: one context row", expected="[1, L, text_dim]",
                                 got=list(context.shape))
        if recache:
            interactive.check_geometry(self.cfg, self.cache, "set_prompt(recache=True)")
        k, v, new = self._prompt_kv(context, prompt)
        self.cache.set_cross(session.slab, k, v)
        self._remember_prompt(prompt, new)
        session.recache = session.recache or (recache and session.chunk > 0)

    def _remember_prompt(self, prompt, new) -> None:
        if new is None:
            self.stats.prompt_hits += 1
        else:
            self.stats.prompt_misses += 1
            if prompt is not None and self.prompt_cache:
                self._prompts[prompt] = new      # the slab holds its own copy: evicting is safe
                while len(self._prompts) > self.prompt_cache or self._prompt_bytes() > self.prompt_cache_bytes:
                    self._prompts.popitem(last=False)

    def _prompt_bytes(self) -> int:
        return sum(t.nbytes for entry in self._prompts.values() for t in entry)

    def _check_video(self, num_chunks: int | None, seeds: list) -> None:
        checks.video(self.cfg, isinstance(self.cache, RollingKVCache), num_chunks, seeds)

    def _check_open(self, sessions, where: str) -> None:
        checks.open_sessions(sessions, Session, self.sessions, where)

    @one_thread("close()")
    def close(self, session: Session) -> None:
        """End a video and free its slab (or its host copy, when suspended) for the next one."""
        self._check_open([session], "close()")
        del self.sessions[session.id]
        if session.suspended:
            self._suspended.drop(session.id)
        else:
            self.cache.release(session.slab)

    def at_end(self, session: Session) -> bool:
        """True when the session's slab holds no further chunk (a static cache at ``max_frames``)."""
        return not isinstance(self.cache, RollingKVCache) and \
            (session.chunk + 1) * self.cfg.chunk_frames > self.cfg.max_frames

    @one_thread("step()")
    @torch.no_grad()
    def step(self, sessions: Sequence[Session] | Session | None = None,
             cond: dict[Session, torch.Tensor] | None = None) -> dict[Session, torch.Tensor]:
        """Run one chunk for each session, batched; returns ``{session: latents [1, C, F, H, W]}``
        (copies), so ``engine.step()[a]`` is session ``a``'s chunk. ``sessions``: a list, or one
        :class:`Session`.

        ``sessions`` default to every open one not suspended; a suspended one listed is an error
        (:meth:`resume` it first). Finished sessions (:attr:`Session.done`) are left
        out. A session at the end of its slab (:meth:`at_end`, open-ended on a static cache) is
        an error when listed in ``sessions``, and runs nothing; by default the others go on
        and a warning names it (an error when no session can go on). Sessions may stand at
        different chunks; padding rows go to the scratch slab. ``cond`` maps a session to its
        [F, cond_dim] conditioning for this chunk. Every check runs before any work: an error
        disturbs no one.
        """
        explicit = sessions is not None
        if isinstance(sessions, Session):
            sessions = [sessions]                # step(a): one session
        pool = list(sessions) if explicit else [s for s in self.sessions.values() if not s.suspended]
        self._check_open(pool, "step()")
        suspended = [s.id for s in pool if s.suspended]
        if suspended:
            raise CacheError(f"session(s) {suspended} suspended to host memory cannot take a chunk",
                             fix="engine.resume(session) first (it needs a free slab)")
        cond = dict(cond or {})
        self._check_open(cond, "step(cond=...)")
        active = [s for s in pool if not s.done]
        ended = [s for s in active if self.at_end(s)]
        if ended:
            msg = (f"session(s) {[s.id for s in ended]} at the end of the slab ({self.cfg.max_frames} frames) "
                   "cannot take another chunk")
            fix = "close them, or build the Engine with window=(frames, sink_frames)"
            if explicit or len(ended) == len(active):
                raise CacheError(msg, fix=fix)
            warnings.warn(f"{msg}; the others go on. fix: {fix}", stacklevel=2)
            active = [s for s in active if not self.at_end(s)]
        if not active:
            return {}
        groups = _session_groups(active, self.batch_sizes[-1])
        inputs = [self._cond(g, cond) for g in groups]
        switched = [s for s in active if s.recache]
        if switched:                             # prompt switches and starts from latents: their clean pass
            self.stats.dispatches += self._recache.run(switched)
        out: dict[Session, torch.Tensor] = {}
        for group, cond_t in zip(groups, inputs):
            out.update(self._step_group(group, cond_t))
        self.stats.steps += 1
        return out

    def _step_group(self, group: list[Session], cond_t: torch.Tensor | None) -> dict[Session, torch.Tensor]:
        frames = self.cfg.chunk_frames
        batch = next(b for b in self.batch_sizes if b >= len(group))
        kv = [min((s.chunk + 1) * frames, self.cache.slab_frames) for s in group]
        # kv_exact: every real row attends exactly kv_frames frames (padded rows read scratch; discarded)
        kv_frames, kv_exact = max(kv), len(set(kv)) == 1
        if self.kv_buckets == "max":
            kv_frames, kv_exact = self.kv_choices[0], False
        self.cache.bind([s.slab for s in group])
        x0 = self._chunk_fn(cond_t, batch=batch, kv_frames=kv_frames, kv_exact=kv_exact)
        self.stats.dispatches += 1 if self.mode == "chunk" else len(self.schedule.steps) + 1
        self.stats.chunks += len(group)
        self.stats.rows_padded += batch - len(group)
        out = {}
        for i, s in enumerate(group):
            out[s] = x0[i:i + 1].clone()
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
            c = cond.get(s)
            if not isinstance(c, torch.Tensor) or tuple(c.shape) != shape:
                raise InputError(f"session {s.id} needs cond for this chunk", expected=f"a tensor {list(shape)}",
                                 got=getattr(c, "shape", c if c is None else type(c).__name__))
            rows.append(c)
        rows += [torch.zeros(shape, dtype=self.dtype, device=rows[0].device)] * (self.batch_sizes[-1] - len(group))
        out = torch.stack([r.to(rows[0].device, self.dtype) for r in rows])
        if out.device.type == "cpu" and self.device.type == "cuda":
            out = out.pin_memory()        # an async copy: the host does not wait for queued chunks
        return out.to(self.device, non_blocking=True)

    # -- whole videos -----------------------------------------------------------------------------
    def stream(self, context: torch.Tensor, num_chunks: int, seed: int | Sequence[int] = 0,
               prompt: str | Sequence[str] | None = None) -> Iterator[torch.Tensor]:
        """Generate ``num_chunks`` chunks for ``context`` [B, L, text_dim] (text-encoder embeddings),
        yielding each chunk's latents [B, C, F, H, W] as soon as it is done. ``seed``: one int
        (row i gets seed + i) or one per row; ``prompt``: a key (or one per row) for the prompt
        cache. The arguments are checked here, before the first chunk is asked for."""
        if isinstance(context, torch.Tensor) and context.dim() != 3:
            raise InputError("context must be [B, L, text_dim]", got=list(context.shape),
                             fix="add the batch dimension: context[None]")
        context = self._context(context, "stream()")
        checks.finite_context(context, "stream()")     # now, not at the first chunk (open() reads it again)
        if not checks.is_int(num_chunks) or num_chunks < 1:
            raise InputError("num_chunks must be an int >= 1", got=num_chunks)
        rows = context.shape[0]
        seeds = [seed + i for i in range(rows)] if checks.is_int(seed) else list(seed)
        if isinstance(prompt, str) and rows > 1:
            raise InputError("one prompt key per context row", expected=f"a list of {rows} keys", got=prompt)
        prompts = [prompt] * rows if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(seeds) != rows or len(prompts) != rows:
            raise InputError("one seed and one prompt key per context row", expected=f"{rows} of each",
                             got=f"{len(seeds)} seed(s), {len(prompts)} prompt key(s)",
                             fix="pass one int seed (row i gets seed + i) and one prompt key per row (or None)")
        self._check_video(num_chunks, seeds)
        free = self.cache.free_slabs
        if rows > free:
            raise CacheError(f"{rows} video(s) need {rows} free slab(s); {free} of {self.cache.num_slabs} are free",
                             fix="close open sessions, or build the Engine with max_sessions >= the rows")
        return self._stream(context, num_chunks, seeds, prompts)

    def _stream(self, context, num_chunks, seeds, prompts):
        sessions = []
        try:
            for i in range(len(seeds)):
                sessions.append(self.open(context[i:i + 1], seed=seeds[i], num_chunks=num_chunks,
                                          prompt=prompts[i]))
            for _ in range(num_chunks):
                out = self.step(sessions)
                yield torch.cat([out[s] for s in sessions])
        finally:
            for s in sessions:
                self.close(s)

    @one_thread("generate()")
    def generate(self, context: torch.Tensor, num_chunks: int, seed: int | Sequence[int] = 0,
                 prompt: str | Sequence[str] | None = None) -> torch.Tensor:
        """Latents [B, C, num_chunks * chunk_frames, H, W] for ``context`` [B, L, text_dim]."""
        return torch.cat(list(self.stream(context, num_chunks, seed, prompt)), dim=2)

    @one_thread("prewarm()")
    @torch.no_grad()
    def prewarm(self, recache: bool = False) -> "Engine":
        """Capture every bucket now (:attr:`num_graphs` graphs: batch sizes x KV lengths x
        exact/masked, with a progress bar), then seal. See the class docstring for the cost.
        ``recache`` also captures the re-cache passes of :meth:`set_prompt` and ``init_latents``
        (batch sizes x chunks per slab more graphs); else each is captured on its first use."""
        if self.mode == "eager":
            return self
        if recache:
            self._recache.prewarm()
        b = self.batch_sizes[-1]
        cond = None if self.cfg.cond_dim == 0 else torch.zeros(b, self.cfg.chunk_frames, self.cfg.cond_dim,
                                                                device=self.device, dtype=self.dtype)
        if self.mode == "chunk":
            self._chunk_fn.prewarm(cond, batch=b, kv_frames=self.kv_choices[0], kv_exact=self.kv_exact_choices[0])
        else:
            x = torch.zeros(b, *self.shape, device=self.device, dtype=self.dtype)
            self._forward.prewarm(x, self.context_t[:b], cache=self.cache, kv_frames=self.kv_choices[0],
                                  kv_exact=self.kv_exact_choices[0], cond=cond)
        return self

    @one_thread("reset()")
    def reset(self) -> None:
        """Close every session (free all slabs and host copies); graphs stay captured."""
        for s in list(self.sessions.values()):
            self.close(s)

    # -- memory: suspend and resume, the report (slabs and bytes: graphrt.pipeline.slabs) ---------------------------------
    def _slab_state(self, slab: int) -> dict[str, torch.Tensor]:
        """Everything one session keeps on the device: its cache slab and its engine table rows."""
        views = self.cache.slab_tensors(slab)
        views.update(seeds=self.seeds[slab:slab + 1], t_table=self.t_table[slab:slab + 1],
                     sigma_table=self.sigma_table[slab:slab + 1])
        return views

    @one_thread("suspend()")
    def suspend(self, session: Session) -> None:
        """Move a session to host memory and free its slab for another session.

        Its K/V (codes and scales), position, cross-attention K/V, seed and schedule are copied
        to host memory (pinned, on a side stream on CUDA: the host does not wait) and the slab is
        wiped after the copy. :meth:`resume` brings it back; it then continues bit for bit.
        """
        self._check_open([session], "suspend()")
        if session.suspended:
            raise CacheError(f"session {session.id} is already suspended")
        stream = self._suspended.save(session.id, self._slab_state(session.slab))
        self.cache.release(session.slab, stream=stream)
        session.slab = None

    @one_thread("resume()")
    def resume(self, session: Session) -> None:
        """Bring a suspended session back into any free slab (it need not be its old one)."""
        self._check_open([session], "resume()")
        if not session.suspended:
            raise CacheError(f"session {session.id} is not suspended (it holds slab {session.slab})")
        if not self.cache.free_slabs:
            raise CacheError(f"no free slab to resume session {session.id} into: all {self.cache.num_slabs} "
                             "are in use", fix="suspend or close another session first")
        slab = self.cache.acquire()
        self._suspended.load(session.id, self._slab_state(slab))
        session.slab = slab

    def memory(self) -> EngineMemory:
        """Bytes of weights, K/V cache (per slab, scratch; ``kv.latents``: the clean latents each
        session keeps for a re-cache), graph pool, prompt cache, the re-cache's staging rows and
        suspended host copies."""
        g = self.graphs
        pool = g.stats.pool_bytes if g is not None and self.device.type == "cuda" else None
        prompt_bytes = self._prompt_bytes()
        q = self.quantized
        return EngineMemory(weight_bytes(self.model), self.cache.memory(), pool, self._suspended.nbytes,
                            len(self._suspended), len(self._prompts), prompt_bytes, self._recache.nbytes,
                            linear_dtype=self.linear_dtype or "bf16",
                            weights_unquantized=None if q is None else q.bytes_before)

    @property
    def recache_graphs(self):
        """The GraphedModule of the re-cache passes (None in eager mode)."""
        return self._recache.graphs

    @property
    def graphs(self):
        """The GraphedModule serving this engine (None in eager mode)."""
        return self._chunk_fn if self.mode == "chunk" else self._forward if self.mode == "forward" else None


def _quantize_linears(model, linear_dtype):
    """Quantize ``model``'s linears for ``linear_dtype`` (in place, once: a model already quantized
    keeps its fp8 linears and the report of that time); the :class:`~graphrt.quant.QuantizeReport`, or None."""
    if linear_dtype not in LINEAR_DTYPES:
        raise ConfigError(f"unknown linear_dtype {linear_dtype!r}", where="Engine(linear_dtype=...)",
                          expected=LINEAR_DTYPES, got=linear_dtype,
                          fix="pass linear_dtype='fp8' for float8 linears, or None / 'bf16' for the model's own")
    if linear_dtype != "fp8":
        return None
    from graphrt.quant import Fp8Linear, quantize

    model = getattr(model, "_orig_mod", model)        # torch.compile's wrapper: its model's names
    if any(isinstance(m, Fp8Linear) for m in model.modules()):
        return getattr(model, "quantize_report", None)
    return quantize(model, "fp8")


def _session_groups(sessions, size):
    """Sessions in groups of at most ``size`` (the largest batch bucket): one batched chunk each."""
    return [sessions[i:i + size] for i in range(0, len(sessions), size)]


def auto_kv_buckets(model, quantized: bool = False) -> str:
    """``"max"`` (one graph per batch size) where attention skips the keys past each row's
    device length, so the longest graph costs nothing extra (flash-attn's ``cache_seqlens``);
    else ``"per-length"``: SDPA and flex compute every key of the graph's length, so the longest
    graph's attention costs several times the first chunk's, every chunk (measured:
    ``bench/results/design-numbers.md``), where a capture is paid once (and kept on disk).
    A ``quantized`` cache (int8/float8 K/V) is never read in place by flash-attn: each forward
    gathers and dequantizes ``kv_frames`` frames, the whole slab under ``"max"``, so it is
    ``"per-length"`` whatever the backend."""
    if quantized:
        return "per-length"
    return "max" if getattr(model, "attention_backend", None) == "flash" else "per-length"
