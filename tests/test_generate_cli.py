"""``python -m graphrt.generate`` under misuse: every option checked before a model is built,
and Ctrl-C / SIGTERM stop quickly with a playable file of the frames written so far."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import graphrt.generate as generate
PROMPT = "a red fox runs through the snow"


def ctrl_c_as_in_a_terminal():
    """In the child before exec: SIGINT back to its default, as in a terminal (a shell's background
    job starts with it ignored, and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def no_build(monkeypatch):
    def build(opts):
        raise AssertionError("a model was built before the options were checked")
    monkeypatch.setattr(generate, "build", build)


@pytest.mark.parametrize("args, says", [
    (["--out", "{tmp}"], "is a folder"),
    (["--out", "{tmp}/video.txt"], "must end in .mp4"),
    (["--out", "{tmp}/nowhere/video.mp4"], "does not exist"),
    (["--out", "/proc/video.mp4"], "cannot write in /proc"),
    (["--threads", "-3"], "--threads must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--device", "tpu:x"], "is not a device"),
    (["--device", "meta"], "runs on cpu or cuda"),
    (["--model", "{tmp}/no-such-model"], "no such folder"),
    (["--chunks", "0"], "--chunks and --chunk-frames must be >= 1"),
])
def test_bad_options_exit_2_before_any_model(tmp_path, capsys, no_build, args, says):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "v.mp4")]
    assert generate.main(args + ["--no-progress"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert says in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(tmp_path, capsys, no_build):
    assert generate.main(["--device", "cuda", "--out", str(tmp_path / "v.mp4")]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_extra_hint_keeps_its_brackets(tmp_path, capsys, no_build, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "av" else real(m, *a))
    assert generate.main(["--out", str(tmp_path / "v.mp4")]) == 2
    assert "pip install -e '.[video]'" in capsys.readouterr().err


def test_an_existing_file_is_not_removed_when_loading_fails(tmp_path, monkeypatch):
    """A failure before the first frame leaves a file of the same name alone (it was not ours)."""
    from graphrt.errors import GraphrtError

    keep = tmp_path / "old.mp4"
    keep.write_bytes(b"someone's video")

    def build(opts):
        raise GraphrtError("the model could not be loaded")
    monkeypatch.setattr(generate, "build", build)
    assert generate.main(["--out", str(keep), "--no-progress"]) == 2
    assert keep.read_bytes() == b"someone's video"


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_stopped_run_exits_quickly_with_a_playable_file(tmp_path, sig, code, word):
    """Stopped mid-video: within seconds, queued decodes dropped, the frames written so far in an
    mp4 that opens and decodes."""
    av = pytest.importorskip("av")
    out = tmp_path / "stopped.mp4"
    env = dict(os.environ, PYTHONPATH=str(Path(generate.__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "graphrt.generate", "--prompt", PROMPT, "--chunks", "400",
                             "--out", str(out), "--threads", "1", "--no-progress"],
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 240
        while not (out.exists() and out.stat().st_size > 0) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        time.sleep(1.5)                                     # a few chunks in, decodes queued
        sent = time.monotonic()
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
        took = time.monotonic() - sent
        err = " ".join(proc.stderr.read().split())
    finally:
        proc.kill()
    assert rc == code, err[-3000:]
    assert took < 15, f"took {took:.1f} s to stop"
    assert f"{word}: wrote {out} with the" in err and "Traceback" not in err
    with av.open(str(out)) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) > 0 and frames[0].shape == (64, 64, 3)


def test_a_long_video_rolls_instead_of_reserving_its_whole_length():
    from graphrt.kv import RollingKVCache, StaticKVCache
    long = generate.build(generate._args(["--chunks", "100000", "--no-progress", "--device", "cpu"]))
    short = generate.build(generate._args(["--chunks", "7", "--no-progress", "--device", "cpu"]))
    try:
        assert isinstance(long.engine.cache, RollingKVCache) and long.engine.cache.slab_frames == 21
        assert isinstance(short.engine.cache, StaticKVCache) and short.engine.cache.slab_frames == 21
        assert long.engine.cache.memory().total == short.engine.cache.memory().total    # not 100000 chunks' worth
        s = long.open("a fox", num_chunks=9)       # past the 7 chunks a static cache of that size holds
        for _ in range(9):
            long.step([s])[s].result()
    finally:
        long.shutdown()
        short.shutdown()
