"""``python -m graphrt.bench.memory``: how many sessions fit on one GPU, per preset and ``kv_dtype``.

Bytes come from the code that allocates them, without allocating: the model and its K/V cache
are built on the meta device (a session is one slab: K/V codes and scales in every layer, the
cross-attention K/V, its position; the tests check these counts against real allocations).
What a forward needs besides (activations, the gathered K/V of the bucket, workspaces) is the
working set: ``--measure`` measures it on CUDA (the peak of one eager video at batch 1 over what
the weights and the cache hold), else ``--working-set-gib`` gives it. Sessions that fit:
``(gpu - weights - scratch - working set) // bytes per session``, each stepped at batch 1 (a
batch of B needs about B working sets). The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch

from graphrt.bench.presets import PRESETS
from graphrt.kv import StaticKVCache
from graphrt.models.wan import CausalWan
from graphrt.pipeline import Engine, FlowMatchSchedule

GIB = 2 ** 30
KV_CHOICES = (None, "int8", "float8_e4m3fn")


@dataclass
class Fit:
    preset: str
    kv_dtype: str
    weights: int
    per_session: int
    scratch: int              # scratch region and cache state: paid once per engine
    working_set: int | None
    sessions: int | None


def meta_model(preset: str, dtype: torch.dtype) -> CausalWan:
    with torch.device("meta"):
        return CausalWan(PRESETS[preset].config()).to(dtype)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.nbytes for t in (*model.parameters(), *model.buffers()))


def cache_bytes(preset: str, dtype: torch.dtype, kv_dtype: str | None):
    """(bytes per session, scratch + state) of a one-slab cache, built on the meta device."""
    m = StaticKVCache.for_config(PRESETS[preset].config(), dtype=dtype, kv_dtype=kv_dtype, device="meta").memory()
    return m.per_session, m.scratch + m.state


def measure_working_set(preset: str, dtype: torch.dtype, kv_dtype: str | None, steps: int = 4) -> int:
    """Peak CUDA bytes of one eager video at batch 1 above the weights and the cache (random weights)."""
    cfg = PRESETS[preset].config()
    model = meta_model(preset, dtype).to_empty(device="cuda").eval()   # no CPU init of billions of weights
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    engine = Engine(model, mode="eager", kv_dtype=kv_dtype, progress=False,
                    schedule=FlowMatchSchedule(steps=tuple(1000.0 * (1 - i / steps) for i in range(steps))))
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device="cuda", dtype=dtype)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        engine.generate(ctx, cfg.num_chunks, seed=0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - held
    del engine, model
    torch.cuda.empty_cache()
    return peak


def fits(presets, dtype: torch.dtype, gpu_bytes: int, working: dict[str, int | None]) -> list[Fit]:
    rows = []
    for preset in presets:
        weights = weight_bytes(meta_model(preset, dtype))
        for kv in KV_CHOICES:
            per, fixed = cache_bytes(preset, dtype, kv)
            ws = working.get(preset)
            n = None if ws is None else max(0, (gpu_bytes - weights - fixed - ws) // per)
            rows.append(Fit(preset, kv or str(dtype).removeprefix("torch."), weights, per, fixed, ws, n))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m graphrt.bench.memory", description=__doc__)
    p.add_argument("--presets", default="wan-1.3b-480p,wan-14b-480p")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--gpu-gib", type=float, default=80.0, help="device memory to fill (default 80)")
    p.add_argument("--measure", action="store_true", help="measure the working set on CUDA (random weights)")
    p.add_argument("--working-set-gib", type=float, action="append", default=[],
                   help="the working set per preset, in order (instead of --measure)")
    p.add_argument("--json", dest="json_path")
    o = p.parse_args(argv)
    presets = [x.strip() for x in o.presets.split(",") if x.strip()]
    unknown = [x for x in presets if x not in PRESETS]
    if unknown or not presets:
        print(f"error: unknown preset(s) {unknown}; known: {sorted(PRESETS)}", file=sys.stderr)
        return 2
    if o.measure and not torch.cuda.is_available():
        print("error: --measure needs a CUDA device", file=sys.stderr)
        return 2
    if o.working_set_gib and len(o.working_set_gib) != len(presets):
        print(f"error: {len(o.working_set_gib)} --working-set-gib for {len(presets)} presets", file=sys.stderr)
        return 2
    dtype = getattr(torch, o.dtype)
    working = {x: int(g * GIB) for x, g in zip(presets, o.working_set_gib)}
    if o.measure:
        for x in presets:
            working[x] = measure_working_set(x, dtype, "int8")
            print(f"{x}: working set {working[x] / GIB:.2f} GiB", flush=True)
    rows = fits(presets, dtype, int(o.gpu_gib * GIB), working)
    print(f"{'preset':16s} {'kv_dtype':14s} {'weights GiB':>11s} {'session GiB':>11s} {'vs plain':>8s} "
          f"{'scratch GiB':>11s} {'working GiB':>11s} {f'on {o.gpu_gib:g} GiB':>10s}")
    plain = {r.preset: r.per_session for r in rows if r.kv_dtype == o.dtype}
    for r in rows:
        ws = "-" if r.working_set is None else f"{r.working_set / GIB:.2f}"
        print(f"{r.preset:16s} {r.kv_dtype:14s} {r.weights / GIB:11.2f} {r.per_session / GIB:11.3f} "
              f"{r.per_session / plain[r.preset]:8.3f} {r.scratch / GIB:11.3f} {ws:>11s} "
              f"{'-' if r.sessions is None else r.sessions:>10}")
    out = {"dtype": o.dtype, "gpu_gib": o.gpu_gib, "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if o.measure else None, "rows": [asdict(r) for r in rows]}
    if o.json_path:
        with open(o.json_path, "w") as f:
            json.dump(out, f, indent=2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
