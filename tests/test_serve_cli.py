"""python -m graphrt.serve as a process: it prints its address, serves the tiny model, and SIGTERM
finishes the chunk in flight, ends every stream with reason "shutdown" and exits 0."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("uvicorn")
from websockets.asyncio.client import connect  # noqa: E402


def test_sigterm_ends_every_stream_and_exits_0():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "graphrt.serve", "--port", str(port), "--max-sessions", "2",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line, line + proc.stderr.read()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
                    if json.loads(r.read())["ready"]:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not get ready"
            time.sleep(0.2)

        def open_session(prompt):
            req = urllib.request.Request(url + "/v1/sessions", json.dumps({"prompt": prompt, "num_chunks": None}).encode(),
                                         method="POST")
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())["id"]

        async def watch(sid, stop_after_first=False):
            async with connect(f"ws://127.0.0.1:{port}/v1/sessions/{sid}/stream", max_size=None) as ws:
                indices = []
                while True:
                    m = json.loads(await ws.recv())
                    if m["type"] == "end":
                        return indices, m["reason"]
                    indices.append(m["index"])
                    for _ in range(m["frames"]):
                        assert isinstance(await ws.recv(), bytes)
                    await ws.send(json.dumps({"type": "ack", "index": m["index"]}))
                    if len(indices) == 1 and stop_after_first:
                        proc.send_signal(signal.SIGTERM)

        async def both():
            return await asyncio.gather(watch(open_session("a red fox"), True), watch(open_session("a cat")))
        results = asyncio.run(asyncio.wait_for(both(), 60))
        for indices, reason in results:
            assert reason == "shutdown" and indices == list(range(len(indices))) and indices
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
