"""Chunked video generation for causal DiTs: the schedule, the persistent :class:`Engine` with
sessions and batching, and the reference generation the bench compares against.

- ``schedule``: :class:`FlowMatchSchedule` and :func:`denoise_chunk` (the scheduler arithmetic);
- ``engine``: :class:`Engine`, :class:`Session` (one graph per forward or per whole chunk),
  :class:`EngineMemory` (what :meth:`Engine.memory` reports);
- ``reference``: :func:`reference_stream` (``ReferenceWan``, host reads and all).
"""
from graphrt.pipeline.engine import MODES, Engine, EngineMemory, EngineStats, Session
from graphrt.pipeline.reference import reference_stream
from graphrt.pipeline.schedule import FlowMatchSchedule, denoise_chunk

__all__ = ["MODES", "Engine", "EngineMemory", "EngineStats", "FlowMatchSchedule", "Session", "denoise_chunk", "reference_stream"]
