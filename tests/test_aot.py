"""Whole-chunk graphs compiled by inductor on the CPU (AOTInductor packages), their disk cache
across processes, inductor's freezing, and one graph per batch size (kv_buckets="max").

The inductor compiles are the cost of this file: one fp32 package, reused from disk by a second
process, and one bf16 package.
"""
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import aot_engine
from conftest import rel_err
import graphrt
from graphrt.capture import aot
from graphrt.capture.aot import CompiledTrace, artifact_key, lift_constants, resolve_wrapper
from graphrt.capture.diskcache import ENV, DiskCache, default_dir
from graphrt.errors import BackendUnavailableError, CaptureError, ConfigError, InputError
from graphrt.pipeline import Engine
from graphrt.pipeline.engine import auto_kv_buckets
from graphrt.tolerance import tolerance

TESTS = Path(__file__).parent


# -- the compiled whole chunk ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """The fp32 engine compiled here (cold), with inductor's freezing switched on globally, as a
    user tuning CPU inference might: it must not fold the cache or the engine's tables."""
    folder = tmp_path_factory.mktemp("graphs")
    m = aot_engine.model()
    want = aot_engine.video(aot_engine.engine(m, mode="eager"))
    with torch._inductor.config.patch(freezing=True):
        e = aot_engine.engine(m, inductor=True, cache_dir=folder)
        got = aot_engine.video(e)
    return folder, e, got, want


def test_whole_chunk_package_matches_eager(cold):
    folder, e, got, want = cold
    assert e.num_graphs == 1 and e.graphs.stats.captures == 1
    assert e.graphs.runtime.inductor == "aoti"
    assert rel_err(got, want) <= tolerance(torch.float32)
    assert not torch.equal(got, torch.zeros_like(got))
    s = e.graphs.stats
    assert (s.disk_hits, s.disk_misses) == (0, 1)
    packages = list(folder.rglob("*.pt2"))
    assert len(packages) == 1 and len(list(folder.rglob("*.json"))) == 1
    # the K/V writes stay in place: the package's C++ never allocates a buffer of a layer's pool shape
    with zipfile.ZipFile(packages[0]) as z:
        code = "".join(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.cpp"))
    assert "aoti_torch_cpu_addmm_out" in code and "aoti_torch_empty_strided(3, int_array_" in code
    pool = re.escape("{%dL, %dL, %dL}" % tuple(e.cache.k[0].shape))
    shaped = re.findall(r"(int_array_\d+)\[\] = " + pool, code)        # size arrays of the pool's shape
    assert not any(f"aoti_torch_empty_strided(3, {a}," in code for a in shaped), "the package copies the KV pool"
    # a second video on the same graph: it reads the live cache and tables, not what they held at compile
    again = e.generate(aot_engine.context(), 2, seed=aot_engine.SEED)
    assert torch.equal(again, got)


def test_second_process_loads_the_compiled_chunk(cold):
    """A second start (another process, the folder from $GRAPHRT_CACHE_DIR) compiles nothing and
    gives the same video bit for bit."""
    folder, e, got, _ = cold
    out = folder.parent / "second.pt"
    env = dict(os.environ, **{ENV: str(folder)})
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(TESTS / "aot_engine.py"), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (stats["disk_hits"], stats["disk_misses"]) == (1, 0)
    assert torch.equal(torch.load(out), got)
    assert stats["capture_s"] < 0.5 * e.graphs.stats.capture_seconds      # a fraction of the cold start


def test_whole_chunk_package_bf16():
    m = aot_engine.model(torch.bfloat16)
    want = aot_engine.video(aot_engine.engine(m, mode="eager"), torch.bfloat16)
    e = aot_engine.engine(m, inductor=True, cache_dir=False)
    got = aot_engine.video(e, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) <= tolerance(torch.bfloat16)


# -- the pieces, without a compile ---------------------------------------------------------------------
def _stateful():
    """A toy with runtime state: a buffer written at a device position that advances."""
    w, buf, pos = torch.randn(8, 8), torch.zeros(4, 8), torch.zeros(1, dtype=torch.long)

    def step(x):
        buf.index_copy_(0, pos, torch.relu(x @ w))
        pos.add_(1)
        return [buf.sum(0)]

    return step, (w, buf, pos)


def test_lifted_trace_runs_on_the_live_tensors():
    step, (w, buf, pos) = _stateful()
    x = torch.randn(1, 8)
    gm = make_fx(step)(x)
    pos.zero_()
    buf.zero_()
    lifted, consts = lift_constants(gm)
    assert not [n for n in lifted.graph.nodes if n.op == "get_attr"]
    assert [c is t for c, t in zip(consts, (w, buf, pos))] == [True] * 3
    out = lifted(x, *consts)
    assert pos.item() == 1 and torch.equal(buf[0], torch.relu(x @ w)[0]) and torch.equal(out[0], buf.sum(0))


def test_key_names_shapes_not_values():
    step, (w, buf, pos) = _stateful()
    x = torch.randn(1, 8)
    lifted, consts = lift_constants(make_fx(step)(x))
    key, parts = artifact_key(lifted, [x, *consts], "aoti")
    assert parts["torch"] == torch.__version__ and parts["threads"] == torch.get_num_threads()
    w.normal_()
    buf.fill_(3)
    assert artifact_key(lifted, [x, *consts], "aoti")[0] == key                  # values: same artifact
    assert artifact_key(lifted, [x.double(), *consts], "aoti")[0] != key         # dtype
    assert artifact_key(lifted, [torch.randn(2, 8), *consts], "aoti")[0] != key  # shape
    other, c2 = lift_constants(make_fx(lambda x: [x * 2])(x))
    assert artifact_key(other, [x, *c2], "aoti")[0] != key                        # graph
    torch.set_num_threads(2)
    try:
        assert artifact_key(lifted, [x, *consts], "aoti")[0] != key              # inductor's loop threads
    finally:
        torch.set_num_threads(1)


def test_inputs_sharing_memory_are_refused():
    base = torch.zeros(8)
    gm = make_fx(lambda a, b: [a + b])(base[:4], base[4:])
    with pytest.raises(CaptureError, match="share memory"):
        CompiledTrace(gm, [base[:4], base[4:]], "aoti", None)


def test_wrapper_settings():
    assert resolve_wrapper(True, torch.device("cpu")) == "aoti"
    assert resolve_wrapper(True, torch.device("cuda")) == "python"
    assert resolve_wrapper(False, torch.device("cpu")) is None
    with pytest.raises(BackendUnavailableError, match="CPU wrapper"):
        resolve_wrapper("aoti", torch.device("cuda"))
    with pytest.raises(InputError, match="unknown inductor setting"):
        graphrt.compile(torch.nn.Linear(2, 2), inductor="fast")
    with pytest.raises(ConfigError, match="cache_dir"):
        graphrt.compile(torch.nn.Linear(2, 2), inductor=True, cache_dir=3)


def test_disk_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "env"))
    assert default_dir() == tmp_path / "env"
    assert DiskCache.resolve(None).root == tmp_path / "env"
    assert DiskCache.resolve(tmp_path / "arg").root == tmp_path / "arg"          # the argument wins
    assert DiskCache.resolve(False) is None
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_dir() == tmp_path / "xdg" / "graphrt"
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    src = tmp_path / "art"
    src.write_bytes(b"x")
    with pytest.raises(ConfigError, match="not writable"):
        DiskCache(blocked / "sub").put("ab" * 32, src, {})


def test_disk_cache_drops_a_bad_file_and_compiles_again(tmp_path, monkeypatch):
    """A truncated package is dropped (counted), compiled again and stored; the next start hits.
    A file that passes the digest check but fails to load is dropped the same way."""
    packaged, loaded = [], []

    class Runner:
        def __init__(self, path):
            if Path(path).read_bytes() != b"package":
                raise RuntimeError("not a package")
            loaded.append(path)

        def run(self, tensors):
            return [tensors[0] + 1]

    monkeypatch.setattr(aot, "_package", lambda lifted, args, path, where, *options: (packaged.append(1),
                                                                            Path(path).write_bytes(b"package")))
    monkeypatch.setattr(aot, "_load", Runner)
    x = torch.zeros(2)
    gm = make_fx(lambda x: [x + 1])(x)
    disk = DiskCache(tmp_path)
    key, _ = artifact_key(*lift_constants(gm)[:1], [x], "aoti")
    disk.path(key).parent.mkdir(parents=True)
    disk.path(key).write_bytes(b"trunc")
    first = CompiledTrace(gm, [x], "aoti", disk)
    assert (first.disk_hit, disk.errors, len(packaged), disk.stores) == (False, 1, 1, 1)
    assert torch.equal(first(x)[0], x + 1)
    second = CompiledTrace(gm, [x], "aoti", disk)
    assert second.disk_hit is True and len(packaged) == 1 and disk.hits == 1    # the bad file had no record: a miss
    disk.path(key).write_bytes(b"garbage")                                    # recorded, yet not loadable
    meta = json.loads(disk.path(key).with_suffix(".json").read_text())
    disk.path(key).with_suffix(".json").write_text(json.dumps(dict(meta, sha256=hashlib.sha256(b"garbage").hexdigest())))
    third = CompiledTrace(gm, [x], "aoti", disk)
    assert third.disk_hit is False and disk.errors == 2 and len(packaged) == 2


# -- one graph per batch size ------------------------------------------------------------------------
def test_one_graph_per_batch_size(models, cfg):
    _, causal = models
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim)
    per_length = Engine(causal, mode="eager", kv_buckets="per-length", progress=False)
    assert len(per_length.kv_choices) == cfg.num_chunks
    e = Engine(causal, max_sessions=2, batch_sizes=(1, 2), mode="chunk", kv_buckets="max",
                                progress=False)
    assert e.num_graphs == 2 and e.kv_choices == (cfg.max_frames,) and e.kv_exact_choices == (False,)
    eager = Engine(causal, mode="eager", kv_buckets="max", progress=False)
    want = per_length.generate(ctx, 3, seed=1)
    got = e.generate(ctx, 3, seed=1)
    assert e.graphs.stats.captures == 1                 # every chunk of the video: one graph
    assert torch.equal(got, eager.generate(ctx, 3, seed=1))
    assert rel_err(got, want) <= tolerance(torch.float32)
    with pytest.raises(InputError, match="kv_buckets"):
        Engine(causal, kv_buckets="one")
    # "auto": one graph per batch size only where attention skips the keys past the device lengths
    assert Engine(causal, mode="eager").kv_buckets == "per-length"             # SDPA computes every key
    assert auto_kv_buckets(SimpleNamespace(attention_backend="flash")) == "max"  # cache_seqlens


def test_disk_cache_never_loads_a_file_with_flipped_bytes(tmp_path, monkeypatch):
    """A stored package whose bytes changed (not only truncated) is dropped before any loader
    sees it: loading a corrupt compiled package can crash the process."""
    loaded = []
    monkeypatch.setattr(aot, "_package", lambda lifted, args, path, where, *options: Path(path).write_bytes(b"package-v1"))
    monkeypatch.setattr(aot, "_load", lambda path: (loaded.append(Path(path).read_bytes()),
                                                    type("R", (), {"run": staticmethod(lambda xs: [xs[0] + 1])})())[1])
    x = torch.zeros(2)
    gm = make_fx(lambda x: [x + 1])(x)
    disk = DiskCache(tmp_path)
    CompiledTrace(gm, [x], "aoti", disk)
    key, _ = artifact_key(*lift_constants(gm)[:1], [x], "aoti")
    stored = disk.path(key)
    assert json.loads(stored.with_suffix(".json").read_text())["sha256"] == hashlib.sha256(b"package-v1").hexdigest()
    flipped = bytearray(stored.read_bytes())
    flipped[3] ^= 0x40                                    # same length, one bit changed
    stored.write_bytes(bytes(flipped))
    loaded.clear()
    again = CompiledTrace(gm, [x], "aoti", disk)
    assert again.disk_hit is False and disk.errors == 1 and disk.stores == 2
    assert loaded == [b"package-v1"]                     # only the rebuilt file was loaded
    stored.with_suffix(".json").unlink()                 # no record: not trusted either
    assert disk.get(key) is None and disk.errors == 2 and not stored.exists()


def test_unwritable_cache_folder_is_found_before_compiling(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(ConfigError, match="not writable"):          # named by the caller: refused
        graphrt.compile(torch.nn.Linear(2, 2), inductor=True, cache_dir=blocked / "sub")
    monkeypatch.setenv(ENV, str(blocked / "sub"))                     # the default: one warning, no disk cache
    with pytest.warns(UserWarning, match="not writable"):
        assert DiskCache.resolve(None) is None
