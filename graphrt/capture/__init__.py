"""The ground floor: host-read checking, capture that leaves no trace, graph backends.

Layers above import what they need from this package, not from its modules."""
from graphrt.capture.hostreads import HostReadRecorder, HostReadReport, HostReadSite, check

__all__ = ["HostReadRecorder", "HostReadReport", "HostReadSite", "check"]
