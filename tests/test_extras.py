"""A base install (``pip install graphrt``, no extras): every ``python -m graphrt.*`` command that
needs an extra says which, in one line, and exits 2; the others run without any extra.

Each command runs in a subprocess in which the extras' packages cannot be imported
(``sys.modules[name] = None``: ``import`` raises and ``importlib.util.find_spec`` finds nothing)."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest

from graphrt.errors import EXTRAS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_EXTRAS = sorted({m for mods in EXTRAS.values() for m in mods} | {"matplotlib"})
RUN = ("import runpy, sys\n"
       "for name in sys.argv[1].split(','):\n"
       "    sys.modules[name] = None\n"
       "sys.argv = sys.argv[2:]\n"
       "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


def without(blocked, module, *args, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1", COLUMNS="80")
    return subprocess.run([sys.executable, "-c", RUN, ",".join(blocked), module, *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("command, extra", [
    (("graphrt.bench.e2e", "--preset", "tiny"), "video"),
    (("graphrt.generate", "--prompt", "a fox", "--chunks", "1", "--out", "{tmp}/v.mp4"), "video"),
    (("graphrt.bench", "--preset", "llama-tiny", "--no-progress"), "llm"),
    (("graphrt.bench.llm", "--preset", "llama-tiny", "--no-progress"), "llm"),
    (("graphrt.serve", "--port", "0"), "serve"),
    (("graphrt.bench.serve", "--clients", "1", "--chunks", "1"), "serve"),
])
def test_a_command_that_needs_an_extra_names_it_in_one_line(tmp_path, command, extra):
    module, *args = command
    proc = without(ALL_EXTRAS, module, *(a.format(tmp=tmp_path) for a in args))
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    said = "python -m graphrt.bench --preset llama-tiny" if module.startswith("graphrt.bench.llm") else module
    assert f"python -m {module}" in err[0] or said in err[0]
    assert f"pip install 'graphrt[{extra}]'" in err[0]
    assert f"pip install -e '.[{extra}]'" in err[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert list(tmp_path.iterdir()) == []        # nothing was written


@pytest.mark.parametrize("command", [
    ("graphrt.bench", "--help"),
    ("graphrt.bench.attention", "--help"),
    ("graphrt.bench.memory",),
    ("graphrt.check", "--model", "wan-tiny", "--chunks", "1"),
])
def test_a_base_command_runs_without_any_extra(command):
    proc = without(ALL_EXTRAS, *command)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_numpy_is_a_base_dependency():
    """torch warns on every import without NumPy: a base install must have it."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert any(d.split("<")[0].split(">")[0].split("=")[0].strip() == "numpy" for d in project["dependencies"])


def test_every_extra_the_commands_name_is_declared():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        names = {d.split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower() for d in declared[extra]}
        assert {pip.lower() for pip in modules.values()} <= names, extra
