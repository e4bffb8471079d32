"""What the bench command lines share: result records as JSON, and the files they write.

Both ``python -m graphrt.bench`` (video chunks) and its LLM presets check their output paths
before anything runs, save the summary after every mode (a run cut short keeps what it
finished), print errors on one line (scripts read one line), and leave no temporary folder
behind when they are stopped (:func:`stops_cleanly`).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from dataclasses import asdict
from typing import Callable

from graphrt.errors import ConfigError


def result_json(result, optional: tuple[str, ...] = ()) -> dict:
    """A mode's result dataclass as JSON: a skipped mode is just its reason; empty ``notes`` and
    ``warnings`` and the ``optional`` fields that are None are left out."""
    if result.skipped:
        return {"skipped": result.skipped}
    d = asdict(result)
    d.pop("skipped")
    for key in ("notes", "warnings"):
        if not d[key]:
            d.pop(key)
    for key in optional:
        if d[key] is None:
            d.pop(key)
    return d


def check_output_path(flag: str, path: str) -> None:
    """``path`` names a file in an existing folder that can be written: checked by opening it for
    append (an existing file stays as it is) and removing it again when this made it, so a
    folder without write permission fails here, not after the first mode ran."""
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))) or os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: cannot write there", expected="a file path in an existing folder", got=path)
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
        if not existed:
            os.remove(path)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write there ({e.strerror})",
                          expected="a file path in a folder you can write to", got=path) from None


def save(summary: dict, json_path: str | None, md_path: str | None, markdown: Callable[[dict], str]) -> None:
    """Write the summary as JSON and as a markdown table, where asked."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=2)
    if md_path:
        with open(md_path, "w") as f:
            f.write(markdown(summary))


def one_line(e: Exception) -> str:
    """A GraphrtError's what / expected / got / fix on one line (scripts read one line)."""
    return "; ".join(" ".join(line.split()) for line in str(e).splitlines() if line.strip())


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def stops_cleanly():
    """For the block, SIGTERM raises ``SystemExit`` (status 143) as Ctrl-C raises
    ``KeyboardInterrupt``, so every ``with``/``finally`` runs on the way out: a bench that is
    killed removes its temporary caches and compile folders. Main thread only (where Python
    runs signal handlers); the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
