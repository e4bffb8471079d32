"""Generation with the upstream-style ``ReferenceWan``: the "before" picture the bench compares to."""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from graphrt.pipeline.schedule import FlowMatchSchedule, denoise_chunk


@torch.no_grad()
def reference_stream(ref_model, context: torch.Tensor, num_chunks: int, seed: int | Sequence[int] = 0,
                     schedule: FlowMatchSchedule | None = None, mark: Callable | None = None
                     ) -> Iterator[torch.Tensor]:
    """The same generation with the upstream-style ``ReferenceWan`` (host reads and all),
    without autograd history whatever the grad mode (its caches live across chunks)."""
    cfg = ref_model.cfg
    schedule = schedule or FlowMatchSchedule()
    p = next(ref_model.parameters())
    rows = context.shape[0]
    seeds = torch.tensor([seed + i for i in range(rows)] if isinstance(seed, int) else list(seed), device=p.device)
    t_rows = torch.tensor([schedule.timesteps] * rows, device=p.device)
    sigma_rows = torch.tensor([schedule.sigmas] * rows, device=p.device)
    context = context.to(p.device, p.dtype)
    kv, cross = ref_model.init_caches(rows)
    shape = (cfg.out_dim, cfg.chunk_frames, cfg.height, cfg.width)
    for c in range(num_chunks):
        start = c * cfg.chunk_frames * cfg.frame_tokens
        pos = torch.full((rows,), c * cfg.chunk_frames, device=p.device)

        def forward(x, t):
            return ref_model(x.to(p.dtype), t, context, kv, cross, current_start=start)

        x0 = denoise_chunk(forward, seeds, pos, t_rows, sigma_rows, shape, mark).to(p.dtype)
        ref_model(x0, torch.full((rows,), schedule.context_t, device=p.device), context, kv, cross,
                  current_start=start)
        yield x0
