"""graphrt.compile: one graph per bucket, replay == eager, state untouched by capture, clear errors."""
import contextlib
import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import graphrt
from conftest import rel_err
from graphrt import Buckets, BucketMissError, ReplayMismatchError, SignatureError
from graphrt.kv import RollingKVCache, StaticKVCache
from graphrt.models.wan import CausalWan

STEPS = (1000.0, 750.0, 500.0, 250.0, 0.0)


def wan_buckets(cfg, batch_sizes=(1, 2), exact=(True, False)):
    kv = tuple(range(cfg.chunk_frames, cfg.max_frames + 1, cfg.chunk_frames))
    return Buckets(batch_sizes, batch_args=("x", "t"), static_args={"kv_frames": kv, "kv_exact": exact})


def _cache(model, cls=StaticKVCache, slabs=2, **kw):
    return cls.for_model(model, num_slabs=slabs, max_batch=2, **kw)


def _prompt(model, cache, slab, ctx):
    k, v = model.encode_prompt(ctx)
    cache.set_cross(slab, k[:, 0], v[:, 0])


def _twin_caches(model, cfg, n_sessions, cls=StaticKVCache, copies=2, **kw):
    """Identical caches (by default two: one for the graphs, one for eager) with n sessions and prompts."""
    caches = [_cache(model, cls, **kw) for _ in range(copies)]
    ctx = torch.randn(n_sessions, cfg.text_len, cfg.text_dim, dtype=next(model.parameters()).dtype)
    for c in caches:
        for i in range(n_sessions):
            _prompt(model, c, c.acquire(), ctx[i:i + 1])
    return caches


@pytest.mark.parametrize("case,dtype", [("b1", torch.float32), ("b2-heterogeneous", torch.float32),
                                        ("rolling", torch.float32), ("b1", torch.bfloat16),
                                        ("b2-heterogeneous", torch.bfloat16), ("rolling", torch.float16)],
                         ids=["b1-fp32", "b2-hetero-fp32", "rolling-fp32", "b1-bf16", "b2-hetero-bf16",
                              "rolling-fp16"])
@torch.no_grad()
def test_cpu_graph_replay_is_bit_identical(cfg, case, dtype):
    """7 chunks x 5 forwards: cpu-graph replay == the eager graph-safe forward, every chunk, every
    row, in the dtypes users run (bf16 and fp16 as well as fp32)."""
    model = CausalWan(cfg, attention="sdpa").to(dtype).eval()
    kw = dict(cls=RollingKVCache, window_frames=9, sink_frames=3) if case == "rolling" else {}
    gcache, ecache = _twin_caches(model, cfg, 2, **kw)
    g = graphrt.compile(model, buckets=wan_buckets(cfg), backend="cpu-graph", progress=False)
    hetero = case == "b2-heterogeneous"
    for cache in (gcache, ecache):
        cache.bind([1])                     # session 1 runs two chunks alone first
    chunks = [(1, [1], c) for c in range(2)] if hetero else []
    chunks += [((2, [0, 1], c) if hetero else (1, [0], c)) for c in range(7 - (2 if hetero else 0))]
    for b, slabs, c in chunks:
        for cache in (gcache, ecache):
            cache.bind(slabs)
        kv_frames = ((c + 2 if hetero and b == 2 else c) + 1) * cfg.chunk_frames
        exact = b == 1
        for t in STEPS:
            x = torch.randn(b, cfg.in_dim, cfg.chunk_frames, cfg.height, cfg.width, dtype=dtype)
            tt = torch.full((b,), t)
            got = g(x, tt, cache=gcache, kv_frames=kv_frames, kv_exact=exact)
            want = model(x, tt, cache=ecache, kv_frames=kv_frames, kv_exact=exact)
            assert got.dtype == dtype and torch.equal(got, want), (b, c, t)
        gcache.commit(b, cfg.chunk_frames)
        ecache.commit(b, cfg.chunk_frames)
    assert torch.equal(gcache.frames, ecache.frames)
    for a, b in zip(gcache.k + gcache.v, ecache.k + ecache.v):
        assert torch.equal(a[:gcache.scratch_base], b[:ecache.scratch_base])
    assert g.stats.replays == len(chunks) * len(STEPS)
    assert g.stats.captures == len({(b, c, b == 1) for b, _, c in chunks})


class LeakyCache(nn.Module):
    """Planted footgun: the driver advances a Python-int write position between chunks."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kv", torch.zeros(8, 4))
        self.pos = 0

    def forward(self, x):
        self.kv[self.pos] = x[0]             # Python-int slice: frozen into a graph
        return self.kv[: self.pos + 1].sum(0, keepdim=True)

    def advance(self):
        self.pos += 1

    def snapshot(self, data=False):
        return {"kv": self.kv.clone(), "pos": self.pos}

    def restore(self, snap):
        self.kv.copy_(snap["kv"])
        self.pos = snap["pos"]

    def reset(self):
        self.kv.zero_()
        self.pos = 0


class FixedCache(LeakyCache):
    """The fix: the position lives on the device; writes use index_copy_, reads a device mask."""

    def __init__(self):
        super().__init__()
        self.register_buffer("dpos", torch.zeros(1, dtype=torch.long))

    def forward(self, x):
        self.kv.index_copy_(0, self.dpos, x)
        valid = torch.arange(self.kv.shape[0], device=self.kv.device) <= self.dpos
        return (self.kv * valid[:, None]).sum(0, keepdim=True)

    def advance(self):
        self.dpos.add_(1)

    def snapshot(self, data=False):
        return {"kv": self.kv.clone(), "dpos": self.dpos.clone()}

    def restore(self, snap):
        self.kv.copy_(snap["kv"])
        self.dpos.copy_(snap["dpos"])

    def reset(self):
        self.kv.zero_()
        self.dpos.zero_()


def _drive(model, fn, xs):
    outs = []
    for x in xs:
        outs.append(fn(x).clone())
        model.advance()
    return outs


@torch.no_grad()
def test_planted_footgun_is_caught_by_verify():
    xs = [torch.full((1, 4), float(i + 1)) for i in range(4)]
    eager = LeakyCache()
    want = _drive(eager, eager, xs)                      # running sums 1, 3, 6, 10
    leaky = LeakyCache()
    got = _drive(leaky, graphrt.compile(leaky, backend="cpu-graph", progress=False), xs)
    assert torch.equal(got[0], want[0])
    assert not torch.equal(got[1], want[1])              # the emulation froze pos=0, as a CUDA graph would

    leaky = LeakyCache()
    g = graphrt.compile(leaky, backend="cpu-graph", verify=1, progress=False)
    with pytest.raises(ReplayMismatchError, match="frozen into the graph"):
        _drive(leaky, g, xs)                             # the first replay after capture is verified

    fixed = FixedCache()
    g = graphrt.compile(fixed, backend="cpu-graph", verify=4, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(_drive(fixed, g, xs), want))
    assert g.stats.verified == 3 and g.stats.captures == 1   # the capturing call is not a verification


@torch.no_grad()
def test_prewarm_leaves_no_trace_and_reset_replays_the_same_video(cfg):
    model = CausalWan(cfg, attention="sdpa").eval()
    cache = _cache(model)
    slab = cache.acquire()
    _prompt(model, cache, slab, torch.randn(1, cfg.text_len, cfg.text_dim))
    cache.bind([slab])
    g = graphrt.compile(model, buckets=wan_buckets(cfg, exact=(True,)), progress=False)
    x = torch.randn(1, cfg.in_dim, cfg.chunk_frames, cfg.height, cfg.width)
    x0 = x.clone()
    # a session already in progress: one committed chunk
    model(x, torch.zeros(1), cache=cache, kv_frames=3, kv_exact=True)
    cache.commit(1, cfg.chunk_frames)
    before = cache.snapshot(data=True)
    g.prewarm(x, torch.zeros(1), cache=cache, kv_frames=3, kv_exact=True)
    after = cache.snapshot(data=True)
    real = {"cross_k": (slice(None), slice(0, cache.num_slabs)), "cross_v": (slice(None), slice(0, cache.num_slabs)),
            "frames": slice(0, cache.num_slabs)}            # everything but the scratch region
    for name in before:
        where = slice(0, cache.scratch_base) if name[:2] in ("k.", "v.") else real.get(name, slice(None))
        assert torch.equal(before[name][where], after[name][where]), name
    assert g.stats.captures == 14 and g.sealed
    assert torch.equal(x, x0)

    def video():
        torch.manual_seed(7)
        outs = []
        for c in range(3):
            for t in STEPS:
                outs.append(g(torch.randn_like(x), torch.full((1,), t), cache=cache, kv_frames=(c + 1) * 3,
                              kv_exact=True).clone())
            cache.commit(1, cfg.chunk_frames)
        return outs

    g.reset()
    cache.bind([cache.acquire()])
    _prompt(model, cache, 0, torch.ones(1, cfg.text_len, cfg.text_dim))
    first = video()
    g.reset()
    cache.bind([cache.acquire()])
    _prompt(model, cache, 0, torch.ones(1, cfg.text_len, cfg.text_dim))
    second = video()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert g.stats.captures == 14


@torch.no_grad()
def test_padding_dispatch_and_scratch(cfg):
    """A B=1 request runs in the batch-2 bucket: its padded row writes only to scratch, and the
    caller's block table is back as it was afterwards."""
    model = CausalWan(cfg, attention="sdpa").eval()
    cache, eager = _twin_caches(model, cfg, 2)
    g = graphrt.compile(model, buckets=Buckets((2,), batch_args=("x", "t"),
                                               static_args={"kv_frames": (3,), "kv_exact": (True,)}),
                        progress=False)
    cache.bind([0, 1])                       # a binding of two rows ...
    slab_1 = [t.clone() for t in cache.slab_views(1)]
    x = torch.randn(1, cfg.in_dim, 3, cfg.height, cfg.width)
    out = g(x, torch.zeros(1), cache=cache, kv_frames=3, kv_exact=True)   # ... but one row requested
    assert out.shape[0] == 1 and g.keys[0].batch == 2
    assert all(torch.equal(a, b) for a, b in zip(cache.slab_views(1), slab_1))   # row 1 went to scratch
    assert cache.block_table.tolist() == [0, 1]                            # padding was undone
    eager.bind([0])
    assert rel_err(out, model(x, torch.zeros(1), cache=eager, kv_frames=3, kv_exact=True)) <= 1e-5
    eager.bind([0, 1])
    x = torch.randn(2, cfg.in_dim, 3, cfg.height, cfg.width)               # session 1 is intact
    got = g(x, torch.zeros(2), cache=cache, kv_frames=3, kv_exact=True)
    assert rel_err(got, model(x, torch.zeros(2), cache=eager, kv_frames=3, kv_exact=True)) <= 1e-5


@torch.no_grad()
def test_miss_sealed_and_signature_errors(cfg):
    model = CausalWan(cfg, attention="sdpa").eval()
    (cache,) = _twin_caches(model, cfg, 1, copies=1)
    cache.bind([0])
    spec = Buckets((1,), batch_args=("x", "t"), static_args={"kv_frames": (3, 6), "kv_exact": (True,)})
    g = graphrt.compile(model, buckets=spec, progress=False)
    x = torch.randn(1, cfg.in_dim, 3, cfg.height, cfg.width)
    g.prewarm(x, torch.zeros(1), cache=cache, kv_frames=3, kv_exact=True)
    assert len(g.keys) == 2
    with pytest.raises(BucketMissError, match=r"kv_frames=9 is not one of \(3, 6\)") as e:
        g(x, torch.zeros(1), cache=cache, kv_frames=9, kv_exact=True)
    assert "batch=1 kv_exact=True kv_frames=6" in str(e.value) and "fallback='eager'" in str(e.value)
    with pytest.raises(BucketMissError, match="larger than the largest batch bucket 1"):
        g(torch.cat([x, x]), torch.zeros(2), cache=cache, kv_frames=3, kv_exact=True)
    with pytest.raises(SignatureError, match=r"x: float64\[1, 4, 3, 8, 8\]") as e:
        g(x.double(), torch.zeros(1), cache=cache, kv_frames=3, kv_exact=True)
    assert "float32[1, 4, 3, 8, 8]" in str(e.value)

    g = graphrt.compile(model, buckets=spec, fallback="eager", progress=False)
    g.prewarm(x, torch.zeros(1), cache=cache, kv_frames=3, kv_exact=True)
    out = g(x, torch.zeros(1), cache=cache, kv_frames=3, kv_exact=False)
    assert out.shape == x.shape and g.stats.eager_fallbacks == 1


def test_nested_inputs_python_values_and_output_structure():
    def fn(pair, extra, *, scale=2, options=None):
        a, b = pair
        out = {"sum": (a + b) * scale, "parts": [a * extra["w"], b]}
        return out if options != "tuple" else (out["sum"],)

    g = graphrt.compile(fn, verify=2, progress=False)
    a, b, w = torch.randn(3), torch.randn(3), torch.randn(3)
    for _ in range(2):
        got = g((a, b), {"w": w}, scale=3)
        assert set(got) == {"sum", "parts"} and torch.equal(got["sum"], (a + b) * 3)
        assert torch.equal(got["parts"][0], a * w)
    assert isinstance(g((a, b), {"w": w}, options="tuple"), tuple)
    assert g.stats.captures == 2          # scale=3 and options="tuple" are separate buckets
    g((a, b), {"w": w}, scale=4)
    assert g.stats.captures == 3


def _append_step(x, cache, pos):
    cache.index_copy_(0, pos, x)
    pos.add_(1)
    return cache.sum(0)


@dataclass(eq=False)
class _State:
    cache: torch.Tensor
    pos: torch.Tensor


@pytest.mark.parametrize("backend", ["cpu-graph", "eager"])
@pytest.mark.parametrize("check", [True, False])
def test_writing_into_a_tensor_argument_is_refused_with_its_path(backend, check):
    """A replay writes into graphrt's static copy of a tensor argument, so the caller's tensor would
    never change and the next call would copy its stale values back in: refused at capture, by path."""
    def in_dict(x, state):
        return _append_step(x, state["cache"], state["pos"])

    x, cache, pos = torch.ones(1, 4), torch.zeros(8, 4), torch.zeros(1, dtype=torch.long)
    cases = [(_append_step, (x, cache, pos), {}, r"cache \(aten\.index_copy_.*pos \(aten\.add_"),
             (in_dict, (x,), {"state": {"cache": cache, "pos": pos}}, r"state\['cache'\].*state\['pos'\]")]
    for fn, args, kwargs, named in cases:
        g = graphrt.compile(fn, backend=backend, check=check, verify=3, progress=False)
        with pytest.raises(graphrt.errors.CaptureError, match=r"(?s)writes into tensor argument.*" + named):
            g(*args, **kwargs)
        assert not cache.any() and pos.item() == 0      # the refused capture left no trace

    # the same state used live, in an object argument or a module buffer, replays as eager runs
    def in_object(x, s):
        return _append_step(x, s.cache, s.pos)

    class Appender(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cache", torch.zeros(8, 4))
            self.register_buffer("pos", torch.zeros(1, dtype=torch.long))

        def forward(self, x):
            return _append_step(x, self.cache, self.pos)

    for make in (lambda: (in_object, _State(torch.zeros(8, 4), torch.zeros(1, dtype=torch.long))),
                 lambda: (Appender(), None)):
        fn, s = make()
        eager_fn, eager_s = make()
        g = graphrt.compile(fn, backend=backend, check=check, verify=3, progress=False)
        for i in range(4):
            xi = torch.full((1, 4), float(i + 1))
            got = g(xi) if s is None else g(xi, s)
            want = eager_fn(xi) if s is None else eager_fn(xi, eager_s)
            assert torch.equal(got, want)
        assert got[0].item() == 10.0


@dataclass
class _EqState:              # eq=True, so unhashable: keyed by identity
    cache: torch.Tensor
    pos: torch.Tensor


def test_an_unhashable_dataclass_argument_is_keyed_by_identity_and_used_live():
    def step(x, s):
        return _append_step(x, s.cache, s.pos)

    def in_dict(x, d):
        return step(x, d["s"])

    def fresh():
        return _EqState(torch.zeros(8, 4), torch.zeros(1, dtype=torch.long))

    for fn, wrap in ((step, lambda s: s), (in_dict, lambda s: {"s": s})):
        s, twin = fresh(), fresh()
        g = graphrt.compile(fn, verify=3, progress=False)
        for i in range(4):
            xi = torch.full((1, 4), float(i + 1))
            assert torch.equal(g(xi, wrap(s)), fn(xi, wrap(twin)))
        assert s.pos.item() == 4 and torch.equal(s.cache, twin.cache)
        assert g.stats.captures == 1 and "_EqState at 0x" in str(g.keys[0])
        with pytest.raises(SignatureError, match="another _EqState object"):
            g(torch.ones(1, 4), wrap(fresh()))          # equal by value, but the graph writes the first one's
        s.pos = s.pos.clone()                           # rebound: the graph would go on writing the old one
        with pytest.raises(SignatureError, match=r"(?s)replaced since bucket.*\.pos: a tensor int64\[1\]"):
            g(torch.ones(1, 4), wrap(s))
    with pytest.raises(graphrt.errors.InputError, match="neither a tensor"):
        graphrt.compile(lambda x, s: x, progress=False)(torch.ones(1), {1, 2})


def test_static_buffer_passed_back_skips_copy():
    g = graphrt.compile(lambda x: x * 2, progress=False)
    x = torch.randn(4)
    g(x)
    (static,), _ = g.static_inputs(x)        # in the call's (args, kwargs) structure
    static.copy_(torch.arange(4.0))
    assert torch.equal(g(static), torch.arange(4.0) * 2)
    assert static.data_ptr() != x.data_ptr()


def test_outputs_are_static_unless_cloned():
    g = graphrt.compile(lambda x: x + 1, progress=False)
    first = g(torch.zeros(2))
    g(torch.ones(2))
    assert torch.equal(first, torch.full((2,), 2.0))     # overwritten by the next replay
    g = graphrt.compile(lambda x: x + 1, clone_outputs=True, progress=False)
    first = g(torch.zeros(2))
    g(torch.ones(2))
    assert torch.equal(first, torch.ones(2))


def test_diffusers_wan_transformer_replays_exactly(cfg):
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers).eval()
    g = graphrt.compile(model, verify=1, progress=False)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim)
    with torch.no_grad():
        for t in (999, 500, 3):
            x = torch.randn(1, cfg.in_dim, 3, cfg.height, cfg.width)
            tt = torch.tensor([t])
            got = g(x, tt, ctx, return_dict=False)
            assert isinstance(got, tuple) and torch.equal(got[0], model(x, tt, ctx, return_dict=False)[0])
        out = g(x, tt, ctx)
        assert type(out).__name__ == "Transformer2DModelOutput" and torch.equal(out.sample, got[0])
    assert g.stats.captures == 2 and g.stats.replays == 4


@pytest.mark.slow
@torch.no_grad()
def test_inductor_inside_the_cpu_graph(cfg):
    """Equal to eager within fp32 tolerance, and the KV writes stay in place: the generated code
    never allocates a buffer the size of a layer's pool (an out-of-place copy of the cache)."""
    from torch._inductor.utils import run_and_get_code

    model = CausalWan(cfg, attention="sdpa").eval()
    gcache, ecache = _twin_caches(model, cfg, 1)
    for c in (gcache, ecache):
        c.bind([0])
    # the Python wrapper: its generated code is Python, which run_and_get_code returns (the AOTInductor
    # package's C++ is checked in test_aot.py)
    g = graphrt.compile(model, inductor="python", verify=1, progress=False)
    for i, t in enumerate((1000.0, 0.0)):
        x = torch.randn(1, cfg.in_dim, 3, cfg.height, cfg.width)
        call = lambda: g(x, torch.full((1,), t), cache=gcache, kv_frames=3, kv_exact=True)   # noqa: E731
        if i == 0:
            got, codes = run_and_get_code(call)
        else:
            got = call()
        want = model(x, torch.full((1,), t), cache=ecache, kv_frames=3, kv_exact=True)
        assert rel_err(got, want) <= 1e-5
    alloc = re.compile(r"empty_strided\w*\(\(%d, %d, %d\)" % tuple(gcache.k[0].shape))
    assert codes and not any(alloc.search(code) for code in codes), "the compiled forward copies the KV pool"
    assert g.stats.captures == 1 and g.runtime.inductor and g.stats.verified == 1


@torch.no_grad()
def test_compile_refuses_a_forward_with_host_reads(cfg, models):
    ref, _ = models
    kv, cross = ref.init_caches(1)
    g = graphrt.compile(ref, progress=False)
    x, ctx = torch.randn(1, cfg.in_dim, 3, cfg.height, cfg.width), torch.randn(1, cfg.text_len, cfg.text_dim)
    with pytest.raises(graphrt.HostReadError, match=r"reference\.py:\d+") as e:
        g(x, torch.zeros(1), ctx, kv, cross, current_start=0)
    assert e.value.report.count > 0 and g.stats.captures == 0
    assert int(kv[0]["global_end_index"]) == 0            # the refused capture left no trace


@torch.no_grad()
def test_sealed_miss_on_a_bucket_the_spec_allows(cfg):
    model = CausalWan(cfg, attention="sdpa").eval()
    (cache,) = _twin_caches(model, cfg, 1, copies=1)
    cache.bind([0])
    g = graphrt.compile(model, buckets=wan_buckets(cfg, batch_sizes=(1,), exact=(True, False)), progress=False)
    x = torch.randn(1, cfg.in_dim, 3, cfg.height, cfg.width)
    g(x, torch.zeros(1), cache=cache, kv_frames=3, kv_exact=True)      # lazily captured
    g.sealed = True                                                     # as after prewarm()
    with pytest.raises(BucketMissError, match="sealed"):
        g(x, torch.zeros(1), cache=cache, kv_frames=6, kv_exact=True)


@torch.no_grad()
def test_a_row_past_its_slab_never_writes_into_a_neighbour(cfg):
    model = CausalWan(cfg, attention="sdpa").eval()
    cache = _cache(model)
    a, b = cache.acquire(), cache.acquire()
    _prompt(model, cache, a, torch.randn(1, cfg.text_len, cfg.text_dim))
    cache.bind([a])
    cache.frames[a] = cfg.max_frames                                    # a is at the end of its slab
    before = [t.clone() for t in cache.slab_views(b)]
    model(torch.randn(1, cfg.in_dim, 3, cfg.height, cfg.width), torch.zeros(1), cache=cache)
    assert all(torch.equal(a, b) for a, b in zip(cache.slab_views(b), before))


def test_bucket_keys_keep_types_structure_and_positional_arguments():
    g = graphrt.compile(lambda x, scale: x * scale, progress=False)
    x = torch.arange(3)
    assert g(x, 2).dtype == torch.int64 and g(x, 2.0).dtype == torch.float32      # 2 and 2.0 differ
    assert torch.equal(g(torch.ones(1), -0.0), torch.ones(1) * -0.0)
    assert torch.equal(g(torch.ones(1), 0.0), torch.ones(1) * 0.0)
    assert g.stats.captures == 4

    h = graphrt.compile(lambda pair: pair[0] + (1.0 if isinstance(pair, list) else 2.0), progress=False)
    assert h([torch.zeros(1)]).item() == 1.0 and h((torch.zeros(1),)).item() == 2.0

    def f(a, *rest, **kw):
        return a + sum(rest) + sum(kw.values())

    k = graphrt.compile(f, progress=False)
    one = torch.ones(1)
    assert k(one, one, one, p=one, q=one).item() == 5.0
    k(one, one, one, q=one, p=one)                                     # keyword order is not a new bucket
    assert k.stats.captures == 1


def test_spec_and_backend_mistakes_fail_at_compile_time(cfg):
    model = CausalWan(cfg)
    with pytest.raises(graphrt.InputError, match=r"does not have: \['kv_frame'\]"):
        graphrt.compile(model, buckets=Buckets(static_args={"kv_frame": (3,)}))
    with pytest.raises(graphrt.BackendUnavailableError, match="unknown graph backend 'bogus'"):
        graphrt.compile(model, backend="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(graphrt.BackendUnavailableError, match="needs a CUDA device"):
            graphrt.compile(model, backend="cuda-graph")


def test_device_comes_from_the_runtime_state_when_no_tensor_is_passed():
    """A chunk function takes no tensors: the cache says where it runs (cuda-graph on a GPU)."""
    from graphrt.replay.buckets import bind

    class State:
        device = torch.device("cuda", 0)

        def snapshot(self, data=False):
            return {}

        def restore(self, snap):
            pass

        def reset(self):
            pass

    def chunk(*, batch):
        return batch

    g = graphrt.compile(chunk, states=[State()], progress=False)
    assert g._device(bind(g.signature, (), {"batch": 2})) == torch.device("cuda", 0)


@torch.no_grad()
def test_wrong_dtype_device_and_cache_errors_say_what(cfg, models):
    _, causal = models
    x = torch.randn(1, cfg.in_dim, 3, cfg.height, cfg.width)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim)
    with pytest.raises(graphrt.InputError, match="latents x has another dtype than the model") as e:
        causal(x.double(), torch.zeros(1), ctx)
    assert "torch.float32" in str(e.value) and "fix" in str(e.value)
    with pytest.raises(graphrt.InputError, match="context has another dtype"):
        causal(x, torch.zeros(1), ctx.half())
    with pytest.raises(graphrt.InputError, match="latents x must be a tensor"):
        causal([x], torch.zeros(1), ctx)
    other = StaticKVCache.for_model(CausalWan(cfg.replace(num_layers=3)))
    with pytest.raises(graphrt.InputError, match="the cache does not fit this model"):
        causal(x, torch.zeros(1), cache=other)


# -- the CPU emulation fails where a CUDA graph would -------------------------------------------------
class HostScaled(nn.Module):
    """``scale`` is a plain tensor attribute: ``model.cuda()`` leaves it on the host, so a CUDA
    graph passes its value as a kernel argument and keeps the value it had at capture."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))
        self.scale = torch.tensor(2.0)

    def forward(self, x):
        return x * self.weight * self.scale


@torch.no_grad()
def test_a_host_scalar_is_frozen_at_capture_as_on_cuda():
    model, x = HostScaled(), torch.ones(4)
    with pytest.raises(graphrt.HostReadError, match="host value") as e:
        graphrt.compile(model, progress=False)(x)                      # the checker names the line
    assert "return x * self.weight * self.scale" in str(e.value) and "bucket key" in str(e.value)
    g = graphrt.compile(model, check=False, backend="cpu-graph", progress=False)
    assert torch.equal(g(x), torch.full((4,), 2.0))
    model.scale.fill_(5.0)                                              # the scheduler moved on
    assert torch.equal(model(x), torch.full((4,), 5.0))
    assert torch.equal(g(x), torch.full((4,), 2.0))                     # the graph did not: as CUDA
    g = graphrt.compile(HostScaled(), check=False, backend="cpu-graph", verify=1, progress=False)
    g(x)
    g.fn.scale.fill_(5.0)
    with pytest.raises(ReplayMismatchError, match="frozen into the graph"):
        g(x)


class _Tables:
    """An owner of per-row tables that its method reads with device ops, as the Engine's seeds."""

    def __init__(self):
        self.table = torch.arange(1.0, 6.0)

    def step(self, x, rows):
        return x * self.table.index_select(0, rows)


def test_a_table_read_by_device_ops_is_read_live_at_every_replay():
    """A table the checker lets through is read by device ops: on CUDA it lives on the device
    and a replay reads its current values (the Engine writes a new session's seed there). The
    CPU emulation must not freeze it, or a second video would replay the first one's noise."""
    owner, x, rows = _Tables(), torch.ones(2), torch.tensor([1, 3])
    g = graphrt.compile(owner.step, backend="cpu-graph", progress=False)
    assert torch.equal(g(x, rows), torch.tensor([2.0, 4.0]))
    owner.table.mul_(10.0)                                              # a new session's values
    assert torch.equal(g(x, rows), torch.tensor([20.0, 40.0]))


def test_a_value_read_from_a_host_table_is_frozen_at_capture_as_on_cuda():
    """``sigmas[i]`` of a scheduler's host table runs on the host once, at capture, on CUDA: a
    table updated in place later does not reach the replays. The CPU emulation freezes it too."""
    sigmas = torch.linspace(1.0, 0.0, 5)

    def step(x):
        return x - sigmas[1] * x                        # 0.75 at capture

    g = graphrt.compile(step, check=False, backend="cpu-graph", progress=False)
    x = torch.ones(3)
    assert torch.equal(g(x), torch.full((3,), 0.25))
    sigmas.mul_(0.0)
    assert torch.equal(step(x), torch.ones(3))
    assert torch.equal(g(x), torch.full((3,), 0.25))    # the capture's value, as CUDA
    with pytest.raises(graphrt.HostReadError):
        graphrt.compile(step, progress=False)(x)        # and the checker names the read


@torch.no_grad()
def test_outputs_live_until_the_next_replay_of_any_bucket():
    """One output arena for every bucket, as the CUDA pool: replaying bucket B spoils A's
    outputs; verification returns the same static outputs (it does not clone)."""
    g = graphrt.compile(lambda x, k: x + k, verify=2, progress=False)
    x = torch.zeros(4)
    a = g(x, 1)                                   # bucket k=1 (captured)
    b = g(x, 2)                                   # bucket k=2
    assert torch.equal(b, torch.full((4,), 2.0))
    assert torch.equal(a, b) and a.data_ptr() == b.data_ptr()      # a was overwritten
    again = [g(x, 1) for _ in range(3)]           # two verified replays, then a plain one
    assert len({t.data_ptr() for t in again + [a]}) == 1
    kept = graphrt.compile(lambda x, k: x + k, clone_outputs=True, progress=False)
    a = kept(x, 1)
    kept(x, 2)
    assert torch.equal(a, torch.ones(4))


def test_capture_leaves_the_random_stream_as_it_was():
    """Check, trace and first run draw random numbers; a seeded stream after prewarm() is the
    stream without it. Replays draw fresh numbers and the capture says so."""
    def noisy(x):
        return x + torch.randn(x.shape, device=x.device)

    x = torch.zeros(3)
    torch.manual_seed(0)
    want = torch.rand(5)
    torch.manual_seed(0)
    g = graphrt.compile(noisy, progress=False)
    with pytest.warns(graphrt.GraphrtWarning, match="draws random numbers at .*test_compile.py"):
        g.prewarm(x)
    assert torch.equal(torch.rand(5), want)
    assert not torch.equal(g(x).clone(), g(x))


def test_a_factory_without_device_is_refused_with_its_line():
    def positions(x):
        return x + torch.arange(x.shape[0])

    with pytest.raises(graphrt.HostReadError, match="host tensor") as e:
        graphrt.compile(positions, progress=False)(torch.zeros(3))
    assert "torch.arange" in str(e.value) and "device=" in str(e.value)


def test_capture_order_is_largest_first(cfg):
    """Largest KV first, whatever the flags: masked and exact buckets interleave per length."""
    spec = wan_buckets(cfg, batch_sizes=(1, 2))
    model = CausalWan(cfg, attention="sdpa").eval()
    g = graphrt.compile(model, buckets=spec, progress=False)
    from graphrt.replay.buckets import bind

    x = torch.zeros(1, cfg.in_dim, 3, cfg.height, cfg.width)
    key = spec.key(bind(g.signature, (x, torch.zeros(1)), {"kv_frames": 3, "kv_exact": True}))
    order = [(k.batch, dict(k.statics)["kv_frames"].value) for k in spec.expand(key)]
    assert order == sorted(order, reverse=True) and order[0] == (2, cfg.max_frames)


class LeakyWriter(nn.Module):
    """Returns the right value but writes its state at a Python-int position: only the state shows it."""

    def __init__(self, width: int = 3, device=None):
        super().__init__()
        self.register_buffer("log", torch.zeros(4, width, device=device))
        self.pos = 0

    def forward(self, x):
        self.log[self.pos] = x                        # a Python-int row: frozen into the graph
        return x * 2

    def snapshot(self, data=False):
        return {"pos": self.pos}

    def restore(self, snap):
        self.pos = snap["pos"]

    def reset(self):
        self.pos = 0


@torch.no_grad()
def test_verify_compares_what_the_replay_wrote():
    m = LeakyWriter()
    g = graphrt.compile(m, backend="cpu-graph", verify=1, progress=False)
    g(torch.ones(3))
    m.pos = 1
    with pytest.raises(ReplayMismatchError, match=r"LeakyWriter\.log \(aten\.copy_"):
        g(torch.ones(3))


@torch.no_grad()
def test_write_log_costs_what_one_forward_writes_and_undoes_it(cfg):
    """Verification records the rows a forward writes, not the KV pool: a small fraction of it,
    and undoing leaves every tensor as it was."""
    from graphrt.capture.undo import WriteLog

    cfg = cfg.replace(max_frames=21)
    model = CausalWan(cfg, attention="sdpa").eval()
    (cache,) = _twin_caches(model, cfg, 2, copies=1)
    cache.bind([0, 1])
    before = cache.snapshot(data=True)
    with WriteLog() as log:
        model(torch.randn(2, cfg.in_dim, 3, cfg.height, cfg.width), torch.zeros(2), cache=cache, kv_frames=3,
              kv_exact=True)
    pool = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    rows = 2 * 3 * cfg.frame_tokens * cfg.dim * 4 * 2 * cfg.num_layers    # 2 rows x 1 chunk, K and V, fp32
    assert rows <= log.nbytes < 1.1 * rows and log.nbytes < pool / 7       # the chunk's rows, not the pool
    assert not all(torch.equal(t, before[n]) for n, t in cache.snapshot(data=True).items())
    log.rollback()
    assert all(torch.equal(t, before[n]) for n, t in cache.snapshot(data=True).items())


class _FakeCuda:
    """Just enough of torch.cuda for CudaGraph's capture path, so its failure handling runs on
    the CPU: streams are tokens, and a sync inside the capture fails the way CUDA fails it."""

    class Stream:
        def __init__(self, name="side"):
            self.name = name

        def wait_stream(self, other):
            pass

    class Graph:
        def __init__(self, cuda):
            self.cuda = cuda

        def capture_begin(self, pool=None, capture_error_mode="global"):
            self.cuda.capturing = True
            self.cuda.error_modes.append(capture_error_mode)

        def capture_end(self):
            self.cuda.capturing = False
            if self.cuda.invalidated:
                self.cuda.invalidated = False          # the stream is out of capture mode, the generator is not
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
            self.cuda.ended_ok += 1

        def replay(self):
            pass

    def __init__(self, monkeypatch):
        self.default = self.Stream("default")
        self.current, self.capturing, self.invalidated, self.pool_ended = self.default, False, False, []
        self.ended_ok, self.error_modes = 0, []
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(cuda, "set_stream", lambda s: setattr(self, "current", s))
        monkeypatch.setattr(cuda, "stream", self._stream_ctx)
        monkeypatch.setattr(cuda, "device", lambda d: contextlib.nullcontext())
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(cuda, "CUDAGraph", lambda: self.Graph(self))
        monkeypatch.setattr(cuda, "Stream", lambda device=None: self.Stream())
        monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", lambda i, p: self.pool_ended.append(p),
                            raising=False)

    @contextlib.contextmanager
    def _stream_ctx(self, s):
        prev, self.current = self.current, s
        try:
            yield
        finally:
            self.current = prev

    def sync(self):
        """What .item() does inside a capture."""
        if self.capturing:
            self.invalidated = True
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


def test_a_failed_cuda_capture_restores_the_stream_and_names_the_first_error(monkeypatch):
    """torch.cuda.graph leaves the side stream current when capture_end raises, and capture_end's
    error ("previous error during capture") hides the cause. CudaGraph does neither (on a fake
    torch.cuda here; tests/test_cuda.py runs the real one)."""
    from types import SimpleNamespace

    from graphrt.capture.backends import CudaGraph
    from graphrt.capture.capture import Runtime

    fake = _FakeCuda(monkeypatch)
    side = _FakeCuda.Stream()
    runtime = SimpleNamespace(device=torch.device("cpu", 0), inductor=False, opaque=False, warmup=1,
                              side_stream=lambda: side, memory_pool=lambda: (0, 7),
                              output_slots=Runtime("cpu-graph").output_slots)

    def syncs(x):
        fake.sync()
        return [x * 2]

    with pytest.raises(graphrt.CaptureError) as e:
        CudaGraph(syncs, [torch.ones(3)], runtime)
    first = str(e.value).splitlines()[0]
    assert "operation not permitted when stream is capturing" in first and "previous error" not in first
    assert "graphrt.check" in str(e.value)
    assert fake.current is fake.default                     # the caller's stream is current again
    assert fake.pool_ended == [(0, 7)] and not fake.capturing  # the allocator stops routing to the pool
    assert fake.ended_ok == 1              # a tiny capture took the random generator out of capture mode

    graph = CudaGraph(lambda x: [x * 2], [torch.ones(3)], runtime)   # and the next capture works
    assert fake.current is fake.default and torch.equal(graph.replay()[0], torch.full((3,), 2.0))
    # every capture in the thread-local error mode: another thread's CUDA work does not fail it
    assert fake.error_modes and set(fake.error_modes) == {"thread_local"}


@pytest.mark.parametrize("args, kw, why", [
    (((0, -1, 4),), {"batch_args": ("x",)}, r"batch sizes must be ints >= 1; got \[0, -1\]"),
    (("124",), {"batch_args": ("x",)}, "batch_sizes must be a sequence of ints"),
    (((1, 2.0),), {"batch_args": ("x",)}, r"got \[2.0\]"),
    (((True, 2),), {"batch_args": ("x",)}, r"got \[True\]"),
    (((1, 2),), {"batch_args": "xs"}, "batch_args must be a sequence of argument names"),
    ((), {"static_args": {"kv_frames": 3}}, r"static_args\['kv_frames'\] must be a non-empty sequence"),
    ((), {"static_args": {"kv_frames": ()}}, r"static_args\['kv_frames'\] must be a non-empty sequence"),
    ((), {"static_args": [("kv_frames", (3,))]}, "static_args must map an argument name"),
], ids=["zero-negative", "str", "float", "bool", "batch-args-str", "static-scalar", "static-empty", "static-list"])
def test_a_bad_bucket_spec_is_refused_at_construction(args, kw, why):
    with pytest.raises(graphrt.InputError, match=why):
        Buckets(*args, **kw)


def test_bucket_sizes_are_sorted_and_distinct():
    assert Buckets((4, 1, 2, 2), batch_args=("x",)).batch_sizes == (1, 2, 4)


@pytest.mark.parametrize("fn, buckets, why", [
    (42, None, "graphrt.compile takes a function or an nn.Module"),
    ("model", None, "graphrt.compile takes a function or an nn.Module"),
    (torch.nn.Linear(2, 2), (1, 2), "buckets must be a graphrt.Buckets spec"),
], ids=["int", "str", "tuple-buckets"])
def test_compile_refuses_what_it_cannot_call_at_once(fn, buckets, why):
    with pytest.raises(graphrt.InputError, match=why):
        graphrt.compile(fn, buckets=buckets)


@pytest.mark.parametrize("move", [
    lambda m: m.to(torch.float64),
    lambda m: setattr(m.weight, "data", m.weight.data.clone()),
    lambda m: m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True),
], ids=["to-float64", "data-replaced", "assigned-state-dict"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_replay_after_the_weights_moved_is_refused(move, dtype):
    lin = nn.Linear(4, 4).to(dtype)
    g = graphrt.compile(lin, progress=False)
    x = torch.randn(2, 4, dtype=dtype)
    assert torch.equal(g(x), lin(x))
    move(lin)
    with pytest.raises(graphrt.WeightsMovedError, match=r"weights moved(.|\n)*where: +weight"):
        g(x)


def test_weights_updated_in_place_are_read_by_the_graphs():
    lin = nn.Linear(4, 4)
    g = graphrt.compile(lin, progress=False)
    x = torch.randn(2, 4)
    g(x)
    lin.load_state_dict({k: v + 1 for k, v in lin.state_dict().items()})   # copied in place: same memory
    assert torch.equal(g(x), lin(x))


def test_an_engine_graph_refuses_a_model_moved_after_capture(cfg):
    from graphrt.pipeline import Engine
    model = CausalWan(cfg, attention="sdpa").eval()
    engine = Engine(model, mode="chunk", batch_sizes=(1,), progress=False)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim)
    engine.generate(ctx, 1)
    model.blocks[0].ffn[0].weight.data = model.blocks[0].ffn[0].weight.data.clone()
    with pytest.raises(graphrt.WeightsMovedError, match=r"blocks\.0\.ffn\.0\.weight"):
        engine.generate(ctx, 1)


def test_inductor_max_autotune_options_reach_inductor(monkeypatch):
    """``inductor="max-autotune"``: torch.compile refuses ``mode`` with ``options``, so graphrt passes
    what the mode stands for (torch._inductor.list_mode_options) as options, with inductor's own CUDA
    graphs and freezing off; they reach AOTInductor (the CPU's wrapper), torch.compile (the Python
    and C++ wrappers, and the CUDA path's trace) and the disk-cache key. No real compile runs."""
    from torch._inductor import list_mode_options
    from torch.fx.experimental.proxy_tensor import make_fx

    from graphrt.capture import aot, backends
    from graphrt.errors import CaptureError

    opts = aot.inductor_options("max-autotune")
    mode = list_mode_options("max-autotune")
    assert opts["max_autotune"] is True and opts["coordinate_descent_tuning"] is True
    assert opts["triton.cudagraphs"] is False and opts["freezing"] is False
    assert {k: v for k, v in mode.items() if k != "triton.cudagraphs"}.items() <= opts.items()
    assert aot.inductor_options(True) == {"freezing": False, "triton.cudagraphs": False}
    assert aot.resolve_wrapper("max-autotune", torch.device("cpu")) == "aoti"
    assert aot.resolve_wrapper("max-autotune", torch.device("cuda")) == "python"

    seen = {}

    def package(program, package_path=None, inductor_configs=None):
        seen["aoti"] = inductor_configs
        raise RuntimeError("no compile in this test")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", package)
    g = graphrt.compile(nn.Linear(4, 4), inductor="max-autotune", cache_dir=False, progress=False)
    with pytest.raises(CaptureError, match="AOTInductor could not compile"):
        g(torch.randn(2, 4))
    assert seen["aoti"] == opts

    def fake_compile(fn, **kw):
        seen.setdefault("compile", []).append(kw["options"])
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    x = torch.randn(2, 4)
    gm = make_fx(lambda a: [a * 2])(x)
    aot.CompiledTrace(gm, [x], "python", None, options=opts)
    backends.trace(lambda a: [a * 2], [x], True, options=opts)
    backends.trace(lambda a: [a * 2], [x], True)
    assert seen["compile"][0] == dict(opts, cpp_wrapper=False) and seen["compile"][1] == opts
    assert seen["compile"][2] == {"triton.cudagraphs": False, "freezing": False}
    key, parts = aot.artifact_key(gm, [x], "aoti", opts)
    assert parts["options"] == opts and key != aot.artifact_key(gm, [x], "aoti")[0]
