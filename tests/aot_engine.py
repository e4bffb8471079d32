"""The engine the compiled-graph tests share: one small whole-chunk AOTInductor graph.

Imported by tests/test_aot.py, and run as a script by its second process:
``python tests/aot_engine.py OUT.pt`` builds the same engine (the cache folder from
``$GRAPHRT_CACHE_DIR``), generates the same video and saves it with the engine's stats.
"""
import json
import sys

import torch

from graphrt.models.wan import CausalWan, WanConfig
from graphrt.pipeline import Engine, FlowMatchSchedule

CFG = WanConfig.preset("tiny", num_layers=1, chunk_frames=1, height=4, width=4, max_frames=2)
SCHEDULE = FlowMatchSchedule(steps=(1000.0,))        # one denoising step + the cache pass: two forwards
SEED = 3


def model(dtype=torch.float32) -> CausalWan:
    torch.manual_seed(0)
    return CausalWan(CFG, attention="sdpa").to(dtype).eval()


def context(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(1, CFG.text_len, CFG.text_dim, generator=torch.Generator().manual_seed(1)).to(dtype)


def engine(m, mode="chunk", **kw) -> Engine:
    """One graph (batch 1, the whole slab masked) for the whole chunk."""
    return Engine(m, mode=mode, schedule=SCHEDULE, kv_buckets="max", progress=False, **kw)


def video(e: Engine, dtype=torch.float32) -> torch.Tensor:
    """Captured before any session exists (as a server prewarms), then a two-chunk video."""
    e.prewarm()
    return e.generate(context(dtype), 2, seed=SEED)


if __name__ == "__main__":
    torch.set_num_threads(1)
    e = engine(model(), inductor=True)       # cache_dir: $GRAPHRT_CACHE_DIR
    out = video(e)
    s = e.graphs.stats
    torch.save(out, sys.argv[1])
    print(json.dumps({"disk_hits": s.disk_hits, "disk_misses": s.disk_misses, "capture_s": s.capture_seconds}))
