"""Host copies of device tensors, for sessions suspended out of device memory.

On CUDA the copies go to pinned host memory on a side stream: the stream first waits for the
work already queued on the current stream (so the copy sees the last chunk's K/V), and the
host never waits. A load back makes the current stream wait for its copy on the device, so the
next chunk reads the restored slab and nothing runs early. Pinned buffers come from PyTorch's
caching host allocator, which keeps a buffer alive until the copies that use it have finished.
On the CPU a copy is a clone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graphrt.errors import InputError


@dataclass
class HostCopy:
    """Named tensors copied to the host; ``done`` is the CUDA event that completes the copy."""

    tensors: dict[str, torch.Tensor]
    done: torch.cuda.Event | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @classmethod
    def save(cls, views: dict[str, torch.Tensor], stream: torch.cuda.Stream | None = None) -> "HostCopy":
        """Copy ``views`` to the host: on ``stream`` into pinned memory (asynchronous), else a clone."""
        if stream is None:
            return cls({name: t.to("cpu", copy=True) for name, t in views.items()})
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        host = {}
        with torch.cuda.stream(stream):
            for name, t in views.items():
                host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host[name].copy_(t, non_blocking=True)
        return cls(host, stream.record_event())

    def load(self, views: dict[str, torch.Tensor], stream: torch.cuda.Stream | None = None) -> None:
        """Copy back into ``views`` (same names, shapes and dtypes as saved). With a ``stream``
        the copy runs there and the current stream waits for it on the device."""
        mismatch = [n for n in self.tensors.keys() | views.keys()
                    if n not in self.tensors or n not in views or self.tensors[n].shape != views[n].shape
                    or self.tensors[n].dtype != views[n].dtype]
        if mismatch:
            raise InputError("the saved tensors do not fit their destination", expected="the same names, shapes "
                             "and dtypes as saved", got=f"differences in {sorted(mismatch)[:4]}",
                             fix="load into a cache built like the one that was saved")
        if stream is None:
            for name, t in views.items():
                t.copy_(self.tensors[name])
            return
        main = torch.cuda.current_stream(stream.device)
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            for name, t in views.items():
                t.copy_(self.tensors[name], non_blocking=True)
        main.wait_stream(stream)
