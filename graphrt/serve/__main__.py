"""``python -m graphrt.serve``: serve live video sessions (the tiny random model unless --model).

    python -m graphrt.serve                                   # tiny model, 127.0.0.1:8000
    python -m graphrt.serve --model Wan2.1-T2V-1.3B-Diffusers --checkpoint self_forcing_dmd.pt \\
        --max-sessions 8 --kv-dtype int8 --mode chunk

A port in use or a bad flag: one line on stderr, exit 2. SIGTERM finishes the chunk in flight,
ends every stream with ``{"type": "end", "reason": "shutdown"}`` and exits 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time

import torch

from graphrt.errors import GraphrtError, missing_extra
from graphrt.pipeline.engine import MODES


class _Parser(argparse.ArgumentParser):
    def error(self, message):            # one line, exit 2
        print(f"python -m graphrt.serve: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _window(text: str):
    if text in ("none", "auto"):
        return text
    try:
        frames, sink = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FRAMES,SINK_FRAMES, 'auto' or 'none'; got {text!r}") from None
    return frames, sink


def _args(argv):
    p = _Parser(prog="python -m graphrt.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", help="a local diffusers-format Wan 2.1 folder (default: the tiny random model)")
    p.add_argument("--checkpoint", help="the causal DiT's weights (default: the folder's transformer/)")
    p.add_argument("--checkpoint-key", help="the entry of a training checkpoint to load")
    p.add_argument("--max-sessions", type=int, default=4, help="sessions served at once (Engine slabs; default 4)")
    p.add_argument("--mode", choices=MODES, help="graph granularity (default: chunk on CUDA, eager on the CPU)")
    p.add_argument("--kv-dtype", choices=["int8", "float8_e4m3fn"], help="quantized self-attention K/V")
    p.add_argument("--decoder", default="wan", choices=["wan", "tiny"],
                   help="wan: the model's Wan VAE (default); tiny: TAEHV's taew2_1 (needs --decoder-weights)")
    p.add_argument("--decoder-weights", metavar="PATH",
                   help="taew2_1.pth or .safetensors (github.com/madebyollin/taehv) for --decoder tiny; "
                        "'random': random weights, for tests and benchmarks only")
    p.add_argument("--prewarm", action=argparse.BooleanOptionalAction, default=True,
                   help="capture every graph before /healthz turns ready (default on)")
    p.add_argument("--window", type=_window, default="auto",
                   help="rolling cache FRAMES,SINK_FRAMES for open-ended videos ('auto': the model's max "
                        "frames with one chunk of sink; 'none': a static cache, num_chunks required)")
    p.add_argument("--ahead", type=int, default=2, help="chunks a session may run past its last acknowledged one")
    p.add_argument("--idle-timeout", type=float, default=30.0,
                   help="seconds a session without a stream is kept (suspended to host memory)")
    p.add_argument("--api-key", default=os.environ.get("GRAPHRT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $GRAPHRT_API_KEY; none)")
    p.add_argument("--fps", type=float, default=16.0, help="playback rate the clients are told (Wan: 16)")
    p.add_argument("--jpeg-quality", type=int, default=85)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--sp", type=int, default=1, help="sequence-parallel ranks: torchrun --nproc-per-node N -m "
                   "graphrt.serve --sp N (rank 0 serves HTTP; every rank steps; gloo on the CPU, NCCL on GPUs)")
    opts = p.parse_args(argv)
    for name in ("max_sessions", "ahead", "port", "sp"):
        if getattr(opts, name) < (0 if name == "port" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(opts, name)}")
    if not 1 <= opts.jpeg_quality <= 95:
        p.error(f"--jpeg-quality must be in [1, 95]; got {opts.jpeg_quality}")
    if opts.fps <= 0 or opts.idle_timeout <= 0:
        p.error("--fps and --idle-timeout must be > 0")
    if opts.checkpoint and not opts.model:
        p.error("--checkpoint needs --model (the folder with the VAE, text encoder and tokenizer)")
    if opts.decoder == "tiny" and opts.decoder_weights is None:
        p.error("--decoder tiny needs --decoder-weights PATH (taew2_1.pth or .safetensors from "
                "github.com/madebyollin/taehv)")
    if opts.decoder != "tiny" and opts.decoder_weights is not None:
        p.error("--decoder-weights is for --decoder tiny (the Wan VAE comes with --model)")
    w = opts.decoder_weights
    if w is not None and w != "random" and not os.path.isfile(w):
        p.error(f"--decoder-weights {w}: no such file")
    return opts


def build_pipeline(opts, device=None):
    """The pipeline the options ask for (loading the folder, or building the tiny model); with
    ``--sp N`` > 1 its DiT is split over the ranks (``init_distributed()`` first)."""
    from graphrt.pipeline import VideoPipeline, load_wan, tiny_wan
    from graphrt.pipeline.taehv import LATENT_CHANNELS
    from graphrt.pipeline.tiny import RandomSpec
    from graphrt.pipeline.weights import VideoShape

    device = device or torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, opts.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if opts.model is None:
        # the tiny decoder reads Wan 2.1's 16 latent channels: the tiny DiT is built to make them
        spec = RandomSpec(dit_overrides=(("in_dim", LATENT_CHANNELS), ("out_dim", LATENT_CHANNELS))) \
            if opts.decoder == "tiny" else RandomSpec()
        parts = tiny_wan(VideoShape(height=64, width=64, text_len=16), spec, dtype=dtype, device=device)
    else:
        parts = load_wan(opts.model, opts.checkpoint, device=device, dtype=dtype, checkpoint_key=opts.checkpoint_key)
    if opts.sp > 1:
        from graphrt.parallel import sequence_parallel

        sequence_parallel(parts.dit)
    cfg = parts.dit.cfg
    window = opts.window
    if window == "auto":
        window = (cfg.max_frames, cfg.chunk_frames)
    kwargs = dict(mode=opts.mode or ("chunk" if device.type == "cuda" else "eager"), max_sessions=opts.max_sessions,
                  kv_dtype=opts.kv_dtype, window=None if window == "none" else window, progress=False)
    return VideoPipeline.from_components(parts, decoder=opts.decoder, decoder_weights=opts.decoder_weights, **kwargs)


def main(argv=None) -> int:
    opts = _args(argv)
    problem = missing_extra("python -m graphrt.serve", "serve")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    import uvicorn

    from graphrt.serve import Metrics, Service, create_app

    rank, group, device = 0, None, None
    if opts.sp > 1:
        import torch.distributed as dist

        from graphrt.parallel import init_distributed

        try:
            device = init_distributed(opts.device)
        except GraphrtError as e:
            print(f"python -m graphrt.serve: error: --sp {opts.sp}: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        rank, group = dist.get_rank(), dist.new_group(backend="gloo")
        if dist.get_world_size() != opts.sp:
            print(f"python -m graphrt.serve: error: --sp {opts.sp} but {dist.get_world_size()} ranks were launched",
                  file=sys.stderr)
            return 2
    sock = None
    if rank == 0:
        sock = socket.socket(socket.AF_INET6 if ":" in opts.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((opts.host, opts.port))
        except OSError as e:
            print(f"python -m graphrt.serve: error: cannot listen on {opts.host}:{opts.port}: {e.strerror}",
                  file=sys.stderr)
            sock = None
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if group is not None:           # every rank learns whether rank 0 could listen before building anything
        from graphrt.serve.ranks import _broadcast

        if not _broadcast(sock is not None if rank == 0 else None, group):
            return 2
    elif sock is None:
        return 2
    try:
        pipe = build_pipeline(opts, device)
    except (GraphrtError, OSError) as e:
        print(f"python -m graphrt.serve: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if group is not None:
        from graphrt.serve.ranks import Leader, follow

        if rank != 0:               # stops when rank 0 says so (SIGTERM drains rank 0 first)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            follow(pipe, group)
            return 0
        pipe = Leader(pipe, group)
    service = Service(pipe, ahead=opts.ahead, idle_timeout=opts.idle_timeout, jpeg_quality=opts.jpeg_quality,
                      prewarm=opts.prewarm and pipe.engine.mode != "eager", metrics=Metrics(), fps=opts.fps)
    app = create_app(service, model_name=os.path.basename(os.path.normpath(opts.model)) if opts.model else "tiny",
                     api_key=opts.api_key)
    server = graceful_server(uvicorn.Config(app, log_level="warning", ws="auto", lifespan="on"), service)
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    print(f"graphrt serve: http://{host}:{sock.getsockname()[1]}/ ({'tiny model' if not opts.model else opts.model}, "
          f"{pipe.engine.device}, {service.max_sessions} sessions{f', {opts.sp} ranks' if group else ''})", flush=True)
    server.run(sockets=[sock])
    if group is not None:
        pipe.stop()                 # the followers shut down and return
    return 0 if service.error is None else 1


def graceful_server(config, service):
    """uvicorn's server, with SIGTERM/SIGINT first draining the streams: the worker finishes the
    chunk in flight, every stream sends ``end`` (reason "shutdown"), then uvicorn stops."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        draining = False

        def handle_exit(self, sig, frame):
            if self.draining:                      # a second signal: stop now
                return super().handle_exit(sig, frame)
            self.draining = True

            def drain():
                service.stop()
                deadline = time.monotonic() + 5.0
                while service.app_streams() and time.monotonic() < deadline:
                    time.sleep(0.02)
                self.should_exit = True
            threading.Thread(target=drain, name="graphrt-drain", daemon=True).start()
    return GracefulServer(config)


if __name__ == "__main__":
    raise SystemExit(main())
