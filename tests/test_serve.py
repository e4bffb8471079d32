"""python -m graphrt.serve as people use it: a real uvicorn server on loopback, real WebSocket and
HTTP clients, the tiny model on the CPU. Frames are checked against the pipeline's own output for
the same prompt and seed (JPEG bytes of the same encoder and quality), so nothing is lost,
duplicated, reordered or mixed between sessions."""
from __future__ import annotations

import asyncio
import io
import json
import resource
import socket
import time

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("websockets")
pytest.importorskip("prometheus_client")

from PIL import Image  # noqa: E402
from serve_util import Server, read_all, read_chunk, tiny_pipeline  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402

from graphrt.serve import encode_jpeg  # noqa: E402

KEY = "test-key"
QUALITY = 85


@pytest.fixture(scope="module")
def server():
    srv = Server(tiny_pipeline(2), api_key=KEY, ahead=2, idle_timeout=3.0, jpeg_quality=QUALITY)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def reference():
    """The frames the pipeline makes for (prompt, seed), one session alone, as JPEG bytes per chunk."""
    pipe, done = tiny_pipeline(2), {}

    def frames(prompt, seed, chunks):
        key = (prompt, seed)
        if len(done.get(key, ())) < chunks:
            done[key] = [[encode_jpeg(f, QUALITY) for f in c] for c in pipe.stream(prompt, num_chunks=chunks, seed=seed)]
        return done[key][:chunks]
    yield frames
    pipe.shutdown()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def wait_status(server, sid, status, timeout=2.5):
    deadline = time.monotonic() + timeout
    while (got := server.http("GET", f"/v1/sessions/{sid}")[2].get("status")) != status:
        assert time.monotonic() < deadline, f"session status {got!r}, expected {status!r}"
        time.sleep(0.05)


def check_stream(chunks, end, want, prompt):
    assert [h["index"] for h, _ in chunks] == list(range(len(want)))
    assert end == {"type": "end", "reason": "done"}
    for (head, frames), ref in zip(chunks, want):
        assert head["type"] == "chunk" and head["format"] == "jpeg" and head["prompt"] == prompt
        assert head["frames"] == len(frames) == len(ref)
        assert {"dit_s", "chunk_s", "batch"} <= set(head["timing"])
        for jpeg in frames:
            img = Image.open(io.BytesIO(jpeg))
            assert img.format == "JPEG" and img.size == (head["width"], head["height"])
        assert frames == ref               # bit for bit the pipeline's own frames, in order


def test_health_and_models(server):
    assert server.http("GET", "/healthz")[:3:2] == (200, {"ready": True})
    status, _, m = server.http("GET", "/v1/models")
    assert status == 200
    assert (m["model"], m["width"], m["height"], m["fps"]) == ("tiny", 64, 64, 16.0)
    assert (m["first_chunk_frames"], m["frames_per_chunk"]) == (9, 12)
    assert m["max_sessions"] == 2 and m["free_sessions"] == 2 and m["max_chunks"] is None


def test_two_sessions_each_get_their_own_video(server, reference):
    a = server.open("a red fox", 11, 2)
    b = server.open("a blue bird", 12, 2)
    assert a != b and len(a) >= 20                 # unguessable ids

    async def both():
        async with server.connect(a) as wa, server.connect(b) as wb:
            return await asyncio.gather(read_all(wa), read_all(wb))
    (ca, ea), (cb, eb) = run(both())
    check_stream(ca, ea, reference("a red fox", 11, 2), "a red fox")
    check_stream(cb, eb, reference("a blue bird", 12, 2), "a blue bird")
    assert any(h["timing"]["batch"] == 2 for h, _ in ca)      # stepped together
    assert server.http("GET", f"/v1/sessions/{a}")[0] == 404  # ended: the slot is free
    assert server.http("GET", "/v1/models")[2]["free_sessions"] == 2


@pytest.mark.parametrize("body, field", [
    ({"prompt": ""}, "prompt"), ({"prompt": "   "}, "prompt"), ({"prompt": "x" * 2001}, "prompt"), ({"prompt": 3}, "prompt"),
    ({"prompt": "a", "seed": -1}, "seed"), ({"prompt": "a", "seed": 2 ** 63}, "seed"), ({"prompt": "a", "seed": "1"}, "seed"),
    ({"prompt": "a", "num_chunks": 0}, "num_chunks"), ({"prompt": "a", "num_chunks": 1.5}, "num_chunks"),
    ({"prompt": "a", "colour": 1}, "colour"), ([1], "body")])
def test_bad_input_is_422_naming_the_field(server, body, field):
    status, _, out = server.http("POST", "/v1/sessions", body)
    assert status == 422 and out["field"] == field, out


def test_unknown_ids_auth_and_not_json(server):
    assert server.http("POST", "/v1/sessions", raw=b"{not json")[2]["field"] == "body"
    assert server.http("GET", "/v1/sessions/nope")[0] == 404
    assert server.http("DELETE", "/v1/sessions/nope")[0] == 404
    assert server.http("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert server.http("POST", "/v1/sessions", {"prompt": "a"}, headers={"Authorization": ""})[0] == 401

    async def closes(url_id, headers):
        from websockets.asyncio.client import connect
        async with connect(f"{server.ws_url}/v1/sessions/{url_id}/stream", additional_headers=headers) as ws:
            with pytest.raises(ConnectionClosed) as e:
                await ws.recv()
            return e.value.rcvd.code
    assert run(closes("nope", server.headers())) == 4404
    sid = server.open("a cat", 1, 1)
    with pytest.raises(InvalidStatus) as e:                 # no bearer token: refused at the handshake
        run(closes(sid, {}))
    assert e.value.response.status_code == 401
    server.http("DELETE", f"/v1/sessions/{sid}")


def test_full_is_503_and_delete_frees_a_slot(server):
    a, b = server.open("a cat", 1, 3), server.open("a dog", 2, 3)
    status, headers, _ = server.http("POST", "/v1/sessions", {"prompt": "one more", "num_chunks": 1})
    assert status == 503 and int(headers["Retry-After"]) > 0
    assert server.http("DELETE", f"/v1/sessions/{a}")[0] == 204
    assert server.http("GET", f"/v1/sessions/{a}")[0] == 404
    c = server.open("one more", 3, 1)
    for sid in (b, c):
        assert server.http("DELETE", f"/v1/sessions/{sid}")[0] == 204


def test_malformed_messages_second_stream_and_stop(server, reference):
    sid = server.open("a green forest", 5, 3)

    async def go():
        async with server.connect(sid) as ws:
            async with server.connect(sid) as second:          # one stream per session
                with pytest.raises(ConnectionClosed) as e:
                    await second.recv()
                assert e.value.rcvd.code == 4409
            errors = []
            for bad in ["not json", json.dumps([1]), json.dumps({"type": "dance"}), json.dumps({"type": "ack"}),
                        json.dumps({"type": "ack", "index": 99}), json.dumps({"type": "cond", "cond": [1]}),
                        json.dumps({"type": "prompt", "prompt": ""}), b"\x00binary"]:
                await ws.send(bad)
            chunks = []
            while len(errors) < 8 or len(chunks) < 1:            # the stream goes on between the errors
                msg = await ws.recv()
                m = json.loads(msg) if isinstance(msg, str) else None
                if m and m["type"] == "error":
                    errors.append(m["message"])
                elif m and m["type"] == "chunk":
                    frames = [await ws.recv() for _ in range(m["frames"])]
                    chunks.append(frames)
                    await ws.send(json.dumps({"type": "ack", "index": m["index"]}))
            await ws.send(json.dumps({"type": "stop"}))
            rest, end = await read_all(ws)
            return errors, chunks + [f for _, f in rest], end
    errors, chunks, end = run(go())
    assert len(errors) == 8 and all(errors)
    assert end == {"type": "end", "reason": "stopped"}
    assert chunks == reference("a green forest", 5, len(chunks))   # what was made before the stop, in order
    assert server.http("GET", f"/v1/sessions/{sid}")[0] == 404


def test_vanished_client_and_slow_reader_do_not_stall_others(server, reference):
    slow = server.open("a slow cat", 21, 3)
    fast = server.open("a fast dog", 22, 2)

    async def go():
        ws_slow = await server.connect(slow)
        head = json.loads(await ws_slow.recv())          # reads one header, then nothing for a while
        async with server.connect(fast) as ws_fast:
            chunks, end = await read_all(ws_fast)
        state = server.http("GET", f"/v1/sessions/{slow}")[2]
        frames0 = [await ws_slow.recv() for _ in range(head["frames"])]
        rest, end_slow = await read_all(ws_slow)
        await ws_slow.close()
        return chunks, end, state, [frames0] + [f for _, f in rest], end_slow
    chunks, end, state, slow_chunks, end_slow = run(go())
    check_stream(chunks, end, reference("a fast dog", 22, 2), "a fast dog")
    assert state["chunks_made"] == 2 and state["chunks_delivered"] == 0   # held --ahead chunks past its acks
    assert end_slow["reason"] == "done" and slow_chunks == reference("a slow cat", 21, 3)

    # a client that vanishes mid-chunk: the other session streams on, bit for bit
    gone = server.open("a vanishing act", 23, 3)
    other = server.open("a steady stream", 24, 2)

    async def vanish():
        ws = await server.connect(gone)
        await ws.recv()
        await ws.recv()                                   # the header and one frame of chunk 0
        ws.transport.abort()                              # no close handshake
        deadline = time.monotonic() + 2
        while server.http("GET", f"/v1/sessions/{gone}")[2].get("status") != "suspended":
            assert time.monotonic() < deadline, "a vanished client's session is suspended to host memory"
            await asyncio.sleep(0.05)
        async with server.connect(other) as wo:
            return await read_all(wo)
    chunks, end = run(vanish())
    check_stream(chunks, end, reference("a steady stream", 24, 2), "a steady stream")


def test_reconnect_resumes_at_the_first_unacknowledged_chunk(server, reference):
    sid = server.open("a returning fox", 31, 4)      # 4: dropped with chunks still to make

    async def first():
        async with server.connect(sid) as ws:
            head, frames = await read_chunk(ws)
            await ws.send(json.dumps({"type": "ack", "index": head["index"]}))
            head1 = json.loads(await ws.recv())       # chunk 1 begins; the client drops before its end
            await ws.recv()
            return [frames], head1["index"]
    got, dropped_at = run(first())
    assert dropped_at == 1
    wait_status(server, sid, "suspended")

    async def again():
        async with server.connect(sid) as ws:
            return await read_all(ws)
    rest, end = run(again())
    assert [h["index"] for h, _ in rest] == [1, 2, 3] and end["reason"] == "done"
    assert got + [f for _, f in rest] == reference("a returning fox", 31, 4)


def test_idle_session_is_freed(server):
    sid = server.open("nobody watches", 41, 2)
    deadline = time.monotonic() + 8
    while server.http("GET", f"/v1/sessions/{sid}")[0] != 404:
        assert time.monotonic() < deadline, "a session without a stream is closed after --idle-timeout"
        time.sleep(0.1)
    assert server.http("GET", "/v1/models")[2]["free_sessions"] == 2


def test_prompt_switch_applies_from_the_next_chunk(server):
    sid = server.open("a red fox", 51, 3)

    async def go():
        async with server.connect(sid) as ws:
            head, _ = await read_chunk(ws)
            await ws.send(json.dumps({"type": "prompt", "prompt": "a blue bird"}))
            await ws.send(json.dumps({"type": "ack", "index": head["index"]}))
            prompts, chunks = [head["prompt"]], []
            while True:
                msg = json.loads(await ws.recv())
                if msg["type"] == "prompt":
                    switched = msg["from_chunk"]
                elif msg["type"] == "chunk":
                    prompts.append(msg["prompt"])
                    chunks.append([await ws.recv() for _ in range(msg["frames"])])
                    await ws.send(json.dumps({"type": "ack", "index": msg["index"]}))
                elif msg["type"] == "end":
                    return prompts, switched
    prompts, switched = run(go())
    assert prompts == ["a red fox"] * switched + ["a blue bird"] * (3 - switched)


def test_open_close_cycles_keep_memory_flat(server):
    engine = server.service.pipe.engine
    rss = []
    for i in range(100):
        sid = server.open("a cycling cat", i, 2)
        assert server.http("DELETE", f"/v1/sessions/{sid}")[0] == 204
        if i in (19, 99):
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    assert len(engine.sessions) == 0 and len(server.service.sessions) == 0
    assert engine.cache.free_slabs == engine.cache.num_slabs
    assert rss[1] - rss[0] < 50 * 1024            # KiB: peak RSS flat over the last 80 cycles


def test_metrics(server):
    status, _, text = server.http("GET", "/metrics")
    assert status == 200
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["graphrt_chunks_sent_total"] > 0 and values["graphrt_frames_sent_total"] > 0
    assert values["graphrt_time_to_first_frame_seconds_count"] > 0
    assert values["graphrt_chunk_latency_seconds_count"] > 0 and values["graphrt_batch_size_count"] > 0
    assert 'graphrt_batch_size_bucket{le="2.0"}' in values
    assert values["graphrt_device_memory_bytes"] > 0
    for name in ("graphrt_sessions_open", "graphrt_sessions_streaming", "graphrt_queue_depth"):
        assert name in values


def test_cli_bad_flag_and_port_in_use(capsys):
    from graphrt.serve.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--max-sessions", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-sessions" in err
    with pytest.raises(SystemExit) as e:
        main(["--bogus"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["--port", str(busy.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "in use" in err


@pytest.mark.parametrize("flags, says", [(["--decoder", "tiny"], "needs --decoder-weights"),
                                         (["--decoder-weights", "random"], "is for --decoder tiny"),
                                         (["--decoder", "tiny", "--decoder-weights", "/nowhere.pth"], "no such file")])
def test_cli_decoder_flags(capsys, flags, says):
    from graphrt.serve.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(flags)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and says in err


def test_tiny_decoder_pipeline_serves_frames_of_the_model_size():
    """``--decoder tiny``: the tiny DiT makes Wan 2.1's 16 latent channels, the TAEHV decoder the frames."""
    import torch

    from graphrt.pipeline import TinyDecoder
    from graphrt.serve.__main__ import _args, build_pipeline

    pipe = build_pipeline(_args(["--decoder", "tiny", "--decoder-weights", "random", "--max-sessions", "1",
                                 "--window", "none"]))
    try:
        assert isinstance(pipe.decoder, TinyDecoder)
        session = pipe.open("a red fox", seed=0, num_chunks=1)
        frames = pipe.step([session])[session].result()
        assert frames.dtype == torch.uint8 and tuple(frames.shape[1:]) == (64, 64, 3) and frames.float().std() > 0
    finally:
        pipe.shutdown()
