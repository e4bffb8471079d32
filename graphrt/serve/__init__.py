"""``python -m graphrt.serve``: live video sessions over HTTP + WebSocket, batched on one Engine.

- ``app``: :func:`create_app` (the routes, the WebSocket protocol, auth);
- ``worker``: :class:`Service` (the one thread that owns the pipeline and steps every live session
  in one batched step; flow control by acknowledgements, suspend on disconnect);
- ``metrics``: :class:`Metrics` (Prometheus);
- ``page``: the web page ``GET /`` serves.

Needs the ``serve`` extra: ``pip install 'graphrt[serve]'``.
"""
import importlib

# imported on first use, so that ``python -m graphrt.serve`` (which imports this package first) can
# say which part of the serve extra is missing instead of failing on an import
_WHERE = {"create_app": "app", "Metrics": "metrics", "Service": "worker", "encode_jpeg": "worker"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)

__all__ = ["Metrics", "Service", "create_app", "encode_jpeg"]
