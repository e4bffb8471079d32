"""Frames -> mp4 (H.264 through PyAV, which bundles ffmpeg), whole or chunk by chunk as they stream."""
from __future__ import annotations

import os
from fractions import Fraction
from typing import Iterable

import torch

from graphrt.errors import BackendUnavailableError, InputError


def _as_frames(frames):
    import numpy as np                  # PyAV's frames are numpy arrays

    if isinstance(frames, torch.Tensor):
        arr = frames.detach().cpu().numpy()    # host-read-ok: frames leave the device for the file, after DiT and decoder
    else:
        arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise InputError("video frames must be uint8 [T, H, W, 3] (RGB)", got=f"{arr.dtype} {list(arr.shape)}",
                         fix="decode with the pipeline's decoder, or convert: ((x + 1) * 127.5).round().to(torch.uint8)")
    return arr


class VideoWriter:
    """An mp4 written as frames arrive: ``with VideoWriter(path, fps=16) as w: w.write(chunk)``.

    H.264 (``libx264``) in yuv420p, which every player opens; width and height must be even.
    ``crf`` is x264's quality (lower is better; 18 is visually lossless). Left by an exception
    (Ctrl-C included) after frames were written, the file is still finished: it plays, with the
    frames written so far (``finished`` says so).
    """

    def __init__(self, path: str | os.PathLike, fps: float = 16, *, codec: str = "libx264", crf: int = 18):
        try:
            import av
        except ImportError:
            raise BackendUnavailableError("writing mp4 needs PyAV", fix="pip install av (or graphrt[video])") from None
        if not fps > 0:
            raise InputError("fps must be > 0", got=fps)
        self._av, self.path, self.fps, self.codec, self.crf = av, str(path), fps, codec, crf
        self._container = None
        self._stream = None
        self.frames = 0
        self.size: tuple[int, int] | None = None
        self.finished = False

    def _open(self, h: int, w: int):
        if h % 2 or w % 2:
            raise InputError(f"{self.codec} in yuv420p needs an even frame size", got=f"{h}x{w}",
                             fix="crop or pad the frames to an even height and width")
        self._container = self._av.open(self.path, mode="w")
        self._stream = self._container.add_stream(self.codec, rate=Fraction(self.fps).limit_denominator(1001))
        self._stream.width, self._stream.height, self._stream.pix_fmt = w, h, "yuv420p"
        self._stream.options = {"crf": str(self.crf)}
        self.size = (h, w)

    def write(self, frames) -> None:
        """Append frames uint8 ``[T, H, W, 3]`` (a tensor or an array)."""
        arr = _as_frames(frames)
        if self._container is None:
            self._open(*arr.shape[1:3])
        elif arr.shape[1:3] != self.size:
            raise InputError("every chunk of a video must have the same frame size", expected=self.size,
                             got=arr.shape[1:3])
        for frame in arr:
            packet = self._stream.encode(self._av.VideoFrame.from_ndarray(frame, format="rgb24"))
            self._container.mux(packet)
        self.frames += len(arr)

    def close(self) -> None:
        """Flush the encoder and finish the file (an mp4 with no frames is an error)."""
        if self._container is None:
            raise InputError(f"no frames were written to {self.path}")
        self._container.mux(self._stream.encode())
        self._container.close()
        self._container = None
        self.finished = True

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        elif self._container is not None:
            try:
                if self.frames:
                    self.close()            # a playable file of what was written
            finally:
                if self._container is not None:
                    self._container.close()
                    self._container = None


def save_video(frames, path: str | os.PathLike, fps: float = 16, **kwargs) -> str:
    """Write ``frames`` (uint8 ``[T, H, W, 3]``, or an iterable of such chunks) to an mp4 at
    ``path``; returns the path. ``kwargs`` go to :class:`VideoWriter`."""
    chunks: Iterable = [frames] if isinstance(frames, torch.Tensor) or hasattr(frames, "__array_interface__") \
        else frames
    with VideoWriter(path, fps, **kwargs) as w:
        for chunk in chunks:
            w.write(chunk)
    return str(path)
