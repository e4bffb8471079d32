"""Counter-based Gaussian noise on the device: graph-safe, seeded per row, batch-independent.

``gaussian(seeds, positions, step, shape)`` hashes (seed, frame position, step, element) with a
32-bit integer hash (lowbias32), one input at a time (``k = hash(k + input)``: order matters, so
seed 3 at position 5 is not seed 5 at position 3), and turns pairs of hashes into normals
(Box-Muller). There is
no generator state to advance: a captured graph draws fresh noise every chunk because the
positions it reads change on the device, and a session's noise depends only on its own seed
and position, so the same seed gives the same video whatever else runs in the batch.
Integer math stays below 2**63 (32-bit products split in 16-bit halves), so it is exact on
every device.
"""
from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for 0 <= x < 2**32 held in int64."""
    return ((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _uniform(h: torch.Tensor) -> torch.Tensor:
    """24-bit uniform in (0, 1) from a 32-bit hash."""
    return (h >> 8).to(torch.float32) * 2.0 ** -24 + 2.0 ** -25


def gaussian(seeds: torch.Tensor, positions: torch.Tensor, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normals [B, *shape] (float32) for rows seeded by ``seeds`` (int64 [B]).

    ``positions`` (int [B], frame index of the chunk) and ``step`` (a Python int, static per
    graph) pick a fresh stream per chunk and denoising step.
    """
    n = math.prod(shape)
    seeds = seeds.long()
    key = hash32(seeds & _M32)
    for part in (seeds >> 32, positions.long(), step):
        key = hash32((key + part) & _M32)
    idx = hash32(torch.arange(2 * n, device=seeds.device))       # element streams, decorrelated per key
    a = hash32(key[:, None] ^ idx[0::2])
    b = hash32(key[:, None] ^ idx[1::2])
    z = torch.sqrt(-2.0 * torch.log(_uniform(a))) * torch.cos(2.0 * math.pi * _uniform(b))
    return z.view(seeds.shape[0], *shape)
