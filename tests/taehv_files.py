"""Weight files in upstream TAEHV's layout (madebyollin/taehv, ``taew2_1``), with random values.

The layout is written out here from upstream's ``TAEHV`` module (its ``encoder`` and ``decoder``
``nn.Sequential`` s), not taken from graphrt's decoder, so loading these files checks graphrt's
keys and shapes against upstream's. Values are random, scaled so decoded frames span [0, 1].
"""
from __future__ import annotations

import torch


def _conv(prefix: str, n_in: int, n_out: int, k: int = 3, bias: bool = True) -> dict:
    shapes = {f"{prefix}.weight": (n_out, n_in, k, k)}
    if bias:
        shapes[f"{prefix}.bias"] = (n_out,)
    return shapes


def _memblock(prefix: str, n: int) -> dict:
    return {**_conv(f"{prefix}.conv.0", 2 * n, n), **_conv(f"{prefix}.conv.2", n, n), **_conv(f"{prefix}.conv.4", n, n)}


def taew2_1_shapes(tgrow_first_stride: int = 1) -> dict[str, tuple[int, ...]]:
    """Every key of upstream's ``TAEHV(latent_channels=16)`` state dict and its shape.
    ``tgrow_first_stride=2``: the first TGrow stored twice as wide (upstream slices it on load)."""
    shapes: dict = {}
    # encoder: conv, relu, then 3 x (TPool, strided conv, 3 MemBlocks), conv to the latents
    shapes.update(_conv("encoder.0", 3, 64))
    for stage, (base, t_stride) in enumerate(((2, 2), (7, 2), (12, 1))):
        shapes[f"encoder.{base}.conv.weight"] = (64, 64 * t_stride, 1, 1)
        shapes.update(_conv(f"encoder.{base + 1}", 64, 64, bias=False))
        for m in range(3):
            shapes.update(_memblock(f"encoder.{base + 2 + m}", 64))
    shapes.update(_conv("encoder.17", 64, 16))
    # decoder: clamp, conv, relu, then 3 x (3 MemBlocks, upsample, TGrow, conv), relu, conv to RGB
    widths = (256, 128, 64, 64)
    shapes.update(_conv("decoder.1", 16, widths[0]))
    for stage, t_stride in enumerate((tgrow_first_stride, 2, 2)):
        base, n = 3 + 6 * stage, widths[stage]
        for m in range(3):
            shapes.update(_memblock(f"decoder.{base + m}", n))
        shapes[f"decoder.{base + 4}.conv.weight"] = (n * t_stride, n, 1, 1)
        shapes.update(_conv(f"decoder.{base + 5}", n, widths[stage + 1], bias=False))
    shapes.update(_conv("decoder.22", widths[3], 3))
    return shapes


def random_taew2_1(seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    """A state dict in upstream's layout, random values (fp32)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in taew2_1_shapes(**kw).items():
        if len(shape) == 1:
            sd[key] = 0.05 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            sd[key] = torch.randn(shape, generator=g) * (1.0 / fan_in) ** 0.5
    sd["decoder.22.bias"] = torch.full((3,), 0.5) + 0.05 * torch.randn(3, generator=g)
    return sd


def write_taew2_1(path, seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    """Write a random taew2_1 file (``.safetensors`` or ``.pth`` by the suffix); returns its tensors."""
    sd = random_taew2_1(seed, **kw)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return sd
