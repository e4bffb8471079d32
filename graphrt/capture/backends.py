"""Graph backends: what "capture once, replay many" means on each device.

Every backend captures ``flat_fn(*static_inputs) -> [output tensors]`` once and then
``replay()`` returns the same static output tensors, refreshed.

- :class:`CudaGraph`: ``torch.cuda.CUDAGraph``; warm-up on a side stream, one memory pool shared
  by all buckets (owned by the :class:`~graphrt.capture.capture.Runtime`).
- :class:`CpuGraph`: CPU emulation. The aten ops are traced once over the static buffers
  (``make_fx``, real tensors) and replayed with every Python-side value frozen at capture,
  exactly as a CUDA graph freezes kernel arguments. A host value that leaks into the captured
  region therefore gives a wrong replay on the CPU too. It is for fidelity, not speed: replay
  costs about what eager costs, unless ``inductor`` compiles the trace.
- :class:`EagerGraph`: no graph; runs the function on the static inputs (a control).
"""
from __future__ import annotations

import torch

BACKENDS = ("cuda-graph", "cpu-graph", "eager")


class EagerGraph:
    def __init__(self, flat_fn, inputs, runtime):
        self.fn, self.inputs = flat_fn, inputs

    def replay(self):
        return self.fn(*self.inputs)


def trace(flat_fn, inputs, inductor: bool):
    """The aten ops of one call over ``inputs``, every Python value frozen (``make_fx``, real
    tensors: it runs once), optionally compiled by inductor. Each bucket gets its own GraphModule,
    so compiling many buckets never hits dynamo's recompile limit."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(flat_fn, tracing_mode="real")(*inputs)
    return torch.compile(gm, fullgraph=True, dynamic=False) if inductor else gm


class CpuGraph:
    def __init__(self, flat_fn, inputs, runtime):
        self.inputs = inputs
        self.run = trace(flat_fn, inputs, runtime.inductor)
        self.outputs = [o.clone() for o in self.run(*inputs)]   # static outputs (and the compile, if any)

    def replay(self):
        for static, out in zip(self.outputs, self.run(*self.inputs)):
            static.copy_(out)
        return self.outputs


class CudaGraph:
    def __init__(self, flat_fn, inputs, runtime):
        fn = trace(flat_fn, inputs, inductor=True) if runtime.inductor else flat_fn
        stream = runtime.side_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(runtime.warmup):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=runtime.memory_pool(), stream=stream):
            self.outputs = fn(*inputs)
        self.inputs = inputs

    def replay(self):
        self.graph.replay()
        return self.outputs


GRAPH_CLASSES = {"cuda-graph": CudaGraph, "cpu-graph": CpuGraph, "eager": EagerGraph}
