"""Prompt to mp4: the text encoder and its cache, streaming VAE decode, overlap, weights, video files."""
import json
import threading
import time

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from graphrt.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from graphrt.models.wan import load_checkpoint  # noqa: E402
from graphrt.pipeline import (Engine, TextEncoder, VideoPipeline, VideoShape, WanVAEDecoder, load_wan,  # noqa: E402
                              save_wan, tiny_wan)
from graphrt.tolerance import max_rel_err, tolerance  # noqa: E402

PROMPT = "a red fox runs through the snow"


@pytest.fixture(scope="module")
def parts():
    return tiny_wan(VideoShape(64, 64, chunk_frames=2, chunks=4, text_len=16))


def _pipe(parts, **kw):
    return VideoPipeline.from_components(parts, mode=kw.pop("mode", "eager"), progress=False, **kw)


# -- text ---------------------------------------------------------------------------------------
@torch.no_grad()
def test_text_encoder_matches_wan_pipeline_and_caches_by_text(parts):
    from diffusers import WanPipeline

    text = TextEncoder(parts.text_encoder, parts.tokenizer, max_length=16)
    calls = []
    hook = parts.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        ctx = text(PROMPT)
        again = text("  a red fox   runs through the snow ")     # the same prompt after cleaning
        other = text("a blue bird flies")
    finally:
        hook.remove()
    assert len(calls) == 2 and (text.stats.hits, text.stats.misses) == (1, 2)
    assert again is ctx and not torch.equal(other[:, :4], ctx[:, :4])
    # diffusers' WanPipeline encodes the same way (it pads with zeros to max_length; the DiT does here)
    host = type("Host", (), {"tokenizer": parts.tokenizer, "text_encoder": parts.text_encoder})()
    want = WanPipeline._get_t5_prompt_embeds(host, PROMPT, max_sequence_length=16, device=torch.device("cpu"),
                                             dtype=torch.float32)
    n = ctx.shape[1]
    assert 1 < n < 16 and torch.equal(ctx, want[:, :n]) and not want[:, n:].any()
    with pytest.raises(InputError, match="a prompt is a str"):
        text(["a", "b"])


def test_repeated_prompt_skips_encoder_and_projection(parts):
    pipe = _pipe(parts, max_sessions=2)
    a = pipe.open(PROMPT, seed=1)
    b = pipe.open(PROMPT + " ", seed=2)
    assert (pipe.text.stats.misses, pipe.text.stats.hits) == (1, 1)
    assert (pipe.engine.stats.prompt_misses, pipe.engine.stats.prompt_hits) == (1, 1)
    assert pipe.decoder_state(a) is not pipe.decoder_state(b)
    pipe.close(a)
    pipe.close(b)
    pipe.shutdown()


# -- streaming decode ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_decode_equals_one_shot(parts, dtype):
    """Chunks of any size, the feature cache kept between them, equal diffusers' one-shot decode:
    fp32 within 1e-5 relative (bit-identical here: the same kernels run), bf16 within 3e-2."""
    vae = parts.vae if dtype == torch.float32 else tiny_wan(dtype=dtype).vae
    dec = WanVAEDecoder(vae)
    z = torch.randn(1, 4, 7, 8, 8, generator=torch.Generator().manual_seed(3))
    whole = dec.decode_all(z)
    assert whole.shape == (1 + 4 * 6, 64, 64, 3) and whole.dtype == torch.uint8
    for sizes in ([3, 3, 1], [1, 2, 4]):
        state, parts_out, start = dec.new_state(), [], 0
        for i, n in enumerate(sizes):
            out = dec.decode(z[:, :, start:start + n], state)
            assert len(out) == dec.frames_out(n, first=i == 0)
            parts_out.append(out)
            start += n
        streamed = torch.cat(parts_out)
        assert max_rel_err(streamed.float(), whole.float()) <= tolerance(dtype) * 255 / whole.float().abs().max()
        if dtype == torch.float32:
            assert torch.equal(streamed, whole)
    assert whole.float().std() > 1                          # frames are not constant
    with pytest.raises(InputError, match="one video's latents"):
        dec.decode(z.expand(2, -1, -1, -1, -1), dec.new_state())


def test_decoder_states_never_mix(parts):
    """Two videos decoded interleaved, chunk by chunk, each with its own state, equal each alone;
    one state shared by both does not."""
    dec = WanVAEDecoder(parts.vae)
    g = torch.Generator().manual_seed(4)
    za, zb = torch.randn(1, 4, 4, 8, 8, generator=g), torch.randn(1, 4, 4, 8, 8, generator=g)
    sa, sb, shared = dec.new_state(), dec.new_state(), dec.new_state()
    out_a, out_b, mixed = [], [], []
    for c in range(2):
        chunk = slice(2 * c, 2 * c + 2)
        out_a.append(dec.decode(za[:, :, chunk], sa))
        out_b.append(dec.decode(zb[:, :, chunk], sb))
        mixed.append(dec.decode(za[:, :, chunk], shared))
        dec.decode(zb[:, :, chunk], shared)
    assert torch.equal(torch.cat(out_a), dec.decode_all(za)) and torch.equal(torch.cat(out_b), dec.decode_all(zb))
    assert not torch.equal(torch.cat(mixed), dec.decode_all(za))


def test_captured_decoder_equals_eager(parts):
    """The steady latent frame captured over static feature caches (CPU graph emulation, which
    freezes host values as a CUDA graph does) decodes bit for bit like diffusers; a video past the
    slots runs eagerly, counted; a released slot serves the next video."""
    dec = WanVAEDecoder(parts.vae).capture(8, 8, videos=1)
    g = torch.Generator().manual_seed(5)
    za, zb, zc = (torch.randn(1, 4, 5, 8, 8, generator=g) for _ in range(3))
    sa, sb = dec.new_state(), dec.new_state()
    out_a, out_b = [], []
    for chunk in (slice(0, 2), slice(2, 4), slice(4, 5)):
        out_a.append(dec.decode(za[:, :, chunk], sa))
        out_b.append(dec.decode(zb[:, :, chunk], sb))
    assert torch.equal(torch.cat(out_a), dec.decode_all(za)) and torch.equal(torch.cat(out_b), dec.decode_all(zb))
    assert (sa.slot, sb.slot, dec.graphs.stats.replays, dec.eager_frames) == (0, None, 3, 3)
    dec.release(sa)
    sc = dec.new_state()
    assert torch.equal(torch.cat([dec.decode(zc[:, :, :3], sc), dec.decode(zc[:, :, 3:], sc)]), dec.decode_all(zc))
    assert sc.slot == 0 and dec.graphs.stats.replays == 6
    with pytest.raises(InputError, match="was released"):
        dec.decode(za[:, :, :1], sa)
    with pytest.raises(InputError, match="already captured"):
        dec.capture(8, 8)


# -- the pipeline ---------------------------------------------------------------------------------
def test_overlap_equals_sequential_and_streams(parts):
    chunks = {}
    for overlap in (False, True):
        pipe = _pipe(parts, overlap=overlap, max_sessions=2)
        chunks[overlap] = list(pipe.stream(PROMPT, num_chunks=4, seed=7))
        whole = pipe(PROMPT, num_chunks=4, seed=7)
        batch = pipe([PROMPT, "a blue bird"], num_chunks=2, seed=[7, 8])
        pipe.shutdown()
        assert torch.equal(whole, torch.cat(chunks[overlap]))
        assert batch.shape == (2, 1 + 4 * 3, 64, 64, 3)
        assert pipe.engine.sessions == {}                     # every stream closed its sessions
    assert [c.shape for c in chunks[True]] == [(5, 64, 64, 3)] + [(8, 64, 64, 3)] * 3
    for a, b in zip(chunks[False], chunks[True]):
        assert torch.equal(a, b)


def test_overlap_equals_sequential_bf16():
    parts = tiny_wan(VideoShape(64, 64, chunk_frames=2, chunks=3, text_len=16), dtype=torch.bfloat16)
    seq, ovl = (list(_pipe(parts, overlap=o).stream(PROMPT, num_chunks=3, seed=2)) for o in (False, True))
    assert all(torch.equal(a, b) for a, b in zip(seq, ovl)) and len(seq) == 3


@pytest.mark.parametrize("overlap", [False, True])
def test_leaving_a_stream_early_closes_it(parts, overlap):
    pipe = _pipe(parts, overlap=overlap)
    stream = pipe.stream(PROMPT, num_chunks=4, seed=1)
    first = next(stream)
    stream.close()                                   # the producer stops, then the session closes
    assert pipe.engine.sessions == {} and pipe.engine.stats.chunks <= 4
    assert torch.equal(next(pipe.stream(PROMPT, num_chunks=4, seed=1)), first)   # the engine is free again
    pipe.shutdown()


def test_dit_never_waits_for_the_decoder(parts):
    """The decode of chunk 0 is held until the DiT has started chunk 1: the overlapped stream
    finishes (the DiT does not wait for the decoder); a sequential one would deadlock."""
    pipe = _pipe(parts, overlap=True)
    second_chunk = threading.Event()
    steps = []
    step, decode = pipe.engine.step, pipe.decoder.decode

    def counting_step(*a, **kw):
        steps.append(1)
        if len(steps) == 2:
            second_chunk.set()
        return step(*a, **kw)

    def held_decode(latents, state):
        if state.frames == 0 and not second_chunk.wait(timeout=30):
            raise TimeoutError("the DiT waited for the decoder")
        return decode(latents, state)

    pipe.engine.step, pipe.decoder.decode = counting_step, held_decode
    out = list(pipe.stream(PROMPT, num_chunks=3, seed=1))
    pipe.shutdown()
    assert len(out) == 3 and len(steps) == 3


def test_batched_sessions_keep_their_own_decoder_state(parts):
    """Two sessions batched in the DiT, the second joining a chunk later: each one's frames are its
    own latents decoded alone from an empty cache."""
    pipe = _pipe(parts, max_sessions=2, overlap=True)
    latents: dict = {}
    step = pipe.engine.step

    def recording_step(*a, **kw):
        out = step(*a, **kw)
        for session, z in out.items():
            latents.setdefault(session, []).append(z)
        return out

    pipe.engine.step = recording_step
    a = pipe.open(PROMPT, seed=1, num_chunks=3)
    frames = {a: [pipe.step()[a].result()]}
    b = pipe.open("a blue bird flies", seed=2, num_chunks=2)
    frames[b] = []
    for _ in range(2):
        futures = pipe.step()
        assert set(futures) == {a, b}                         # one batched DiT step for both
        for session, f in futures.items():
            frames[session].append(f.result())
    dec = WanVAEDecoder(parts.vae)
    for s in (a, b):
        want = dec.decode_all(torch.cat(latents[s], dim=2))
        assert torch.equal(torch.cat(frames[s]), want), s.id
    pipe.close(a)
    pipe.close(b)
    pipe.engine.open(torch.zeros(1, 3, 32), seed=0)            # not through the pipeline: no decoder
    with pytest.raises(InputError, match="no decoder state"):
        pipe.step()
    pipe.engine.reset()
    pipe.shutdown()


@pytest.mark.parametrize("mode", ["forward", "chunk"])
def test_overlap_with_lazy_capture_equals_sequential(parts, mode):
    """A graph mode without prewarm(): each bucket is captured on first use while chunks are being
    decoded. The decoder states live off the Engine's sessions (a capture sees no rebind), no
    decode runs during a capture (on CUDA it would break the capture), and the frames equal the
    sequential eager path's."""
    want = list(_pipe(parts, overlap=False).stream(PROMPT, num_chunks=2, seed=4))
    pipe = _pipe(parts, mode=mode, overlap=True, max_sessions=1)
    graphs, decode, capture = pipe.engine.graphs, pipe.decoder.decode, pipe.engine.graphs._capture
    busy, beside = threading.Event(), []

    def slow_decode(latents, state):
        busy.set()
        try:
            time.sleep(0.2)                      # long enough that the next step's capture would overlap
            return decode(latents, state)
        finally:
            busy.clear()

    def watched_capture(*a, **kw):
        beside.append(busy.is_set())
        out = capture(*a, **kw)
        beside.append(busy.is_set())
        return out

    pipe.decoder.decode, graphs._capture = slow_decode, watched_capture
    got = list(pipe.stream(PROMPT, num_chunks=2, seed=4))
    pipe.shutdown()
    assert graphs.stats.captures == 2 and len(beside) == 4 and not any(beside)   # one KV length per chunk
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(want, got))


def test_step_checks_decoder_states_before_the_dit(parts):
    """A session opened on the Engine directly has no decoder state: step() says so before the DiT
    runs, so no session loses a chunk; the others can still step."""
    pipe = _pipe(parts, max_sessions=2, overlap=False)
    a = pipe.open(PROMPT, seed=1, num_chunks=3)
    b = pipe.engine.open(torch.zeros(1, 3, 32), seed=0)
    for call in (pipe.step, lambda: pipe.step([a, b])):
        with pytest.raises(InputError, match=rf"session\(s\) \[{b.id}\] have no decoder state"):
            call()
    assert (a.chunk, b.chunk, pipe.engine.stats.chunks) == (0, 0, 0)
    with pytest.raises(InputError, match="no decoder state in this pipeline"):
        pipe.decoder_state(b)
    first = pipe.step([a])[a].result()
    assert a.chunk == 1 and torch.equal(first, next(_pipe(parts).stream(PROMPT, num_chunks=3, seed=1)))
    pipe.shutdown()


@pytest.mark.parametrize("overlap", [False, True])
def test_shutdown_frees_decoder_slots_and_is_final(parts, overlap):
    """shutdown() with a video still open gives its captured-decoder slot back (after its queued
    decodes), and every later use raises a clear error instead of running half a pipeline."""
    pipe = _pipe(parts, overlap=overlap).prewarm(decoder_graphs=True)
    dec = pipe.decoder
    s = pipe.open(PROMPT, seed=1, num_chunks=3)
    futures = [pipe.step()[s] for _ in range(2)]              # the 3rd latent frame enters the slot
    state = pipe.decoder_state(s)
    pipe.shutdown()
    assert all(f.done() for f in futures) and dec.graphs.stats.replays == 2
    assert state.slot is None and dec._free == [0] and pipe.engine.sessions == {}
    for where, call in (("open", lambda: pipe.open(PROMPT)), ("step", pipe.step),
                        ("open", lambda: next(pipe.stream(PROMPT, num_chunks=1))),
                        ("prewarm", pipe.prewarm)):
        with pytest.raises(InputError, match=rf"{where}\(\): the pipeline was shut down"):
            call()
    with pytest.raises(InputError, match="decode queue is closed"):
        pipe.queue.submit(torch.zeros(1, 4, 1, 8, 8), dec.new_state())
    pipe.shutdown()                                           # again: nothing to do


def test_pipeline_rejects_mismatched_parts(parts):
    engine = Engine(parts.dit, mode="eager", progress=False)
    other = tiny_wan(VideoShape(64, 64, 2, 4, 16), seed=1)
    other.text_encoder.config.d_model = 48
    with pytest.raises(ConfigError, match="text encoder gives 48"):
        VideoPipeline(engine, TextEncoder(other.text_encoder, other.tokenizer), WanVAEDecoder(parts.vae))
    pipe = _pipe(parts)
    with pytest.raises(InputError, match="num_chunks"):
        next(pipe.stream(PROMPT, num_chunks=0))
    with pytest.raises(InputError, match="one seed per prompt"):
        next(pipe.stream([PROMPT, PROMPT], num_chunks=1, seed=[1]))


# -- weights --------------------------------------------------------------------------------------
def test_folder_round_trip_and_causal_checkpoints(parts, tmp_path):
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    folder = save_wan(parts, tmp_path / "wan")
    shape = VideoShape(64, 64, chunk_frames=2, chunks=4, text_len=16)
    loaded = load_wan(folder, shape=shape, dtype=torch.float32)
    for mine, theirs in ((parts.dit, loaded.dit), (parts.vae, loaded.vae), (parts.text_encoder, loaded.text_encoder)):
        sd = theirs.state_dict()
        assert all(torch.equal(v, sd[k]) for k, v in mine.state_dict().items())
    assert loaded.dit.cfg == parts.dit.cfg
    # diffusers reads the transformer folder as its own (from_pretrained would need accelerate here)
    config = {k: v for k, v in json.loads((folder / "transformer" / "config.json").read_text()).items()
              if not k.startswith("_")}
    WanTransformer3DModel(**config).load_state_dict(
        load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors")), strict=True)
    a = _pipe(parts)(PROMPT, num_chunks=2, seed=3)
    assert torch.equal(_pipe(loaded)(PROMPT, num_chunks=2, seed=3), a)

    # a causal project's training checkpoint: generator / generator_ema, "model." prefix, .pt
    ema = tiny_wan(shape, seed=5).dit
    nested = {"generator": {"model." + k: v for k, v in parts.dit.state_dict().items()},
              "generator_ema": {"model." + k: v for k, v in ema.state_dict().items()}, "step": 1000}
    torch.save(nested, tmp_path / "causal.pt")
    got = load_wan(folder, tmp_path / "causal.pt", shape=shape, dtype=torch.float32).dit.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in ema.state_dict().items())            # EMA first
    got = load_wan(folder, tmp_path / "causal.pt", shape=shape, dtype=torch.float32,
                   checkpoint_key="generator").dit.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in parts.dit.state_dict().items())
    with pytest.raises(CheckpointError, match="no state dict under 'critic'"):
        load_checkpoint(loaded.dit, tmp_path / "causal.pt", key="critic")
    broken = dict(nested["generator_ema"])
    broken.pop("model.blocks.1.ffn.0.weight")
    broken["model.head.head.weight"] = torch.zeros(3, 3)
    torch.save({"generator_ema": broken}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\).*blocks\.1\.ffn\.0\.weight(.|\n)*head\.head"):
        load_wan(folder, tmp_path / "broken.pt", shape=shape, dtype=torch.float32)
    (tmp_path / "novae").mkdir()
    with pytest.raises(CheckpointError, match="no transformer/, vae/, text_encoder/, tokenizer/"):
        load_wan(tmp_path / "novae")
    with pytest.raises(ConfigError, match="multiple of the VAE's 8x"):
        load_wan(folder, shape=VideoShape(60, 64, 2, 4, 16))


# -- video files ----------------------------------------------------------------------------------
def test_save_video_writes_a_playable_mp4(tmp_path):
    av = pytest.importorskip("av")
    from graphrt.pipeline import VideoWriter, save_video

    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (1, 48, 64, 3), generator=g, dtype=torch.uint8)
    frames = torch.cat([base.roll(4 * i, dims=2) for i in range(17)])        # a moving pattern
    path = save_video(frames, tmp_path / "a.mp4", fps=16)
    with av.open(path) as f:
        got = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
        assert f.streams.video[0].average_rate == 16
    assert len(got) == 17 and got[0].shape == (48, 64, 3)
    assert got[0].std() > 10 and abs(got[0].astype(float) - got[5].astype(float)).mean() > 10
    with VideoWriter(tmp_path / "b.mp4", fps=16) as w:                        # streamed, chunk by chunk
        w.write(frames[:5])
        w.write(frames[5:].numpy())
    with av.open(str(tmp_path / "b.mp4")) as f:
        assert sum(1 for _ in f.decode(video=0)) == 17
    with pytest.raises(InputError, match="uint8"):
        save_video(frames.float(), tmp_path / "c.mp4")
    with pytest.raises(InputError, match="even frame size"):
        save_video(frames[:, :47], tmp_path / "d.mp4")
    with pytest.raises(InputError, match="same frame size"), VideoWriter(tmp_path / "e.mp4") as w:
        w.write(frames[:2])
        w.write(frames[:2, :32])


# -- the commands ---------------------------------------------------------------------------------
def test_generate_command_writes_an_mp4(tmp_path):
    """The README's command on the built-in tiny model (a fresh process), then a saved folder."""
    av = pytest.importorskip("av")
    import subprocess
    import sys

    from graphrt.generate import main

    out = tmp_path / "tiny.mp4"
    proc = subprocess.run([sys.executable, "-m", "graphrt.generate", "--prompt", PROMPT, "--chunks", "2",
                           "--out", str(out), "--threads", "1", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}: 21 frames of 64x64" in " ".join(proc.stderr.split())
    with av.open(str(out)) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == 21 and frames[0].shape == (64, 64, 3) and frames[-1].std() > 1

    folder = save_wan(tiny_wan(VideoShape(64, 64, 3, 2, 16)), tmp_path / "wan")
    args = ["--model", str(folder), "--height", "64", "--width", "64", "--chunks", "2", "--no-progress",
            "--no-overlap"]
    assert main(args + ["--decoder-graph", "--out", str(tmp_path / "b.mp4")]) == 0
    with av.open(str(tmp_path / "b.mp4")) as f:
        assert sum(1 for _ in f.decode(video=0)) == 21
    assert main(args[2:] + ["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c.mp4")]) == 2
    assert main(args + ["--height", "60", "--out", str(tmp_path / "d.mp4")]) == 2
    assert main(["--chunks", "0", "--out", str(tmp_path / "e.mp4")]) == 2
    assert not (tmp_path / "c.mp4").exists() and not (tmp_path / "d.mp4").exists()


def test_bench_e2e_tiny():
    from graphrt.bench.e2e import E2EConfig, run

    s = run(E2EConfig(preset="tiny", chunks=2, repeats=1))
    assert s["overlap_equals_sequential"] and s["decoder_host_reads"] == 0
    assert set(s["decoders"]) == {"wan", "tiny"} and s["decode_ms"] == s["decoders"]["wan"]["decode_ms"]
    assert s["dit_ms"] > 0 and s["decode_ms"] > 0 and s["decode_graph_ms"] > 0 and 0 < s["decode_share"] < 1
    for path in ("sequential", "overlapped", "overlapped+decoder-graph"):
        r = s[path]
        assert r["frames"] == 1 + 4 * 5 and r["fps"] > 0 and r["chunk_ms_steady"] > 0
    with pytest.raises(ConfigError, match=">= 2 chunks"):
        run(E2EConfig(preset="tiny", chunks=1))
