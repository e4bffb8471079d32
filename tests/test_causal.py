"""The graph-safe CausalWan: no host reads, equal to ReferenceWan, heterogeneous batches, slabs, backends."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import rel_err
from graphrt import attention
from graphrt.errors import BackendUnavailableError, CacheError, InputError
from graphrt.kv import RollingKVCache, StaticKVCache
from graphrt.models.wan import CausalWan, ReferenceWan
from graphrt.tolerance import tolerance

STEPS = (1000.0, 750.0, 500.0, 250.0, 0.0)  # four denoising forwards, then the clean cache pass


class FailOnHostRead(TorchDispatchMode):
    """Raises on any op that needs a device value on the host (the invariant CUDA graphs need)."""

    BANNED = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
              torch.ops.aten.is_nonzero.default, torch.ops.aten.masked_select.default,
              torch.ops.aten._unique2.default, torch.ops.aten.unique_dim.default,
              torch.ops.aten.repeat_interleave.Tensor, torch.ops.aten.item.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.BANNED:
            raise AssertionError(f"host read: {func}")
        if func is torch.ops.aten.index.Tensor and any(
                i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            raise AssertionError("data-dependent shape: boolean-mask index")
        out = func(*args, **kwargs)
        srcs = [a for a in args if isinstance(a, torch.Tensor)]
        if isinstance(out, torch.Tensor) and out.device.type == "cpu" and any(s.device.type != "cpu" for s in srcs):
            raise AssertionError(f"device-to-host copy: {func}")
        return out


def _inputs(cfg, b, chunks, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(b, cfg.in_dim, cfg.chunk_frames, cfg.height, cfg.width, generator=g) for _ in STEPS]
            for _ in range(chunks)]


@torch.no_grad()
def _run_reference(ref, cfg, xs, context):
    kv, cross = ref.init_caches(context.shape[0])
    outs = []
    for c, chunk in enumerate(xs):
        start = c * cfg.chunk_frames * cfg.frame_tokens
        outs.append([ref(x, torch.full((x.shape[0],), t), context, kv, cross, current_start=start)
                     for x, t in zip(chunk, STEPS)])
    return outs


def _session_cache(model, cache_cls=StaticKVCache, rows=1, **kw):
    cache = cache_cls.for_model(model, num_slabs=rows, **kw)
    slabs = [cache.acquire() for _ in range(rows)]
    cache.bind(slabs)
    return cache, slabs


@torch.no_grad()
def _run_causal(model, cache, cfg, xs, batch, chunk_offset=0):
    outs = []
    for c, chunk in enumerate(xs):
        kv_frames = (c + chunk_offset + 1) * cfg.chunk_frames
        outs.append([model(x, torch.full((batch,), t), cache=cache, kv_frames=kv_frames, kv_exact=True)
                     for x, t in zip(chunk, STEPS)])
        cache.commit(batch, cfg.chunk_frames)
    return outs


def _set_prompt(model, cache, slabs, context):
    k, v = model.encode_prompt(context)
    for i, s in enumerate(slabs):
        cache.set_cross(s, k[:, i], v[:, i])


@pytest.mark.parametrize("batch,dtype", [(1, torch.float32), (2, torch.float32), (1, torch.bfloat16),
                                         (2, torch.bfloat16), (1, torch.float16)])
def test_equals_reference_seven_chunks(models, cfg, batch, dtype):
    """7 chunks x (4 denoising forwards + clean pass), every forward within the dtype's tolerance
    (graphrt.tolerance: fp32 1e-5, bf16 3e-2, fp16 1e-2 of unit-scale outputs); B=2 rows in step.
    bf16 and fp16 are what GPU users run: norms in float32 with float32 weights, as upstream."""
    ref, causal = (m.to(dtype) for m in models)
    xs = [[x.to(dtype) for x in chunk] for chunk in _inputs(cfg, batch, 7)]
    context = torch.randn(batch, cfg.text_len, cfg.text_dim, dtype=dtype)
    expected = _run_reference(ref, cfg, xs, context)
    cache, slabs = _session_cache(causal, rows=batch)
    _set_prompt(causal, cache, slabs, context)
    got = _run_causal(causal, cache, cfg, xs, batch)
    for c in range(7):
        for s in range(len(STEPS)):
            assert got[c][s].dtype == dtype
            assert rel_err(got[c][s], expected[c][s]) <= tolerance(dtype), (c, s)


def test_no_host_reads_in_any_bucket(models, cfg):
    """Every forward of a 7-chunk generation runs under a mode that fails on host reads."""
    ref, causal = models
    xs = _inputs(cfg, 1, 7)
    context = torch.randn(1, cfg.text_len, cfg.text_dim)
    cache, slabs = _session_cache(causal)
    _set_prompt(causal, cache, slabs, context)
    with FailOnHostRead():
        _run_causal(causal, cache, cfg, xs, 1)
        causal(xs[0][0], torch.zeros(1), cache=cache)          # default: whole slab, masked
        causal(xs[0][0], torch.zeros(1), context)               # cache-free call
    with pytest.raises(AssertionError, match="host read"), FailOnHostRead():
        _run_reference(ref, cfg, xs[:1], context)               # the mode catches the reference


def test_heterogeneous_batch(models, cfg):
    """B=2 with rows at different chunks: each row equals its own B=1 reference run."""
    ref, causal = models
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim)
    xs_a, xs_b = _inputs(cfg, 1, 5, seed=2), _inputs(cfg, 1, 7, seed=3)
    exp_a = _run_reference(ref, cfg, xs_a, ctx[:1])
    exp_b = _run_reference(ref, cfg, xs_b, ctx[1:])
    cache = StaticKVCache.for_model(causal, num_slabs=2, max_batch=2)
    sa, sb = cache.acquire(), cache.acquire()
    _set_prompt(causal, cache, [sa, sb], ctx)
    cache.bind([sb])                                            # b starts alone, two chunks ahead
    got_b = _run_causal(causal, cache, cfg, xs_b[:2], 1)
    cache.bind([sa, sb])
    with torch.no_grad():
        for c in range(5):
            kv_frames = (c + 3) * cfg.chunk_frames               # the longer row sets the bucket
            for s, t in enumerate(STEPS):
                x = torch.cat([xs_a[c][s], xs_b[c + 2][s]])
                out = causal(x, torch.full((2,), t), cache=cache, kv_frames=kv_frames, kv_exact=False)
                assert rel_err(out[:1], exp_a[c][s]) <= 1e-5, ("a", c, s)
                assert rel_err(out[1:], exp_b[c + 2][s]) <= 1e-5, ("b", c + 2, s)
            cache.commit(2, cfg.chunk_frames)
    for c in range(2):
        assert rel_err(got_b[c][-1], exp_b[c][-1]) <= 1e-5
    assert cache.frames.tolist() == [15, 21, 0]


@pytest.mark.parametrize("window,sink", [(9, 3), (6, 0), (12, 1)])
def test_rolling_cache_matches_reference_eviction(models, cfg, window, sink):
    ref, causal = models
    ref = ReferenceWan(cfg, local_attn_size=window, sink_size=sink).eval()
    ref.load_state_dict(causal.state_dict())
    xs = _inputs(cfg, 1, 7)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim)
    expected = _run_reference(ref, cfg, xs, ctx)
    cache, slabs = _session_cache(causal, RollingKVCache, window_frames=window, sink_frames=sink)
    _set_prompt(causal, cache, slabs, ctx)
    got = _run_causal(causal, cache, cfg, xs, 1)
    for c in range(7):
        for s in range(len(STEPS)):
            assert rel_err(got[c][s], expected[c][s]) <= 1e-5, (c, s)
    assert cache.slab_views(0)[0].shape[0] == window * cfg.frame_tokens    # the slab never grew
    assert cache.k[0].shape[0] == (window + cfg.chunk_frames) * cfg.frame_tokens  # one slab + a chunk of scratch


def test_slab_reuse_sees_nothing_of_the_old_session(models, cfg):
    _, causal = models
    ctx_old, ctx_new = torch.randn(1, cfg.text_len, cfg.text_dim), torch.randn(1, cfg.text_len, cfg.text_dim)
    xs_old, xs_new = _inputs(cfg, 1, 4, seed=5), _inputs(cfg, 1, 3, seed=6)
    fresh, slabs = _session_cache(causal)
    _set_prompt(causal, fresh, slabs, ctx_new)
    expected = _run_causal(causal, fresh, cfg, xs_new, 1)

    cache = StaticKVCache.for_model(causal, num_slabs=1)
    old = cache.acquire()
    cache.bind([old])
    _set_prompt(causal, cache, [old], ctx_old)
    _run_causal(causal, cache, cfg, xs_old, 1)
    cache.release(old)
    new = cache.acquire()
    assert new == old
    cache.bind([new])
    _set_prompt(causal, cache, [new], ctx_new)
    got = _run_causal(causal, cache, cfg, xs_new, 1)
    for c in range(3):
        for s in range(len(STEPS)):
            assert torch.equal(got[c][s], expected[c][s]), (c, s)


@torch.no_grad()
def test_cache_free_call_equals_reference(models, cfg):
    ref, causal = models
    x = torch.randn(2, cfg.in_dim, 6, cfg.height, cfg.width)
    t = torch.tensor([900.0, 10.0])
    ctx = torch.randn(2, 5, cfg.text_dim)                       # shorter than text_len: padded as Wan pads
    assert rel_err(causal(x, t, ctx), ref(x, t, ctx)) <= 1e-5


@torch.no_grad()
def test_per_row_conditioning(cfg):
    """cond [B, F, cond_dim] batched on dim 0: each row equals its solo run; reference agrees."""
    cfg = cfg.replace(cond_dim=6)
    ref = ReferenceWan(cfg).eval()
    causal = CausalWan(cfg, attention="sdpa").eval()
    causal.load_state_dict(ref.state_dict())
    x = torch.randn(2, cfg.in_dim, 3, cfg.height, cfg.width)
    t, ctx, cond = torch.tensor([500.0, 250.0]), torch.randn(2, cfg.text_len, cfg.text_dim), torch.randn(2, 3, 6)
    both = causal(x, t, ctx, cond=cond)
    assert rel_err(both, ref(x, t, ctx, cond=cond)) <= 1e-5
    for i in range(2):
        solo = causal(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], cond=cond[i:i + 1])
        assert rel_err(both[i:i + 1], solo) <= 1e-5
    with pytest.raises(InputError, match="per-frame conditioning"):
        causal(x, t, ctx)


@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_backends_match_sdpa(cfg, backend):
    why = attention.unavailable_reason(backend, torch.device("cpu"), torch.float32)
    if why:
        with pytest.raises(BackendUnavailableError, match="cannot run here"):
            attention.resolve(backend, torch.device("cpu"), torch.float32)
        pytest.skip(why)
    q, k, v = torch.randn(2, 16, 4, 8), torch.randn(2, 40, 4, 8), torch.randn(2, 40, 4, 8)
    for seqlens in (None, torch.tensor([17, 40], dtype=torch.int32)):
        ref = attention.attend(q, k, v, seqlens, backend="sdpa")
        assert rel_err(attention.attend(q, k, v, seqlens, backend=backend), ref) <= 1e-5


def test_auto_backend_is_visible(cfg):
    model = CausalWan(cfg)
    assert model.attention_backend == "sdpa"  # on the CPU; flash-attn where it runs


def test_masked_sdpa_equals_shorter_keys():
    q, k, v = torch.randn(2, 8, 2, 4), torch.randn(2, 24, 2, 4), torch.randn(2, 24, 2, 4)
    out = attention.attend(q, k, v, torch.tensor([10, 24], dtype=torch.int32))
    assert rel_err(out[:1], attention.attend(q[:1], k[:1, :10], v[:1, :10])) <= 1e-6
    assert rel_err(out[1:], attention.attend(q[1:], k[1:], v[1:])) <= 1e-6


def test_cache_errors(models, cfg):
    _, causal = models
    cache = StaticKVCache.for_model(causal, num_slabs=1)
    s = cache.acquire()
    with pytest.raises(CacheError, match="all 1 slabs are in use"):
        cache.acquire()
    with pytest.raises(CacheError, match="not held"):
        cache.release(5)
    cache.bind([s])
    x = torch.randn(1, cfg.in_dim, 3, cfg.height * 2, cfg.width)
    with pytest.raises(InputError, match="tokens per frame"):
        causal(x, torch.zeros(1), cache=cache)
    x = torch.randn(2, cfg.in_dim, 3, cfg.height, cfg.width)
    with pytest.raises(InputError, match="batch larger"):
        causal(x, torch.zeros(2), cache=cache)
    with pytest.raises(InputError, match="latents have the wrong shape"):
        causal(torch.randn(1, 3, 3, 8, 8), torch.zeros(1), cache=cache)
    with pytest.raises(InputError, match="timestep"):
        causal(x[:1], torch.zeros(3), cache=cache)
    with pytest.raises(InputError, match="no text context"):
        causal(x[:1], torch.zeros(1))
    with pytest.raises(CacheError, match="sink must be shorter"):
        RollingKVCache.for_model(causal, window_frames=3, sink_frames=3)
