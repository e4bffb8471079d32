"""``python -m graphrt.generate``: a prompt in, a playable mp4 out.

    python -m graphrt.generate --model Wan2.1-T2V-1.3B-Diffusers --checkpoint self_forcing_dmd.pt \\
        --prompt "a red fox running through snow" --chunks 7 --out fox.mp4

``--model`` is a local diffusers-format Wan 2.1 folder; ``--checkpoint`` the causal DiT's weights
(Wan/diffusers safetensors, or a causal project's .pt with generator/generator_ema). Without
``--model`` a tiny random model is built in memory, so the command runs on any machine (its video
is noise of the right shape). Frames are written as each chunk is decoded; the decode of chunk n
overlaps the DiT's chunk n+1 unless ``--no-overlap``. ``--decoder tiny --decoder-weights taew2_1.pth``
decodes with the tiny TAEHV-compatible decoder instead of the Wan VAE.

Every option is checked before a model is built (a bad one: one line, exit 2). Ctrl-C or SIGTERM
stop within seconds: queued decodes are dropped and the frames written so far are finished into
a playable file (exit 130 or 143; none written: no file, said in one line). Exits non-zero when
the whole video was not written.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from graphrt.errors import GraphrtError, missing_extra
from graphrt.pipeline.engine import MODES
from graphrt.pipeline.tiny import RandomSpec, tiny_wan
from graphrt.pipeline.video import VideoWriter
from graphrt.pipeline.video_pipeline import VideoPipeline
from graphrt.pipeline.weights import VideoShape, load_wan


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m graphrt.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local diffusers-format Wan 2.1 folder (default: a tiny random model)")
    p.add_argument("--checkpoint", help="the causal DiT's weights (default: the folder's transformer/)")
    p.add_argument("--checkpoint-key", help="the entry of a training checkpoint to load (default: generator_ema, "
                                            "then generator, ...)")
    p.add_argument("--prompt", default="a red fox runs through the snow in a forest at night")
    p.add_argument("--chunks", type=int, default=7, help="chunks of --chunk-frames latent frames (default 7; a "
                   "longer video rolls: the first chunk and the last 6 stay in the cache)")
    p.add_argument("--chunk-frames", type=int, default=3, help="latent frames per chunk (default 3)")
    p.add_argument("--height", type=int, help="frame height in pixels (default 480; the tiny model: 64)")
    p.add_argument("--width", type=int, help="frame width in pixels (default 832; the tiny model: 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="video.mp4", help="the mp4 to write (default video.mp4)")
    p.add_argument("--fps", type=float, default=16.0, help="frames per second of the mp4 (Wan: 16)")
    p.add_argument("--mode", choices=MODES, help="graph granularity (default: chunk on CUDA, eager on the CPU)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--attention", default="auto")
    p.add_argument("--no-overlap", action="store_true", help="decode after each chunk instead of beside the next")
    p.add_argument("--decoder", choices=["wan", "tiny"], default="wan",
                   help="wan: the model's Wan VAE (default); tiny: TAEHV's taew2_1 (needs --decoder-weights)")
    p.add_argument("--decoder-weights", metavar="PATH",
                   help="taew2_1.pth or taew2_1.safetensors (github.com/madebyollin/taehv) for --decoder tiny; "
                        "'random': random weights (tests and benchmarks only)")
    p.add_argument("--decoder-graph", action="store_true",
                   help="capture the decoder as a graph over static per-video state (Wan VAE: its steady "
                        "frame; tiny: a whole chunk)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv")


class Interrupted(BaseException):
    """SIGTERM, raised in the main thread so the video written so far is finished, not cut."""


def check_options(opts) -> str | None:
    """The first problem with the options, as one line, or None. Runs before any model is built."""
    if opts.chunks < 1 or opts.chunk_frames < 1 or opts.fps <= 0:
        return "--chunks and --chunk-frames must be >= 1 and --fps > 0"
    if opts.threads is not None and opts.threads < 1:
        return f"--threads must be >= 1 (got {opts.threads})"
    if opts.device is not None:
        try:
            device = torch.device(opts.device)
        except RuntimeError:
            return f"--device {opts.device!r} is not a device: use cpu or cuda"
        if device.type not in ("cpu", "cuda"):
            return f"--device {opts.device!r}: graphrt.generate runs on cpu or cuda"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False)"
    if opts.model is not None and not Path(opts.model).is_dir():
        return f"--model {opts.model}: no such folder (a local diffusers-format Wan 2.1 folder)"
    out = Path(opts.out)
    if out.is_dir():
        return f"--out {opts.out} is a folder: name the video file, e.g. {out / 'video.mp4'}"
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        return f"--out {opts.out}: the file name must end in {', '.join(VIDEO_SUFFIXES)}"
    folder = out.parent
    if not folder.is_dir():
        return f"--out {opts.out}: the folder {folder} does not exist"
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        return f"--out {opts.out}: cannot write in {folder} ({e.strerror})"
    return _decoder_flags_error(opts)


def _decoder_flags_error(opts) -> str | None:
    w = opts.decoder_weights
    if opts.decoder == "tiny" and w is None:
        return ("--decoder tiny needs --decoder-weights PATH (taew2_1.pth or .safetensors from "
                "github.com/madebyollin/taehv)")
    if opts.decoder != "tiny" and w is not None:
        return "--decoder-weights is for --decoder tiny (the Wan VAE comes with --model)"
    if w is not None and w != "random" and not os.path.isfile(w):
        return f"--decoder-weights {w}: no such file"
    return None


def build(opts):
    """The pipeline the options ask for (loading the folder, or building the tiny model)."""
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, opts.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    mode = opts.mode or ("chunk" if device.type == "cuda" else "eager")
    # a video longer than the model's own (VideoShape().chunks chunks) rolls: a sink+window cache of that
    # length, not a static one reserving the whole video up front
    chunks = min(opts.chunks, VideoShape.chunks)
    window = None if opts.chunks <= chunks else (chunks * opts.chunk_frames, opts.chunk_frames)
    if opts.model is None:
        if opts.checkpoint:
            raise GraphrtError("--checkpoint needs --model (the folder with the VAE, text encoder and tokenizer)")
        if opts.height or opts.width:
            raise GraphrtError("--height/--width need --model: the tiny model makes 64x64 frames")
        shape = VideoShape(height=64, width=64, chunk_frames=opts.chunk_frames, chunks=chunks, text_len=16)
        # the tiny decoder reads Wan 2.1's 16 latent channels: the tiny DiT then outputs as many
        spec = RandomSpec(dit_overrides=(("in_dim", 16), ("out_dim", 16))) if opts.decoder == "tiny" else RandomSpec()
        parts = tiny_wan(shape, spec, dtype=dtype, device=device)
        parts.dit.attention = opts.attention
    else:
        shape = VideoShape(height=opts.height or 480, width=opts.width or 832, chunk_frames=opts.chunk_frames,
                           chunks=chunks)
        parts = load_wan(opts.model, opts.checkpoint, shape=shape, device=device, dtype=dtype,
                         attention=opts.attention, checkpoint_key=opts.checkpoint_key)
    return VideoPipeline.from_components(parts, overlap=not opts.no_overlap, mode=mode, window=window,
                                         progress=not opts.no_progress, decoder=opts.decoder,
                                         decoder_weights=opts.decoder_weights)


def main(argv=None) -> int:
    opts = _args(argv)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    problem = check_options(opts)
    if problem is None:
        problem = missing_extra("python -m graphrt.generate", "video")
    if problem is not None:
        console.print(f"[red]error:[/] {escape(problem)}")
        return 2
    if opts.threads:
        torch.set_num_threads(opts.threads)
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    written, out, pipe = 0, None, None
    try:
        t0 = time.perf_counter()
        with console.status("loading the model") if not opts.no_progress else contextlib.nullcontext():
            pipe = build(opts).prewarm(decoder_graphs=opts.decoder_graph)
        load_s = time.perf_counter() - t0
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[frames]} frames"))
        t0 = time.perf_counter()
        with Progress(*columns, console=console, disable=opts.no_progress) as bar, \
                VideoWriter(opts.out, fps=opts.fps) as out:
            task = bar.add_task("chunks", total=opts.chunks, frames=0)
            with contextlib.closing(pipe.stream(opts.prompt, num_chunks=opts.chunks, seed=opts.seed)) as chunks:
                for frames in chunks:
                    out.write(frames)
                    written += len(frames)
                    bar.update(task, advance=1, frames=written)
        seconds = time.perf_counter() - t0
    except (KeyboardInterrupt, Interrupted) as e:
        code = 143 if isinstance(e, Interrupted) else 130
        why = "terminated" if isinstance(e, Interrupted) else "interrupted"
        if written and out is not None and out.finished:
            console.print(f"{why}: wrote {opts.out} with the {written} frames made so far ({written / opts.fps:.2f} s "
                          f"of video; it plays)")
        else:
            _remove_started(out)
            console.print(f"{why}: no frame was written; no video at {opts.out}")
        return code
    except (GraphrtError, OSError) as e:
        _remove_started(out)                      # no half-written video left behind as if it were done
        console.print(f"[red]error:[/] {escape(str(e))}")
        return 2
    except BaseException:
        _remove_started(out)
        raise
    finally:
        if pipe is not None:
            pipe.shutdown(cancel=True)            # queued decodes of a stopped video are dropped
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    h, w = out.size
    console.print(f"wrote {opts.out}: {written} frames of {w}x{h} at {opts.fps:g} fps "
                  f"({written / opts.fps:.2f} s of video) in {seconds:.2f} s ({written / seconds:.1f} frames/s "
                  f"end to end; loading {load_s:.1f} s)")
    return 0


def _terminate(signum, frame):
    raise Interrupted()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _remove_started(out) -> None:
    """Remove the video this run started writing (never a file it did not open)."""
    if out is not None and out.size is not None:
        try:
            os.remove(out.path)
        except OSError:
            pass


if __name__ == "__main__":
    raise SystemExit(main())
