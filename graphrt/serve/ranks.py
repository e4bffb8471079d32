"""Serving a sequence-parallel model (``torchrun --nproc-per-node N -m graphrt.serve --sp N``).

Every rank holds the same pipeline and must make the same calls in the same order (the Engine's
collectives and handshakes expect it). Rank 0 serves HTTP; its worker drives a :class:`Leader`, which
broadcasts each call that changes the pipeline (open, close, step, suspend, resume, prompt switch,
warm-up) to the other ranks over a gloo group before running it itself; every other rank runs
:func:`follow`, which makes the same calls. Sessions are named by their Engine id, which every rank
assigns alike. Only rank 0 keeps the frames.
"""
from __future__ import annotations

import logging

import torch.distributed as dist

from graphrt.errors import GraphrtError

log = logging.getLogger("graphrt.serve")


def _broadcast(op, group):
    box = [op]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class _EngineLeader:
    """The Engine as the worker sees it on rank 0: suspend and resume are broadcast first."""

    def __init__(self, engine, send):
        self._engine, self._send = engine, send

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def suspend(self, session):
        self._send("suspend", session.id)
        self._engine.suspend(session)

    def resume(self, session):
        self._send("resume", session.id)
        self._engine.resume(session)


class Leader:
    """Rank 0's :class:`VideoPipeline`, as the serve worker uses it; see the module docstring."""

    def __init__(self, pipe, group):
        self.pipe, self.group, self.queue = pipe, group, pipe.queue
        self.engine = _EngineLeader(pipe.engine, self._send)
        if hasattr(pipe, "set_prompt"):
            self.set_prompt = self._set_prompt

    def _send(self, op, *args):
        _broadcast((op, args), self.group)

    def open(self, prompt, *, seed=0, num_chunks=None):
        self._send("open", prompt, seed, num_chunks)
        return self.pipe.open(prompt, seed=seed, num_chunks=num_chunks)

    def close(self, session):
        self._send("close", session.id)
        self.pipe.close(session)

    def step(self, sessions):
        self._send("step", [s.id for s in sessions])
        return self.pipe.step(sessions)

    def _set_prompt(self, session, text):
        self._send("set_prompt", session.id, text)
        self.pipe.set_prompt(session, text)

    def stream(self, prompt, num_chunks, seed=0):
        self._send("stream", prompt, num_chunks, seed)
        return self.pipe.stream(prompt, num_chunks, seed)

    def prewarm(self):
        self._send("prewarm")
        self.pipe.prewarm()
        return self

    def idle(self):
        """Nothing to step: a heartbeat, so the followers' broadcast never times out."""
        self._send("noop")

    def stop(self):
        """The last call: every follower shuts its pipeline down and returns."""
        self._send("stop")
        self.pipe.shutdown()


def follow(pipe, group) -> None:
    """Ranks > 0: make every call rank 0's :class:`Leader` broadcasts, until it stops."""
    sessions = {}
    while True:
        op, args = _broadcast(None, group)
        try:
            if op == "open":
                s = pipe.open(args[0], seed=args[1], num_chunks=args[2])
                sessions[s.id] = s
            elif op == "close":
                pipe.close(sessions.pop(args[0]))
            elif op == "step":
                pipe.step([sessions[i] for i in args[0]])     # the frames are rank 0's to send
            elif op == "suspend":
                pipe.engine.suspend(sessions[args[0]])
            elif op == "resume":
                pipe.engine.resume(sessions[args[0]])
            elif op == "set_prompt":
                pipe.set_prompt(sessions[args[0]], args[1])
            elif op == "stream":
                for _ in pipe.stream(*args):
                    pass
            elif op == "prewarm":
                pipe.prewarm()
            elif op == "stop":
                pipe.shutdown()
                return
        except GraphrtError:            # rank 0 made the same call and got the same error
            log.debug("rank %d: %s failed as on rank 0", dist.get_rank(), op, exc_info=True)
