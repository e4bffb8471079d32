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
read counts once. The stack is walked only when a read is recorded: a clean op costs one set
lookup.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import linecache
import os
import sys
import traceback
from collections import Counter
from dataclasses import dataclass

import torch
from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from graphrt.errors import CaptureError, ConfigError, HostReadError

SCALAR = "scalar read"
SHAPE = "data-dependent shape"
D2H = "device-to-host copy"
H2D = "host-to-device copy"

aten = torch.ops.aten
_ON_CUDA = "; on a CUDA model this copies to the host and syncs (flagged on CPU tensors too)"
_SCALAR_HINT = "pass a Python int that depends only on the bucket, or keep the value on the device"
_MASK_HINT = "use index_copy_/index_select with device indices instead of a boolean mask"
_UNIQUE_HINT = "unique has a data-dependent length: compute it outside the forward"
_D2H_HINT = "keep the tensor on the device" + _ON_CUDA
_PRINT_HINT = "remove the print/format from the forward" + _ON_CUDA
_H2D_HINT = "build the tensor once outside the forward (a static_ device buffer) and update it in place"

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
        src, dst = args[0].device, kwargs.get("device")
        return None if dst is None else _copy_read(src, torch.device(dst))
    if func is aten.copy_.default:
        return _copy_read(args[1].device, args[0].device)
    if func in (aten.lift_fresh.default, aten.lift_fresh_copy.default):
        return None if _cpu(args[0]) else (H2D, _H2D_HINT)  # torch.tensor(data, device="cuda")
    return None


def _copy_read(src: torch.device, dst: torch.device) -> tuple[str, str] | None:
    if src.type != "cpu" and dst.type == "cpu":
        return D2H, _D2H_HINT
    if src.type == "cpu" and dst.type != "cpu":
        return H2D, _H2D_HINT
    return None


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
_HERE = os.path.dirname(os.path.abspath(__file__))
_SKIP_DIRS = tuple(os.path.join(d, "") for d in (
    os.path.dirname(os.path.abspath(torch.__file__)), _HERE, os.path.join(os.path.dirname(_HERE), "replay")))
_SKIP_FILES = frozenset(os.path.abspath(m.__file__) for m in (contextlib, functools))


@functools.lru_cache(maxsize=None)
def _internal(filename: str) -> bool:
    """Torch, graphrt's own capture/replay machinery and stdlib wrappers: never the user's line.

    ``graphrt/models/`` is user code here: the reference model's reads live there.
    """
    path = os.path.abspath(filename)
    return path.startswith(_SKIP_DIRS) or path in _SKIP_FILES


def _user_frame() -> tuple[str, int]:
    frame = sys._getframe(1)
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return "<unknown>", 0
    return os.path.abspath(frame.f_code.co_filename), frame.f_lineno


# -- the report ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostReadSite:
    """One place that reads the host: a kind of read by one op at one line of user code."""

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
    """Every host read of the checked calls: ``sites`` (most frequent first) and ``per_call`` counts."""

    sites: list[HostReadSite]
    per_call: tuple[int, ...]

    @property
    def count(self) -> int:
        return sum(self.per_call)

    @property
    def calls(self) -> int:
        return len(self.per_call)

    @property
    def ok(self) -> bool:
        return self.count == 0

    def raise_if_any(self) -> "HostReadReport":
        """Raise :class:`HostReadError` (whose message holds the table) when there is any read."""
        if not self.ok:
            raise HostReadError(self)
        return self

    def summary(self) -> str:
        if self.ok:
            return f"no host reads in {self.calls} call(s): graph-safe"
        return (f"{self.count} host read(s) at {len(self.sites)} site(s) over {self.calls} call(s); "
                f"per call: {_runs(self.per_call)}")

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


def _runs(counts) -> str:
    """``13, 13, 13, 0`` -> ``"13 (x3), 0"``: per-call counts of a long generation stay one line."""
    groups = []
    for n in counts:
        if groups and groups[-1][0] == n:
            groups[-1][1] += 1
        else:
            groups.append([n, 1])
    return ", ".join(f"{n} (x{k})" if k > 1 else str(n) for n, k in groups)


# -- recording -----------------------------------------------------------------------------------
class HostReadRecorder:
    """Records the host reads of any number of calls into one report.

    ``with recorder: model(...)`` once per call (each ``with`` is one call in ``per_call``),
    then :meth:`report`. Used by :func:`check` (one call) and by the CLI (every forward of a
    multi-chunk generation).
    """

    def __init__(self):
        self._counts: Counter[tuple[str, str, str, int]] = Counter()
        self._hints: dict[tuple[str, str, str, int], str] = {}
        self._per_call: list[int] = []
        self._muted = 0
        self._hooks: contextlib.ExitStack | None = None

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
        self._per_call[-1] += 1

    def report(self) -> HostReadReport:
        sites = [HostReadSite(kind, op, n, file, line, linecache.getline(file, line).strip(),
                              self._hints[(kind, op, file, line)])
                 for (kind, op, file, line), n in self._counts.items()]
        sites.sort(key=lambda s: (-s.count, s.file, s.line, s.kind, s.op))
        return HostReadReport(sites, tuple(self._per_call))


class _DispatchHook(TorchDispatchMode):
    def __init__(self, recorder: HostReadRecorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _WATCHED and not self.recorder._muted:
            read = _aten_read(func, args, kwargs)
            if read is not None:
                self.recorder._record(read[0], str(func), read[1])
        return func(*args, **kwargs)


class _FunctionHook(TorchFunctionMode):
    def __init__(self, recorder: HostReadRecorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        read = None if self.recorder._muted else _python_read(func, args, kwargs)
        if read is None:
            return func(*args, **kwargs)
        self.recorder._record(*read)
        self.recorder._muted += 1  # the aten ops under this call are the same read
        try:
            return func(*args, **kwargs)
        finally:
            self.recorder._muted -= 1


def check(fn, *args, **kwargs) -> HostReadReport:
    """Run ``fn(*args, **kwargs)`` once and report every host read it makes.

    ``check(model, x, t).raise_if_any()`` fails with the table when the forward is not graph-safe.
    """
    recorder = HostReadRecorder()
    with recorder:
        fn(*args, **kwargs)
    return recorder.report()


# -- CLI: python -m graphrt.check ------------------------------------------------------------------
@torch.no_grad()
def _check_wan_tiny(reference: bool = False, chunks: int = 3, seed: int = 0) -> HostReadReport:
    """A short generation of the tiny Wan, one recorded call per chunk (the denoising forwards
    and the clean pass that writes the cache), driven by the real pipeline."""
    from graphrt.models.wan import CausalWan, ReferenceWan, WanConfig
    from graphrt.pipeline import Engine, reference_stream

    torch.manual_seed(seed)
    cfg = WanConfig.preset("tiny")
    context = torch.randn(1, cfg.text_len, cfg.text_dim)
    if reference:
        stream = reference_stream(ReferenceWan(cfg).eval(), context, chunks, seed)
    else:
        stream = Engine(CausalWan(cfg).eval(), mode="eager").stream(context, chunks, seed)
    recorder = HostReadRecorder()
    for _ in range(chunks):
        with recorder:
            next(stream)
    stream.close()
    return recorder.report()


class _TargetCrash(Exception):
    """The check target itself raised (``__cause__``) while ``stage`` ran: exit status 3, not 2."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


def _load_factory(spec: str):
    """``path/to/file.py:factory`` -> (fn, args, kwargs) from ``factory()``."""
    fix = "name a Python file and a function in it that returns (fn, args) or (fn, args, kwargs)"
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        raise ConfigError("cannot read the check target", expected="path/to/file.py:factory", got=spec, fix=fix)
    if not os.path.isfile(path):
        raise ConfigError("check target file not found", where=path, got=os.path.abspath(path), fix=fix)
    module_name = f"_graphrt_check_{abs(hash(os.path.abspath(path)))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up there
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise _TargetCrash(f"importing {path}") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"{path} has no function {name!r}", expected="a callable factory",
                          got=type(factory).__name__, fix=fix)
    try:
        made = factory()
    except Exception as e:
        raise _TargetCrash(f"{name}() in {path}") from e
    if not (isinstance(made, tuple) and len(made) in (2, 3) and callable(made[0])
            and isinstance(made[1], (tuple, list)) and (len(made) == 2 or isinstance(made[2], dict))):
        raise ConfigError(f"{name}() returned something that is not (fn, args) or (fn, args, kwargs)",
                          where=path, expected="(callable, tuple/list[, dict])",
                          got=repr(made)[:200], fix=fix)
    fn, args, kwargs = made if len(made) == 3 else (*made, {})
    return fn, tuple(args), kwargs


def _crash(stage: str, e: BaseException, show_traceback: bool) -> int:
    """Say on stderr that the check could not run (not that it found reads); exit status 3."""
    frames = traceback.extract_tb(e.__traceback__)
    user = [f for f in frames if not _internal(f.filename)] or frames
    if isinstance(e, SyntaxError) and e.filename:
        where = f"{e.filename}:{e.lineno}"
    else:
        where = f"{user[-1].filename}:{user[-1].lineno}" if user else None
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if show_traceback:
        err.print("".join(traceback.format_exception(e)), markup=False)
    err.print(f"error: the check could not run: {stage} raised {type(e).__name__}: {e}"
              + (f"\n  where: {where}" if where else "")
              + ("" if show_traceback else "\n  fix:   run it alone to debug it, or pass --traceback"),
              style="red", markup=False)
    return 3


def main(argv=None) -> int:
    """``python -m graphrt.check``. Exit status: 0 graph-safe, 1 host reads found, 2 bad arguments,
    3 the check could not run (the target file, its factory or the forward raised)."""
    parser = argparse.ArgumentParser(
        prog="python -m graphrt.check",
        description="Run a forward once and list every host read (file:line, kind, count, how to fix). "
                    "Exit status: 0 graph-safe, 1 host reads found, 2 bad arguments, 3 the check could not run.")
    parser.add_argument("target", nargs="?", help="path/to/file.py:factory; factory() returns (fn, args[, kwargs])")
    parser.add_argument("--model", choices=["wan-tiny"], help="a built-in model with random weights")
    parser.add_argument("--reference", action="store_true", help="check the upstream-style ReferenceWan")
    parser.add_argument("--chunks", type=int, default=None, help="chunks to generate with --model (default 3)")
    parser.add_argument("--traceback", action="store_true", help="print the whole traceback when the check crashes")
    try:
        opts = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on bad arguments and 0 on --help
        return exit_.code if isinstance(exit_.code, int) else 2
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)  # logs get the whole table
    try:
        if (opts.target is None) == (opts.model is None):
            raise ConfigError("say what to check: one model or one factory",
                              expected="--model wan-tiny, or path/to/file.py:factory",
                              got=f"model={opts.model}, target={opts.target}")
        if opts.target is not None and (opts.reference or opts.chunks is not None):
            raise ConfigError("--reference and --chunks apply to --model only", got=opts.target)
        chunks = 3 if opts.chunks is None else opts.chunks
        from graphrt.models.wan import WanConfig

        most = WanConfig.preset("tiny").num_chunks      # what one video's cache holds
        if not 1 <= chunks <= most:
            raise ConfigError(f"--chunks must be in 1..{most} (wan-tiny's videos hold {most} chunks)", got=chunks)
        target = _load_factory(opts.target) if opts.target else None
    except ConfigError as e:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {e}", style="red", markup=False)
        return 2
    except _TargetCrash as e:
        return _crash(e.stage, e.__cause__, opts.traceback)

    if target:
        console.print(f"host reads of {opts.target}", style="bold", markup=False)
        try:
            report = check(target[0], *target[1], **target[2])
        except Exception as e:
            return _crash("the checked function", e, opts.traceback)
        console.print(report)
        return 0 if report.ok else 1
    name = "ReferenceWan" if opts.reference else "CausalWan"
    try:
        report = _check_wan_tiny(opts.reference, chunks)
    except Exception as e:
        return _crash(f"{name} (wan-tiny)", e, opts.traceback)
    console.print(f"host reads of {name} (wan-tiny), {chunks} chunk(s) of 4 denoising forwards + the cache pass "
                  "(one call = one chunk)", style="bold", markup=False)
    console.print(report)
    console.print(f"reads per chunk: {_runs(report.per_call)}", markup=False)
    return 0 if report.ok else 1
