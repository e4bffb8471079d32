"""python -m graphrt.bench.traffic: kernels and bytes per forward on the meta device, aten vs fused."""
import json

import pytest
import torch

from graphrt.bench import traffic


def test_fused_moves_less_and_launches_fewer_kernels():
    aten, fused = (traffic.count("tiny", path, kv_frames=6) for path in traffic.PATHS)
    assert 0 < fused.total_kernels < aten.total_kernels
    assert 0 < fused.gb < aten.gb
    assert fused.gemms == aten.gemms and fused.attention == aten.attention > 0   # the same GEMMs and attention
    assert any("rms_norm_rope" in line for line in fused.kernels)               # counted by the line that issued it


def test_one_slab_reads_in_place_and_several_gather():
    """One session slab attends its K/V in place, as the Engine does: the gather's bytes are gone;
    ``gather=True`` (several slabs) counts them, one index_select per K and V per layer."""
    cfg = traffic.PRESETS["tiny"].config()
    place, gather = (traffic.count("tiny", "fused", kv_frames=6, gather=g) for g in (False, True))
    reads = [line for line in gather.kernels if "kv.py" in line and "index_select(0, step.read_index)" in line]
    assert reads and sum(gather.kernels[r] for r in reads) == 2 * cfg.num_layers
    assert not any(line in place.kernels for line in reads)
    moved = sum(gather.bytes[r] for r in reads)
    assert abs((gather.gb - place.gb) * 1e9 - moved) < 1e-6 * moved and place.total_kernels < gather.total_kernels


def test_cli_prints_a_table_and_json_last(capsys):
    assert traffic.main(["--preset", "tiny", "--kv-frames", "3", "--top", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert set(last) == {"aten", "fused"} and last["fused"]["kernels"] < last["aten"]["kernels"]
    assert any(line.startswith("== aten:") for line in out)


@pytest.mark.parametrize("argv", [["--kv-frames", "1", "--preset", "tiny"], ["--preset", "nope"], ["--batch", "0"]])
def test_bad_flags_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        traffic.main(argv)
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_bytes_count_broadcast_dims_once_and_gathered_rows_only():
    scale = torch.empty(1, 1, 8, device="meta").expand(2, 5, 8)
    assert traffic.footprint(scale) == 8 * 4
    pool, idx = torch.empty(1000, 8, device="meta"), torch.empty(3, dtype=torch.long, device="meta")
    out = pool.index_select(0, idx)
    assert traffic.op_bytes(torch.ops.aten.index_select.default, (pool, 0, idx), {}, out) == 2 * 3 * 8 * 4 + 3 * 8
