"""KV caches for chunk-by-chunk DiTs: static slabs, a rolling window, and cross-attention K/V.

A cache owns every tensor that changes from chunk to chunk, all on the device:

- ``k[layer]``/``v[layer]`` [slabs * slab_tokens + scratch_tokens, H, D]: per layer, a pool of slabs,
  one per session, then a scratch region (one chunk by default), where padded batch rows and warm-up
  runs write so they never touch a real session. A scratch row reads its region cyclically. One
  tensor per layer (not one for all layers), so a compiled forward writes in place instead of
  rewriting a whole stacked pool.
- ``k_scale[layer]``/``v_scale[layer]`` [same tokens, H]: with a quantized ``kv_dtype`` (``int8``,
  ``float8_e4m3fn``) the pools hold codes and these hold one symmetric scale per token and head
  (in the model dtype). A write quantizes, a read dequantizes the gathered tokens, so every
  attention backend sees model-dtype K/V and the graph structure does not change.
- ``block_table`` int32 [max_batch]: batch row -> slab (one block per row), so sessions join
  and leave without copying caches.
- ``frames`` int32 [slabs + 1]: committed latent frames per slab (the session's position).
- ``seqlens`` int32 [max_batch]: valid tokens per row after the latest write.
- ``offset`` int32 [slabs + 1]: frames a slab's ring is turned by (a rolling cache after a re-cache
  lays the kept frames out oldest first; 0 otherwise).
- ``latents`` [(slabs + 1) * slab_frames, C, H, W] (with ``keep_latents``): each session's clean
  latents of the frames its slab holds, frame by frame at the same slots as their K/V, so the K/V
  can be recomputed from them (a prompt switch's re-cache).
- ``cross_k``/``cross_v`` [layers, slabs + 1, text_len, H, D]: the text context's K/V, computed
  once per session (per prompt). They stay in the model dtype whatever ``kv_dtype`` is: a few
  percent of a session's bytes at 480p, read by every forward, and never re-encoded.

Under sequence parallelism each rank's cache holds the self-attention K/V of its own heads
(``num_heads`` = H/N, and with a quantized ``kv_dtype`` their scales) and the cross-attention
K/V of all heads (``cross_heads`` = H), since cross-attention runs on the rank's token shard
with every head.

A forward asks :meth:`step` once for the device indices every layer uses, writes with
``index_copy_`` and reads a static number of tokens chosen by its bucket. Nothing here reads
a device value on the host; slab bookkeeping (which slab a session owns) is host-side Python.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from graphrt.errors import CacheError, ConfigError, InputError

# storage dtypes that quantize, by name, and the largest code each holds
KV_DTYPES = {"int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn}
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def same_device(a, b) -> bool:
    """``cuda`` and ``cuda:0`` are one device when 0 is the current one; ``cuda:1`` is another."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    here = torch.cuda.current_device()
    return (here if a.index is None else a.index) == (here if b.index is None else b.index)


def resolve_kv_dtype(kv_dtype, dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of a cache's K/V: None (or the model ``dtype``) keeps K/V as computed;
    ``"int8"`` or ``"float8_e4m3fn"`` (names or torch dtypes) quantize per token and head."""
    if kv_dtype is None:
        return dtype
    if isinstance(kv_dtype, str):
        named = KV_DTYPES.get(kv_dtype) or getattr(torch, kv_dtype, None)
        kv_dtype = named if isinstance(named, torch.dtype) else kv_dtype
    if kv_dtype == dtype or kv_dtype in _QMAX:
        return kv_dtype
    raise InputError("unsupported kv_dtype", expected=f"None (the model dtype, {dtype}) or one of {list(KV_DTYPES)}",
                     got=kv_dtype, fix="store K/V in the model dtype, int8 or float8_e4m3fn")


def quantize(x: torch.Tensor, kv_dtype: torch.dtype, scale_dtype: torch.dtype):
    """Symmetric quantization of ``x`` [..., D] with one scale per vector: codes [..., D] in
    ``kv_dtype`` and scales [...] in ``scale_dtype`` with ``x ~= codes * scale``. Device-only."""
    qmax = _QMAX[kv_dtype]
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1).float()      # max |x|: one pass, exact
    scale = _round_scale(amax / qmax, scale_dtype).to(scale_dtype)
    q = torch.div(x, scale.float()[..., None])          # float32 out, without a float32 copy of x first
    if kv_dtype == torch.int8:
        q.round_()
    return q.clamp_(-qmax, qmax).to(kv_dtype), scale


def _round_scale(s: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Float32 scales ``s``, each exactly a ``scale_dtype`` value: rounded to nearest (even) in its
    normal range, up onto its subnormal grid below it, never zero.

    fp16's normal range ends at 6.1e-5, so a token with max |x| under 127 * 6.1e-5 needs a
    subnormal scale to keep all its code levels. Rounding up, not to nearest: a smaller scale
    would clip codes at ``qmax``. ``unit`` is a normal float32, so dividing by a scale never meets
    a float32 subnormal (GPU kernels may flush those to zero); for bf16 and fp32 this is just a
    clamp at float32's smallest normal. An all-zero token gets scale ``unit``, codes 0: exact zeros."""
    fi = torch.finfo(scale_dtype)
    unit = max(fi.smallest_normal * fi.eps, torch.finfo(torch.float32).smallest_normal)
    s = torch.where(s < fi.smallest_normal, torch.ceil(s / unit).clamp_min(1) * unit, s)
    drop = 23 - round(-math.log2(fi.eps))              # float32 mantissa bits the scale dtype lacks
    if drop:
        # round to nearest even here, so the cast to scale_dtype is exact: a fused kernel that
        # skips the cast (inductor keeps float32 in registers) still divides by the stored scale
        bits = s.view(torch.int32)
        s = ((bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)) & -(1 << drop)).view(torch.float32)
    return s


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale`` in ``dtype``. Codes and scales convert to ``dtype`` exactly, and their
    product is rounded once, so this equals the float32 product rounded to ``dtype``. int8 codes
    multiply as they are (one kernel); float8 has no type promotion, so it converts first."""
    scale = scale.to(dtype)[..., None]
    return codes * scale if codes.dtype == torch.int8 else codes.to(dtype) * scale


def _raw(t: torch.Tensor) -> torch.Tensor:
    """Float8 pools are indexed through a uint8 view: CPU ``index_copy_`` has no float8 kernel."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@dataclass(frozen=True)
class KVMemory:
    """Bytes a cache holds, from its tensors (exact on the meta device too, where nothing is allocated).

    ``per_session`` is one slab: its K/V codes and scales in every layer, its cross-attention K/V
    and its position. ``scratch`` is the scratch region (and its cross-attention row); ``state``
    the block table, lengths and index helpers. ``total = slabs * per_session + scratch + state``.
    """

    kv_dtype: str
    slabs: int
    per_session: int
    scratch: int
    state: int
    latents: int = 0                 # of per_session: the kept clean latents (``keep_latents``)

    @property
    def total(self) -> int:
        return self.slabs * self.per_session + self.scratch + self.state

    def slabs_within(self, budget: int) -> int:
        """How many slabs a cache like this one may have within ``budget`` bytes."""
        return max(0, (budget - self.scratch - self.state) // self.per_session)


@dataclass(frozen=True)
class CacheStep:
    """Device indices for one forward, built once and used by every layer."""

    batch: int
    kv_tokens: int                   # static KV length this forward reads (bucket-level)
    write_index: torch.Tensor        # int64 [B * query_tokens] into the flat slab-token axis
    read_index: torch.Tensor         # int64 [B * kv_tokens]
    block_table: torch.Tensor        # int32 [B] view of the cache's table
    positions: torch.Tensor          # int [B] first frame this forward writes, per row
    seqlens: torch.Tensor            # int32 [B] view of the cache's seqlens
    kv_exact: bool                   # every row has exactly kv_tokens valid: attend unmasked
    in_place: bool = False           # read K/V as a view of slab 0 (SlabKVCache.read_in_place)


class SlabKVCache:
    """Pool of per-session slabs; subclasses decide where token position ``p`` lands in a slab."""

    def __init__(self, *, num_layers: int, num_heads: int, head_dim: int, frame_tokens: int,
                 slab_frames: int, num_slabs: int = 1, max_batch: int | None = None, text_len: int = 0,
                 device=None, dtype=torch.float32, kv_dtype=None, align: int = 1,
                 scratch_frames: int | None = None, cross_heads: int | None = None,
                 keep_latents: tuple[int, int, int] | None = None):
        if num_slabs < 1:
            raise CacheError("a cache needs at least one slab", got=num_slabs)
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.cross_heads = num_heads if cross_heads is None else cross_heads
        self.frame_tokens = frame_tokens
        self.slab_frames = slab_frames
        self.slab_tokens = slab_frames * frame_tokens
        self.stride = -(-self.slab_tokens // align) * align   # allocated tokens per slab
        self.num_slabs = num_slabs
        self.scratch = num_slabs
        self.max_batch = max_batch or num_slabs
        self.text_len = text_len
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.kv_dtype = resolve_kv_dtype(kv_dtype, dtype)
        self.quantized = self.kv_dtype != dtype
        # flash-attn reads the pool as pages of `stride` tokens: then scratch must be a whole page
        small = scratch_frames is not None and align == 1
        self.scratch_tokens = min(scratch_frames * frame_tokens, self.stride) if small else self.stride
        self.scratch_base = num_slabs * self.stride
        if scratch_frames is not None and scratch_frames < 1:
            raise CacheError("scratch_frames must be at least 1", got=scratch_frames)
        shape = (self.scratch_base + self.scratch_tokens, num_heads, head_dim)
        kw = dict(device=self.device, dtype=dtype)
        qkw = dict(device=self.device, dtype=self.kv_dtype)
        self.k = [torch.zeros(shape, **qkw) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, **qkw) for _ in range(num_layers)]
        n = num_layers if self.quantized else 0
        self.k_scale = [torch.zeros(shape[:2], **kw) for _ in range(n)]
        self.v_scale = [torch.zeros(shape[:2], **kw) for _ in range(n)]
        cshape = (num_layers, num_slabs + 1, text_len, self.cross_heads, head_dim)
        self.cross_k = torch.zeros(cshape, **kw)
        self.cross_v = torch.zeros(cshape, **kw)
        ikw = dict(device=self.device, dtype=torch.int32)
        self.block_table = torch.full((self.max_batch,), self.scratch, **ikw)
        self.frames = torch.zeros(num_slabs + 1, **ikw)
        self.offset = torch.zeros(num_slabs + 1, **ikw)
        # keep_latents=(C, H, W): a frame ring of clean latents per slab (and scratch), slots as the K/V's
        self.latents = None if keep_latents is None else \
            torch.zeros(((num_slabs + 1) * slab_frames, *keep_latents), **kw)
        self.seqlens = torch.zeros(self.max_batch, **ikw)
        self._ones = torch.ones(self.max_batch, **ikw)
        self._saved_rows = torch.zeros(self.max_batch, **ikw)
        self._padding = False
        self._arange = torch.arange(self.slab_tokens, device=self.device)
        self._free = list(range(num_slabs))
        self._pending: dict[int, torch.cuda.Event] = {}    # slab -> its wipe on a copy stream
        # one slab, one row: attend the slab in place instead of gathering it (see :meth:`read`)
        self.read_in_place = False

    @classmethod
    def for_model(cls, model, **kw):
        """A cache shaped for a Wan model (its config, device and dtype); see :meth:`for_config`.
        Self-attention K/V hold the heads the model keeps on this process (``model.kv_heads``:
        H/N of N sequence-parallel ranks)."""
        kw.setdefault("num_heads", getattr(model, "kv_heads", model.cfg.num_heads))
        p = next(model.parameters())
        kw.setdefault("device", p.device)
        kw.setdefault("dtype", p.dtype)
        # flash-attn reads a plain pool in place as pages of 256 tokens; a quantized pool is read
        # through the dequantizing gather instead
        if getattr(model, "attention_backend", None) == "flash" and resolve_kv_dtype(
                kw.get("kv_dtype"), kw["dtype"]) == kw["dtype"]:
            kw.setdefault("align", 256)
        return cls.for_config(model.cfg, **kw)

    @classmethod
    def for_config(cls, cfg, *, dtype: torch.dtype, num_slabs: int = 1, max_batch: int | None = None,
                   frame_tokens: int | None = None, **kw):
        """A cache shaped for a Wan config. ``device="meta"`` builds it without memory (for sizing:
        see :meth:`memory`). ``keep_latents=True`` keeps each session's clean latents beside its K/V
        (``cfg.out_dim`` x ``cfg.height`` x ``cfg.width`` per frame). The scratch region holds one
        chunk (``cfg.chunk_frames``); pass ``scratch_frames`` for forwards that write more frames at once (a prefill). ``num_heads``
        may be a shard of the config's heads (a rank-local cache of N sequence-parallel ranks keeps
        H/N); the cross-attention K/V keep all of them (``cross_heads``, default the config's)."""
        kw.setdefault("scratch_frames", cfg.chunk_frames)
        kw.setdefault("num_heads", cfg.num_heads)
        kw.setdefault("cross_heads", cfg.num_heads)
        kw["keep_latents"] = (cfg.out_dim, cfg.height, cfg.width) if kw.get("keep_latents") else None
        if kw["num_heads"] < 1 or cfg.num_heads % kw["num_heads"]:
            raise ConfigError(f"num_heads={kw['num_heads']} is not a shard of the config's {cfg.num_heads} heads",
                              expected=f"H/N for N ranks that divide {cfg.num_heads}",
                              got=kw["num_heads"], fix="pass cfg.num_heads // ranks (or leave num_heads out)")
        return cls(num_layers=cfg.num_layers, head_dim=cfg.head_dim, frame_tokens=frame_tokens or cfg.frame_tokens,
                   num_slabs=num_slabs, max_batch=max_batch, text_len=cfg.text_len, dtype=dtype,
                   **cls._model_kw(cfg, kw))

    def check_model(self, cfg, dtype: torch.dtype, device: torch.device, heads: int | None = None) -> None:
        """Raise :class:`InputError` when this cache was built for another model, dtype or device.

        ``heads``: the self-attention heads the model keeps here (default all; H/N of N ranks)."""
        heads = cfg.num_heads if heads is None else heads
        want = (cfg.num_layers, heads, cfg.num_heads, cfg.head_dim, cfg.text_len, dtype, torch.device(device))
        got = (self.num_layers, self.num_heads, self.cross_heads, self.head_dim, self.text_len, self.dtype,
               self.device)
        if want[:6] != got[:6] or not same_device(want[6], got[6]):
            raise InputError("the cache does not fit this model", expected="layers, heads, cross heads, head_dim, "
                             f"text_len, dtype, device = {want}", got=got,
                             fix="build it with Cache.for_model(model, ...) (after sequence_parallel(model), "
                                 "when the model runs on several ranks)")

    @staticmethod
    def _model_kw(cfg, kw):
        return kw

    # -- memory ------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this cache owns, by name (for static-address marking and byte counts)."""
        out = {f"{kind}.{i}": t for kind in ("k", "v", "k_scale", "v_scale") for i, t in enumerate(getattr(self, kind))}
        if self.latents is not None:
            out.update(latents=self.latents)
        out.update(cross_k=self.cross_k, cross_v=self.cross_v, **self.state(), _ones=self._ones,
                   _saved_rows=self._saved_rows, _arange=self._arange)
        return out

    def memory(self) -> KVMemory:
        """Bytes held, per session and in all (see :class:`KVMemory`)."""
        views = self.slab_tensors(0)
        per_session = sum(t.nbytes for t in views.values())
        latents = views["latents"].nbytes if "latents" in views else 0
        scratch = sum(t.nbytes for t in self._scratch_views()) + 2 * self.cross_k[:, self.scratch].nbytes + latents
        total = sum(t.nbytes for t in self.tensors().values())
        state = total - self.num_slabs * per_session - scratch
        return KVMemory(str(self.kv_dtype).removeprefix("torch."), self.num_slabs, per_session, scratch, state,
                        latents)

    def _scratch_views(self) -> list[torch.Tensor]:
        rows = slice(self.scratch_base, None)
        return [t[rows] for t in self.k + self.v + self.k_scale + self.v_scale]

    # -- where tokens land -----------------------------------------------------------------
    def _slot(self, p: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Slab slot of token position ``p`` for rows whose ring is turned by ``offset`` tokens."""
        raise NotImplementedError

    def _filled(self, end_tokens: torch.Tensor) -> torch.Tensor:
        """Valid tokens in a slab whose timeline ends at ``end_tokens``."""
        raise NotImplementedError

    def _ring_tokens(self) -> int:
        """Tokens one write may span without overwriting itself."""
        return self.slab_tokens

    # -- host-side slab bookkeeping ----------------------------------------------------------
    @property
    def free_slabs(self) -> int:
        """Slabs not held by a session (what many ``acquire()`` calls can still take)."""
        return len(self._free)

    def acquire(self) -> int:
        """Take a free slab for a new session; its position starts at frame 0."""
        if not self._free:
            raise CacheError(f"all {self.num_slabs} slabs are in use", fix="release a finished session's slab or "
                             "build the cache with more num_slabs")
        slab = self._free.pop(0)
        wiped = self._pending.pop(slab, None)
        if wiped is not None:          # the device waits for the wipe; the host does not
            torch.cuda.current_stream(self.device).wait_event(wiped)
        self.frames[slab:slab + 1].zero_()      # a kernel: indexing with a host int would sync
        self.offset[slab:slab + 1].zero_()
        return slab

    def release(self, slab: int, wipe: bool = True, stream: torch.cuda.Stream | None = None) -> None:
        """Give a slab back. ``wipe`` zeroes its K/V so nothing of the session stays behind.

        With a CUDA ``stream`` the wipe runs there, after whatever that stream already holds (a
        copy of the slab to the host), and the next :meth:`acquire` of the slab waits for it on
        the device: the host never blocks, other sessions keep running."""
        if not 0 <= slab < self.num_slabs or slab in self._free:
            raise CacheError(f"slab {slab} is not held", expected=f"a slab taken with acquire() (0..{self.num_slabs - 1})")
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for t in self.slab_tensors(slab).values() if wipe else (self.frames[slab:slab + 1],):
                t.zero_()
            if stream is not None:
                self._pending[slab] = stream.record_event()
        self._free.append(slab)
        self._free.sort()

    def bind(self, slabs) -> None:
        """Point batch rows 0.. at ``slabs`` (host ints); the rest point at the scratch slab."""
        slabs = list(slabs)
        if len(slabs) > self.max_batch:
            raise CacheError(f"{len(slabs)} rows bound, the cache serves at most {self.max_batch}")
        if any(not 0 <= s <= self.scratch for s in slabs):
            raise CacheError("slab index out of range", expected=f"0..{self.num_slabs - 1} (or scratch {self.scratch})",
                             got=slabs)
        rows = slabs + [self.scratch] * (self.max_batch - len(slabs))
        src = torch.tensor(rows, dtype=torch.int32, device="cpu")    # host-side on purpose: uploaded below
        if self.device.type == "cuda":
            src = src.pin_memory()   # an async copy: the host does not wait for queued chunks
        self.block_table.copy_(src, non_blocking=True)

    def slab_views(self, slab: int) -> list[torch.Tensor]:
        """Views of one slab's K and V in every layer, [slab tokens, H, D] each (K first, then V),
        then, when quantized, their scales [slab tokens, H]."""
        rows = slice(slab * self.stride, (slab + 1) * self.stride)
        return [t[rows] for t in self.k + self.v + self.k_scale + self.v_scale]

    def slab_tensors(self, slab: int) -> dict[str, torch.Tensor]:
        """Every view that belongs to one session's slab, by name: its K/V (and scales) in every
        layer, its cross-attention K/V, its position, its ring's :attr:`offset` and its kept latents (with
        ``keep_latents``). What suspend copies out and resume in."""
        if not 0 <= slab < self.num_slabs:
            raise CacheError(f"slab {slab} out of range", expected=f"0..{self.num_slabs - 1}")
        rows = slice(slab * self.stride, (slab + 1) * self.stride)
        out = {f"{kind}.{i}": t[rows] for kind in ("k", "v", "k_scale", "v_scale")
               for i, t in enumerate(getattr(self, kind))}
        out.update(cross_k=self.cross_k[:, slab], cross_v=self.cross_v[:, slab], frames=self.frames[slab:slab + 1],
                   offset=self.offset[slab:slab + 1])
        if self.latents is not None:
            out.update(latents=self.latents[slab * self.slab_frames:(slab + 1) * self.slab_frames])
        return out

    def paged(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a layer as pages of one slab each, [slabs + 1, stride, H, D] (flash-attn's
        ``block_table`` layout; needs a whole-page scratch, which ``align > 1`` gives)."""
        if self.quantized:
            raise CacheError(f"a {self.kv_dtype} cache holds codes and scales, not K/V pages",
                             fix="read it with cache.read(layer, step) (dequantizes the gathered tokens)")
        if self.scratch_tokens != self.stride:
            raise CacheError("this cache's scratch region is not a whole page",
                             fix="build it with align=256 (as for_model does when flash-attn is the backend)")
        shape = (self.num_slabs + 1, self.stride, self.num_heads, self.head_dim)
        return self.k[layer].view(shape), self.v[layer].view(shape)

    def set_cross(self, slab: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a session's cross-attention K/V ([layers, text_len, H, D]) in its slab."""
        expected = (self.num_layers, self.text_len, self.cross_heads, self.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise InputError("cross-attention K/V have the wrong shape", expected=list(expected), got=list(k.shape))
        self.cross_k[:, slab].copy_(k)
        self.cross_v[:, slab].copy_(v)

    # -- one forward ---------------------------------------------------------------------------
    def step(self, batch: int, query_frames: int, frame_tokens: int, kv_frames: int | None = None,
             kv_exact: bool = False, positions: torch.Tensor | None = None) -> CacheStep:
        """Indices for a forward of ``batch`` rows writing ``query_frames`` frames at each row's position.

        ``kv_frames`` (static, from the bucket) is how many frames the forward attends; None
        reads the whole slab, masked. ``kv_exact`` promises that every row has exactly that many
        valid frames (the normal chunk-by-chunk case), so attention runs unmasked.
        ``positions`` (int [B] on the device) overrides the slab positions.
        """
        if frame_tokens != self.frame_tokens:
            raise InputError("latents do not match the cache's tokens per frame", expected=self.frame_tokens,
                             got=frame_tokens, fix="build the cache for this latent size (frame_tokens=...)")
        if not 1 <= batch <= self.max_batch:
            raise InputError("batch larger than the cache serves", expected=f"<= {self.max_batch}", got=batch,
                             fix="build the cache with a larger max_batch")
        if query_frames * self.frame_tokens > self.scratch_tokens:
            raise InputError("chunk longer than the cache's scratch region",
                             expected=f"<= {self.scratch_tokens // frame_tokens} frames", got=query_frames,
                             fix="build the cache with scratch_frames >= the chunk")
        if query_frames * self.frame_tokens > self._ring_tokens():
            raise InputError("chunk longer than the slab's ring", expected=f"<= {self._ring_tokens() // frame_tokens} "
                             "frames", got=query_frames, fix="use a larger window (minus sink) than a chunk")
        if kv_frames is None or kv_frames > self.slab_frames:     # (not min(): a compile with the KV
            kv_frames = self.slab_frames                            # length symbolic then serves the slab's)
        if kv_frames < query_frames:
            raise InputError("kv_frames is shorter than the chunk it must include",
                             expected=f">= {query_frames}", got=kv_frames)
        T = self.frame_tokens
        bt = self.block_table[:batch]
        pos = self.frames.index_select(0, bt) if positions is None else positions
        rows = bt.long()[:, None]
        base = rows * self.stride                     # the scratch row's base is scratch_base
        scratch_row = rows == self.scratch
        start = pos.long()[:, None] * T
        slot = self._slot(start + self._arange[:query_frames * T], self.offset.index_select(0, bt).long()[:, None] * T)
        # padding rows, and a row past the end of its slab, write to scratch: never into a neighbour
        write_index = torch.where(scratch_row | (slot >= self.slab_tokens),
                                  self.scratch_base + slot % self.scratch_tokens, base + slot).flatten()
        kv_tokens = kv_frames * T
        span = self._arange[:kv_tokens]
        read_index = torch.where(scratch_row, self.scratch_base + span % self.scratch_tokens, base + span).flatten()
        seqlens = self.seqlens[:batch]
        if kv_exact:                                  # the promise: every row holds exactly kv_tokens
            seqlens.fill_(kv_tokens)
        else:
            seqlens.copy_(self._filled(start[:, 0] + query_frames * T))
        in_place = self.read_in_place and self.num_slabs == 1 and batch == 1 and not self.quantized
        return CacheStep(batch, kv_tokens, write_index, read_index, bt, pos, seqlens, kv_exact, in_place)

    def write(self, layer: int, step: CacheStep, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this forward's K/V ([B, query_tokens, H, D]) at the step's device indices
        (quantized first, with their scales, when the cache is)."""
        shape = (-1, self.num_heads, self.head_dim)
        for pools, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            x = x.reshape(shape)
            if not self.quantized:
                pools[layer].index_copy_(0, step.write_index, x.to(self.dtype))
                continue
            codes, scale = quantize(x, self.kv_dtype, self.dtype)
            _raw(pools[layer]).index_copy_(0, step.write_index, _raw(codes))
            scales[layer].index_copy_(0, step.write_index, scale)

    def read(self, layer: int, step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Gathered K/V [B, kv_tokens, H, D] for the step's rows, in the model dtype (dequantized
        here when the cache is quantized: only the tokens this bucket reads).

        With :attr:`read_in_place` set on a one-slab, unquantized cache, a one-row step reads a view
        of the slab's first ``kv_tokens`` rows instead: no gather copy per layer, the same values
        (the row's read index is exactly that range), bit-identical attention. It reads the slab
        whatever the block table says, so set it only where the one row is always the slab when
        its output is used (an :class:`~graphrt.pipeline.Engine` of one session slab: its warm-ups
        point the row at scratch, and their outputs are discarded)."""
        out = (step.batch, step.kv_tokens, self.num_heads, self.head_dim)
        if step.in_place:
            return self.k[layer][:step.kv_tokens].view(out), self.v[layer][:step.kv_tokens].view(out)
        if not self.quantized:
            return (self.k[layer].index_select(0, step.read_index).view(out),
                    self.v[layer].index_select(0, step.read_index).view(out))
        idx = step.read_index
        return tuple(dequantize(_raw(pools[layer]).index_select(0, idx).view(pools[layer].dtype),
                                scales[layer].index_select(0, idx), self.dtype).view(out)
                     for pools, scales in ((self.k, self.k_scale), (self.v, self.v_scale)))

    def cross(self, layer: int, step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' cross-attention K/V [B, text_len, H, D]."""
        return (self.cross_k[layer].index_select(0, step.block_table),
                self.cross_v[layer].index_select(0, step.block_table))

    def latent_index(self, slabs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows of :attr:`latents` (int64 [B, n]) holding frame ``positions`` (int [B, n], on the
        device) of ``slabs`` (int [B]); scratch rows, and frames past a static slab, go to scratch."""
        T = self.frame_tokens
        rows = slabs.long()[:, None]
        slot = self._slot(positions.long() * T, self.offset.index_select(0, slabs.int()).long()[:, None] * T) // T
        scratch = (rows == self.scratch) | (slot >= self.slab_frames)
        return torch.where(scratch, self.scratch * self.slab_frames + slot % self.slab_frames,
                           rows * self.slab_frames + slot)

    def keep(self, batch: int, latents: torch.Tensor) -> None:
        """Keep the clean ``latents`` [B, C, F, H, W] of the chunk rows ``0..batch`` are writing (at
        their slabs' positions, before :meth:`commit`) in :attr:`latents`. Device-only."""
        if self.latents is None:
            return
        bt = self.block_table[:batch]
        f = latents.shape[2]
        pos = self.frames.index_select(0, bt).long()[:, None] + self._arange[:f]
        self.latents.index_copy_(0, self.latent_index(bt, pos).flatten(),
                                 latents.transpose(1, 2).reshape(-1, *self.latents.shape[1:]).to(self.dtype))

    def commit(self, batch: int, frames: int) -> None:
        """Advance the rows' slabs by ``frames`` (the chunk just written is now context)."""
        self.frames.index_add_(0, self.block_table[:batch], self._ones[:batch], alpha=frames)
        self.frames[self.scratch:].zero_()

    # -- runtime state ------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """The small tensors that say where every session stands (not the K/V data)."""
        return {"block_table": self.block_table, "frames": self.frames, "seqlens": self.seqlens, "offset": self.offset}

    def snapshot(self, data: bool = False) -> dict[str, torch.Tensor]:
        """Clones of the state; ``data=True`` adds the K/V pool (costly: used to verify replays)."""
        tensors = dict(self.state())
        if data:
            tensors.update({name: t for name, t in self.tensors().items() if not name.startswith("_")})
        return {k: t.clone() for k, t in tensors.items()}

    def restore(self, snap: dict[str, torch.Tensor]) -> None:
        for name, t in snap.items():
            kind, _, layer = name.partition(".")
            (getattr(self, kind)[int(layer)] if layer else getattr(self, name)).copy_(t)

    @contextlib.contextmanager
    def pad_rows(self, start: int, stop: int):
        """Point batch rows ``start:stop`` (padding) at the scratch slab for one replay, then put
        the caller's rows back (through a preallocated buffer: nothing is allocated)."""
        if self._padding:
            raise CacheError("pad_rows() is already active on this cache", fix="do not nest padded replays")
        saved = self._saved_rows[start:stop]
        saved.copy_(self.block_table[start:stop])
        self.block_table[start:stop].fill_(self.scratch)
        self._padding = True
        try:
            yield
        finally:
            self.block_table[start:stop].copy_(saved)
            self._padding = False

    def reset(self) -> None:
        """Empty every session (positions, lengths, block table) for new videos; keeps the memory."""
        self.frames.zero_()
        self.seqlens.zero_()
        self.offset.zero_()
        self.block_table.fill_(self.scratch)
        self._free = list(range(self.num_slabs))

    @contextlib.contextmanager
    def capture_guard(self):
        """Point every batch row at the scratch slab while warm-up and capture run.

        K/V writes of warm-up runs then land in scratch, never in a session's slab; the runtime
        restores positions and lengths from its snapshot. The captured graph reads the block
        table on the device at replay, so what it holds during capture does not matter.
        """
        table = self.block_table.clone()
        self.block_table.fill_(self.scratch)
        try:
            yield
        finally:
            self.block_table.copy_(table)
            self.frames[self.scratch:].zero_()


class StaticKVCache(SlabKVCache):
    """One slab per session holding its whole timeline (``max_frames`` frames)."""

    def __init__(self, *, max_frames: int, **kw):
        super().__init__(slab_frames=max_frames, **kw)
        self.max_frames = max_frames

    @staticmethod
    def _model_kw(cfg, kw):
        return {"max_frames": cfg.max_frames, **kw}

    def _slot(self, p, offset):
        return p

    def _filled(self, end_tokens):
        return end_tokens.clamp(max=self.slab_tokens).to(torch.int32)


class RollingKVCache(SlabKVCache):
    """Attention sink plus a ring buffer, for videos longer than the window.

    A slab holds ``window_frames`` frames: the first ``sink_frames`` of the video stay forever,
    the rest is a ring. Token ``p`` past the sink lands at ``sink + (p - sink) % ring`` (computed
    on the device), so once the window is full the newest chunk overwrites the oldest non-sink
    chunk in place. Keys are stored after RoPE, so slot order does not change attention.
    """

    def __init__(self, *, window_frames: int, sink_frames: int = 0, **kw):
        if not 0 <= sink_frames < window_frames:
            raise CacheError("the sink must be shorter than the window", got=f"sink={sink_frames}, window={window_frames}")
        super().__init__(slab_frames=window_frames, **kw)
        self.window_frames, self.sink_frames = window_frames, sink_frames
        self.sink_tokens = sink_frames * self.frame_tokens
        self.ring_tokens = self.slab_tokens - self.sink_tokens

    @classmethod
    def for_model(cls, model, *, window_frames: int, sink_frames: int = 0, **kw):
        return super().for_model(model, window_frames=window_frames, sink_frames=sink_frames, **kw)

    def _ring_tokens(self):
        return self.ring_tokens

    def _slot(self, p, offset):
        return torch.where(p < self.sink_tokens, p,
                           self.sink_tokens + (p - self.sink_tokens + offset) % self.ring_tokens)

    def _filled(self, end_tokens):
        return end_tokens.clamp(max=self.slab_tokens).to(torch.int32)
