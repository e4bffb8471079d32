"""python -m graphrt.bench --preset llama-tiny: dispatch, JSON summary, token agreement, exit codes."""
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from graphrt.bench.llm import MODES, PRESETS, LlmBenchConfig, is_llm_argv, run  # noqa: E402
from graphrt.errors import ConfigError  # noqa: E402

FIELDS = {"first_token_ms", "token_ms_median", "token_ms_p90", "token_cpu_ms_median", "tokens_per_s",
          "host_reads_per_token", "graphs", "capture_s", "peak_mem_bytes", "token_agreement_vs_eager",
          "first_mismatch_vs_eager", "speedup_vs_eager"}


def test_llm_bench_cli(tmp_path):
    out = tmp_path / "llm.json"
    proc = subprocess.run([sys.executable, "-m", "graphrt.bench", "--preset", "llama-tiny", "--modes", "eager,graphs",
                           "--new-tokens", "12", "--repeats", "1", "--batch", "2", "--no-progress", "--json", str(out),
                           "--md", str(tmp_path / "llm.md")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    assert {"device", "torch", "cuda", "date", "threads", "load_avg", "preset", "config", "modes"} <= set(last)
    assert last["preset"] == "llama-tiny" and last["config"]["batch"] == 2 and last["config"]["new_tokens"] == 12
    assert last["device"] == "cpu (1 threads)"
    for mode, r in last["modes"].items():
        assert FIELDS <= set(r), (mode, FIELDS - set(r))
        assert r["token_agreement_vs_eager"] == 1.0 and r["first_mismatch_vs_eager"] is None
        assert r["host_reads_per_token"] == 0 and r["tokens_per_s"] > 0
        assert r["token_ms_p90"] >= r["token_ms_median"] > 0
    assert last["modes"]["graphs"]["graphs"] == 1 and last["modes"]["eager"]["graphs"] == 0
    assert last["clocks"]["speedups"] == last["clocks"]["token_cpu_ms_median"]      # CPU time on the CPU
    eager, graphs = last["modes"]["eager"], last["modes"]["graphs"]
    assert graphs["speedup_vs_eager"] == pytest.approx(eager["token_cpu_ms_median"] / graphs["token_cpu_ms_median"])
    assert "graphrt.bench: llama-tiny" in proc.stdout and "| graphs |" in (tmp_path / "llm.md").read_text()


@pytest.mark.parametrize("argv", [["--preset", "llama-tiny", "--modes", "warp"],
                                  ["--preset", "llama-tiny", "--batch", "0"],
                                  ["--preset", "llama-tiny", "--threads", "0"],
                                  ["--preset=llama-tiny", "--json", "/no/such/folder/x.json"]])
def test_llm_bench_cli_refuses_bad_arguments(argv, capsys):
    from graphrt.bench.__main__ import main

    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_llm_bench_exits_1_when_a_mode_did_not_run(monkeypatch, capsys, tmp_path):
    import graphrt.bench.llm as llm

    real = llm._driver

    def broken(mode, *a):
        if mode == "graphs":
            raise RuntimeError("no graphs today")
        return real(mode, *a)

    monkeypatch.setattr(llm, "_driver", broken)
    out = tmp_path / "s.json"
    assert llm.main(["--modes", "eager,graphs", "--new-tokens", "4", "--repeats", "0", "--no-progress",
                     "--json", str(out)]) == 1
    summary = json.loads(out.read_text())
    assert summary["modes"]["graphs"] == {"skipped": "RuntimeError: no graphs today"}
    assert summary["modes"]["eager"]["token_agreement_vs_eager"] == 1.0
    assert "1 of 2 mode(s) did not run" in capsys.readouterr().err


def test_presets_and_dispatch():
    assert {"llama-tiny", "llama-small"} <= set(PRESETS) and MODES == ("eager", "graphs", "graphs+inductor", "compile")
    assert is_llm_argv(["--preset", "llama-small"]) and is_llm_argv(["--preset=llama-tiny"])
    assert not is_llm_argv(["--preset", "tiny"]) and not is_llm_argv([])
    with pytest.raises(ConfigError, match="unknown"):
        run(LlmBenchConfig(modes=("eager", "fast")))


def test_speedups_compare_cpu_time_on_the_cpu_and_wall_time_on_cuda():
    from graphrt.bench.llm import LlmModeResult, _compare, clocks

    tokens = {m: torch.zeros(1, 2, dtype=torch.long) for m in ("eager", "graphs")}
    cpu = {"eager": LlmModeResult(token_ms_median=10.0, token_cpu_ms_median=8.0),
           "graphs": LlmModeResult(token_ms_median=20.0, token_cpu_ms_median=4.0)}      # a busy machine's wall
    assert _compare(cpu, tokens)["graphs"]["speedup_vs_eager"] == 2.0
    assert clocks(torch.device("cpu"))["speedups"].startswith("thread CPU time")
    gpu = {"eager": LlmModeResult(token_ms_median=10.0), "graphs": LlmModeResult(token_ms_median=5.0)}
    assert _compare(gpu, tokens)["graphs"]["speedup_vs_eager"] == 2.0
    assert clocks(torch.device("cuda"))["speedups"].startswith("CUDA events")


def test_host_reads_that_cannot_be_counted_are_none_not_zero():
    from graphrt.bench.llm import _host_reads_per_token

    class Replay:                                # a replay the checker's hooks cannot run inside
        def start(self, ids, n):
            return ids[:, -1:]

        def step(self, tok):
            raise RuntimeError("not under the checker")

    notes = []
    assert _host_reads_per_token(Replay(), "graphs+inductor", torch.ones(1, 2, dtype=torch.long), notes) is None
    assert notes and notes[0].startswith("host reads not counted")
