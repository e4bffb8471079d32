"""What :func:`graphrt.compile` returns: one graph per bucket, dispatched and replayed.

The dispatcher (:mod:`~graphrt.replay.dispatch`, with the bucket rules of :mod:`~graphrt.replay.buckets`)
chooses the graph; the graph wrapper (:mod:`~graphrt.replay.graphed`) holds the static buffers and
captures, replays and verifies it. Layers above import what they need from this package, not from its
modules."""
from graphrt.replay.buckets import BucketKey, Buckets
from graphrt.replay.dispatch import Dispatcher
from graphrt.replay.graphed import GraphedModule, GraphStats, compile

__all__ = ["BucketKey", "Buckets", "Dispatcher", "GraphedModule", "GraphStats", "compile"]
