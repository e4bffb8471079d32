"""Chunked video generation for causal DiTs, from latents up to prompt-to-mp4.

- ``schedule``: :class:`FlowMatchSchedule` and :func:`denoise_chunk` (the scheduler arithmetic);
- ``engine``: :class:`Engine`, :class:`Session` (sessions and stepping: one graph per forward or per
  whole chunk); ``slabs``: slab counts from a memory budget, suspended sessions' host copies,
  :class:`EngineMemory` (what :meth:`Engine.memory` reports); ``checks``: the Engine's argument checks;
- ``reference``: :func:`reference_stream` (``ReferenceWan``, host reads and all);
- ``text``: :class:`TextEncoder` (umT5 + tokenizer, prompt cache keyed by text);
- ``vae``: :class:`WanVAEDecoder` (streaming VAE decode with its causal feature cache; any
  :class:`VAEDecoder` will do) and
  :class:`DecodeQueue` (decode overlapped with the DiT on a worker thread / second stream);
- ``taehv``: :class:`TinyDecoder` (TAEHV-compatible ``taew2_1``: the same streaming protocol, milliseconds);
- ``video``: :func:`save_video`, :class:`VideoWriter` (frames -> mp4 with PyAV);
- ``weights``: :func:`load_wan`/:func:`save_wan` (a diffusers-format Wan folder + causal DiT checkpoint);
- ``tiny``: :func:`tiny_wan` (random tiny components: runs anywhere, no downloads);
- ``video_pipeline``: :class:`VideoPipeline` (prompt in, frames out).

transformers, diffusers and PyAV are imported only when those parts are used.
"""
from graphrt.pipeline.vae import DecodeQueue, DecoderState, VAEDecoder, WanVAEDecoder
from graphrt.pipeline.engine import MODES, Engine, EngineMemory, EngineStats, Session
from graphrt.pipeline.reference import reference_stream
from graphrt.pipeline.schedule import FlowMatchSchedule, denoise_chunk
from graphrt.pipeline.taehv import TinyDecoder
from graphrt.pipeline.text import TextEncoder
from graphrt.pipeline.tiny import tiny_wan
from graphrt.pipeline.video import VideoWriter, save_video
from graphrt.pipeline.video_pipeline import VideoPipeline
from graphrt.pipeline.weights import VideoShape, WanComponents, load_wan, save_wan

__all__ = ["MODES", "DecodeQueue", "DecoderState", "Engine", "EngineMemory", "EngineStats", "FlowMatchSchedule",
           "Session", "TextEncoder", "TinyDecoder", "VideoPipeline", "VideoShape", "VAEDecoder", "VideoWriter",
           "WanComponents", "WanVAEDecoder",
           "denoise_chunk", "load_wan", "reference_stream", "save_video", "save_wan", "tiny_wan"]
