"""Interactive sessions: a prompt switch with the KV re-cache, and sessions started from given latents."""
import pytest
import torch

from graphrt.errors import CacheError, ConfigError, InputError
from graphrt.kv import RollingKVCache, StaticKVCache
from graphrt.models.wan import CausalWan, WanConfig
from graphrt.pipeline import Engine
from graphrt.pipeline.schedule import denoise_chunk


@pytest.fixture
def ctx(cfg):
    return torch.randn(4, cfg.text_len, cfg.text_dim)


def _model(cfg, dtype):
    return CausalWan(cfg, attention="sdpa").to(dtype=dtype).eval()


def _reference(model, ctx, seed, latents, window, kv_dtype, chunks):
    """The re-cache written out with the model and a fresh cache: the clean pass over the frames
    the slab still holds (sink + the last ring frames, or all), oldest first, each kept chunk at
    its own position attending the kept chunks before it, under ``ctx``; then ``chunks`` chunks."""
    cfg = model.cfg
    F, P = cfg.chunk_frames, latents.shape[2]
    if window is None:
        cache = StaticKVCache.for_model(model, kv_dtype=kv_dtype)
        kept = list(range(0, P, F))
    else:
        cache = RollingKVCache.for_model(model, window_frames=window[0], sink_frames=window[1], kv_dtype=kv_dtype)
        sink, ring = window[1], window[0] - window[1]
        kept = list(range(0, P, F)) if P <= window[0] else \
            list(range(0, sink, F)) + list(range(P - ring, P, F))
    slab = cache.acquire()
    if window is not None and P > window[0]:   # the kept ring oldest first: the next chunk overwrites the oldest
        cache.offset[slab] = (sink - P) % ring
    k, v = model.encode_prompt(ctx.to(latents.dtype))
    cache.set_cross(slab, k[:, 0], v[:, 0])
    cache.bind([slab])
    t0 = torch.zeros(1)
    for j, p in enumerate(kept):
        model(latents[:, :, p:p + F], t0, cache=cache, kv_frames=(j + 1) * F, kv_exact=True,
              positions=torch.tensor([p]))
    cache.frames[slab] = P
    eng = Engine(model, mode="eager", progress=False)
    sched = eng.schedule
    out = []
    for c in range(chunks):
        kv = min(P + (c + 1) * F, cache.slab_frames)
        fwd = lambda x, t: model(x.to(latents.dtype), t, cache=cache, kv_frames=kv, kv_exact=True)  # noqa: E731
        x0 = denoise_chunk(fwd, torch.tensor([seed]), cache.frames[:1].clone(),
                           torch.tensor([sched.timesteps]), torch.tensor([sched.sigmas]), eng.shape)
        clean = x0.to(latents.dtype)
        model(clean, t0, cache=cache, kv_frames=kv, kv_exact=True)
        cache.commit(1, F)
        out.append(clean)
    return out


CASES = [(torch.float32, None, None, 2, "chunk"), (torch.bfloat16, None, "int8", 2, None),
         # a window of 9 frames (sink 3, ring 6): after 4 chunks the ring has wrapped
         (torch.float32, (9, 3), None, 4, None), (torch.bfloat16, (9, 3), "int8", 5, "forward"),
         (torch.bfloat16, (9, 3), "float8_e4m3fn", 4, None)]


@pytest.mark.parametrize("dtype,window,kv_dtype,before,graphs", CASES,
                         ids=["fp32-static", "bf16-static-int8", "fp32-rolling-wrapped", "bf16-rolling-int8-wrapped",
                              "bf16-rolling-fp8-wrapped"])
@torch.no_grad()
def test_recache_equals_the_clean_pass_over_the_kept_latents(cfg, ctx, dtype, window, kv_dtype, before, graphs):
    """A switch with re-cache, then 2 chunks: bit for bit the written-out reference (eager), and
    (two cases, to keep captures few) the whole-chunk graphs, or the graphs of one forward, bit for
    bit the eager Engine."""
    model = _model(cfg, dtype)
    got = {}
    for mode in ("eager", graphs) if graphs else ("eager",):
        engine = Engine(model, mode=mode, max_sessions=1, window=window, kv_dtype=kv_dtype, progress=False)
        a = engine.open(ctx[:1], seed=5)
        lat = [engine.step([a])[a] for _ in range(before)]
        engine.set_prompt(a, ctx[1:2])
        assert a.recache
        got[mode] = [engine.step([a])[a] for _ in range(2)]
        assert not a.recache and a.chunk == before + 2
        if mode != "eager" and window is None:     # prewarm(recache=True): every pass bucket, then sealed
            assert engine.recache_graphs.stats.captures == 2          # passes of 3 and 6 frames, lazily
            engine.prewarm(recache=True)
            assert engine.recache_graphs.sealed and engine.recache_graphs.stats.captures == cfg.num_chunks
    want = _reference(model, ctx[1:2], 5, torch.cat(lat, 2), window, kv_dtype, 2)
    assert all(torch.equal(g, w) for g, w in zip(got["eager"], want))
    assert all(torch.equal(g, w) for g, w in zip(got.get(graphs, got["eager"]), got["eager"]))
    # without the re-cache only cross-attention changes: another video
    engine = Engine(model, mode="eager", max_sessions=1, window=window, kv_dtype=kv_dtype, progress=False)
    a = engine.open(ctx[:1], seed=5)
    for _ in range(before):
        engine.step([a])
    engine.set_prompt(a, ctx[1:2], recache=False)
    assert not a.recache
    assert not torch.equal(engine.step([a])[a], got["eager"][0])


@pytest.mark.parametrize("dtype,mode", [(torch.float32, "forward"), (torch.bfloat16, "eager")],
                         ids=["fp32-graphs", "bf16-eager"])
@torch.no_grad()
def test_a_switch_mid_batch_leaves_the_others_bit_identical(cfg, ctx, dtype, mode):
    """Four sessions batched; b switches (with re-cache) before chunk 2 and d (without) before
    chunk 1: a and c get the chunks they get with no switch, bit for bit."""
    model = _model(cfg, dtype)

    def run(switch):
        engine = Engine(model, mode=mode, max_sessions=4, window=(9, 3), progress=False)
        s = [engine.open(ctx[i:i + 1], seed=10 + i) for i in range(4)]
        out = []
        for c in range(4):
            if switch and c == 1:
                engine.set_prompt(s[3], ctx[0:1], prompt="other", recache=False)
            if switch and c == 2:
                engine.set_prompt(s[1], ctx[0:1], prompt="other")
            step = engine.step()
            out.append([step[x] for x in s])
        return out, engine

    base, _ = run(False)
    got, engine = run(True)
    for c in range(4):
        assert torch.equal(got[c][0], base[c][0]) and torch.equal(got[c][2], base[c][2]), c
    assert all(torch.equal(got[c][1], base[c][1]) for c in range(2))
    assert not torch.equal(got[2][1], base[2][1]) and not torch.equal(got[1][3], base[1][3])
    assert engine.stats.prompt_misses == 5 and engine.stats.prompt_hits == 1     # the second switch: a cache hit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@torch.no_grad()
def test_a_session_started_from_latents_continues_as_the_original(cfg, ctx, dtype):
    """Started from another session's first chunks with the same seed, a session continues
    exactly as that one did (positions, noise, the cache written by the clean pass); and a
    switch with re-cache equals starting from the same latents under the new prompt."""
    model = _model(cfg, dtype)
    engine = Engine(model, mode="eager", max_sessions=3, window=(9, 3), progress=False)
    a = engine.open(ctx[:1], seed=3, num_chunks=5)
    want = [engine.step([a])[a] for _ in range(5)]
    for n in (1, 2):
        b = engine.open(ctx[:1], seed=3, num_chunks=5, init_latents=torch.cat(want[:n], 2))
        assert b.chunk == n and b.recache
        got = [engine.step([b])[b] for _ in range(5 - n)]
        assert all(torch.equal(g, w) for g, w in zip(got, want[n:])), n
        assert b.done
        engine.close(b)
    # switch after 4 chunks (the ring has wrapped) == open from those 4 chunks under the new prompt
    c = engine.open(ctx[:1], seed=4)
    lat = [engine.step([c])[c] for _ in range(4)]
    engine.set_prompt(c, ctx[2:3])
    d = engine.open(ctx[2:3], seed=4, init_latents=torch.cat(lat, 2))
    out = engine.step([c, d])                 # both re-cached in one batch, then one chunk each
    assert torch.equal(out[c], out[d])


@torch.no_grad()
def test_suspend_and_resume_keep_the_kept_latents(cfg, ctx):
    """A switched session suspended before its re-cache (and one after it, its ring turned)
    resumes into another slab and continues bit for bit as if never suspended."""
    model = _model(cfg, torch.bfloat16)

    def run(suspend):
        engine = Engine(model, mode="eager", max_sessions=2, window=(9, 3), kv_dtype="int8", progress=False)
        a, b = engine.open(ctx[:1], seed=1), engine.open(ctx[1:2], seed=2)
        out = [engine.step([a])[a] for _ in range(4)]
        engine.set_prompt(a, ctx[2:3])
        for i in range(2):
            if suspend:
                old = a.slab
                engine.suspend(a)
                engine.step([b])
                engine.suspend(b)
                engine.resume(b)
                engine.resume(a)
                assert a.slab != old or i
            out.append(engine.step([a])[a])
        return out, engine

    want, _ = run(False)
    got, engine = run(True)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    m = engine.memory()
    assert m.kv.latents == 9 * cfg.out_dim * cfg.height * cfg.width * 2      # bf16, per session
    assert m.recache_bytes == 2 * 9 * cfg.out_dim * cfg.height * cfg.width * 2 + 2 * 3 * 8   # staging: 2 rows
    assert m.device_total == m.weights + m.kv.total + m.prompt_bytes + m.recache_bytes


@torch.no_grad()
def test_interactive_misuse_gets_clear_errors_and_writes_nothing(cfg, ctx):
    model = _model(cfg, torch.float32)
    engine = Engine(model, mode="eager", max_sessions=2, progress=False)
    other = Engine(model, mode="eager", max_sessions=1, progress=False)
    a = engine.open(ctx[:1], seed=1, num_chunks=2)
    with pytest.raises(InputError, match="set_prompt.*not a session open in this engine"):
        engine.set_prompt(other.open(ctx[:1]), ctx[1:2])
    with pytest.raises(InputError, match="set_prompt.*wrong shape"):
        engine.set_prompt(a, torch.randn(1, cfg.text_len, cfg.text_dim + 1))
    with pytest.raises(InputError, match="one context row"):
        engine.set_prompt(a, ctx[:2])
    with pytest.raises(InputError, match="needs a text context"):
        engine.set_prompt(a, None, prompt="never seen")
    engine.step([a])
    engine.step([a])
    with pytest.raises(InputError, match="session 0 is finished.*2 of 2"):
        engine.set_prompt(a, ctx[1:2])
    engine.close(a)
    with pytest.raises(InputError, match="not a session open"):
        engine.set_prompt(a, ctx[1:2])
    b = engine.open(ctx[:1])
    engine.suspend(b)
    with pytest.raises(CacheError, match="suspended.*\n.*resume"):
        engine.set_prompt(b, ctx[1:2])
    engine.close(b)
    F, shape = cfg.chunk_frames, (1, cfg.out_dim, cfg.chunk_frames, cfg.height, cfg.width)
    bad = [(torch.randn(shape[:2] + (F + 1,) + shape[3:]), InputError, "not a whole number of 3-frame chunks"),
           (torch.randn(1, cfg.out_dim, F, cfg.height, cfg.width + 2), InputError, "wrong shape"),
           (torch.randn(shape, dtype=torch.float64), InputError, "wrong dtype"),
           (torch.randn(shape[:2] + (cfg.max_frames,) + shape[3:]), CacheError, "fill the slab"),
           (torch.full(shape, float("nan")), InputError, "NaN"),
           ("latents", InputError, "must be a torch.Tensor")]
    for latents, err, why in bad:
        with pytest.raises(err, match=why):
            engine.open(ctx[:1], init_latents=latents)
    with pytest.raises(InputError, match="num_chunks=1 counts the 1 given chunks"):
        engine.open(ctx[:1], num_chunks=1, init_latents=torch.randn(shape))
    assert not engine.sessions and engine.cache.free_slabs == 2          # nothing kept
    # a re-cache needs whole chunks in the sink and the ring, and no per-chunk cond
    odd = Engine(model, mode="eager", window=(10, 4), progress=False)
    s = odd.open(ctx[:1])
    with pytest.raises(CacheError, match="whole chunks.*sink 4 and ring 6"):
        odd.set_prompt(s, ctx[1:2])
    odd.set_prompt(s, ctx[1:2], recache=False)                      # cross-attention only: fine
    cond = Engine(CausalWan(WanConfig.preset("tiny", cond_dim=4)).eval(), mode="eager", progress=False)
    with pytest.raises(ConfigError, match="cond_dim=4"):
        cond.set_prompt(cond.open(ctx[:1]), ctx[1:2])


# -- the pipeline: prompts by text, frames in ------------------------------------------------------
@pytest.fixture(scope="module")
def parts():
    from graphrt.pipeline import VideoShape, tiny_wan
    pytest.importorskip("diffusers")
    return tiny_wan(VideoShape(64, 64, chunk_frames=2, chunks=4, text_len=16))


@torch.no_grad()
def test_pipeline_set_prompt_goes_through_the_text_encoder_and_the_prompt_cache(parts):
    from graphrt.pipeline import VideoPipeline
    pipe = VideoPipeline.from_components(parts, mode="eager", progress=False, overlap=False, max_sessions=2)
    a = pipe.open("a red fox", seed=1)
    ref = pipe.engine.open(pipe.text("a red fox"), seed=1)         # the same switch, by context
    pipe.step([a])
    pipe.engine.step([ref])
    pipe.set_prompt(a, "a blue  bird")
    pipe.engine.set_prompt(ref, pipe.text("a blue bird"))
    assert (pipe.text.stats.hits, pipe.engine.stats.prompt_hits) == (2, 0)      # the cleaned text: one entry
    assert "a blue bird" in pipe.engine._prompts
    lat = pipe.engine.step([a, ref])
    assert torch.equal(lat[a], lat[ref])
    pipe.shutdown()
    with pytest.raises(InputError, match="shut down"):
        pipe.set_prompt(a, "a cat")


@torch.no_grad()
def test_pipeline_starts_from_a_video_or_an_image(parts):
    """A clip of 2 chunks is encoded (Wan VAE encoder), counted as the session's first chunks and
    primes its decoder: the first chunk delivered is the first new one, and its frames are those
    of the given latents and the new chunk decoded at once."""
    from graphrt.pipeline import VideoPipeline
    pipe = VideoPipeline.from_components(parts, mode="eager", progress=False, overlap=False, max_sessions=2)
    cfg = pipe.engine.cfg
    clip = torch.randint(0, 256, (1 + 4 * (2 * cfg.chunk_frames - 1), 64, 64, 3), dtype=torch.uint8)
    init = pipe.encoder.encode(clip)
    assert init.shape == (1, cfg.out_dim, 2 * cfg.chunk_frames, cfg.height, cfg.width)
    s = pipe.open("a red fox", seed=2, num_chunks=3, video=clip)
    assert s.chunk == 2 and not s.done
    lat = pipe.engine.step([s])[s]
    frames = pipe.queue.submit(lat, pipe.decoder_state(s)).result()
    assert frames.shape[0] == 4 * cfg.chunk_frames
    whole = pipe.decoder.decode_all(torch.cat([init, lat], 2))
    assert torch.equal(frames, whole[-frames.shape[0]:])
    img = pipe.open("a red fox", image=clip[0])
    assert img.chunk == 1
    with pytest.raises(InputError, match="not a whole number of chunks"):
        pipe.open("a red fox", video=clip[:-1])
    with pytest.raises(InputError, match="not both"):
        pipe.open("a red fox", video=clip, image=clip[0])
    with pytest.raises(InputError, match="wrong size"):
        pipe.open("a red fox", video=clip[:, :32])


@pytest.mark.slow           # two rank processes: about 90 s of wall time on a loaded 2-core machine
def test_a_switch_under_sequence_parallelism_equals_one_process(tmp_path):
    """2 gloo ranks (``--sp 2``): the same videos on both ranks, within tolerance of one process
    (eager and whole-chunk graphs in float32, an int8 cache in bfloat16); the switch lands after
    the ring wrapped."""
    from test_parallel import launch
    from graphrt.tolerance import max_rel_err, tolerance

    codes, errs, _ = launch(tmp_path, "interactive", timeout=480.0)
    assert codes == [0, 0], "\n".join(e[-3000:] for e in errs)
    videos = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in ("float32.eager", "float32.chunk", "bfloat16.eager+int8"):
        assert torch.equal(videos[0][key], videos[1][key]), key
        dtype, mode = key.split(".")
        single = videos[0][f"{dtype}.{mode if mode != 'chunk' else 'eager'}+single"]
        assert max_rel_err(videos[0][key], single) <= tolerance(getattr(torch, dtype)), key
