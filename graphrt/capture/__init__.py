"""The ground floor: where tensors live, capture that leaves no trace, the host-read checker, graph
backends. It imports nothing from the layers above; a layer above that needs a hook implements a
protocol declared here (:class:`RuntimeState`) or registers itself (:func:`mark_internal`).

Layers above import what they need from this package, not from its modules."""
from graphrt.capture.backends import decompose_on_cpu
from graphrt.capture.hostreads import (HostReadRecorder, HostReadReport, HostReadSite, check, is_internal,
                                       mark_internal, per_call_text)
from graphrt.capture.watch import call_unwatched, only_watched

__all__ = ["decompose_on_cpu", "HostReadRecorder", "HostReadReport", "HostReadSite", "check", "is_internal", "mark_internal",
           "per_call_text", "call_unwatched", "only_watched"]
