"""Streaming VAE decode: the Wan 2.1 VAE decoding a video chunk by chunk, overlapped with the DiT.

The Wan VAE decoder is causal in time: it decodes one latent frame at a time, and each causal conv
keeps the last two frames it saw (diffusers' ``feat_cache``). Keeping that cache between chunks
makes a video decoded chunk by chunk equal the same latents decoded at once, so frames can leave
as soon as their chunk is denoised. Each video owns its cache (a :class:`DecoderState`), so
sessions batched in the DiT never share decoder state.

:class:`DecodeQueue` runs the decodes off the DiT's path: on a worker thread, which on CUDA issues
its kernels on a second stream after an event recorded where the latents were produced. The host
thread that replays the DiT's graphs never waits for a decode.
"""
from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from graphrt.errors import InputError
from graphrt.replay import Buckets, compile as compile_graphs


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """A decoded video ``[3, T, H, W]`` in [-1, 1] -> frames ``[T, H, W, 3]`` uint8."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)


@dataclass
class DecoderState:
    """One video's decoder state: diffusers' causal feature cache and the latent frames seen;
    ``slot`` is the captured decoder's static cache the video lives in (None: eager)."""

    feat_cache: list | None
    frames: int = 0
    slot: int | None = None


class StaticFeatureCache:
    """diffusers' ``feat_cache`` list with every slot a fixed buffer, written in place.

    From a video's third latent frame on, every causal conv caches exactly two frames, so the
    decoder's op sequence is the same for every frame: with this cache it can be captured as one
    graph. Reads return the buffer; ``cache[i] = x`` copies ``x`` into it. It is a runtime state
    (snapshot/restore/reset), so a capture leaves it as it was.
    """

    def __init__(self, like: list):
        # diffusers counts every causal conv, the 1x1x1 shortcuts too; those slots stay None
        self.bufs = [None if t is None else torch.zeros_like(t) for t in like]

    def __len__(self):
        return len(self.bufs)

    def __getitem__(self, i):
        return self.bufs[i]

    def __setitem__(self, i, value):
        buf = self.bufs[i]
        if buf is None or not isinstance(value, torch.Tensor) or value.shape != buf.shape:
            raise InputError(f"feature cache slot {i} takes a fixed shape",
                             expected=None if buf is None else list(buf.shape), got=getattr(value, "shape", value))
        buf.copy_(value)

    def load(self, tensors: list) -> None:
        for b, t in zip(self.bufs, tensors):
            if b is not None:
                b.copy_(t)

    def snapshot(self, data: bool = False):
        return [None if b is None else b.clone() for b in self.bufs]

    def restore(self, snap) -> None:
        self.load(snap)

    def reset(self) -> None:
        for b in self.bufs:
            if b is not None:
                b.zero_()


def vae_geometry(vae) -> tuple[int, int, int, tuple[torch.Tensor, torch.Tensor]]:
    """What a diffusers ``AutoencoderKLWan`` config says of its latents: channels, frames per latent
    frame, pixels per latent pixel, and the (std, mean) that normalize them, on its device and dtype."""
    cfg = vae.config
    p = next(vae.parameters())
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
    return (cfg.z_dim, 2 ** sum(cfg.temperal_downsample), 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1),
            (std.to(p.device, p.dtype), mean.to(p.device, p.dtype)))


class VAEDecoder(Protocol):
    """What the pipeline needs of a decoder (the Wan VAE, or any causal video decoder)."""

    def new_state(self) -> DecoderState: ...
    def decode(self, latents: torch.Tensor, state: DecoderState) -> torch.Tensor: ...


@dataclass
class WanVAEDecoder:
    """The decoder half of diffusers' ``AutoencoderKLWan``, streaming.

    >>> dec = WanVAEDecoder(vae)
    >>> state = dec.new_state()
    >>> frames = [dec.decode(chunk, state) for chunk in latent_chunks]   # each [T, H, W, 3] uint8

    ``decode`` takes the DiT's latents ``[1, z_dim, F, h, w]`` (normalized, as the DiT outputs them;
    the VAE's ``latents_mean``/``latents_std`` are undone here) and returns the chunk's frames on
    the VAE's device. The first latent frame of a video gives one frame, every later one
    ``scale_factor_temporal`` frames (Wan 2.1: 4): 21 latent frames -> 81 frames.
    """

    vae: torch.nn.Module
    _scale: tuple = field(init=False, repr=False)
    graphs: Any = field(default=None, init=False, repr=False)     # GraphedModule of one steady frame
    eager_frames: int = field(default=0, init=False)               # steady frames run without a graph

    def __post_init__(self):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.z_dim, self.time_scale, self.space_scale, self._scale = vae_geometry(self.vae)
        self._convs = sum(isinstance(m, WanCausalConv3d) for m in self.vae.decoder.modules())

    def new_state(self) -> DecoderState:
        """The state of a video not yet begun (an empty feature cache)."""
        return DecoderState([None] * self._convs)

    def frames_out(self, latent_frames: int, first: bool) -> int:
        """Frames a chunk of ``latent_frames`` decodes to (``first``: the video's first chunk)."""
        return latent_frames * self.time_scale - (self.time_scale - 1 if first else 0)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """One chunk of one video: latents ``[1, z_dim, F, h, w]`` -> frames ``[T, H, W, 3]`` uint8."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        if latents.dim() != 5 or latents.shape[0] != 1 or latents.shape[1] != self.z_dim:
            raise InputError("the decoder takes one video's latents at a time",
                             expected=f"[1, {self.z_dim}, frames, h, w]", got=list(latents.shape),
                             fix="decode each session's chunk with its own DecoderState")
        if state.slot is None and state.feat_cache is None:
            raise InputError("this DecoderState was released: its video is finished",
                             fix="start the next video with new_state()")
        if state.slot is None and len(state.feat_cache) != self._convs:
            raise InputError("this DecoderState belongs to another decoder", expected=f"{self._convs} cache slots",
                             got=len(state.feat_cache), fix="make states with this decoder's new_state()")
        std, mean = self._scale
        z = latents.to(std.device, std.dtype) * std + mean
        x = self.vae.post_quant_conv(z)          # 1x1x1: frame by frame equals all at once
        outs = []
        for i in range(x.shape[2]):
            frame = x[:, :, i:i + 1]
            if state.slot is None and state.frames >= 2 and self.graphs is not None:
                self._enter_slot(state, frame)
            if state.slot is not None:
                outs.append(self.graphs(frame, slot=state.slot).clone())   # static output: next replay overwrites
            else:
                outs.append(self.vae.decoder(frame, feat_cache=state.feat_cache, feat_idx=[0],
                                             first_chunk=state.frames == 0))
                self.eager_frames += state.frames >= 2 and self.graphs is not None
            state.frames += 1
        out = torch.cat(outs, dim=2)
        if self.vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=self.vae.config.patch_size)
        return to_uint8(out[0])

    # -- the captured decoder -------------------------------------------------------------------
    def _steady(self, frame: torch.Tensor, *, slot: int) -> torch.Tensor:
        return self.vae.decoder(frame, feat_cache=self._static[slot], feat_idx=[0])

    @torch.no_grad()
    def capture(self, height: int, width: int, *, videos: int = 1, backend: str = "auto",
                progress: bool = False) -> "WanVAEDecoder":
        """Capture the decode of one steady latent frame (``height`` x ``width`` latents) as a graph
        per video slot, over static feature caches written in place. Up to ``videos`` videos at once
        then replay it from their third latent frame on (the first two run eagerly: the cache has
        not yet reached its fixed shape); more run eagerly, counted in ``eager_frames``. Frames
        equal the eager decode's bit for bit (the same kernels)."""
        if videos < 1:
            raise InputError("videos must be >= 1", got=videos)
        if self.graphs is not None:
            raise InputError("the decoder is already captured", fix="capture once, before the first decode")
        std = self._scale[0]
        state = self.new_state()
        x = self.vae.post_quant_conv(torch.zeros(1, self.z_dim, 2, height, width, device=std.device, dtype=std.dtype))
        for i in range(2):                      # two frames give every cache slot its fixed shape
            self.vae.decoder(x[:, :, i:i + 1], feat_cache=state.feat_cache, feat_idx=[0], first_chunk=i == 0)
        self._static = [StaticFeatureCache(state.feat_cache) for _ in range(videos)]
        self._free = list(range(videos))[::-1]
        self._frame_shape = tuple(x[:, :, :1].shape)
        self.graphs = compile_graphs(self._steady, states=self._static, backend=backend, progress=progress,
                                      buckets=Buckets(static_args={"slot": tuple(range(videos))}))
        self.graphs.prewarm(x[:, :, :1], slot=0)
        return self

    def _enter_slot(self, state: DecoderState, frame: torch.Tensor) -> None:
        if not self._free or tuple(frame.shape) != self._frame_shape:
            return                                # no free slot, or another size: this video stays eager
        state.slot = self._free.pop()
        self._static[state.slot].load(state.feat_cache)
        state.feat_cache = None

    def release(self, state: DecoderState) -> None:
        """Give a finished video's static cache back (a no-op for an eager video)."""
        if state.slot is not None:
            self._free.append(state.slot)
            state.slot = None
            state.feat_cache = None

    @torch.no_grad()
    def decode_all(self, latents: torch.Tensor) -> torch.Tensor:
        """A whole video in one call through diffusers' own ``AutoencoderKLWan.decode`` (the
        one-shot decode streaming must equal): latents ``[1, z_dim, F, h, w]`` -> ``[T, H, W, 3]``."""
        std, mean = self._scale
        z = latents.to(std.device, std.dtype) * std + mean
        return to_uint8(self.vae.decode(z).sample[0])


class DecodeQueue:
    """Decodes submitted in order, off the caller's thread (``overlap=True``) or inline.

    ``submit(latents, state)`` returns a future of the chunk's frames on the host (uint8
    ``[T, H, W, 3]``). With overlap, one worker thread decodes in submission order, so each video's
    chunks go through its cache in order; on CUDA the worker waits (on the device, not the host)
    for an event recorded on the submitting stream, then runs on its own stream. Without overlap
    the decode runs at once and the future is already done: the sequential path, same kernels.
    After :meth:`close`, ``submit`` raises.
    """

    def __init__(self, decoder: VAEDecoder, *, overlap: bool = True):
        self.decoder, self.overlap = decoder, overlap
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="graphrt-decode") if overlap else None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.closed = False

    def submit(self, latents: torch.Tensor, state: DecoderState) -> cf.Future:
        """Queue one chunk's decode with its video's state; a future of its frames on the host."""
        if self.closed:
            raise InputError("the decode queue is closed", fix="decode before close(), or make a new DecodeQueue")
        if self._pool is None:
            fut: cf.Future = cf.Future()
            try:
                fut.set_result(self._decode(latents, state, None))
            except Exception as e:           # the same contract as the worker: raised by result()
                fut.set_exception(e)
            return fut
        ready = None
        if latents.is_cuda:
            stream = self._stream(latents.device)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(latents.device))
            latents.record_stream(stream)    # the DiT's allocator must not reuse it before the decode ran
        return self._pool.submit(self._decode, latents, state, ready)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _decode(self, latents: torch.Tensor, state: DecoderState, ready) -> torch.Tensor:
        if ready is None:
            return self.decoder.decode(latents, state).cpu()     # host-read-ok: decoded frames are the output
        stream = self._stream(latents.device)
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            # the copy to the host waits for this stream only: the worker blocks, the DiT does not
            return self.decoder.decode(latents, state).cpu()     # host-read-ok: decoded frames are the output

    def drain(self) -> None:
        """Wait until every queued decode has run (their kernels done: each ends in a copy to the
        host). Nothing runs on the worker after this returns until the next submit."""
        if self._pool is not None:
            self._pool.submit(lambda: None).result()     # one worker: it runs after every earlier decode

    def release(self, state: DecoderState) -> None:
        """Hand a finished video's state back to the decoder, after its queued decodes."""
        release = getattr(self.decoder, "release", None)
        if release is None:
            return
        if self._pool is None:
            release(state)
        else:
            self._pool.submit(release, state)

    def close(self, cancel: bool = False) -> None:
        """Finish the queued decodes (``cancel``: drop those not started; their futures are
        cancelled) and stop the worker; later submits raise."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None
        self.closed = True


@dataclass
class WanVAEEncoder:
    """The encoder half of diffusers' ``AutoencoderKLWan``: frames to the DiT's latents.

    >>> enc = WanVAEEncoder(vae)
    >>> latents = enc.encode(frames)          # uint8 [T, H, W, 3] -> [1, z_dim, 1 + (T - 1) / 4, h, w]

    Causal in time, as the decoder: the first frame gives one latent frame, every later
    ``time_scale`` frames one more (diffusers' own chunked encode with its feature cache). The
    latents are the distribution's mode, normalized by the VAE's ``latents_mean``/``latents_std``
    as the DiT outputs them, so :meth:`WanVAEDecoder.decode` takes them back.
    """

    vae: torch.nn.Module

    def __post_init__(self):
        self.z_dim, self.time_scale, self.space_scale, self._scale = vae_geometry(self.vae)

    def frames_for(self, latent_frames: int) -> int:
        """Frames that encode to ``latent_frames`` latent frames (the first of a video alone)."""
        return 1 + (latent_frames - 1) * self.time_scale

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames ``[T, H, W, 3]`` (T = 1 + k * time_scale) -> latents ``[1, z_dim, 1 + k, h, w]``."""
        if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.dim() != 4 \
                or frames.shape[3] != 3:
            raise InputError("the encoder takes uint8 frames [T, H, W, 3]", expected="uint8 [T, H, W, 3]",
                             got=f"{getattr(frames, 'dtype', type(frames).__name__)} "
                                 f"{list(getattr(frames, 'shape', []))}",
                             fix="pass frames as VideoPipeline returns them (uint8, RGB last)")
        t, h, w = frames.shape[:3]
        if (t - 1) % self.time_scale or h % self.space_scale or w % self.space_scale:
            raise InputError(f"frames do not fit the VAE's {self.time_scale}x time and {self.space_scale}x space "
                             "scale", expected=f"T = 1 + k * {self.time_scale}, H and W multiples of "
                             f"{self.space_scale}", got=[t, h, w])
        std, mean = self._scale
        x = frames.to(std.device).permute(3, 0, 1, 2)[None].to(std.dtype) / 127.5 - 1
        z = self.vae.encode(x).latent_dist.mode()
        return (z - mean) / std
