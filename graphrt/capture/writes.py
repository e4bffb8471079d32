"""Record what a call writes into tensors that existed before it, so it can be undone and compared.

:class:`WriteLog` is a dispatch mode. For every op that writes into a tensor the call did not
create (a KV cache, a module buffer, a closure's tensor), it saves the region about to be
written and its old values: the rows of an ``index_copy_``/``index_add_``/``index_put_``, the
elements of a ``scatter_``, the view of a ``copy_``/``fill_``/``add_``. Memory is proportional to
what was written, never to the size of the tensor written into (a whole KV pool).

- :meth:`WriteLog.undo` puts the old values back, newest first;
- :meth:`WriteLog.values` reads every written region as it is now.

Verification runs the eager forward under a log, keeps its written values, undoes it, replays
the graph, and compares the graph's outputs and the same regions with the eager ones.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from graphrt.capture.hostreads import storage_key, written_args

aten = torch.ops.aten


@dataclass
class Write:
    """One written region: ``target`` (a view into a tensor that existed before the call) and how
    to address the region inside it."""

    op: str
    target: torch.Tensor
    how: str                      # "view" | "index" (dim, index) | "put" (indices) | "scatter" (dim, index)
    where: Any
    old: torch.Tensor
    name: str

    def read(self) -> torch.Tensor:
        if self.how == "index":
            dim, index = self.where
            return self.target.index_select(dim, index)
        if self.how == "put":
            return self.target[self.where].clone()
        if self.how == "scatter":
            dim, index = self.where
            return self.target.gather(dim, index)
        return self.target.clone()

    def put(self, values: torch.Tensor) -> None:
        if self.how == "index":
            dim, index = self.where
            self.target.index_copy_(dim, index, values)
        elif self.how == "put":
            self.target[self.where] = values
        elif self.how == "scatter":
            dim, index = self.where
            self.target.scatter_(dim, index, values)
        else:
            self.target.copy_(values)


_INDEXED = {aten.index_copy_.default: "index", aten.index_add_.default: "index", aten.index_fill_.int_Scalar: "index",
            aten.index_fill_.int_Tensor: "index", aten.index_put_.default: "put", aten._index_put_impl_.default: "put",
            aten.scatter_.src: "scatter", aten.scatter_.value: "scatter", aten.scatter_add_.default: "scatter",
            aten.scatter_reduce_.two: "scatter"}


class WriteLog(TorchDispatchMode):
    """``with WriteLog(names) as log: fn(...)`` records every write into pre-existing tensors.

    ``names`` maps :func:`~graphrt.capture.hostreads.storage_key` of known tensors to a name
    used in messages (``StaticKVCache.k[3]``)."""

    def __init__(self, names: dict | None = None):
        super().__init__()
        self.supports_higher_order_operators = True    # FlexAttention and friends write nothing outside
        self.writes: list[Write] = []
        self._names = names or {}
        self._fresh: set = set()      # storages created during the call: temporaries

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            out = func(*args, **kwargs)
            self._made(out)
            return out
        positions, names = written_args(func)
        if positions or names:
            for i in positions:
                if i < len(args):
                    self._log(func, args[i], args, kwargs, first=i == 0)
            for name in names:
                if name in kwargs:
                    self._log(func, kwargs[name], args, kwargs, first=False)
        out = func(*args, **kwargs)
        if not positions and not names and not _is_view(func):
            self._made(out)
        return out

    def _made(self, out):
        for o in (out if isinstance(out, (list, tuple)) else (out,)):
            if isinstance(o, torch.Tensor):
                self._fresh.add(storage_key(o))

    def _log(self, func, target, args, kwargs, first: bool):
        if not isinstance(target, torch.Tensor) or storage_key(target) in self._fresh:
            return
        how = _INDEXED.get(func, "view") if first else "view"
        if how == "index":
            where = (args[1], args[2])
        elif how == "put":        # aten's None index is Python's full slice
            where = tuple(slice(None) if i is None else i for i in args[1])
        elif how == "scatter":
            where = (args[1], args[2])
        else:
            where = None
        w = Write(str(func), target, how, where, torch.empty(0), self._names.get(storage_key(target), "a tensor"))
        w.old = w.read()
        self.writes.append(w)

    def values(self) -> list[torch.Tensor]:
        """Every written region as it is now (clones), in write order."""
        with torch.no_grad():
            return [w.read() for w in self.writes]

    def undo(self) -> None:
        """Put back what was there before the call (newest write first)."""
        with torch.no_grad():
            for w in reversed(self.writes):
                w.put(w.old)

    @property
    def nbytes(self) -> int:
        return sum(w.old.numel() * w.old.element_size() for w in self.writes)


@functools.lru_cache(maxsize=None)
def _is_view(func) -> bool:
    return any(r.alias_info is not None for r in func._schema.returns)


def tensor_names(*objs) -> dict:
    """``storage_key -> "Type.attr[i]"`` for the tensors runtime-state objects (and modules) hold,
    so a mismatch names the tensor it was found in."""
    names: dict = {}
    for obj in objs:
        owner = type(obj).__name__
        if isinstance(obj, torch.nn.Module):
            for n, t in (*obj.named_parameters(), *obj.named_buffers()):
                names.setdefault(storage_key(t), f"{owner}.{n}")
            continue
        for attr, v in vars(obj).items():
            if isinstance(v, torch.Tensor):
                names.setdefault(storage_key(v), f"{owner}.{attr}")
            elif isinstance(v, (list, tuple)):
                for i, t in enumerate(v):
                    if isinstance(t, torch.Tensor):
                        names.setdefault(storage_key(t), f"{owner}.{attr}[{i}]")
            elif isinstance(v, torch.nn.Module):
                names.update({k: n for k, n in tensor_names(v).items() if k not in names})
    return names
