"""``python -m graphrt.serve``: live video sessions over HTTP + WebSocket, batched on one Engine.

- ``app``: :func:`create_app` (the routes, the WebSocket protocol, auth);
- ``worker``: :class:`Service` (the one thread that owns the pipeline and steps every live session
  in one batched step; flow control by acknowledgements, suspend on disconnect);
- ``metrics``: :class:`Metrics` (Prometheus);
- ``page``: the web page ``GET /`` serves.

Needs the ``serve`` extra: ``pip install 'graphrt[serve]'``.
"""
from graphrt.serve.app import create_app
from graphrt.serve.metrics import Metrics
from graphrt.serve.worker import Service, encode_jpeg

__all__ = ["Metrics", "Service", "create_app", "encode_jpeg"]
