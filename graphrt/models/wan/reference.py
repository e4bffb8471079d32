"""The causal Wan 2.1 DiT as public causal-Wan inference code writes it today.

This is the "before" picture and the numerical reference. Its host reads are deliberate and
stay: a per-layer KV cache dict whose ``global_end_index`` / ``local_end_index`` tensors are
read with ``.item()``, Python-int slice writes and reads of the cache, ``grid_sizes`` read on
the host, a cross-attention cache whose ``is_init`` tensor flag is read with ``.item()``, and
an optional sliding window (``local_attn_size`` frames, ``sink_size`` frames kept) that evicts
by shifting the cache left. Do not "fix" this file; fix ``causal.py``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from graphrt.models.wan.config import WanConfig
from graphrt.models.wan.layers import WanModelBase


def _attention(q, k, v, attn_mask=None):
    """[B, L, H, D] layout in and out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=attn_mask)
    return out.transpose(1, 2)


def causal_rope_apply(x, grid_sizes, freqs, start_frame=0):
    """Wan's complex float64 RoPE, offset in time by ``start_frame`` (a Python int)."""
    n = x.size(2)
    output = []
    for i, (f, h, w) in enumerate(grid_sizes.tolist()):
        seq_len = f * h * w
        x_i = torch.view_as_complex(x[i, :seq_len].to(torch.float64).reshape(seq_len, n, -1, 2))
        freqs_i = torch.cat([
            freqs[0][start_frame:start_frame + f].view(f, 1, 1, -1).expand(f, h, w, -1),
            freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ], dim=-1).reshape(seq_len, 1, -1)
        x_i = torch.view_as_real(x_i * freqs_i).flatten(2)
        output.append(torch.cat([x_i, x[i, seq_len:]]))
    return torch.stack(output).type_as(x)


class ReferenceWan(WanModelBase):
    """Upstream-style causal Wan DiT (block-causal, chunk by chunk, KV cache with host reads).

    ``model(x, t, context)`` without a cache treats ``x`` as one chunk (full attention among its
    frames), the call diffusers' ``WanTransformer3DModel`` makes. With ``kv_cache`` and
    ``crossattn_cache`` from :meth:`init_caches`, ``current_start`` (a Python int, in tokens)
    says where the chunk begins, as upstream.
    """

    def __init__(self, cfg: WanConfig, local_attn_size: int = -1, sink_size: int = 0):
        super().__init__(cfg)
        self.local_attn_size = local_attn_size
        self.sink_size = sink_size

    def init_caches(self, batch_size: int, frame_seqlen: int | None = None, device=None, dtype=None):
        """Per-layer self-attention and cross-attention cache dicts, as upstream builds them."""
        cfg = self.cfg
        p = self.patch_embedding.weight
        device, dtype = device or p.device, dtype or p.dtype
        frame_seqlen = frame_seqlen or cfg.frame_tokens
        frames = cfg.max_frames if self.local_attn_size == -1 else self.local_attn_size
        shape = (batch_size, frames * frame_seqlen, cfg.num_heads, cfg.head_dim)
        kv_cache = [{
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
            "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
            "local_end_index": torch.tensor([0], dtype=torch.long, device=device),
        } for _ in range(cfg.num_layers)]
        cshape = (batch_size, cfg.text_len, cfg.num_heads, cfg.head_dim)
        crossattn_cache = [{
            "k": torch.zeros(cshape, device=device, dtype=dtype),
            "v": torch.zeros(cshape, device=device, dtype=dtype),
            "is_init": torch.tensor(False, device=device),
        } for _ in range(cfg.num_layers)]
        return kv_cache, crossattn_cache

    def _freqs(self, device):
        return [torch.polar(torch.ones_like(a), a) for a in self.rope_tables(device)]

    def _self_attn(self, attn, x, grid_sizes, freqs, kv_cache, current_start, attn_mask):
        q = attn.project_q(x)
        k, v = attn.project_kv(x)
        if kv_cache is None:
            return attn.out(_attention(causal_rope_apply(q, grid_sizes, freqs).type_as(v),
                                       causal_rope_apply(k, grid_sizes, freqs).type_as(v), v, attn_mask))
        frame_seqlen = math.prod(grid_sizes[0][1:]).item()
        current_start_frame = current_start // frame_seqlen
        roped_query = causal_rope_apply(q, grid_sizes, freqs, start_frame=current_start_frame).type_as(v)
        roped_key = causal_rope_apply(k, grid_sizes, freqs, start_frame=current_start_frame).type_as(v)

        current_end = current_start + roped_query.shape[1]
        sink_tokens = self.sink_size * frame_seqlen
        kv_cache_size = kv_cache["k"].shape[1]
        num_new_tokens = roped_query.shape[1]
        max_attention_size = kv_cache_size
        if (self.local_attn_size != -1 and current_end > kv_cache["global_end_index"].item()
                and num_new_tokens + kv_cache["local_end_index"].item() > kv_cache_size):
            # Evict: shift the cache left past the sink and append the new tokens at the end.
            num_evicted_tokens = num_new_tokens + kv_cache["local_end_index"].item() - kv_cache_size
            num_rolled_tokens = kv_cache["local_end_index"].item() - num_evicted_tokens - sink_tokens
            src = slice(sink_tokens + num_evicted_tokens, sink_tokens + num_evicted_tokens + num_rolled_tokens)
            kv_cache["k"][:, sink_tokens:sink_tokens + num_rolled_tokens] = kv_cache["k"][:, src].clone()
            kv_cache["v"][:, sink_tokens:sink_tokens + num_rolled_tokens] = kv_cache["v"][:, src].clone()
            local_end_index = (kv_cache["local_end_index"].item() + current_end
                               - kv_cache["global_end_index"].item() - num_evicted_tokens)
        else:
            local_end_index = (kv_cache["local_end_index"].item() + current_end
                               - kv_cache["global_end_index"].item())
        local_start_index = local_end_index - num_new_tokens
        kv_cache["k"][:, local_start_index:local_end_index] = roped_key
        kv_cache["v"][:, local_start_index:local_end_index] = v
        lo = max(0, local_end_index - max_attention_size)
        out = _attention(roped_query, kv_cache["k"][:, lo:local_end_index], kv_cache["v"][:, lo:local_end_index])
        kv_cache["global_end_index"].fill_(current_end)
        kv_cache["local_end_index"].fill_(local_end_index)
        return attn.out(out)

    def _cross_attn(self, attn, x, context, crossattn_cache):
        q = attn.project_q(x)
        if crossattn_cache is not None:
            if not crossattn_cache["is_init"].item():
                crossattn_cache["is_init"].fill_(True)
                k, v = attn.project_kv(context)
                crossattn_cache["k"][:, :k.shape[1]] = k
                crossattn_cache["v"][:, :v.shape[1]] = v
            else:
                k, v = crossattn_cache["k"], crossattn_cache["v"]
        else:
            k, v = attn.project_kv(context)
        return attn.out(_attention(q, k, v))

    def forward(self, x, t, context, kv_cache=None, crossattn_cache=None, current_start: int = 0,
                cond=None, attn_mask=None):
        """``x`` [B, C, F, H, W], ``t`` [B], ``context`` [B, L, text_dim] -> [B, out_dim, F, H, W].

        ``attn_mask`` (cache-free call only): boolean [L, L] self-attention visibility over the
        chunk's tokens, for teacher-forced forwards under a block-causal or windowed mask.
        """
        self.check_inputs(x, t, context)
        out_dtype = x.dtype
        freqs = self._freqs(x.device)
        x = [self.patch_embedding(u.unsqueeze(0)) for u in x]
        grid_sizes = torch.stack([torch.tensor(u.shape[2:], dtype=torch.long) for u in x])
        x = torch.cat([u.flatten(2).transpose(1, 2) for u in x])
        grid = tuple(grid_sizes[0].tolist())
        x = self.add_cond(x, cond, grid)
        e, e0 = self.embed_time(t, x.dtype)
        context = self.embed_text(torch.stack([
            torch.cat([u, u.new_zeros(self.cfg.text_len - u.size(0), u.size(1))]) for u in context]))

        for i, block in enumerate(self.blocks):
            layer_kv = kv_cache[i] if kv_cache is not None else None
            layer_cross = crossattn_cache[i] if crossattn_cache is not None else None
            x = block(
                x, e0,
                lambda h, a=block.self_attn, c=layer_kv: self._self_attn(a, h, grid_sizes, freqs, c, current_start,
                                                                         attn_mask),
                lambda h, a=block.cross_attn, c=layer_cross: self._cross_attn(a, h, context, c))
        return self.finish(x, e, grid, out_dtype)
