"""The overlapped prompt-to-frames path on CUDA: graph replays on the main stream, decodes on a
second stream, no host sync between them. Uses the tiny Wan VAE when diffusers is importable and
a causal stand-in decoder of the same shape otherwise."""
import time

import pytest
import torch

from graphrt.models.wan import CausalWan, WanConfig
from graphrt.pipeline import Engine, TextEncoder, VideoPipeline
from graphrt.pipeline.vae import DecoderState, to_uint8

pytestmark = pytest.mark.cuda
PROMPT = "a red fox runs through the snow"


class CausalStandIn:
    """A causal video decoder shaped like Wan's VAE (x4 in time after the first frame, x8 in space)
    whose cache is the previous latent frame: chunked decode depends on the cache like the VAE's."""

    def __init__(self, z_dim: int, device):
        g = torch.Generator().manual_seed(0)
        self.z_dim = z_dim
        self.proj = torch.randn(3, 2 * z_dim, generator=g).to(device) / z_dim ** 0.5

    def new_state(self) -> DecoderState:
        return DecoderState([None])

    @torch.no_grad()
    def decode(self, latents, state):
        z = latents.float()
        prev = state.feat_cache[0] if state.feat_cache[0] is not None else torch.zeros_like(z[:, :, :1])
        pairs = torch.cat([z, torch.cat([prev, z[:, :, :-1]], dim=2)], dim=1)       # each frame and the one before
        y = torch.einsum("oc,bcfhw->bofhw", self.proj, pairs).tanh()
        y = y.repeat_interleave(4, dim=2).repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)
        if state.frames == 0:
            y = y[:, :, 3:]
        state.feat_cache[0] = z[:, :, -1:].clone()
        state.frames += z.shape[2]
        return to_uint8(y[0])


def _pipe(overlap: bool, mode: str = "chunk"):
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from graphrt.pipeline.tiny import tiny_text_encoder

    torch.manual_seed(0)
    cfg = WanConfig.preset("tiny", text_len=16)
    dit = CausalWan(cfg).cuda().bfloat16().eval()
    encoder, tokenizer = tiny_text_encoder(cfg.text_dim)
    text = TextEncoder(encoder.cuda(), tokenizer, max_length=cfg.text_len)
    try:
        from graphrt.pipeline import WanVAEDecoder, tiny_wan

        decoder = WanVAEDecoder(tiny_wan(device="cuda", dtype=torch.bfloat16).vae)
    except ImportError:
        decoder = CausalStandIn(cfg.out_dim, "cuda")
    # inductor=False: frames compared bit for bit across pipelines (separately tuned compiles may differ)
    return VideoPipeline(Engine(dit, mode=mode, inductor=False, progress=False), text, decoder, overlap=overlap)


def test_overlap_on_a_second_stream_equals_sequential():
    """Sequential, overlapped, and overlapped with the decoder captured as a CUDA graph (the tiny
    Wan VAE only): the same frames, the decodes of the overlapped paths on one non-default stream."""
    frames, streams = {}, {}
    for overlap in (False, True, "graph"):
        pipe = _pipe(bool(overlap))
        if overlap == "graph" and not hasattr(pipe.decoder, "capture"):
            continue
        pipe.prewarm(decoder_graphs=overlap == "graph")
        decode, seen = pipe.decoder.decode, []

        def on_stream(latents, state, decode=decode, seen=seen):
            seen.append(torch.cuda.current_stream().cuda_stream)
            return decode(latents, state)

        pipe.decoder.decode = on_stream
        frames[overlap] = list(pipe.stream(PROMPT, num_chunks=4, seed=3))
        streams[overlap] = set(seen)
        assert pipe.engine.graphs.stats.replays == 4
        pipe.shutdown()
    default = torch.cuda.default_stream().cuda_stream
    assert streams[False] == {default} and default not in streams[True] and len(streams[True]) == 1
    for overlap in frames:
        assert all(torch.equal(a, b) for a, b in zip(frames[False], frames[overlap])), overlap
    assert [len(f) for f in frames[True]] == [9, 12, 12, 12]


def test_lazy_capture_with_overlap_equals_sequential():
    """No prewarm(): each chunk graph is captured on its first use while earlier chunks decode on
    the second stream. The pipeline drains the decodes before such a step (a CUDA graph capture
    fails beside another thread's allocations and syncs): the frames equal the sequential path's."""
    frames = {}
    for overlap in (False, True):
        pipe = _pipe(overlap)
        frames[overlap] = list(pipe.stream(PROMPT, num_chunks=4, seed=5))
        assert pipe.engine.graphs.stats.captures == 4 and not pipe.engine.graphs.sealed   # a KV length per chunk
        pipe.shutdown()
    assert len(frames[True]) == 4 and all(torch.equal(a, b) for a, b in zip(frames[False], frames[True]))


def test_decode_runs_beside_the_dit_on_the_device():
    """The DiT step and the decode each hold the GPU ~20 ms per chunk: overlapped, a video takes
    about half the sequential time, which it cannot if the host waits for a decode between replays."""
    def sleep_cycles(ms):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(1_000_000)
        end.record()
        end.synchronize()
        return int(1_000_000 * ms / start.elapsed_time(end))

    cycles = sleep_cycles(20)
    walls = {}
    for overlap in (False, True):
        pipe = _pipe(overlap, mode="eager")
        step, decode = pipe.engine.step, pipe.decoder.decode

        def slow_step(*a, step=step, **kw):
            torch.cuda._sleep(cycles)
            return step(*a, **kw)

        def slow_decode(latents, state, decode=decode):
            torch.cuda._sleep(cycles)
            return decode(latents, state)

        pipe.engine.step, pipe.decoder.decode = slow_step, slow_decode
        list(pipe.stream(PROMPT, num_chunks=2, seed=0))          # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        list(pipe.stream(PROMPT, num_chunks=8, seed=0))
        torch.cuda.synchronize()
        walls[overlap] = time.perf_counter() - t0
        pipe.shutdown()
    assert walls[True] < 0.75 * walls[False], walls
