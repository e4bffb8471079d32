"""The runtime-state protocol: what an object that owns state across calls (a KV cache, a decoder's
rolling state) offers the capture and the replay.

A runtime state is keyed by identity in a bucket key (the graph uses its tensors live) and
``reset()`` starts a new sequence (``GraphedModule.reset``); ``snapshot()``/``restore()`` save and put
back its state for its owner (a caller that rewinds a sequence, a test). Capture and verification do
not need them: the write log (:mod:`graphrt.capture.undo`) undoes every write of a run. Two
optional protocols add to it: :class:`CaptureGuarded` (redirect writes while capturing) and
:class:`PaddedRows` (send a padded batch's rows to scratch during a replay). Classes implement them
by their methods alone; nothing here imports them.

:class:`ArgumentCheck` is the hook for argument objects the capture cannot judge alone (a
transformers cache whose layout a graph cannot replay): the layer that knows them registers a check
with :func:`register_argument_check`, and the replay runs it before each capture.
"""
from __future__ import annotations

import contextlib
from typing import Any, Mapping, Protocol, runtime_checkable


@runtime_checkable
class RuntimeState(Protocol):
    """State a graph reads and writes live, matched by identity in a bucket key."""

    def snapshot(self, data: bool = False) -> Any:
        """The state's Python-side values (and with ``data``, its tensors' contents)."""

    def restore(self, snap: Any) -> None:
        """Put back what :meth:`snapshot` returned."""

    def reset(self) -> None:
        """Empty the state for a new sequence (positions, lengths, block tables)."""


@runtime_checkable
class CaptureGuarded(Protocol):
    def capture_guard(self) -> contextlib.AbstractContextManager:
        """While capturing, keep writes away from live state."""


@runtime_checkable
class PaddedRows(Protocol):
    def pad_rows(self, start: int, stop: int) -> contextlib.AbstractContextManager:
        """While a padded request replays, rows ``start:stop`` go to scratch."""


def is_runtime_state(obj) -> bool:
    """An instance (not a class) that implements :class:`RuntimeState` with callable methods."""
    return not isinstance(obj, type) and isinstance(obj, RuntimeState) and \
        all(callable(getattr(obj, m, None)) for m in ("snapshot", "restore", "reset"))


@runtime_checkable
class ArgumentCheck(Protocol):
    """Refuses, before a capture, an argument object a graph cannot replay (with the reason)."""

    def applies(self, obj: Any) -> bool:
        """Whether this check judges ``obj``."""

    def check(self, obj: Any, path: str, batch: int | None, call: Mapping[str, Any]) -> None:
        """Raise a :class:`~graphrt.errors.GraphrtError` when ``obj`` (the argument at ``path``) cannot
        be replayed; ``batch``: the bucket's rows (None without batch buckets); ``call``: every leaf
        of the call by path."""


_ARGUMENT_CHECKS: list[ArgumentCheck] = []


def register_argument_check(check: ArgumentCheck) -> ArgumentCheck:
    """Run ``check`` on every argument object it applies to before each capture (once per check)."""
    if not isinstance(check, ArgumentCheck):
        raise TypeError(f"{type(check).__name__} does not implement ArgumentCheck (applies, check)")
    if all(type(c) is not type(check) for c in _ARGUMENT_CHECKS):
        _ARGUMENT_CHECKS.append(check)
    return check


def argument_checks() -> tuple[ArgumentCheck, ...]:
    return tuple(_ARGUMENT_CHECKS)
