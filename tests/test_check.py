"""The host-read checker: each planted read is named at its line with its kind, counts add up,
clean forwards report nothing, the reference Wan reads every chunk and CausalWan never does."""
import os
import subprocess
import sys

import pytest
import torch

import planted_reads as planted
from graphrt.capture import HostReadRecorder, check
from graphrt.check import main
from graphrt.errors import HostReadError
from graphrt.kv import StaticKVCache

SCALAR, SHAPE, D2H, H2D = "scalar read", "data-dependent shape", "device-to-host copy", "host-to-device copy"
HOST_VALUE, HOST_TENSOR, ASYNC_H2D, RNG = "host value", "host tensor", "async upload", "random draw"
ITEM = "aten._local_scalar_dense.default"

PLANTED = [  # (function, marker, kind, op)
    (planted.item, "item", SCALAR, ITEM),
    (planted.int_of, "int", SCALAR, ITEM),
    (planted.if_tensor, "bool", SCALAR, ITEM),
    (planted.tolist, "tolist", SCALAR, "Tensor.tolist"),
    (planted.nonzero, "nonzero", SHAPE, "aten.nonzero.default"),
    (planted.bool_mask, "mask", SHAPE, "aten.index.Tensor"),
    (planted.mask_assign, "mask_assign", SHAPE, "aten.index_put_.default"),
    (planted.masked_select, "masked_select", SHAPE, "aten.masked_select.default"),
    (planted.unique, "unique", SHAPE, "aten._unique2.default"),
    (planted.repeat_interleave, "repeat_interleave", SHAPE, "aten.repeat_interleave.Tensor"),
    (planted.numpy, "numpy", D2H, "Tensor.numpy"),
    (planted.asarray, "asarray", D2H, "Tensor.__array__"),
    (planted.cpu, "cpu", D2H, "Tensor.cpu"),
    (planted.to_cpu, "to_cpu", D2H, "Tensor.to"),
    (planted.repr_, "repr", D2H, "Tensor.__repr__"),
]


def plant_line(marker: str) -> int:
    with open(planted.__file__) as f:
        lines = [i for i, text in enumerate(f, 1) if text.rstrip().endswith(f"# PLANT: {marker}")]
    assert len(lines) == 1, f"marker {marker!r} must appear exactly once in planted_reads.py"
    return lines[0]


@pytest.mark.parametrize("fn, marker, kind, op", PLANTED, ids=[p[1] for p in PLANTED])
def test_each_planted_read_is_named_at_its_line(fn, marker, kind, op):
    report = check(fn, torch.randn(6))
    assert [(s.kind, s.op, s.count) for s in report.sites] == [(kind, op, 1)]
    site = report.sites[0]
    assert os.path.samefile(site.file, planted.__file__)
    assert site.line == plant_line(marker)
    assert f"# PLANT: {marker}" in site.code and site.hint
    assert (report.count, report.calls, report.ok) == (1, 1, False)


def test_a_read_in_a_loop_is_one_site_counted_three_times():
    report = check(planted.loop, torch.randn(4))
    assert len(report.sites) == 1
    assert (report.sites[0].count, report.sites[0].line, report.count) == (3, plant_line("loop"), 3)


def test_clean_forward_reports_nothing():
    for fn in (planted.clean, planted.repeat_interleave_sized):
        report = check(fn, torch.randn(6))
        assert report.ok and report.count == 0 and report.sites == [] and report.per_call == (0,)
        assert report.raise_if_any() is report
        assert "no host reads" in str(report)


def test_raise_if_any_carries_the_table():
    report = check(planted.item, torch.randn(3))
    with pytest.raises(HostReadError) as err:
        report.raise_if_any()
    assert err.value.report is report
    message = str(err.value)
    for text in (SCALAR, ITEM, f"planted_reads.py:{plant_line('item')}", "# PLANT: item", "pass a Python int"):
        assert text in message
    assert "expected: no host reads" in message


def test_recorder_counts_per_call():
    recorder = HostReadRecorder()
    x = torch.ones(2)
    for n in (1, 2, 0):
        with recorder:
            for _ in range(n):
                planted.item(x)
    report = recorder.report()
    assert report.per_call == (1, 2, 0) and report.count == 3 and report.calls == 3
    assert [s.count for s in report.sites] == [3]


# -- the Wan models, chunk by chunk as in a generation -------------------------------------------------
STEPS = (1000.0, 500.0, 0.0)  # two denoising forwards, then the clean pass that writes the cache


def _chunks(cfg, n):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, cfg.in_dim, cfg.chunk_frames, cfg.height, cfg.width, generator=g) for _ in range(n)]


@torch.no_grad()
def test_reference_reads_the_host_every_chunk_the_same_number_of_times(cfg, models):
    ref, _ = models
    context = torch.randn(1, cfg.text_len, cfg.text_dim)
    kv, cross = ref.init_caches(1)
    recorder = HostReadRecorder()
    ts = [torch.full((1,), t) for t in STEPS]
    for c, x in enumerate(_chunks(cfg, 3)):
        with recorder:  # one call = one chunk
            for t in ts:
                ref(x, t, context, kv, cross, current_start=c * cfg.chunk_frames * cfg.frame_tokens)
    report = recorder.report()
    assert report.per_call[0] > 0 and len(set(report.per_call)) == 1
    # reads, and upstream's grid sizes built on the host (torch.tensor(u.shape[2:])): a host tensor
    assert {s.kind for s in report.sites} == {SCALAR, HOST_TENSOR}
    assert [s.code for s in report.hazards] == ["grid_sizes = torch.stack([torch.tensor(u.shape[2:], "
                                                "dtype=torch.long) for u in x])"]
    assert all(s.file.endswith(os.path.join("models", "wan", "reference.py")) for s in report.sites)
    assert any(".item()" in s.code for s in report.sites) and any(".tolist()" in s.code for s in report.sites)


@torch.no_grad()
def test_causal_wan_with_a_cache_reads_nothing(cfg, models):
    _, causal = models
    cache = StaticKVCache.for_model(causal)
    slab = cache.acquire()
    cache.bind([slab])
    k, v = causal.encode_prompt(torch.randn(1, cfg.text_len, cfg.text_dim))
    cache.set_cross(slab, k[:, 0], v[:, 0])
    recorder = HostReadRecorder()
    for c, x in enumerate(_chunks(cfg, 3)):
        ts = [torch.full((1,), t) for t in STEPS]
        with recorder:
            for t in ts:
                causal(x, t, cache=cache, kv_frames=(c + 1) * cfg.chunk_frames, kv_exact=True)
                causal(x, t, cache=cache, kv_frames=None)  # masked over the whole slab
        cache.commit(1, cfg.chunk_frames)
    report = recorder.report()
    assert report.ok, str(report)
    assert report.per_call == (0, 0, 0)


# -- the CLI -------------------------------------------------------------------------------------------
def test_cli_exit_status_says_whether_the_model_is_graph_safe(capsys):
    assert main(["--model", "wan-tiny", "--reference", "--chunks", "2"]) == 1
    out = capsys.readouterr().out
    assert "reference.py:" in out and SCALAR in out and "reads per chunk: 65 (x2)" in out
    assert main(["--model", "wan-tiny", "--chunks", "2"]) == 0
    assert "no host reads" in capsys.readouterr().out


def test_cli_bad_spec_exits_2(capsys, tmp_path):
    assert main([]) == 2
    assert main(["--model", "wan-tiny", "--chunks", "0"]) == 2
    assert main(["no_colon.py"]) == 2
    assert main([f"{tmp_path / 'missing.py'}:factory"]) == 2
    (tmp_path / "f.py").write_text("def factory():\n    return 42\n")
    assert main([f"{tmp_path / 'f.py'}:factory"]) == 2
    assert main([f"{tmp_path / 'f.py'}:nothing"]) == 2
    err = capsys.readouterr().err
    assert "expected: path/to/file.py:factory" in err and "check target file not found" in err


def test_cli_factory_form(capsys, tmp_path):
    target = tmp_path / "forward.py"
    target.write_text(
        "import torch\n\n"
        "def leaky(x, scale=1.0):\n"
        "    return x * x.max().item() * scale\n\n"
        "def factory():\n"
        "    return leaky, (torch.randn(3),), {'scale': 2.0}\n\n"
        "def clean_factory():\n"
        "    return torch.nn.functional.relu, [torch.randn(3)]\n")
    assert main([f"{target}:factory"]) == 1
    out = capsys.readouterr().out
    assert "forward.py:4" in out and "x.max().item()" in out
    assert main([f"{target}:clean_factory"]) == 0


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "graphrt.check", "--model", "wan-tiny", "--chunks", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no host reads" in done.stdout


# -- CUDA: copies between host and device ---------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("fn, marker, kind, op", [
    (planted.device_to_host, "d2h", D2H, "aten.copy_.default"),
    (planted.host_to_device, "h2d", H2D, "aten.lift_fresh.default"),
    (planted.host_to_device_copy, "h2d_copy", H2D, "aten._to_copy.default"),
    (planted.cpu, "cpu", D2H, "Tensor.cpu"),
    (planted.tolist, "tolist", SCALAR, "Tensor.tolist"),
    (planted.item, "item", SCALAR, ITEM),
], ids=["d2h", "h2d", "h2d_copy", "cpu", "tolist", "item"])
def test_cuda_copies_are_named_once(fn, marker, kind, op):
    report = check(fn, torch.randn(4, device="cuda"))
    assert [(s.kind, s.op, s.count, s.line) for s in report.sites] == [(kind, op, 1, plant_line(marker))]


# -- the CLI when the check itself cannot run: exit 3 and a clear message, not 1 and a traceback ---------
CRASHES = {
    "factory-raises": ("def factory():\n    return 1 / 0\n", "factory() in", "ZeroDivisionError", 2),
    "syntax-error": ("def factory(:\n    pass\n", "importing", "SyntaxError", 1),
    "forward-fails": ("import torch\n\ndef factory():\n    return (lambda x: x @ torch.ones(3, 5)), (torch.ones(2, 4),)\n",
                      "the checked function", "RuntimeError", 4),
    "factory-exits-0": ("import sys\n\ndef factory():\n    sys.exit(0)\n", "factory() in", "SystemExit", 4),
    "forward-exits-0": ("import sys\nimport torch\n\ndef factory():\n    return (lambda x: sys.exit(0)), "
                        "(torch.ones(2),)\n", "the checked function", "SystemExit", 5),
    "import-exits": ("import sys\nsys.exit('no')\n", "importing", "SystemExit", 2),
}


@pytest.mark.parametrize("name", list(CRASHES))
def test_cli_crash_exits_3_with_its_cause(capsys, tmp_path, name):
    source, stage, error, line = CRASHES[name]
    target = tmp_path / "target.py"
    target.write_text(source)
    assert main([f"{target}:factory"]) == 3
    err = capsys.readouterr().err
    assert f"error: the check could not run: {stage}" in err and f"raised {error}" in err
    assert f"where: {target}:{line}" in err and "Traceback" not in err
    assert main([f"{target}:factory", "--traceback"]) == 3
    assert "Traceback" in capsys.readouterr().err


def test_cli_chunks_past_the_slab_is_a_bad_argument(capsys):
    assert main(["--model", "wan-tiny", "--chunks", "8"]) == 2
    assert "--chunks must be in 1..7" in capsys.readouterr().err


def test_subscripts_in_the_code_column_are_shown(capsys, tmp_path, monkeypatch):
    """The table went through rich markup: ``x[mask]`` lost exactly its ``[mask]``."""
    monkeypatch.chdir(tmp_path)                  # short file:line, so the code column is not cut
    target = tmp_path / "subscripts.py"
    target.write_text("import torch\n\n"
                      "def leaky(x, cache):\n"
                      "    mask = x > 0\n"
                      "    return x[mask].sum() + cache[int(x[0])]\n\n"
                      "def factory():\n"
                      "    return leaky, (torch.randn(4), torch.randn(3))\n")
    code = "x[mask].sum() + cache[int(x[0])]"
    assert main(["subscripts.py:factory"]) == 1
    assert code in capsys.readouterr().out
    import importlib.util

    spec = importlib.util.spec_from_file_location("subscripts", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = check(*module.factory()[:1], *module.factory()[1])
    assert code in str(report)
    with pytest.raises(HostReadError) as err:
        report.raise_if_any()
    assert code in str(err.value)


# -- what a CUDA graph would freeze or cannot hold: not reads, but a capture refuses them --------------
HAZARD_PLANTS = [  # (function, marker, kind, op)
    (planted.host_value, "host_value", HOST_VALUE, "aten.mul.Tensor"),
    (planted.host_value_derived, "host_value_derived", HOST_VALUE, "aten.mul.Tensor"),
    (planted.factory, "factory", HOST_TENSOR, "torch.arange"),
]


@pytest.mark.parametrize("fn, marker, kind, op", HAZARD_PLANTS, ids=[p[1] for p in HAZARD_PLANTS])
def test_host_values_and_host_tensors_are_named_at_their_line(fn, marker, kind, op):
    report = check(fn, torch.randn(6))
    assert [(s.kind, s.op, s.count, s.line) for s in report.sites] == [(kind, op, 1, plant_line(marker))]
    assert report.count == 0 and not report.ok and report.hazards == report.sites
    with pytest.raises(HostReadError, match="1 host value"):
        report.raise_if_any()


def test_random_draws_are_notes_not_reads():
    report = check(planted.rng, torch.randn(6))
    assert [(s.kind, s.line) for s in report.notes] == [(RNG, plant_line("rng"))]
    assert report.ok and report.count == 0 and "replays draw new numbers" in report.summary()
    assert check(torch.nn.functional.dropout, torch.randn(6), 0.0).ok     # p = 0 draws nothing
    assert not check(torch.nn.functional.scaled_dot_product_attention, *torch.randn(3, 1, 2, 4, 8)).sites


def test_device_scalars_are_not_host_values():
    """Arguments, parameters, buffers and values made on the device are read by address at
    replay; a plain tensor attribute stays on the host of a CUDA model."""
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("gain", torch.tensor(3.0))
            self.bias = torch.nn.Parameter(torch.tensor(1.0))
            self.plain = torch.tensor(2.0)

        def forward(self, x, s, use_plain=False):
            y = x * self.gain + self.bias + x.sum() * s
            return y * self.plain if use_plain else y

    m = Scaled()
    assert check(m, torch.randn(3), torch.tensor(0.5)).ok
    report = check(m, torch.randn(3), torch.tensor(0.5), use_plain=True)
    assert [(s.kind, s.code) for s in report.sites] == [(HOST_VALUE, "return y * self.plain if use_plain else y")]


def test_cpu_scalar_arguments_of_a_device_model_are_host_values():
    """A 0-dim CPU tensor passed next to device tensors (meta stands in for CUDA) is a host value:
    CUDA takes its value as a kernel argument, so the graph keeps the capture's value (the static
    buffer graphrt copies later calls into is on the CPU, where the graph never reads it). So is
    a value computed from it on the host. A CPU model's own CPU arguments stay device tensors,
    and scalars the call builds itself stay constants."""
    x, m, s = torch.ones(4, device="meta"), torch.ones(4, dtype=torch.bool, device="meta"), torch.tensor(2.0)

    def scaled(x, s):
        return x * s

    def derived(x, s):
        return x * (s * 2)

    def constants(x, m):
        y = torch.where(m, x, 0.0).masked_fill(m, 1.0).clamp(0.0, 1.0) + 3
        return y * torch.full((), 2.0, device=x.device) * x.new_tensor(1.5)

    for fn in (scaled, derived):
        report = check(fn, x, s)
        assert [(s.kind, s.op) for s in report.sites] == [(HOST_VALUE, "aten.mul.Tensor")], fn.__name__
        assert "return x *" in report.sites[0].code
    assert check(scaled, x, torch.tensor(2.0, device="meta")).ok      # on the device: read by address
    assert check(constants, x, m).ok
    for fn in (scaled, derived):                                      # a CPU model: s is on its device
        assert check(fn, torch.ones(4), s).ok


@pytest.mark.cuda
def test_cuda_model_with_a_cpu_scalar_argument_is_refused_at_capture():
    """The CUDA counterpart: compile refuses the capture and names the line, where it used to
    replay the capture's value of ``s`` for every later ``s``."""
    import graphrt

    def scaled(x, s):
        return x * s

    g = graphrt.compile(scaled, backend="cuda-graph", progress=False)
    with pytest.raises(HostReadError, match="host value"):
        g(torch.ones(4, device="cuda"), torch.tensor(2.0))
    g = graphrt.compile(scaled, backend="cuda-graph", progress=False)
    x, s = torch.ones(4, device="cuda"), torch.tensor(2.0, device="cuda")
    g(x, s)
    assert torch.equal(g(x, s.fill_(3.0)), x * 3)                     # a device scalar is read at replay


def test_pinned_non_blocking_uploads_are_counted_apart():
    from graphrt.capture.hostreads import copy_kind

    assert copy_kind(non_blocking=True, pinned=True) == ASYNC_H2D
    assert copy_kind(non_blocking=True, pinned=False) == H2D == copy_kind(non_blocking=False, pinned=True)


def test_importing_the_command_line_keeps_graphrt_check_callable():
    """``import graphrt.check`` binds the CLI module over the function on the package: it still checks."""
    import graphrt
    import graphrt.check

    def reads(x):
        return x.sum().item()

    assert graphrt.check(reads, torch.ones(3)).count == 1
    assert graphrt.check(lambda x: x * 2, torch.ones(3)).ok
