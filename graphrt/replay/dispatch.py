"""The dispatcher: which captured graph serves a call, and how a smaller batch rides in a larger one.

It binds a call to the function's signature, maps it to a frozen :class:`BucketKey` (the bucket
rules in :mod:`graphrt.replay.buckets`), and is the one source of truth for which graphs exist
(:attr:`Dispatcher.graphs`). A request of fewer rows than its bucket is padded: its padded rows point
at each runtime state's scratch while the graph replays (:class:`~graphrt.capture.state.PaddedRows`)
and are cut off the outputs. A request no graph serves gets an error that says why. Running a graph
is the graph wrapper's (:mod:`graphrt.replay.graphed`), which holds what the dispatcher maps to.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable

import torch

from graphrt.capture.state import PaddedRows
from graphrt.capture.undo import Bindings
from graphrt.errors import BucketMissError, GraphrtError, SignatureError
from graphrt.replay.buckets import BucketKey, Buckets, PyValue, Request, bind, parameter_names


class Dispatcher:
    """Maps calls of ``fn`` to bucket keys and keys to what serves them (``graphs``, largest first in
    :attr:`keys`); ``sealed`` once every bucket was captured up front (then a miss never captures)."""

    def __init__(self, fn: Callable, buckets: Buckets | None = None):
        target = fn.forward if isinstance(fn, torch.nn.Module) else fn
        try:
            self.signature = inspect.signature(target)
        except (TypeError, ValueError):
            self.signature = None
        self.buckets = buckets or Buckets()
        self.buckets.check_names(parameter_names(self.signature))
        self.graphs: dict[BucketKey, Any] = {}
        self.sealed = False

    @property
    def keys(self) -> list[BucketKey]:
        """Keys of the graphs that exist, largest first."""
        return sorted(self.graphs, key=BucketKey.sort_key, reverse=True)

    def request(self, args: tuple, kwargs: dict) -> Request:
        return bind(self.signature, args, kwargs)

    def key(self, req: Request) -> BucketKey:
        return self.buckets.key(req)

    def plan(self, templates: list[tuple[BucketKey, Request]]) -> list[tuple[BucketKey, Request]]:
        """Every bucket of the spec that shares a template's signature and is not captured yet, each
        with the request to capture it from, largest first (smaller graphs reuse the pool)."""
        todo: dict[BucketKey, Request] = {}
        for key, req in templates:
            for k in self.buckets.expand(key):
                if k not in self.graphs and self.buckets.allows(k) is None:
                    todo.setdefault(k, req)
        return [(k, todo[k]) for k in sorted(todo, key=BucketKey.sort_key, reverse=True)]

    def batched(self, req: Request, i: int) -> bool:
        """Whether leaf ``i`` of the request is padded to the bucket's batch."""
        return self.buckets._batched(req, i)

    @staticmethod
    def padding(key: BucketKey, req: Request, states) -> contextlib.ExitStack:
        """While a padded request replays, its padded rows point at each state's scratch slab."""
        stack = contextlib.ExitStack()
        if req.batch is not None and req.batch < key.batch:
            for s in states:
                if isinstance(s, PaddedRows):
                    stack.enter_context(s.pad_rows(req.batch, key.batch))
        return stack

    @staticmethod
    def unpad(key: BucketKey, req: Request, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The request's rows of outputs batched at the bucket's size."""
        b, bucket = req.batch, key.batch
        if b is not None and b < bucket:
            tensors = [t[:b] if t.dim() and t.shape[0] == bucket else t for t in tensors]
        return tensors

    def refuse_swapped_objects(self, key: BucketKey) -> None:
        """A request that differs from a captured bucket only in a stateful argument object (a cache):
        the graph reads and writes that object's tensors, so another object needs another graph, and
        each would hold its cache alive. Refused, with the argument named."""
        for k in self.graphs:
            if (k.batch, k.statics, k.structure) != (key.batch, key.statics, key.structure):
                continue
            old, new = dict(k.signature), dict(key.signature)
            diffs = [p for p in new if old.get(p) != new[p]]
            if diffs and all(_stateful(old.get(p)) and _stateful(new[p]) for p in diffs):
                p = diffs[0]
                raise SignatureError(
                    f"{p} is another {type(new[p].value).__name__} object than the one bucket [{k}] was captured with",
                    expected=f"the captured object at {id(old[p].value):#x}", got=f"an object at {id(new[p].value):#x}",
                    fix="a graph reads and writes the tensors of the object it was captured with: pass that object "
                        "again (reset it for a new sequence), or compile one graphrt.compile(...) per object")

    def miss(self, key: BucketKey, why: str | None) -> GraphrtError:
        """The error for a request no graph serves: the signature that differs from the nearest captured
        bucket's, or why the spec has no such bucket."""
        near = [k for k in self.graphs if k.batch == key.batch and k.statics == key.statics]
        if near and why is None:
            want = dict(near[0].signature)
            diffs = [(p, want.get(p, "(absent)"), v) for p, v in key.signature if want.get(p) != v]
            diffs += [(p, w, "(absent)") for p, w in near[0].signature if p not in dict(key.signature)]
            if not diffs:
                diffs = [("structure", near[0].structure, key.structure)]
            return SignatureError(
                f"inputs do not match the captured signature of bucket [{near[0]}]",
                expected="; ".join(f"{p}: {w}" for p, w, _ in diffs),
                got="; ".join(f"{p}: {g}" for p, _, g in diffs),
                fix="pass inputs of the captured shape/dtype/device (and the same cache objects), or capture "
                    "this signature before prewarm() seals the graphs")
        existing = ", ".join(f"[{k}]" for k in self.keys) or "none"
        return BucketMissError(
            f"no captured graph serves this request: [{key}]",
            got=why or "the graphs are sealed (prewarm() ran) and this bucket was not captured",
            expected=f"one of the captured buckets: {existing}",
            fix="add the batch size / static value to the Buckets spec and prewarm again, or compile with "
                "fallback='eager' to run such requests eagerly (counted in stats.eager_fallbacks)")


def _stateful(v) -> bool:
    """A Python leaf keyed by identity that holds tensors (a transformers Cache, a state dataclass)."""
    if not isinstance(v, PyValue) or not v.by_identity:
        return False
    return any(isinstance(x, torch.Tensor) for _, x in Bindings({"arg": v.value}).slots.values())
