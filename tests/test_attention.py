"""Attention backends: what ``auto`` picks, pinned SDPA kernels, and the kernel bench."""
import pytest
import torch

from graphrt.attention import BACKENDS, attend, resolve
from graphrt.errors import BackendUnavailableError


def test_auto_on_the_cpu_is_sdpa_and_cuda_kernels_are_refused():
    assert resolve("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"
    for name in ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient"):
        with pytest.raises(BackendUnavailableError, match="CUDA kernel"):
            resolve(name, torch.device("cpu"), torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="unknown attention backend"):
        resolve("cudnn", torch.device("cpu"), torch.float32)
    assert set(BACKENDS) >= {"sdpa", "sdpa-math", "sdpa-cudnn", "flex", "flash"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_pinned_and_ordered_sdpa_equal_plain_sdpa_on_the_cpu(dtype, masked):
    q, k, v = (torch.randn(2, n, 4, 16, dtype=dtype) for n in (12, 40, 40))
    seqlens = torch.tensor([40, 23]) if masked else None
    want = attend(q, k, v, seqlens, "sdpa")
    assert torch.equal(attend(q, k, v, seqlens, "sdpa-auto"), want)   # on the CPU: SDPA's own kernel
    math = attend(q, k, v, seqlens, "sdpa-math")                      # another kernel: a tolerance
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((math.float() - want.float()).abs().max() / want.float().abs().max()).item() < tol
    assert not torch.equal(math, torch.zeros_like(math))


def test_kernel_bench_runs_and_checks_errors_on_the_cpu():
    from graphrt.bench.attention import measure
    from graphrt.models.wan import WanConfig

    res = measure(WanConfig.preset("tiny"), torch.device("cpu"), torch.float32, iters=2,
                  kernels=["sdpa-math", "sdpa-efficient"])
    assert res["kv_tokens"] == [48, 192, 336]          # 1, 4 and 7 chunks of 16 tokens x 3 frames
    math_rows = res["kernels"]["sdpa-math"]
    assert all(r["ms"] > 0 and r["max_rel_err"] < 1e-5 for r in math_rows)
    # the CPU has no memory-efficient kernel: the row says why instead of a time
    assert all("error" in r for r in res["kernels"]["sdpa-efficient"])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-auto", "flex"])
def test_cuda_kernels_match_math_in_bf16(backend):
    q, k, v = (torch.randn(1, n, 12, 128, device="cuda", dtype=torch.bfloat16) for n in (1560, 4680, 4680))
    want = attend(q.float(), k.float(), v.float(), None, "sdpa-math")
    got = attend(q, k, v, None, backend).float()
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
    if backend in ("sdpa-auto", "flex"):          # masked buckets too
        sl = torch.tensor([3000], device="cuda", dtype=torch.int32)
        want = attend(q.float(), k.float(), v.float(), sl, "sdpa-math")
        got = attend(q, k, v, sl, backend).float()
        assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2


def test_flex_compiles_once_per_shape_and_never_hits_the_recompile_limit():
    """One compiled flex per shape: with dynamo allowed no recompile at all, every KV length and
    the masked variant still compile (one shared compiled function would fail on the second)."""
    import torch._dynamo

    from graphrt.attention import _compiled_flex

    if not hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        pytest.skip("this torch cannot make a hit recompile limit an error")
    q = torch.randn(1, 4, 16, 8)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for kv, masked in ((24, False), (40, False), (40, True)):
            k, v = torch.randn(1, 4, kv, 8), torch.randn(1, 4, kv, 8)
            seqlens = torch.tensor([kv - 5], dtype=torch.int32) if masked else None
            key = (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, q.device, masked)
            for _ in range(2):
                got = _compiled_flex(key, backend="eager")(q, k, v, seqlens)
            want = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), seqlens).transpose(1, 2)
            assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


@torch.no_grad()
def test_flex_is_checked_captured_and_served_by_the_engine(cfg):
    """attention="flex": the checker passes its higher-order op through, a cpu-graph replays it
    bit for bit (seqlens a graph input, not a frozen constant), and the Engine agrees with SDPA."""
    import graphrt
    from graphrt.kv import StaticKVCache
    from graphrt.models.wan import CausalWan
    from graphrt.pipeline import Engine

    flex = CausalWan(cfg, attention="flex").eval()
    sdpa = CausalWan(cfg, attention="sdpa").eval()
    sdpa.load_state_dict(flex.state_dict())
    cache = StaticKVCache.for_model(flex, num_slabs=2)
    cache.bind([cache.acquire(), cache.acquire()])
    x, t = torch.randn(2, cfg.in_dim, 3, cfg.height, cfg.width), torch.zeros(2)
    assert graphrt.check(flex, x, t, cache=cache, kv_frames=6, kv_exact=False).ok
    g = graphrt.compile(flex, verify=2, progress=False)
    for frames in ([3, 6], [6, 3], [3, 3]):                   # masked: per-row lengths change
        cache.frames[:2] = torch.tensor(frames)
        snap = cache.snapshot(data=True)
        got = g(x, t, cache=cache, kv_frames=9, kv_exact=False).clone()
        cache.restore(snap)
        assert torch.equal(got, flex(x, t, cache=cache, kv_frames=9, kv_exact=False))
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim)
    video = Engine(flex, mode="chunk", progress=False).generate(ctx, 2, seed=3)
    want = Engine(sdpa, mode="eager", progress=False).generate(ctx, 2, seed=3)
    assert ((video - want).abs().max() / want.abs().max()).item() < 1e-5
