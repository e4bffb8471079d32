"""Run compiled code under graphrt's watching modes, which cannot see into it.

graphrt runs a forward under modes of its own that watch every op and change none (subclasses of
:class:`WatchingDispatchMode` and :class:`WatchingFunctionMode`):
the write log of a sandboxed run (warm-ups, verify's eager rerun; :mod:`graphrt.capture.undo`) and
the host-read checker (:mod:`graphrt.capture.hostreads`). Code compiled with ``torch.compile``
runs its kernels below the dispatcher, and dynamo will not run a compiled frame while a dispatch
mode is active: it falls back to tracing-free eager, so the code a watched run executes would not
be the code a CUDA graph captures.

:func:`only_watched` says whether every active mode is one of those watchers (then compiled code
may run with them suspended, :func:`call_unwatched`); any other mode (make_fx's proxy mode, a
``FakeTensorMode``, a user's mode) must see the ops themselves, so the caller runs its uncompiled
path instead.
"""
from __future__ import annotations

import contextlib

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, _get_current_dispatch_mode_stack


class WatchingDispatchMode(TorchDispatchMode):
    """A dispatch mode that watches every aten op and changes none (the write log, the host-read
    checker's op hook): compiled code may run with it suspended."""


class WatchingFunctionMode(TorchFunctionMode):
    """A function mode that watches and changes nothing (the host-read checker's call hook)."""


def only_watched(*tensors: torch.Tensor) -> bool:
    """True when no dispatch mode but graphrt's watchers is active and ``tensors`` are plain
    (not fake, not functional): compiled code may then run, under :func:`call_unwatched`."""
    if any(type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter) or torch._is_functional_tensor(t)
           for t in tensors):
        return False
    return all(isinstance(m, WatchingDispatchMode) for m in _get_current_dispatch_mode_stack())


@contextlib.contextmanager
def _function_watchers_suspended():
    """Pop the host-read checker's function mode off the top of the stack (dynamo would trace
    into its bookkeeping); other function modes (``torch.device``) stay for dynamo to honour."""
    popped = []
    try:
        while torch._C._len_torch_function_stack() and isinstance(
                torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1), WatchingFunctionMode):
            popped.append(torch._C._pop_torch_function_stack())
        yield
    finally:
        for mode in reversed(popped):
            torch._C._push_on_torch_function_stack(mode)


def call_unwatched(fn, *args):
    """``fn(*args)`` with graphrt's watchers suspended, for compiled code that writes none of its
    inputs (check :func:`only_watched` first). Its output tensors are then copied once under the
    watchers, so they see what the call made: the write log counts the copies as fresh (a later
    in-place op on them is not rolled back into the run's result) and the host-read checker
    places them on the device. With no watcher active it is ``fn(*args)``, nothing copied."""
    if not _get_current_dispatch_mode_stack():
        with _function_watchers_suspended():
            return fn(*args)
    with _disable_current_modes(), _function_watchers_suspended():
        out = fn(*args)
    return pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, out)
