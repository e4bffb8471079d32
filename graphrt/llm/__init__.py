"""Static-cache LLM decode on graphrt: a greedy :class:`LLMDecoder` for transformers causal LMs
(eager prefill, one graph per batch bucket) and the cache checks it relies on.

``Decoder`` is the old name of :class:`LLMDecoder`, kept as a deprecated alias (the VAE decoders of
the video path live in :mod:`graphrt.pipeline.vae`)."""
import warnings

from graphrt.llm.cache import batch_view, check_layout, is_transformers_cache
from graphrt.llm.decode import DecodeStats, LLMDecoder, greedy_eager

__all__ = ["LLMDecoder", "DecodeStats", "greedy_eager", "batch_view", "check_layout", "is_transformers_cache"]


def __getattr__(name: str):
    if name == "Decoder":
        warnings.warn("graphrt.llm.Decoder is deprecated: use graphrt.llm.LLMDecoder (the same class)",
                      DeprecationWarning, stacklevel=2)
        return LLMDecoder
    raise AttributeError(f"module 'graphrt.llm' has no attribute {name!r}")
