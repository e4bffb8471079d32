"""Static-cache LLM decode on graphrt: a greedy :class:`Decoder` for transformers causal LMs (eager
prefill, one graph per batch bucket) and the cache checks it relies on."""
from graphrt.llm.cache import batch_view, check_layout, is_transformers_cache
from graphrt.llm.decode import DecodeStats, Decoder, greedy_eager

__all__ = ["Decoder", "DecodeStats", "greedy_eager", "batch_view", "check_layout", "is_transformers_cache"]
