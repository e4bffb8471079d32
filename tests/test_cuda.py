"""CUDA-only checks (skipped without a GPU): real CUDA graphs on the tiny Wan, in bf16 as users run.

Each test answers one question a CPU cannot: replays equal eager bit for bit (exact, masked and
padded buckets, the rolling cache, the Engine's modes), replays never allocate or sync, a failed
capture leaves the process usable, outputs share memory across buckets, inductor and FlexAttention
inside a CUDA graph, verification on CUDA, and the cudaMallocAsync allocator. Every test restores
what it changes (streams, sync-debug mode) in ``finally`` blocks, and the fixture below fails a test
that leaks such state, so one failure never breaks the next. Cheap tests first, compiles last.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import graphrt
from conftest import rel_err
from graphrt import Buckets
from graphrt.kv import RollingKVCache, StaticKVCache
from graphrt.models.wan import CausalWan, ReferenceWan
from graphrt.tolerance import tolerance

pytestmark = pytest.mark.cuda
STEPS = (1000.0, 750.0, 500.0, 250.0, 0.0)
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _leaves_cuda_as_it_found_it():
    stream, mode = torch.cuda.current_stream(), torch.cuda.get_sync_debug_mode()
    yield
    leaked = []
    if torch.cuda.current_stream() != stream:
        leaked.append(f"current stream {torch.cuda.current_stream()} (was {stream})")
        torch.cuda.set_stream(stream)
    if torch.cuda.get_sync_debug_mode() != mode:
        leaked.append(f"sync debug mode {torch.cuda.get_sync_debug_mode()} (was {mode})")
        torch.cuda.set_sync_debug_mode(mode)
    torch.cuda.synchronize()
    assert not leaked, f"the test left CUDA state behind: {leaked}"


class no_sync:
    """Raise on any synchronizing CUDA call inside; the previous mode comes back whatever happens."""

    def __enter__(self):
        self.mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.mode)


def _allocations() -> int:
    """Allocation requests so far (cumulative: a replay that allocates and frees still counts)."""
    return torch.cuda.memory_stats()["allocation.all.allocated"]


def _model(cfg, dtype=BF16, attention="sdpa"):
    torch.manual_seed(0)
    return CausalWan(cfg, attention=attention).to("cuda", dtype).eval()


def _caches(model, cfg, sessions=1, copies=2, cls=StaticKVCache, **kw):
    """Identical caches (graphs, eager) holding ``sessions`` sessions with prompts, rows bound."""
    dtype = next(model.parameters()).dtype
    ctx = torch.randn(sessions, cfg.text_len, cfg.text_dim, device="cuda", dtype=dtype)
    k, v = model.encode_prompt(ctx)
    out = []
    for _ in range(copies):
        cache = cls.for_model(model, num_slabs=sessions, max_batch=max(sessions, 2), **kw)
        slabs = [cache.acquire() for _ in range(sessions)]
        for i, s in enumerate(slabs):
            cache.set_cross(s, k[:, i], v[:, i])
        cache.bind(slabs)
        out.append(cache)
    return out


def _spec(cfg, batch_sizes=(1,), exact=(True,), max_frames=None):
    kv = tuple(range(cfg.chunk_frames, (max_frames or cfg.max_frames) + 1, cfg.chunk_frames))
    return Buckets(batch_sizes, batch_args=("x", "t"), static_args={"kv_frames": kv, "kv_exact": exact})


def _x(cfg, b=1, dtype=BF16):
    return torch.randn(b, cfg.in_dim, cfg.chunk_frames, cfg.height, cfg.width, device="cuda", dtype=dtype)


# -- equivalence ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
@torch.no_grad()
def test_cuda_graph_replay_is_bit_identical(cfg, dtype):
    model = _model(cfg, dtype)
    gcache, ecache = _caches(model, cfg)
    g = graphrt.compile(model, buckets=_spec(cfg), backend="cuda-graph", progress=False)
    for c in range(cfg.num_chunks):
        for t in STEPS:
            x, tt = _x(cfg, 1, dtype), torch.full((1,), t, device="cuda")
            got = g(x, tt, cache=gcache, kv_frames=(c + 1) * 3, kv_exact=True)
            want = model(x, tt, cache=ecache, kv_frames=(c + 1) * 3, kv_exact=True)
            assert torch.equal(got, want), f"chunk {c}, t={t}: max rel err {rel_err(got.float(), want.float()):.2e}"
        gcache.commit(1, 3)
        ecache.commit(1, 3)
    assert g.runtime.backend == "cuda-graph" and g.stats.captures == cfg.num_chunks


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
@torch.no_grad()
def test_causal_vs_reference_on_cuda(cfg, dtype):
    ref = ReferenceWan(cfg).to("cuda", dtype).eval()
    model = _model(cfg, dtype)
    model.load_state_dict(ref.state_dict())
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device="cuda", dtype=dtype)
    (cache,) = _caches(model, cfg, copies=1)
    k, v = model.encode_prompt(ctx)
    cache.set_cross(0, k[:, 0], v[:, 0])
    kv, cross = ref.init_caches(1)
    tol = 1e-4 if dtype == torch.float32 else tolerance(dtype)    # fp32 on CUDA: TF32-free, but other kernels
    for c in range(cfg.num_chunks):
        for t in STEPS:
            x, tt = _x(cfg, 1, dtype), torch.full((1,), t, device="cuda")
            want = ref(x, tt, ctx, kv, cross, current_start=c * 3 * cfg.frame_tokens)
            got = model(x, tt, cache=cache, kv_frames=(c + 1) * 3, kv_exact=True)
            err = rel_err(got.float(), want.float())
            assert err <= tol, f"chunk {c}, t={t}: rel err {err:.2e} > {tol}"
        cache.commit(1, 3)


@torch.no_grad()
def test_masked_and_padded_buckets(cfg):
    """Batch buckets (1, 2) x exact/masked. Two sessions at different chunks replay the masked
    batch-2 bucket bit for bit; one session alone in the batch-2 bucket (padded) matches its solo
    eager run within bf16 tolerance, writes nothing outside scratch, and its replays never sync."""
    model = _model(cfg)
    gcache, ecache = _caches(model, cfg, sessions=2)
    g = graphrt.compile(model, buckets=_spec(cfg, (2,), (True, False), max_frames=9), progress=False)
    for cache in (gcache, ecache):                      # session 1 runs one chunk ahead
        cache.bind([1])
        model(_x(cfg), torch.zeros(1, device="cuda"), cache=cache, kv_frames=3, kv_exact=True)
        cache.commit(1, 3)
        cache.bind([0, 1])
    for t in STEPS:
        x, tt = _x(cfg, 2), torch.full((2,), t, device="cuda")
        got = g(x, tt, cache=gcache, kv_frames=6, kv_exact=False)
        want = model(x, tt, cache=ecache, kv_frames=6, kv_exact=False)
        assert torch.equal(got, want), f"masked batch-2 bucket, t={t}: rel err {rel_err(got.float(), want.float()):.2e}"
    slab_1 = [t.clone() for t in gcache.slab_views(1)]
    x, tt = _x(cfg, 1), torch.zeros(1, device="cuda")
    g(x, tt, cache=gcache, kv_frames=3, kv_exact=True)              # captures the bucket (that syncs)
    torch.cuda.synchronize()
    with no_sync():
        got = g(x, tt, cache=gcache, kv_frames=3, kv_exact=True)    # one row in the batch-2 bucket
    assert got.shape[0] == 1 and g.keys[0].batch == 2
    assert all(torch.equal(a, b) for a, b in zip(gcache.slab_views(1), slab_1)), "the padded row wrote into slab 1"
    assert gcache.block_table.tolist() == [0, 1], "padding did not restore the block table"
    ecache.bind([0])
    want = model(x, tt, cache=ecache, kv_frames=3, kv_exact=True)
    assert rel_err(got.float(), want.float()) <= tolerance(BF16)


@torch.no_grad()
def test_rolling_cache_replays_exactly_past_the_window(cfg):
    model = _model(cfg)
    gcache, ecache = _caches(model, cfg, cls=RollingKVCache, window_frames=9, sink_frames=3)
    g = graphrt.compile(model, buckets=_spec(cfg, max_frames=9), progress=False)
    for c in range(9):                                  # 27 frames through a 9-frame window
        kv = min((c + 1) * 3, 9)
        for t in (1000.0, 0.0):
            x, tt = _x(cfg), torch.full((1,), t, device="cuda")
            got = g(x, tt, cache=gcache, kv_frames=kv, kv_exact=True)
            want = model(x, tt, cache=ecache, kv_frames=kv, kv_exact=True)
            assert torch.equal(got, want), f"chunk {c}, t={t}: rel err {rel_err(got.float(), want.float()):.2e}"
        gcache.commit(1, 3)
        ecache.commit(1, 3)
    assert g.stats.captures == 3


@torch.no_grad()
def test_engine_forward_and_chunk_modes(cfg):
    """The Engine's graph modes on the model's own kernels (``inductor=False``; the default compiles,
    tests/test_once.py) equal its eager mode bit for bit on CUDA (the chunk function takes
    no tensors: the cache's device picks cuda-graph), and a steady chunk makes no host read: the
    block-table upload is a pinned non-blocking copy, counted apart."""
    from graphrt.capture.hostreads import HostReadRecorder
    from graphrt.pipeline import Engine

    cfg = cfg.replace(max_frames=9)
    model = _model(cfg)
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim, device="cuda", dtype=BF16)
    want = Engine(model, max_sessions=2, mode="eager", progress=False).generate(ctx, 3, seed=[1, 2])
    for mode in ("forward", "chunk"):
        engine = Engine(model, max_sessions=2, batch_sizes=(1, 2), mode=mode, inductor=False, progress=False)
        got = engine.generate(ctx, 3, seed=[1, 2])
        assert engine.graphs.runtime.backend == "cuda-graph"
        assert torch.equal(got, want), f"{mode}: rel err {rel_err(got.float(), want.float()):.2e}"
        stream = engine.stream(ctx, 2, seed=[1, 2])
        next(stream)
        recorder = HostReadRecorder()
        with recorder:
            next(stream)
        stream.close()
        report = recorder.report()
        assert report.count == 0, f"{mode}: host reads in a steady chunk:\n{report}"
        assert report.uploads == 1, f"{mode}: expected the one block-table upload:\n{report}"


# -- what replays cost ----------------------------------------------------------------------------------
@torch.no_grad()
def test_replays_allocate_nothing_and_never_sync(cfg):
    model = _model(cfg)
    (cache,) = _caches(model, cfg, copies=1)
    g = graphrt.compile(model, buckets=_spec(cfg), progress=False)
    xs = [_x(cfg) for _ in STEPS]
    ts = [torch.full((1,), t, device="cuda") for t in STEPS]
    g.prewarm(xs[0], ts[0], cache=cache, kv_frames=3, kv_exact=True)
    g(xs[0], ts[0], cache=cache, kv_frames=3, kv_exact=True)
    torch.cuda.synchronize()
    made, allocated = 0, torch.cuda.memory_allocated()
    with no_sync():
        for c in range(cfg.num_chunks):
            before = _allocations()
            for x, t in zip(xs, ts):
                g(x, t, cache=cache, kv_frames=(c + 1) * 3, kv_exact=True)
            made += _allocations() - before
            cache.commit(1, 3)
    torch.cuda.synchronize()
    assert made == 0, f"replays made {made} allocation request(s) (counted cumulatively)"
    assert torch.cuda.memory_allocated() == allocated
    assert g.stats.replays == 1 + cfg.num_chunks * len(STEPS)


@torch.no_grad()
def test_shared_pool_is_smaller_than_separate_graphs(cfg):
    model = _model(cfg)
    (cache,) = _caches(model, cfg, copies=1)
    x, t = _x(cfg), torch.zeros(1, device="cuda")
    shared = graphrt.compile(model, buckets=_spec(cfg), progress=False)
    shared.prewarm(x, t, cache=cache, kv_frames=3, kv_exact=True)
    alone = []                                   # kept alive: each holds its own pool
    for kv in range(3, cfg.max_frames + 1, 3):
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
def test_outputs_live_until_the_next_replay_of_any_bucket():
    """Every bucket writes its outputs into one arena: bucket B's replay overwrites A's outputs
    (the lifetime the docs promise and the CPU emulation shows), unless clone_outputs."""
    g = graphrt.compile(lambda x, k: x * k, verify=1, progress=False)
    x = torch.ones(1024, device="cuda")
    a = g(x, 2.0)
    b = g(x, 3.0)
    assert a.data_ptr() == b.data_ptr() and torch.equal(a, torch.full_like(x, 3.0))
    assert g(x, 2.0).data_ptr() == a.data_ptr()             # a verified replay returns the same static output
    kept = graphrt.compile(lambda x, k: x * k, clone_outputs=True, progress=False)
    a = kept(x, 2.0)
    kept(x, 3.0)
    assert torch.equal(a, torch.full_like(x, 2.0))


def test_state_in_tensor_arguments_is_refused_and_in_an_object_argument_replays():
    """A CUDA graph writes into its static copy of a tensor argument, so such a write is refused at
    capture; the same state in a dataclass argument is used live by the graph (bf16, as users run),
    and a tensor of it rebound between calls is refused at the next call."""
    from dataclasses import dataclass

    @dataclass
    class State:                      # eq=True: unhashable, keyed by identity
        cache: torch.Tensor
        pos: torch.Tensor

    def step(x, cache, pos):
        cache.index_copy_(0, pos, x)
        pos.add_(1)
        return cache.float().sum(0)

    kw = dict(device="cuda")
    with pytest.raises(graphrt.errors.CaptureError, match=r"(?s)writes into tensor argument.*cache.*pos"):
        graphrt.compile(step, progress=False)(torch.ones(1, 4, dtype=BF16, **kw), torch.zeros(8, 4, dtype=BF16, **kw),
                                              torch.zeros(1, dtype=torch.long, **kw))

    def fresh():
        return State(torch.zeros(8, 4, dtype=BF16, **kw), torch.zeros(1, dtype=torch.long, **kw))

    s, twin = fresh(), fresh()
    g = graphrt.compile(lambda x, s: step(x, s.cache, s.pos), verify=2, progress=False)
    for i in range(4):
        x = torch.full((1, 4), float(i + 1), dtype=BF16, **kw)
        assert torch.equal(g(x, s), step(x, twin.cache, twin.pos))
    assert s.pos.item() == 4 and torch.equal(s.cache, twin.cache) and g.stats.captures == 1
    s.cache = s.cache.clone()
    with pytest.raises(graphrt.SignatureError, match=r"s\.cache: a tensor"):
        g(x, s)


# -- failure paths --------------------------------------------------------------------------------------
def test_a_failed_capture_leaves_the_process_usable():
    """A sync inside the captured region (check=False lets it through) fails the capture: the error
    names the first cause, the caller's stream is current again, eager random numbers still work
    (the generator left capture mode), and the next capture works."""
    def syncs(x):
        return x * x.sum().item()

    x = torch.ones(8, device="cuda")
    stream = torch.cuda.current_stream()
    bad = graphrt.compile(syncs, check=False, progress=False)
    with pytest.raises(graphrt.CaptureError) as e:
        bad(x)
    message = str(e.value)
    assert "previous error" not in message.splitlines()[0], f"the message hides the cause:\n{message}"
    assert "graphrt.check" in message
    assert torch.cuda.current_stream() == stream, "the side stream is still current after a failed capture"
    try:
        torch.randn(4, device="cuda")       # capture_end raised before the generator left capture mode
    except RuntimeError as err:
        pytest.fail(f"eager CUDA random numbers fail after a failed capture: {err}")
    good = graphrt.compile(lambda x: x * 2, progress=False)
    assert torch.equal(good(x), x * 2) and torch.equal(good(x + 1), (x + 1) * 2)


@torch.no_grad()
def test_verify_on_cuda_passes_the_model_and_catches_a_frozen_position(cfg):
    model = _model(cfg)
    (cache,) = _caches(model, cfg, copies=1)
    g = graphrt.compile(model, buckets=_spec(cfg, max_frames=9), verify=2, progress=False)
    for c in range(3):
        for t in (1000.0, 0.0):
            g(_x(cfg), torch.full((1,), t, device="cuda"), cache=cache, kv_frames=(c + 1) * 3, kv_exact=True)
        cache.commit(1, 3)
    assert g.stats.verified == 3                          # one replay per bucket after its capture

    from test_compile import LeakyWriter

    leaky = LeakyWriter(width=8, device="cuda")
    g = graphrt.compile(leaky, verify=1, progress=False)
    g(torch.ones(8, device="cuda"))
    leaky.pos = 1
    with pytest.raises(graphrt.ReplayMismatchError, match=r"LeakyWriter\.log"):
        g(torch.ones(8, device="cuda"))


def test_cuda_malloc_async_backend(tmp_path):
    """The allocator backend is fixed per process: a subprocess runs a capture and replays under
    cudaMallocAsync, where memory snapshots are refused (pool_bytes says None, never crashes)."""
    script = tmp_path / "async_alloc.py"
    script.write_text(textwrap.dedent("""
        import torch, graphrt
        from graphrt.models.wan import CausalWan, WanConfig
        from graphrt.kv import StaticKVCache
        assert torch.cuda.get_allocator_backend() == "cudaMallocAsync", torch.cuda.get_allocator_backend()
        cfg = WanConfig.preset("tiny", max_frames=6)
        model = CausalWan(cfg, attention="sdpa").to("cuda", torch.bfloat16).eval()
        caches = [StaticKVCache.for_model(model) for _ in range(2)]
        for c in caches:
            c.bind([c.acquire()])
        spec = graphrt.Buckets((1,), batch_args=("x", "t"), static_args={"kv_frames": (3, 6), "kv_exact": (True,)})
        g = graphrt.compile(model, buckets=spec, progress=False)
        with torch.no_grad():
            x = torch.randn(1, cfg.in_dim, 3, cfg.height, cfg.width, device="cuda", dtype=torch.bfloat16)
            t = torch.zeros(1, device="cuda")
            g.prewarm(x, t, cache=caches[0], kv_frames=3, kv_exact=True)
            for kv in (3, 6):
                got = g(x, t, cache=caches[0], kv_frames=kv, kv_exact=True)
                want = model(x, t, cache=caches[1], kv_frames=kv, kv_exact=True)
                assert torch.equal(got, want), kv
                for c in caches:
                    c.commit(1, 3)
        print("pool_bytes", g.stats.pool_bytes, g.runtime.pool_bytes())
    """))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="backend:cudaMallocAsync",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"under cudaMallocAsync:\n{done.stdout}\n{done.stderr[-4000:]}"
    assert "pool_bytes None None" in done.stdout, done.stdout


# -- compiles: inductor and FlexAttention inside CUDA graphs (slowest last) -----------------------------
@torch.no_grad()
def test_inductor_inside_a_cuda_graph(cfg):
    """inductor compiles the bucket (its own CUDA graphs off), graphrt captures it: equal to eager
    within bf16 tolerance, verified on CUDA, and replays allocate nothing."""
    model = _model(cfg)
    gcache, ecache = _caches(model, cfg)
    spec = Buckets((1,), batch_args=("x", "t"), static_args={"kv_frames": (3,), "kv_exact": (True,)})
    g = graphrt.compile(model, buckets=spec, inductor=True, verify=1, progress=False)
    xs = [_x(cfg) for _ in range(3)]
    t = torch.zeros(1, device="cuda")
    for i, x in enumerate(xs):
        got = g(x, t, cache=gcache, kv_frames=3, kv_exact=True)
        want = model(x, t, cache=ecache, kv_frames=3, kv_exact=True)
        assert rel_err(got.float(), want.float()) <= tolerance(BF16), f"call {i}"
    graph = next(iter(g._graphs.values())).captured.graph
    assert g.runtime.backend == "cuda-graph" and g.stats.verified == 1
    assert getattr(graph.fn, "_orig_mod", None) is not None, "the graph does not hold its compiled callable"
    torch.cuda.synchronize()
    before = _allocations()
    with no_sync():
        for x in xs:
            g(x, t, cache=gcache, kv_frames=3, kv_exact=True)
    torch.cuda.synchronize()
    assert _allocations() == before, f"inductor replays made {_allocations() - before} allocation request(s)"


@torch.no_grad()
def test_flex_attention_in_cuda_graphs_compiles_once_per_shape(cfg):
    """attention="flex" in forward-mode graphs: each attention shape compiles exactly once (dynamo
    may not recompile at all here), and the video matches SDPA within bf16 tolerance."""
    import torch._dynamo

    from graphrt.pipeline import Engine

    cfg = cfg.replace(max_frames=6)
    flex, sdpa = _model(cfg, attention="flex"), _model(cfg)
    sdpa.load_state_dict(flex.state_dict())
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device="cuda", dtype=BF16)
    patch = {"recompile_limit": 1}
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        patch["fail_on_recompile_limit_hit"] = True
    with torch._dynamo.config.patch(**patch):
        got = Engine(flex, mode="forward", inductor=False, progress=False).generate(ctx, 2, seed=4)
    want = Engine(sdpa, mode="eager", progress=False).generate(ctx, 2, seed=4)
    assert rel_err(got.float(), want.float()) <= tolerance(BF16)


@torch.no_grad()
def test_engine_chunk_graph_with_inductor_in_a_cuda_graph(cfg):
    """Inductor's kernels for the whole chunk, captured in graphrt's CUDA graph (inductor's own
    CUDA graphs off), prewarmed before any session: bf16 within tolerance of eager, every chunk
    one replay, and a second video on the same graph reads the live cache."""
    from graphrt.pipeline import Engine

    model = _model(cfg)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device="cuda", dtype=BF16)
    graphed = Engine(model, mode="chunk", inductor=True, kv_buckets="max", progress=False).prewarm()
    eager = Engine(model, mode="eager", kv_buckets="max", progress=False)
    got = graphed.generate(ctx, 3, seed=1)
    assert graphed.graphs.runtime.backend == "cuda-graph" and graphed.graphs.runtime.inductor == "python"
    assert graphed.graphs.stats.captures == 1 and graphed.graphs.stats.replays == 3
    assert rel_err(got.float(), eager.generate(ctx, 3, seed=1).float()) <= tolerance(BF16)
    assert torch.equal(graphed.generate(ctx, 3, seed=1), got)
