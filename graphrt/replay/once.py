"""``inductor="once"``: one ``torch.compile`` of the function for every bucket, run inside graphrt's graphs.

``inductor=True`` traces each bucket (``make_fx``, every Python value frozen) and compiles each
trace: an Engine of 2 batch sizes x 7 KV lengths x (exact, masked) compiles 28 graphs, each a
whole chunk in chunk mode. ``"once"`` compiles the function itself with ``torch.compile`` and
automatic dynamic shapes instead: the first bucket compiles with static shapes, the second, whose
KV length (or batch) differs, compiles again with that size symbolic, and every later bucket reuses
it; a structural change (the masked attention of ``kv_exact=False``) adds one more. Each bucket is
then warmed (compiling and tuning before capture) and captured in graphrt's CUDA graph, inductor's
own CUDA graphs off. A second process start finds inductor's caches (the FX graph and Triton
kernel caches) and only retraces.

Dynamo never sees a frame while a dispatch mode is active: graphrt's watchers (the host-read
checker, the write log of a sandboxed run, ``make_fx``) run the function uncompiled, as written, so
they see its ops and its writes. That is also what keeps dynamo from skipping the frame for good (a
first call under a mode marks it skipped).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack


def _compile(fn: Callable, options: dict | None) -> Callable:
    return torch.compile(fn, options=options)


def compiled_once(fn: Callable, options: dict | None = None) -> Callable:
    """``fn`` compiled by ``torch.compile`` (automatic dynamic shapes, inductor ``options``), run
    uncompiled under any dispatch mode. Keeps ``fn``'s signature (``functools.wraps``) and, for a
    bound method, its object (``__self__``), so buckets bind by name and the weights it reads are
    found."""
    compiled = _compile(fn, options)
    module = isinstance(fn, torch.nn.Module)

    @functools.wraps(fn.forward if module else fn)
    def call(*args, **kwargs):
        if _get_current_dispatch_mode_stack():
            return fn(*args, **kwargs)
        return compiled(*args, **kwargs)

    owner = fn if module else getattr(fn, "__self__", None)
    if owner is not None:
        call.__self__ = owner
    return call
