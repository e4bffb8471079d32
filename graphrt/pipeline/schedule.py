"""The few-step flow-matching schedule and the scheduler arithmetic of one chunk."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from graphrt.noise import gaussian


@dataclass(frozen=True)
class FlowMatchSchedule:
    """Few-step flow matching as the distilled causal Wan models use it.

    ``steps`` are nominal timesteps (of 1000); ``shift`` warps them as the training scheduler
    does (sigma = shift*s / (1 + (shift-1)*s), s = t/1000). The model sees ``1000 * sigma``;
    ``context_t`` is the timestep of the clean pass that writes the cache.
    """

    steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    shift: float = 5.0
    context_t: float = 0.0

    @property
    def sigmas(self) -> list[float]:
        return [self.shift * (t / 1000) / (1 + (self.shift - 1) * (t / 1000)) for t in self.steps]

    @property
    def timesteps(self) -> list[float]:
        return [1000.0 * s for s in self.sigmas]


def denoise_chunk(forward: Callable, seeds: torch.Tensor, positions: torch.Tensor, t_rows: torch.Tensor,
                  sigma_rows: torch.Tensor, shape: tuple[int, ...], mark: Callable | None = None) -> torch.Tensor:
    """The scheduler arithmetic of one chunk; ``forward(x, t) -> flow`` is the model.

    ``t_rows`` [B, N] and ``sigma_rows`` [B, N] are each row's timesteps and sigmas. Returns x0.
    """
    n = t_rows.shape[1]
    x = gaussian(seeds, positions, 0, shape)
    for i in range(n):
        sigma = sigma_rows[:, i].view(-1, *([1] * len(shape)))
        flow = forward(x, t_rows[:, i].contiguous())
        x0 = (x.float() - sigma * flow.float())
        if i + 1 < n:
            nxt = sigma_rows[:, i + 1].view_as(sigma)
            x = (1 - nxt) * x0 + nxt * gaussian(seeds, positions, i + 1, shape)
    if mark is not None:
        mark("denoised")
    return x0
