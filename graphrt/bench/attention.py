"""``python -m graphrt.bench.attention``: the attention kernels a causal Wan forward can use, timed alone.

For each KV length of a preset's video (one chunk of queries against 1..N chunks of keys), times
SDPA pinned to each of its kernels (flash, cuDNN, memory-efficient, math), FlexAttention (compiled
on CUDA), FA3 and int8-QK ``sage`` (graphrt's ``attention=`` names; skipped, with the reason, where
they cannot run), and the K/V gather the static cache does per layer (``index_select`` of the slab),
and checks each kernel's output against a float32 math reference and, on CUDA, against cuDNN. The fastest correct kernel is what
``attention="auto"`` should pick on that device. With ``--kv-dtype`` it also times one layer's
cache write (quantize + ``index_copy_``) and read (gather + dequantize) against the plain cache's
(:func:`kv_cache_costs`). The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from graphrt import attention as attn_mod
from graphrt.bench.presets import PRESETS
from graphrt.bench.timing import time_fn
from graphrt.kv import KV_DTYPES, StaticKVCache
from graphrt.models.wan import WanConfig

SDPA_KERNELS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}


# graphrt's own attention names, run through graphrt.attention.attend ([B, L, H, D] layout)
GRAPHRT_KERNELS = ("fa3", "sage")


def kernels_for(device: torch.device) -> list[str]:
    names = ["sdpa-math", "sdpa-efficient", "flex", *GRAPHRT_KERNELS]
    if device.type == "cuda":
        names = ["sdpa-flash", "sdpa-cudnn", *names]
    return names


def _rel_err(got, want) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def _call(name, q, k, v):
    if name in GRAPHRT_KERNELS:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return lambda: attn_mod.attend(qt, kt, vt, backend=name).transpose(1, 2)
    if name == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        fn = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
        return lambda: fn(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_KERNELS[name])

    def run():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def measure(cfg: WanConfig, device: torch.device, dtype: torch.dtype, batch: int = 1, iters: int = 20,
            kv_chunks: list[int] | None = None, kernels: list[str] | None = None) -> dict:
    """Milliseconds and max relative error per kernel per KV length ([B, H, L, D] layout): against
    float32 (``max_rel_err``) and against cuDNN where it ran (``max_rel_err_vs_cudnn``). A kernel
    that cannot run here (:func:`graphrt.attention.unavailable_reason`) gets ``{"skipped": why}``."""
    heads, hd = cfg.num_heads, cfg.head_dim
    q_len = cfg.chunk_frames * cfg.frame_tokens
    n = cfg.max_frames // cfg.chunk_frames
    kv_chunks = kv_chunks or sorted({1, (n + 1) // 2, n})
    out = {"kv_tokens": [], "kernels": {}, "kv_gather_ms": []}
    g = torch.Generator(device="cpu").manual_seed(0)
    for c in kv_chunks:
        kv_len = c * q_len
        q, k, v = (torch.randn(batch, heads, L, hd, generator=g).to(device, dtype) for L in (q_len, kv_len, kv_len))
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        out["kv_tokens"].append(kv_len)
        cudnn = None
        if device.type == "cuda" and attn_mod.unavailable_reason("sdpa-cudnn", device, dtype) is None:
            try:
                cudnn = _call("sdpa-cudnn", q, k, v)()
            except Exception:  # noqa: BLE001 -- cuDNN refused this shape: its own row says why
                cudnn = None
        for name in kernels or kernels_for(device):
            row = out["kernels"].setdefault(name, [])
            why = attn_mod.unavailable_reason(name, device, dtype) if name in GRAPHRT_KERNELS else None
            if why:
                row.append({"skipped": why})
                continue
            try:
                fn = _call(name, q, k, v)
                got = fn()
                cell = {"max_rel_err": _rel_err(got, want)}
                if cudnn is not None:
                    cell["max_rel_err_vs_cudnn"] = _rel_err(got, cudnn)
                row.append({"ms": time_fn(fn, iters, device), **cell})
            except Exception as e:  # a kernel that cannot take this shape/dtype/device says why
                row.append({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
        # the static cache gathers each layer's K and V for the bucket's KV length
        pool = torch.randn(kv_len + q_len, heads, hd, generator=g).to(device, dtype)
        idx = torch.arange(kv_len, device=device)
        out["kv_gather_ms"].append(time_fn(lambda: (pool.index_select(0, idx), pool.index_select(0, idx)), iters, device))
    return out


def kv_cache_costs(cfg: WanConfig, device: torch.device, dtype: torch.dtype, kv_dtype: str, batch: int = 1,
                   iters: int = 20, kv_chunks: list[int] | None = None, forwards_per_chunk: int = 5,
                   num_heads: int | None = None) -> dict:
    """Milliseconds of one layer's cache write and read at each KV length, plain vs ``kv_dtype``,
    for ``num_heads`` heads (default all; a sequence-parallel rank's cache keeps H/N).

    The real cache code on a one-layer cache of ``batch`` slabs: ``write`` stores one chunk's K and V
    (quantizing them), ``read`` gathers and dequantizes the bucket's K and V. ``extra_ms_per_chunk``
    is what quantization adds to one chunk of ``forwards_per_chunk`` forwards (steps + the cache
    pass) x layers, averaged over the KV lengths: the time cost of the quantized cache, unfused.
    """
    n = cfg.max_frames // cfg.chunk_frames
    kv_chunks = kv_chunks or list(range(1, n + 1))
    one = cfg.replace(num_layers=1)
    tokens = cfg.chunk_frames * cfg.frame_tokens
    g = torch.Generator(device="cpu").manual_seed(0)
    heads = num_heads or cfg.num_heads
    k, v = (torch.randn(batch, tokens, heads, cfg.head_dim, generator=g).to(device, dtype) for _ in range(2))
    out = {"kv_dtype": kv_dtype, "kv_tokens": [c * tokens for c in kv_chunks]}
    for name, kvd in ((str(dtype).removeprefix("torch."), None), (kv_dtype, kv_dtype)):
        cache = StaticKVCache.for_config(one, dtype=dtype, device=device, kv_dtype=kvd, num_slabs=batch,
                                         num_heads=heads)
        cache.bind([cache.acquire() for _ in range(batch)])
        writes, reads = [], []
        for c in kv_chunks:
            cache.frames[:batch].fill_((c - 1) * cfg.chunk_frames)
            step = cache.step(batch, cfg.chunk_frames, cfg.frame_tokens, kv_frames=c * cfg.chunk_frames, kv_exact=True)
            writes.append(time_fn(lambda: cache.write(0, step, k, v), iters, device))
            reads.append(time_fn(lambda: cache.read(0, step), iters, device))
        out[name] = {"write_ms": writes, "read_ms": reads}
    base, quant = out[str(dtype).removeprefix("torch.")], out[kv_dtype]
    extra = [qw + qr - bw - br for qw, qr, bw, br in zip(quant["write_ms"], quant["read_ms"],
                                                        base["write_ms"], base["read_ms"])]
    out["extra_ms_per_chunk"] = forwards_per_chunk * cfg.num_layers * statistics.mean(extra)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m graphrt.bench.attention", description=__doc__)
    p.add_argument("--preset", default="wan-1.3b-480p", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), help="also time the quantized cache's write and read")
    p.add_argument("--json", dest="json_path")
    o = p.parse_args(argv)
    if o.batch < 1 or o.iters < 1:
        print("error: --batch and --iters must be at least 1", file=sys.stderr)
        return 2
    device = torch.device(o.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    cfg = PRESETS[o.preset].config()
    res = measure(cfg, device, getattr(torch, o.dtype), o.batch, o.iters)
    res.update(preset=o.preset, dtype=o.dtype, batch=o.batch, torch=torch.__version__,
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               layers=cfg.num_layers, heads=cfg.num_heads, head_dim=cfg.head_dim)
    for name, rows in res["kernels"].items():
        cells = [f"{r['ms']:8.3f} ms ({r['max_rel_err']:.1e})" if "ms" in r
                 else "skipped: " + r["skipped"][:60] if "skipped" in r else r["error"][:60] for r in rows]
        print(f"{name:15s} " + " | ".join(cells))
    print(f"{'kv gather':15s} " + " | ".join(f"{ms:8.3f} ms" for ms in res["kv_gather_ms"]))
    if o.kv_dtype:
        kv = res["kv_cache"] = kv_cache_costs(cfg, device, getattr(torch, o.dtype), o.kv_dtype, o.batch, o.iters)
        for name in (o.dtype, o.kv_dtype):
            for op in ("write_ms", "read_ms"):
                print(f"{name + ' ' + op[:-3]:15s} " + " | ".join(f"{ms:8.3f} ms" for ms in kv[name][op]))
        print(f"{o.kv_dtype} adds {kv['extra_ms_per_chunk']:.3f} ms per chunk (5 forwards x {cfg.num_layers} layers)")
    if o.json_path:
        with open(o.json_path, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res))
    ran = any("ms" in r for rows in res["kernels"].values() for r in rows)
    return 0 if ran else 1                  # no kernel ran: nothing was measured


if __name__ == "__main__":
    raise SystemExit(main())
