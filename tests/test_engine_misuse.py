"""The Engine under misuse: nothing lost, nothing mixed, no unbounded memory, a clear error each time."""
import os

import numpy as np
import pytest
import torch

from conftest import rel_err
from graphrt.errors import CacheError, InputError
from graphrt.models.wan import CausalWan, ReferenceWan
from graphrt.pipeline import Engine, reference_stream


@pytest.fixture
def ctx(cfg):
    return torch.randn(4, cfg.text_len, cfg.text_dim)


@pytest.fixture
def causal(cfg):
    return CausalWan(cfg, attention="sdpa").eval()     # parameters require grad, as a user's model does


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


# -- inference without autograd history, whatever the caller's grad mode -------------------------------
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
def test_many_videos_without_no_grad_keep_memory_flat(causal, cfg, ctx):
    """Without torch.no_grad() (as the README calls it) an autograd graph through the persistent
    cache grew resident memory by ~9 MiB per 2-chunk tiny video, linearly, forever."""
    assert torch.is_grad_enabled()
    engine = Engine(causal, mode="eager", progress=False)
    for i in range(3):                                     # allocator warm-up
        engine.generate(ctx[:1], 2, seed=i)
    before = _rss_mib()
    for i in range(12):
        video = engine.generate(ctx[:1], 2, seed=i)
    grown = _rss_mib() - before
    assert grown < 25, f"resident memory grew {grown:.0f} MiB over 12 videos"
    assert not video.requires_grad and video.grad_fn is None
    cache = engine.cache
    assert all(t.grad_fn is None and not t.requires_grad for t in (*cache.k, *cache.v, cache.cross_k, cache.cross_v))


def test_every_mode_and_the_reference_return_plain_tensors(causal, cfg, ctx):
    assert torch.is_grad_enabled()
    engine = Engine(causal, max_sessions=2, batch_sizes=(2,), mode="forward", progress=False)
    a = engine.open(ctx[:1], seed=1)
    out = engine.step()[a]
    assert not out.requires_grad and engine.cache.k[0].grad_fn is None and engine.cache.cross_k.grad_fn is None
    ref = ReferenceWan(cfg).eval()
    chunk = next(reference_stream(ref, ctx[:1], 2, seed=1))
    assert not chunk.requires_grad and chunk.grad_fn is None


# -- sessions are checked by identity, in their own engine -----------------------------------------------
def test_close_of_a_foreign_session_with_the_same_id_frees_nothing(causal, cfg, ctx):
    mine = Engine(causal, max_sessions=2, batch_sizes=(1, 2), mode="eager", progress=False)
    other = Engine(causal, max_sessions=2, batch_sizes=(1, 2), mode="eager", progress=False)
    a = mine.open(ctx[:1], seed=1)
    foreign = other.open(ctx[1:2], seed=2)
    assert foreign.id == a.id and foreign.slab == a.slab
    with pytest.raises(InputError, match="not a session open in this engine"):
        mine.close(foreign)
    assert mine.sessions[a.id] is a and mine.cache.free_slabs == 1
    b = mine.open(ctx[2:3], seed=3)                          # must not share a's slab
    assert b.slab != a.slab
    with pytest.raises(InputError, match="not a session open in this engine"):
        mine.step([foreign])
    chunks = [mine.step([a, b])[a] for _ in range(2)]
    solo = Engine(causal, mode="eager", progress=False).generate(ctx[:1], 2, seed=1)
    assert rel_err(torch.cat(chunks, 2), solo) <= 1e-5
    mine.close(a)
    with pytest.raises(InputError, match="not a session open in this engine"):
        mine.close(a)                                        # twice


def test_step_rejects_a_session_listed_twice(causal, ctx):
    engine = Engine(causal, max_sessions=2, batch_sizes=(1, 2), mode="eager", progress=False)
    a = engine.open(ctx[:1], seed=1)
    with pytest.raises(InputError, match=f"session {a.id} is listed twice"):
        engine.step([a, a])
    assert a.chunk == 0 and engine.stats.chunks == 0


def test_step_outputs_and_cond_are_keyed_by_session(cfg, ctx):
    causal = CausalWan(cfg.replace(cond_dim=6), attention="sdpa").eval()
    engine = Engine(causal, max_sessions=2, batch_sizes=(2,), mode="eager", progress=False)
    a, b = engine.open(ctx[:1], seed=1), engine.open(ctx[1:2], seed=2)
    poses = torch.randn(2, cfg.chunk_frames, 6)
    outs = engine.step(cond={a: poses[0], b: poses[1]})
    assert list(outs) == [a, b] and outs[a].shape == (1, cfg.out_dim, cfg.chunk_frames, cfg.height, cfg.width)
    with pytest.raises(InputError, match="not a session open in this engine"):
        engine.step(cond={a.id: poses[0], b: poses[1]})      # an id is not a session: ids repeat across engines
    assert a.chunk == 1 and b.chunk == 1


# -- open(), stream() and generate() check their arguments and keep nothing when they fail ------------
def test_a_failed_open_keeps_no_prompt_key(causal, ctx):
    engine = Engine(causal, mode="eager", progress=False)
    a = engine.open(ctx[:1], seed=1)
    with pytest.raises(CacheError, match="all 1 slabs are in use"):
        engine.open(ctx[1:2], prompt="a boat")
    assert engine.stats.prompt_misses == 1
    engine.close(a)
    s = engine.open(ctx[2:3], prompt="a boat")               # the key is free: no "different context" error
    assert engine.stats.prompt_misses == 2 and engine.stats.prompt_hits == 0
    engine.close(s)
    assert engine.open(ctx[2:3], prompt="a boat") and engine.stats.prompt_hits == 1


@pytest.mark.parametrize("num_chunks", [0, -1, 1.5, True, "3"])
def test_open_and_generate_reject_bad_chunk_counts(causal, ctx, num_chunks):
    engine = Engine(causal, mode="eager", progress=False)
    with pytest.raises(InputError, match="num_chunks must be an int >= 1"):
        engine.open(ctx[:1], num_chunks=num_chunks)
    with pytest.raises(InputError, match="num_chunks must be an int >= 1"):
        engine.generate(ctx[:1], num_chunks)
    with pytest.raises(InputError, match="num_chunks must be an int >= 1"):
        engine.stream(ctx[:1], num_chunks)                   # checked at the call, not at the first next()
    assert not engine.sessions and engine.cache.free_slabs == 1


@pytest.mark.parametrize("bad, why", [
    (lambda c: c[:1].numpy(), "must be a torch.Tensor"),
    (lambda c: c[:1].to("meta"), "on the meta device"),
    (lambda c: c[:1].long(), "holds no float data"),
    (lambda c: c[:1, :0], "wrong shape"),
    (lambda c: c[:0], "wrong shape"),                        # no row: no video
    (lambda c: torch.cat([c[:1]] * 2, 1), "wrong shape"),   # longer than text_len
    (lambda c: c[:1].index_fill(1, torch.tensor([2]), float("nan")), "NaN or inf"),
    (lambda c: c[:1].index_fill(2, torch.tensor([0]), float("-inf")), "NaN or inf"),
    (lambda c: c[:1].bfloat16().index_fill(1, torch.tensor([0]), float("nan")), "NaN or inf"),
], ids=["numpy", "meta", "int", "empty", "no-rows", "too-long", "nan", "inf", "nan-bf16"])
def test_bad_contexts_get_clear_errors(causal, ctx, bad, why):
    engine = Engine(causal, mode="eager", progress=False)
    context = bad(ctx)
    with pytest.raises(InputError, match=why):
        engine.open(context)
    with pytest.raises(InputError, match=why):
        engine.generate(context, 1)
    assert not engine.sessions and engine.stats.prompt_misses == 0


def test_a_batch_larger_than_the_free_slabs_says_so(causal, ctx):
    engine = Engine(causal, max_sessions=1, batch_sizes=(2,), mode="eager", progress=False)
    with pytest.raises(CacheError, match=r"2 video\(s\) need 2 free slab\(s\); 1 of 1 are free"):
        engine.generate(ctx[:2], 1)
    assert not engine.sessions and engine.cache.free_slabs == 1


@pytest.mark.parametrize("model", [torch.nn.Linear(4, 4), ReferenceWan], ids=["linear", "no-encode_prompt"])
def test_an_engine_needs_a_graphrt_model(cfg, model):
    if model is ReferenceWan:
        model = ReferenceWan(cfg)
    with pytest.raises(InputError, match="Engine needs a causal DiT built by graphrt"):
        Engine(model, mode="eager")


# -- an open-ended session at the end of its slab blocks no one -----------------------------------------
def test_a_full_open_ended_session_does_not_stop_the_others(causal, cfg, ctx):
    engine = Engine(causal, max_sessions=2, batch_sizes=(1, 2), mode="eager", progress=False)
    a = engine.open(ctx[:1], seed=1)                         # open-ended: no num_chunks
    for _ in range(cfg.num_chunks):
        engine.step([a])
    b = engine.open(ctx[1:2], seed=2)
    with pytest.warns(UserWarning, match=rf"session\(s\) \[{a.id}\] at the end of the slab"):
        outs = engine.step()
    assert list(outs) == [b] and b.chunk == 1 and a.chunk == cfg.num_chunks
    solo = Engine(causal, mode="eager", progress=False).generate(ctx[1:2], 1, seed=2)
    assert rel_err(outs[b], solo) <= 1e-5
    with pytest.raises(CacheError, match=rf"\[{a.id}\] at the end of the slab"):
        engine.step([a, b])                                  # named explicitly: an error, nothing runs
    assert b.chunk == 1 and engine.at_end(a) and not engine.at_end(b)
    engine.close(b)
    with pytest.raises(CacheError, match=rf"\[{a.id}\] at the end of the slab"):
        engine.step()                                        # no one can go on: an error, not a silent {}


def test_numpy_is_not_a_context_for_stream(causal, ctx):
    engine = Engine(causal, mode="eager", progress=False)
    with pytest.raises(InputError, match="must be a torch.Tensor"):
        engine.stream(np.zeros((1, 8, 32), dtype=np.float32), 1)


# -- what the graphs cost is said where it is chosen -------------------------------------------------------
def test_num_graphs_is_what_prewarm_captures_and_the_bar_counts(causal, cfg, monkeypatch):
    from rich.progress import Progress

    assert Engine(causal, max_sessions=4, batch_sizes=(1, 2, 4), mode="chunk").num_graphs == 3 * 7 * 2
    assert Engine(causal, mode="eager").num_graphs == 0
    cfg = cfg.replace(max_frames=2 * cfg.chunk_frames)       # two KV lengths: two graphs to capture
    engine = Engine(CausalWan(cfg, attention="sdpa").eval(), mode="forward")
    seen = []
    real = Progress.update

    def update(self, task, **kw):
        seen.append(kw.get("description"))
        return real(self, task, **kw)

    monkeypatch.setattr(Progress, "update", update)
    engine.prewarm()
    assert engine.num_graphs == cfg.num_chunks == engine.graphs.stats.captures
    assert seen[0] == f"capturing graph 1 of {cfg.num_chunks}: batch=1 kv_exact=True kv_frames={cfg.max_frames}"


# -- the prompt cache is bounded: least recently used prompts are dropped --------------------------------
def test_the_prompt_cache_keeps_at_most_prompt_cache_prompts(causal, cfg):
    ctx = torch.randn(5, cfg.text_len, cfg.text_dim)
    engine = Engine(causal, max_sessions=2, batch_sizes=(1, 2), mode="eager", progress=False, prompt_cache=2)
    a = engine.open(ctx[:1], seed=1, prompt="p0")            # stays open while its prompt is dropped
    for i in range(1, 5):
        engine.close(engine.open(ctx[i:i + 1], seed=i, prompt=f"p{i}"))
    mem = engine.memory()
    assert mem.prompts == 2 and engine.stats.prompt_misses == 5
    kv = causal.encode_prompt(ctx[:1])
    assert mem.prompt_bytes == 2 * (ctx[:1].nbytes + kv[0][:, 0].nbytes + kv[1][:, 0].nbytes)
    with pytest.raises(InputError, match="needs a text context"):
        engine.open(None, prompt="p0")                       # dropped: its K/V are gone
    engine.close(engine.open(None, prompt="p4"))             # kept: a hit, and p4 is now the most recent
    assert engine.stats.prompt_hits == 1
    b = engine.open(ctx[:1], seed=2, prompt="p0")            # encoded again: drops p3, not p4
    assert engine.stats.prompt_misses == 6 and list(engine._prompts) == ["p4", "p0"]
    chunks = [engine.step([a, b]) for _ in range(2)]
    solo = Engine(causal, max_sessions=2, batch_sizes=(2,), mode="eager", progress=False)
    want = solo.generate(ctx[:1].expand(2, -1, -1), 2, seed=[1, 2])
    got = torch.cat([torch.cat([c[a], c[b]]) for c in chunks], 2)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_prompt_cache_must_be_a_count(causal, bad):
    with pytest.raises(InputError, match="prompt_cache must be an int >= 0"):
        Engine(causal, mode="eager", prompt_cache=bad)


def test_prompt_cache_zero_keeps_no_prompt(causal, ctx):
    engine = Engine(causal, mode="eager", progress=False, prompt_cache=0)
    engine.close(engine.open(ctx[:1], prompt="a boat"))
    assert engine.memory().prompts == 0 and not engine._prompts


@pytest.mark.parametrize("num_chunks, seed, error, why", [
    (100, 0, CacheError, "a video of 100 chunks does not fit"),
    (1, -1, InputError, r"seed must be an int in \[0, 2\*\*63\)"),
    (1, 2 ** 63 - 1, InputError, r"seed must be an int in \[0, 2\*\*63\)"),   # row 1 gets 2**63
    (1, [0, 1.5], InputError, "seed must be an int"),
], ids=["past-the-cache", "negative-seed", "seed-plus-row", "float-seed"])
def test_stream_checks_length_and_seeds_at_the_call(causal, ctx, num_chunks, seed, error, why):
    engine = Engine(causal, max_sessions=2, batch_sizes=(2,), mode="eager", progress=False)
    with pytest.raises(error, match=why):
        engine.stream(ctx[:2], num_chunks, seed=seed)        # not at the first next()
    assert not engine.sessions and engine.cache.free_slabs == 2


# -- batch sizes are normalised, and step() takes one session too -------------------------------------
def test_batch_sizes_are_sorted_distinct_ints(causal):
    engine = Engine(causal, max_sessions=2, batch_sizes=(2, 1, 2), mode="chunk", progress=False)
    assert engine.batch_sizes == (1, 2) and engine.num_graphs == 2 * 7 * 2
    assert Engine(causal, max_sessions=2, batch_sizes=iter([2, 1]), mode="eager").batch_sizes == (1, 2)


@pytest.mark.parametrize("bad, why", [
    ((1.5,), r"batch sizes must be ints >= 1; got \[1.5\]"),
    ((0, 1), r"batch sizes must be ints >= 1; got \[0\]"),
    ((True,), r"batch sizes must be ints >= 1; got \[True\]"),
    ((), "batch_sizes is empty"),
    (2, "batch_sizes must be a sequence of ints"),
    ("12", "batch_sizes must be a sequence of ints"),
], ids=["float", "zero", "bool", "empty", "int", "str"])
def test_bad_batch_sizes_get_clear_errors(causal, bad, why):
    with pytest.raises(InputError, match=why):
        Engine(causal, max_sessions=2, batch_sizes=bad, mode="eager")


def test_step_takes_a_lone_session(causal, ctx):
    engine = Engine(causal, max_sessions=2, batch_sizes=(1, 2), mode="eager", progress=False)
    a, b = engine.open(ctx[:1], seed=1), engine.open(ctx[1:2], seed=2)
    out = engine.step(a)
    assert list(out) == [a] and a.chunk == 1 and b.chunk == 0
    solo = Engine(causal, mode="eager", progress=False).generate(ctx[:1], 1, seed=1)
    assert torch.equal(out[a], solo)


# -- kv_buckets="auto": one graph per batch size only where attention reads the cache in place ----------
def test_auto_kv_buckets_keeps_per_length_for_a_quantized_cache(causal, cfg, monkeypatch):
    from types import SimpleNamespace

    from graphrt.pipeline.engine import auto_kv_buckets

    flash = SimpleNamespace(attention_backend="flash")
    assert auto_kv_buckets(flash) == "max" and auto_kv_buckets(flash, quantized=True) == "per-length"
    assert auto_kv_buckets(SimpleNamespace(attention_backend="sdpa"), quantized=False) == "per-length"
    # the Engine's decision, as on a GPU with flash-attn (not installed here: the backend is forced)
    monkeypatch.setattr(CausalWan, "attention_backend", property(lambda self: "flash"))
    assert Engine(causal, mode="chunk", progress=False).kv_buckets == "max"
    for kv_dtype in ("int8", "float8_e4m3fn"):
        engine = Engine(causal, mode="chunk", progress=False, kv_dtype=kv_dtype)
        assert engine.cache.quantized and engine.kv_buckets == "per-length" and engine.num_graphs == cfg.num_chunks


# -- the public chunk-function hook (the bench's compile-chunk peer uses it) -------------------------------
def test_use_chunk_function_runs_the_given_wrapper_and_only_in_eager_mode(causal, cfg, ctx):
    from graphrt.errors import ConfigError

    plain = Engine(causal, mode="eager", progress=False).generate(ctx[:1], 2, seed=3)
    engine = Engine(causal, mode="eager", progress=False)
    calls = []

    def wrapper(cond, **kw):
        calls.append(kw)
        return engine.chunk_function(cond, **kw)

    engine.use_chunk_function(wrapper)
    assert torch.equal(engine.generate(ctx[:1], 2, seed=3), plain)
    assert len(calls) == 2 and set(calls[0]) == {"batch", "kv_frames", "kv_exact"}
    with pytest.raises(InputError, match="callable"):
        engine.use_chunk_function(None)
    chunk = Engine(causal, mode="chunk", progress=False)
    with pytest.raises(ConfigError, match="mode='eager'"):
        chunk.use_chunk_function(chunk.chunk_function)


def test_a_batch_with_one_nan_row_is_refused_naming_it(causal, ctx):
    engine = Engine(causal, max_sessions=2, mode="eager", progress=False)
    bad = ctx[:2].clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(InputError, match=r"stream\(\): the text context holds NaN or inf \(row\(s\) \[1\]\)"):
        engine.stream(bad, 1)
    assert not engine.sessions


def test_stream_says_how_many_seeds_and_prompt_keys_it_got(causal, ctx):
    engine = Engine(causal, mode="eager", progress=False)
    with pytest.raises(InputError, match=r"1 seed\(s\), 0 prompt key\(s\)"):
        engine.stream(ctx[:1], 1, prompt=[])
