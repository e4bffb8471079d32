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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_bench_has_fa3_and_sage_rows(dtype):
    """graphrt's own names in the kernel bench: FA3 skipped on the CPU with the reason, sage (its
    aten reference here) timed and checked against float32: int8 Q·Kᵀ, close but never exact
    (measured max rel err 1.1e-2 to 2.3e-2)."""
    from graphrt.bench.attention import kernels_for, measure
    from graphrt.models.wan import WanConfig

    assert {"fa3", "sage"} <= set(kernels_for(torch.device("cpu")))
    res = measure(WanConfig.preset("tiny"), torch.device("cpu"), dtype, iters=2, kernels=["fa3", "sage"],
                  kv_chunks=[1, 2])
    assert all("CUDA" in r["skipped"] for r in res["kernels"]["fa3"])
    assert all(r["ms"] > 0 and 1e-4 < r["max_rel_err"] < 5e-2 and "max_rel_err_vs_cudnn" not in r
               for r in res["kernels"]["sage"])


@pytest.mark.cuda
def test_kernel_bench_checks_fa3_and_sage_against_cudnn():
    from graphrt.bench.attention import measure
    from graphrt.models.wan import WanConfig

    res = measure(WanConfig.preset("tiny"), torch.device("cuda"), torch.bfloat16, iters=2,
                  kernels=["sdpa-cudnn", "fa3", "sage"], kv_chunks=[1, 2])
    for name in ("fa3", "sage"):
        for r in res["kernels"][name]:
            assert "skipped" in r or (r["max_rel_err"] < 5e-2 and r["max_rel_err_vs_cudnn"] < 5e-2), (name, r)


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


class _CompiledFlexStandIn:
    """Compiled flex on the CPU, standing in for CUDA: dynamo's build of flex (eager backend, so no
    inductor compile) nudged by one ulp, as a fused kernel rounds apart from the unfused path.
    Records which dispatch and function modes each call ran under."""

    def __init__(self):
        from graphrt.attention import _compiled_flex

        self.build, self.modes = _compiled_flex, []

    def __call__(self, key):
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        compiled = self.build(key, backend="eager")

        def run(q, k, v, seqlens):
            functions = [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]
            self.modes.append(_get_current_dispatch_mode_stack() + functions)
            out = compiled(q, k, v, seqlens)
            return torch.nextafter(out, torch.full_like(out, float("inf")))
        return run


@pytest.fixture
def compiled_flex_on_cpu(monkeypatch):
    import graphrt.attention as attention

    stand_in = _CompiledFlexStandIn()
    monkeypatch.setattr(attention, "_COMPILED_FLEX_DEVICES", ("cpu",))
    monkeypatch.setattr(attention, "_compiled_flex", stand_in)
    return stand_in


def _flex_inputs():
    q, k, v = torch.randn(1, 16, 2, 16), torch.randn(1, 32, 2, 16), torch.randn(1, 32, 2, 16)
    return q, k, v, torch.tensor([20], dtype=torch.int32)


def _flex_fn(q, k, v, seqlens):
    return attend(q, k, v, seqlens, "flex")


@torch.no_grad()
def test_compiled_flex_runs_in_check_and_verify_as_in_the_graph(compiled_flex_on_cpu):
    """Where flex is compiled, graphrt's check and verify's eager rerun run the compiled flex too
    (with their modes suspended): verify compares the replay with the same kernels, bit for bit,
    and the first compiled run is the check's, before any capture."""
    import graphrt
    from graphrt.attention import _flex_unfused

    q, k, v, sl = _flex_inputs()
    g = graphrt.compile(_flex_fn, backend="eager", verify=2, progress=False)
    first = g(q, k, v, sl).clone()
    assert compiled_flex_on_cpu.modes, "the check ran the unfused flex, the graph the compiled one"
    unfused = _flex_unfused(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), sl).transpose(1, 2)
    assert not torch.equal(first, unfused)          # the stand-in rounds apart, as the CUDA kernel does
    for n in (20, 31):                              # verified replays: eager rerun == replay
        sl.fill_(n)
        assert torch.equal(g(q, k, v, sl), _flex_fn(q, k, v, sl))
    assert g.stats.verified == 2
    assert all(m == [] for m in compiled_flex_on_cpu.modes)   # never under a watching mode (dynamo would trace it)


def test_compiled_flex_output_is_fresh_to_the_write_log(compiled_flex_on_cpu):
    """The write log does not see into compiled flex: its output must still count as made by
    the run, or an in-place op on it would be rolled back out of the run's result."""
    from graphrt.capture.undo import Sandbox

    q, k, v, sl = _flex_inputs()
    state = torch.zeros(1, 16, 2, 16)

    def fn():
        out = _flex_fn(q, k, v, sl)
        out.add_(1)
        state.copy_(out)
        return out

    with torch.no_grad():
        want = _flex_fn(q, k, v, sl) + 1
        got = Sandbox({}).run(fn)
    assert torch.equal(got, want)
    assert not state.any()                           # the write into pre-existing state is undone
    assert len(compiled_flex_on_cpu.modes) == 2


def test_flex_under_a_trace_stays_unfused(compiled_flex_on_cpu):
    """make_fx (and fake tensors) must see flex's higher-order op, never run compiled code."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(_flex_fn, tracing_mode="real")(*_flex_inputs())
    assert any("flex_attention" in str(n.target) for n in gm.graph.nodes)
    make_fx(_flex_fn, tracing_mode="fake")(*_flex_inputs())
    assert compiled_flex_on_cpu.modes == []


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_cuda_graph_verifies_bit_for_bit(dtype, monkeypatch):
    """attention="flex" on CUDA: compile(verify=...) passes (the eager rerun runs the compiled flex
    the graph captured), and compiled flex first runs before the capture, never under a mode."""
    import graphrt
    import graphrt.attention as attention
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    build, calls = attention._compiled_flex, []

    def recorded(key):
        compiled = build(key)

        def run(*args):
            calls.append((torch.cuda.is_current_stream_capturing(), len(_get_current_dispatch_mode_stack())))
            return compiled(*args)
        return run
    monkeypatch.setattr(attention, "_compiled_flex", recorded)
    q, k, v = (torch.randn(1, n, 2, 64, device="cuda", dtype=dtype) for n in (128, 256, 256))
    sl = torch.tensor([200], device="cuda", dtype=torch.int32)
    g = graphrt.compile(_flex_fn, backend="cuda-graph", verify=2, progress=False)
    with torch.no_grad():
        g(q, k, v, sl)
        for n in (150, 256):
            sl.fill_(n)
            assert torch.equal(g(q, k, v, sl), _flex_fn(q, k, v, sl))
    assert g.stats.verified == 2
    assert calls[0] == (False, 0) and (True, 0) in calls      # run before the capture, then captured
    assert all(modes == 0 for _, modes in calls)


@pytest.mark.cuda
@torch.no_grad()
def test_flex_engine_verifies_on_cuda(cfg):
    """The Engine on CUDA with attention="flex" and verify: every verified chunk is bit-identical
    to the eager forward, in bf16, and the video agrees with SDPA's (typical error within bf16's)."""
    from graphrt.models.wan import CausalWan
    from graphrt.pipeline import Engine
    from graphrt.tolerance import rms_rel_err, tolerance

    flex = CausalWan(cfg, attention="flex").to("cuda", torch.bfloat16).eval()
    sdpa = CausalWan(cfg, attention="sdpa").to("cuda", torch.bfloat16).eval()
    sdpa.load_state_dict(flex.state_dict())
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    video = Engine(flex, mode="chunk", backend="cuda-graph", inductor=False, verify=1,      # flex's own kernels
                   progress=False).generate(ctx, 2, seed=3)
    want = Engine(sdpa, mode="eager", progress=False).generate(ctx, 2, seed=3)
    assert rms_rel_err(video, want) < tolerance(torch.bfloat16)
