"""python -m graphrt.serve as a process: it prints its address, serves the tiny model, and SIGTERM
finishes the chunk in flight, ends every stream with reason "shutdown" and exits 0."""
from __future__ import annotations

import asyncio
import contextlib
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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
                if json.loads(r.read())["ready"]:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "the server did not get ready"
        time.sleep(0.2)


def test_two_gloo_ranks_serve_the_single_process_video():
    """torchrun --nproc-per-node 2 -m graphrt.serve --sp 2: rank 0 serves, both ranks step; the frames
    are the single-process pipeline's (within JPEG's error: the split DiT equals it within the fp32
    tolerance, not bit for bit), and SIGTERM stops both ranks cleanly."""
    import io

    import numpy as np
    from PIL import Image

    from graphrt.serve import encode_jpeg
    from graphrt.serve.__main__ import _args, build_pipeline

    port = _free_port()
    args = ["--port", str(port), "--max-sessions", "2", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "graphrt.serve", "--sp", "2", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        ref = build_pipeline(_args(args))
        def jpeg_roundtrip(chunk):       # the single-process frames as a client sees them
            return np.stack([np.asarray(Image.open(io.BytesIO(encode_jpeg(f, 85)))) for f in chunk]).astype(np.int16)
        want = [jpeg_roundtrip(c) for c in ref.stream("a red fox", num_chunks=2, seed=7)]
        other = [jpeg_roundtrip(c) for c in ref.stream("a red fox", num_chunks=2, seed=8)]
        ref.shutdown()
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc)
        req = urllib.request.Request(url + "/v1/sessions", json.dumps({"prompt": "a red fox", "seed": 7,
                                                                       "num_chunks": 2}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            sid = json.loads(r.read())["id"]

        async def watch():
            async with connect(f"ws://127.0.0.1:{port}/v1/sessions/{sid}/stream", max_size=None) as ws:
                chunks = []
                while True:
                    m = json.loads(await ws.recv())
                    if m["type"] == "end":
                        return chunks, m["reason"]
                    frames = [np.asarray(Image.open(io.BytesIO(await ws.recv()))) for _ in range(m["frames"])]
                    chunks.append(np.stack(frames).astype(np.int16))
                    await ws.send(json.dumps({"type": "ack", "index": m["index"]}))
        chunks, reason = asyncio.run(asyncio.wait_for(watch(), 60))
        assert reason == "done" and [c.shape for c in chunks] == [w.shape for w in want]
        for got, w, o in zip(chunks, want, other):
            err = np.abs(got - w).mean()
            assert err < 1.0 and err < np.abs(got - o).mean() / 10, (err, np.abs(got - o).mean())   # its own video
        # SIGTERM to the serving rank (torchrun itself would report its own signal as a failure): it
        # drains its streams, tells rank 1 to stop, and both exit 0, so torchrun does too
        children = [int(p) for p in subprocess.check_output(["pgrep", "-P", str(proc.pid)]).split()]
        rank0 = [p for p in children if b"RANK=0" in open(f"/proc/{p}/environ", "rb").read().split(b"\0")]
        assert len(rank0) == 1
        os.kill(rank0[0], signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:             # the ranks first: torchrun puts them in their own process groups
            ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            for pid in ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
