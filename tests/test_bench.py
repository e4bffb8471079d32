"""python -m graphrt.bench on the tiny preset: every mode present, fields filled, errors within tolerance."""
import json
import subprocess
import sys

import pytest

from graphrt.bench import MODES, BenchConfig, run
from graphrt.tolerance import tolerance

FIELDS = {"first_chunk_ms", "chunk_ms_median", "chunk_ms_p90", "fps", "host_reads_per_chunk", "graphs", "capture_s",
          "peak_mem_bytes", "max_err_vs_reference", "speedup_vs_reference", "speedup_vs_eager"}


@pytest.mark.slow
def test_bench_cli_all_modes(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "graphrt.bench", "--preset", "tiny", "--chunks", "2", "--repeats", "1",
                           "--threads", "1", "--no-progress", "--json", str(out), "--md", str(tmp_path / "b.md")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    assert {"device", "torch", "preset", "config", "modes"} <= set(last)
    assert last["preset"] == "tiny" and last["config"]["chunks"] == 2
    assert set(last["modes"]) == set(MODES)
    import torch

    for mode, r in last["modes"].items():
        assert "skipped" not in r, (mode, r)
        assert FIELDS <= set(r), (mode, FIELDS - set(r))
        assert r["max_err_vs_reference"] <= tolerance(torch.float32), mode
        assert r["chunk_ms_median"] > 0 and r["chunk_ms_p90"] >= r["chunk_ms_median"]
        assert r["first_chunk_ms"] > 0 and r["fps"] > 0
    modes = last["modes"]
    assert modes["reference"]["host_reads_per_chunk"] == 65       # 13 per forward x (4 steps + cache pass)
    assert modes["eager"]["host_reads_per_chunk"] == 0 and modes["graphs"]["host_reads_per_chunk"] == 0
    assert modes["graphs"]["graphs"] == 2 and modes["chunk-graph"]["graphs"] == 2
    assert modes["reference"]["speedup_vs_reference"] == 1.0
    assert "graphrt.bench: tiny" in proc.stdout                   # the table came first
    md = (tmp_path / "b.md").read_text()
    assert "| chunk-graph |" in md and "max err vs reference" in md


def test_bench_subset_and_skips():
    summary = run(BenchConfig(preset="tiny", chunks=2, repeats=0, modes=("reference", "eager"), progress=False))
    assert set(summary["modes"]) == {"reference", "eager"}
    assert summary["modes"]["eager"]["speedup_vs_reference"] > 0
    bad = run(BenchConfig(preset="tiny", chunks=2, repeats=0, modes=("eager",), attention="flash", progress=False))
    assert "cannot run here" in bad["modes"]["eager"]["skipped"]
