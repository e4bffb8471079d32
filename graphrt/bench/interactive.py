"""``python -m graphrt.bench.interactive``: what a prompt switch costs.

A session on a rolling cache runs past its first wrap (so every chunk and every re-cache has the
same size); then, ``--repeats`` times: switch its prompt (:meth:`Engine.set_prompt`, the prompt's
cross-attention K/V from the prompt cache after the first two), time the KV re-cache alone (the
clean pass over the kept chunks, as the next :meth:`Engine.step` runs it), then time one chunk.
With ``--sessions N`` (N > 1) N sessions switch at once and are re-cached batched.

Reported: re-cache ms (median and spread), per kept chunk, against a chunk's ms; the bytes a
session keeps for it (its clean latents, part of ``memory().kv.per_session``) and the engine's
staging rows. On the CPU at one thread, thread CPU time (``time.thread_time``) and wall time; on
CUDA wall time after a sync. The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from graphrt.bench.presets import PRESETS
from graphrt.errors import ConfigError
from graphrt.models.wan import CausalWan
from graphrt.pipeline import Engine
from graphrt.pipeline.interactive import kept_chunks


def _now(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.thread_time()


def _stats(xs):
    return {"p50": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


@torch.no_grad()
def switch_cost(preset: str = "tiny", *, mode: str = "eager", sessions: int = 1, repeats: int = 10,
                window: tuple[int, int] | None = None, kv_dtype: str | None = None, device: str | None = None,
                dtype: str | None = None, seed: int = 0) -> dict:
    """Time the KV re-cache of ``sessions`` sessions switching at once (see the module docstring).
    ``window`` defaults to 3 chunks with a sink of 1 chunk."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}", expected=sorted(PRESETS), got=preset)
    p = PRESETS[preset]
    F = p.chunk_frames
    window = window or (3 * F, F)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype or p.dtype)
    cfg = p.config(chunks=window[0] // F)
    torch.manual_seed(seed)
    model = CausalWan(cfg).to(dev, dt).eval()
    engine = Engine(model, mode=mode, max_sessions=sessions, batch_sizes=(sessions,), window=window,
                    kv_dtype=kv_dtype, progress=False)
    ctx = [torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, dtype=dt) for _ in range(2)]
    ss = [engine.open(ctx[0], seed=seed + i, prompt="a") for i in range(sessions)]
    for _ in range(window[0] // F + 1):                         # past the wrap: every chunk the same size
        engine.step(ss)
    kept = len(kept_chunks(engine.cache, ss[0].chunk * F, F))
    recache, chunk, switch = [], [], []
    for r in range(repeats + 1):                                # the first: warm-up (captures in graph modes)
        key = "ab"[(r + 1) % 2]
        t0 = _now(dev)
        for s in ss:
            engine.set_prompt(s, ctx[(r + 1) % 2], prompt=key)
        t1 = _now(dev)
        engine._recache.run(ss)                                  # what the next step() runs first
        t2 = _now(dev)
        engine.step(ss)
        t3 = _now(dev)
        if r:
            switch.append((t1[0] - t0[0]) * 1e3)
            recache.append(((t2[0] - t1[0]) * 1e3, (t2[1] - t1[1]) * 1e3))
            chunk.append(((t3[0] - t2[0]) * 1e3, (t3[1] - t2[1]) * 1e3))
    mem = engine.memory()
    cpu = dev.type == "cpu"
    rec = _stats([c if cpu else w for w, c in recache])
    chk = _stats([c if cpu else w for w, c in chunk])
    return {
        "preset": preset, "mode": mode, "device": str(dev), "dtype": str(dt).removeprefix("torch."),
        "kv_dtype": mem.kv.kv_dtype, "window": list(window), "chunk_frames": F, "sessions": sessions,
        "kept_chunks": kept, "threads": torch.get_num_threads(),
        "clock": "thread_time (CPU ms)" if cpu else "wall ms after cuda.synchronize",
        "recache_ms": rec, "recache_wall_ms_p50": statistics.median(w for w, _ in recache),
        "recache_ms_per_kept_chunk": rec["p50"] / kept, "chunk_ms": chk,
        "recache_over_chunk": rec["p50"] / chk["p50"],
        "set_prompt_ms_p50": statistics.median(switch),
        "kept_latent_bytes_per_session": mem.kv.latents, "kv_bytes_per_session": mem.kv.per_session,
        "kept_latents_share": mem.kv.latents / mem.kv.per_session,
        "staging_bytes_per_engine": engine._recache.nbytes,
        "load_average": list(os.getloadavg()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m graphrt.bench.interactive", description=__doc__)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--modes", default="eager,chunk", help="comma-separated Engine modes: eager, forward, chunk")
    ap.add_argument("--sessions", default="1", help="comma-separated counts of sessions switching at once")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--kv-dtype", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    try:
        a = ap.parse_args(argv)
        modes = a.modes.split(",")
        counts = [int(x) for x in a.sessions.split(",")]
        if any(m not in ("eager", "forward", "chunk") for m in modes) or min(counts) < 1 or a.repeats < 1:
            raise ValueError
    except (SystemExit, ValueError):
        print("python -m graphrt.bench.interactive: bad flags (see --help)", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    rows = []
    for mode in modes:
        for n in counts:
            r = switch_cost(a.preset, mode=mode, sessions=n, repeats=a.repeats, kv_dtype=a.kv_dtype)
            rows.append(r)
            print(f"{a.preset} {mode} sessions={n}: re-cache {r['recache_ms']['p50']:.2f} ms "
                  f"({r['recache_ms']['min']:.2f}-{r['recache_ms']['max']:.2f}; {r['kept_chunks']} kept chunks, "
                  f"{r['recache_ms_per_kept_chunk']:.2f} ms each) vs a chunk {r['chunk_ms']['p50']:.2f} ms "
                  f"({r['recache_over_chunk']:.2f}x); kept latents {r['kept_latent_bytes_per_session']:,} B/session "
                  f"({100 * r['kept_latents_share']:.2f}% of its K/V slab)", file=sys.stderr)
    out = {"bench": "interactive", "results": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
