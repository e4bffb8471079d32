"""What :func:`graphrt.compile` returns: one graph per bucket, dispatched and replayed.

Layers above import what they need from this package, not from its modules."""
from graphrt.replay.buckets import BucketKey, Buckets
from graphrt.replay.graphed import GraphedModule, GraphStats, compile

__all__ = ["BucketKey", "Buckets", "GraphedModule", "GraphStats", "compile"]
