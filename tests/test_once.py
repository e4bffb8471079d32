"""inductor="once": one torch.compile for every bucket, captured per bucket (the Engine's CUDA default)."""
import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import graphrt
from graphrt.errors import BackendUnavailableError
from graphrt.models.wan import CausalWan, WanConfig
from graphrt.pipeline import Engine
from graphrt.pipeline.checks import engine_inductor
from graphrt.replay import once
from graphrt.tolerance import max_rel_err, tolerance

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _compiles() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """No compiled frame and no shape profile from earlier compiles (dynamo's profile-guided dynamism
    would mark sizes dynamic from the first compile), so the counts are this test's own."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(automatic_dynamic_local_pgo=False):
        yield
    torch._dynamo.reset()


def _head(x, *, n: int):
    return (x[:n].float() * 2).sin().sum(0).to(x.dtype)


@DTYPES
def test_one_compile_serves_every_length(dtype):
    """Four buckets that differ in a length: the first compiles static, the second with the length
    symbolic, and the rest reuse it; every output matches the uncompiled function."""
    g = graphrt.compile(_head, buckets=graphrt.Buckets(static_args={"n": (2, 3, 4, 5)}), backend="eager",
                        inductor="once", progress=False)
    x = torch.randn(8, 16).to(dtype)
    for n in (5, 4, 3, 2, 3, 5):
        got, want = g(x, n=n), _head(x, n=n)
        assert max_rel_err(got, want) <= tolerance(dtype), n
    assert _compiles() == 2


def test_watched_calls_run_uncompiled_and_do_not_stop_the_compile():
    """Under a dispatch mode (graphrt's checker and write log, make_fx) the function runs as
    written, so the mode sees its ops; dynamo would otherwise skip the frame for good."""
    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    fn = once.compiled_once(_head)
    x = torch.randn(8, 4)
    with Count():
        assert torch.equal(fn(x, n=3), _head(x, n=3))
    assert Count.ops >= 4 and _compiles() == 0
    fn(x, n=3)
    assert _compiles() == 1


def test_once_needs_compiled_code_to_run():
    """The CPU emulation traces ops (the compiled code would never run): refused up front, or at
    the first capture when the backend is picked by the device."""
    with pytest.raises(BackendUnavailableError, match="inductor=True"):
        graphrt.compile(_head, backend="cpu-graph", inductor="once")
    g = graphrt.compile(_head, inductor="once", progress=False)
    with pytest.raises(BackendUnavailableError, match="once"):
        g(torch.randn(4, 4), n=2)
    with pytest.raises(graphrt.errors.InputError, match="once"):
        graphrt.compile(_head, inductor="twice")


def test_engine_default_is_once_on_cuda_only():
    assert engine_inductor("auto", torch.device("cuda")) == "once"
    assert engine_inductor("auto", torch.device("cuda"), "eager") is False
    assert engine_inductor("auto", torch.device("cpu")) is False
    assert engine_inductor(True, torch.device("cpu")) is True
    cfg = WanConfig.preset("tiny").replace(num_layers=1, max_frames=9)
    assert Engine(CausalWan(cfg), mode="chunk", progress=False).inductor is False


def _video(dtype, mode, **kw):
    torch.manual_seed(0)
    cfg = WanConfig.preset("tiny").replace(num_layers=1, max_frames=12)
    model = CausalWan(cfg, attention="sdpa").to(dtype).eval()
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim).to(dtype)
    engine = Engine(model, mode=mode, progress=False, **kw)
    return engine, engine.generate(ctx, 4, seed=1)


@DTYPES
@torch.no_grad()
def test_engine_forward_graphs_compile_once(dtype):
    """Forward graphs over 4 KV lengths, inductor compiling the model: 2 compiles, not 4; the video
    within the dtype's tolerance of the uncompiled engine's."""
    _, want = _video(dtype, "eager")
    engine, got = _video(dtype, "forward", backend="eager", inductor="once")
    assert engine.num_graphs == 4 and _compiles() == 2
    assert max_rel_err(got, want) <= tolerance(dtype)


@DTYPES
@torch.no_grad()
def test_engine_chunk_graphs_compile_once(dtype, monkeypatch):
    """The whole chunk function through dynamo (scheduler, noise, cache writes and commit included)
    over 4 KV lengths: 2 compiles. AOT autograd's eager backend stands in for inductor here (the
    same graphs, no C++ build), so the video equals the uncompiled engine's bit for bit."""
    monkeypatch.setattr(once, "_compile", lambda fn, options: torch.compile(fn, backend="aot_eager"))
    _, want = _video(dtype, "eager")
    engine, got = _video(dtype, "chunk", backend="eager", inductor="once")
    assert engine.num_graphs == 4 and _compiles() == 2
    assert torch.equal(got, want)


@pytest.mark.cuda
@DTYPES
@torch.no_grad()
def test_engine_cuda_default_is_fused_inductor_once(dtype):
    """The GPU default: fused kernels, one compile for every bucket, CUDA graphs; replays verified
    against the same path's eager run, and the video within tolerance of the eager engine."""
    torch.manual_seed(0)
    cfg = WanConfig.preset("tiny").replace(max_frames=12)
    model = CausalWan(cfg).to("cuda", dtype).eval()
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device="cuda", dtype=dtype)
    want = Engine(model, mode="eager", progress=False).generate(ctx, 4, seed=1)
    engine = Engine(model, mode="chunk", verify=1, progress=False)
    assert engine.inductor == "once" and engine.kernel_path == "fused"
    got = engine.generate(ctx, 4, seed=1)
    assert engine.num_graphs == 4 and _compiles() <= 3
    assert max_rel_err(got, want) <= tolerance(dtype)
