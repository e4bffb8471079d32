"""One thread at a time: the Engine, the VideoPipeline and a compiled module refuse a concurrent call
from a second thread (never mixing its buffers silently), and calls nest within one thread."""
import threading
import time

import pytest
import torch

import graphrt
from graphrt.errors import ConcurrentCallError
from graphrt.models.wan import CausalWan
from graphrt.pipeline import Engine, VideoPipeline, tiny_wan
from graphrt.pipeline.weights import VideoShape


def _model(cfg, dtype=torch.float32):
    return CausalWan(cfg, attention="sdpa").eval().to(dtype)


def _engine(model, **kw):
    return Engine(model, max_sessions=2, mode=kw.pop("mode", "eager"), progress=False, **kw)


def _blocking(fn, entered: threading.Event, release: threading.Event):
    """``fn`` that, on its first call, says it entered and waits until released."""
    def blocked(*args, **kwargs):
        if not release.is_set():
            entered.set()
            assert release.wait(30)
        return fn(*args, **kwargs)
    return blocked


def _in_thread(fn):
    box = {}

    def run():
        try:
            box["out"] = fn()
        except BaseException as e:       # noqa: BLE001 - handed to the test
            box["error"] = e
    t = threading.Thread(target=run, name="first-caller")
    t.start()
    return t, box


def test_a_second_thread_stepping_the_engine_is_refused_and_the_first_is_right(cfg):
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim)
    model = _model(cfg)
    want = _engine(model).generate(ctx[:1], 1, seed=1)
    engine = _engine(model)
    a, b = engine.open(ctx[:1], seed=1), engine.open(ctx[1:], seed=2)
    entered, release = threading.Event(), threading.Event()
    engine.use_chunk_function(_blocking(engine.chunk_function, entered, release))
    t, box = _in_thread(lambda: engine.step([a]))
    assert entered.wait(30)
    with pytest.raises(ConcurrentCallError, match=r"Engine\.step\(\) was called from thread 'MainThread' while "
                                                  r"Engine\.step\(\) runs in thread 'first-caller'") as e:
        engine.step([b])
    assert "a worker that owns it" in str(e.value)
    with pytest.raises(ConcurrentCallError):
        engine.open(ctx[1:], seed=3)             # any call that changes the engine
    release.set()
    t.join(30)
    assert "error" not in box and torch.equal(box["out"][a], want)
    assert b.chunk == 0 and len(engine.sessions) == 2     # the refused calls did nothing
    engine.step([b])                                       # free again, from any thread


def test_calls_nest_within_one_thread(cfg):
    engine = _engine(_model(cfg), mode="chunk", batch_sizes=(1,))
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim)
    assert engine.generate(ctx, 1).shape[2] == cfg.chunk_frames    # generate -> open/step -> graphed chunk


@pytest.mark.parametrize("dtype, mode", [(torch.float32, "eager"), (torch.bfloat16, "eager"), (torch.float32, "chunk")],
                         ids=["fp32-eager", "bf16-eager", "fp32-chunk"])
def test_two_threads_hammering_get_their_own_latents_or_an_error(cfg, dtype, mode):
    chunks = 3 if mode == "eager" else 2
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim, dtype=dtype)
    model = _model(cfg, dtype)
    ref = _engine(model)                  # eager: the graph modes agree with it bit for bit
    want = [torch.cat(list(ref.stream(ctx[i:i + 1], chunks, seed=10 + i)), dim=2) for i in range(2)]
    engine = _engine(model, mode=mode, batch_sizes=(1,))     # captures lazily, while the threads hammer
    sessions = [engine.open(ctx[i:i + 1], seed=10 + i) for i in range(2)]
    barrier = threading.Barrier(2)
    got, refused, other = [[], []], [0, 0], []

    def hammer(i):
        barrier.wait()
        while len(got[i]) < chunks:
            try:
                got[i].append(engine.step([sessions[i]])[sessions[i]])
            except ConcurrentCallError:
                refused[i] += 1
                time.sleep(0.001)          # retry soon, but leave the GIL to the call that runs
            except BaseException as e:     # noqa: BLE001 - anything else fails the test
                other.append(e)
                return

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not other
    assert sum(refused) > 0                  # the threads did collide
    for i in range(2):
        assert torch.equal(torch.cat(got[i], dim=2), want[i]), f"session {i} got another session's latents"


def test_a_compiled_module_refuses_a_second_thread(tmp_path):
    lin = torch.nn.Linear(4, 4)
    go = tmp_path / "go"

    def fn(x):          # waits for a file: nothing the capture watches changes under it
        deadline = time.monotonic() + 30
        while not go.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return lin(x)

    g = graphrt.compile(fn, progress=False)
    x = torch.randn(2, 4)
    t, box = _in_thread(lambda: g(x).clone())      # the first call captures; it waits in the check run
    deadline = time.monotonic() + 30
    while g._one_thread._call is None:             # the first call holds the module
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(ConcurrentCallError, match=r"GraphedModule\(.*\)\.__call__\(\) was called from thread "
                                                  r"'MainThread'.*'first-caller'"):
        g(torch.randn(2, 4))
    go.touch()
    t.join(30)
    assert "error" not in box, str(box.get("error"))
    assert torch.equal(box["out"], lin(x))
    assert torch.equal(g(x), lin(x))


def test_a_second_thread_stepping_the_pipeline_is_refused():
    pipe = VideoPipeline.from_components(tiny_wan(VideoShape(64, 64, chunk_frames=2, chunks=2, text_len=16)),
                                         mode="eager", progress=False, max_sessions=2, overlap=False)
    a, b = pipe.open("a cat", seed=1), pipe.open("a dog", seed=2)
    entered, release = threading.Event(), threading.Event()
    pipe.engine.use_chunk_function(_blocking(pipe.engine.chunk_function, entered, release))
    t, box = _in_thread(lambda: {s: f.result() for s, f in pipe.step([a]).items()})
    assert entered.wait(30)
    with pytest.raises(ConcurrentCallError, match=r"VideoPipeline\.step\(\).*'first-caller'"):
        pipe.step([b])
    release.set()
    t.join(30)
    assert "error" not in box and set(box["out"]) == {a}
    pipe.shutdown()
