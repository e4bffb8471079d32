"""The tiny TAEHV-compatible decoder: upstream weight files, upstream's decode, streaming, capture."""
import pytest
import torch
import torch.nn.functional as F

from graphrt.capture import check as check_host_reads
from graphrt.errors import CheckpointError, ConfigError, InputError
from graphrt.pipeline import TinyDecoder
from graphrt.pipeline.taehv import load_tiny_decoder
from graphrt.tolerance import max_rel_err, tolerance
from taehv_files import random_taew2_1, taew2_1_shapes, write_taew2_1

# upstream's examples/test_latents_wan.pth: one Wan 2.1 video's DiT latents, bf16, diffusers' layout
# [N, C, T, h, w] = [1, 16, 16, 40, 64] (16 latent frames -> 61 frames of 320x512); its per-channel
# mean and std, measured on the file
WAN_LATENTS_SHAPE = (1, 16, 16, 40, 64)
WAN_LATENTS_MEAN = (-0.365, 0.104, 0.098, 0.233, -0.377, 0.073, 0.193, -0.22, -0.129, -0.63, -0.238, 0.785,
                    0.276, -0.295, 0.517, 0.422)
WAN_LATENTS_STD = (0.741, 1.004, 0.78, 0.794, 0.809, 0.998, 0.694, 0.606, 0.87, 0.886, 0.638, 1.096, 0.843,
                   0.729, 1.2, 0.974)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("taehv") / "taew2_1.pth"
    write_taew2_1(path)
    return path


@pytest.fixture(scope="module")
def dec(weights):
    return TinyDecoder.from_file(weights)


def _latents(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def upstream_parallel_decode(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """Upstream's ``decode_video(parallel=True)`` for taew2_1, written from its description over the
    raw state dict: every layer over all N*T frames at once; a MemBlock is
    ``relu(conv(relu(conv(relu(conv(cat[x, past]))))) + x)`` with ``past`` its input shifted one
    frame in time (zeros first); a TGrow's 1x1 conv output reshaped from channels into time; frames
    clamped to [0, 1] and the first 3 trimmed."""
    def conv(x, i, pad=1):
        return F.conv2d(x, sd[f"decoder.{i}.weight"], sd.get(f"decoder.{i}.bias"), padding=pad)

    n = x.shape[0]
    x = F.relu(conv(torch.tanh(x.flatten(0, 1) / 3) * 3, 1))
    for base in (3, 9, 15):
        for m in range(base, base + 3):
            t = x.shape[0] // n
            past = F.pad(x.view(n, t, *x.shape[1:]), (0, 0, 0, 0, 0, 0, 1, 0))[:, :t].reshape(x.shape)
            h = torch.cat([x, past], 1)
            for j in (0, 2, 4):
                h = F.conv2d(h, sd[f"decoder.{m}.conv.{j}.weight"], sd[f"decoder.{m}.conv.{j}.bias"], padding=1)
                h = F.relu(h) if j < 4 else h
            x = F.relu(h + x)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        c = x.shape[1]
        x = F.conv2d(x, sd[f"decoder.{base + 4}.conv.weight"]).reshape(-1, c, *x.shape[2:])
        x = conv(x, base + 5)
    x = conv(F.relu(x), 22)
    return x.view(n, -1, *x.shape[1:]).clamp(0, 1)[:, 3:]


# -- weight files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loads_upstream_files(tmp_path, suffix):
    """Both upstream formats load through from_file: every decoder tensor as written, the encoder's
    keys skipped; a TGrow stored wider keeps its last rows, as upstream's loader does."""
    sd = write_taew2_1(tmp_path / f"taew2_1{suffix}")
    dec = TinyDecoder.from_file(tmp_path / f"taew2_1{suffix}", device="cpu", dtype=torch.bfloat16)
    own = dec.state_dict()
    assert set(own) == {k for k in sd if k.startswith("decoder.")} and any(k.startswith("encoder.") for k in sd)
    assert all(torch.equal(own[k], sd[k].bfloat16()) for k in own) and not dec.training
    wide = write_taew2_1(tmp_path / f"wide{suffix}", tgrow_first_stride=2)
    w = TinyDecoder.from_file(tmp_path / f"wide{suffix}").state_dict()["decoder.7.conv.weight"]
    assert torch.equal(w, wide["decoder.7.conv.weight"][256:])


def test_bad_files_name_the_key(tmp_path):
    sd = random_taew2_1()
    for change, match in [(lambda d: d.pop("decoder.14.weight"), "missing key 'decoder.14.weight'"),
                          (lambda d: d.__setitem__("decoder.3.conv.2.weight", torch.zeros(256, 256, 1, 1)),
                           r"'decoder.3.conv.2.weight' has the wrong shape(.|\n)*\[256, 256, 3, 3\](.|\n)*\[256, 256, 1, 1\]"),
                          (lambda d: d.__setitem__("decoder.99.weight", torch.zeros(1)), "unexpected key 'decoder.99.weight'")]:
        bad = dict(sd)
        change(bad)
        torch.save(bad, tmp_path / "bad.pth")
        with pytest.raises(CheckpointError, match=match):
            TinyDecoder.from_file(tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="no TAEHV weight file(.|\n)*madebyollin/taehv"):
        TinyDecoder.from_file(tmp_path / "nowhere.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        TinyDecoder.from_file(tmp_path / "list.pth")
    assert len(taew2_1_shapes()) == len(sd)


def test_random_weights_need_saying_so():
    with pytest.raises(ConfigError, match="decoder_weights"):
        load_tiny_decoder(None, device="cpu", dtype=torch.float32)
    a, b = (load_tiny_decoder("random", device="cpu", dtype=torch.float32) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# -- the one-shot decode ---------------------------------------------------------------------------
def test_decode_video_equals_upstream_algorithm(dec):
    """Layouts as upstream (NTCHW in, NTCHW in [0, 1] out, 4T - 3 frames), and upstream's
    time-parallel algorithm within fp32 rounding, for a batch of two videos."""
    z = _latents(2, 5, 16, 4, 6)
    out = dec.decode_video(z)
    assert out.shape == (2, 4 * 5 - 3, 3, 32, 48) and out.dtype == torch.float32
    ref = upstream_parallel_decode(dec.state_dict(), z)
    assert max_rel_err(out, ref) <= tolerance(torch.float32)
    assert 0 <= out.min() and out.max() <= 1 and out.std() > 0.05      # frames are not flat
    assert not torch.equal(out[0], out[1])
    with pytest.raises(InputError, match="16-channel latents"):
        dec.decode_video(z.transpose(1, 2))
    with pytest.raises(InputError, match="16-channel latents"):
        dec.decode([1, 2], dec.new_state())


def test_input_path_with_upstream_wan_latents(weights):
    """Latents with the shape and per-channel statistics of upstream's test_latents_wan.pth, in the
    DiT's layout: the full size gives upstream's 61 frames of 320x512 (on the meta device, no
    compute); a crop streamed in the pipeline's chunks of 3 (bf16, as the file) equals the one-shot
    decode of the same latents in upstream's layout."""
    meta = TinyDecoder().to("meta")
    assert meta.decode_video(torch.empty(WAN_LATENTS_SHAPE, device="meta").transpose(1, 2)).shape == (1, 61, 3, 320, 512)
    mean = torch.tensor(WAN_LATENTS_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN_LATENTS_STD).view(1, -1, 1, 1, 1)
    z = (mean + std * _latents(*WAN_LATENTS_SHAPE[:3], 5, 8, seed=1)).bfloat16()
    dec16 = TinyDecoder.from_file(weights, dtype=torch.bfloat16)
    state, chunks = dec16.new_state(), []
    for start in range(0, 16, 3):
        chunks.append(dec16.decode(z[:, :, start:start + 3], state))
    streamed = torch.cat(chunks)
    whole = dec16.decode_video(z.transpose(1, 2))
    assert streamed.shape == (61, 40, 64, 3) and streamed.dtype == torch.uint8
    assert torch.equal(streamed, (whole[0].float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1))
    ref = TinyDecoder.from_file(weights).decode_video(z.float().transpose(1, 2))
    assert max_rel_err(whole.float(), ref) <= tolerance(torch.bfloat16) * 4     # 16 conv layers in bf16


# -- streaming -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_equals_one_shot(weights, dtype):
    """Chunks of any size, the MemBlocks' memory kept between them, equal the one-shot decode:
    bit for bit in fp32 (the same kernels, frame by frame), within the tolerance in bf16; frames
    per chunk as the Wan VAE's (4F - 3 for the first chunk, 4F later)."""
    dec = TinyDecoder.from_file(weights, dtype=dtype)
    z = _latents(1, 16, 7, 4, 4, seed=3)
    whole = dec.decode_video(z.transpose(1, 2))[0]
    whole8 = (whole.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert whole8.shape == (1 + 4 * 6, 32, 32, 3)
    for sizes in ([3, 3, 1], [1, 2, 4], [7]):
        state, outs, start = dec.new_state(), [], 0
        for i, n in enumerate(sizes):
            out = dec.decode(z[:, :, start:start + n], state)
            assert len(out) == dec.frames_out(n, first=i == 0) == 4 * n - 3 * (i == 0)
            outs.append(out)
            start += n
        streamed = torch.cat(outs)
        assert max_rel_err(streamed.float(), whole8.float()) <= tolerance(dtype)
        if dtype == torch.float32:
            assert torch.equal(streamed, whole8)
    with pytest.raises(InputError, match="one video's latents"):
        dec.decode(z.expand(2, -1, -1, -1, -1), dec.new_state())


def test_frames_per_chunk_match_the_wan_vae(dec):
    pytest.importorskip("diffusers")
    from graphrt.pipeline import WanVAEDecoder, tiny_wan

    wan = WanVAEDecoder(tiny_wan().vae)
    for n in (1, 2, 3, 4):
        for first in (True, False):
            assert dec.frames_out(n, first) == wan.frames_out(n, first)
    assert dec.space_scale == wan.space_scale


def test_states_never_mix_and_release(dec):
    za, zb = _latents(1, 16, 4, 4, 4, seed=4), _latents(1, 16, 4, 4, 4, seed=5)
    sa, sb, shared = dec.new_state(), dec.new_state(), dec.new_state()
    out_a, out_b, mixed = [], [], []
    for c in range(2):
        chunk = slice(2 * c, 2 * c + 2)
        out_a.append(dec.decode(za[:, :, chunk], sa))
        out_b.append(dec.decode(zb[:, :, chunk], sb))
        mixed.append(dec.decode(za[:, :, chunk], shared))
        dec.decode(zb[:, :, chunk], shared)
    one_a = dec.decode(za, dec.new_state())
    assert torch.equal(torch.cat(out_a), one_a) and torch.equal(torch.cat(out_b), dec.decode(zb, dec.new_state()))
    assert not torch.equal(torch.cat(mixed), one_a)
    dec.release(sa)
    with pytest.raises(InputError, match="was released"):
        dec.decode(za[:, :, :1], sa)


# -- the captured chunk ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_decoder_equals_eager(weights, dtype):
    """A chunk captured over static memories (CPU graph emulation, which freezes host values as a
    CUDA graph does) decodes bit for bit like the eager decode, from a video's first chunk on; a
    chunk of another length runs eagerly on the same memory; a video past the slots runs eagerly;
    a released slot serves the next video, its memory emptied. The step reads nothing on the host."""
    dec = TinyDecoder.from_file(weights, dtype=dtype)
    eager = TinyDecoder.from_file(weights, dtype=dtype)
    state = eager.new_state()
    eager.decode(_latents(1, 16, 2, 4, 4), state)
    assert check_host_reads(eager.decode, _latents(1, 16, 2, 4, 4), state).count == 0
    dec.capture(4, 4, frames=2, videos=1)
    za, zb, zc = (_latents(1, 16, 5, 4, 4, seed=s) for s in (6, 7, 8))
    sa, sb = dec.new_state(), dec.new_state()
    out_a, out_b = [], []
    for chunk in (slice(0, 2), slice(2, 4), slice(4, 5)):
        out_a.append(dec.decode(za[:, :, chunk], sa))
        out_b.append(dec.decode(zb[:, :, chunk], sb))
    assert torch.equal(torch.cat(out_a), eager.decode(za, eager.new_state()))
    assert torch.equal(torch.cat(out_b), eager.decode(zb, eager.new_state()))
    assert (sa.slot, sb.slot, dec.graphs.stats.replays, dec.eager_chunks) == (0, None, 2, 1)
    dec.release(sa)
    sc = dec.new_state()
    assert torch.equal(torch.cat([dec.decode(zc[:, :, i:i + 2], sc) for i in (0, 2)]),
                       eager.decode(zc[:, :, :4], eager.new_state()))
    assert sc.slot == 0 and dec.graphs.stats.replays == 4
    with pytest.raises(InputError, match="already captured"):
        dec.capture(4, 4, frames=2)


# -- in the video pipeline and the command ---------------------------------------------------------
PROMPT = "a red fox runs through the snow"


@pytest.fixture(scope="module")
def parts16():
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from graphrt.pipeline import VideoShape, tiny_wan
    from graphrt.pipeline.tiny import RandomSpec

    return tiny_wan(VideoShape(32, 32, chunk_frames=2, chunks=3, text_len=16),
                    RandomSpec(dit_overrides=(("in_dim", 16), ("out_dim", 16))))


def test_pipeline_with_the_tiny_decoder(parts16, weights):
    """decoder="tiny": the pipeline's frames are the tiny decoder's one-shot decode of the DiT's
    latents, bit for bit, sequential or overlapped, eager or captured; a session suspended and
    resumed mid-video keeps its decoder memory."""
    from graphrt.pipeline import VideoPipeline

    def pipe(**kw):
        return VideoPipeline.from_components(parts16, mode="eager", progress=False, decoder="tiny",
                                             decoder_weights=weights, **kw)

    seq = pipe(overlap=False)
    assert isinstance(seq.decoder, TinyDecoder)
    video = seq(PROMPT, num_chunks=3)
    latents = torch.cat(list(seq.engine.stream(seq.text(PROMPT), 3, seed=0)), dim=2)
    whole = seq.decoder.decode_video(latents.transpose(1, 2))[0]
    assert video.shape == (1 + 4 * 5, 32, 32, 3)
    assert torch.equal(video, (whole * 255).round().to(torch.uint8).permute(0, 2, 3, 1))
    s = seq.open(PROMPT, seed=0, num_chunks=3)
    frames = [seq.step([s])[s].result()]
    seq.engine.suspend(s)
    seq.engine.resume(s)
    frames += [seq.step([s])[s].result() for _ in range(2)]
    seq.close(s)
    assert torch.equal(torch.cat(frames), video)
    seq.shutdown()
    ovl = pipe(overlap=True).prewarm(decoder_graphs=True)
    assert torch.equal(ovl(PROMPT, num_chunks=3), video)
    assert ovl.decoder.graphs.stats.replays == 3 and ovl.decoder.eager_chunks == 0
    ovl.shutdown()


def test_pipeline_decoder_errors(parts16, weights):
    from graphrt.pipeline import VideoPipeline, VideoShape, tiny_wan

    with pytest.raises(ConfigError, match="decoder_weights"):
        VideoPipeline.from_components(parts16, mode="eager", progress=False, decoder="tiny")
    with pytest.raises(ConfigError, match="unknown decoder 'vq'"):
        VideoPipeline.from_components(parts16, mode="eager", progress=False, decoder="vq")
    with pytest.raises(ConfigError, match="decoder_weights is for decoder='tiny'"):
        VideoPipeline.from_components(parts16, mode="eager", progress=False, decoder_weights=weights)
    from graphrt.pipeline import Engine, TextEncoder

    engine = Engine(parts16.dit, mode="eager", progress=False)
    text = TextEncoder(parts16.text_encoder, parts16.tokenizer, max_length=parts16.dit.cfg.text_len)
    by_name = VideoPipeline(engine, text, "tiny", decoder_weights=weights)
    assert isinstance(by_name.decoder, TinyDecoder) and by_name.decoder.decoder[1].weight.dtype == torch.float32
    by_name.shutdown()
    with pytest.raises(ConfigError, match="decoder_weights"):
        VideoPipeline(engine, text, "tiny")
    with pytest.raises(ConfigError, match="needs the model's parts"):
        VideoPipeline(engine, text, "wan")
    parts4 = tiny_wan(VideoShape(32, 32, chunk_frames=2, chunks=3, text_len=16))
    with pytest.raises(ConfigError, match="the DiT outputs 4 latent channels but the decoder \\(TinyDecoder\\) takes 16"):
        VideoPipeline.from_components(parts4, mode="eager", progress=False, decoder="tiny", decoder_weights=weights)


def test_generate_command_with_the_tiny_decoder(tmp_path, weights, capsys):
    av = pytest.importorskip("av")
    from graphrt.generate import main

    out = tmp_path / "tiny.mp4"
    base = ["--chunks", "2", "--no-progress", "--decoder", "tiny"]
    assert main(base + ["--decoder-weights", str(weights), "--decoder-graph", "--out", str(out)]) == 0
    with av.open(str(out)) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == 21 and frames[0].shape == (64, 64, 3) and frames[-1].std() > 1
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "b.mp4")]) == 2
    assert "--decoder tiny needs --decoder-weights" in capsys.readouterr().err
    assert main(["--decoder-weights", str(weights), "--out", str(tmp_path / "c.mp4")]) == 2
    assert main(base + ["--decoder-weights", str(tmp_path / "none.pth"), "--out", str(tmp_path / "d.mp4")]) == 2
    assert not any((tmp_path / n).exists() for n in ("b.mp4", "c.mp4", "d.mp4"))


def test_bench_e2e_reports_the_tiny_decoder():
    """The tiny decoder's rows (the default run puts them beside the Wan VAE's: test_video_pipeline)."""
    pytest.importorskip("diffusers")
    from graphrt.bench.e2e import E2EConfig, run, table

    s = run(E2EConfig(preset="tiny", chunks=2, repeats=1, decoder="tiny"))
    assert s["config"]["dit"]["latent_channels"] == 16 and set(s["decoders"]) == {"tiny"} and "decode_ms" not in s
    tiny = s["decoders"]["tiny"]
    assert tiny["decoder"] == "TinyDecoder" and tiny["decoder_host_reads"] == 0 and tiny["overlap_equals_sequential"]
    assert tiny["frames_per_steady_chunk"] == s["config"]["frames_per_steady_chunk"] == 12
    assert 0 < tiny["decode_share"] < 1 and tiny["decode_cpu_ms"] > 0 and tiny["decode_graph_ms"] > 0
    for path in ("sequential", "overlapped", "overlapped+decoder-graph"):
        assert tiny[path]["frames"] == 1 + 4 * 5 and tiny[path]["fps"] > 0
    assert "tiny: decode only" in table(s).columns[0]._cells
    with pytest.raises(ConfigError, match="unknown decoder"):
        run(E2EConfig(preset="tiny", decoder="vq"))
