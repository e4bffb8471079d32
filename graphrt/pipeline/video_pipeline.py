"""Prompt in, frames out: the text encoder, the :class:`Engine` (DiT chunks) and the streaming VAE.

    prompt -> TextEncoder (cached by text) -> Engine.open -> per chunk: Engine.step (graph replays)
           -> DecodeQueue (the session's own VAE feature cache; a worker thread / second stream)
           -> frames uint8 [T, H, W, 3]

With ``overlap=True`` the decode of chunk n runs while the DiT computes chunk n+1, and
:meth:`VideoPipeline.stream` yields each chunk's frames as soon as they are decoded; with
``overlap=False`` each chunk is denoised, then decoded, then yielded (the sequential path). Both
run the same kernels on the same inputs, so they give the same frames.

Each session's decoder state is the pipeline's, not the Engine's: the decode worker advances it
while the DiT runs, and a lazy capture of the DiT checks that nothing it can reach changes under
it. A graph mode captures each bucket on its first use unless :meth:`VideoPipeline.prewarm` ran:
until the Engine's graphs are sealed, each step first waits for the queued decodes, since a
CUDA graph capture may not run beside kernels, allocations and syncs of another thread. Call
``prewarm()`` before serving to overlap every chunk.
"""
from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
from pathlib import Path
from typing import Iterator, Sequence

import torch

from graphrt.errors import ConfigError, InputError
from graphrt.pipeline.vae import DecodeQueue, DecoderState, VAEDecoder, WanVAEDecoder, WanVAEEncoder
from graphrt.pipeline.engine import Engine, Session
from graphrt.pipeline.taehv import TinyDecoder, load_tiny_decoder
from graphrt.pipeline.text import TextEncoder, clean_prompt
from graphrt.pipeline.weights import VideoShape, WanComponents, load_wan
from graphrt.threads import OneThread, one_thread


class VideoPipeline:
    """Text-to-video with a persistent engine: sessions, batching, streaming decode, overlap.

    >>> pipe = VideoPipeline.from_pretrained("Wan2.1-T2V-1.3B-Diffusers", "self_forcing_dmd.pt",
    ...                                      device="cuda", mode="chunk").prewarm()
    >>> for frames in pipe.stream("a red fox in the snow", num_chunks=7, seed=0):   # [T, H, W, 3] uint8
    ...     show(frames)
    >>> video = pipe("a red fox in the snow", num_chunks=7)                          # [81, 480, 832, 3]

    Many users: ``s = pipe.open(prompt, seed=1)``; ``futures = pipe.step()`` runs one DiT chunk for
    every open session (batched) and queues each session's decode with its own decoder state;
    ``futures[s].result()`` is that chunk's frames.

    In ``mode="forward"``/``"chunk"``, ``prewarm()`` first: without it each step waits for the
    queued decodes until every graph is captured (see the module docstring). :meth:`shutdown` is
    the last call: it closes every session and stops the decode worker.

    Threads: one caller at a time. ``open``, ``step``, ``close``, ``prewarm`` and ``shutdown`` from a
    second thread while another thread's call runs are refused with
    :class:`~graphrt.errors.ConcurrentCallError` (never mixed, never waited for), as the
    :class:`Engine` refuses them. The pipeline's own threads (the decode worker, and the DiT
    producer of an overlapped :meth:`stream`) are its business: a stream's producer steps while
    the caller only waits for frames. Serve it from one thread, e.g. a worker that owns it (as
    ``graphrt.serve`` does).
    """

    def __init__(self, engine: Engine, text: TextEncoder, decoder: VAEDecoder | str, *, overlap: bool = True,
                 decoder_weights: str | Path | None = None, encoder: WanVAEEncoder | None = None):
        """``decoder``: a decoder object (:class:`WanVAEDecoder`, :class:`TinyDecoder`), or
        ``"tiny"`` with ``decoder_weights`` (a taew2_1 file; ``"random"``: tests and benchmarks only).
        ``encoder``: the VAE encoder that :meth:`open` uses to start from an image or a video."""
        cfg = engine.cfg
        if isinstance(decoder, str):
            if decoder != "tiny":
                raise ConfigError(f"decoder={decoder!r} by name needs the model's parts",
                                  fix="pass WanVAEDecoder(vae), or use VideoPipeline.from_components(parts, "
                                      f"decoder={decoder!r})")
            p = next(engine.model.parameters())
            decoder = load_tiny_decoder(decoder_weights, device=p.device, dtype=p.dtype)
        elif decoder_weights is not None:
            raise ConfigError("decoder_weights goes with decoder='tiny'", got=str(decoder_weights))
        if text.dim != cfg.text_dim:
            raise ConfigError(f"the text encoder gives {text.dim}-dim states but the DiT reads {cfg.text_dim}")
        z_dim = getattr(decoder, "z_dim", cfg.out_dim)
        if z_dim != cfg.out_dim:
            raise ConfigError(f"the DiT outputs {cfg.out_dim} latent channels but the decoder "
                              f"({type(decoder).__name__}) takes {z_dim}", expected=z_dim, got=cfg.out_dim,
                              fix="pair the decoder with a DiT of its latent space (the tiny decoder, taew2_1: "
                                  "Wan 2.1's 16 channels)")
        self.engine, self.text, self.decoder, self.encoder = engine, text, decoder, encoder
        self._one_thread = OneThread("VideoPipeline")
        self.queue = DecodeQueue(decoder, overlap=overlap)
        # kept off the Session: the Engine's captures can reach its sessions, and the decode worker
        # changes these states while the DiT runs (a capture would see a rebind it cannot replay)
        self._states: dict[Session, DecoderState] = {}

    @classmethod
    def from_components(cls, parts: WanComponents, *, overlap: bool = True, text_cache: int = 256,
                        decoder: str = "wan", decoder_weights: str | Path | None = None,
                        **engine_kwargs) -> "VideoPipeline":
        """A pipeline over loaded parts; ``engine_kwargs`` go to :class:`Engine` (``mode``,
        ``max_sessions``, ``batch_sizes``, ``window``, ...).

        ``decoder``: ``"wan"`` (the Wan VAE of ``parts``, :class:`WanVAEDecoder`) or ``"tiny"``
        (:class:`TinyDecoder`, TAEHV's ``taew2_1``, from the file ``decoder_weights``;
        ``decoder_weights="random"`` gives it random weights, for tests and benchmarks only)."""
        engine = Engine(parts.dit, **engine_kwargs)
        text = TextEncoder(parts.text_encoder, parts.tokenizer, max_length=parts.dit.cfg.text_len,
                           cache_size=text_cache)
        return cls(engine, text, make_decoder(parts, decoder, decoder_weights), overlap=overlap,
                   encoder=WanVAEEncoder(parts.vae))

    @classmethod
    def from_pretrained(cls, folder: str | Path, checkpoint: str | Path | None = None, *,
                        shape: VideoShape = VideoShape(), device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.bfloat16, attention: str = "auto",
                        checkpoint_key: str | None = None, overlap: bool = True, decoder: str = "wan",
                        decoder_weights: str | Path | None = None, **engine_kwargs) -> "VideoPipeline":
        """Load a local diffusers-format Wan folder (and the causal DiT's ``checkpoint``); see
        :func:`graphrt.pipeline.weights.load_wan`. ``decoder``/``decoder_weights``: as
        :meth:`from_components`."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        parts = load_wan(folder, checkpoint, shape=shape, device=device, dtype=dtype, attention=attention,
                         checkpoint_key=checkpoint_key)
        return cls.from_components(parts, overlap=overlap, decoder=decoder, decoder_weights=decoder_weights,
                                   **engine_kwargs)

    # -- sessions -------------------------------------------------------------------------------
    @one_thread("open()")
    def open(self, prompt: str, *, seed: int = 0, num_chunks: int | None = None, image: torch.Tensor | None = None,
             video: torch.Tensor | None = None) -> Session:
        """Start a video for ``prompt``; a prompt seen before skips the text encoder and the
        cross-attention projections. The session gets its own decoder state.

        ``image`` (uint8 [H, W, 3]) or ``video`` (uint8 [T, H, W, 3], T = 1 + 4 * (n * chunk_frames
        - 1) for n whole chunks, at the decoder's frame size) start it from given frames: the
        Wan VAE encoder turns them into the session's first n chunks (an image is held still for
        one chunk), the Engine writes their K/V (``Engine.open(init_latents=...)``) and the
        decoder state is primed with them, so the first chunk :meth:`step` delivers is the first
        new one. ``num_chunks`` counts the given chunks."""
        self._check_running("open()")
        init = None
        if image is not None or video is not None:
            init = self._encode_frames(image, video)
        ctx = self.text(prompt)
        session = self.engine.open(ctx, seed=seed, prompt=clean_prompt(prompt), num_chunks=num_chunks,
                                   init_latents=init)
        state = self.decoder.new_state()
        if init is not None:
            self.queue.submit(init, state).result()      # primes the causal feature cache; the frames are given
        self._states[session] = state
        return session

    def _encode_frames(self, image, video) -> torch.Tensor:
        if image is not None and video is not None:
            raise InputError("open() starts from an image or a video, not both", fix="pass one of image=, video=")
        if self.encoder is None:
            raise ConfigError("this pipeline has no VAE encoder to start from frames",
                              fix="build it with VideoPipeline(..., encoder=WanVAEEncoder(vae)) or from_components")
        cfg = self.engine.cfg
        need = self.encoder.frames_for(cfg.chunk_frames)
        if image is not None:
            if not isinstance(image, torch.Tensor) or image.dim() != 3:
                raise InputError("image must be uint8 [H, W, 3]", got=getattr(image, "shape", type(image).__name__))
            video = image[None].expand(need, *image.shape)     # held still for one chunk
        size = (cfg.height * self.encoder.space_scale, cfg.width * self.encoder.space_scale)
        if isinstance(video, torch.Tensor) and video.dim() == 4 and tuple(video.shape[1:3]) != size:
            raise InputError("frames of the wrong size", expected=f"[T, {size[0]}, {size[1]}, 3]",
                             got=list(video.shape), fix="resize the frames to the video size the pipeline makes")
        if isinstance(video, torch.Tensor) and video.dim() == 4:
            step = cfg.chunk_frames * self.encoder.time_scale
            if (video.shape[0] - need) % step or video.shape[0] < need:
                raise InputError(f"{video.shape[0]} frames are not a whole number of chunks",
                                 expected=f"{need} + k * {step} frames (1 + 4 * (n * {cfg.chunk_frames} - 1))",
                                 got=video.shape[0], fix="trim or pad the clip to a whole number of chunks")
        return self.encoder.encode(video).to(self.engine.device, self.engine.dtype)

    @one_thread("set_prompt()")
    def set_prompt(self, session: Session, text: str) -> None:
        """Switch a session's prompt from its next chunk, through the text encoder and the prompt
        cache, with the KV re-cache (:meth:`Engine.set_prompt`)."""
        self._check_running("set_prompt()")
        self.engine.set_prompt(session, self.text(text), prompt=clean_prompt(text))

    @one_thread("close()")
    def close(self, session: Session) -> None:
        """End a video: its slab and its decoder state (a captured decoder's slot) are freed."""
        self.engine.close(session)
        state = self._states.pop(session, None)
        if state is not None:
            self.queue.release(state)

    def decoder_state(self, session: Session) -> DecoderState:
        """The decoder state of a session this pipeline opened (its VAE feature cache)."""
        state = self._states.get(session)
        if state is None:
            raise InputError(f"session {getattr(session, 'id', session)!r} has no decoder state in this pipeline",
                             fix="open sessions with VideoPipeline.open(), not Engine.open()")
        return state

    @one_thread("step()")
    @torch.no_grad()
    def step(self, sessions: Sequence[Session] | None = None) -> dict[Session, cf.Future]:
        """One DiT chunk for each active session (batched, as :meth:`Engine.step`), each session's
        decode queued with its own decoder state. Returns session -> future of the chunk's frames
        (uint8, on the host). Every check runs before the DiT: an error advances no session."""
        self._check_running("step()")
        if sessions is not None:
            sessions = list(sessions)
        pool = sessions if sessions is not None else [s for s in self.engine.sessions.values() if not s.suspended]
        # foreign or closed sessions are left to Engine.step's own error
        missing = [s.id for s in pool if isinstance(s, Session) and self.engine.sessions.get(s.id) is s
                   and not s.done and s not in self._states]
        if missing:
            raise InputError(f"session(s) {missing} have no decoder state",
                             fix="open sessions with VideoPipeline.open(), not Engine.open()")
        graphs, recache = self.engine.graphs, self.engine.recache_graphs
        if graphs is not None and not graphs.sealed or \
                recache is not None and not recache.sealed and any(getattr(s, "recache", False) for s in pool):
            self.queue.drain()            # this step may capture: no decode may run beside it
        latents = self.engine.step(sessions)
        return {s: self.queue.submit(lat, self._states[s]) for s, lat in latents.items()}

    # -- whole videos -----------------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[str], num_chunks: int, seed: int | Sequence[int] = 0
               ) -> Iterator[torch.Tensor]:
        """Each chunk's frames as soon as they are decoded: uint8 ``[T, H, W, 3]`` for one prompt,
        ``[B, T, H, W, 3]`` for a list of B prompts (batched in the DiT). ``seed``: one int (row i
        gets seed + i) or one per prompt. The stream owns the engine while it runs."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        if not prompts:
            raise InputError("stream() needs at least one prompt", got="an empty list",
                             fix="pass a prompt string, or a list of one or more prompts")
        if len(seeds) != len(prompts):
            raise InputError("one seed per prompt", expected=len(prompts), got=len(seeds))
        if not isinstance(num_chunks, int) or num_chunks < 1:
            raise InputError("num_chunks must be an int >= 1", got=num_chunks)
        sessions: list[Session] = []
        chunks = None
        try:
            for p, s in zip(prompts, seeds):
                sessions.append(self.open(p, seed=s, num_chunks=num_chunks))
            chunks = self._overlapped(sessions, num_chunks) if self.queue.overlap else \
                (self.step(sessions) for _ in range(num_chunks))
            for futures in chunks:
                frames = [futures[s].result() for s in sessions]
                yield frames[0] if isinstance(prompt, str) else torch.stack(frames)
        finally:
            if chunks is not None:
                chunks.close()           # a stream left early: the producer stops before its sessions close
            for s in sessions:
                self.close(s)

    def _overlapped(self, sessions: list[Session], num_chunks: int) -> Iterator[dict[Session, cf.Future]]:
        """The DiT chunks on a producer thread, which never waits for a decode; the caller gets
        each chunk's futures in order and waits only for the frames it is about to yield."""
        ready: queue.Queue = queue.Queue()
        stop = threading.Event()

        def produce():
            try:
                for _ in range(num_chunks):
                    if stop.is_set():
                        return
                    ready.put(self.step(sessions))
            except BaseException as e:       # handed to the consumer, raised there
                ready.put(e)

        producer = threading.Thread(target=produce, name="graphrt-dit", daemon=True)
        producer.start()
        try:
            for _ in range(num_chunks):
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            producer.join()

    def __call__(self, prompt: str | Sequence[str], num_chunks: int, seed: int | Sequence[int] = 0) -> torch.Tensor:
        """The whole video: uint8 ``[T, H, W, 3]`` (``[B, T, H, W, 3]`` for a list of prompts)."""
        return torch.cat(list(self.stream(prompt, num_chunks, seed)), dim=0 if isinstance(prompt, str) else 1)

    @one_thread("prewarm()")
    def prewarm(self, decoder_graphs: bool = False, recache: bool = False) -> "VideoPipeline":
        """Capture the engine's graphs now (see :meth:`Engine.prewarm`; ``recache``: the re-cache
        passes of prompt switches and starts from frames too); with ``decoder_graphs``
        also the decoder's steady frame, one static feature cache per engine slab
        (:meth:`WanVAEDecoder.capture`; the tiny decoder: a whole chunk, :meth:`TinyDecoder.capture`)."""
        self._check_running("prewarm()")
        self.queue.drain()                # a capture may not run beside a decode
        self.engine.prewarm(recache=recache)
        if decoder_graphs:
            if not hasattr(self.decoder, "capture"):
                raise ConfigError(f"{type(self.decoder).__name__} cannot be captured")
            cfg = self.engine.cfg
            chunk = {"frames": cfg.chunk_frames} if isinstance(self.decoder, TinyDecoder) else {}
            self.decoder.capture(cfg.height, cfg.width, videos=self.engine.cache.num_slabs, **chunk)
        return self

    @one_thread("shutdown()")
    def shutdown(self, cancel: bool = False) -> None:
        """Close every session, give each decoder state back (after its queued decodes), finish
        the queued decodes and stop the worker. ``cancel``: drop the queued decodes not started
        (their futures are cancelled) instead of running them, for a stop that must be quick
        (Ctrl-C). The last call: open/step/stream/prewarm raise after it. Calling it again does
        nothing."""
        for session in list(self._states):
            if self.engine.sessions.get(session.id) is session:
                self.close(session)
            else:                         # closed on the engine directly: only its state is left
                self.queue.release(self._states.pop(session))
        self.engine.reset()               # sessions opened on the engine directly
        self.queue.close(cancel=cancel)

    def _check_running(self, where: str) -> None:
        if self.queue.closed:
            raise InputError(f"VideoPipeline.{where}: the pipeline was shut down (its decode worker is stopped)",
                             fix="build a new VideoPipeline; shutdown() is its last call")


DECODERS = ("wan", "tiny")


def make_decoder(parts: WanComponents, decoder: str = "wan", weights: str | Path | None = None) -> VAEDecoder:
    """The pipeline's decoder by name, on the DiT's device and dtype: ``"wan"`` (the Wan VAE of
    ``parts``) or ``"tiny"`` (:class:`TinyDecoder` from ``weights``, a taew2_1 file or ``"random"``)."""
    if decoder == "wan":
        if weights is not None:
            raise ConfigError("decoder_weights is for decoder='tiny'; the Wan VAE comes with the model",
                              got=str(weights), fix="drop decoder_weights, or pass decoder='tiny'")
        return WanVAEDecoder(parts.vae)
    if decoder != "tiny":
        raise ConfigError(f"unknown decoder {decoder!r}", expected=list(DECODERS), got=decoder)
    p = next(parts.dit.parameters())
    return load_tiny_decoder(weights, device=p.device, dtype=p.dtype)
