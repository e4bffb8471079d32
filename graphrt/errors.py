"""One error hierarchy for graphrt.

A message says what went wrong, where, expected vs got, and how to fix it. ``_msg`` builds
that shape so every error reads the same way.
"""
from __future__ import annotations


def _msg(what: str, *, expected=None, got=None, where: str | None = None, fix: str | None = None) -> str:
    lines = [what]
    if where:
        lines.append(f"  where:    {where}")
    if expected is not None:
        lines.append(f"  expected: {expected}")
    if got is not None:
        lines.append(f"  got:      {got}")
    if fix:
        lines.append(f"  fix:      {fix}")
    return "\n".join(lines)


class GraphrtError(Exception):
    """Base class of every error graphrt raises on purpose."""

    def __init__(self, what: str, **parts):
        super().__init__(_msg(what, **parts))


class ConfigError(GraphrtError, ValueError):
    """A configuration that cannot work (shapes that do not divide, unknown preset, ...)."""


class InputError(GraphrtError, ValueError):
    """An argument of the wrong shape, dtype or device."""


class CheckpointError(GraphrtError, KeyError):
    """A checkpoint whose keys or shapes do not match the model."""

    def __str__(self):  # KeyError would repr() the message
        return self.args[0]


class CacheError(GraphrtError, RuntimeError):
    """A cache request that cannot be served: no free slab, a session past ``max_frames``, ..."""


class BackendUnavailableError(GraphrtError, RuntimeError):
    """An attention or graph backend that cannot serve this request on this machine."""


class HostReadError(GraphrtError, RuntimeError):
    """A forward that reads device values on the host (or holds a host value, a host tensor or an
    upload a graph cannot keep), so it cannot be captured as a graph."""

    def __init__(self, report):
        self.report = report
        notes = report.notes
        blocking = [s for s in report.sites if s not in notes]
        first = blocking[0] if blocking else None
        hazards = sum(s.count for s in report.hazards)
        super().__init__(f"{report.count} host read(s) and {hazards} host value(s)/tensor(s)/upload(s) in a "
                         "forward that must be graph-safe",
                         where=first and first.where, expected="no host reads, values or tensors",
                         got=f"{report.count + hazards} at {len(blocking)} site(s)",
                         fix=f"remove each as its hint says (python -m graphrt.check lists them):\n{report}")


class CaptureError(GraphrtError, RuntimeError):
    """Capture was asked for something it cannot do (sealed set of graphs, bad spec, ...)."""


class BucketMissError(GraphrtError, KeyError):
    """A request that no captured bucket serves."""

    def __str__(self):
        return self.args[0]


class SignatureError(InputError):
    """A replay whose inputs do not match the captured signature (shape, dtype, device)."""


class ParallelError(GraphrtError, RuntimeError):
    """A sequence-parallel run whose ranks cannot go on together (one failed or left at start-up)."""


class ReplayMismatchError(GraphrtError, AssertionError):
    """A graph replay that differs from the eager forward on the same inputs."""


class GraphrtWarning(UserWarning):
    """Something graphrt does that works but may surprise (a captured function that draws random
    numbers: every replay draws new ones)."""


class RebindError(CaptureError):
    """A captured function that rebinds state (a tensor attribute, a Python number) instead of
    updating tensors in place: a graph replay runs no Python, so it cannot reproduce that.
    ``changes`` lists each binding as ``path: before -> after``."""

    def __init__(self, changes: list[str], *, where: str, fix: str):
        self.changes = changes
        more = len(changes) - 8
        shown = "\n            ".join(changes[:8] + ([f"... {more} more"] if more > 0 else []))
        super().__init__("the captured function changed state that a graph replay cannot reproduce", where=where,
                         expected="only in-place writes to existing tensors",
                         got=f"{len(changes)} binding(s) changed during the call:\n            {shown}", fix=fix)


# what each optional feature imports, by extra of pyproject.toml (module name: pip name)
EXTRAS = {
    "video": {"transformers": "transformers", "diffusers": "diffusers", "av": "av"},
    "llm": {"transformers": "transformers"},
    "serve": {"transformers": "transformers", "diffusers": "diffusers", "starlette": "starlette",
              "uvicorn": "uvicorn", "websockets": "websockets", "prometheus_client": "prometheus-client",
              "PIL": "pillow"},
}


def missing_extra(prog: str, extra: str) -> str | None:
    """One line saying which packages of the ``extra`` that ``prog`` needs are not installed, and
    how to install them; ``None`` when all are. A command line prints it and exits 2."""
    import importlib.util

    missing = [pip for module, pip in EXTRAS[extra].items() if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return (f"{prog} needs {', '.join(missing)} (the [{extra}] extra), not installed: "
            f"pip install 'graphrt[{extra}]' (from a clone: pip install -e '.[{extra}]')")


class ConcurrentCallError(GraphrtError, RuntimeError):
    """A call into an object (an Engine, a VideoPipeline, a compiled module) from a second thread while
    a call of another thread is still running in it: its static buffers and cache would be shared."""


class WeightsMovedError(GraphrtError, RuntimeError):
    """A replay after the module's weights moved (``model.to(...)``, an assigned ``load_state_dict``):
    the captured graphs read the memory the weights had at capture, which may be freed."""
