"""Sessions beyond the slabs: suspend to host memory, resume into any slab; a memory budget; the report."""
import dataclasses
import re

import pytest
import torch

from graphrt.errors import CacheError, InputError
from graphrt.kv import StaticKVCache
from graphrt.models.wan import CausalWan
from graphrt.pipeline import Engine


@pytest.fixture
def ctx(cfg):
    return torch.randn(3, cfg.text_len, cfg.text_dim)


def _solo(model, ctx, seed, chunks, **kw):
    engine = Engine(model, mode="eager", progress=False, **kw)
    s = engine.open(ctx, seed=seed)
    return [engine.step([s])[s] for _ in range(chunks)]


@pytest.mark.parametrize("dtype,kv_dtype,window,before", [
    (torch.float32, None, None, 2), (torch.bfloat16, "int8", None, 2),
    # a rolling window (ring of 6 frames) suspended after its ring wrapped, then wrapping again
    (torch.bfloat16, "int8", (9, 3), 4), (torch.bfloat16, "float8_e4m3fn", (9, 3), 4)],
    ids=["fp32", "bf16-int8", "bf16-int8-rolling", "bf16-fp8-rolling"])
@torch.no_grad()
def test_a_resumed_session_continues_bit_identically(cfg, ctx, dtype, kv_dtype, window, before):
    """a runs ``before`` chunks, is suspended; c takes its slab and b and c run; a comes back in b's
    old slab and runs 3 more: every chunk of a equals a never-suspended run's, bit for bit."""
    model = CausalWan(cfg, attention="sdpa").to(dtype=dtype).eval()
    want = _solo(model, ctx[:1], 7, before + 3, kv_dtype=kv_dtype, window=window)
    engine = Engine(model, mode="eager", max_sessions=2, kv_dtype=kv_dtype, window=window, progress=False)
    a, b = engine.open(ctx[:1], seed=7), engine.open(ctx[1:2], seed=8)
    got = [engine.step([a])[a] for _ in range(before)]
    old = a.slab
    engine.suspend(a)
    assert a.suspended and engine.cache.free_slabs == 1
    c = engine.open(ctx[2:3], seed=9)
    assert c.slab == old                                  # a's old slab, now c's
    assert set(engine.step()) == {b, c}             # step() runs the resident sessions only
    engine.step([b, c])
    engine.suspend(b)
    engine.resume(a)
    assert a.slab not in (old, None) and not a.suspended
    got += [engine.step([a])[a] for _ in range(3)]
    assert len(got) == before + 3 and all(torch.equal(g, w) for g, w in zip(got, want))
    assert b.chunk == 2 and c.chunk == 2


@torch.no_grad()
def test_more_sessions_than_slabs_round_robin_in_chunk_graphs(cfg, ctx):
    """Three sessions over one slab in whole-chunk graphs: each equals its solo run."""
    model = CausalWan(cfg, attention="sdpa").eval()
    engine = Engine(model, mode="chunk", max_sessions=1, progress=False)
    sessions = []
    for i in range(3):
        if sessions:
            engine.suspend(sessions[-1])
        sessions.append(engine.open(ctx[i:i + 1], seed=i))
    assert len(engine.sessions) == 3 and engine.memory().suspended_sessions == 2
    outs = {s.id: [] for s in sessions}
    for _ in range(2):
        for i, s in enumerate(sessions):
            if s.suspended:
                engine.suspend(next(r for r in sessions if not r.suspended))
                engine.resume(s)
            outs[s.id].append(engine.step()[s])
    for i, s in enumerate(sessions):
        assert all(torch.equal(g, w) for g, w in zip(outs[s.id], _solo(model, ctx[i:i + 1], i, 2))), i
    assert engine.graphs.stats.captures == 2            # kv 3 and kv 6: resuming captures nothing


@torch.no_grad()
def test_suspend_resume_misuse(cfg, ctx):
    model = CausalWan(cfg, attention="sdpa").eval()
    engine = Engine(model, mode="eager", max_sessions=1, progress=False)
    other = Engine(model, mode="eager", max_sessions=1, progress=False)
    a = engine.open(ctx[:1], seed=1)
    with pytest.raises(CacheError, match="all 1 slabs are in use.*\n.*suspend"):
        engine.open(ctx[1:2], seed=2)
    with pytest.raises(CacheError, match="is not suspended"):
        engine.resume(a)
    engine.suspend(a)
    with pytest.raises(CacheError, match="already suspended"):
        engine.suspend(a)
    with pytest.raises(CacheError, match=r"suspended to host memory cannot take a chunk\n.*resume"):
        engine.step([a])
    assert engine.step() == {}                           # nothing resident: nothing runs
    b = engine.open(ctx[1:2], seed=2)
    with pytest.raises(CacheError, match="no free slab to resume"):
        engine.resume(a)
    with pytest.raises(InputError, match="not a session open in this engine"):
        other.suspend(b)
    engine.close(a)                                      # a suspended session closes: its host copy goes
    assert engine.memory().host_suspended == 0
    with pytest.raises(InputError, match="not a session open"):
        engine.resume(a)
    engine.suspend(b)
    engine.reset()
    assert not engine.sessions and engine.memory().suspended_sessions == 0 and engine.cache.free_slabs == 1


@torch.no_grad()
def test_memory_budget_sizes_the_slabs(cfg):
    model = CausalWan(cfg, attention="sdpa").eval()

    def cache_bytes(slabs, kv_dtype=None):
        return StaticKVCache.for_model(model, num_slabs=slabs, max_batch=4, kv_dtype=kv_dtype, keep_latents=True,
                                       device="meta").memory().total     # the Engine keeps clean latents

    for kv in (None, "int8"):
        exact = cache_bytes(3, kv)
        assert Engine(model, memory_budget=exact, batch_sizes=(4,), kv_dtype=kv, mode="eager", prompt_cache_bytes=0,
                      progress=False).cache.num_slabs == 3
        assert Engine(model, memory_budget=exact - 1, batch_sizes=(4,), kv_dtype=kv, mode="eager",
                      prompt_cache_bytes=0, progress=False).cache.num_slabs == 2
        # by default an eighth of the budget is the prompt cache's: the slabs get the rest
        assert Engine(model, memory_budget=exact * 8 // 7 + 8, batch_sizes=(4,), kv_dtype=kv, mode="eager",
                      progress=False).cache.num_slabs == 3
        assert Engine(model, memory_budget=exact, batch_sizes=(4,), kv_dtype=kv, mode="eager",
                      progress=False).cache.num_slabs == 2
    budget = cache_bytes(4)
    plain = Engine(model, memory_budget=budget, mode="eager", progress=False)
    quant = Engine(model, memory_budget=budget, kv_dtype="float8_e4m3fn", mode="eager", progress=False)
    assert plain.cache.memory().total <= budget and quant.cache.memory().total <= budget
    assert quant.cache.num_slabs >= 2 * plain.cache.num_slabs   # fp32 model: 4 bytes -> 1 byte + scales
    assert plain.batch_sizes[-1] == plain.cache.num_slabs        # the default buckets follow the slabs
    capped = Engine(model, memory_budget=budget, max_sessions=2, mode="eager", progress=False)
    assert plain.prompt_cache_bytes == budget // 8 and plain.cache.memory().total <= budget - budget // 8
    assert capped.cache.num_slabs == 2
    # a fraction of the free memory: half the host's is plenty for two tiny slabs, 1e-12 of it none
    assert Engine(model, memory_budget=0.5, max_sessions=2, mode="eager", progress=False).cache.num_slabs == 2
    for small in (1000, 1e-12):
        with pytest.raises(CacheError, match="holds no session"):
            Engine(model, memory_budget=small, mode="eager", progress=False)
    for bad in (0, -5, 1.5, True, "1GB"):
        with pytest.raises(InputError, match="memory_budget must be"):
            Engine(model, memory_budget=bad, mode="eager", progress=False)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prompt_cache_is_bounded_in_bytes(cfg, dtype):
    """The prompts kept (their cross-attention K/V on the device) never pass prompt_cache_bytes:
    the least recently used goes first, whatever the count bound allows."""
    model = CausalWan(cfg, attention="sdpa").to(dtype).eval()
    ctxs = [torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(i)).to(dtype)
            for i in range(5)]
    probe = Engine(model, mode="eager", progress=False, max_sessions=1)
    probe.close(probe.open(ctxs[0], prompt="p0"))
    one = probe.memory().prompt_bytes                     # one prompt's bytes
    assert one > 0 and probe.prompt_cache_bytes > 0       # no budget: a share of the free memory
    engine = Engine(model, mode="eager", progress=False, max_sessions=1, prompt_cache_bytes=2 * one + one // 2)
    for i, ctx in enumerate(ctxs):
        engine.close(engine.open(ctx, prompt=f"p{i}"))
        assert engine.memory().prompt_bytes <= engine.prompt_cache_bytes
    assert list(engine._prompts) == ["p3", "p4"] and engine.memory().prompts == 2
    engine.close(engine.open(None, prompt="p4"))          # kept: no encode
    assert engine.stats.prompt_hits == 1
    with pytest.raises(InputError, match="a prompt key seen before"):
        engine.open(None, prompt="p0")                    # dropped by bytes
    none = Engine(model, mode="eager", progress=False, max_sessions=1, prompt_cache_bytes=one - 1)
    none.close(none.open(ctxs[0], prompt="p0"))
    assert none.memory().prompts == 0
    with pytest.raises(InputError, match="prompt_cache_bytes must be"):
        Engine(model, mode="eager", progress=False, prompt_cache_bytes=-1)
    with pytest.raises(InputError, match="leaves nothing of memory_budget"):
        Engine(model, mode="eager", progress=False, memory_budget=1000, prompt_cache_bytes=1000)


@torch.no_grad()
def test_memory_report(cfg, ctx):
    model = CausalWan(cfg, attention="sdpa").eval()
    engine = Engine(model, mode="eager", max_sessions=2, kv_dtype="int8", progress=False)
    m = engine.memory()
    assert m.weights == sum(p.nbytes for p in model.parameters()) and m.graph_pool is None   # CPU: no pool
    assert m.kv == engine.cache.memory() and m.kv.slabs == 2 and m.kv.kv_dtype == "int8"
    assert m.host_suspended == 0 and "2 slabs" in str(m)
    s = engine.open(ctx[:1], seed=1)
    engine.step()
    engine.suspend(s)
    m = engine.memory()
    rows = 8 + 2 * 4 * len(engine.schedule.steps)      # seed, timesteps and sigmas of the session
    assert m.suspended_sessions == 1 and m.host_suspended == m.kv.per_session + rows


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_suspend_and_resume_never_block_the_host(cfg):
    """On CUDA: pinned host copies on a side stream, no host sync in suspend/resume, and the resumed
    session continues bit for bit in whole-chunk CUDA graphs while others run in its old slab."""
    model = CausalWan(cfg).to("cuda", torch.bfloat16).eval()
    ctx = torch.randn(3, cfg.text_len, cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    # the captured kernels as eager runs them (inductor=False): bit for bit across engines
    solo = Engine(model, mode="chunk", kv_dtype="int8", inductor=False, progress=False)
    s = solo.open(ctx[:1], seed=7)
    want = [solo.step([s])[s] for _ in range(5)]
    engine = Engine(model, mode="chunk", max_sessions=2, kv_dtype="int8", inductor=False, progress=False)
    a, b = engine.open(ctx[:1], seed=7), engine.open(ctx[1:2], seed=8)
    got = [engine.step([a])[a] for _ in range(2)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.suspend(a)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    saved = engine._suspended[a.id]
    assert all(t.is_pinned() for t in saved.tensors.values())
    c = engine.open(ctx[2:3], seed=9)                  # a's old slab: waits for the wipe on the device
    for _ in range(2):
        engine.step([b, c])
    engine.suspend(b)
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.resume(a)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    got += [engine.step([a])[a] for _ in range(3)]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    m = engine.memory()
    assert m.graph_pool > 0 and m.suspended_sessions == 1 and m.host_suspended > m.kv.per_session


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_static_cache_over_the_budget_is_refused_naming_the_most_chunks(cfg, dtype):
    long = dataclasses.replace(cfg, max_frames=cfg.chunk_frames * 100_000)
    model = CausalWan(long, attention="sdpa").to(dtype)
    per_chunk = StaticKVCache.for_model(model, num_slabs=1, device="meta",
                                        max_frames=cfg.chunk_frames).memory().per_session
    budget = 40 * per_chunk
    with pytest.raises(CacheError, match=r"100000 chunks .* holds at most (\d+) chunk") as e:
        Engine(model, mode="eager", memory_budget=budget, progress=False)
    most = int(re.search(r"holds at most (\d+) chunk", str(e.value)).group(1))
    assert 10 <= most < 100 and "window=(" in str(e.value)
    fits = dataclasses.replace(cfg, max_frames=cfg.chunk_frames * most)       # the most it named fits
    Engine(CausalWan(fits, attention="sdpa").to(dtype), mode="eager", memory_budget=budget, progress=False)
    over = dataclasses.replace(cfg, max_frames=cfg.chunk_frames * (most + 1))
    with pytest.raises(CacheError, match=f"holds at most {most} chunk"):
        Engine(CausalWan(over, attention="sdpa").to(dtype), mode="eager", memory_budget=budget, progress=False)
    # the rolling cache it names makes the long video within the same budget
    window = (cfg.chunk_frames * 3, cfg.chunk_frames)
    engine = Engine(model, mode="eager", memory_budget=budget, window=window, progress=False)
    assert engine.cache.memory().total <= budget
    assert engine.generate(torch.randn(1, cfg.text_len, cfg.text_dim, dtype=dtype), 5).shape[2] == 5 * cfg.chunk_frames


def test_without_a_budget_a_static_cache_must_fit_the_free_memory(cfg, monkeypatch):
    from graphrt.pipeline import slabs
    long = dataclasses.replace(cfg, max_frames=cfg.chunk_frames * 100_000)
    monkeypatch.setattr(slabs, "free_memory", lambda device: 10 ** 8)
    with pytest.raises(CacheError, match=r"more than the free memory of cpu \(100,000,000 bytes\)"):
        Engine(CausalWan(long, attention="sdpa"), mode="eager", progress=False)
    Engine(CausalWan(cfg, attention="sdpa"), mode="eager", progress=False)     # the usual length fits
