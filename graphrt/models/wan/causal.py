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
from graphrt import kernels as fused_ops
from graphrt.errors import ConfigError, InputError
from graphrt.kv import CacheStep, SlabKVCache
from graphrt.models.wan.config import WanConfig
from graphrt.models.wan.layers import WanAttention, WanModelBase, WanRMSNorm

apply_rope = fused_ops.apply_rope
KERNELS = ("auto", "fused", "aten")


class CausalWan(WanModelBase):
    """Causal Wan DiT whose forward reads nothing on the host.

    Call ``model(x, t, context)`` for one chunk with full attention (as ``ReferenceWan``), or
    ``model(x, t, cache=cache, kv_frames=..., kv_exact=...)`` for a chunk of a video whose rows
    live in ``cache`` slabs. ``attention`` picks the backend (``"auto"``, ``"sdpa"``, ``"flex"``,
    ``"flash"``); :attr:`attention_backend` says which one runs. ``kernels`` picks the ops
    around the GEMMs and attention: ``"aten"`` (the unfused float32 chains, as upstream Wan),
    ``"fused"`` (the custom ops of :mod:`graphrt.kernels`: q/k RMS norm + RoPE, modulated
    LayerNorm, gate + residual + the next norm; equal to aten within the dtype's tolerance) or
    ``"auto"`` (fused on CUDA when Triton is installed, aten otherwise); :attr:`kernel_path` says
    which one runs. ``parallel`` is None on one process;
    :func:`graphrt.parallel.sequence_parallel` sets it.
    """

    def __init__(self, cfg: WanConfig, attention: str = "auto", kernels: str = "auto"):
        super().__init__(cfg)
        if kernels not in KERNELS:
            raise ConfigError(f"unknown kernels={kernels!r}", expected=KERNELS, got=kernels,
                              fix="pass kernels='auto', 'fused' or 'aten'")
        self.attention = attention
        self.kernels = kernels
        self.parallel = None

    @property
    def kv_heads(self) -> int:
        """Self-attention heads whose K/V this process keeps: all, or H/N on each of N ranks."""
        return self.cfg.num_heads // (1 if self.parallel is None else self.parallel.world)

    @property
    def attention_backend(self) -> str:
        p = self.patch_embedding.weight
        return attn_mod.resolve(self.attention, p.device, p.dtype)

    @property
    def kernel_path(self) -> str:
        """``"fused"`` or ``"aten"``: what ``kernels`` resolves to on the model's device."""
        if self.kernels != "auto":
            return self.kernels
        cuda = self.patch_embedding.weight.device.type == "cuda"
        return "fused" if cuda and fused_ops.triton_available() else "aten"

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
        if self.kernel_path == "fused" and isinstance(attn.norm_q, WanRMSNorm):
            q, k, v = attn.projections(h, ("q", "k", "v"))
            q, k = (fused_ops.rms_norm_rope(y, norm.weight, *rope, attn.num_heads, norm.eps)
                    for y, norm in ((q, attn.norm_q), (k, attn.norm_k)))
            v = v.unflatten(-1, (attn.num_heads, attn.head_dim))
        else:
            q, k, v = attn.project_qkv(h)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
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
        q = _fused_project_q(attn, h) if self.kernel_path == "fused" else attn.project_q(h)
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
        attend = [(lambda h, a=block.self_attn, i=i: self._self_attn(i, a, h, rope, cache, step, backend),
                   lambda h, a=block.cross_attn, i=i: self._cross_attn(i, a, h, ctx, cache, step, backend))
                  for i, block in enumerate(self.blocks)]
        if self.kernel_path == "fused":
            out = self.head.head(self._fused_blocks(tokens, e, e0, attend))
        else:
            for block, (self_attn, cross_attn) in zip(self.blocks, attend):
                tokens = block(tokens, e0, self_attn, cross_attn)
            out = self.head(tokens, e)
        if sp is not None:
            out = sp.gather(out)
        return self.unpatchify(out, grid).to(out_dtype)

    def _fused_blocks(self, x, e, e0, attend):
        """The blocks with fused norms: each residual add also computes the next branch's input
        (the next block's, or the head's, modulated norm). Returns the head's normed input."""
        mods = [(blk.modulation + e0).chunk(6, dim=1) for blk in self.blocks]
        head_shift, head_scale = (self.head.modulation + e.float().unsqueeze(1)).chunk(2, dim=1)
        nexts = [(m[1], m[0], blk.norm1.eps) for blk, m in zip(self.blocks[1:], mods[1:])]
        nexts.append((head_scale, head_shift, self.head.norm.eps))
        h = fused_ops.layer_norm_mod(x, None, None, mods[0][1], mods[0][0], self.blocks[0].norm1.eps)
        for block, (self_attn, cross_attn), mod, (scale, shift, eps) in zip(self.blocks, attend, mods, nexts):
            _, _, gate, c_shift, c_scale, c_gate = mod
            n3 = block.norm3
            if isinstance(n3, torch.nn.LayerNorm):
                x, h = fused_ops.gate_residual_norm(x, self_attn(h), gate, n3.weight, n3.bias, None, None, n3.eps)
            else:
                x = h = fused_ops.gate_residual(x, self_attn(h), gate)
            x, h = fused_ops.gate_residual_norm(x, cross_attn(h), None, None, None, c_scale, c_shift,
                                                block.norm2.eps)
            x, h = fused_ops.gate_residual_norm(x, block.ffn(h), c_gate, None, None, scale, shift, eps)
        return h


def _fused_project_q(attn: WanAttention, h):
    """``attn.project_q`` with the RMS norm as one fused op."""
    if not isinstance(attn.norm_q, WanRMSNorm):
        return attn.project_q(h)
    return fused_ops.rms_norm(attn.projections(h, ("q",))[0], attn.norm_q.weight, attn.norm_q.eps).unflatten(
        -1, (attn.num_heads, attn.head_dim))
