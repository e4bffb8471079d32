"""Interactive sessions: the KV re-cache after a prompt switch, and sessions started from given latents.

The Engine keeps each session's clean latents of the frames its slab holds (``cache.latents``, a
frame ring per slab beside the K/V, written by every chunk). A re-cache recomputes the
self-attention K/V of those frames under the session's current prompt: a clean pass over the kept
chunks in time order, each chunk at its own position attending the kept chunks before it and
itself (the sink and the window of a rolling cache, every frame of a static one), as LongLive's
KV re-cache does after a switch. A session opened with ``init_latents`` is re-cached the same way
before its first chunk, so a switch with re-cache equals starting from the same latents under the
new prompt.

A rolling cache past its first wrap holds its ring in turned order; the re-cache lays the kept
frames out oldest first (the slab's ``offset`` turns the ring to match), so that kept chunk ``j``
attends a prefix of the slab, as a normal chunk does. Each pass is one DiT forward of a bucket
(batch size, prefix length), captured as a graph in the graph modes; the host reads nothing from
the device, and several sessions switching before the same step are re-cached batched.
"""
from __future__ import annotations

import torch

from graphrt.errors import CacheError, ConfigError, InputError
from graphrt.kv import RollingKVCache
from graphrt.replay import Buckets
from graphrt.replay import compile as compile_graphs


def check_geometry(cfg, cache, where: str, fix: str = "pass recache=False (only cross-attention changes)") -> None:
    """A re-cache works on whole chunks: the sink and the ring of a rolling cache must hold whole
    chunks, and a model with per-chunk ``cond`` would need the kept chunks' conditioning."""
    if cfg.cond_dim:
        raise ConfigError(f"{where}: the re-cache of a model with per-chunk cond (cond_dim={cfg.cond_dim}) is not "
                          "supported: the kept chunks' conditioning is not kept", fix=fix)
    F = cfg.chunk_frames
    if isinstance(cache, RollingKVCache) and (cache.sink_frames % F or (cache.window_frames - cache.sink_frames) % F):
        raise CacheError(f"{where}: a re-cache needs a window of whole chunks: sink {cache.sink_frames} and ring "
                         f"{cache.window_frames - cache.sink_frames} frames are not multiples of {F}",
                         fix=f"build the Engine with window=(frames, sink_frames) both multiples of {F}, "
                             f"or {fix}")


def kept_chunks(cache, frames: int, chunk_frames: int) -> list[int]:
    """First frames of the chunks a slab at position ``frames`` still holds, oldest first."""
    if not isinstance(cache, RollingKVCache) or frames <= cache.window_frames:
        return list(range(0, frames, chunk_frames))
    ring = cache.window_frames - cache.sink_frames
    return list(range(0, cache.sink_frames, chunk_frames)) + list(range(frames - ring, frames, chunk_frames))


def ring_offset(cache, frames: int) -> int:
    """The turn (in frames) that puts the oldest kept ring chunk of a slab at ``frames`` first."""
    if not isinstance(cache, RollingKVCache) or frames <= cache.window_frames:
        return 0
    return (cache.sink_frames - frames) % (cache.window_frames - cache.sink_frames)


class Recache:
    """The re-cache of an :class:`~graphrt.pipeline.Engine`'s sessions (see the module docstring).

    ``latents`` [max_batch, C, slab_frames, H, W] and ``positions`` int64 [max_batch, slab chunks]
    are the staging rows the passes read: each session's kept latents in time order and the first
    frame of each kept chunk. :meth:`pass_function` is the graph-safe pass: one clean forward of
    kept chunk ``kv_frames / chunk_frames - 1`` for rows ``0..batch``.
    """

    def __init__(self, engine, graph_opts: dict | None):
        self.engine = engine
        cfg, cache = engine.cfg, engine.cache
        F = cfg.chunk_frames
        self.chunks = cache.slab_frames // F
        b = engine.batch_sizes[-1]
        dev = engine.device
        self.latents = torch.zeros(b, cfg.out_dim, self.chunks * F, cfg.height, cfg.width, device=dev,
                                   dtype=engine.dtype)
        self.positions = torch.zeros(b, self.chunks, dtype=torch.long, device=dev)
        self.choices = tuple((j + 1) * F for j in range(self.chunks))
        self.fn = self.pass_function
        self._graphed = graph_opts is not None
        if graph_opts is not None:
            self.fn = compile_graphs(self.pass_function, states=[cache], buckets=Buckets(
                static_args={"batch": engine.batch_sizes, "kv_frames": self.choices}), **graph_opts)

    @property
    def graphs(self):
        """The GraphedModule of the passes (None in eager mode)."""
        return self.fn if self._graphed else None

    def prewarm(self) -> None:
        """Capture every pass bucket now (batch sizes x slab chunks graphs), then seal."""
        if self.graphs is not None:
            self.graphs.prewarm(batch=self.engine.batch_sizes[-1], kv_frames=self.choices[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the staging rows (one set per engine)."""
        return self.latents.nbytes + self.positions.nbytes

    def pass_function(self, *, batch: int, kv_frames: int) -> torch.Tensor:
        engine = self.engine
        F = engine.cfg.chunk_frames
        j = kv_frames // F - 1
        x = self.latents[:batch, :, j * F:(j + 1) * F]
        # the flow is unused (a graph hands back a static output); the pass writes the K/V
        return engine.model(x, engine.context_t[:batch], cache=engine.cache, kv_frames=kv_frames, kv_exact=True,
                            positions=self.positions[:batch, j])

    @torch.no_grad()
    def run(self, sessions: list) -> int:
        """Re-cache ``sessions`` (resident, each at most once), batched by the largest bucket;
        returns the passes dispatched. Host work: index lists from the sessions' chunk counts."""
        engine = self.engine
        cache, F = engine.cache, engine.cfg.chunk_frames
        sessions = sorted((s for s in sessions if s.chunk), key=lambda s: -s.chunk)
        dispatches = 0
        size = engine.batch_sizes[-1]
        for start in range(0, len(sessions), size):
            group = sessions[start:start + size]
            kept = [kept_chunks(cache, s.chunk * F, F) for s in group]
            # host-side index rows, uploaded in one async copy (pinned on CUDA): the host never waits
            host = torch.zeros(size, 1 + self.chunks + self.chunks * F, dtype=torch.long)
            for r, (s, ks) in enumerate(zip(group, kept)):
                host[r, 0] = s.slab
                host[r, 1:1 + len(ks)] = torch.tensor(ks)
                host[r, 1 + self.chunks:1 + self.chunks + len(ks) * F] = \
                    (torch.tensor(ks)[:, None] + torch.arange(F)).flatten()
            if engine.device.type == "cuda":
                host = host.pin_memory()
            dev = host.to(engine.device, non_blocking=True)
            self.positions.copy_(dev[:, 1:1 + self.chunks])
            for r, (s, ks) in enumerate(zip(group, kept)):
                slab, frames = dev[r, :1], dev[r:r + 1, 1 + self.chunks:1 + self.chunks + len(ks) * F]
                data = cache.latents.index_select(0, cache.latent_index(slab, frames)[0])   # the old layout
                cache.offset[s.slab:s.slab + 1].fill_(ring_offset(cache, s.chunk * F))
                cache.latents.index_copy_(0, cache.latent_index(slab, frames)[0], data)      # oldest first
                self.latents[r, :, :data.shape[0]].copy_(data.transpose(0, 1))
            for j in range(len(kept[0])):
                rows = [s.slab for s, ks in zip(group, kept) if len(ks) > j]
                batch = next(b for b in engine.batch_sizes if b >= len(rows))
                cache.bind(rows)
                self.fn(batch=batch, kv_frames=(j + 1) * F)
                dispatches += 1
            for s in group:
                s.recache = False
        return dispatches


def check_init_latents(cfg, engine, latents, num_chunks) -> torch.Tensor:
    """``init_latents`` as the Engine's device and dtype, or a clear error: [1, C, n * chunk_frames,
    H, W] in the model dtype, a whole number of chunks that fits the cache and leaves chunks to make."""
    F = cfg.chunk_frames
    want = f"a tensor [1, {cfg.out_dim}, n * {F}, {cfg.height}, {cfg.width}] of {engine.dtype} (step()'s layout)"
    if not isinstance(latents, torch.Tensor):
        raise InputError("open(init_latents=...): latents must be a torch.Tensor", expected=want,
                         got=type(latents).__name__)
    if latents.device.type == "meta" or latents.dtype != engine.dtype:
        raise InputError("open(init_latents=...): latents of the wrong dtype", expected=want,
                         got=f"{latents.dtype} on {latents.device}", fix=f"latents.to({engine.dtype})")
    shape = tuple(latents.shape)
    if latents.dim() != 5 or shape[0] != 1 or shape[1] != cfg.out_dim or shape[3:] != (cfg.height, cfg.width) \
            or shape[2] < 1:
        raise InputError("open(init_latents=...): latents of the wrong shape", expected=want, got=list(shape),
                         fix="pass one session's latents as step() returns them (concatenated along frames)")
    if shape[2] % F:
        raise InputError(f"open(init_latents=...): {shape[2]} frames are not a whole number of {F}-frame chunks",
                         expected=f"a multiple of {F} frames", got=shape[2],
                         fix=f"pass whole chunks (drop the last {shape[2] % F} frames)")
    n = shape[2] // F
    if not isinstance(engine.cache, RollingKVCache) and shape[2] > cfg.max_frames:
        raise CacheError(f"open(init_latents=...): {shape[2]} frames do not fit max_frames={cfg.max_frames}",
                         fix="pass fewer frames, or build the Engine with window=(frames, sink_frames)")
    if num_chunks is not None and num_chunks <= n:
        raise InputError(f"open(init_latents=...): num_chunks={num_chunks} counts the {n} given chunks and "
                         "leaves none to make", expected=f"num_chunks > {n} (or None)", got=num_chunks)
    if not isinstance(engine.cache, RollingKVCache) and shape[2] + F > cfg.max_frames:
        raise CacheError(f"open(init_latents=...): {shape[2]} frames fill the slab ({cfg.max_frames} frames): "
                         "no chunk is left to make", fix="pass fewer frames, or use window=(frames, sink_frames)")
    if not torch.isfinite(latents).all():    # host-read-ok: an argument check, before anything is written
        raise InputError("open(init_latents=...): latents hold NaN or inf", got="non-finite values")
    return latents.to(engine.device)


def start_from(engine, session, latents: torch.Tensor) -> None:
    """Write ``latents`` (checked) as the first chunks of a just opened ``session``: its kept
    frames into its latent ring, its position past them; the clean pass runs as a re-cache before
    its next chunk."""
    cache, F = engine.cache, engine.cfg.chunk_frames
    frames = latents.shape[2]
    kept = kept_chunks(cache, frames, F)
    pos = (torch.tensor(kept)[:, None] + torch.arange(F)).flatten()
    slab = torch.full((1,), session.slab, dtype=torch.int32, device=engine.device)
    data = latents[0].transpose(0, 1).index_select(0, pos.to(latents.device))      # [n, C, H, W]
    cache.latents.index_copy_(0, cache.latent_index(slab, pos.to(engine.device)[None])[0], data)
    cache.frames[session.slab:session.slab + 1].fill_(frames)
    session.chunk = frames // F
    session.recache = True
