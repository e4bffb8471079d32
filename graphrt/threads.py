"""One thread at a time: the guard the Engine, the VideoPipeline and compiled modules use to refuse
a call from a second thread while another thread's call runs (their static buffers, cache and
block table are one per object: two calls at once would mix them silently).

The guard never waits: a concurrent call is refused with :class:`~graphrt.errors.ConcurrentCallError`
naming the object, the call running and its thread. Calls nest freely within one thread (the
Engine's ``step`` calls its compiled chunk; ``generate`` calls ``open`` and ``step``).
"""
from __future__ import annotations

import functools
import threading

from graphrt.errors import ConcurrentCallError

FIX = "call it from one thread, e.g. a worker that owns it (as graphrt.serve does)"


class OneThread:
    """A non-blocking, reentrant guard: ``with guard("step()"):`` runs in the thread that holds it
    (or takes it when free) and raises :class:`ConcurrentCallError` when another thread holds it."""

    def __init__(self, what: str):
        self.what = what
        self._lock = threading.Lock()
        self._owner: int | None = None    # written only by the thread holding the lock
        self._depth = 0
        self._call = self._thread = None

    def __call__(self, call: str) -> "_Held":
        return _Held(self, call)


class _Held:
    __slots__ = ("guard", "call")

    def __init__(self, guard: OneThread, call: str):
        self.guard, self.call = guard, call

    def __enter__(self):
        g, me = self.guard, threading.get_ident()
        if g._owner == me:                # a nested call in the thread that holds it
            g._depth += 1
            return self
        if not g._lock.acquire(blocking=False):
            running, thread = g._call, g._thread
            raise ConcurrentCallError(
                f"{g.what}.{self.call} was called from thread {threading.current_thread().name!r} while "
                f"{g.what}.{running or 'a call'} runs in thread {thread or 'another thread'!r}",
                expected="one call at a time, from one thread", got="two threads at once", fix=FIX)
        g._owner, g._depth, g._call, g._thread = me, 1, self.call, threading.current_thread().name
        return self

    def __exit__(self, *exc):
        g = self.guard
        g._depth -= 1
        if g._depth == 0:
            g._owner = g._call = g._thread = None
            g._lock.release()
        return False


def one_thread(call: str):
    """Decorate a method so that it runs under ``self._one_thread`` (a :class:`OneThread`)."""
    def wrap(method):
        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            with self._one_thread(call):
                return method(self, *args, **kwargs)
        return guarded
    return wrap
