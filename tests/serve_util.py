"""Helpers of the serve tests: the tiny pipeline as the server builds it, a real uvicorn server on a
free loopback port in a thread, a small HTTP client and a WebSocket stream reader."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import uvicorn
from websockets.asyncio.client import connect

from graphrt.pipeline import VideoPipeline, tiny_wan
from graphrt.pipeline.weights import VideoShape
from graphrt.serve import Metrics, Service, create_app


def tiny_pipeline(max_sessions: int = 2) -> VideoPipeline:
    """The tiny model on the CPU with a rolling window (open-ended videos). One batch size, so a
    session's rows run at the same batch whether it is stepped alone or beside another: its
    frames then equal a run of the same prompt and seed alone, bit for bit."""
    parts = tiny_wan(VideoShape(height=64, width=64, text_len=16))
    cfg = parts.dit.cfg
    return VideoPipeline.from_components(parts, mode="eager", max_sessions=max_sessions,
                                         batch_sizes=(max_sessions,), window=(cfg.max_frames, cfg.chunk_frames),
                                         progress=False)


class Server:
    """create_app(Service(pipe)) on uvicorn, in a thread, on a free 127.0.0.1 port."""

    def __init__(self, pipe, api_key=None, **service_kwargs):
        self.service = Service(pipe, metrics=Metrics(), prewarm=False, **service_kwargs)
        self.api_key = api_key
        app = create_app(self.service, api_key=api_key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="websockets-sansio", timeout_graceful_shutdown=3))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while self.http("GET", "/healthz")[0] != 200:
            if time.monotonic() > deadline or self.service.error is not None:
                raise RuntimeError(f"the server did not get ready: {self.service.error}")
            time.sleep(0.05)

    def headers(self):
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(self, method, path, body=None, headers=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={**self.headers(), **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, hdrs, payload = r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            status, hdrs, payload = e.code, e.headers, e.read()
        except (urllib.error.URLError, ConnectionError):
            return 0, {}, None
        try:
            payload = json.loads(payload) if payload else None
        except ValueError:
            payload = payload.decode()
        return status, hdrs, payload

    def open(self, prompt, seed, num_chunks):
        status, _, body = self.http("POST", "/v1/sessions", {"prompt": prompt, "seed": seed, "num_chunks": num_chunks})
        assert status == 201, body
        return body["id"]

    def connect(self, sid):
        return connect(f"{self.ws_url}/v1/sessions/{sid}/stream", additional_headers=self.headers(), max_size=None)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


async def read_chunk(ws):
    """The next chunk: (header, [jpeg bytes]), or (end message, None)."""
    while True:
        head = json.loads(await ws.recv())
        if head["type"] != "error":
            break
    if head["type"] != "chunk":
        return head, None
    frames = []
    for _ in range(head["frames"]):
        frame = await ws.recv()
        assert isinstance(frame, bytes), f"expected a binary frame, got {frame!r}"
        frames.append(frame)
    return head, frames


async def read_all(ws, ack=True, delay=0.0):
    """Every chunk until the end message, acknowledging each (after ``delay`` seconds)."""
    chunks = []
    while True:
        head, frames = await read_chunk(ws)
        if frames is None:
            return chunks, head
        chunks.append((head, frames))
        if delay:
            await asyncio.sleep(delay)
        if ack:
            await ws.send(json.dumps({"type": "ack", "index": head["index"]}))
