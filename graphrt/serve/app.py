"""The ASGI app: the HTTP routes, the WebSocket protocol, the page and the metrics.

Handlers never call the Engine: they go through :class:`graphrt.serve.worker.Service`, which
queues work for the one thread that owns the pipeline and returns futures the handlers await.

The stream of a session (``WS /v1/sessions/{id}/stream``), per chunk: a text message ``{"type":
"chunk", "index", "frames", "width", "height", "format": "jpeg", "prompt", "timing"}``, then
``frames`` binary messages (one JPEG each), in order; at the end ``{"type": "end", "reason"}``.
The client sends ``{"type": "ack", "index"}`` for each chunk it received whole, and may send
``{"type": "prompt", "prompt"}``, ``{"type": "cond", ...}`` and ``{"type": "stop"}``.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from graphrt.errors import GraphrtError
from graphrt.serve.metrics import Metrics
from graphrt.serve.page import PAGE
from graphrt.serve.worker import Full, Service, log

MAX_PROMPT_CHARS = 2000
MAX_OPEN_CHUNKS = 1_000_000              # a rolling video's bound on num_chunks
SEED_LIMIT = 2 ** 63
END_GRACE_S = 2.0                        # after "end", the server closes a stream the client left open


class BadField(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def _prompt(value, field: str = "prompt") -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadField(field, "prompt must be a non-empty string")
    if len(value) > MAX_PROMPT_CHARS:
        raise BadField(field, f"prompt is {len(value)} characters; at most {MAX_PROMPT_CHARS}")
    return value


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def create_app(service: Service, *, model_name: str = "tiny", api_key: str | None = None) -> Starlette:
    """The app over a (not yet started) :class:`Service`; its lifespan starts and stops the worker."""
    metrics = service.metrics
    engine = service.pipe.engine
    chunk_limit = None if engine.cfg.max_frames is None or type(engine.cache).__name__ == "RollingKVCache" \
        else engine.cfg.num_chunks
    streams: set[asyncio.Task] = set()

    def authorized(headers, query) -> bool:
        if api_key is None:
            return True
        auth = headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else query.get("access_token", "")
        return secrets.compare_digest(token.encode(), api_key.encode())

    def denied() -> JSONResponse:
        return JSONResponse({"error": "missing or wrong bearer token"}, 401, {"WWW-Authenticate": "Bearer"})

    def error(status: int, message: str, **extra) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status)

    async def page(request: Request):
        return HTMLResponse(PAGE)

    async def healthz(request: Request):
        if service.error is not None:
            return JSONResponse({"ready": False, "error": str(service.error)}, 503)
        return JSONResponse({"ready": service.ready}, 200 if service.ready else 503)

    async def models(request: Request):
        if not authorized(request.headers, request.query_params):
            return denied()
        with service.lock:
            used = len(service.sessions)
        h, w = service.shape
        return JSONResponse({"model": model_name, "width": w, "height": h, "fps": service.fps,
                             "frames_per_chunk": service.chunk_frames, "first_chunk_frames": service.first_frames,
                             "max_chunks": chunk_limit, "max_sessions": service.max_sessions,
                             "free_sessions": service.max_sessions - used})

    async def open_session(request: Request):
        if not authorized(request.headers, request.query_params):
            return denied()
        if not service.ready:
            return JSONResponse({"error": "the server is starting (capturing graphs)"}, 503, {"Retry-After": "5"})
        try:
            try:
                body = json.loads(await request.body())
            except ValueError as e:
                raise BadField("body", f"the body is not JSON: {e}") from None
            if not isinstance(body, dict):
                raise BadField("body", "the body must be a JSON object {prompt, seed, num_chunks}")
            unknown = sorted(set(body) - {"prompt", "seed", "num_chunks"})
            if unknown:
                raise BadField(unknown[0], f"unknown field {unknown[0]!r}; expected prompt, seed, num_chunks")
            prompt = _prompt(body.get("prompt"))
            seed = body.get("seed")
            if seed is None:
                seed = secrets.randbelow(2 ** 31)
            elif not _int(seed) or not 0 <= seed < SEED_LIMIT:
                raise BadField("seed", f"seed must be an int in [0, 2**63); got {seed!r}")
            num_chunks = body.get("num_chunks")
            top = chunk_limit or MAX_OPEN_CHUNKS
            if num_chunks is not None and (not _int(num_chunks) or not 1 <= num_chunks <= top):
                raise BadField("num_chunks", f"num_chunks must be null or an int in [1, {top}]; got {num_chunks!r}")
            if num_chunks is None and chunk_limit is not None:
                raise BadField("num_chunks", f"this server keeps a static cache: num_chunks must be an int in "
                                             f"[1, {chunk_limit}] (start it with a --window for open-ended videos)")
        except BadField as e:
            return JSONResponse({"error": e.message, "field": e.field}, 422)
        try:
            fut = service.open(prompt, seed, num_chunks)
        except Full:
            return JSONResponse({"error": f"all {service.max_sessions} sessions are taken"}, 503, {"Retry-After": "2"})
        try:
            s = await asyncio.wrap_future(fut)
        except GraphrtError as e:
            return error(503 if service.stopping else 422, str(e), field="prompt")
        return JSONResponse({"id": s.id, "seed": s.seed}, 201)

    async def get_session(request: Request):
        if not authorized(request.headers, request.query_params):
            return denied()
        s = service.get(request.path_params["id"])
        if s is None:
            return error(404, "no such session")
        return JSONResponse(s.state())

    async def delete_session(request: Request):
        if not authorized(request.headers, request.query_params):
            return denied()
        if service.get(request.path_params["id"]) is None:
            return error(404, "no such session")
        await asyncio.wrap_future(service.delete(request.path_params["id"]))
        return Response(status_code=204)

    async def metrics_route(request: Request):
        if not authorized(request.headers, request.query_params):
            return denied()
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    async def stream(ws: WebSocket):
        if not authorized(ws.headers, ws.query_params):      # refused at the handshake: HTTP 401
            if "websocket.http.response" in ws.scope.get("extensions", {}):
                await ws.send_denial_response(denied())
            else:
                await ws.close(code=4401)
            return
        s = service.get(ws.path_params["id"])
        await ws.accept()
        if s is None:
            await ws.close(code=4404, reason="no such session")
            return
        wake = asyncio.Event()
        if not service.connect(s, wake.set):
            await ws.close(code=4409, reason="this session already has a stream")
            return
        send_lock = asyncio.Lock()
        sender = asyncio.create_task(_send(ws, s, wake, send_lock))
        sender.add_done_callback(lambda t: t.cancelled() or t.exception() is None or
                                 log.error("stream of a session failed", exc_info=t.exception()))
        streams.add(sender)
        try:
            await _receive(ws, s, send_lock, sender)
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            streams.discard(sender)
            service.disconnect(s)

    async def _send(ws: WebSocket, s, wake: asyncio.Event, lock: asyncio.Lock) -> None:
        index = s.acked + 1                   # a reconnect resumes at the first unacknowledged chunk
        h, w = service.shape
        while True:
            wake.clear()
            chunk, reason = service.pending(s, index)
            if chunk is None and reason is None:
                await wake.wait()
                continue
            if chunk is None:
                if not service.stopping:      # the slot is free before the client hears the end
                    with contextlib.suppress(GraphrtError):
                        await asyncio.wrap_future(service.finish(s, reason))
                async with lock:
                    await ws.send_text(json.dumps({"type": "end", "reason": reason}))
                await asyncio.sleep(END_GRACE_S)     # the client closes first: its last ack may be on the way
                with contextlib.suppress(Exception):
                    await ws.close(1000)
                return
            head = {"type": "chunk", "index": chunk.index, "frames": len(chunk.frames), "width": w, "height": h,
                    "format": "jpeg", "prompt": chunk.prompt, "timing": chunk.timing}
            async with lock:
                await ws.send_text(json.dumps(head))
                for i, frame in enumerate(chunk.frames):
                    await ws.send_bytes(frame)
                    if s.first_frame is None:
                        s.first_frame = time.monotonic()
                        metrics.first_frame.observe(s.first_frame - s.created)
            metrics.chunks_sent.inc()
            metrics.frames_sent.inc(len(chunk.frames))
            index += 1

    async def _receive(ws: WebSocket, s, lock: asyncio.Lock, sender: asyncio.Task) -> None:
        async def reply(message: str) -> None:
            async with lock:
                await ws.send_text(json.dumps({"type": "error", "message": message}))

        while True:
            try:
                msg = await ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            try:
                m = json.loads(text) if text is not None else None
            except ValueError:
                m = None
            if not isinstance(m, dict) or not isinstance(m.get("type"), str):
                await reply("expected a JSON object with a \"type\": ack, prompt, cond or stop")
                continue
            kind = m["type"]
            try:
                if kind == "ack":
                    i = m.get("index")
                    if not _int(i) or not 0 <= i < s.made:
                        raise BadField("index", f"ack index must be the index of a chunk sent; got {i!r}")
                    service.ack(s, i)
                elif kind == "prompt":
                    prompt = _prompt(m.get("prompt"))
                    await asyncio.wrap_future(service.set_prompt(s, prompt))
                    async with lock:
                        await ws.send_text(json.dumps({"type": "prompt", "prompt": prompt, "from_chunk": s.made}))
                elif kind == "stop":
                    await asyncio.wrap_future(service.stop_session(s))
                elif kind == "cond":
                    raise BadField("cond", "this model takes no per-chunk conditioning")
                else:
                    raise BadField("type", f"unknown message type {kind!r}; expected ack, prompt, cond or stop")
            except BadField as e:
                await reply(e.message)
            except GraphrtError as e:
                await reply(str(e).splitlines()[0])

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, service.stop)
            await asyncio.sleep(0)

    routes = [Route("/", page), Route("/healthz", healthz), Route("/v1/models", models),
              Route("/v1/sessions", open_session, methods=["POST"]),
              Route("/v1/sessions/{id}", get_session, methods=["GET"]),
              Route("/v1/sessions/{id}", delete_session, methods=["DELETE"]),
              Route("/metrics", metrics_route), WebSocketRoute("/v1/sessions/{id}/stream", stream)]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service, app.state.streams = service, streams
    service.app_streams = lambda: len(streams)
    return app
