"""transformers caches under a graph: which layouts replay correctly, batch views, clear errors.

A graph replays kernels; it runs no Python. A cache layer replays correctly when everything that
changes from token to token lives in device tensors updated in place:

- ``StaticLayer``: K/V written with ``index_copy_`` at ``cumulative_length``, a device tensor
  advanced with ``add_``; attention reads the whole static length under a mask built on the device.
- ``LinearAttentionLayer`` (conv and recurrent states of hybrid models such as LFM2): states copied
  in place; its prefill/decode switch is a Python flag that the prefill sets once and decode never
  changes.

Layouts that keep a Python counter or grow tensors cannot be replayed, and are refused up front
with the reason (:func:`check_layout`); whatever this module does not know is still checked at
capture, where a changed Python number or a rebound tensor is named (``graphrt.capture.undo``).
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch

from graphrt.capture.state import register_argument_check
from graphrt.capture.tensors import is_transformers_cache
from graphrt.errors import CacheError, InputError

_SLIDING = ("keeps the window's fill level in a Python int (cumulative_length_int) and decides on the host, "
            "every token, between an index_copy_ write and rolling the whole window; a replay runs no Python, so "
            "it would keep the branch and the mask offsets of the capture and write in the wrong place once the "
            "window fills")
_DYNAMIC = ("grows keys and values by concatenation: a new shape and a new tensor every token, which no "
            "static graph can hold")


def _unsupported(layer) -> str | None:
    """Why a graph cannot replay this cache layer, or None."""
    names = {c.__name__ for c in type(layer).__mro__}
    if "StaticSlidingWindowLayer" in names:
        return _SLIDING
    if "DynamicLayer" in names:
        return _DYNAMIC
    return None


def check_layout(cache) -> None:
    """Raise :class:`CacheError` naming each layer type a graph cannot replay, and why."""
    if not is_transformers_cache(cache):
        raise InputError("expected a transformers Cache (StaticCache)", got=type(cache).__name__)
    bad: dict[str, tuple[str, list[int]]] = {}
    for i, layer in enumerate(cache.layers):
        why = _unsupported(layer)
        if why is not None:
            bad.setdefault(type(layer).__name__, (why, []))[1].append(i)
    if bad:
        got = "; ".join(f"{name} at layers {idx}: it {why}" for name, (why, idx) in bad.items())
        raise CacheError(f"this {type(cache).__name__} layout cannot be replayed by a graph", got=got,
                         expected="StaticLayer (full attention) or LinearAttentionLayer (conv/recurrent state) layers",
                         fix="use a StaticCache on a config without sliding-window layers (sliding_window=None, "
                             "layer_types of 'full_attention'), or decode this model eagerly")


def _batched_tensors(layer):
    """(attribute, key or None, tensor) for every tensor a layer holds, directly or in a dict/list."""
    for name, v in vars(layer).items():
        if isinstance(v, torch.Tensor):
            yield name, None, v
        elif isinstance(v, dict):
            yield from ((name, k, t) for k, t in v.items() if isinstance(t, torch.Tensor))
        elif isinstance(v, list):
            yield from ((name, k, t) for k, t in enumerate(v) if isinstance(t, torch.Tensor))


def cache_batch(cache) -> int | None:
    """Rows the cache was allocated for (its first initialized layer's K/V or state), None before
    the first call initializes it."""
    for layer in cache.layers:
        for name, _, t in _batched_tensors(layer):
            if t.dim() >= 2 and name in ("keys", "values", "conv_states", "recurrent_states"):
                return t.shape[0]
    return None


def check_batch(cache, batch: int, where: str) -> None:
    """Raise :class:`InputError` when the cache's rows differ from the batch the graph runs."""
    rows = cache_batch(cache)
    if rows is None:
        raise CacheError(f"{where} is not initialized: its tensors are created by the first call",
                         fix="run the prefill (one eager call) before the captured decode steps, or call "
                             "cache.early_initialization(...)")
    if rows != batch:
        raise InputError(f"{where} holds {rows} row(s), but this call runs {batch}",
                         where=where, expected=f"a cache allocated for batch {batch}", got=f"batch {rows}",
                         fix="build the cache for the batch the graph runs (with batch buckets, the bucket's size: "
                             "padded rows need cache rows too), or use graphrt.llm.LLMDecoder, which keeps one cache "
                             "view per bucket")


def batch_view(cache, rows: int):
    """A cache object over the first ``rows`` rows of ``cache``: its K/V and states are views, its
    positions and flags the same objects. Views of one cache share memory: use one at a time."""
    full = cache_batch(cache)
    if full is None:
        raise CacheError("batch_view() needs an initialized cache", fix="run one forward with the cache first")
    if not 0 < rows <= full:
        raise InputError("a batch view must have between 1 and the cache's rows", expected=f"1..{full}", got=rows)
    view = copy.copy(cache)
    view.layers = []
    for layer in cache.layers:
        v = copy.copy(layer)
        for name, key, t in _batched_tensors(layer):
            if t.dim() == 0 or t.shape[0] != full:
                continue
            if key is None:
                setattr(v, name, t[:rows])
            else:
                if getattr(v, name) is getattr(layer, name):     # copy the container once, then fill it
                    setattr(v, name, copy.copy(getattr(layer, name)))
                getattr(v, name)[key] = t[:rows]
        if hasattr(v, "batch_size"):
            v.batch_size = rows
        view.layers.append(v)
    return view


class TransformersCacheCheck:
    """The capture's :class:`~graphrt.capture.state.ArgumentCheck` for transformers caches passed as
    arguments: a layout a graph can replay (:func:`check_layout`), rows for the batch the graph runs
    (:func:`check_batch`; without batch buckets, the rows of ``input_ids`` or ``inputs_embeds``)."""

    def applies(self, obj: Any) -> bool:
        return is_transformers_cache(obj)

    def check(self, obj: Any, path: str, batch: int | None, call: Mapping[str, Any]) -> None:
        check_layout(obj)
        if batch is None:
            batch = next((x.shape[0] for p, x in call.items()
                          if p in ("input_ids", "inputs_embeds") and isinstance(x, torch.Tensor)), None)
        if batch is not None:
            check_batch(obj, batch, path)


register_argument_check(TransformersCacheCheck())
