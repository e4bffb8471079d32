"""Kernels and bytes per DiT forward outside the GEMMs and attention, per kernel path, without a GPU.

``python -m graphrt.bench.traffic --preset wan-1.3b-480p`` builds the model on the meta device (no
memory, no compute: seconds), runs one cached forward per path (``aten``: the unfused ops;
``fused``: :mod:`graphrt.kernels`'s custom ops) at ``--kv-frames`` latent frames of context, and
counts every op a ``TorchDispatchMode`` sees:

- **a kernel** is every dispatched op except: views and metadata-only ops (``view``,
  ``transpose``, ``expand``, ``_unsafe_view``, ``detach``, ...: no launch), allocations
  (``empty*``: no launch), GEMMs and convolutions (``mm``, ``addmm``, ``bmm``, ``convolution``;
  counted apart) and attention (``scaled_dot_product_attention``, taken over before it
  dispatches and returned as an empty output laid out [B, L, H, D] as the CUDA kernels return
  it; counted apart);
- **its bytes** are reads plus writes of the op's tensors, each distinct tensor once, a
  broadcast (stride-0) dimension counted once: inputs and outputs of elementwise ops and
  reductions, the gathered rows (not the whole pool) of ``index_select``/``index``, the source
  rows of ``index_copy_``/``index_put_``.

Eager aten does not fuse: each aten op is one kernel, as PyTorch launches it on CUDA. The fused
path's count assumes each ``graphrt::`` custom op is one kernel, as its Triton implementation is.
Ops inside a torch module (the FFN's GELU) count at the graphrt line that called the module.
Inductor would fuse the aten path further; this counts what runs without it (eager and plain
graph replay). The cache is the one an :class:`~graphrt.pipeline.Engine` of ``--batch`` session
slabs builds: with one slab each layer attends the slab in place (no K/V gather; ``--gather``
counts the gathering read that several slabs need). The table groups ops by the line of graphrt code that issued them; the last line
is JSON: ``{"aten": {"kernels": n, "gb": x}, "fused": {...}}`` per forward (GB = 1e9 bytes).
"""
from __future__ import annotations

import argparse
import json
import linecache
import os
import sys
import traceback
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from graphrt.bench.core import PRESETS
from graphrt.kv import StaticKVCache
from graphrt.models.wan import CausalWan

PATHS = ("aten", "fused")
aten = torch.ops.aten
GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.convolution.default,
         aten._scaled_mm.default}
NO_KERNEL = {aten._unsafe_view.default, aten.detach.default, aten.lift_fresh.default, aten.alias.default,
             aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
             aten.new_empty_strided.default}
GATHERS = {aten.index_select.default, aten.index.Tensor, aten.gather.default, aten.embedding.default}
SCATTERS = {aten.index_copy_.default, aten.index_copy.default, aten.index_put_.default, aten.index_put.default}
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def footprint(t: torch.Tensor) -> int:
    """Bytes a kernel moves to read or write ``t`` once: broadcast (stride-0) dims count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _source_line() -> str:
    """The innermost graphrt line (outside this file) on the stack: where the op was issued."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path.startswith(_ROOT) and path != os.path.abspath(__file__):
            rel = os.path.relpath(path, os.path.dirname(_ROOT))
            return f"{rel}:{frame.lineno}  {linecache.getline(path, frame.lineno).strip()[:70]}"
    return "(outside graphrt)"


@dataclass
class Tally:
    """What one forward launched: kernels and bytes by source line, GEMMs and attention calls apart."""
    kernels: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    gemms: int = 0
    attention: int = 0

    @property
    def total_kernels(self) -> int:
        return sum(self.kernels.values())

    @property
    def gb(self) -> float:
        return sum(self.bytes.values()) / 1e9


def op_bytes(func, args, kwargs, out) -> int:
    """Reads + writes of one op (see the module docstring)."""
    ins = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
    if func in GATHERS:         # the rows read are the rows written, plus the indices
        moved = sum(footprint(o) for o in outs)
        return 2 * moved + sum(footprint(i) for i in ins[1:] if i.dtype in (torch.int32, torch.int64))
    if func in SCATTERS:        # the source rows read and written, plus the indices; not the whole pool
        return sum(footprint(i) for i in ins[1:]) + footprint(ins[-1])
    seen, total = set(), 0
    for t in ins + outs:
        if id(t) not in seen:
            seen.add(id(t))
            total += footprint(t)
    return total


class _Attention(TorchFunctionMode):
    """Takes over SDPA: an empty output shaped and laid out as the CUDA kernels return it."""

    def __init__(self, tally: Tally):
        super().__init__()
        self.tally = tally

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, v = args[0], args[2]
            self.tally.attention += 1
            b, h, lq, _ = q.shape
            return torch.empty(b, lq, h, v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)
        return func(*args, **kwargs)


class _Count(TorchDispatchMode):
    def __init__(self, tally: Tally):
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in GEMMS:
            self.tally.gemms += 1
        elif not (func.is_view or func in NO_KERNEL):
            line = _source_line()
            self.tally.kernels[line] += 1
            self.tally.bytes[line] += op_bytes(func, args, kwargs, out)
        return out


def count(preset: str, path: str, kv_frames: int = 15, dtype: torch.dtype = torch.bfloat16,
          batch: int = 1, gather: bool = False) -> Tally:
    """One cached forward of ``preset``'s model on the meta device with ``kernels=path``, at
    ``kv_frames`` latent frames of context (the chunk included), counted. The cache reads as an
    Engine's of ``batch`` slabs does (one slab: in place), or gathers with ``gather=True``."""
    cfg = PRESETS[preset].config()
    with torch.device("meta"):
        model = CausalWan(cfg, attention="sdpa", kernels=path).to(dtype).eval()
    cache = StaticKVCache.for_model(model, num_slabs=batch)
    cache.bind([cache.acquire() for _ in range(batch)])
    cache.read_in_place = batch == 1 and not gather
    f = cfg.chunk_frames
    x = torch.empty(batch, cfg.in_dim, f, cfg.height, cfg.width, dtype=dtype, device="meta")
    t = torch.empty(batch, device="meta")
    positions = torch.empty(batch, dtype=torch.long, device="meta")
    tally = Tally()
    with torch.no_grad(), _Attention(tally), _Count(tally):
        model(x, t, cache=cache, kv_frames=kv_frames, kv_exact=True, positions=positions)
    return tally


def report(tallies: dict[str, Tally], top: int = 15) -> str:
    lines = []
    for name, t in tallies.items():
        lines.append(f"== {name}: {t.total_kernels} kernels, {t.gb:.2f} GB per forward "
                     f"(besides {t.gemms} GEMMs and {t.attention} attention calls)")
        lines.append(f"{'kernels':>8} {'GB':>8} {'share':>6}  source line")
        ranked = sorted(t.bytes, key=t.bytes.get, reverse=True)
        total = max(sum(t.bytes.values()), 1)
        for line in ranked[:top]:
            lines.append(f"{t.kernels[line]:>8} {t.bytes[line] / 1e9:>8.3f} {100 * t.bytes[line] / total:>5.1f}%  {line}")
        rest = ranked[top:]
        if rest:
            lines.append(f"{sum(t.kernels[r] for r in rest):>8} {sum(t.bytes[r] for r in rest) / 1e9:>8.3f}"
                         f" {100 * sum(t.bytes[r] for r in rest) / total:>5.1f}%  ({len(rest)} other lines)")
    return "\n".join(lines)


def summary(tallies: dict[str, Tally]) -> dict:
    return {name: {"kernels": t.total_kernels, "gb": round(t.gb, 2)} for name, t in tallies.items()}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    p = _Parser(prog="python -m graphrt.bench.traffic", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="wan-1.3b-480p", choices=sorted(PRESETS))
    p.add_argument("--kv-frames", type=int, default=15, help="latent frames attended (the chunk's included)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gather", action="store_true",
                   help="gather each layer's K/V (as several session slabs do) instead of reading one slab in place")
    p.add_argument("--top", type=int, default=15, help="source lines shown per path")
    o = p.parse_args(argv)
    cfg = PRESETS[o.preset].config()
    if not cfg.chunk_frames <= o.kv_frames <= cfg.max_frames:
        p.error(f"--kv-frames must be in [{cfg.chunk_frames}, {cfg.max_frames}] for {o.preset}, got {o.kv_frames}")
    if o.batch < 1:
        p.error(f"--batch must be >= 1, got {o.batch}")
    tallies = {path: count(o.preset, path, o.kv_frames, getattr(torch, o.dtype), o.batch, o.gather) for path in PATHS}
    read = "gathered" if o.gather or o.batch > 1 else "read in place (one slab)"
    print(f"{o.preset}, {o.dtype}, batch {o.batch}, KV {o.kv_frames} latent frames, one forward "
          f"({cfg.chunk_frames} frames x {cfg.frame_tokens} tokens), K/V {read}")
    print(report(tallies, o.top))
    print(json.dumps(summary(tallies)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
