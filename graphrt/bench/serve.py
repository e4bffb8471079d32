"""``python -m graphrt.bench.serve``: what ``python -m graphrt.serve`` gives clients on loopback.

    python -m graphrt.bench.serve --clients 1,2,4,8 --chunks 4

Starts the server as a process (the tiny model unless ``--model``; ``--max-sessions`` the largest
client count) and, for each client count N, runs N WebSocket clients at once (one batched DiT step
serves them all) and the same N clients one at a time (no batching). Reports aggregate frames per
second (all frames received / wall time), time to first frame (POST to the first JPEG, per client)
and chunk latency (the server's batched DiT step to the chunk's JPEG frames ready; p50, p99), and
checks that every client got every chunk, in order. The last line printed is JSON. Exit 0 when every
check held, 1 when one failed, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

from graphrt.errors import missing_extra


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"python -m graphrt.bench.serve: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"client counts must be >= 1, got {text!r}")
    return counts


def _args(argv):
    p = _Parser(prog="python -m graphrt.bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=_counts, default=[1, 2, 4, 8], help="client counts (default 1,2,4,8)")
    p.add_argument("--chunks", type=int, default=4, help="chunks per client's video (default 4)")
    p.add_argument("--server-args", default="", help="extra flags for python -m graphrt.serve (e.g. '--model DIR')")
    p.add_argument("--json", help="also write the result JSON here")
    opts = p.parse_args(argv)
    if opts.chunks < 1:
        p.error(f"--chunks must be >= 1; got {opts.chunks}")
    return opts


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


async def _client(port: int, prompt: str, seed: int, chunks: int) -> dict:
    from websockets.asyncio.client import connect

    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    body = json.dumps({"prompt": prompt, "seed": seed, "num_chunks": chunks}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/sessions", body, method="POST")
    sid = json.loads(await loop.run_in_executor(None, lambda: urllib.request.urlopen(req, timeout=120).read()))["id"]
    indices, frames, latencies, first = [], 0, [], None
    async with connect(f"ws://127.0.0.1:{port}/v1/sessions/{sid}/stream", max_size=None) as ws:
        while True:
            m = json.loads(await ws.recv())
            if m["type"] == "end":
                reason = m["reason"]
                break
            indices.append(m["index"])
            latencies.append(m["timing"]["chunk_s"])
            for _ in range(m["frames"]):
                await ws.recv()
                first = first or time.perf_counter() - t0
            frames += m["frames"]
            await ws.send(json.dumps({"type": "ack", "index": m["index"]}))
    return {"ok": reason == "done" and indices == list(range(chunks)), "frames": frames, "ttff_s": first,
            "latencies": latencies, "reason": reason}


async def _round(port: int, n: int, chunks: int, batched: bool) -> dict:
    t0 = time.perf_counter()
    if batched:
        results = await asyncio.gather(*(_client(port, f"client {i}", i, chunks) for i in range(n)))
    else:
        results = [await _client(port, f"client {i}", i, chunks) for i in range(n)]
    wall = time.perf_counter() - t0
    lat = [x for r in results for x in r["latencies"]]
    ttff = [r["ttff_s"] for r in results]
    return {"clients": n, "batched": batched, "wall_s": round(wall, 3),
            "fps": round(sum(r["frames"] for r in results) / wall, 2),
            "ttff_p50_s": round(_pct(ttff, 0.5), 4), "ttff_p99_s": round(_pct(ttff, 0.99), 4),
            "chunk_p50_s": round(_pct(lat, 0.5), 4), "chunk_p99_s": round(_pct(lat, 0.99), 4),
            "all_chunks_in_order": all(r["ok"] for r in results)}


def main(argv=None) -> int:
    opts = _args(argv)
    problem = missing_extra("python -m graphrt.bench.serve", "serve")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "graphrt.serve", "--port", str(port), "--max-sessions", str(max(opts.clients)),
           *opts.server_args.split()]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    rows = []
    try:
        server.stdout.readline()
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    if json.loads(r.read())["ready"]:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print("python -m graphrt.bench.serve: error: the server did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
            model = json.loads(r.read())
        asyncio.run(_round(port, 1, 1, True))               # one warm video before timing
        for n in opts.clients:
            for batched in (True, False):
                row = asyncio.run(_round(port, n, opts.chunks, batched))
                rows.append(row)
                print(f"{n:>3} clients {'batched   ' if batched else 'one by one'}  {row['fps']:8.2f} frames/s  "
                      f"ttff p50 {row['ttff_p50_s']:.3f} s p99 {row['ttff_p99_s']:.3f} s  chunk p50 "
                      f"{row['chunk_p50_s']:.3f} s p99 {row['chunk_p99_s']:.3f} s  in order: {row['all_chunks_in_order']}",
                      file=sys.stderr)
    finally:
        server.terminate()
        server.wait(60)
    alone = next((r["fps"] for r in rows if r["clients"] == 1 and r["batched"]), None)
    for r in rows:
        r["fps_vs_one_client"] = round(r["fps"] / alone, 3) if alone else None
    for r in rows:
        if r["batched"]:
            seq = next(x for x in rows if x["clients"] == r["clients"] and not x["batched"])
            r["fps_vs_one_at_a_time"] = round(r["fps"] / seq["fps"], 3)
    summary = {"bench": "serve", "model": model, "chunks": opts.chunks, "server": " ".join(cmd[1:]),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "load_avg": os.getloadavg()}, "clock": "wall (perf_counter) on the client; "
               "chunk latency from the server's timing.chunk_s", "rows": rows,
               "ok": all(r["all_chunks_in_order"] for r in rows)}
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
