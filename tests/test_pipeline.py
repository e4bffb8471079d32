"""Chunked generation, the persistent engine and multi-session batching (CPU)."""
import pytest
import torch

from conftest import rel_err
from graphrt.errors import CacheError, InputError
from graphrt.models.wan import CausalWan, ReferenceWan
from graphrt.noise import gaussian
from graphrt.pipeline import Engine, FlowMatchSchedule, reference_stream


@pytest.fixture
def ctx(cfg):
    return torch.randn(4, cfg.text_len, cfg.text_dim)


def test_schedule_warps_like_the_training_scheduler():
    s = FlowMatchSchedule()
    assert s.timesteps == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=1e-3)
    assert FlowMatchSchedule(shift=1.0).sigmas == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_noise_is_seeded_per_row_and_batch_independent():
    shape = (4, 3, 8, 8)
    both = gaussian(torch.tensor([11, 12]), torch.tensor([0, 6]), 2, shape)
    solo = gaussian(torch.tensor([12]), torch.tensor([6]), 2, shape)
    assert torch.equal(both[1:], solo)
    assert not torch.equal(gaussian(torch.tensor([11]), torch.tensor([3]), 2, shape), both[:1])
    z = gaussian(torch.arange(4), torch.zeros(4, dtype=torch.long), 0, (50_000,))
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02


def test_noise_streams_never_coincide():
    """Neighbouring seeds, swapped (seed, position) and the steps of one chunk all differ."""
    shape = (4, 3, 8, 8)
    draws = {}
    for seed in range(4):
        for pos in (0, 3, 6):
            for step in range(5):
                draws[(seed, pos, step)] = gaussian(torch.tensor([seed]), torch.tensor([pos]), step, shape)
    flat = torch.stack([d.flatten() for d in draws.values()])
    corr = torch.corrcoef(flat).abs() - torch.eye(len(draws))
    assert corr.max() < 0.25                      # no two streams equal or strongly related
    assert not torch.equal(gaussian(torch.tensor([3]), torch.tensor([5]), 0, shape),
                           gaussian(torch.tensor([5]), torch.tensor([3]), 0, shape))


@pytest.mark.parametrize("window", [None, (9, 3)])
@torch.no_grad()
def test_seven_chunks_all_modes_agree(models, cfg, ctx, window):
    """reference ~ eager (fp32 <= 1e-5); eager == forward graphs == chunk graph, bit for bit."""
    ref, causal = models
    chunks = 9 if window else 7                  # the rolling cache runs past max_frames... of its window
    if window:
        ref = ReferenceWan(cfg, local_attn_size=window[0], sink_size=window[1]).eval()
        ref.load_state_dict(causal.state_dict())
    want = torch.cat(list(reference_stream(ref, ctx[:1], chunks, seed=5)), dim=2)
    videos = {}
    for mode in ("eager", "forward", "chunk"):
        engine = Engine(causal, mode=mode, window=window, progress=False)
        videos[mode] = engine.generate(ctx[:1], chunks, seed=5)
        assert videos[mode].shape == (1, cfg.out_dim, chunks * cfg.chunk_frames, cfg.height, cfg.width)
    assert rel_err(videos["eager"], want) <= 1e-5
    assert torch.equal(videos["forward"], videos["eager"])
    assert torch.equal(videos["chunk"], videos["eager"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@torch.no_grad()
def test_engine_in_16_bit_all_modes_agree(cfg, dtype):
    """What a GPU user runs: a 16-bit model, three chunks, every Engine mode. Graphs equal eager
    bit for bit; eager equals the upstream-style reference within the dtype's tolerance."""
    from graphrt.tolerance import tolerance

    cfg = cfg.replace(max_frames=3 * cfg.chunk_frames)       # three KV buckets: few captures
    ref = ReferenceWan(cfg).to(dtype).eval()
    causal = CausalWan(cfg, attention="sdpa").to(dtype).eval()
    causal.load_state_dict(ref.state_dict())
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim, dtype=dtype)
    want = torch.cat(list(reference_stream(ref, ctx, 3, seed=[5, 6])), dim=2)
    videos = {mode: Engine(causal, max_sessions=2, mode=mode, progress=False).generate(ctx, 3, seed=[5, 6])
              for mode in ("eager", "forward", "chunk")}
    assert videos["eager"].dtype == dtype and videos["eager"].shape == want.shape
    assert rel_err(videos["eager"].float(), want.float()) <= tolerance(dtype)
    assert torch.equal(videos["forward"], videos["eager"]) and torch.equal(videos["chunk"], videos["eager"])


@torch.no_grad()
def test_four_sessions_join_and_leave_each_equal_to_solo(models, cfg, ctx):
    _, causal = models
    seeds = [3, 4, 5, 6]
    lengths = [5, 3, 4, 2]
    solo_engine = Engine(causal, mode="eager", progress=False)
    solo = [solo_engine.generate(ctx[i:i + 1], lengths[i], seed=seeds[i]) for i in range(4)]

    engine = Engine(causal, max_sessions=4, batch_sizes=(1, 2, 4), mode="forward", progress=False)
    joins = {0: [0], 1: [1, 2], 3: [3]}         # step -> sessions that join before it
    sessions, chunks = {}, {i: [] for i in range(4)}
    for step in range(7):
        for i in joins.get(step, []):
            sessions[i] = engine.open(ctx[i:i + 1], seed=seeds[i], num_chunks=lengths[i])
        out = engine.step()
        for i, s in list(sessions.items()):
            if s in out:
                chunks[i].append(out[s])
            if s.done:
                engine.close(s)
                del sessions[i]
    for i in range(4):
        assert rel_err(torch.cat(chunks[i], dim=2), solo[i]) <= 1e-5, i
    assert engine.stats.chunks == sum(lengths)
    assert engine.stats.rows_padded > 0            # a 3-session step ran in the batch-4 bucket


@torch.no_grad()
def test_engine_serves_videos_back_to_back_with_one_capture(models, cfg, ctx):
    _, causal = models
    engine = Engine(causal, mode="chunk", progress=False)
    engine.graphs.buckets.static_args["kv_frames"] = (3, 6, 9)   # keep the test short
    engine.kv_choices = (3, 6, 9)
    engine.prewarm()
    captures = engine.graphs.stats.captures
    first = engine.generate(ctx[:1], 3, seed=1, prompt="a red fox")
    second = engine.generate(ctx[1:2], 3, seed=2, prompt="a boat")
    third = engine.generate(ctx[:1], 3, seed=1, prompt="a red fox")
    assert engine.graphs.stats.captures == captures == 3
    assert engine.stats.prompt_hits == 1 and engine.stats.prompt_misses == 2
    assert torch.equal(first, third) and not torch.equal(first, second)
    assert engine.graphs.stats.replays == 9 and not engine.sessions


@torch.no_grad()
def test_streaming_yields_each_chunk(models, cfg, ctx):
    _, causal = models
    engine = Engine(causal, max_sessions=2, batch_sizes=(2,), mode="eager", progress=False)
    parts = []
    for chunk in engine.stream(ctx[:2], 3, seed=[1, 2]):
        parts.append(chunk)
        assert chunk.shape == (2, cfg.out_dim, cfg.chunk_frames, cfg.height, cfg.width)
        assert len(engine.sessions) == 2
    assert not engine.sessions
    assert torch.equal(torch.cat(parts, 2)[1:], engine.generate(ctx[1:2], 3, seed=2))


@torch.no_grad()
def test_batched_chunk_graph_needs_fewer_host_dispatches(models, cfg, ctx):
    """3 sessions in one batch: one replay per chunk for all three, vs three solo replays."""
    _, causal = models
    engine = Engine(causal, max_sessions=3, batch_sizes=(1, 4), mode="chunk", progress=False)
    sessions = [engine.open(ctx[i:i + 1], seed=i, num_chunks=2) for i in range(3)]
    while not all(s.done for s in sessions):
        engine.step()
    batched = engine.graphs.stats.replays
    engine.reset()
    for i in range(3):
        engine.generate(ctx[i:i + 1], 2, seed=i)
    solo = engine.graphs.stats.replays - batched
    assert batched == 2 and solo == 6          # per session-chunk: 1/3 of a replay batched, 1 replay solo
    assert engine.stats.chunks == 12 and engine.stats.dispatches == 8


@torch.no_grad()
def test_errors_leave_other_sessions_undisturbed(models, cfg, ctx):
    _, causal = models
    engine = Engine(causal, max_sessions=2, batch_sizes=(1, 2), mode="eager", progress=False)
    a = engine.open(ctx[:1], seed=1)
    b = engine.open(ctx[1:2], seed=2)
    with pytest.raises(CacheError, match="all 2 slabs are in use"):
        engine.open(ctx[2:3], seed=3)
    with pytest.raises(InputError, match="text context has the wrong shape"):
        engine.open(torch.randn(1, cfg.text_len, cfg.text_dim + 1))
    with pytest.raises(CacheError, match="does not fit max_frames"):
        engine.open(ctx[:1], num_chunks=8)
    out = []
    for _ in range(7):
        out.append(engine.step([a])[a])
    with pytest.raises(CacheError, match=rf"session\(s\) \[{a.id}\] at the end of the slab"):
        engine.step([a, b])
    assert b.chunk == 0                              # nothing ran for b
    engine.close(a)
    solo = Engine(causal, mode="eager", progress=False)
    assert torch.equal(torch.cat(out, 2), solo.generate(ctx[:1], 7, seed=1))
    got_b = engine.step([b])[b]
    assert rel_err(got_b, solo.generate(ctx[1:2], 1, seed=2)) <= 1e-5


@torch.no_grad()
def test_per_session_conditioning(cfg, ctx):
    cfg = cfg.replace(cond_dim=6)
    causal = CausalWan(cfg, attention="sdpa").eval()
    engine = Engine(causal, max_sessions=2, batch_sizes=(2,), mode="forward", progress=False)
    poses = torch.randn(2, cfg.chunk_frames, 6)
    a, b = engine.open(ctx[:1], seed=1), engine.open(ctx[1:2], seed=2)
    both = engine.step(cond={a: poses[0], b: poses[1]})
    engine.reset()
    solo = engine.open(ctx[:1], seed=1)
    alone = engine.step(cond={solo: poses[0]})
    assert rel_err(both[a], alone[solo]) <= 1e-5
    with pytest.raises(InputError, match="needs cond"):
        engine.step()


@torch.no_grad()
def test_prompt_keys_are_per_context(models, cfg, ctx):
    _, causal = models
    engine = Engine(causal, max_sessions=2, batch_sizes=(2,), mode="eager", progress=False)
    with pytest.raises(InputError, match="one prompt key per context row"):
        engine.generate(ctx[:2], 1, prompt="same")
    engine.generate(ctx[:1], 1, prompt="a fox")
    with pytest.raises(InputError, match="cached for a different text context"):
        engine.open(ctx[1:2], prompt="a fox")
    s = engine.open(prompt="a fox", seed=0)                 # the key alone reuses the cached context
    assert engine.stats.prompt_hits == 1
    engine.close(s)
    with pytest.raises(InputError, match=r"context must be \[B, L, text_dim\]"):
        engine.generate(ctx[0], 1)


def test_window_must_hold_a_chunk(models, cfg):
    _, causal = models
    with pytest.raises(CacheError, match="must hold a whole chunk"):
        Engine(causal, window=(4, 2))


@pytest.mark.parametrize("window", [(8, 1), (10, 4)])
@torch.no_grad()
def test_rolling_windows_not_a_multiple_of_the_chunk(models, cfg, ctx, window):
    _, causal = models
    ref = ReferenceWan(cfg, local_attn_size=window[0], sink_size=window[1]).eval()
    ref.load_state_dict(causal.state_dict())
    want = torch.cat(list(reference_stream(ref, ctx[:1], 6, seed=2)), dim=2)
    got = Engine(causal, mode="eager", window=window, progress=False).generate(ctx[:1], 6, seed=2)
    assert rel_err(got, want) <= 1e-5


@torch.no_grad()
def test_a_failing_step_runs_nothing(models, cfg, ctx):
    """Two groups (batch 1): the second group's error must not advance the first."""
    _, causal = models
    engine = Engine(causal, max_sessions=2, batch_sizes=(1,), mode="eager", progress=False)
    a, b = engine.open(ctx[:1], seed=1), engine.open(ctx[1:2], seed=2)
    for _ in range(7):
        engine.step([b])
    with pytest.raises(CacheError, match=rf"\[{b.id}\] at the end of the slab"):
        engine.step([a, b])
    assert a.chunk == 0 and b.chunk == 7


def _in_place_equals_gather(cfg, dtype, window, device, **engine_kw):
    cfg = cfg.replace(max_frames=3 * cfg.chunk_frames)
    causal = CausalWan(cfg, attention="sdpa").to(device, dtype).eval()
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, dtype=dtype, device=device)
    videos = {}
    for mode in ("eager", "chunk"):
        for in_place in (True, False):
            engine = Engine(causal, mode=mode, window=window, progress=False, **engine_kw)
            assert engine.cache.read_in_place            # one slab: on by default
            engine.cache.read_in_place = in_place
            videos[mode, in_place] = engine.generate(ctx, 4 if window else 3, seed=3)
    step = engine.cache.step(1, cfg.chunk_frames, cfg.frame_tokens, 2 * cfg.chunk_frames, True)
    assert not step.in_place and engine.cache.read(0, step)[0].untyped_storage().data_ptr() != \
        engine.cache.k[0].untyped_storage().data_ptr()
    engine.cache.read_in_place = True
    step = engine.cache.step(1, cfg.chunk_frames, cfg.frame_tokens, 2 * cfg.chunk_frames, True)
    k, _ = engine.cache.read(0, step)
    assert step.in_place and k.data_ptr() == engine.cache.k[0].data_ptr() and k.shape[1] == step.kv_tokens
    for (mode, in_place), video in videos.items():
        assert torch.equal(video, videos["eager", False]), (mode, in_place)
    assert not Engine(causal, max_sessions=2, mode="eager", progress=False).cache.read_in_place


@pytest.mark.parametrize("dtype,window", [(torch.float32, None), (torch.bfloat16, (9, 3))],
                         ids=["static-fp32", "rolling-bf16"])
@torch.no_grad()
def test_one_slab_attends_in_place_bit_for_bit(cfg, dtype, window):
    """An engine of one session slab reads each layer's K/V as a view of the slab (no gather copy);
    the video equals the gathering engine's bit for bit, eager and captured whole chunks alike."""
    _in_place_equals_gather(cfg, dtype, window, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,window", [(torch.float32, None), (torch.bfloat16, (9, 3))],
                         ids=["static-fp32", "rolling-bf16"])
@torch.no_grad()
def test_one_slab_attends_in_place_bit_for_bit_on_cuda(cfg, dtype, window):
    """The same on CUDA graphs (the model's own kernels: compiled graphs are not bit-comparable)."""
    _in_place_equals_gather(cfg, dtype, window, "cuda", inductor=False)
