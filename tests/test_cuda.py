"""CUDA-only checks (skipped without a GPU): real CUDA graphs, no allocation or sync in replay, pools."""
import pytest
import torch

import graphrt
from conftest import rel_err
from graphrt import Buckets
from graphrt.kv import StaticKVCache
from graphrt.models.wan import CausalWan, ReferenceWan

pytestmark = pytest.mark.cuda
STEPS = (1000.0, 750.0, 500.0, 250.0, 0.0)


def _setup(cfg, dtype, slabs=1):
    model = CausalWan(cfg, attention="sdpa").to("cuda", dtype).eval()
    caches = []
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device="cuda", dtype=dtype)
    k, v = model.encode_prompt(ctx)
    for _ in range(2):
        cache = StaticKVCache.for_model(model, num_slabs=slabs)
        s = cache.acquire()
        cache.set_cross(s, k[:, 0], v[:, 0])
        cache.bind([s])
        caches.append(cache)
    return model, caches, ctx


def _spec(cfg, batch_sizes=(1,)):
    kv = tuple(range(cfg.chunk_frames, cfg.max_frames + 1, cfg.chunk_frames))
    return Buckets(batch_sizes, batch_args=("x", "t"), static_args={"kv_frames": kv, "kv_exact": (True,)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_cuda_graph_replay_is_bit_identical(cfg, dtype):
    model, (gcache, ecache), _ = _setup(cfg, dtype)
    g = graphrt.compile(model, buckets=_spec(cfg), backend="cuda-graph", progress=False)
    for c in range(7):
        for t in STEPS:
            x = torch.randn(1, cfg.in_dim, 3, cfg.height, cfg.width, device="cuda", dtype=dtype)
            tt = torch.full((1,), t, device="cuda")
            got = g(x, tt, cache=gcache, kv_frames=(c + 1) * 3, kv_exact=True)
            want = model(x, tt, cache=ecache, kv_frames=(c + 1) * 3, kv_exact=True)
            assert torch.equal(got, want), (c, t)
        gcache.commit(1, 3)
        ecache.commit(1, 3)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@torch.no_grad()
def test_causal_vs_reference_on_cuda(cfg, dtype, tol):
    ref = ReferenceWan(cfg).to("cuda", dtype).eval()
    model, (cache, _), ctx = _setup(cfg, dtype)
    model.load_state_dict(ref.state_dict())
    k, v = model.encode_prompt(ctx)
    cache.set_cross(0, k[:, 0], v[:, 0])
    kv, cross = ref.init_caches(1)
    for c in range(7):
        for t in STEPS:
            x = torch.randn(1, cfg.in_dim, 3, cfg.height, cfg.width, device="cuda", dtype=dtype)
            tt = torch.full((1,), t, device="cuda")
            want = ref(x, tt, ctx, kv, cross, current_start=c * 3 * cfg.frame_tokens)
            got = model(x, tt, cache=cache, kv_frames=(c + 1) * 3, kv_exact=True)
            assert rel_err(got.float(), want.float()) <= tol, (c, t)
        cache.commit(1, 3)


@torch.no_grad()
def test_replays_allocate_nothing_and_never_sync(cfg):
    model, (cache, _), _ = _setup(cfg, torch.bfloat16)
    g = graphrt.compile(model, buckets=_spec(cfg), progress=False)
    xs = [torch.randn(1, cfg.in_dim, 3, cfg.height, cfg.width, device="cuda", dtype=torch.bfloat16)
          for _ in range(5)]
    ts = [torch.full((1,), t, device="cuda") for t in STEPS]
    g.prewarm(xs[0], ts[0], cache=cache, kv_frames=3, kv_exact=True)
    g(xs[0], ts[0], cache=cache, kv_frames=3, kv_exact=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for c in range(7):
            for x, t in zip(xs, ts):
                g(x, t, cache=cache, kv_frames=(c + 1) * 3, kv_exact=True)
            cache.commit(1, 3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert g.stats.replays == 36


@torch.no_grad()
def test_shared_pool_is_smaller_than_separate_graphs(cfg):
    model, (cache, _), _ = _setup(cfg, torch.bfloat16)
    x = torch.randn(1, cfg.in_dim, 3, cfg.height, cfg.width, device="cuda", dtype=torch.bfloat16)
    t = torch.zeros(1, device="cuda")
    shared = graphrt.compile(model, buckets=_spec(cfg), progress=False)
    shared.prewarm(x, t, cache=cache, kv_frames=3, kv_exact=True)
    alone = []                                   # kept alive: each holds its own pool
    for kv in range(3, 22, 3):
        g = graphrt.compile(model, buckets=Buckets((1,), batch_args=("x", "t"),
                                                   static_args={"kv_frames": (kv,), "kv_exact": (True,)}),
                            progress=False)
        g.prewarm(x, t, cache=cache, kv_frames=kv, kv_exact=True)
        alone.append(g)
    separate = sum(g.stats.pool_bytes for g in alone)
    largest = max(g.stats.pool_bytes for g in alone)
    assert 0 < shared.stats.pool_bytes < 0.6 * separate, (shared.stats.pool_bytes, separate)
    print(f"graph pool: shared {shared.stats.pool_bytes} B, largest bucket alone {largest} B, "
          f"sum of separate pools {separate} B")


@torch.no_grad()
def test_engine_chunk_graph_runs_as_a_cuda_graph(cfg):
    """The whole-chunk function takes no tensors: the cache's device must still pick cuda-graph."""
    from graphrt.pipeline import Engine

    model = CausalWan(cfg).to("cuda", torch.bfloat16).eval()
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    graphed = Engine(model, max_sessions=2, batch_sizes=(1, 2), mode="chunk", progress=False)
    eager = Engine(model, max_sessions=2, batch_sizes=(1, 2), mode="eager", progress=False)
    got = graphed.generate(ctx, 3, seed=1)
    assert graphed.graphs.runtime.backend == "cuda-graph"
    assert torch.equal(got, eager.generate(ctx, 3, seed=1))
