"""The graph-safe causal Wan 2.1 DiT: no host reads, static shapes per bucket.

Same parameters and state-dict keys as :class:`ReferenceWan`. Everything that changes from
chunk to chunk is a device tensor (positions, block table, sequence lengths, timesteps); the
Python numbers inside the forward come from shapes and from the bucket (``kv_frames``,
``kv_exact``), so a captured graph stays correct for every chunk its bucket serves.

Over several ranks (:func:`graphrt.parallel.sequence_parallel`) ``model.parallel`` holds the
rank's token shard and the all-to-alls around self-attention; the forward is otherwise the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from graphrt import attention as attn_mod
from graphrt.errors import InputError
from graphrt.kv import CacheStep, SlabKVCache
from graphrt.models.wan.config import WanConfig
from graphrt.models.wan.layers import WanModelBase


def apply_rope(x, cos, sin):
    """Rotate pairs of ``x`` [B, L, H, D] by angles given as ``cos``/``sin`` [B, L, 1, D/2] (float32)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


class CausalWan(WanModelBase):
    """Causal Wan DiT whose forward reads nothing on the host.

    Call ``model(x, t, context)`` for one chunk with full attention (as ``ReferenceWan``), or
    ``model(x, t, cache=cache, kv_frames=..., kv_exact=...)`` for a chunk of a video whose rows
    live in ``cache`` slabs. ``attention`` picks the backend (``"auto"``, ``"sdpa"``, ``"flex"``,
    ``"flash"``); :attr:`attention_backend` says which one runs. ``parallel`` is None on one
    process; :func:`graphrt.parallel.sequence_parallel` sets it.
    """

    def __init__(self, cfg: WanConfig, attention: str = "auto"):
        super().__init__(cfg)
        self.attention = attention
        self.parallel = None

    @property
    def kv_heads(self) -> int:
        """Self-attention heads whose K/V this process keeps: all, or H/N on each of N ranks."""
        return self.cfg.num_heads // (1 if self.parallel is None else self.parallel.world)

    @property
    def attention_backend(self) -> str:
        p = self.patch_embedding.weight
        return attn_mod.resolve(self.attention, p.device, p.dtype)

    # -- text --------------------------------------------------------------------------------
    def _pad_context(self, context):
        n = context.shape[1]
        if n > self.cfg.text_len:
            raise InputError("text context longer than text_len", expected=f"<= {self.cfg.text_len} tokens", got=n)
        return F.pad(context, (0, 0, 0, self.cfg.text_len - n)) if n < self.cfg.text_len else context

    @torch.no_grad()
    def encode_prompt(self, context):
        """Cross-attention K/V of a text context [B, L, text_dim] -> two [layers, B, text_len, H, D]."""
        ctx = self.embed_text(self._pad_context(context))
        kv = [blk.cross_attn.project_kv(ctx) for blk in self.blocks]
        return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])

    # -- RoPE by device positions ----------------------------------------------------------------
    def rope(self, frame_pos, grid):
        """cos/sin [B, L, 1, D/2] for frame indices ``frame_pos`` (int [B, f], on the device)."""
        f, h, w = grid
        b = frame_pos.shape[0]
        at, ah, aw = self.rope_tables(frame_pos.device)
        shape = (b, f, h, w, -1)
        # time angles = position x inverse frequency (row 1 of the table), the exact float64 product
        # the table holds, with no table bound: a rolling cache may run past ROPE_MAX_LEN frames
        t_ang = frame_pos.to(torch.float64)[..., None] * at[1]
        ang = torch.cat([t_ang.view(b, f, 1, 1, -1).expand(shape),
                         ah[:h].view(1, 1, h, 1, -1).expand(shape),
                         aw[:w].view(1, 1, 1, w, -1).expand(shape)], dim=-1).reshape(b, f * h * w, 1, -1)
        return ang.cos().float(), ang.sin().float()

    # -- attention -------------------------------------------------------------------------------
    def _self_attn(self, layer, attn, h, rope, cache: SlabKVCache | None, step: CacheStep | None, backend):
        q = apply_rope(attn.project_q(h), *rope)
        k, v = attn.project_kv(h)
        k = apply_rope(k, *rope)
        sp = self.parallel
        if sp is not None:                  # Ulysses: every token of this rank's heads
            q, k, v = sp.to_heads(q, k, v)
        if cache is None:
            out = attn_mod.attend(q, k, v, backend=backend)
        else:
            cache.write(layer, step, k, v)
            if backend == "flash" and not cache.quantized:
                out = attn_mod.attend_paged(q, *cache.paged(layer), step.block_table, step.seqlens)
            else:
                ks, vs = cache.read(layer, step)
                out = attn_mod.attend(q, ks, vs, seqlens=None if step.kv_exact else step.seqlens, backend=backend)
            out = out.type_as(v)
        return attn.out(out if sp is None else sp.to_tokens(out))

    def _cross_attn(self, layer, attn, h, ctx, cache, step, backend):
        q = attn.project_q(h)
        k, v = attn.project_kv(ctx) if ctx is not None else cache.cross(layer, step)
        return attn.out(attn_mod.attend(q, k, v, backend=backend))

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x, t, context=None, *, cache: SlabKVCache | None = None, kv_frames: int | None = None,
                kv_exact: bool = False, positions: torch.Tensor | None = None, cond=None):
        """One chunk: ``x`` [B, C, F, H, W], ``t`` [B] -> [B, out_dim, F, H, W].

        - ``context`` [B, L, text_dim]; None uses the cross-attention K/V stored in ``cache``.
        - ``cache``: the rows' slabs; the chunk's K/V are written at each row's position and
          the forward attends over ``kv_frames`` frames (static; None = the whole slab, masked).
          ``kv_exact=True`` promises every row has exactly ``kv_frames`` valid frames, so
          attention runs unmasked.
        - ``positions`` int [B]: first frame index per row (default: the slab positions, or 0).
        - ``cond`` [B, F, cond_dim]: per-frame conditioning, for models built with ``cond_dim``.
        """
        self.check_inputs(x, t, context)
        if context is None and cache is None:
            raise InputError("no text context: pass context=... or a cache whose slabs hold the prompt's K/V")
        out_dtype = x.dtype
        backend = self.attention_backend
        tokens, grid = self.embed(x)
        tokens = self.add_cond(tokens, cond, grid)
        e, e0 = self.embed_time(t, tokens.dtype)
        b, f = tokens.shape[0], grid[0]
        step = None
        if cache is not None:
            cache.check_model(self.cfg, x.dtype, x.device, heads=self.kv_heads)
            step = cache.step(b, f, grid[1] * grid[2], kv_frames, kv_exact, positions)
            positions = step.positions
        frames = torch.arange(f, device=x.device)
        frame_pos = frames.expand(b, f) if positions is None else positions.long()[:, None] + frames
        rope = self.rope(frame_pos, grid)
        sp = self.parallel
        if sp is not None:                  # this rank's tokens, with their own positions
            tokens, rope = sp.shard(tokens), tuple(sp.shard(r) for r in rope)
        ctx = None if context is None else self.embed_text(self._pad_context(context))
        for i, block in enumerate(self.blocks):
            tokens = block(
                tokens, e0,
                lambda h, a=block.self_attn, i=i: self._self_attn(i, a, h, rope, cache, step, backend),
                lambda h, a=block.cross_attn, i=i: self._cross_attn(i, a, h, ctx, cache, step, backend))
        if sp is None:
            return self.finish(tokens, e, grid, out_dtype)
        return self.unpatchify(sp.gather(self.head(tokens, e)), grid).to(out_dtype)
