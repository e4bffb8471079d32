"""graphrt: a CUDA-graph / torch.compile static-shape runtime for autoregressive video DiTs.

Public API: :func:`compile` (one graph per bucket, replayed), :func:`check` (find every host
read in a forward), :func:`quantize` (fp8 linears), the KV caches, the bucket spec and the errors.
"""
from graphrt._version import __version__  # noqa: F401
from graphrt.attention import attend
from graphrt.capture import HostReadReport, HostReadSite, check
from graphrt.errors import (BackendUnavailableError, BucketMissError, CacheError, CaptureError, CheckpointError,
                            ConcurrentCallError, ConfigError, GraphrtError, GraphrtWarning, HostReadError, InputError, ParallelError,
                            RebindError, ReplayMismatchError, SignatureError, WeightsMovedError)
from graphrt.kv import RollingKVCache, StaticKVCache
from graphrt.llm import cache as _llm_cache  # noqa: F401  (registers the transformers-cache check with capture)
from graphrt.quant import quantize
from graphrt.replay import BucketKey, Buckets, GraphedModule, GraphStats, compile


__all__ = ["compile", "check", "quantize", "GraphedModule", "GraphStats", "Buckets", "BucketKey", "StaticKVCache",
           "RollingKVCache", "attend", "HostReadReport", "HostReadSite", "GraphrtError", "ConfigError",
           "InputError", "CheckpointError", "CacheError", "BackendUnavailableError", "HostReadError",
           "CaptureError", "BucketMissError", "SignatureError", "ReplayMismatchError", "GraphrtWarning",
           "RebindError", "ParallelError", "ConcurrentCallError", "WeightsMovedError"]
