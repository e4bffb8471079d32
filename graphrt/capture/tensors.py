"""Where tensors live: the one storage key, which arguments an op writes, which values hold no
tensors, and the walk over the tensors an object can reach.

Every part of capture that asks "is this the same memory?", "does this op write that argument?" or
"what tensors does this object hold?" asks here, so the write log, the host-read checker and the
capture agree on the answer.
"""
from __future__ import annotations

import functools
import types
from typing import Any, Callable, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor

# Python values that hold no tensor and are compared by value
SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
# objects never entered when looking for state: code, classes, modules (and a Parameter is weights, not state)
OPAQUE = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, type,
          torch.nn.Parameter, functools.partial)


def storage_key(t: torch.Tensor):
    """Identifies the memory a tensor lives in (views of one tensor share it)."""
    if isinstance(t, FakeTensor):       # make_fx's metadata for a traced op's output (collectives): no memory
        return t.device, id(t)
    try:
        return t.device, t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):   # a tensor without storage (a subclass wrapper)
        return t.device, id(t)


@functools.lru_cache(maxsize=None)
def written_args(func) -> tuple[tuple[int | None, str], ...]:
    """(position, or None for a keyword-only argument; name) of each argument an aten op writes
    (``self`` of ``add_``, ``out=``)."""
    out, pos = [], 0
    for a in func._schema.arguments:
        if a.alias_info is not None and a.alias_info.is_write:
            out.append((None if a.kwarg_only else pos, a.name))
        if not a.kwarg_only:
            pos += 1
    return tuple(out)


def _tensors(values) -> list[torch.Tensor]:
    out = []
    for a in values:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


def split_args(func, args, kwargs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(tensors an aten op reads, tensors it writes)."""
    written = written_args(func)
    pos = {p for p, _ in written if p is not None}
    names = {n for _, n in written}
    read = _tensors([a for i, a in enumerate(args) if i not in pos] + [v for k, v in kwargs.items() if k not in names])
    wrote = _tensors([a for i, a in enumerate(args) if i in pos] + [v for k, v in kwargs.items() if k in names])
    return read, wrote


def is_transformers_cache(obj) -> bool:
    """A ``transformers.Cache`` (checked by module and shape, so transformers need not be imported)."""
    return type(obj).__module__.startswith("transformers.") and isinstance(getattr(obj, "layers", None), list)


def holdings(obj, max_items: int | None = None) -> Iterator[tuple[str, Any, Any]]:
    """What a plain holder holds, as ``(kind, key, value)``: ``"item"`` of a dict or a list,
    ``"element"`` of a tuple (immutable: only what it holds can change), ``"attr"`` of an object with
    a ``__dict__``; at most ``max_items`` of them. The one rule for walking into state, shared by
    :func:`reachable_tensors` and the write log's :class:`~graphrt.capture.undo.Bindings`."""
    if isinstance(obj, dict):
        kind, items = "item", list(obj.items())
    elif isinstance(obj, list):
        kind, items = "item", list(enumerate(obj))
    elif isinstance(obj, tuple):
        kind, items = "element", list(enumerate(obj))
    elif hasattr(obj, "__dict__"):
        kind, items = "attr", list(vars(obj).items())
    else:
        return
    for k, v in items[:max_items]:
        yield kind, k, v


def reachable_tensors(objs, *, through=(), depth: int = 3,
                      holds_state: Callable[[object], bool] = lambda x: False) -> Iterator[torch.Tensor]:
    """The tensors ``objs`` reach, ``depth`` levels into attributes (containers do not count a level).

    From ``objs``: every tensor, and a module's parameters and buffers. From ``through``: only a
    module's parameters and buffers and what the objects ``holds_state`` names hold (their plain
    tensor attributes are not reached). Each object is entered once; :data:`OPAQUE` and
    :data:`SCALARS` never.
    """
    seen: set[int] = set()

    def walk(x, d, collect):
        if isinstance(x, torch.Tensor):
            if collect:
                yield x
            return
        if id(x) in seen or isinstance(x, OPAQUE) or isinstance(x, SCALARS):
            return
        seen.add(id(x))
        if isinstance(x, torch.nn.Module):
            yield from x.parameters()
            yield from x.buffers()
            return
        inner = None
        for kind, _, v in holdings(x):
            if kind != "attr":                   # containers do not count a level
                yield from walk(v, d, collect)
            elif d > 0:
                inner = (collect or holds_state(x)) if inner is None else inner
                yield from walk(v, d - 1, inner)

    for o in objs:
        yield from walk(o, depth, True)
    for o in through:
        yield from walk(o, depth, False)
