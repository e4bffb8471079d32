"""Leave no trace: undo what a run outside a real call wrote, whatever object holds the tensor.

graphrt runs the user's function several times outside a real call: the host-read check, the
warm-ups, the CPU trace, ``verify``'s eager rerun. Each run writes into whatever state the function
touches: graphrt's caches, module buffers, a transformers ``Cache`` passed as an argument, a
dataclass in a dict, the owner of a bound method, a closure's tensor. A decode step advances its
position and writes one K/V row per layer; left in place, that is the classic static-cache capture
bug (the first real step starts one token late and reads rows nobody wrote).

Snapshotting the state would cost a copy of every cache the function can reach (a 14B model's KV
cache per capture). :class:`WriteLog` instead sees every aten op and, before an in-place or ``out=``
op writes into a tensor that existed when the log opened, saves just the region about to be
overwritten: the indexed rows of ``index_copy_``/``index_put_``/``scatter_``, the view of a slice
``copy_``; the whole tensor only when the op writes it all or its region cannot be known (a boolean
mask). :meth:`WriteLog.rollback` writes the regions back in reverse order. Memory is proportional to
what was written.

A run can change state a second way, which no graph can replay: rebinding an attribute
(``self.pos = self.pos + 1`` instead of ``self.pos.add_(1)``), or changing a Python number
(``self.length += 1``). A replay runs no Python, so it would write into the old tensor and leave
the number as it was. :class:`Bindings` scans the objects a function can reach (its module tree,
its argument objects, a bound method's owner, closure cells and the globals it names, through
attributes, dicts and lists to a bounded depth) before and after a run, restores what changed and
names it.

:class:`Sandbox` puts the two together for one capture: :meth:`Sandbox.run` records a run, checks
the bindings, rolls back. Compiled code (inductor kernels) writes below the dispatcher, where no
mode sees it: :meth:`Sandbox.run_opaque` runs it and then rolls back the regions the last recorded
run of the same function wrote, which are the regions the compiled code wrote from the same state.
"""
from __future__ import annotations

import contextlib
import dataclasses
import types
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _disable_current_modes

from graphrt.capture.tensors import OPAQUE, SCALARS, holdings, storage_key, written_args
from graphrt.capture.watch import WatchingDispatchMode
from graphrt.errors import CaptureError, RebindError

aten = torch.ops.aten

# ops that write rows along a dim: (self, dim, index, ...)
_ROWS = frozenset({aten.index_copy_.default, aten.index_add_.default, aten.index_fill_.int_Scalar,
                   aten.index_fill_.int_Tensor, aten.index_reduce_.default})
# ops that write where an index tensor of self's rank points along a dim: (self, dim, index, ...)
_SCATTER = frozenset({aten.scatter_.src, aten.scatter_.value, aten.scatter_.reduce, aten.scatter_.value_reduce,
                      aten.scatter_add_.default, aten.scatter_reduce_.two})
_INDEX_PUT = frozenset({aten.index_put_.default, aten._index_put_impl_.default})
# ops that change a tensor's shape, strides or storage, not (only) its data
_META = frozenset({"resize_", "resize_as_", "set_", "as_strided_", "transpose_", "t_", "squeeze_", "unsqueeze_",
                   "swapdims_", "swapaxes_", "detach_"})


def _tracked(t) -> bool:
    """A tensor whose writes can matter: real data, strided, not empty."""
    return (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta" and t.numel() > 0
            and not is_fake(t))


# -- what one write overwrote ---------------------------------------------------------------------
@dataclasses.dataclass
class _Region:
    """The part of ``tensor`` one op overwrote (``op``: which), and what it held before."""

    tensor: torch.Tensor

    def read(self) -> torch.Tensor:        # the region's current contents (a copy)
        raise NotImplementedError

    def write(self, values: torch.Tensor) -> None:
        raise NotImplementedError

    def save(self) -> "_Region":
        self.old = self.read()
        return self

    def restore(self) -> None:
        self.write(self.old)

    @property
    def nbytes(self) -> int:
        return self.old.numel() * self.old.element_size()


@dataclasses.dataclass
class _Whole(_Region):
    """Every element of the (possibly view) tensor; also its shape, in case an ``out=`` op resized it."""

    def save(self):
        t = self.tensor
        self.meta = (t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
        return super().save()

    def read(self):
        return self.tensor.clone()

    def write(self, values):
        t, (storage, offset, shape, stride) = self.tensor, self.meta
        if (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride()) != \
                (storage.data_ptr(), offset, shape, stride):
            t.set_(storage, offset, shape, stride)
        t.copy_(values)


@dataclasses.dataclass
class _Rows(_Region):
    dim: int
    index: torch.Tensor

    def read(self):
        return self.tensor.index_select(self.dim, self.index)

    def write(self, values):
        self.tensor.index_copy_(self.dim, self.index, values)


@dataclasses.dataclass
class _Gathered(_Region):
    dim: int
    index: torch.Tensor

    def read(self):
        return self.tensor.gather(self.dim, self.index)

    def write(self, values):
        self.tensor.scatter_(self.dim, self.index, values)


@dataclasses.dataclass
class _Indexed(_Region):
    indices: list

    def read(self):
        return aten.index.Tensor(self.tensor, self.indices)

    def write(self, values):
        aten.index_put_.default(self.tensor, self.indices, values)


@dataclasses.dataclass
class _Taken(_Region):
    index: torch.Tensor

    def read(self):
        return self.tensor.take(self.index)

    def write(self, values):
        self.tensor.put_(self.index, values)


@dataclasses.dataclass
class _Meta(_Region):
    """Shape, strides and storage of a tensor an in-place view op (``transpose_``, ``set_``) changed."""

    def save(self):
        t = self.tensor
        self.old = (t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
        return self

    def read(self):
        t = self.tensor
        return torch.tensor([t.storage_offset(), *t.shape, *t.stride()])

    def restore(self):
        self.tensor.set_(*self.old)

    @property
    def nbytes(self):
        return 0


def _region(func, t: torch.Tensor, name: str, args, kwargs) -> _Region:
    """The region ``func`` is about to overwrite in its argument ``t`` (named ``name``)."""
    if func.__name__.split(".")[0] in _META:
        return _Meta(t)
    if name != "self":                       # an out= argument: written whole (and maybe resized)
        return _Whole(t)
    if func in _ROWS:
        dim, index = args[1], args[2]
        return _Rows(t, dim % max(t.dim(), 1), index.reshape(-1).to(torch.long, copy=True))   # int32 too
    if func in _SCATTER:
        dim, index = args[1], args[2]
        return _Gathered(t, dim, index.clone())
    if func in _INDEX_PUT:
        indices = list(args[1])
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return _Whole(t)                 # a mask: which elements is data-dependent
        return _Indexed(t, [None if i is None else i.clone() for i in indices])
    if func is aten.put_.default:
        return _Taken(t, args[1].clone())
    return _Whole(t)                         # copy_, fill_, zero_, add_, masked_fill_, ...: the whole view


class WriteLog(WatchingDispatchMode):
    """Record the old contents of every region an aten op overwrites in a pre-existing tensor.

    ``with WriteLog() as log: fn()`` runs ``fn`` for real; ``log.rollback()`` then writes every saved
    region back, newest first, so each tensor that existed before the log opened holds what it held
    then (writes through views included: the view is restored, so its base is). A tensor is
    pre-existing unless an op inside the log allocated it. Rolling back twice is harmless; a log can
    also roll back the writes of another run that wrote the same regions from the same state (see
    :meth:`Sandbox.run_opaque`).

    Open it outside any tracing mode (``make_fx``): the copies it makes must not be traced.
    Higher-order ops (FlexAttention) run unrecorded; they do not write their inputs.
    """

    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.regions: list[_Region] = []
        self._fresh: set[int] = set()         # storages allocated inside the log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not isinstance(func, torch._ops.OpOverload):     # a higher-order op (FlexAttention): runs unrecorded
            out = func(*args, **kwargs)
            self._fresh.update(storage_key(t) for t in pytree.tree_leaves(out) if _tracked(t))
            return out
        written = written_args(func)
        if written:
            # the copies run below every mode: a tracer (make_fx) sits under this one and must not see them
            with _disable_current_modes(), torch.no_grad():
                for pos, name in written:
                    target = kwargs.get(name) if pos is None else (args[pos] if pos < len(args) else kwargs.get(name))
                    for t in (target if isinstance(target, (list, tuple)) else (target,)):
                        if _tracked(t) and storage_key(t) not in self._fresh:
                            region = _region(func, t, name, args, kwargs)
                            region.op = str(func)
                            self.regions.append(region.save())
        out = func(*args, **kwargs)
        if not written:
            inputs = {storage_key(t) for t in pytree.tree_leaves((args, kwargs)) if _tracked(t)}
            for t in pytree.tree_leaves(out):
                if _tracked(t) and (p := storage_key(t)) not in inputs:
                    self._fresh.add(p)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes the saved regions hold."""
        return sum(r.nbytes for r in self.regions)

    @torch.no_grad()
    def rollback(self) -> None:
        """Write every saved region back, newest first."""
        for r in reversed(self.regions):
            r.restore()

    @torch.no_grad()
    def contents(self) -> list[torch.Tensor]:
        """The current contents of every region the log saved (copies), in the order written."""
        return [r.read() for r in self.regions]


# -- rebinding ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where a value lives: ``owner[key]`` (kind "item"), ``owner.<key>`` ("attr") or a closure
    cell's contents ("cell")."""

    owner: Any
    key: Any
    kind: str = "attr"

    def get(self, default=None):
        if self.kind == "item":
            try:
                return self.owner[self.key]
            except (KeyError, IndexError):
                return default
        if self.kind == "cell":
            try:
                return self.owner.cell_contents
            except ValueError:
                return default
        return self.owner.__dict__.get(self.key, default)

    def set(self, value) -> None:
        if self.kind == "item":
            self.owner[self.key] = value
        elif self.kind == "cell":
            self.owner.cell_contents = value
        else:
            self.owner.__dict__[self.key] = value

    def delete(self) -> None:
        if self.kind == "attr":
            self.owner.__dict__.pop(self.key, None)
        elif self.kind == "item" and isinstance(self.owner, dict):
            self.owner.pop(self.key, None)


_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Change:
    """One binding a run changed: ``path`` was ``before`` and is now ``after``."""

    path: str
    before: Any
    after: Any

    @staticmethod
    def _show(v) -> str:
        if v is _MISSING:
            return "(absent)"
        if isinstance(v, torch.Tensor):
            return f"a tensor {str(v.dtype).removeprefix('torch.')}{list(v.shape)} at {v.data_ptr():#x}"
        return repr(v)

    def __str__(self):
        return f"{self.path}: {self._show(self.before)} -> {self._show(self.after)}"


class Bindings:
    """Which tensor (or Python number) every reachable attribute held; what a run changed since.

    Scans ``roots`` (name -> object): modules through their whole tree (buffers and plain
    attributes), other objects through attributes, dicts, lists and tuples up to ``depth`` levels.
    Tensors are compared by identity, numbers, strings and None by value; a function, class or
    module object is not entered.
    """

    def __init__(self, roots: dict[str, Any], depth: int = 4, max_items: int = 1024):
        self.depth, self.max_items = depth, max_items
        self.roots = roots
        self.slots: dict[str, tuple[_Slot, Any]] = {}
        self.holders: dict[str, tuple[_Slot, Any]] = {}    # the objects and containers on the way to them
        self._seen: set[int] = set()
        for name, obj in roots.items():
            if isinstance(obj, _Slot):                    # a closure cell or a global: rebinding it counts too
                self._record(obj, obj.get(), name, -1)
            else:
                self._walk(obj, name, 0)
        self._seen.clear()

    def _record(self, slot: _Slot, value, path: str, level: int):
        if isinstance(value, torch.Tensor) or isinstance(value, SCALARS):
            self.slots[path] = (slot, value)
        else:
            if not isinstance(value, OPAQUE):
                self.holders[path] = (slot, value)
            self._walk(value, path, level + 1)

    def _walk(self, obj, path: str, level: int):
        if id(obj) in self._seen or isinstance(obj, OPAQUE) or isinstance(obj, SCALARS) or \
                isinstance(obj, torch.Tensor):
            return
        self._seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            for name, b in obj._buffers.items():
                self._record(_Slot(obj._buffers, name, "item"), b, f"{path}.{name}", 0)
            for name, m in obj._modules.items():
                if m is not None:
                    self._walk(m, f"{path}.{name}", 0)
            items = [(k, v) for k, v in vars(obj).items() if not k.startswith("_") and k != "training"]
            for k, v in items:
                self._record(_Slot(obj, k), v, f"{path}.{k}", 0)
            return
        if level >= self.depth:
            return
        for kind, k, v in holdings(obj, self.max_items):
            if kind == "attr":
                self._record(_Slot(obj, k), v, f"{path}.{k}", level)
            elif kind == "element":                    # a tuple's: only what it holds can change
                self._walk(v, f"{path}[{k}]", level + 1)
            elif isinstance(obj, list):
                self._record(_Slot(obj, k, "item"), v, f"{path}[{k}]", level)
            elif isinstance(k, (str, int)):
                self._record(_Slot(obj, k, "item"), v, f"{path}[{k!r}]", level)

    def changes(self) -> list[Change]:
        """Every recorded binding that no longer holds what it held, and tensors bound since."""
        out = []
        for path, (slot, old) in self.slots.items():
            new = slot.get(_MISSING)
            if isinstance(old, torch.Tensor) or isinstance(new, torch.Tensor):
                if new is not old:
                    out.append(Change(path, old, new))
            elif type(new) is not type(old) or new != old:
                out.append(Change(path, old, new))
        known = {path for path in self.slots}
        after = Bindings(self.roots, self.depth, self.max_items)
        for path, (slot, new) in after.slots.items():
            if path not in known and isinstance(new, torch.Tensor):
                out.append(Change(path, _MISSING, new))
        return out

    def restore(self, changes: list[Change]) -> None:
        """Put every changed binding back (new tensor attributes are removed)."""
        after = None
        for c in changes:
            if c.path in self.slots:
                self.slots[c.path][0].set(c.before)
            else:
                after = after or Bindings(self.roots, self.depth, self.max_items)
                after.slots[c.path][0].delete()

    def names(self) -> dict[int, str]:
        """id(tensor) -> the path it was reachable at (the first one), to name what a log wrote."""
        out: dict[int, str] = {}
        for path, (_, v) in self.slots.items():
            if isinstance(v, torch.Tensor):
                out.setdefault(id(v), path)
        return out


class TensorIds:
    """Which tensor every path of some objects held (``past_key_values.layers[0].keys``), checked
    cheaply on every call: a graph reads and writes the tensors its argument objects held at capture,
    so a rebound one (``cache.reorder_cache(beam)`` assigns new ``keys``/``values``) would silently
    leave the graph on the old tensors.

    :meth:`rebound` compares identities only (no data): the tensors and each attribute, dict or list
    on the way to them; a changed holder that still holds the same tensors is recorded anew.
    """

    def __init__(self, roots: dict[str, Any]):
        self.roots = roots
        b = Bindings(roots)
        self.tensors = {p: v for p, (_, v) in b.slots.items() if isinstance(v, torch.Tensor)}
        entries = [(slot, v) for slot, v in b.slots.values() if isinstance(v, torch.Tensor)]
        entries += list(b.holders.values())
        self._attrs = [(slot.owner.__dict__, slot.key, v) for slot, v in entries if slot.kind == "attr"]
        self._items = [(slot.owner, slot.key, v) for slot, v in entries if slot.kind == "item"]

    def rebound(self) -> list[str]:
        """Each path whose tensor is no longer the one recorded, ``path: before -> after``; [] when none."""
        for d, k, v in self._attrs:
            if d.get(k, _MISSING) is not v:
                return self._compare()
        for owner, k, v in self._items:
            try:
                if owner[k] is not v:
                    return self._compare()
            except (KeyError, IndexError):
                return self._compare()
        return []

    def _compare(self) -> list[str]:
        now = Bindings(self.roots).slots
        out = [str(Change(p, t, now[p][1] if p in now else _MISSING)) for p, t in self.tensors.items()
               if p not in now or now[p][1] is not t]
        if not out:                       # a holder was replaced by one holding the same tensors
            self.__init__(self.roots)
        return out


def roots_of(fn: Callable, named: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a call of ``fn`` can reach besides its tensors: the module (or a bound method's owner),
    closure cells and the globals its code (a module's ``forward``) names (as slots, so rebinding them counts; not modules,
    functions or classes), and ``named`` (the call's argument objects by name)."""
    roots: dict[str, Any] = {}
    owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
    if owner is not None and not isinstance(owner, types.ModuleType):
        roots[type(owner).__name__] = owner
    func = getattr(fn, "__func__", fn)
    if isinstance(fn, torch.nn.Module):     # what runs is its class's forward: scan that code's closure and globals
        func = getattr(type(fn).forward, "__func__", type(fn).forward)
    code = getattr(func, "__code__", None)
    if code is not None:
        for name, cell in zip(code.co_freevars, func.__closure__ or ()):
            roots[name] = _Slot(cell, name, "cell")
        g = getattr(func, "__globals__", {})
        for name in code.co_names:
            if name in g and not isinstance(g[name], OPAQUE):
                roots.setdefault(name, _Slot(g, name, "item"))
    roots.update(named or {})
    return roots


def root_values(roots: dict[str, Any]) -> list:
    """The objects ``roots`` names (a closure cell's or a global's current value)."""
    return [v.get() if isinstance(v, _Slot) else v for v in roots.values()]


class Sandbox:
    """Runs a function outside a real call any number of times and leaves no trace of any run.

    ``roots`` are the objects the function can reach (see :func:`roots_of`); their bindings are
    checked after every recorded run: a rebound tensor attribute or a changed Python number is put
    back and raises :class:`CaptureError` naming it, since a graph replay could not reproduce it.
    """

    def __init__(self, roots: dict[str, Any], where: str = "the captured function"):
        self.roots, self.where = roots, where
        self.last: WriteLog | None = None
        self.peak_bytes = 0

    def run(self, fn: Callable, *args, **kwargs):
        """Run ``fn`` for real, then undo its writes and check that it rebound nothing."""
        log = WriteLog()
        with self.unexecuted():
            try:
                with log:
                    out = fn(*args, **kwargs)
            finally:
                log.rollback()
        self.last = log
        self.peak_bytes = max(self.peak_bytes, log.nbytes)
        return out

    def run_opaque(self, fn: Callable, *args, **kwargs):
        """Run code whose writes no dispatch mode sees (compiled kernels) and roll back the regions
        the last :meth:`run` wrote: right when ``fn`` computes what that run's function computed,
        from the same state (an inductor build of the traced function)."""
        if self.last is None:
            raise CaptureError("run_opaque() needs a recorded run of the same function first")
        with self.unexecuted():
            try:
                return fn(*args, **kwargs)
            finally:
                self.last.rollback()

    @contextlib.contextmanager
    def unexecuted(self):
        """Python runs but no kernel does (a CUDA graph capture): only bindings can change. Puts them
        back on exit and raises :class:`RebindError` naming them."""
        bindings = Bindings(self.roots)
        ok = False
        try:
            yield
            ok = True
        finally:
            changes = bindings.changes()
            bindings.restore(changes)
            if changes and ok:
                raise _rebind_error(changes, self.where)


def _rebind_error(changes: list[Change], where: str) -> RebindError:
    """The error for bindings a run changed, with the fix that fits what changed."""
    if all(c.before is _MISSING for c in changes):
        fix = ("the state was created during the call (lazy initialization): run one eager call (a prefill) "
               "before capturing, so the tensors exist and the graph can update them in place")
    elif any(isinstance(c.before, torch.Tensor) or isinstance(c.after, torch.Tensor) for c in changes):
        fix = ("update the tensor in place (self.pos.add_(1), self.buf.copy_(new), index_copy_) instead of "
               "assigning a new tensor: a replay writes into the tensor the graph captured")
    else:
        fix = ("keep the value in a device tensor updated in place (a replay runs no Python, so a Python "
               "number stays as it was at capture), or keep it out of the captured function")
    return RebindError([str(c) for c in changes], where=where, fix=fix)
