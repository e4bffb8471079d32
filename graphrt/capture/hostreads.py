"""Find every host read in a forward and name the line of user code that made it.

A CUDA graph replays kernels with every argument frozen at capture. A forward that reads a
device value on the host (``.item()``, ``.tolist()``, ``if tensor:``), sizes a tensor by its
data (``nonzero``, a boolean mask) or copies between host and device inside the forward either
cannot be captured or replays a stale value. :func:`check` runs the forward once, eagerly, and
lists each such read with its kind, how often it fired, its file:line and how to remove it.

Two hooks see every read, also on the CPU:

- a ``TorchDispatchMode`` sees every aten op: ``.item()``, ``int(t)`` and ``if t:`` are all
  ``aten._local_scalar_dense``; ``nonzero`` and boolean masks are ops of their own;
- a ``TorchFunctionMode`` sees the Python-level calls that dispatch nothing on a CPU tensor
  (``.tolist()``, ``.cpu()``, ``.numpy()``, ``repr``) but copy to the host and sync on CUDA.

A read the function mode records mutes the dispatch mode for the rest of that call, so each
read counts once. The stack is walked only when a read is recorded.

Besides reads (which sync on CUDA and are what ``count`` tallies), the report names what a CUDA
graph would freeze or cannot hold, each by file:line, and a capture refuses them as it refuses
reads:

- a host value: a 0-dim CPU tensor as an operand of a device op (``x * self.scale``, a
  scheduler's ``sigmas[i]``): CUDA passes its value as a kernel argument, so the graph keeps the
  value it had at capture. On a CUDA model this is exact (the tensor is on the CPU, an argument
  too: graphrt's static buffer for it stays on the CPU, where the graph never reads it). On a CPU
  model every tensor is on the CPU, so a 0-dim tensor counts as a host value when it comes from
  outside the call and is not an argument, a module's parameter or buffer or a runtime state's
  tensor (where a GPU user keeps scalars on the host: plain attributes, scheduler tables);
- a host tensor: a factory call without ``device=`` (``torch.arange(n)``), which builds the
  tensor on the host of a CUDA model;
- an async upload: a pinned, non-blocking host-to-device copy. It does not sync, so it is not a
  read (a per-chunk upload outside the graph costs nothing), but inside a graph the replay would
  copy from a host buffer that no longer holds the capture's data.

Random draws are reported as notes (they do not stop a capture): each replay draws new numbers,
so a replay differs from an eager rerun.
"""
from __future__ import annotations

import contextlib
import functools
import io
import linecache
import os
import sys
from collections import Counter
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from graphrt.capture.state import is_runtime_state
from graphrt.capture.tensors import is_transformers_cache, reachable_tensors, split_args, storage_key
from graphrt.capture.watch import WatchingDispatchMode, WatchingFunctionMode
from graphrt.errors import CaptureError, HostReadError

SCALAR = "scalar read"
SHAPE = "data-dependent shape"
D2H = "device-to-host copy"
H2D = "host-to-device copy"
HOST_VALUE = "host value"            # frozen into a CUDA graph at capture
HOST_TENSOR = "host tensor"          # a factory without a device
ASYNC_H2D = "async upload"           # pinned non-blocking copy: no sync, but not in a graph
RNG = "random draw"                  # a note: replays draw new numbers
READS = frozenset({SCALAR, SHAPE, D2H, H2D})        # sync on CUDA: what ``count`` tallies
HAZARDS = frozenset({HOST_VALUE, HOST_TENSOR, ASYNC_H2D})
NOTES = frozenset({RNG})

aten = torch.ops.aten
_ON_CUDA = "; on a CUDA model this copies to the host and syncs (flagged on CPU tensors too)"
_SCALAR_HINT = "pass a Python int that depends only on the bucket, or keep the value on the device"
_MASK_HINT = "use index_copy_/index_select with device indices instead of a boolean mask"
_UNIQUE_HINT = "unique has a data-dependent length: compute it outside the forward"
_D2H_HINT = "keep the tensor on the device" + _ON_CUDA
_PRINT_HINT = "remove the print/format from the forward" + _ON_CUDA
_H2D_HINT = "build the tensor once outside the forward (a static_ device buffer) and update it in place"
_HOST_VALUE_HINT = ("a CUDA graph keeps this host scalar's value from capture: keep it on the device (a buffer "
                    "or runtime-state tensor updated in place) or pass a Python number and make it a bucket key")
_HOST_TENSOR_HINT = ("pass device= (for example x.device): on a CUDA model this tensor is built on the host, "
                     "so it is a device mismatch, a copy inside the graph or a value frozen at capture")
_ASYNC_HINT = ("upload outside the captured region into a static device buffer: a replay would copy from a "
               "host buffer that no longer holds the capture's data")
_RNG_HINT = ("every replay draws new numbers (a replay never equals an eager rerun); draw outside the graph, "
             "or use counter-based noise seeded by device tensors (graphrt.noise)")

# aten ops that are a host read whatever their arguments: op -> (kind, hint)
_ALWAYS = {
    aten._local_scalar_dense.default: (SCALAR, _SCALAR_HINT),
    aten.equal.default: (SCALAR, "compare on the device (torch.eq(a, b).all()) and keep the result there"),
    aten.allclose.default: (SCALAR, "compare on the device (torch.isclose(a, b).all()) and keep the result there"),
    aten.nonzero.default: (SHAPE, "use torch.where(mask, a, b), masked_fill, or nonzero_static(size=...)"),
    aten.masked_select.default: (SHAPE, "keep the shape: torch.where(mask, x, 0) instead of masked_select"),
    aten._unique2.default: (SHAPE, _UNIQUE_HINT),
    aten.unique_dim.default: (SHAPE, _UNIQUE_HINT),
    aten.unique_consecutive.default: (SHAPE, _UNIQUE_HINT),
    aten.bincount.default: (SHAPE, "scatter_add_ into a zeros tensor of a static size instead of bincount"),
}
# aten ops that are a host read for some arguments only: see _aten_read
_SOMETIMES = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten.repeat_interleave.Tensor,
              aten._to_copy.default, aten.copy_.default, aten.lift_fresh.default, aten.lift_fresh_copy.default}
_WATCHED = frozenset(_ALWAYS) | _SOMETIMES

# Python-level calls that dispatch nothing on a CPU tensor: function -> (kind, op, hint)
_PY_READS = {
    torch.Tensor.tolist: (SCALAR, "Tensor.tolist", "keep the values on the device (index with them), "
                                                   "or pass Python ints that depend only on the bucket"),
    torch.Tensor.numpy: (D2H, "Tensor.numpy", _D2H_HINT),
    torch.Tensor.__array__: (D2H, "Tensor.__array__", _D2H_HINT),   # np.asarray(t), np.array(t)
    torch.Tensor.cpu: (D2H, "Tensor.cpu", _D2H_HINT),
    torch.Tensor.__repr__: (D2H, "Tensor.__repr__", _PRINT_HINT),
    torch.Tensor.__format__: (D2H, "Tensor.__format__", _PRINT_HINT),
}


def _is_mask(index) -> bool:
    return index is not None and index.dtype in (torch.bool, torch.uint8)


def _cpu(t) -> bool:
    return t.device.type == "cpu"


def _aten_read(func, args, kwargs) -> tuple[str, str] | None:
    """(kind, hint) when this aten call reads the host, else None."""
    if func in _ALWAYS:
        return _ALWAYS[func]
    if func is aten.index.Tensor:
        return (SHAPE, _MASK_HINT) if any(_is_mask(i) for i in args[1]) else None
    if func in (aten.index_put.default, aten.index_put_.default):
        indices, values = [i for i in args[1] if i is not None], args[2]
        if not any(_is_mask(i) for i in indices):
            return None
        if len(indices) == 1 and values.numel() == 1 and _cpu(values):
            return None  # one mask and a CPU scalar run as masked_fill_, which never syncs
        return SHAPE, "use torch.where(mask, values, x) instead of assigning through a boolean mask"
    if func is aten.repeat_interleave.Tensor:
        return None if kwargs.get("output_size") is not None else (SHAPE, "pass repeat_interleave an output_size")
    if func is aten._to_copy.default:
        dst = kwargs.get("device")
        return None if dst is None else _copy_read(args[0], torch.device(dst), kwargs.get("non_blocking", False))
    if func is aten.copy_.default:
        return _copy_read(args[1], args[0].device, args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    if func in (aten.lift_fresh.default, aten.lift_fresh_copy.default):
        return None if _cpu(args[0]) else (H2D, _H2D_HINT)  # torch.tensor(data, device="cuda")
    return None


def _copy_read(src: torch.Tensor, dst: torch.device, non_blocking: bool) -> tuple[str, str] | None:
    """A copy between host and device: a read, or (pinned and non-blocking upload) an async upload."""
    if src.device.type != "cpu" and dst.type == "cpu":
        return D2H, _D2H_HINT
    if src.device.type == "cpu" and dst.type != "cpu":
        kind = copy_kind(non_blocking, src.is_pinned())
        return kind, _ASYNC_HINT if kind == ASYNC_H2D else _H2D_HINT
    return None


def copy_kind(non_blocking: bool, pinned: bool) -> str:
    """A host-to-device copy syncs unless it is non-blocking from pinned memory."""
    return ASYNC_H2D if non_blocking and pinned else H2D


# factories that build a tensor from nothing: without ``device=`` they build it on the host
_FACTORIES = frozenset({
    torch.arange, torch.zeros, torch.ones, torch.empty, torch.full, torch.rand, torch.randn, torch.randint,
    torch.randperm, torch.linspace, torch.logspace, torch.eye, torch.tensor, torch.as_tensor,
    torch.scalar_tensor, torch.empty_strided, torch.tril_indices, torch.triu_indices})


def _factory_without_device(func, args, kwargs) -> bool:
    if func not in _FACTORIES or kwargs.get("device") is not None or "out" in kwargs:
        return False
    return not (func in (torch.tensor, torch.as_tensor) and args and isinstance(args[0], torch.Tensor))


def _python_read(func, args, kwargs) -> tuple[str, str, str] | None:
    """(kind, op, hint) when this Python-level tensor call reads the host, else None."""
    if func in _PY_READS:
        return _PY_READS[func]
    if func is torch.Tensor.to and args and isinstance(args[0], torch.Tensor):
        try:
            device = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
        except (TypeError, RuntimeError):
            return None  # let the real call raise
        # ``.to(x.device)`` on a CPU model follows the model; only a literal "cpu" stays CPU on CUDA.
        named = any(isinstance(a, str) for a in args[1:]) or isinstance(kwargs.get("device"), str)
        if device is not None and device.type == "cpu" and (named or not _cpu(args[0])):
            return D2H, "Tensor.to", _D2H_HINT
    return None


# -- where: the innermost frame of user code -----------------------------------------------------
_SKIP_DIRS: list[str] = [os.path.join(d, "") for d in (os.path.dirname(os.path.abspath(torch.__file__)),
                                                      os.path.dirname(os.path.abspath(__file__)))]
_SKIP_FILES: set[str] = {os.path.abspath(m.__file__) for m in (contextlib, functools)}


def mark_internal(*paths: str) -> None:
    """Count frames in ``paths`` (files, or folders and everything under them) as machinery, never the
    user's line: a layer above capture that runs the user's function (replay) marks its own files."""
    for p in paths:
        p = os.path.abspath(p)
        if os.path.isdir(p):
            _SKIP_DIRS.append(os.path.join(p, ""))
        else:
            _SKIP_FILES.add(p)
    is_internal.cache_clear()


@functools.lru_cache(maxsize=None)
def is_internal(filename: str) -> bool:
    """Torch, graphrt's own capture machinery (and what layers above marked with :func:`mark_internal`)
    and stdlib wrappers: never the user's line.

    ``graphrt/models/`` is user code here: the reference model's reads live there.
    """
    path = os.path.abspath(filename)
    return path.startswith(tuple(_SKIP_DIRS)) or path in _SKIP_FILES


def _user_frame() -> tuple[str, int]:
    frame = sys._getframe(1)
    while frame is not None and is_internal(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return "<unknown>", 0
    return os.path.abspath(frame.f_code.co_filename), frame.f_lineno


# -- the report ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostReadSite:
    """One place that touches the host: a kind of read (or hazard, or note) by one op at one line."""

    kind: str
    op: str
    count: int
    file: str
    line: int
    code: str
    hint: str

    @property
    def where(self) -> str:
        """``file:line``, the file relative to the working directory when it is inside it."""
        rel = os.path.relpath(self.file) if self.file.startswith(os.path.join(os.getcwd(), "")) else self.file
        return f"{rel}:{self.line}"


@dataclass(frozen=True)
class HostReadReport:
    """What the checked calls did with the host.

    ``sites``: every site (most frequent first); ``per_call``: host reads (syncs) per call, so
    ``count`` is what a replay would wait for. Hazards (host values, host tensors, async uploads)
    are not reads but a graph cannot hold them either; notes (random draws) never stop a capture.
    """

    sites: list[HostReadSite]
    per_call: tuple[int, ...]

    @property
    def count(self) -> int:
        """Host reads: each one a sync on CUDA."""
        return sum(self.per_call)

    @property
    def calls(self) -> int:
        return len(self.per_call)

    @property
    def hazards(self) -> list[HostReadSite]:
        """Sites that are not reads but that a CUDA graph would freeze or cannot hold."""
        return [s for s in self.sites if s.kind in HAZARDS]

    @property
    def notes(self) -> list[HostReadSite]:
        """Random draws: a replay draws new numbers (reported, never refused)."""
        return [s for s in self.sites if s.kind in NOTES]

    @property
    def uploads(self) -> int:
        """Pinned non-blocking host-to-device copies (no sync; outside a graph they cost nothing)."""
        return sum(s.count for s in self.sites if s.kind == ASYNC_H2D)

    @property
    def ok(self) -> bool:
        """Graph-safe: no reads and no hazards (notes allowed)."""
        return self.count == 0 and not self.hazards

    def raise_if_any(self) -> "HostReadReport":
        """Raise :class:`HostReadError` (whose message holds the table) unless :attr:`ok`."""
        if not self.ok:
            raise HostReadError(self)
        return self

    def summary(self) -> str:
        hazards = sum(s.count for s in self.hazards)
        notes = sum(s.count for s in self.notes)
        tail = (f"; {hazards} host value(s)/tensor(s)/upload(s) a graph cannot hold" if hazards else "") + \
               (f"; {notes} random draw(s): replays draw new numbers" if notes else "")
        if self.ok:
            return f"no host reads in {self.calls} call(s): graph-safe{tail}"
        return (f"{self.count} host read(s) at {len([s for s in self.sites if s.kind in READS])} site(s) over "
                f"{self.calls} call(s); per call: {per_call_text(self.per_call)}{tail}")

    def table(self) -> Table:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False)
        for name in ("kind", "op", "count", "where", "code", "hint"):
            table.add_column(name, justify="right" if name == "count" else "left",
                             overflow="fold" if name in ("op", "where") else "ellipsis")
        for s in self.sites:   # Text, not markup: code such as x[mask] must show its [...]
            table.add_row(*(Text(c) for c in (s.kind, s.op, str(s.count), s.where, s.code, s.hint)))
        return table

    def __rich__(self):
        return Group(self.table(), Text(self.summary())) if self.sites else Text(self.summary())

    def __str__(self) -> str:
        out = io.StringIO()
        Console(file=out, width=200, color_system=None, force_terminal=False, highlight=False).print(self)
        return "\n".join(line.rstrip() for line in out.getvalue().rstrip().splitlines())


def per_call_text(counts) -> str:
    """``13, 13, 13, 0`` -> ``"13 (x3), 0"``: per-call counts of a long generation stay one line."""
    groups = []
    for n in counts:
        if groups and groups[-1][0] == n:
            groups[-1][1] += 1
        else:
            groups.append([n, 1])
    return ", ".join(f"{n} (x{k})" if k > 1 else str(n) for n, k in groups)


# -- where a tensor lives ----------------------------------------------------------------------------
def device_tensors(*objs, through=(), depth: int = 3) -> list[torch.Tensor]:
    """The tensors that live on the model's device, for telling host values apart on a CPU model.

    From ``objs`` (the call's arguments, runtime states): every tensor, and every tensor the
    objects among them hold (a transformers ``Cache`` or a dataclass passed in is state the call
    updates), looked up ``depth`` levels into attributes and containers. From ``through`` (a
    method's owner, closure cells): only what the state holders found inside hold (runtime states,
    transformers caches) and modules' parameters and buffers. A plain tensor attribute of a module
    or of an owner object is not among them: ``model.to(device)`` leaves it on the host.
    """
    return list(reachable_tensors(objs, through=through, depth=depth,
                                  holds_state=lambda x: is_runtime_state(x) or is_transformers_cache(x)))


class _Placement:
    """Which tensors of a call live on the device, so a 0-dim CPU tensor can be told to be a host
    value. Exact on a CUDA model (the device says it); on a CPU model: the known device tensors,
    what ops make from them and factories make; every other tensor from outside the call is host."""

    def __init__(self, known=()):
        self._device = {storage_key(t): True for t in known}
        self._const: dict = {}           # CPU storages the call made from constants only

    def on_device(self, t: torch.Tensor) -> bool:
        if t.device.type != "cpu" or isinstance(t, torch.nn.Parameter):
            return True
        return self._device.get(storage_key(t), False)

    def host_operands(self, read: list[torch.Tensor], written: list[torch.Tensor]) -> bool:
        """A 0-dim host tensor read next to a device tensor in one op. Scalars the call itself
        built (``torch.where(m, x, 0.0)``, ``y[m] = 1.0``) are constants, not host values.

        Next to an operand on a real device (CUDA; meta stands in for it in tests) every CPU
        tensor is a host value but the call's own constants, whatever ``known`` says: an argument
        counts as on the device only for a CPU model, where every tensor is on the CPU."""
        operands = read + written
        off_cpu = any(t.device.type != "cpu" for t in operands)

        def host(t: torch.Tensor) -> bool:
            if t.dim() != 0:
                return False
            if off_cpu and t.device.type == "cpu":
                return not self._const.get(storage_key(t), False)
            return not self.on_device(t)

        return any(map(host, read)) and any(map(self.on_device, operands))

    def produced(self, inputs: list[torch.Tensor], out, on_device: bool | None = None) -> None:
        # a constant: a lift or a factory, or made from constants and device tensors alone (a
        # device-to-host copy is reported where it happens)
        const = on_device is True or all(t.device.type != "cpu" or self._const.get(storage_key(t), False)
                                         for t in inputs)
        if on_device is None:       # a factory (no tensor input) builds on the device it names
            on_device = not inputs or any(map(self.on_device, inputs))
        for o in pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                self._device[storage_key(o)] = on_device
                self._const[storage_key(o)] = const


def _draws_random(func, args, kwargs) -> bool:
    """A seeded op that draws: attention and dropout ops are seeded but draw nothing at p = 0."""
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return False
    for i, a in enumerate(func._schema.arguments):
        if a.name in ("dropout_p", "p", "train"):
            v = args[i] if i < len(args) else kwargs.get(a.name, a.default_value)
            if not v:
                return False
    return True


_LIFTS = frozenset({aten.lift_fresh.default, aten.lift_fresh_copy.default})


# -- recording -----------------------------------------------------------------------------------
class HostReadRecorder:
    """Records the host reads (and hazards and notes) of any number of calls into one report.

    ``with recorder: model(...)`` once per call (each ``with`` is one call in ``per_call``),
    then :meth:`report`. Used by :func:`check` (one call), by capture, and by the CLI (every
    forward of a multi-chunk generation). ``known``: tensors that live on the device (arguments,
    parameters, runtime state; see :func:`device_tensors`), for telling host values apart on a
    CPU model.
    """

    def __init__(self, known=()):
        self._counts: Counter[tuple[str, str, str, int]] = Counter()
        self._hints: dict[tuple[str, str, str, int], str] = {}
        self._per_call: list[int] = []
        self._muted = 0
        self._hooks: contextlib.ExitStack | None = None
        self._placement = _Placement(known)

    def __enter__(self) -> "HostReadRecorder":
        if self._hooks is not None:
            raise CaptureError("this HostReadRecorder is already recording", fix="use one `with recorder:` at a time")
        self._per_call.append(0)
        self._hooks = contextlib.ExitStack()
        self._hooks.enter_context(_FunctionHook(self))
        self._hooks.enter_context(_DispatchHook(self))
        return self

    def __exit__(self, *exc) -> None:
        hooks, self._hooks = self._hooks, None
        hooks.close()

    def _record(self, kind: str, op: str, hint: str) -> None:
        key = (kind, op, *_user_frame())
        self._counts[key] += 1
        self._hints[key] = hint
        if kind in READS:
            self._per_call[-1] += 1

    def report(self) -> HostReadReport:
        sites = [HostReadSite(kind, op, n, file, line, linecache.getline(file, line).strip(),
                              self._hints[(kind, op, file, line)])
                 for (kind, op, file, line), n in self._counts.items()]
        sites.sort(key=lambda s: (-s.count, s.file, s.line, s.kind, s.op))
        return HostReadReport(sites, tuple(self._per_call))


class _DispatchHook(WatchingDispatchMode):
    def __init__(self, recorder: HostReadRecorder):
        super().__init__()
        self.supports_higher_order_operators = True   # FlexAttention is a higher-order op: it runs as it is
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.recorder
        if isinstance(func, torch._ops.HigherOrderOperator):
            out = func(*args, **kwargs)
            rec._placement.produced([], out, on_device=True)
            return out
        reads, writes = split_args(func, args, kwargs)
        tensors = reads + writes
        if not rec._muted:
            read = _aten_read(func, args, kwargs) if func in _WATCHED else None
            if read is not None:
                rec._record(read[0], str(func), read[1])
            elif rec._placement.host_operands(reads, writes):
                rec._record(HOST_VALUE, str(func), _HOST_VALUE_HINT)
            if _draws_random(func, args, kwargs):
                rec._record(RNG, str(func), _RNG_HINT)
        out = func(*args, **kwargs)
        if func is not aten.copy_.default:          # a copy_ target stays where it was
            # torch.tensor(...) lifts a constant the call built (a missing device= is reported apart)
            rec._placement.produced(tensors, out, on_device=True if func in _LIFTS else None)
        return out


class _FunctionHook(WatchingFunctionMode):
    def __init__(self, recorder: HostReadRecorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.recorder
        if not rec._muted and _factory_without_device(func, args, kwargs):
            rec._record(HOST_TENSOR, f"torch.{func.__name__}", _HOST_TENSOR_HINT)
        read = None if rec._muted else _python_read(func, args, kwargs)
        if read is None:
            return func(*args, **kwargs)
        rec._record(*read)
        rec._muted += 1  # the aten ops under this call are the same read
        try:
            return func(*args, **kwargs)
        finally:
            rec._muted -= 1


def check(fn, *args, **kwargs) -> HostReadReport:
    """Run ``fn(*args, **kwargs)`` once and report every host read it makes (and every host
    value, host tensor, upload and random draw; see the module docstring).

    ``check(model, x, t).raise_if_any()`` fails with the table when the forward is not graph-safe.
    """
    owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
    recorder = HostReadRecorder(known=device_tensors(args, kwargs, through=(owner,)))
    with recorder:
        fn(*args, **kwargs)
    return recorder.report()
