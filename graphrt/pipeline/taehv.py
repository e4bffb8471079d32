"""A tiny streaming video decoder, TAEHV-compatible: Wan 2.1 latents to frames in milliseconds.

TAEHV (madebyollin/taehv, MIT) is a small autoencoder distilled from the Wan VAE; ``taew2_1`` is its
decoder for Wan 2.1 latents (16 channels, 8x space, 4x time). This is the decoder written for
graphrt, loading the upstream weight files as they are (``.pth`` or ``.safetensors``, the same keys).

The decoder is a plain stack of 2D convs over frames. Temporal context comes from ``MemBlock`` s,
each of which also sees its own input one frame earlier (zeros before the first frame), and
temporal upsampling from ``TGrow`` s, which turn one frame into ``stride`` frames by a 1x1 conv
and a reshape of channels into time. So the only state a video carries from chunk to chunk is the
last input frame of each MemBlock: nine tensors, kept on the device in a :class:`DecoderState`.

Every layer runs frame by frame (batch = the videos, never time): a frame's kernels are the same
whatever the chunking, so a video decoded chunk by chunk equals :meth:`TinyDecoder.decode_video`
bit for bit, and a chunk's decode can be captured as one graph over a static memory per video
(:meth:`TinyDecoder.capture`). Frames equal upstream's time-parallel decode within fp32 rounding.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from graphrt.errors import CheckpointError, ConfigError, InputError
from graphrt.pipeline.vae import DecoderState, StaticFeatureCache

LATENT_CHANNELS = 16            # taew2_1: Wan 2.1 latents
_WIDTHS = (256, 128, 64, 64)    # channels of the decoder's stages (upstream's base decoder)


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3)."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """A residual block over the frame and the block's previous input frame (its memory)."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))

    def forward(self, x, past):
        return F.relu(self.conv(torch.cat([x, past], 1)) + x)


class TGrow(nn.Module):
    """One frame -> ``stride`` frames: a 1x1 conv to ``stride`` x the channels, channels into time."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x):
        """``[N, C, H, W]`` -> the ``stride`` frames that follow from it, in order."""
        n, c, h, w = x.shape
        return self.conv(x).view(n, self.stride, c, h, w).unbind(1)


def _uint8_frames(x: torch.Tensor) -> torch.Tensor:
    """Frames ``[N, T, 3, H, W]`` in [0, 1] -> ``[N, T, H, W, 3]`` uint8."""
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2)


class TinyDecoder(nn.Module):
    """The TAEHV decoder for Wan 2.1 latents (``taew2_1``), one-shot and streaming.

    >>> dec = TinyDecoder.from_file("taew2_1.pth", device="cuda", dtype=torch.bfloat16)
    >>> video = dec.decode_video(latents)             # [N, T, 16, h, w] -> [N, 4T-3, 3, 8h, 8w] in [0, 1]
    >>> state = dec.new_state()                       # streaming, as WanVAEDecoder:
    >>> frames = [dec.decode(chunk, state) for chunk in chunks]   # [1, 16, F, h, w] -> [T, 8h, 8w, 3] uint8
    >>> dec.release(state)

    Latents are the DiT's own (the normalized ones: TAEHV has no latent mean/std to undo). The
    first latent frame of a video gives one frame, every later one ``time_scale`` (4) frames, as
    the Wan VAE: upstream decodes 4 frames for each and drops the first 3.
    """

    space_scale = 8
    time_scale = 4

    def __init__(self, latent_channels: int = LATENT_CHANNELS):
        super().__init__()
        self.z_dim = latent_channels
        layers: list[nn.Module] = [Clamp(), _conv(latent_channels, _WIDTHS[0]), nn.ReLU()]
        for i, stride in enumerate((1, 2, 2)):       # taew2_1: no time upsampling in the first stage
            n = _WIDTHS[i]
            layers += [MemBlock(n), MemBlock(n), MemBlock(n), nn.Upsample(scale_factor=2), TGrow(n, stride),
                       _conv(n, _WIDTHS[i + 1], bias=False)]
        layers += [nn.ReLU(), _conv(_WIDTHS[3], 3)]
        self.decoder = nn.Sequential(*layers)       # indices as upstream's TAEHV.decoder: the same keys
        self.frames_to_trim = self.time_scale - 1
        self._memblocks = [i for i, m in enumerate(self.decoder) if isinstance(m, MemBlock)]
        self.graphs = None                           # GraphedModule of one chunk (see capture)

    # -- weights ----------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> "TinyDecoder":
        """Load upstream's ``taew2_1.pth`` or ``taew2_1.safetensors`` (the whole TAEHV: its
        ``encoder.*`` keys are skipped). Every ``decoder.*`` key must be there with upstream's
        shape; the first that is not raises :class:`CheckpointError` naming it."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no TAEHV weight file at {path}",
                                  fix="download taew2_1.pth or safetensors/taew2_1.safetensors from "
                                      "github.com/madebyollin/taehv and pass its path")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path} does not hold a state dict", expected="{key: tensor}",
                                  got=type(sd).__name__)
        dec = cls()
        dec.load_state_dict(dec._check_state_dict(sd, path), strict=True)
        return dec.to(device=device, dtype=dtype).eval()

    def _check_state_dict(self, sd: dict, path: Path) -> dict:
        own = self.state_dict()
        fix = "pass a TAEHV file for Wan 2.1 latents (taew2_1) from github.com/madebyollin/taehv"
        for key in sd:
            if key not in own and not key.startswith("encoder."):
                raise CheckpointError(f"{path}: unexpected key {key!r}", expected="encoder.* or decoder.* keys "
                                      "of TAEHV's layout", got=key, fix=fix)
        out = {}
        for key, want in own.items():
            if key not in sd:
                raise CheckpointError(f"{path}: missing key {key!r}", expected=list(want.shape), got="no such key",
                                      fix=fix)
            got = sd[key]
            i = int(key.split(".")[1])
            if isinstance(self.decoder[i], TGrow) and got.dim() == 4 and got.shape[0] > want.shape[0] \
                    and got.shape[0] % want.shape[0] == 0 and got.shape[1:] == want.shape[1:]:
                got = got[-want.shape[0]:]           # as upstream: a TGrow trained wider keeps its last frame
            if tuple(got.shape) != tuple(want.shape):
                raise CheckpointError(f"{path}: key {key!r} has the wrong shape", expected=list(want.shape),
                                      got=list(got.shape), fix=fix)
            out[key] = got
        return out

    # -- the decode -------------------------------------------------------------------------------
    def _run(self, frames: list[torch.Tensor], memory) -> list[torch.Tensor]:
        """The decoder over ``frames`` (each ``[N, C, h, w]``, in time order), frame by frame;
        ``memory[j]`` is MemBlock j's last input frame (None: zeros), advanced in place."""
        j = 0
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                out = []
                for x in frames:
                    past = memory[j]
                    out.append(layer(x, torch.zeros_like(x) if past is None else past))
                    memory[j] = x
                frames, j = out, j + 1
            elif isinstance(layer, TGrow):
                frames = [y for x in frames for y in layer(x)]
            else:
                frames = [layer(x) for x in frames]
        return frames

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Upstream's ``decode_video``: latents ``[N, T, 16, h, w]`` -> frames
        ``[N, 4T - 3, 3, 8h, 8w]`` in [0, 1] (the first 3 of the 4T decoded frames trimmed)."""
        self._check_latents(latents, "decode_video", f"[N, T, {self.z_dim}, h, w]", 2)
        frames = self._run(list(latents.to(self._dtype()).unbind(1)), [None] * len(self._memblocks))
        return torch.stack(frames, 1).clamp(0, 1)[:, self.frames_to_trim:]

    def _dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    def _check_latents(self, latents, where: str, expected: str, channel_dim: int) -> None:
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5 or latents.shape[channel_dim] != self.z_dim:
            raise InputError(f"TinyDecoder.{where} takes {self.z_dim}-channel latents", expected=expected,
                             got=list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__,
                             fix="taew2_1 decodes Wan 2.1 latents (16 channels)")

    # -- streaming (the decoder protocol of the video pipeline) ----------------------------------
    def new_state(self) -> DecoderState:
        """The state of a video not yet begun (every MemBlock's memory empty: zeros)."""
        return DecoderState([None] * len(self._memblocks))

    def frames_out(self, latent_frames: int, first: bool) -> int:
        """Frames a chunk of ``latent_frames`` decodes to (``first``: the video's first chunk)."""
        return latent_frames * self.time_scale - (self.frames_to_trim if first else 0)

    def _chunk(self, latents: torch.Tensor, memory) -> torch.Tensor:
        """One chunk ``[1, 16, F, h, w]`` -> all its ``4F`` frames ``[4F, 8h, 8w, 3]`` uint8."""
        frames = self._run(list(latents.to(self._dtype()).unbind(2)), memory)
        return _uint8_frames(torch.stack(frames, 1))[0]

    def _steady(self, latents: torch.Tensor, *, slot: int) -> torch.Tensor:
        return self._chunk(latents, self._static[slot])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """One chunk of one video: latents ``[1, 16, F, h, w]`` (the DiT's layout) -> frames
        ``[T, 8h, 8w, 3]`` uint8 on the decoder's device (``T = 4F``, ``4F - 3`` for the first chunk)."""
        self._check_latents(latents, "decode", f"[1, {self.z_dim}, frames, h, w]", 1)
        if latents.shape[0] != 1:
            raise InputError("the decoder takes one video's latents at a time",
                             expected=f"[1, {self.z_dim}, frames, h, w]", got=list(latents.shape),
                             fix="decode each session's chunk with its own DecoderState")
        if state.slot is None and state.feat_cache is None:
            raise InputError("this DecoderState was released: its video is finished",
                             fix="start the next video with new_state()")
        if state.slot is None and len(state.feat_cache) != len(self._memblocks):
            raise InputError("this DecoderState belongs to another decoder",
                             expected=f"{len(self._memblocks)} memory slots", got=len(state.feat_cache),
                             fix="make states with this decoder's new_state()")
        p = self.decoder[1].weight
        latents = latents.to(p.device, p.dtype)
        if state.slot is None and state.frames == 0 and self.graphs is not None:
            self._enter_slot(state, latents)
        if state.slot is None:
            out = self._chunk(latents, state.feat_cache)
        elif tuple(latents.shape) == self._chunk_shape:
            out = self.graphs(latents, slot=state.slot)          # static output: the next replay overwrites it
        else:                                                    # another chunk length: eager, same memory
            out = self._chunk(latents, self._static[state.slot])
            self.eager_chunks += 1
        first = state.frames == 0
        state.frames += latents.shape[2]
        return (out[self.frames_to_trim:] if first else out).clone()

    @torch.no_grad()
    def capture(self, height: int, width: int, *, frames: int, videos: int = 1, backend: str = "auto",
                progress: bool = False) -> "TinyDecoder":
        """Capture the decode of one chunk of ``frames`` latent frames (``height`` x ``width``
        latents) as a graph per video slot, each over a static memory written in place. Up to
        ``videos`` videos at once replay it from their first chunk on; later videos run eagerly.
        Frames equal the eager decode's bit for bit (the same kernels)."""
        from graphrt.replay import Buckets, compile as compile_graphs

        if videos < 1 or frames < 1:
            raise InputError("videos and frames must be >= 1", got={"videos": videos, "frames": frames})
        if self.graphs is not None:
            raise InputError("the decoder is already captured", fix="capture once, before the first decode")
        p = self.decoder[1].weight
        z = torch.zeros(1, self.z_dim, frames, height, width, device=p.device, dtype=p.dtype)
        memory = [None] * len(self._memblocks)
        self._chunk(z, memory)                   # gives every memory slot its shape
        self._static = [StaticFeatureCache(memory) for _ in range(videos)]
        self._free = list(range(videos))[::-1]
        self._chunk_shape = tuple(z.shape)
        self.eager_chunks = 0
        self.graphs = compile_graphs(self._steady, states=self._static, backend=backend, progress=progress,
                                     buckets=Buckets(static_args={"slot": tuple(range(videos))}))
        self.graphs.prewarm(z, slot=0)
        return self

    def _enter_slot(self, state: DecoderState, latents: torch.Tensor) -> None:
        if not self._free or tuple(latents.shape[3:]) != self._chunk_shape[3:]:
            return                                # no free slot, or another frame size: this video stays eager
        state.slot = self._free.pop()
        self._static[state.slot].reset()         # a new video: empty memory
        state.feat_cache = None

    def release(self, state: DecoderState) -> None:
        """Give a finished video's static memory back (a no-op for an eager video)."""
        if state.slot is not None:
            self._free.append(state.slot)
        state.slot = None
        state.feat_cache = None


def load_tiny_decoder(weights: str | Path, *, device, dtype: torch.dtype, seed: int = 0) -> TinyDecoder:
    """The tiny decoder for the pipeline: ``weights`` is a taew2_1 file, or ``"random"`` (random
    weights from ``seed``: for tests and benchmarks only, its frames are noise)."""
    if weights is None:
        raise ConfigError("the tiny decoder needs its weights: decoder_weights (--decoder-weights) is not set",
                          fix="pass the path of taew2_1.pth or taew2_1.safetensors (github.com/madebyollin/taehv); "
                              "'random' gives random weights for tests and benchmarks")
    if str(weights) == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dec = TinyDecoder()
        return dec.to(device=device, dtype=dtype).eval()
    return TinyDecoder.from_file(weights, device=device, dtype=dtype)
