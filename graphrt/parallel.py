"""Sequence parallelism for the causal Wan DiT over ``torch.distributed``: Ulysses attention.

N ranks run one program on the same inputs (``torchrun --nproc-per-node N``): the same Engine,
sessions, seeds and buckets, so the chunk loop, the noise and every captured graph are the same
on each rank. Only the DiT is split. Each rank keeps 1/N of a chunk's tokens through every block:
the projections, cross-attention over the text and the FFN run on that token shard. Around
self-attention an all-to-all turns the token shards into head shards (every token, H/N heads),
attention runs over the rank's own KV cache, which holds those H/N heads only (K/V memory per
rank divides by N), and a second all-to-all turns the output back into a token shard. RoPE is
computed for the whole chunk and sliced, so each rank's tokens keep their positions. After the
head, the tokens are gathered: every rank holds the chunk's whole output (rank 0 reports it).

The collectives are torch's functional collectives (the ``_c10d_functional`` ops): the graph-safe
forward calls them like any aten op, so

- the CPU graph emulation traces them (``make_fx``) and replays them, over gloo;
- a CUDA graph captures them over NCCL (one process group; its communicator is created by the
  start-up handshake, and capture's warm-up runs every collective before capture);
- inductor compiles them.

Everything here is decided at start-up, before any graph: :func:`sequence_parallel` checks that
every rank holds the same config and weights, that the heads and a chunk's tokens divide by N,
and fails on every rank with the same error rather than hanging one of them. The Engine does the
same for its own arguments (:meth:`Ulysses.check_engine`) and for each session's inputs
(:meth:`Ulysses.check_open`): ranks that batch, seed or quantize differently would otherwise
crash mid-run on a collective mismatch, hang on NCCL, or return different, wrong videos. Every
handshake is one small host collective over a gloo group (the model's group when it is gloo, a
gloo side group when it is NCCL), outside any graph, so a peer that died ends it at once.

:func:`kv_bytes_per_rank` sizes a rank's cache with :mod:`graphrt.kv` itself (on the meta device),
for any ``kv_dtype``.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from graphrt.errors import ConfigError, InputError, ParallelError
from graphrt.kv import StaticKVCache

_c10d = torch.ops._c10d_functional


@dataclass(frozen=True)
class Ulysses:
    """One rank's part of a sequence-parallel DiT: its token shard and the all-to-alls around
    self-attention. Built by :func:`sequence_parallel`; the model holds it as ``model.parallel``."""

    group: dist.ProcessGroup
    rank: int
    world: int
    host_group: dist.ProcessGroup | None = None     # gloo, for the handshakes (None: ``group``)

    @property
    def group_name(self) -> str:
        return self.group.group_name

    # -- handshakes ----------------------------------------------------------------------------
    def check_engine(self, engine, *, window, inductor, backend, verify) -> None:
        """Raise :class:`ConfigError` on every rank unless every rank built the same Engine:
        the resolved slabs, batch sizes, mode, K/V dtype, window, schedule, K/V buckets and
        compile options (anything that changes which collectives run, or what they carry)."""
        def mine() -> dict:
            return {"max_sessions": engine.cache.num_slabs, "batch_sizes": tuple(engine.batch_sizes),
                    "mode": engine.mode, "kv_dtype": str(engine.cache.kv_dtype).removeprefix("torch."),
                    "window": None if window is None else tuple(window), "schedule": repr(engine.schedule),
                    "kv_buckets": engine.kv_buckets, "kv_frames": tuple(engine.kv_choices),
                    "inductor": repr(inductor), "backend": repr(backend), "verify": repr(verify)}
        self._same("building the Engine", mine, ConfigError,
                   fix="build the Engine with the same arguments on every rank (a memory_budget given as a "
                       "fraction sizes the slabs from each device's free memory: pass max_sessions or bytes)")

    def check_open(self, context, *, seed, prompt, num_chunks, schedule) -> None:
        """Raise :class:`InputError` on every rank unless every rank opens the same session: the
        same seed, prompt key, length, schedule and text context (shape, dtype and a digest of
        its bytes). Called first in :meth:`~graphrt.pipeline.Engine.open`, on its raw arguments,
        so that a failing check, and every check after it, fails alike on every rank."""
        def mine() -> dict:
            return {"seed": repr(seed), "prompt": repr(prompt), "num_chunks": repr(num_chunks),
                    "schedule": repr(schedule), **_describe(context)}
        self._same("open()", mine, InputError,
                   fix="open every session with the same context, seed, prompt, num_chunks and schedule on "
                       "every rank, in the same order (every rank runs the same program)")

    def _same(self, what: str, mine: Callable[[], dict], error: type, fix: str) -> None:
        everyone = _gather(self.host_group or self.group, mine, what)
        keys = sorted({k for d in everyone for k in d})
        diff = [k for k in keys if any(d.get(k) != everyone[0].get(k) for d in everyone)]
        if diff:
            raise error(f"{what}: the ranks differ in {', '.join(diff)}", expected="the same on every rank",
                        got="; ".join(f"rank {r}: {_show(d, diff)}" for r, d in enumerate(everyone)), fix=fix)

    # -- token shards ---------------------------------------------------------------------------
    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's 1/N of the tokens of ``x`` [B, L, ...] (a view)."""
        n = x.shape[1]
        if n % self.world:
            raise InputError(f"{n} tokens per chunk do not divide among {self.world} sequence-parallel ranks",
                             expected=f"a multiple of {self.world} (latent frames x tokens per frame)", got=n,
                             fix="pick a latent size or chunk length whose token count divides by the ranks")
        size = n // self.world
        return x.narrow(1, self.rank * size, size)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's token shard of ``x`` [B, L/N, C], in rank order -> [B, L, C] on every rank."""
        b, s = x.shape[:2]
        full = _c10d.wait_tensor(_c10d.all_gather_into_tensor(x.contiguous(), self.world, self.group_name))
        return full.view(self.world, b, s, *x.shape[2:]).transpose(0, 1).reshape(b, self.world * s, *x.shape[2:])

    # -- Ulysses all-to-alls --------------------------------------------------------------------
    def to_heads(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        """Token shards [B, L/N, H, D] -> every token of this rank's heads [B, L, H/N, D], one
        all-to-all for all of ``xs`` (q, k and v together). Rank r gets heads r*H/N..(r+1)*H/N."""
        b, s, h, d = xs[0].shape
        n = self.world
        # one copy lays out the send buffer: [N dest, X, B, S, H/N, D]
        x = torch.stack([t.unflatten(2, (n, h // n)).permute(2, 0, 1, 3, 4) for t in xs], dim=1)
        y = self._all_to_all(x)                                           # [N source, X, B, S, H/N, D]
        return list(y.permute(1, 2, 0, 3, 4, 5).reshape(len(xs), b, n * s, h // n, d).unbind(0))

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Every token of this rank's heads [B, L, H/N, D] -> this rank's tokens, all heads [B, L/N, H, D]."""
        b, l, h, d = x.shape
        n = self.world
        y = self._all_to_all(x.unflatten(1, (n, l // n)).transpose(0, 1))  # [N source heads, B, S, H/N, D]
        return y.permute(1, 2, 0, 3, 4).reshape(b, l // n, n * h, d)

    def _all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Block i of ``x`` [N, ...] goes to rank i; block j of the result came from rank j."""
        splits = [1] * self.world
        out = _c10d.all_to_all_single(x.contiguous(), splits, splits, self.group_name)
        return _c10d.wait_tensor(out)


# -- start-up ------------------------------------------------------------------------------------
def init_distributed(device: str | torch.device | None = None, timeout_s: float = 300.0) -> torch.device:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...).

    NCCL on CUDA (this process's GPU is ``LOCAL_RANK`` unless ``device`` names one; the
    communicator is created now, before any capture), gloo on the CPU. ``timeout_s`` bounds every
    collective, so a rank that dies never leaves the others waiting for long. Returns this
    rank's device.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError("not launched as one of several ranks", got=f"{', '.join(missing)} unset",
                          fix="launch with torchrun --nproc-per-node N ... (or set the variables yourself)")
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return device


def sequence_parallel(model, group: dist.ProcessGroup | None = None):
    """Split ``model`` (a :class:`~graphrt.models.wan.CausalWan`) over the ranks of ``group``
    (default: every rank) and return it. Call it on every rank, after the weights are loaded
    and before any cache or Engine is built (caches size their heads from the model).

    Start-up is one handshake: every rank must hold the same config, dtype, device type,
    attention backend and weights, the heads and a chunk's tokens must divide by the ranks, and
    a rank that failed before or during the handshake makes every other rank raise too.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("torch.distributed is not initialized",
                          fix="call graphrt.parallel.init_distributed() (under torchrun) or "
                              "torch.distributed.init_process_group(...) first")
    group = group or dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if getattr(model, "parallel", None) is not None:
        raise ConfigError("the model is already sequence-parallel", got=f"{model.parallel.world} ranks",
                          fix="call sequence_parallel(model) once per model")
    host = _host_group(group)
    everyone = _gather(host, lambda: _fingerprint(model), "at start-up")
    for r, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            diff = sorted(k for k in everyone[0] if theirs.get(k) != everyone[0][k])
            raise ConfigError(f"rank {r} holds another model than rank 0 ({', '.join(diff)} differ)",
                              expected=f"rank 0: {_show(everyone[0], diff)}", got=f"rank {r}: {_show(theirs, diff)}",
                              fix="build the same model on every rank: same config, dtype, attention backend, "
                                  "checkpoint (or torch.manual_seed before random weights)")
    cfg = model.cfg
    if cfg.num_heads % world:
        raise ConfigError(f"num_heads={cfg.num_heads} does not divide among {world} ranks",
                          expected=f"a rank count that divides {cfg.num_heads}: {_divisors(cfg.num_heads)}",
                          got=world, fix="launch with --nproc-per-node set to one of those")
    tokens = cfg.chunk_frames * cfg.frame_tokens
    if tokens % world:
        raise ConfigError(f"a chunk's {tokens} tokens ({cfg.chunk_frames} frames x {cfg.frame_tokens}) do not "
                          f"divide among {world} ranks", got=world,
                          expected=f"a rank count that divides {tokens}: {_divisors(tokens)}",
                          fix="change the rank count, the latent size or chunk_frames")
    model.parallel = Ulysses(group, rank, world, host_group=None if host is group else host)
    return model


def _fingerprint(model) -> dict:
    """What every rank must agree on: config, dtype, device type, attention backend, weights
    (per parameter, a digest of its bytes by position: exact, computed on the device, one host
    read at start-up)."""
    params = list(model.parameters())
    digest = torch.stack([_digest(p) for p in params])
    return {**{f"config.{k}": v for k, v in dataclasses.asdict(model.cfg).items()},
            "dtype": str(params[0].dtype), "device": params[0].device.type, "attention": model.attention_backend,
            "weights": digest.tolist()}  # host-read-ok: start-up, never in a forward


_DIGEST_CHUNK = 1 << 22     # bytes per step: the int64 temporaries stay at 32 MiB each
_DIGEST_MOD = 65521         # the largest prime below 2**16: a byte's weight is 1 + its offset mod this


def _digest(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim int64 on ``t``'s device: the sum of ``t``'s bytes, each times a weight set by its
    offset, so the same bytes in another order (a transposed square weight, swapped rows) give
    another digest; a plain sum could not tell them apart. Integer arithmetic, so it is exact and
    the same on every device (it cannot overflow below 2**43 bytes)."""
    u8 = t.detach().contiguous().reshape(-1).view(torch.uint8)
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, u8.numel(), _DIGEST_CHUNK):
        part = u8[start:start + _DIGEST_CHUNK]
        weight = torch.arange(start, start + part.numel(), device=t.device) % _DIGEST_MOD + 1
        total += (part.long() * weight).sum()
    return total


def _describe(context) -> dict:
    """A text context as the ranks compare it: shape, dtype and digest (type alone if no tensor)."""
    if not isinstance(context, torch.Tensor):
        return {"context": type(context).__name__}
    out = {"context.shape": tuple(context.shape), "context.dtype": str(context.dtype).removeprefix("torch.")}
    if context.device.type != "meta":
        out["context.digest"] = int(_digest(context))   # host-read-ok: open(), outside any graph
    return out


def _host_group(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """The group the handshakes run on: gloo (``group`` itself when it is). Over NCCL a host
    handshake would need the device, and a peer that died would leave the others waiting out
    the timeout; gloo sees the closed connection at once. Same ranks, same timeout."""
    if dist.get_backend(group) == "gloo":
        return group
    timeout = None
    try:    # the NCCL group's timeout (no public getter; the gloo default would be 30 minutes)
        timeout = group._get_backend(torch.device("cuda")).options._timeout
    except Exception:
        pass
    return dist.new_group(dist.get_process_group_ranks(group), timeout=timeout, backend="gloo",
                          use_local_synchronization=True)


def _gather(group, mine: Callable[[], dict], what: str) -> list[dict]:
    """Every rank's ``mine()``, in rank order. A rank whose ``mine()`` raises tells the others
    (they raise :class:`ParallelError`) and then raises its own error, so none waits."""
    try:
        value = mine()
    except Exception as e:
        _agree(group, {"failed": f"{type(e).__name__}: {e}"}, what)
        raise
    return _agree(group, value, what)


def _agree(group, mine: dict, what: str) -> list[dict]:
    """Every rank's ``mine``, in rank order; raises on every rank when one rank failed."""
    everyone: list = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(everyone, mine, group=group)
    except (RuntimeError, dist.DistError) as e:
        raise ParallelError(f"the sequence-parallel handshake {what} failed: another rank exited or never got "
                            "here", got=(str(e).splitlines() or [""])[0],
                            fix="read the other ranks' output for the first error; every rank must make the "
                                "same calls in the same order (sequence_parallel, Engine(...), open(...))") from e
    for r, theirs in enumerate(everyone):
        if "failed" in theirs and "failed" not in mine:
            raise ParallelError(f"rank {r} failed {what}", got=theirs["failed"],
                                fix=f"fix rank {r}'s error; every rank stops here so none waits forever")
    return everyone


def _show(d: dict, keys) -> str:
    return ", ".join("weights digest differs" if k == "weights" else f"{k}={d.get(k)}" for k in keys)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


# -- memory --------------------------------------------------------------------------------------
def kv_bytes_per_rank(cfg, ranks: int = 1, *, dtype: torch.dtype = torch.bfloat16, sessions: int = 1,
                      **kw) -> dict[str, int]:
    """Bytes of the :class:`~graphrt.StaticKVCache` one of ``ranks`` sequence-parallel ranks
    allocates for ``sessions`` slabs: the cache itself, built on the meta device with H/N
    self-attention heads (and, quantized, their scales) and all H cross-attention heads, so this
    is what :meth:`~graphrt.kv.SlabKVCache.memory` reports for a rank's Engine. ``kw`` goes to
    :meth:`~graphrt.kv.SlabKVCache.for_config`: ``kv_dtype``, ``max_batch``, ``scratch_frames``,
    ``align`` (flash-attn pads each slab to pages of 256 tokens), ``keep_latents`` (default True,
    as the Engine keeps each session's clean latents for prompt switches).

    Returns ``self_attention`` (K/V and scales of every slab and the scratch region),
    ``cross_attention`` (one text K/V per slab plus scratch), ``per_session`` (one slab, as
    :class:`~graphrt.kv.KVMemory` counts it) and ``total`` (every byte, positions and indices too)."""
    if not isinstance(ranks, int) or ranks < 1 or cfg.num_heads % ranks:
        raise ConfigError(f"num_heads={cfg.num_heads} does not divide among {ranks} ranks",
                          expected=f"a rank count that divides {cfg.num_heads}: {_divisors(cfg.num_heads)}", got=ranks)
    kw.setdefault("keep_latents", True)
    cache = StaticKVCache.for_config(cfg, dtype=dtype, num_slabs=sessions, num_heads=cfg.num_heads // ranks,
                                     device="meta", **kw)
    mem = cache.memory()
    return {"self_attention": sum(t.nbytes for t in cache.k + cache.v + cache.k_scale + cache.v_scale),
            "cross_attention": cache.cross_k.nbytes + cache.cross_v.nbytes,
            "per_session": mem.per_session, "total": mem.total}
