"""The hooks capture declares for the layers above: the runtime-state protocols, argument checks
and frames marked internal."""
import os

import torch

import graphrt
from graphrt.capture import check, mark_internal
from graphrt.capture.state import (ArgumentCheck, CaptureGuarded, PaddedRows, RuntimeState, argument_checks,
                                   is_runtime_state)
from graphrt.kv import StaticKVCache
from graphrt.llm.cache import TransformersCacheCheck


def test_kv_caches_implement_the_runtime_state_protocols():
    cache = StaticKVCache(num_layers=1, num_heads=1, head_dim=2, frame_tokens=1, max_frames=2)
    assert isinstance(cache, RuntimeState) and isinstance(cache, CaptureGuarded) and isinstance(cache, PaddedRows)
    assert is_runtime_state(cache) and not is_runtime_state(StaticKVCache)      # the class is no state


def test_an_object_with_only_some_methods_is_no_runtime_state():
    class Half:
        def reset(self):
            pass

    class Whole(Half):
        snapshot = restore = Half.reset

    assert not is_runtime_state(Half()) and is_runtime_state(Whole())
    assert not isinstance(Whole(), PaddedRows)


def test_the_transformers_cache_check_is_registered_by_the_package():
    assert any(isinstance(c, TransformersCacheCheck) for c in argument_checks())
    assert all(isinstance(c, ArgumentCheck) for c in argument_checks())


def test_a_registered_argument_check_refuses_before_capture():
    class Refused:
        pass

    class RefuseIt:
        def applies(self, obj):
            return isinstance(obj, Refused)

        def check(self, obj, path, batch, call):
            raise graphrt.InputError(f"{path} refused", got=sorted(call))

    from graphrt.capture import state

    state.register_argument_check(RefuseIt())
    try:
        g = graphrt.compile(lambda x, s: x + 1, backend="cpu-graph", progress=False)
        try:
            g(torch.ones(2), Refused())
        except graphrt.InputError as e:
            assert "s refused" in str(e)
        else:
            raise AssertionError("the registered check did not run")
        assert g.stats.captures == 0
    finally:
        state._ARGUMENT_CHECKS[:] = [c for c in state._ARGUMENT_CHECKS if not isinstance(c, RefuseIt)]


def test_marked_files_are_machinery_and_the_read_is_placed_at_the_caller(tmp_path):
    helper = tmp_path / "machinery.py"
    helper.write_text("def run(fn, x):\n    return fn(x)\n\ndef read(x):\n    return x.sum().item()\n")
    ns: dict = {}
    exec(compile(helper.read_text(), str(helper), "exec"), ns)

    def forward(x):
        return ns["run"](ns["read"], x)

    site = check(forward, torch.ones(2)).sites[0]
    assert site.file == os.path.abspath(helper) and site.line == 5
    mark_internal(str(helper))
    site = check(forward, torch.ones(2)).sites[0]
    assert site.file == os.path.abspath(__file__)          # the user's line: the call into the machinery
    assert "ns[\"run\"]" in site.code
