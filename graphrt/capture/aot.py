"""Inductor inside a captured graph: one compiled artifact per bucket, and what it may capture.

A bucket's aten ops are traced once (``make_fx``, every Python value frozen, as a CUDA graph
freezes kernel arguments). With ``inductor`` the trace is compiled. Three wrappers, by how much
Python runs between the kernels at replay:

- ``"python"``: ``torch.compile`` of the trace; inductor's Python wrapper calls each kernel.
- ``"cpp-wrapper"``: the same, with inductor's C++ wrapper.
- ``"aoti"``: an AOTInductor package: the whole bucket is one C++ function, no Python between
  kernels. On the CPU this is the fastest (the tiny model's whole chunk: 1.8 ms of CPU time per
  run, against 4.8 ms and 5.3 ms for ``torch.compile`` of the same trace with the Python and the
  C++ wrapper) and the default there; its compile is long (a minute or more per whole chunk on
  a 2-core machine), so the package is kept on disk (:mod:`graphrt.capture.diskcache`) and a
  second start loads it in milliseconds.

Before compiling, every tensor the trace reads that is not an input of the call (weights, the
KV cache, an engine's tables: ``get_attr`` constants of the trace) is lifted into an input, and
each replay passes the live tensors. So:

- an artifact holds no weights and no state: its key is the graph and the shapes of its
  inputs, never their values, and one package serves every model of that config;
- writes into the cache land in the live tensors (inductor writes mutated inputs back). An
  AOTInductor package of an unlifted trace embeds the tensors it reads as its own constants:
  the positions and K/V it writes are private copies (a toy with a device position counter
  indexed out of bounds on its third call, the counter never reset with the caller's);
- inductor's ``freezing`` (fold parameters into constants) finds nothing to fold. The compile
  sets ``freezing=False`` all the same, and a test runs the whole chunk under a global
  ``freezing=True``, captured before any session exists (so a folded table would be wrong).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from graphrt._version import __version__
from graphrt.capture.diskcache import DiskCache
from graphrt.capture.tensors import storage_key
from graphrt.errors import BackendUnavailableError, CaptureError, InputError

WRAPPERS = ("aoti", "cpp-wrapper", "python")
# settings that pick inductor's tuning (with the device's default wrapper, as ``True``)
TUNINGS = ("max-autotune",)
# one torch.compile of the function for every bucket, no per-bucket trace (graphrt/replay/once.py)
ONCE = "once"
# options every compile here runs with: freezing folds runtime state (see the module docstring);
# graphrt's own CUDA graph captures the compiled code, so inductor must not capture its own
_OPTIONS = {"freezing": False, "triton.cudagraphs": False}
FORMAT = 1          # bump when what a stored artifact means changes
PASSES = "functionalize+cse/1"     # the graph passes before inductor (part of the key: bump on change)


def resolve_wrapper(inductor, device: torch.device) -> str | None:
    """``False``/``None``: no inductor; ``True``: the fastest wrapper for the device ("aoti" on
    the CPU, "python" on CUDA, where the CUDA graph removes the wrapper's cost); or a name.
    ``"once"`` traces no bucket (the function is compiled as a whole): None here."""
    if inductor is None or inductor is False or inductor == ONCE:
        return None
    if inductor is True or inductor in TUNINGS:
        return "aoti" if torch.device(device).type == "cpu" else "python"
    if inductor in WRAPPERS:
        if torch.device(device).type == "cuda" and inductor != "python":
            raise BackendUnavailableError(f"inductor={inductor!r} is a CPU wrapper; on CUDA graphrt's CUDA graph "
                                          "captures torch.compile's kernels", fix="use inductor=True on CUDA")
        return inductor
    raise InputError(f"unknown inductor setting {inductor!r}", expected=(True, False, ONCE) + WRAPPERS + TUNINGS,
                     got=inductor)


def inductor_options(inductor) -> dict:
    """The inductor options a compile under the ``inductor`` setting runs with: graphrt's own
    (freezing and inductor's CUDA graphs off), and for ``"max-autotune"`` what
    ``torch.compile(mode="max-autotune")`` would set (``torch._inductor.list_mode_options``:
    GEMM/conv template autotuning, coordinate-descent tuning of the generated kernels), minus
    inductor's CUDA graphs: graphrt's graph captures the tuned kernels. ``torch.compile`` refuses
    ``mode`` together with ``options``, so the mode is passed as the options it stands for."""
    if inductor in TUNINGS:
        from torch._inductor import list_mode_options

        return {**list_mode_options(inductor), **_OPTIONS}
    return dict(_OPTIONS)


def lift_constants(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """The trace with every tensor attribute (``get_attr``) turned into a trailing input, and
    those tensors in input order. Call the result as ``lifted(*inputs, *constants)``."""
    graph, env, lifted, consts = fx.Graph(), {}, {}, []
    nodes = list(gm.graph.nodes)
    for n in nodes:
        if n.op == "placeholder":
            env[n] = graph.placeholder(n.name)
    for n in nodes:
        if n.op == "get_attr" and n.target not in lifted:
            value = _attr(gm, n.target)
            if not isinstance(value, torch.Tensor):
                raise CaptureError(f"the trace holds a non-tensor attribute {n.target!r} ({type(value).__name__})",
                                   fix="compile without inductor, or keep such objects out of the traced function")
            lifted[n.target] = graph.placeholder("c_" + n.target.replace(".", "_"))
            consts.append(value)
    for n in nodes:
        if n.op == "placeholder":
            continue
        env[n] = lifted[n.target] if n.op == "get_attr" else graph.node_copy(n, lambda a: env[a])
    out = fx.GraphModule(torch.nn.Module(), graph)
    return out, consts


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _check_no_aliasing(args: list[torch.Tensor]) -> None:
    """Inputs of a compiled graph must not share memory: inductor assumes they do not, and a write
    through one would be missed by a read through another."""
    seen: dict[tuple, int] = {}
    for i, t in enumerate(args):
        if t.numel() == 0:
            continue
        k = storage_key(t)
        if k in seen:
            raise CaptureError(f"inputs {seen[k]} and {i} of the compiled graph share memory "
                               f"({list(args[seen[k]].shape)} and {list(t.shape)})",
                               fix="pass whole tensors, not two views of one, or compile without inductor")
        seen[k] = i


def _meta(t: torch.Tensor) -> list:
    return [list(t.shape), list(t.stride()), t.storage_offset(), str(t.dtype), str(t.device)]


def artifact_key(gm: fx.GraphModule, args: list[torch.Tensor], wrapper: str,
                 options: dict | None = None) -> tuple[str, dict]:
    """The disk-cache key of compiling ``gm`` over ``args`` with inductor ``options`` (default
    graphrt's own), and its parts (stored next to it)."""
    devices = {t.device for t in args}
    parts = {
        "format": FORMAT,
        "wrapper": wrapper,
        "options": _OPTIONS if options is None else options,
        "passes": PASSES,
        "graph": hashlib.sha256(gm.code.encode()).hexdigest(),
        "inputs": [_meta(t) for t in args],
        "torch": torch.__version__,
        "graphrt": __version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),      # inductor's CPU loops are built for this many threads
        "cuda": sorted(torch.cuda.get_device_name(d) for d in devices if d.type == "cuda"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


class CompiledTrace:
    """A trace compiled by inductor: ``self(*inputs)`` runs it over the live constants.

    ``disk_hit`` says whether the artifact came from the disk cache (None: no disk cache for
    this wrapper; the ``torch.compile`` wrappers use inductor's own cache). ``options``: inductor's
    (:func:`inductor_options`; default graphrt's own).
    """

    def __init__(self, gm: fx.GraphModule, inputs: list[torch.Tensor], wrapper: str, disk: DiskCache | None,
                 where: str = "a graph", options: dict | None = None):
        lifted, self.consts = lift_constants(gm)
        args = list(inputs) + self.consts
        _check_no_aliasing(args)
        self.wrapper, self.disk_hit = wrapper, None
        self.options = dict(_OPTIONS) if options is None else dict(options)
        if wrapper == "aoti":
            self._run = self._aoti(lifted, args, disk, where)
        else:
            opts = dict(self.options, cpp_wrapper=wrapper == "cpp-wrapper")
            compiled = torch.compile(simplify(lifted, args), fullgraph=True, dynamic=False, options=opts)
            self._run = lambda xs: compiled(*xs)

    def __call__(self, *inputs):
        return self._run([*inputs, *self.consts])

    def _aoti(self, lifted, args, disk: DiskCache | None, where: str) -> Callable:
        key, parts = artifact_key(lifted, args, "aoti", self.options)
        if disk is not None:
            path = disk.get(key)
            if path is not None:
                try:
                    loader = _load(path)
                    self.disk_hit = True
                    return loader.run
                except Exception:       # a truncated or foreign file: compile again
                    disk.drop(key)
            self.disk_hit = False
        with tempfile.TemporaryDirectory(prefix="graphrt-aoti-") as tmp:
            path = Path(tmp) / "graph.pt2"
            _package(lifted, args, path, where, self.options)
            if disk is not None:
                path = disk.put(key, path, dict(parts, what=where))
            return _load(path).run


def simplify(lifted: fx.GraphModule, args: list[torch.Tensor]) -> fx.GraphModule:
    """The lifted trace functionalized (writes into inputs become one copy per input at the end)
    and with common subexpressions merged.

    A whole chunk repeats work across its forwards that inductor does not merge (it runs no
    graph-wide CSE for inference): the noise's element hashes, RoPE angles, cache indices and
    cross-attention gathers are the same in every denoising step. In the traced graph every
    cache write splits it into a region CSE must not cross; functionalized there is one.
    On the tiny model's chunk: 2,896 nodes -> 2,144, the AOTInductor compile about 1.5x
    shorter, the same results bit for bit (through the FX interpreter). The re-trace runs on
    fake tensors: no work, no writes.
    """
    from torch._functorch.compile_utils import fx_graph_cse

    functional = make_fx(torch.func.functionalize(lifted, remove="mutations"), tracing_mode="fake")(*args)
    return fx.GraphModule(functional, fx_graph_cse(functional.graph))


def _package(lifted: fx.GraphModule, args: list[torch.Tensor], path: Path, where: str,
             options: dict | None = None) -> None:
    """torch.export the lifted trace and compile it into an AOTInductor package at ``path``."""
    try:
        program = torch.export.export(simplify(lifted, args), tuple(args), strict=False)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                 inductor_configs=dict(_OPTIONS if options is None else options))
    except Exception as e:
        raise CaptureError(f"AOTInductor could not compile {where}: {type(e).__name__}: {str(e).splitlines()[0]}",
                           fix="compile with inductor='python' (torch.compile of the trace) or without inductor"
                           ) from e


def _load(path: Path):
    """The package's runner; its ``run(list_of_tensors)`` skips the per-call pytree of
    ``AOTICompiledModel.__call__`` (the inputs are already one flat list)."""
    return torch._inductor.aoti_load_package(str(path)).loader
