"""Quantized K/V (int8, float8_e4m3fn): bytes, error, graph safety, sharded heads, CUDA."""
import pytest
import torch

import graphrt
from graphrt.errors import CacheError, ConfigError, InputError
from graphrt.kv import RollingKVCache, StaticKVCache, _raw, _round_scale, dequantize, quantize
from graphrt.models.wan import CausalWan, WanConfig
from graphrt.pipeline import Engine
from graphrt.tolerance import max_rel_err, rms_rel_err, tolerance

KV = ("int8", "float8_e4m3fn")
DTYPES = (torch.float32, torch.bfloat16)
# error of a video against the unquantized cache (tiny preset, random weights), measured over 4 model
# seeds, a static cache (7 chunks) and a rolling one (window=(9, 3), 10 chunks: its ring wraps 3 times):
# max rel err at most 9.6e-5 (int8) and 5.6e-4 (fp8) in fp32, 5.4e-3 for both in bf16 (one bf16 step of
# the largest value); rms rel err at most 7.1e-5 (int8) and 3.8e-4 (fp8) in fp32, 2.9e-3 and 3.1e-3 in
# bf16 (the bf16 model's own rms error vs fp32 is 3.3e-3)
VIDEO_BOUND = {(torch.float32, "int8"): 3e-4, (torch.float32, "float8_e4m3fn"): 1.5e-3,
               (torch.bfloat16, "int8"): 1.5e-2, (torch.bfloat16, "float8_e4m3fn"): 1.5e-2}
RMS_BOUND = {(torch.float32, "int8"): 2e-4, (torch.float32, "float8_e4m3fn"): 1e-3,
             (torch.bfloat16, "int8"): 8e-3, (torch.bfloat16, "float8_e4m3fn"): 8e-3}


def _model(cfg, dtype):
    return CausalWan(cfg, attention="sdpa").to(dtype=dtype).eval()


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float16))
@pytest.mark.parametrize("kv_dtype", KV)
def test_quantize_error_is_bounded_per_element(dtype, kv_dtype):
    """Per element, and per token against its max |x| down to 1e-5 (fp16 scales are subnormal
    below max |x| = 127 * 6.1e-5: they must still fit the token, neither clipping nor coarse)."""
    x = (torch.randn(64, 4, 16) * torch.logspace(-5, 2, 64)[:, None, None]).to(dtype)
    x[0] = 0                                            # an all-zero token must stay zero (no 0/0)
    codes, scale = quantize(x, getattr(torch, kv_dtype), dtype)
    assert codes.dtype == getattr(torch, kv_dtype) and scale.shape == (64, 4) and scale.dtype == dtype
    y = dequantize(codes, scale, dtype)
    assert y.dtype == dtype and torch.equal(y[0], torch.zeros_like(y[0])) and torch.isfinite(y).all()
    err = (y.double() - x.double()).abs()
    s = scale.double()[..., None]
    fi = torch.finfo(dtype)
    ulp = fi.eps * x.double().abs()                     # the final rounding to the model dtype
    if kv_dtype == "int8":                              # half a step, plus a rounded scale's share
        assert (err <= 0.5 * s + ulp + 127 * s * fi.eps).all()
    else:                                               # 3 mantissa bits: 2^-4 relative (subnormals: absolute)
        assert (err <= 2 ** -4 * x.double().abs() + 2 ** -9 * s + ulp).all()
    assert (err > 0).any()
    # the scale fits each token: max |x| / qmax, up to one rounding (relative, or one subnormal step)
    qmax = 127 if kv_dtype == "int8" else 448
    want = x.double().abs().amax(-1)[1:] / qmax
    got = scale.double()[1:]
    assert (got <= want * (1 + fi.eps) + fi.smallest_normal * fi.eps).all()
    assert (got >= want * (1 - fi.eps / 2)).all()       # smaller only by a normal rounding: codes do not clip


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float16))
@pytest.mark.parametrize("kv_dtype", KV)
def test_quantize_error_does_not_grow_for_small_values(dtype, kv_dtype):
    """Relative rms error at max |x| ~ 1e-4 (K/V of a quiet token) is that at 1, in every dtype."""
    x = torch.randn(128, 4, 64)
    errs = []
    for mag in (1.0, 1e-2, 1e-3, 1e-4):
        xm = (x * mag).to(dtype)
        errs.append(rms_rel_err(dequantize(*quantize(xm, getattr(torch, kv_dtype), dtype), dtype), xm))
    assert max(errs) <= 1.2 * errs[0], errs


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float16))
def test_scales_are_exact_in_the_model_dtype_before_the_cast(dtype):
    """The float32 scale codes are divided by is already a model-dtype value, rounded as the cast
    rounds: a compiled kernel that fuses away the cast (inductor keeps float32 in registers)
    quantizes with the scale that is stored, as eager does."""
    s = torch.rand(50_000) * 10 ** torch.empty(50_000).uniform_(-12, 3)
    ties = s.to(dtype).float()
    s = torch.cat([s, ties, (ties + ties.nextafter(torch.tensor(float("inf")))) / 2, torch.zeros(1)])
    got = _round_scale(s, dtype)
    assert torch.equal(got.to(dtype).float(), got) and (got > 0).all()
    normal = s >= torch.finfo(dtype).smallest_normal
    assert torch.equal(got[normal].to(dtype), s[normal].to(dtype))   # round to nearest even, as the cast
    assert (got[~normal] >= s[~normal]).all()           # below: rounded up (codes never clip)


def _closed_form(cfg, dtype, kv_dtype, window=None, heads=None):
    """Bytes of one session, written out: K and V codes (+ scales) per token, head and layer for
    the ``heads`` this cache keeps (all, or a rank's shard), cross-attention K/V of every head in
    the model dtype, one int32 position and one int32 ring offset."""
    tokens = (window or cfg.max_frames) * cfg.frame_tokens
    item = torch.empty(0, dtype=dtype).element_size()
    code = item if kv_dtype is None else 1
    scale = 0 if kv_dtype is None else item
    self_kv = cfg.num_layers * 2 * tokens * (heads or cfg.num_heads) * (cfg.head_dim * code + scale)
    return self_kv + cfg.num_layers * 2 * cfg.text_len * cfg.num_heads * cfg.head_dim * item + 8


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("kv_dtype", (None, *KV))
@pytest.mark.parametrize("cls", ["static", "rolling"])
def test_bytes_from_config_match_real_allocations(cfg, kv_dtype, cls, ranks):
    """Sizing on the meta device equals what a real cache allocates, also for a rank-local cache
    (H/2 self-attention heads and scales, all H cross-attention heads)."""
    heads = cfg.num_heads // ranks
    kw = dict(dtype=torch.bfloat16, kv_dtype=kv_dtype, num_slabs=3, max_batch=2, num_heads=heads)
    if cls == "rolling":
        kw.update(window_frames=9, sink_frames=3)
    Cache = StaticKVCache if cls == "static" else RollingKVCache
    meta = Cache.for_config(cfg, device="meta", **kw).memory()
    real = Cache.for_config(cfg, **kw)
    assert (real.num_heads, real.cross_heads) == (heads, cfg.num_heads)
    assert all(t.shape[1] == heads for t in real.k + real.v + real.k_scale + real.v_scale)
    assert real.cross_k.shape[3] == real.cross_v.shape[3] == cfg.num_heads
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in real.tensors().values()}
    assert real.memory() == meta
    assert meta.total == sum(storages.values())         # every byte the cache allocated, none counted twice
    assert meta.per_session == _closed_form(cfg, torch.bfloat16, kv_dtype, 9 if cls == "rolling" else None, heads)


@pytest.mark.parametrize("preset,heads", [("wan-1.3b", 12), ("wan-14b", 40)])
def test_full_size_sessions_take_about_half_the_bf16_bytes(preset, heads):
    """480p, 21 frames, bf16 model: int8 and fp8 sessions (scales and cross K/V included) <= 0.52x."""
    cfg = WanConfig.preset(preset)
    plain = StaticKVCache.for_config(cfg, dtype=torch.bfloat16, device="meta").memory().per_session
    assert plain == _closed_form(cfg, torch.bfloat16, None)
    for kv in KV:
        m = StaticKVCache.for_config(cfg, dtype=torch.bfloat16, kv_dtype=kv, device="meta").memory()
        assert m.per_session == _closed_form(cfg, torch.bfloat16, kv)
        assert m.per_session / plain <= 0.52, (kv, m.per_session / plain)
    # a rank-local cache holding a shard of the heads holds that share of the self-attention bytes;
    # the cross-attention K/V (every head) and the position and ring offset (4 bytes each) are per slab, not per head
    shard = StaticKVCache.for_config(cfg, dtype=torch.bfloat16, kv_dtype="int8", device="meta",
                                     num_heads=heads // 4).memory()
    assert shard.per_session == _closed_form(cfg, torch.bfloat16, "int8", heads=heads // 4)
    per_slab = 2 * cfg.num_layers * cfg.text_len * heads * cfg.head_dim * 2 + 8
    assert (shard.per_session - per_slab) * 4 == m.per_session - per_slab


# a static cache's whole timeline, or a rolling window whose ring (6 frames) wraps 3 times
VIDEOS = pytest.mark.parametrize("window,chunks", [(None, 7), ((9, 3), 10)], ids=["static-7", "rolling-10"])


@VIDEOS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", KV)
@torch.no_grad()
def test_video_error_vs_unquantized(cfg, dtype, kv_dtype, window, chunks):
    model = _model(cfg, dtype)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim)
    plain = Engine(model, mode="eager", window=window, progress=False).generate(ctx, chunks, seed=1)
    quant = Engine(model, mode="eager", window=window, kv_dtype=kv_dtype, progress=False).generate(ctx, chunks, seed=1)
    err, rms = max_rel_err(quant, plain), rms_rel_err(quant, plain)
    assert 0 < err <= VIDEO_BOUND[(dtype, kv_dtype)], err
    assert 0 < rms <= RMS_BOUND[(dtype, kv_dtype)], rms


def _twin_caches(model, cfg, kv_dtype, dtype):
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, dtype=dtype)
    k, v = model.encode_prompt(ctx)
    caches = []
    for _ in range(2):
        cache = StaticKVCache.for_model(model, kv_dtype=kv_dtype)
        cache.bind([cache.acquire()])
        cache.set_cross(0, k[:, 0], v[:, 0])
        caches.append(cache)
    return caches


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", KV)
@torch.no_grad()
def test_graph_replay_equals_eager_with_a_quantized_cache(cfg, dtype, kv_dtype):
    """cpu-graph replays == the eager forward bit for bit: outputs, codes and scales, chunk after chunk."""
    model = _model(cfg, dtype)
    gcache, ecache = _twin_caches(model, cfg, kv_dtype, dtype)
    g = graphrt.compile(model, buckets=graphrt.Buckets((1,), batch_args=("x", "t"),
                                                       static_args={"kv_frames": (3, 6), "kv_exact": (True,)}),
                        backend="cpu-graph", progress=False)
    for c in range(2):
        for t in (1000.0, 500.0, 0.0):
            x = torch.randn(1, cfg.in_dim, 3, cfg.height, cfg.width, dtype=dtype)
            tt = torch.full((1,), t)
            got = g(x, tt, cache=gcache, kv_frames=3 * (c + 1), kv_exact=True)
            assert torch.equal(got, model(x, tt, cache=ecache, kv_frames=3 * (c + 1), kv_exact=True)), (c, t)
        gcache.commit(1, 3)
        ecache.commit(1, 3)
    gs, es = gcache.slab_tensors(0) | gcache.state(), ecache.slab_tensors(0) | ecache.state()
    assert "k_scale.1" in gs and gcache.k[0].dtype == getattr(torch, kv_dtype)   # (scratch is the graphs' own)
    assert [k for k in gs if not torch.equal(gs[k], es[k])] == []
    assert g.stats.captures == 2


@torch.no_grad()
def test_whole_chunk_graph_with_a_quantized_cache(cfg):
    """The Engine's whole-chunk graph on an fp8 cache (bf16 model) equals its eager chunk, for a
    padded batch: the padding row's quantized writes go to scratch, the idle session's slab stays."""
    model = _model(cfg, torch.bfloat16)
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim)
    runs = {}
    for mode in ("eager", "chunk"):
        engine = Engine(model, mode=mode, max_sessions=2, batch_sizes=(2,), kv_dtype="float8_e4m3fn", progress=False)
        a, b = engine.open(ctx[:1], seed=1), engine.open(ctx[1:], seed=2)
        idle = {k: t.clone() for k, t in engine.cache.slab_tensors(b.slab).items()}
        out = engine.step([a])[a]
        assert all(torch.equal(t, idle[k]) for k, t in engine.cache.slab_tensors(b.slab).items())
        runs[mode] = (out, engine.cache.slab_tensors(a.slab), engine)
    (eager, ecache, _), (graphed, gcache, engine) = runs["eager"], runs["chunk"]
    assert torch.equal(graphed, eager)
    assert "k_scale.0" in gcache and all(torch.equal(gcache[k], ecache[k]) for k in ecache)
    assert [str(k) for k in engine.graphs.keys] == ["batch=2 kv_exact=True kv_frames=3"]   # as unquantized


@pytest.mark.slow
@torch.no_grad()
def test_inductor_writes_and_reads_the_codes_eager_does(cfg):
    """A cache write + read compiled by inductor (one kernel set for an int8 and an fp8 cache of
    a bf16 model, over 6 decades of magnitudes) stores the codes and scales the eager write does
    and reads the same K/V, bit for bit: inductor fuses the scale's cast to bf16 away, so the
    scale must be a bf16 value before it."""
    kw = dict(dtype=torch.bfloat16, num_slabs=1)
    caches = [[StaticKVCache.for_config(cfg, kv_dtype=kv, **kw) for kv in KV] for _ in range(2)]
    for cache in sum(caches, []):
        cache.bind([cache.acquire()])

    def write_read(pair, k, v):
        out = []
        for cache in pair:
            step = cache.step(1, 3, cfg.frame_tokens, kv_frames=3, kv_exact=True)
            cache.write(0, step, k, v)
            out += cache.read(0, step)
        return out

    n = 3 * cfg.frame_tokens
    k, v = ((torch.randn(1, n, cfg.num_heads, cfg.head_dim) * torch.logspace(-5, 1, n)[:, None, None])
            .to(torch.bfloat16) for _ in "kv")
    got = torch.compile(write_read, fullgraph=True)(caches[0], k, v)
    want = write_read(caches[1], k, v)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    for g, w in zip(*caches):
        gs, ws = g.slab_tensors(0), w.slab_tensors(0)
        assert [name for name in gs if not torch.equal(_raw(gs[name]), _raw(ws[name]))] == []
    assert max_rel_err(got[0], k[0]) <= 0.01                 # and they are close to K (int8)


@torch.no_grad()
def test_quantized_forward_reads_nothing_on_the_host(cfg):
    model = _model(cfg, torch.bfloat16)
    cache = StaticKVCache.for_model(model, kv_dtype="float8_e4m3fn")
    cache.bind([cache.acquire()])
    k, v = model.encode_prompt(torch.randn(1, cfg.text_len, cfg.text_dim, dtype=torch.bfloat16))
    cache.set_cross(0, k[:, 0], v[:, 0])
    x = torch.randn(1, cfg.in_dim, cfg.chunk_frames, cfg.height, cfg.width, dtype=torch.bfloat16)
    report = graphrt.check(model, x, torch.full((1,), 500.0), cache=cache, kv_frames=3, kv_exact=True)
    assert report.ok and report.count == 0, str(report)


@pytest.mark.parametrize("kv_dtype", KV)
@torch.no_grad()
def test_a_head_shard_quantizes_like_its_heads_in_the_full_cache(cfg, kv_dtype):
    """Scales are per token and head, so a rank-local cache of H/2 heads stores and returns exactly
    what the full cache does for those heads."""
    kw = dict(dtype=torch.bfloat16, kv_dtype=kv_dtype)
    full = StaticKVCache.for_config(cfg, **kw)
    halves = [StaticKVCache.for_config(cfg, num_heads=cfg.num_heads // 2, **kw) for _ in range(2)]
    h = cfg.num_heads // 2
    k, v = (torch.randn(1, 3 * cfg.frame_tokens, cfg.num_heads, cfg.head_dim, dtype=torch.bfloat16) for _ in "kv")
    got = []
    for cache, sl in ((full, slice(None)), (halves[0], slice(0, h)), (halves[1], slice(h, None))):
        cache.bind([cache.acquire()])
        step = cache.step(1, 3, cfg.frame_tokens, kv_frames=3, kv_exact=True)
        cache.write(1, step, k[:, :, sl], v[:, :, sl])
        got.append(cache.read(1, step))
    for i in range(2):
        assert torch.equal(torch.cat([got[1][i], got[2][i]], dim=2), got[0][i])
        assert not torch.equal(got[0][i], (k, v)[i])        # quantized: close, not equal
        assert max_rel_err(got[0][i], (k, v)[i]) <= (0.01 if kv_dtype == "int8" else 0.07)


def test_kv_dtype_misuse(cfg):
    model = _model(cfg, torch.float32)
    with pytest.raises(InputError, match="unsupported kv_dtype"):
        StaticKVCache.for_model(model, kv_dtype="int4")
    with pytest.raises(InputError, match="unsupported kv_dtype"):
        Engine(model, kv_dtype=torch.float16, progress=False)
    assert StaticKVCache.for_model(model, kv_dtype="float32").quantized is False   # the model dtype: plain
    with pytest.raises(CacheError, match="holds codes and scales"):
        StaticKVCache.for_model(model, kv_dtype="int8").paged(0)
    with pytest.raises(ConfigError, match="num_heads=3 is not a shard of the config's 4 heads"):
        StaticKVCache.for_config(cfg, dtype=torch.float32, kv_dtype="int8", num_heads=3)


# -- CUDA --------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,inductor", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16", "bf16-inductor"])
@pytest.mark.parametrize("kv_dtype", KV)
@torch.no_grad()
def test_cuda_graphs_with_a_quantized_cache(cfg, dtype, kv_dtype, inductor):
    """CUDA graphs == eager bit for bit with int8/fp8 K/V; error vs unquantized within the CPU bound;
    a cache's bytes match what the CUDA allocator handed out. With inductor's kernels (quantize and
    dequantize fused into the chunk, one graph for every KV length) within the dtype's tolerance
    of eager, and a second video replays to the same bits."""
    model = CausalWan(cfg).to("cuda", dtype).eval()
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device="cuda", dtype=dtype)
    buckets = "max" if inductor else "auto"             # inductor: one compile, not one per KV length
    graphed = Engine(model, mode="chunk", kv_dtype=kv_dtype, inductor=inductor, kv_buckets=buckets, progress=False)
    eager = Engine(model, mode="eager", kv_dtype=kv_dtype, kv_buckets=buckets, progress=False)
    plain = Engine(model, mode="eager", progress=False)
    got = graphed.generate(ctx, 7, seed=1)
    assert graphed.graphs.runtime.backend == "cuda-graph"
    want, bound = eager.generate(ctx, 7, seed=1), VIDEO_BOUND[(dtype, kv_dtype)]
    if inductor:
        assert graphed.graphs.runtime.inductor == "python" and graphed.graphs.stats.captures == 1
        assert max_rel_err(got, want) <= tolerance(dtype)
        assert torch.equal(graphed.generate(ctx, 7, seed=1), got)
        bound += tolerance(dtype)
    else:
        assert torch.equal(got, want)
    assert 0 < max_rel_err(got, plain.generate(ctx, 7, seed=1)) <= bound
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    cache = StaticKVCache.for_model(model, kv_dtype=kv_dtype, num_slabs=3)
    used = torch.cuda.memory_allocated() - before
    n = len(cache.tensors())
    assert cache.memory().total <= used <= cache.memory().total + 512 * n   # the allocator's 512-byte blocks


@pytest.mark.cuda
def test_cuda_dequantization_cost_at_480p():
    """One layer's write and read at 1.3B 480p, plain bf16 vs int8/fp8 (printed; -s shows it)."""
    from graphrt.bench.attention import kv_cache_costs
    from graphrt.bench.presets import PRESETS

    cfg = PRESETS["wan-1.3b-480p"].config()
    for kv in KV:
        c = kv_cache_costs(cfg, torch.device("cuda"), torch.bfloat16, kv, iters=10)
        print(f"{kv}: read ms {c[kv]['read_ms']} vs bf16 {c['bfloat16']['read_ms']}; write ms {c[kv]['write_ms']} "
              f"vs {c['bfloat16']['write_ms']}; +{c['extra_ms_per_chunk']:.3f} ms per chunk")
        assert all(ms > 0 for ms in c[kv]["read_ms"] + c[kv]["write_ms"])


def test_bench_reports_bytes_error_and_cost_of_a_quantized_cache(capsys):
    from graphrt.bench import BenchConfig, run
    from graphrt.bench.__main__ import markdown

    summary = run(BenchConfig(preset="tiny", chunks=2, repeats=0, modes=("eager",), kv_dtype="int8", progress=False))
    kv, eager = summary["kv"], summary["modes"]["eager"]
    plain = StaticKVCache.for_config(WanConfig.preset("tiny", max_frames=6), dtype=torch.float32, device="meta")
    assert kv["bytes_per_session_plain"] == plain.memory().per_session and summary["config"]["kv_dtype"] == "int8"
    assert kv["ratio"] == kv["bytes_per_session"] / kv["bytes_per_session_plain"] < 0.4   # fp32 -> int8 + scales
    assert len(kv["costs"]["int8"]["read_ms"]) == 2 and kv["costs"]["float32"]["write_ms"][0] > 0
    assert 0 < eager["max_err_vs_unquantized"] <= VIDEO_BOUND[(torch.float32, "int8")]
    assert 0 < eager["rms_err_vs_unquantized"] <= eager["max_err_vs_unquantized"]
    assert "K/V int8:" in markdown(summary)
    assert "max_err_vs_unquantized" not in run(BenchConfig(preset="tiny", chunks=1, repeats=0, modes=("eager",),
                                                            progress=False))["modes"]["eager"]


def test_sessions_per_gpu_cli(capsys):
    from graphrt.bench.memory import main

    assert main(["--presets", "wan-1.3b-480p", "--working-set-gib", "0.5", "--gpu-gib", "80"]) == 0
    out = capsys.readouterr().out
    rows = {r["kv_dtype"]: r for r in __import__("json").loads(out.strip().splitlines()[-1])["rows"]}
    assert rows["int8"]["per_session"] == _closed_form(WanConfig.preset("wan-1.3b"), torch.bfloat16, "int8")
    assert rows["int8"]["sessions"] >= 2 * rows["bfloat16"]["sessions"] - 1 > 0
    assert main(["--presets", "nope"]) == 2
    assert main(["--presets", "wan-1.3b-480p", "--working-set-gib", "1", "--working-set-gib", "2"]) == 2
