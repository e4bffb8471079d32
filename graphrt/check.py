"""The command line of the host-read checker: ``python -m graphrt.check --model wan-tiny [--reference]``
or ``python -m graphrt.check path/to/file.py:factory``.

The checker itself is :mod:`graphrt.capture.hostreads` (``graphrt.check`` the function); this module
drives it over a built-in model through the pipeline, or over a factory in a user's file. Importing
it is safe: the module is callable as the function it shadows on the package (``graphrt.check(fn,
...)`` runs :func:`graphrt.capture.check` whether or not ``graphrt.check`` the module was imported).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import traceback
import types

import torch
from rich.console import Console

from graphrt.capture import HostReadRecorder, HostReadReport, check, is_internal, per_call_text
from graphrt.errors import ConfigError
from graphrt.models.wan import CausalWan, ReferenceWan, WanConfig
from graphrt.pipeline import Engine, reference_stream


@torch.no_grad()
def _check_wan_tiny(reference: bool = False, chunks: int = 3, seed: int = 0) -> HostReadReport:
    """A short generation of the tiny Wan, one recorded call per chunk (the denoising forwards
    and the clean pass that writes the cache), driven by the real pipeline."""
    torch.manual_seed(seed)
    cfg = WanConfig.preset("tiny")
    context = torch.randn(1, cfg.text_len, cfg.text_dim)
    if reference:
        stream = reference_stream(ReferenceWan(cfg).eval(), context, chunks, seed)
    else:
        stream = Engine(CausalWan(cfg).eval(), mode="eager").stream(context, chunks, seed)
    recorder = HostReadRecorder()
    for _ in range(chunks):
        with recorder:
            next(stream)
    stream.close()
    return recorder.report()


class _TargetCrash(Exception):
    """The check target itself raised (``__cause__``) while ``stage`` ran: exit status 3, not 2."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


# What the checked code may raise and still be reported as a crash (exit 3): sys.exit() in a
# factory or forward means the check did not run, never that it found nothing. KeyboardInterrupt
# goes on up: Ctrl-C stops the check (a non-zero exit) as it stops any program.
_TARGET_ERRORS = (Exception, SystemExit)


def _load_factory(spec: str):
    """``path/to/file.py:factory`` -> (fn, args, kwargs) from ``factory()``."""
    fix = "name a Python file and a function in it that returns (fn, args) or (fn, args, kwargs)"
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        raise ConfigError("cannot read the check target", expected="path/to/file.py:factory", got=spec, fix=fix)
    if not os.path.isfile(path):
        raise ConfigError("check target file not found", where=path, got=os.path.abspath(path), fix=fix)
    module_name = f"_graphrt_check_{abs(hash(os.path.abspath(path)))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up there
    try:
        module_spec.loader.exec_module(module)
    except _TARGET_ERRORS as e:
        raise _TargetCrash(f"importing {path}") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"{path} has no function {name!r}", expected="a callable factory",
                          got=type(factory).__name__, fix=fix)
    try:
        made = factory()
    except _TARGET_ERRORS as e:
        raise _TargetCrash(f"{name}() in {path}") from e
    if not (isinstance(made, tuple) and len(made) in (2, 3) and callable(made[0])
            and isinstance(made[1], (tuple, list)) and (len(made) == 2 or isinstance(made[2], dict))):
        raise ConfigError(f"{name}() returned something that is not (fn, args) or (fn, args, kwargs)",
                          where=path, expected="(callable, tuple/list[, dict])",
                          got=repr(made)[:200], fix=fix)
    fn, args, kwargs = made if len(made) == 3 else (*made, {})
    return fn, tuple(args), kwargs


def _crash(stage: str, e: BaseException, show_traceback: bool) -> int:
    """Say on stderr that the check could not run (not that it found reads); exit status 3."""
    frames = traceback.extract_tb(e.__traceback__)
    user = [f for f in frames if not is_internal(f.filename)] or frames
    if isinstance(e, SyntaxError) and e.filename:
        where = f"{e.filename}:{e.lineno}"
    else:
        where = f"{user[-1].filename}:{user[-1].lineno}" if user else None
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if show_traceback:
        err.print("".join(traceback.format_exception(e)), markup=False)
    err.print(f"error: the check could not run: {stage} raised {type(e).__name__}: {e}"
              + (f"\n  where: {where}" if where else "")
              + ("" if show_traceback else "\n  fix:   run it alone to debug it, or pass --traceback"),
              style="red", markup=False)
    return 3


def main(argv=None) -> int:
    """``python -m graphrt.check``. Exit status: 0 graph-safe, 1 host reads found, 2 bad arguments,
    3 the check could not run (the target file, its factory or the forward raised)."""
    parser = argparse.ArgumentParser(
        prog="python -m graphrt.check",
        description="Run a forward once and list every host read (file:line, kind, count, how to fix). "
                    "Exit status: 0 graph-safe, 1 host reads found, 2 bad arguments, 3 the check could not run.")
    parser.add_argument("target", nargs="?", help="path/to/file.py:factory; factory() returns (fn, args[, kwargs])")
    parser.add_argument("--model", choices=["wan-tiny"], help="a built-in model with random weights")
    parser.add_argument("--reference", action="store_true", help="check the upstream-style ReferenceWan")
    parser.add_argument("--chunks", type=int, default=None, help="chunks to generate with --model (default 3)")
    parser.add_argument("--traceback", action="store_true", help="print the whole traceback when the check crashes")
    try:
        opts = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on bad arguments and 0 on --help
        return exit_.code if isinstance(exit_.code, int) else 2
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)  # logs get the whole table
    try:
        if (opts.target is None) == (opts.model is None):
            raise ConfigError("say what to check: one model or one factory",
                              expected="--model wan-tiny, or path/to/file.py:factory",
                              got=f"model={opts.model}, target={opts.target}")
        if opts.target is not None and (opts.reference or opts.chunks is not None):
            raise ConfigError("--reference and --chunks apply to --model only", got=opts.target)
        chunks = 3 if opts.chunks is None else opts.chunks
        most = WanConfig.preset("tiny").num_chunks      # what one video's cache holds
        if not 1 <= chunks <= most:
            raise ConfigError(f"--chunks must be in 1..{most} (wan-tiny's videos hold {most} chunks)", got=chunks)
        target = _load_factory(opts.target) if opts.target else None
    except ConfigError as e:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {e}", style="red", markup=False)
        return 2
    except _TargetCrash as e:
        return _crash(e.stage, e.__cause__, opts.traceback)

    if target:
        console.print(f"host reads of {opts.target}", style="bold", markup=False)
        try:
            report = check(target[0], *target[1], **target[2])
        except _TARGET_ERRORS as e:
            return _crash("the checked function", e, opts.traceback)
        console.print(report)
        return 0 if report.ok else 1
    name = "ReferenceWan" if opts.reference else "CausalWan"
    try:
        report = _check_wan_tiny(opts.reference, chunks)
    except Exception as e:
        return _crash(f"{name} (wan-tiny)", e, opts.traceback)
    console.print(f"host reads of {name} (wan-tiny), {chunks} chunk(s) of 4 denoising forwards + the cache pass "
                  "(one call = one chunk)", style="bold", markup=False)
    console.print(report)
    console.print(f"reads per chunk: {per_call_text(report.per_call)}", markup=False)
    return 0 if report.ok else 1


class _CallableModule(types.ModuleType):
    """``import graphrt.check`` binds this module over the function on the package: calling it checks."""

    def __call__(self, fn, *args, **kwargs) -> HostReadReport:
        return check(fn, *args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    raise SystemExit(main())
