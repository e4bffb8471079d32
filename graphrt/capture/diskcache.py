"""Compiled graphs kept on disk, so a second start of the same engine does not compile again.

An inductor compile of one whole-chunk bucket takes minutes on a CPU; loading the compiled
package takes milliseconds. :class:`DiskCache` keeps one file per artifact under a directory:

- ``cache_dir=`` (an argument of :func:`graphrt.compile` and :class:`~graphrt.pipeline.Engine`),
  else ``$GRAPHRT_CACHE_DIR``, else ``$XDG_CACHE_HOME/graphrt`` (``~/.cache/graphrt``);
  ``cache_dir=False`` keeps nothing on disk.
- A key is the SHA-256 of the parts that decide what was compiled (see
  :func:`graphrt.capture.aot.artifact_key`): the traced graph's code, the shape, stride, dtype
  and device of every input, the compile options, torch's version, the CPU's vector ISA and the
  thread count inductor builds its loops for. Weights and cache contents are inputs, not part
  of an artifact, so the key names no values.
- Writes are atomic (a temporary file renamed into place), so concurrent processes that
  compile the same bucket both end up with one whole file.
- Each artifact's SHA-256 is stored in the ``.json`` beside it and checked before the file is
  handed to a loader: a compiled package with flipped bytes can crash the process inside the
  loader, so a file whose digest does not match (or has no record) is never loaded. It is
  dropped, counted in :attr:`DiskCache.errors`, and the caller compiles again; a file that
  passes the check but fails to load is dropped the same way.
- A folder that cannot be written is found before anything is compiled: a ``cache_dir=`` the
  caller named is refused (:class:`~graphrt.errors.ConfigError`); the default folder falls
  back to no disk cache with one warning.

The directory may be deleted at any time: it only saves compile time.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from graphrt.errors import ConfigError

ENV = "GRAPHRT_CACHE_DIR"


def default_dir() -> Path:
    """``$GRAPHRT_CACHE_DIR``, else the user cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``) / graphrt."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "graphrt"


@dataclass
class DiskCache:
    """One directory of compiled artifacts, with hit/miss counters for this process."""

    root: Path
    hits: int = 0
    misses: int = 0
    stores: int = 0
    errors: int = 0
    _checked: bool = field(default=False, repr=False)

    @classmethod
    def resolve(cls, cache_dir) -> "DiskCache | None":
        """``None``: the default directory; ``False``: no disk cache; a path: that directory."""
        if cache_dir is False:
            return None
        if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
            raise ConfigError("cache_dir must be a path, None (the default directory) or False (no disk cache)",
                              got=type(cache_dir).__name__)
        cache = cls(Path(cache_dir).expanduser() if cache_dir is not None else default_dir())
        try:
            cache._ready()                  # before any compile: its result would be lost
        except ConfigError:
            if cache_dir is not None:
                raise
            warnings.warn(f"graphrt: the graph cache folder {cache.root} is not writable; compiled graphs are not kept on disk (set ${ENV} or "
                          f"cache_dir= to a writable folder)", stacklevel=3)
            return None
        return cache

    def _ready(self) -> None:
        if self._checked:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-", delete=True)
            probe.close()
        except OSError as e:
            raise ConfigError(f"the graph cache directory {self.root} is not writable: {e}",
                              fix=f"pass cache_dir= a writable folder, set ${ENV}, or cache_dir=False") from None
        self._checked = True

    def path(self, key: str, suffix: str = ".pt2") -> Path:
        return self.root / key[:2] / f"{key}{suffix}"

    def get(self, key: str, suffix: str = ".pt2") -> Path | None:
        """The artifact stored under ``key``, or None (counted as a miss)."""
        p = self.path(key, suffix)
        if p.is_file():
            if self._intact(p):
                self.hits += 1
                return p
            self.drop(key, suffix)
        self.misses += 1
        return None

    @staticmethod
    def _digest(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    def _intact(self, p: Path) -> bool:
        """Whether ``p`` has the SHA-256 recorded beside it when it was stored."""
        try:
            recorded = json.loads(p.with_suffix(".json").read_text()).get("sha256")
            return isinstance(recorded, str) and recorded == self._digest(p)
        except (OSError, ValueError, AttributeError):
            return False

    def put(self, key: str, src: Path, meta: dict, suffix: str = ".pt2") -> Path:
        """Move the file ``src`` into the cache under ``key`` (atomically), with a readable
        ``.json`` of what it is next to it. Returns its path in the cache."""
        self._ready()
        dst = self.path(key, suffix)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        h = hashlib.sha256()
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while block := fin.read(1 << 20):
                h.update(block)
                fout.write(block)
        info = dst.with_suffix(".json")
        tmp_info = info.with_name(f".{info.name}.{os.getpid()}.tmp")
        tmp_info.write_text(json.dumps(dict(meta, sha256=h.hexdigest()), indent=1, sort_keys=True, default=str))
        os.replace(tmp, dst)
        os.replace(tmp_info, info)
        self.stores += 1
        return dst

    def drop(self, key: str, suffix: str = ".pt2") -> None:
        """Remove a stored artifact that could not be loaded (counted in :attr:`errors`)."""
        self.errors += 1
        for p in (self.path(key, suffix), self.path(key, suffix).with_suffix(".json")):
            try:
                p.unlink()
            except OSError:
                pass
