"""Faults on CUDA: a capture beside another thread's CUDA work, weights moved under captured graphs,
an open() that never blocks the host. They skip without a device; tests/test_compile.py checks the
capture's error mode and the moved-weights refusal on the CPU."""
import threading

import pytest
import torch

import graphrt
from graphrt.models.wan import CausalWan
from graphrt.pipeline import Engine

cuda = pytest.mark.cuda


@cuda
def test_a_lazy_capture_beside_another_threads_cuda_work_succeeds():
    stop, errors = threading.Event(), []

    def busy():                       # another thread's work with syncs, on its own stream
        try:
            s = torch.cuda.Stream()
            a = torch.randn(256, 256, device="cuda")
            with torch.cuda.stream(s):
                while not stop.is_set():
                    (a @ a).sum().item()
        except BaseException as e:    # noqa: BLE001 - handed to the test
            errors.append(e)

    t = threading.Thread(target=busy)
    t.start()
    try:
        lin = torch.nn.Linear(64, 64, device="cuda")
        g = graphrt.compile(lin, backend="cuda-graph", progress=False)
        for b in (1, 2, 3, 4):        # one capture per signature, each beside the busy thread
            x = torch.randn(b, 64, device="cuda")
            torch.testing.assert_close(g(x), lin(x), rtol=0, atol=0)
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_replay_after_model_to_is_refused_on_cuda(dtype):
    lin = torch.nn.Linear(64, 64, device="cuda", dtype=dtype)
    g = graphrt.compile(lin, backend="cuda-graph", progress=False)
    x = torch.randn(2, 64, device="cuda", dtype=dtype)
    assert torch.equal(g(x), lin(x))
    lin.to("cpu").to("cuda")          # new device memory: the graph's is freed
    with pytest.raises(graphrt.WeightsMovedError, match="weight"):
        g(x)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_open_never_blocks_the_host(cfg, dtype):
    model = CausalWan(cfg, attention="sdpa").eval().to("cuda", dtype)
    engine = Engine(model, max_sessions=2, mode="eager", progress=False)
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim)          # on the host, as a text encoder's output may be
    want = engine.generate(ctx[:1].cuda(), 1, seed=3)
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda._sleep(10 ** 8)        # work queued on the stream: a blocking copy would wait for it
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = engine.open(ctx[:1], seed=3)                       # a miss: uploads the context and the schedule
    finally:
        torch.cuda.set_sync_debug_mode(mode)
    assert torch.equal(engine.step([s])[s], want)
