"""WriteLog, Bindings and Sandbox: a run outside a real call leaves no trace, at the cost of what it wrote."""
from dataclasses import dataclass

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from graphrt.capture.undo import Bindings, Sandbox, WriteLog, roots_of
from graphrt.errors import RebindError

DTYPES = [torch.float32, torch.bfloat16]


def _snap(*ts):
    return [t.clone() for t in ts]


def _same(ts, snaps):
    return all(torch.equal(t, s) for t, s in zip(ts, snaps))


@pytest.mark.parametrize("dtype", DTYPES)
def test_index_copy_saves_only_the_rows_it_writes(dtype):
    cache = torch.randn(2, 4, 256, 8).to(dtype)            # [B, H, L, D], like a transformers StaticLayer
    pos = torch.tensor(5)
    before = _snap(cache, pos)
    with WriteLog() as log:
        for _ in range(3):                                   # three decode steps
            idx = torch.arange(1) + pos
            cache.index_copy_(2, idx, torch.randn(2, 4, 1, 8).to(dtype))
            pos.add_(1)
    assert not _same((cache, pos), before)
    row = 2 * 4 * 8 * cache.element_size()
    assert log.nbytes == 3 * row + 3 * pos.element_size()   # three rows and three positions, not the cache
    log.rollback()
    assert _same((cache, pos), before)
    log.rollback()                                           # idempotent
    assert _same((cache, pos), before)


def test_int32_indices_restore():
    t = torch.randn(6, 3)
    before = _snap(t)
    with WriteLog() as log:
        t.index_add_(0, torch.tensor([1, 4], dtype=torch.int32), torch.ones(2, 3))   # index_add_ takes int32
        t[torch.tensor([2], dtype=torch.int32)] = 0.0
    log.rollback()
    assert _same((t,), before)


def test_slice_copy_index_put_and_scatter_save_their_region():
    t = torch.randn(64, 16)
    before = _snap(t)
    with WriteLog() as log:
        t[3:5].copy_(torch.ones(2, 16))                      # a view: 2 rows
        t[torch.tensor([7, 9, 7])] = torch.zeros(3, 16)      # index_put_ with a repeated index
        t.scatter_(1, torch.tensor([[0, 1]]), torch.full((1, 2), 9.0))
        t.index_add_(0, torch.tensor([1]), torch.ones(1, 16))
        t.view(-1).put_(torch.tensor([100]), torch.tensor([3.0]))
    assert log.nbytes == (2 * 16 + 3 * 16 + 2 + 16 + 1) * 4
    log.rollback()
    assert _same((t,), before)


def test_writes_through_views_restore_the_base():
    base = torch.randn(6, 5)
    before = _snap(base)
    with WriteLog() as log:
        v = base.t()[1:3]                                    # a strided view: columns 1 and 2
        v.mul_(0)
        v[:, 2].fill_(7)
        base.diagonal().add_(1)
        base[::2].zero_()
    log.rollback()
    assert _same((base,), before)


def test_fresh_tensors_cost_nothing_and_out_ops_restore_shape():
    keep = torch.randn(4, 4)
    out = torch.empty(2)                                     # an out= target of the wrong shape: resized
    before = _snap(keep)
    with WriteLog() as log:
        tmp = torch.zeros(1000, 100)
        tmp.add_(1)
        tmp[0].copy_(keep[0].repeat(25))
        with pytest.warns(UserWarning, match="resized"):
            torch.add(keep, keep, out=out)
    assert out.shape == (4, 4)
    assert log.nbytes == out.element_size() * 2             # only the old contents of `out`
    log.rollback()
    assert out.shape == (2,) and _same((keep,), before)


def test_in_place_view_ops_restore_metadata():
    t = torch.randn(3, 4)
    with WriteLog() as log:
        t.transpose_(0, 1)
        t.mul_(2)
        t.unsqueeze_(0)
    assert t.shape == (1, 4, 3)
    before = t.squeeze(0).t().clone() / 2
    log.rollback()
    assert t.shape == (3, 4) and torch.equal(t, before)


@dataclass
class _Step:
    pos: torch.Tensor


class _Layer:
    def __init__(self):
        self.keys = torch.zeros(1, 2, 16, 4)
        self.cumulative_length = torch.tensor(0)


class _Cache:                                                # a transformers-style cache: layers in a list
    def __init__(self):
        self.layers = [_Layer(), _Layer()]


_GLOBAL = torch.zeros(3)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("hits", torch.zeros(4))
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, cache, extra):
        self.hits.add_(1)
        for layer in cache.layers:
            p = layer.cumulative_length
            layer.keys.index_copy_(2, p.reshape(1), x.reshape(1, 2, 1, 2).repeat(1, 1, 1, 2))
            layer.cumulative_length.add_(1)
        extra["step"].pos.add_(1)
        _GLOBAL.add_(1)
        return self.lin(x)


def test_every_owner_is_restored():
    model, cache = _Model(), _Cache()
    extra = {"step": _Step(torch.tensor(3))}
    closed = torch.ones(2)

    def fn(x):
        closed.mul_(5)
        return model(x, cache, extra)

    states = [model.hits, cache.layers[0].keys, cache.layers[1].cumulative_length, extra["step"].pos, _GLOBAL, closed]
    before = _snap(*states)
    sandbox = Sandbox(roots_of(fn))
    for _ in range(3):
        sandbox.run(fn, torch.randn(4))
    assert _same(states, before)
    assert sandbox.peak_bytes < 200                          # rows and counters, not the caches


def test_bound_method_owner_and_module_buffers():
    model = _Model()
    cache, extra = _Cache(), {"step": _Step(torch.tensor(0))}
    before = _snap(model.hits, cache.layers[1].keys)
    Sandbox(roots_of(model.forward, {"cache": cache, "extra": extra})).run(model.forward, torch.randn(4), cache, extra)
    assert _same((model.hits, cache.layers[1].keys), before)


def test_under_make_fx_the_log_is_not_traced():
    cache = torch.zeros(8, 4)
    pos = torch.tensor([2])

    def f(x):
        cache.index_copy_(0, pos, x)
        pos.add_(1)
        return cache.sum(0)

    plain = make_fx(f, tracing_mode="real")(torch.ones(1, 4))
    cache.zero_(), pos.fill_(2)
    with WriteLog() as log:
        gm = make_fx(f, tracing_mode="real")(torch.ones(1, 4))
    log.rollback()
    assert torch.equal(cache, torch.zeros(8, 4)) and pos.item() == 2
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops == [n.target for n in plain.graph.nodes if n.op == "call_function"]
    out = gm(torch.full((1, 4), 3.0))                       # the trace replays the real writes
    assert cache[2].tolist() == [3.0] * 4 and pos.item() == 3 and torch.equal(out, cache.sum(0))


def test_opaque_writes_roll_back_with_the_recorded_run():
    cache = torch.zeros(8, 4)
    pos = torch.tensor([2])

    def eager(x):
        cache.index_copy_(0, pos, x)
        pos.add_(1)

    def opaque(x):                                           # writes below the dispatcher, like inductor code
        p = int(pos.numpy()[0])
        cache.numpy()[p] = x.numpy()[0]
        pos.numpy()[0] += 1

    sandbox = Sandbox({})
    sandbox.run(eager, torch.ones(1, 4))
    sandbox.run_opaque(opaque, torch.ones(1, 4))
    assert torch.equal(cache, torch.zeros(8, 4)) and pos.item() == 2


class _Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("pos", torch.zeros((), dtype=torch.long))
        self.calls = 0

    def forward(self, x):
        self.pos = self.pos + 1                              # rebinding: a replay would not do it
        return x + self.pos


def test_rebinding_a_tensor_attribute_is_named_and_undone():
    m = _Counter()
    old = m.pos
    with pytest.raises(RebindError, match=r"_Counter\.pos") as e:
        Sandbox(roots_of(m)).run(m, torch.ones(2))
    assert "in place" in str(e.value) and m.pos is old and m.pos.item() == 0


_STEP = torch.zeros(1)


class _GlobalCounter(torch.nn.Module):
    def forward(self, x):
        global _STEP
        _STEP = _STEP + 1                                    # rebinds a global: a replay would not do it
        return x + _STEP


def test_a_module_forward_rebinding_a_global_is_named_and_undone():
    old = _STEP
    with pytest.raises(RebindError, match=r"_STEP: a tensor") as e:
        Sandbox(roots_of(_GlobalCounter())).run(_GlobalCounter(), torch.ones(2))
    assert "in place" in str(e.value) and _STEP is old and _STEP.item() == 0
    import graphrt                                           # and end to end: refused at capture
    with pytest.raises(RebindError, match=r"_STEP"):
        graphrt.compile(_GlobalCounter(), progress=False)(torch.ones(2))
    assert _STEP is old


def test_changed_python_number_is_named_and_undone():
    class Layer:
        def __init__(self):
            self.keys = torch.zeros(4)
            self.length = 0

    layer = Layer()

    def f(x, cache):
        cache.length += 1                                    # transformers' sliding-window layers do this
        return x + cache.keys

    with pytest.raises(RebindError, match=r"cache\.length: 0 -> 1") as e:
        Sandbox(roots_of(f, {"cache": layer})).run(f, torch.ones(4), layer)
    assert "device tensor" in str(e.value) and layer.length == 0


def test_state_created_during_the_call_is_named_and_removed():
    class Lazy:
        pass

    cache = Lazy()

    def f(x):
        cache.keys = torch.zeros(4)                          # lazy initialization inside the captured call
        return x + cache.keys

    with pytest.raises(RebindError, match="lazy initialization"):
        Sandbox(roots_of(f)).run(f, torch.ones(4))
    assert not hasattr(cache, "keys")


def test_bindings_name_tensors_by_path():
    cache = _Cache()
    names = Bindings({"past_key_values": cache}).names()
    assert names[id(cache.layers[1].keys)] == "past_key_values.layers[1].keys"


@pytest.mark.cuda
def test_write_log_on_cuda_tensors_and_a_side_stream():
    cache = torch.randn(2, 4, 64, 8, device="cuda")
    pos = torch.tensor(3, device="cuda")
    before = _snap(cache, pos)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with WriteLog() as log:
            cache.index_copy_(2, pos.reshape(1), torch.zeros(2, 4, 1, 8, device="cuda"))
            pos.add_(1)
        log.rollback()
    torch.cuda.current_stream().wait_stream(side)
    assert _same((cache, pos), before) and log.nbytes == 2 * 4 * 8 * 4 + 8
