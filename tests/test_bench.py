"""python -m graphrt.bench on the tiny preset: every mode present, fields filled, errors within tolerance."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from graphrt.bench import MODES, BenchConfig, run
from graphrt.bench.presets import FUSED_MODES, default_modes
from graphrt.tolerance import tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIELDS = {"first_chunk_ms", "chunk_ms_median", "chunk_ms_p90", "fps", "host_reads_per_chunk", "graphs", "capture_s",
          "peak_mem_bytes", "max_err_vs_reference", "speedup_vs_reference", "speedup_vs_eager"}


@pytest.mark.slow
def test_bench_cli_all_modes(tmp_path):
    out = tmp_path / "bench.json"
    # one layer, one denoising step and one graph per mode keep the inductor compiles few and small
    proc = subprocess.run([sys.executable, "-m", "graphrt.bench", "--preset", "tiny", "--chunks", "2", "--repeats", "1",
                           "--steps", "1", "--layers", "1", "--kv-buckets", "max", "--threads", "1", "--no-progress", "--no-head-to-head",
                           "--json", str(out), "--md", str(tmp_path / "b.md")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    assert {"device", "torch", "preset", "config", "modes"} <= set(last)
    assert last["preset"] == "tiny" and last["config"]["chunks"] == 2
    assert set(last["modes"]) == set(default_modes(torch.device("cpu")))       # the fused ones by name only

    for mode, r in last["modes"].items():
        assert "skipped" not in r, (mode, r)
        assert FIELDS <= set(r), (mode, FIELDS - set(r))
        assert r["max_err_vs_reference"] <= tolerance(torch.float32), mode
        assert r["chunk_ms_median"] > 0 and r["chunk_ms_p90"] >= r["chunk_ms_median"]
        assert r["first_chunk_ms"] > 0 and r["fps"] > 0
        assert len(r["chunk_cpu_ms_by_index"]) == 2 and r["chunk_cpu_ms_spread"][0] <= r["chunk_cpu_ms_median"]
    modes = last["modes"]
    assert modes["reference"]["host_reads_per_chunk"] == 14       # 7 per forward x (1 step + cache pass)
    assert modes["eager"]["host_reads_per_chunk"] == 0 and modes["graphs"]["host_reads_per_chunk"] == 0
    assert all(modes[m]["graphs"] == 1 for m in ("graphs", "chunk-graph", "graphs+inductor", "chunk-graph+inductor"))
    assert modes["reference"]["speedup_vs_reference"] == 1.0
    for m in ("graphs+inductor", "chunk-graph+inductor"):     # a second engine loaded the compiled graph from disk
        assert modes[m]["disk_hits"] == 1 and modes[m]["warm_capture_s"] < modes[m]["capture_s"], modes[m]
        assert not any("different first chunk" in w for w in modes[m].get("warnings", [])), modes[m]
    assert "thread_time" in last["clocks"]["speedups"] and last["config"]["kv_buckets"] == "max"
    assert last["goal"]["strongest_peer"] in ("compile", "compile-chunk") and last["goal"]["ratio"] > 0
    assert "graphrt.bench: tiny" in proc.stdout                   # the table came first
    md = (tmp_path / "b.md").read_text()
    assert "| chunk-graph |" in md and "max err vs reference" in md


def test_fused_modes_run_like_for_like_and_name_their_kernel_path(monkeypatch, tmp_path):
    """graphs+fused / chunk-graph+fused build the model with kernels="fused" and compile it with
    inductor, today's modes use "aten", on the same weights; each mode names its kernel path, and the
    6th chunk (the published comparison point) is reported beside the median."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)    # set by tests/test_kernels.py at import
    modes = ("eager", "graphs", "chunk-graph+fused")
    summary = run(BenchConfig(preset="tiny", chunks=6, steps=1, layers=1, repeats=0, modes=modes, progress=False,
                              head_to_head=False, kv_buckets="max", cache_dir=str(tmp_path)))
    assert summary["comparison_point"]["chunk"] == 6 and summary["comparison_point"]["kv_frames"] == 18
    assert summary["comparison_point"]["measured"]
    for mode in modes:
        r = summary["modes"][mode]
        assert "skipped" not in r, (mode, r)
        assert r["kernel_path"] == ("fused" if mode in FUSED_MODES else "aten"), mode
        assert r["chunk6_ms"] == r["chunk_ms_by_index"][5] and r["chunk6_cpu_ms"] == r["chunk_cpu_ms_by_index"][5]
        assert r["max_err_vs_reference"] is None or r["max_err_vs_reference"] <= tolerance(torch.float32)
    fused = summary["modes"]["chunk-graph+fused"]
    assert fused["fused_ops"] == "aten reference in inductor" and fused["disk_hits"] == 1   # a compiled mode
    assert "fused_ops" not in summary["modes"]["graphs"]
    assert any("fused by inductor" in n for n in fused["notes"])
    from graphrt.bench.__main__ import markdown

    md = markdown(summary)
    assert "| chunk-graph+fused | fused (aten reference in inductor) |" in md and "chunk 6 (KV 18 latent frames)" in md
    short = run(BenchConfig(preset="tiny", chunks=2, repeats=0, modes=("eager",), progress=False))
    assert short["modes"]["eager"]["chunk6_ms"] is None and not short["comparison_point"]["measured"]


def test_fused_twin_shares_the_weights_and_default_modes_skip_fused_on_the_cpu():
    from graphrt.bench.driver import with_kernels
    from graphrt.bench.presets import PRESETS
    from graphrt.models.wan import CausalWan

    model = CausalWan(PRESETS["tiny"].config(2), kernels="aten")
    twin = with_kernels(model, "fused")
    assert twin.kernel_path == "fused" and model.kernel_path == "aten" and with_kernels(model, "aten") is model
    assert all(a is b for a, b in zip(model.parameters(), twin.parameters()))
    assert set(default_modes(torch.device("cpu"))) == set(MODES) - set(FUSED_MODES)
    assert default_modes(torch.device("cuda")) == MODES and all("fused" in m for m in FUSED_MODES)
    assert BenchConfig(preset="tiny").with_modes().modes == default_modes(torch.device("cpu"))


def test_bench_cold_caches_for_graphrt_and_the_peers(tmp_path, monkeypatch):
    """By default a run is cold for both sides: graphrt's disk cache and inductor's cache (which the
    torch.compile peers use) are fresh folders, removed afterwards, and the environment is restored."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "users-inductor"))
    seen = []
    cfg = BenchConfig(preset="tiny", chunks=2, repeats=0, modes=("eager",), progress=False)
    summary = run(cfg, on_mode=lambda m, r, s: seen.append((os.environ["TORCHINDUCTOR_CACHE_DIR"], s["caches"])))
    inductor_dir, caches = seen[0]
    assert caches.startswith("cold") and summary["caches"] == caches
    assert inductor_dir != str(tmp_path / "users-inductor") and not os.path.exists(inductor_dir)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "users-inductor")
    seen.clear()
    summary = run(dataclasses.replace(cfg, cache_dir=str(tmp_path)),
                  on_mode=lambda m, r, s: seen.append(os.environ["TORCHINDUCTOR_CACHE_DIR"]))
    assert seen == [str(tmp_path / "users-inductor")] and summary["caches"].startswith("warm allowed")


def test_bench_subset_and_skips():
    summary = run(BenchConfig(preset="tiny", chunks=2, repeats=0, modes=("reference", "eager"), progress=False))
    assert set(summary["modes"]) == {"reference", "eager"}
    assert summary["modes"]["eager"]["speedup_vs_reference"] > 0
    bad = run(BenchConfig(preset="tiny", chunks=2, repeats=0, modes=("eager",), attention="flash", progress=False))
    assert "cannot run here" in bad["modes"]["eager"]["skipped"]


def test_bench_linear_dtype_fp8_rows_beside_each_mode_with_the_error_and_attention_kernel():
    """--linear-dtype fp8: a "<mode>:fp8" row after each mode (none for the reference), its error
    against that mode's video (tiny, fp32, random weights: measured rms 3.9e-3), and every row
    names the attention kernel that ran (graphrt.attention.kernel_name at the comparison chunk)."""
    from graphrt.attention import kernel_name
    from graphrt.bench.__main__ import markdown

    cfg = BenchConfig(preset="tiny", chunks=2, repeats=0, modes=("reference", "eager", "graphs"), attention="sdpa",
                      linear_dtype="fp8", head_to_head=False, progress=False)
    assert cfg.rows == ("reference", "eager", "eager:fp8", "graphs", "graphs:fp8")
    summary = run(cfg)
    modes = summary["modes"]
    assert list(modes) == list(cfg.rows)
    for m in ("eager", "graphs"):
        assert "rms_err_vs_bf16" not in modes[m]
        assert 1e-3 < modes[m + ":fp8"]["rms_err_vs_bf16"] < 1.5e-2
        assert modes[m + ":fp8"]["rms_err_vs_bf16"] <= modes[m + ":fp8"]["max_err_vs_bf16"]
    # the forward graphs replay the fp8 eager run: the same video, so the same error
    assert modes["graphs:fp8"]["max_err_vs_reference"] == modes["eager:fp8"]["max_err_vs_reference"]
    want = kernel_name("sdpa", torch.device("cpu"), torch.float32, q_shape=(1, 48, 4, 16), kv_len=96)
    assert {r["attention_kernel"] for r in modes.values()} == {want} and want.startswith("sdpa:")
    assert "attention kernel" in markdown(summary) and "fp8 err vs bf16" in markdown(summary)


# -- the command line under misuse: exit status and one clear line ---------------------------------------
def _main(capsys, *args):
    from graphrt.bench.__main__ import main

    rc = main(["--no-progress", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _bad_checkpoint(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"not a safetensors file")
    return str(path)


def _other_model_checkpoint(tmp_path):
    from graphrt.models.wan import CausalWan, WanConfig, save_checkpoint

    path = tmp_path / "other.safetensors"
    save_checkpoint(CausalWan(WanConfig.preset("tiny", num_layers=1)), path)
    return str(path)


BAD_ARGS = {
    "chunks-0": (["--chunks", "0"], "--chunks must be an int >= 1"),
    "steps-0": (["--steps", "0"], "--steps must be an int >= 1"),
    "threads-0": (["--threads", "0"], "--threads must be an int >= 1"),
    "threads-negative": (["--threads", "-2"], "--threads must be an int >= 1"),
    "layers-0": (["--layers", "0"], "--layers must be an int >= 1"),
    "batch-0": (["--batch", "0"], "--batch must be an int >= 1"),
    "repeats-negative": (["--repeats", "-1"], "--repeats must be an int >= 0"),
    "modes-empty": (["--modes", ""], "no mode to run"),
    "modes-twice": (["--modes", "eager,eager"], "a mode is listed twice"),
    "modes-unknown": (["--modes", "eagre"], "unknown mode"),
    "device-gpu0": (["--device", "gpu0"], "unknown device 'gpu0'"),
    "device-mps": (["--device", "mps"], "runs on cpu or cuda"),
    "json-folder": (["--json", "/no/such/folder/x.json"], "--json /no/such/folder/x.json: cannot write there"),
    "md-folder": (["--md", "/no/such/folder/x.md"], "--md /no/such/folder/x.md: cannot write there"),
    "seed-negative": (["--seed", "-1"], "--seed must be an int in [0, 2**63 - batch]"),
    "seed-past-int64": (["--seed", str(2 ** 63 - 1), "--batch", "2"], "--seed must be an int in [0, 2**63 - batch]"),
    "checkpoint-missing": (["--checkpoint", "/no/such/file.safetensors"], "checkpoint not found"),
    "linear-dtype-unknown": (["--linear-dtype", "int4"], "unknown --linear-dtype 'int4'"),
    "checkpoint-garbage": (_bad_checkpoint, "as safetensors"),
    "checkpoint-other-model": (_other_model_checkpoint, "does not match"),
}


@pytest.mark.parametrize("name", list(BAD_ARGS))
def test_bench_bad_arguments_exit_2_with_one_line(capsys, tmp_path, name):
    args, message = BAD_ARGS[name]
    if callable(args):
        args = ["--checkpoint", args(tmp_path)]
    rc, out, err = _main(capsys, "--device", "cpu", *args) if "--device" not in args else _main(capsys, *args)
    assert rc == 2, (name, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err and out == ""                 # nothing ran, no JSON


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_bench_cuda_without_cuda_exits_2(capsys):
    rc, out, err = _main(capsys, "--device", "cuda")
    assert rc == 2 and "'cuda' is not available" in err and out == ""


def test_bench_plot_without_matplotlib_exits_2_before_running(capsys, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    rc, out, err = _main(capsys, "--device", "cpu", "--plot", str(tmp_path / "p.png"))
    assert rc == 2 and "--plot needs matplotlib" in err and out == ""


def test_bench_exits_1_naming_the_mode_that_failed_and_prints_json_last(capsys, tmp_path):
    """flash-attn never runs on the CPU: eager fails, reference runs; the status says so."""
    rc, out, err = _main(capsys, "--device", "cpu", "--modes", "reference,eager", "--attention", "flash",
                         "--chunks", "2", "--repeats", "0", "--json", str(tmp_path / "b.json"))
    assert rc == 1
    assert "error: 1 of 2 mode(s) did not run: eager (" in err
    last = json.loads(out.strip().splitlines()[-1])
    assert "skipped" in last["modes"]["eager"] and "skipped" not in last["modes"]["reference"]
    assert last == json.loads((tmp_path / "b.json").read_text())


def test_bench_one_chunk_runs_every_mode(capsys):
    """The host-read count streamed two chunks, so --chunks 1 skipped every mode (and exited 0)."""
    rc, out, err = _main(capsys, "--device", "cpu", "--modes", "reference,eager,graphs", "--chunks", "1",
                         "--repeats", "1")
    assert rc == 0, err
    modes = json.loads(out.strip().splitlines()[-1])["modes"]
    assert all("skipped" not in r for r in modes.values()), modes
    assert modes["reference"]["host_reads_per_chunk"] == 65 and modes["graphs"]["host_reads_per_chunk"] == 0


def test_bench_cpu_timings_are_pinned_and_recorded():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        summary = run(BenchConfig(preset="tiny", device="cpu", chunks=2, repeats=0, modes=("eager",), progress=False))
        assert torch.get_num_threads() == 2                     # put back
        pinned = run(BenchConfig(preset="tiny", device="cpu", chunks=2, repeats=0, modes=("eager",), threads=2,
                                 progress=False))
    finally:
        torch.set_num_threads(before)
    assert summary["threads"] == 1 and summary["device"] == "cpu (1 threads)" and pinned["threads"] == 2
    load = summary["load_avg"]
    assert load["cpus"] >= 1 and len(load["start"]) == 3 and len(load["end"]) == 3
    eager = summary["modes"]["eager"]
    assert 0 < eager["chunk_cpu_ms_median"] <= eager["chunk_ms_median"] * 1.05


def test_bench_warns_when_the_samples_say_the_machine_was_busy():
    from graphrt.bench.result import ModeResult, steady_times
    from graphrt.bench.timing import Clock

    clock = Clock(torch.device("cpu"))

    def chunk(wall_ms, cpu_ms):
        return (0.0, 0.0), None, (wall_ms / 1000, cpu_ms / 1000)

    calm = ModeResult()
    steady_times(calm, clock, [chunk(10, 10)] * 10)
    assert calm.warnings == [] and calm.chunk_cpu_ms_median == pytest.approx(10)
    noisy = ModeResult()
    steady_times(noisy, clock, [chunk(10, 10)] * 8 + [chunk(40, 10)] * 2)
    assert any("p90 is 4.0x the median" in w for w in noisy.warnings)
    waiting = ModeResult()
    steady_times(waiting, clock, [chunk(20, 10)] * 10)
    assert torch.get_num_threads() == 1 and any("waited for a core" in w for w in waiting.warnings)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_bench_runs_in_16_bit(dtype):
    """The wan presets are bf16 by default: the bench's graph modes run and agree in 16 bits."""
    summary = run(BenchConfig(preset="tiny", dtype=dtype, chunks=2, repeats=0,
                              modes=("reference", "eager", "graphs", "chunk-graph"), progress=False))
    assert summary["config"]["dtype"] == dtype
    for mode, r in summary["modes"].items():
        assert "skipped" not in r, (mode, r)
        assert r["max_err_vs_reference"] <= tolerance(getattr(torch, dtype)), mode
    assert summary["modes"]["graphs"]["host_reads_per_chunk"] == 0


def test_bench_reports_spread_clocks_and_the_goal():
    """Per-video medians give the spread; speedups and the goal use thread CPU time on the CPU."""
    from graphrt.bench.__main__ import markdown
    from graphrt.bench.result import ModeResult, compare, goal_summary, steady_times
    from graphrt.bench.timing import Clock, clocks

    clock = Clock(torch.device("cpu"))

    def chunk(wall_ms, cpu_ms):
        return (0.0, 0.0), None, (wall_ms / 1000, cpu_ms / 1000)

    results = {}
    for mode, cpu in (("eager", 10), ("chunk-graph+inductor", 2), ("graphs", 9), ("compile", 5), ("compile-chunk", 3)):
        r = results[mode] = ModeResult()
        # video 0 a little slower than video 1; wall times inflated by a busy machine (ignored)
        steady_times(r, clock, [chunk(30, cpu * 1.1)] * 2 + [chunk(31, cpu)] * 3, [0, 0, 1, 1, 1])
    assert results["eager"].chunk_cpu_ms_spread == pytest.approx([10, 10.5, 11])
    assert results["eager"].steady_chunks == 5
    modes = compare(results, {})
    assert modes["chunk-graph+inductor"]["speedup_vs_eager"] == pytest.approx(5)    # CPU time, not wall
    goal = goal_summary(results)
    assert (goal["best_graph_mode"], goal["strongest_peer"]) == ("chunk-graph+inductor", "compile-chunk")
    assert goal["ratio"] == pytest.approx(1.5)
    named = clocks(torch.device("cpu"))
    assert "thread_time" in named["speedups"] and "perf_counter" in named["chunk_ms_median"]
    summary = {"preset": "tiny", "device": "cpu (1 threads)", "torch": torch.__version__, "threads": 1,
               "config": {"chunks": 3, "steps": 4, "batch": 1, "dtype": "float32", "attention": "sdpa"},
               "load_avg": {"cpus": 2, "start": [1.0, 1.0, 1.0], "end": [2.0, 1.0, 1.0]}, "clocks": named,
               "modes": modes, "goal": goal}
    md = markdown(summary)
    assert "cpu ms min/med/max" in md and "10.00/10.50/11.00" in md and "1.50x (target 1.2x)" in md


def test_the_head_to_head_result_is_printed_with_the_table(monkeypatch, capsys):
    """The in-turn rerun of the goal's two modes (the ratio to quote) is printed under the console
    table and in the markdown, with its spread, next to the ratio of the table's own columns."""
    import graphrt.bench.__main__ as cli
    from graphrt.bench.result import ModeResult, compare, goal_summary, steady_times
    from graphrt.bench.timing import Clock, clocks

    clock = Clock(torch.device("cpu"))
    results = {}
    for mode, cpu in (("chunk-graph+inductor", 5.41), ("compile-chunk", 3.68)):
        r = results[mode] = ModeResult()
        steady_times(r, clock, [((0.0, 0.0), None, (cpu / 1000, cpu / 1000))] * 2, [0, 1])
    goal = goal_summary(results)
    goal["head_to_head"] = {"order": "one video each in turn", "videos": 3, "steady_chunks": 3, "best_ms": 2.5,
                            "peer_ms": 2.725, "ratio": 1.09, "best_cpu_ms_spread": [2.4, 2.5, 2.6],
                            "peer_cpu_ms_spread": [2.7, 2.725, 2.9]}
    summary = {"preset": "tiny", "device": "cpu (1 threads)", "torch": torch.__version__, "threads": 1,
               "config": {"chunks": 2, "steps": 4, "batch": 1, "dtype": "float32", "attention": "sdpa"},
               "load_avg": {"cpus": 2, "start": [1.0] * 3, "end": [1.0] * 3}, "clocks": clocks(torch.device("cpu")),
               "modes": compare(results, {}), "goal": goal}
    monkeypatch.setattr(cli, "run", lambda cfg, on_mode: summary)
    assert cli.main(["--preset", "tiny", "--modes", "chunk-graph+inductor,compile-chunk", "--no-progress"]) == 0
    out = capsys.readouterr().out
    table_line = "goal, in the table: chunk-graph+inductor 5.41 ms (5.41/5.41/5.41) vs compile-chunk 3.68 ms"
    in_turn = ("goal, head to head (one video each in turn, 3 videos each, 3 steady chunks, min/med/max): "
               "chunk-graph+inductor 2.50 ms (2.40/2.50/2.60) vs compile-chunk 2.73 ms (2.70/2.73/2.90): 1.09x")
    assert table_line in out and "0.68x" in out and in_turn in out
    md = cli.markdown(summary)
    assert table_line in md and in_turn in md


def test_head_to_head_runs_two_modes_in_turn():
    """The goal's rerun: one video of each mode in turn, thread CPU time per steady chunk."""
    from graphrt.bench.core import head_to_head
    from graphrt.bench.presets import PRESETS
    from graphrt.bench.timing import Clock
    from graphrt.models.wan import CausalWan, ReferenceWan
    from graphrt.pipeline import FlowMatchSchedule

    wcfg = PRESETS["tiny"].config(2)
    ref = ReferenceWan(wcfg).eval()
    causal = CausalWan(wcfg, attention="sdpa").eval()
    causal.load_state_dict(ref.state_dict())
    context = torch.randn(1, wcfg.text_len, wcfg.text_dim)
    h = head_to_head(("graphs", "eager"), causal, ref, FlowMatchSchedule(steps=(1000.0, 500.0)),
                     BenchConfig(preset="tiny", progress=False), context, 2, 3, Clock(torch.device("cpu")))
    assert h["videos"] == 3 and h["steady_chunks"] == 3                  # chunk 1 of each video
    assert h["ratio"] == pytest.approx(h["peer_ms"] / h["best_ms"]) and h["ratio"] > 0
    assert h["best_cpu_ms_spread"][0] <= h["best_ms"] <= h["best_cpu_ms_spread"][2]


def test_kernel_table_names_the_attention_kernel_that_ran():
    """On CUDA the bench profiles one steady chunk and says which SDPA kernel ran (the next GPU
    question: cuDNN or flash?). The table is built from kernel names, checked here on real ones."""
    from graphrt.bench.profile import kernel_table

    cudnn = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0"
    flash = "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false>, true>(Params)"
    gemm = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel"
    eff = "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<bf16>::Params)"
    launches = [(cudnn, 1000.0)] * 30 + [(gemm, 150.0)] * 120 + [(flash, 500.0)] * 2 + [(eff, 250.0)] * 4
    t = kernel_table(launches, top=2)
    assert t["total_ms"] == pytest.approx(30 + 18 + 1 + 1)
    assert [r["name"] for r in t["top"]] == [cudnn, gemm] and t["top"][0]["calls"] == 30
    assert t["top"][0]["share"] == pytest.approx(30 / 50)
    att = t["attention"]
    assert set(att) == {"cudnn", "sdpa-flash", "sdpa-efficient"}          # GEMMs are not attention
    assert att["cudnn"]["ms"] == pytest.approx(30) and att["cudnn"]["calls"] == 30
    assert att["sdpa-flash"]["share"] == pytest.approx(1 / 50)
    assert kernel_table([("void flash::flash_fwd_splitkv_kernel<...>", 10.0)])["attention"].keys() == {"flash-attn"}


def _read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):                          # root writes anywhere
        pytest.skip("this user can write to a read-only folder")
    return str(folder / "x.json")


@pytest.mark.parametrize("where", ["read-only-folder", "proc"])
def test_bench_json_into_an_unwritable_folder_exits_2_before_running(capsys, tmp_path, where):
    if where == "proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    path = _read_only_folder(tmp_path) if where != "proc" else "/proc/graphrt-bench.json"    # fails for root too
    rc, out, err = _main(capsys, "--device", "cpu", "--json", path)
    assert rc == 2 and f"--json {path}: cannot write there" in err and out == "", err
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(path)


def test_bench_output_check_leaves_files_as_they_were(tmp_path):
    from argparse import Namespace

    from graphrt.bench.__main__ import _check_outputs

    old, new = tmp_path / "old.json", tmp_path / "new.md"
    old.write_text("{}")
    _check_outputs(Namespace(json_path=str(old), md=str(new), plot=None))
    assert old.read_text() == "{}" and not new.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_killed_bench_removes_its_temporary_folders(tmp_path, sig):
    """SIGTERM (as Ctrl-C) during a run leaves no temporary cache or compile folder behind."""
    env = dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "graphrt.bench", "--preset", "tiny", "--modes",
                             "chunk-graph+inductor", "--no-progress", "--repeats", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # as in a terminal
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("graphrt-*")):
            assert proc.poll() is None and time.monotonic() < deadline, "the bench made no temporary folder"
            time.sleep(0.2)
        made = [p.name for p in tmp_path.glob("graphrt-*")]
        time.sleep(1.0)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert made and list(tmp_path.glob("graphrt-*")) == [], (made, err[-2000:])
