"""What ``graphrt.compile`` returns: the graph wrapper (static buffers, capture, replay, verify, stats).

One call: the :class:`~graphrt.replay.dispatch.Dispatcher` binds the arguments and maps them to a
bucket key; the wrapper captures that bucket if it is new, copies the tensors into its static buffers (skipped when the caller passed the static buffer itself), replay, and
hand back the static outputs in the model's own structure (unless ``clone_outputs``). Every
bucket's outputs live in one shared arena, so an output is valid until the next replay of *any*
bucket of this module, on CUDA and in the CPU emulation alike: clone what you keep. Static buffers are allocated once per argument at the largest batch
bucket; each bucket uses a view.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from rich.markup import escape
from rich.progress import Progress

from graphrt.capture import mark_internal
from graphrt.capture.aot import ONCE, inductor_options, resolve_wrapper
from graphrt.capture.backends import BACKENDS
from graphrt.capture.capture import Captured, Runtime, capture, resolve_backend
from graphrt.capture.diskcache import DiskCache
from graphrt.capture.state import argument_checks, is_runtime_state
from graphrt.capture.tensors import SCALARS
from graphrt.capture.undo import Bindings, TensorIds, WriteLog, roots_of
from graphrt.errors import (BackendUnavailableError, CaptureError, InputError, ReplayMismatchError, SignatureError,
                            WeightsMovedError)
from graphrt.replay.buckets import BucketKey, Buckets, Request, StateRef, TensorSpec
from graphrt.replay.dispatch import Dispatcher
from graphrt.replay.once import compiled_once
from graphrt.threads import OneThread, one_thread
from graphrt.tolerance import max_rel_err, tolerance


mark_internal(os.path.dirname(os.path.abspath(__file__)))   # a host read's line is the user's, not replay's


@dataclass
class GraphStats:
    """Counters of a compiled module."""

    captures: int = 0
    replays: int = 0
    eager_fallbacks: int = 0
    verified: int = 0
    capture_seconds: float = 0.0
    pool_bytes: int | None = 0      # None under cudaMallocAsync (no memory snapshots)
    undo_bytes: int = 0             # the most capture saved to undo one run (what it wrote, not the caches)
    disk_hits: int = 0              # compiled graphs loaded from the disk cache (inductor on the CPU)
    disk_misses: int = 0            # compiled here (and stored)


@dataclass
class _Bucket:
    key: BucketKey
    leaves: list                      # static leaves: buffers for tensors, values otherwise
    request: Request                  # the structure the leaves fill
    states: list                      # runtime states this bucket touches
    captured: Captured | None = None
    tensor_ids: TensorIds | None = None   # the tensors its argument objects held at capture
    replays: int = 0
    verified: int = 0

    def tensor_positions(self):
        return [i for i, x in enumerate(self.leaves) if isinstance(x, torch.Tensor)]


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


class GraphedModule:
    """A function or module captured as one graph per bucket. Build it with :func:`graphrt.compile`.

    One thread at a time: its static buffers and outputs are one set per module, so a call (or
    ``prewarm``/``reset``) from a second thread while another thread's call runs is refused with
    :class:`~graphrt.errors.ConcurrentCallError`, never served with mixed buffers; calls nest within
    one thread. Serve it from one thread, e.g. a worker that owns it.
    """

    def __init__(self, fn: Callable, *, buckets: Buckets | None = None, backend: str = "auto",
                 inductor: bool | str = False, verify: int = 0, fallback: str = "error", clone_outputs: bool = False,
                 states=(), check: bool = True, progress: bool = True, cache_dir=None):
        if fallback not in ("error", "eager"):
            raise InputError("fallback must be 'error' or 'eager'", got=fallback)
        if backend not in BACKENDS + ("auto",):
            raise BackendUnavailableError(f"unknown graph backend {backend!r}", expected=BACKENDS + ("auto",),
                                          got=backend)
        if backend == "cuda-graph":
            Runtime(backend)          # fails now, not at the first call, when there is no CUDA device
        resolve_wrapper(inductor, torch.device("cpu"))     # an unknown setting fails now
        if not callable(fn):
            raise InputError("graphrt.compile takes a function or an nn.Module", expected="a callable",
                             got=f"{type(fn).__name__} {fn!r}"[:80], fix="graphrt.compile(model) or graphrt.compile(fn)")
        if buckets is not None and not isinstance(buckets, Buckets):
            raise InputError("buckets must be a graphrt.Buckets spec (or None)", got=type(buckets).__name__,
                             fix="buckets=graphrt.Buckets((1, 2, 4), batch_args=(\"x\",))")
        if inductor == ONCE and backend == "cpu-graph":
            raise _once_on_cpu_graph()
        self._disk = DiskCache.resolve(cache_dir) if inductor and inductor != ONCE else None
        if inductor == ONCE:          # one torch.compile for every bucket, captured per bucket
            fn = compiled_once(fn, inductor_options(inductor))
        self.fn = fn
        self._one_thread = OneThread(f"GraphedModule({getattr(fn, '__qualname__', type(fn).__name__)})")
        self.module = fn if isinstance(fn, torch.nn.Module) else None
        self.dispatch = Dispatcher(fn, buckets)
        self.backend, self.inductor, self.verify = backend, inductor, verify
        self.fallback, self.clone_outputs, self.check, self.progress = fallback, clone_outputs, check, progress
        self.stats = GraphStats()
        self.runtime: Runtime | None = None
        self._buffers: dict[tuple, torch.Tensor] = {}
        owner = self.module if self.module is not None else getattr(fn, "__self__", None)
        # module buffers, closures and argument objects need no declaration: capture's write log undoes them
        own = [fn if is_runtime_state(fn) else owner] if is_runtime_state(fn) or is_runtime_state(owner) else []
        self._fixed_states = list(states) + own          # always guarded
        self._weights = _Weights(fn)
        self._states: dict[int, Any] = {id(s): s for s in self._fixed_states}   # every state seen, for reset()

    # -- public --------------------------------------------------------------------------------
    @property
    def keys(self) -> list[BucketKey]:
        """Captured buckets, largest first."""
        return self.dispatch.keys

    @property
    def buckets(self) -> Buckets:
        return self.dispatch.buckets

    @property
    def signature(self) -> inspect.Signature | None:
        return self.dispatch.signature

    @property
    def sealed(self) -> bool:
        """True once ``prewarm()`` captured every bucket: a request no graph serves is then a miss."""
        return self.dispatch.sealed

    @sealed.setter
    def sealed(self, value: bool) -> None:
        self.dispatch.sealed = value

    @property
    def _graphs(self) -> dict[BucketKey, _Bucket]:
        return self.dispatch.graphs

    @one_thread("__call__()")
    def __call__(self, *args, **kwargs):
        self._weights.refuse_moved()
        req = self.dispatch.request(args, kwargs)
        self._register_states(req)
        key = self.dispatch.key(req)
        entry = self._graphs.get(key)
        captured_now = entry is None
        if entry is None:
            self.dispatch.refuse_swapped_objects(key)
            why = self.buckets.allows(key)
            if self.sealed or why:
                return self._miss(req, key, why)
            entry = self._capture(key, req)
        elif entry.tensor_ids is not None:
            self._refuse_rebound_tensors(entry)
        self._load(entry, req)
        with torch.no_grad(), self.dispatch.padding(key, req, entry.states):
            # the call that captured ran with the capture's own Python values: verifying it proves nothing
            if not captured_now and entry.verified < self.verify:
                outs = self._verified_replay(entry)
            else:
                outs = entry.captured.graph.replay()
        entry.replays += 1
        self.stats.replays += 1
        return self._outputs(entry, req, outs)

    @one_thread("prewarm()")
    def prewarm(self, *args, **kwargs) -> "GraphedModule":
        """Capture every bucket up front, largest first, then seal the set of graphs.

        With a :class:`Buckets` spec, one example call (``prewarm(x, t, cache=..., ...)``) is
        enough: every batch size and static value of the spec is captured from its signature.
        Without arguments, the buckets of the calls seen so far are expanded the same way.
        """
        if args or kwargs:
            req = self.dispatch.request(args, kwargs)
            self._register_states(req)
            templates = [(self.dispatch.key(req), req)]
        else:
            templates = [(k, e.request) for k, e in self._graphs.items()]
            if not templates:
                raise CaptureError("prewarm() without an example call has nothing to capture",
                                   fix="call prewarm(*example_args, **example_kwargs) once")
        order = self.dispatch.plan(templates)
        with Progress(transient=True, disable=not self.progress) as bar:
            task = bar.add_task(f"capturing {len(order)} graphs", total=len(order))
            for i, (k, req) in enumerate(order):
                bar.update(task, description=escape(f"capturing graph {i + 1} of {len(order)}: {k}"))
                self._capture(k, req, load=req is templates[0][1] and k == templates[0][0])
                bar.advance(task)
        self.sealed = True
        return self

    @one_thread("reset()")
    def reset(self) -> None:
        """Return every runtime state (positions, lengths, block tables) to empty; graphs are kept."""
        for s in self._states.values():
            s.reset()

    def static_inputs(self, *args, **kwargs) -> tuple[tuple, dict]:
        """The static buffers of the bucket this call maps to, in the call's ``(args, kwargs)``
        structure. Writing into them and passing them back skips the copy-in."""
        req = self.dispatch.request(args, kwargs)
        key = self.dispatch.key(req)
        if key not in self._graphs:
            return self._miss(req, key, self.buckets.allows(key), raise_only=True)
        entry = self._graphs[key]
        return entry.request.rebuild(entry.leaves)

    # -- capture -------------------------------------------------------------------------------
    def _register_states(self, req: Request):
        for x in req.leaves:
            if is_runtime_state(x):
                self._states.setdefault(id(x), x)

    def _request_states(self, req: Request) -> list:
        seen = {id(s): s for s in self._fixed_states}
        for x in req.leaves:
            if is_runtime_state(x):
                seen.setdefault(id(x), x)
        return list(seen.values())

    def _device(self, req: Request) -> torch.device:
        """Where the work runs: the inputs, else the runtime states (caches), else the parameters."""
        for _, x in req.tensors():
            return x.device
        for s in self._request_states(req):
            if isinstance(getattr(s, "device", None), torch.device):
                return s.device
        owner = self.module if self.module is not None else getattr(self.fn, "__self__", None)
        if isinstance(owner, torch.nn.Module):
            for p in owner.parameters():
                return p.device
        return torch.device("cpu")

    def _buffer(self, path: str, spec: TensorSpec) -> torch.Tensor:
        """Static buffer for an argument: one per (path, shape, dtype, device), batched ones at max batch."""
        if spec.batched:
            full = (max(self.buckets.batch_sizes),) + spec.shape[1:]
            k = (path, spec.shape[1:], spec.dtype, spec.device, True)
        else:
            full, k = spec.shape, (path, spec.shape, spec.dtype, spec.device, False)
        if k not in self._buffers:
            self._buffers[k] = torch.zeros(full, dtype=spec.dtype, device=spec.device)
        buf = self._buffers[k]
        return buf[:spec.shape[0]] if spec.batched else buf

    def _refuse_rebound_tensors(self, entry: _Bucket) -> None:
        """An argument object (a cache) that holds other tensors than at capture: the graph would go
        on reading and writing the old ones. Refused, with the path named."""
        rebound = entry.tensor_ids.rebound()
        if rebound:
            raise SignatureError(
                f"a tensor of an argument object was replaced since bucket [{entry.key}] was captured",
                expected="the tensors the object held at capture", got="; ".join(rebound[:4]) + (
                    f"; ... {len(rebound) - 4} more" if len(rebound) > 4 else ""),
                fix="the graph reads and writes the tensors captured: write into the object's tensors in place "
                    "(keys.copy_(keys.index_select(0, beam)) instead of assigning new ones, as "
                    "reorder_cache does), or compile again")

    def _capture(self, key: BucketKey, req: Request, load: bool = True) -> _Bucket:
        _check_arguments(req, key)
        if self.runtime is None:
            device = self._device(req)
            backend = resolve_backend(self.backend, device)
            if self.inductor == ONCE and backend == "cpu-graph":
                raise _once_on_cpu_graph()
            self.runtime = Runtime(backend, check_host_reads=self.check, device=device,
                                   inductor=resolve_wrapper(self.inductor, device) or False, disk=self._disk,
                                   options=inductor_options(self.inductor) if self.inductor else None,
                                   opaque=self.inductor == ONCE)
        frozen = dict(key.statics) | dict(key.signature)
        leaves = []
        for path in req.paths:
            v = frozen[path]
            if isinstance(v, TensorSpec):
                leaves.append(self._buffer(path, v))
            elif isinstance(v, StateRef):
                leaves.append(self._states[v.ident])
            else:
                leaves.append(v.value)
        entry = _Bucket(key, leaves, req, self._request_states(req))
        if load:
            self._load(entry, req)
        positions = entry.tensor_positions()

        def rebuild(tensors):
            filled = list(leaves)
            for i, t in zip(positions, tensors):
                filled[i] = t
            return req.rebuild(filled)

        entry.captured = capture(self.runtime, self.fn, rebuild, [leaves[i] for i in positions], entry.states,
                                 where=f"bucket [{key}]", roots=_object_roots(req),
                                 names=[req.paths[i] for i in positions])
        objects = _object_roots(req)
        entry.tensor_ids = TensorIds(objects) if objects else None
        self.stats.pool_bytes = self.runtime.pool_bytes()
        self.stats.captures += 1
        self.stats.capture_seconds += entry.captured.seconds
        self.stats.undo_bytes = max(self.stats.undo_bytes, entry.captured.undo_bytes)
        hit = getattr(entry.captured.graph, "disk_hit", None)
        if hit is not None:
            self.stats.disk_hits += hit
            self.stats.disk_misses += not hit
        self._graphs[key] = entry
        self._weights.record()            # where the graphs read the weights (kept from the first capture on)
        return entry

    # -- replay --------------------------------------------------------------------------------
    def _load(self, entry: _Bucket, req: Request):
        """Copy the request's tensors into the static buffers; zero the padded rows."""
        for i, dst in enumerate(entry.leaves):
            if not isinstance(dst, torch.Tensor):
                continue
            src = req.leaves[i]
            if not self.dispatch.batched(req, i):
                if not _same_memory(src, dst):
                    dst.copy_(src)
                continue
            n = src.shape[0]
            if not _same_memory(src, dst[:n]):
                dst[:n].copy_(src)
            if n < dst.shape[0]:
                dst[n:].zero_()

    def _outputs(self, entry: _Bucket, req: Request, tensors):
        tensors = self.dispatch.unpad(entry.key, req, tensors)
        if self.clone_outputs:
            tensors = [t.clone() for t in tensors]
        return entry.captured.outputs(tensors)

    def _verified_replay(self, entry: _Bucket):
        """Run the eager forward, recording what it writes; undo it; replay; compare the replay's
        outputs and the regions the eager run wrote with the eager ones.

        Memory is proportional to what the forward writes (a chunk's rows of the KV pool), not to
        the state (the whole pool). Returns the graph's static outputs, as an unverified replay
        does, so verification never changes whether outputs alias."""
        states = entry.states
        args, kwargs = entry.request.rebuild(entry.leaves)
        with WriteLog() as log:
            eager = [x.clone() for x in pytree.tree_flatten(self.fn(*args, **kwargs))[0]
                     if isinstance(x, torch.Tensor)]
        wrote = log.contents()
        log.rollback()
        outs = entry.captured.graph.replay()
        exact = not (self.runtime.inductor or self.runtime.opaque)
        names = Bindings(roots_of(self.fn, {type(s).__name__: s for s in states} | _object_roots(entry.request))).names()
        pairs = [(f"output {i}", g, e) for i, (g, e) in enumerate(zip(outs, eager))]
        pairs += [(f"{_region_name(r.tensor, names)} ({r.op})", now, e)
                  for r, now, e in zip(log.regions, log.contents(), wrote)]
        for what, g, e in pairs:
            same = torch.equal(g, e) if exact or not g.is_floating_point() else \
                max_rel_err(g, e) <= tolerance(g.dtype)
            if not same:
                err = max_rel_err(g, e) if g.is_floating_point() else "integers differ"
                raise ReplayMismatchError(
                    f"graph replay differs from the eager forward in bucket [{entry.key}] ({what})",
                    expected="bit-identical" if exact else f"max rel err <= {tolerance(g.dtype)}", got=err,
                    fix="a Python value (or a host tensor) that changes between calls was frozen into the graph: "
                        "keep it in a device tensor (positions, lengths, indices) or make it part of the bucket key")
        entry.verified += 1
        self.stats.verified += 1
        return outs

    def _miss(self, req: Request, key: BucketKey, why: str | None, raise_only: bool = False):
        if self.fallback == "eager" and not raise_only:
            self.stats.eager_fallbacks += 1
            args, kwargs = req.rebuild(req.leaves)
            with torch.no_grad():
                return self.fn(*args, **kwargs)
        raise self.dispatch.miss(key, why)


class _Weights:
    """Where the captured function's modules keep their parameters and buffers at capture, checked
    before each call: a graph reads the memory its weights had then, so weights moved since
    (``model.to(...)``, a ``load_state_dict(assign=True)``) are refused, never read stale or freed.
    The modules: the function itself, its owner (a bound method's object) or the modules that
    object holds (an Engine's model), and the modules in its closure. The check compares
    ``data_ptr()`` of each tensor, host-side metadata (no device read): about 0.1 us a tensor on
    the CPU, so about 0.1 ms a call for a 30-layer DiT (``bench/results/design-numbers.md``)."""

    def __init__(self, fn):
        owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
        found = [owner] if isinstance(owner, torch.nn.Module) else \
            [v for v in getattr(owner, "__dict__", {}).values() if isinstance(v, torch.nn.Module)]
        found += [c.cell_contents for c in getattr(fn, "__closure__", None) or ()
                  if isinstance(getattr(c, "cell_contents", None), torch.nn.Module)]
        self.dicts, self.names, seen = [], [], set()
        for m in found:
            for prefix, sub in m.named_modules(remove_duplicate=False):
                if id(sub) in seen:
                    continue
                seen.add(id(sub))
                for d in (sub._parameters, sub._buffers):
                    if not d:                 # most modules hold no tensor of their own: skip their dicts
                        continue
                    self.dicts.append(d)
                    self.names.append([f"{prefix}.{k}" if prefix else k for k in d])
        self.ptrs: tuple | None = None

    def _now(self) -> tuple:
        return tuple(t.data_ptr() if t is not None else 0 for d in self.dicts for t in d.values())   # no device read

    def record(self) -> None:
        if self.ptrs is None:
            self.ptrs = self._now()

    def refuse_moved(self) -> None:
        if self.ptrs is None or self._now() == self.ptrs:
            return
        names = [n for ns in self.names for n in ns]
        now = self._now()
        moved = [n for n, a, b in zip(names, self.ptrs, now) if a != b] if len(now) == len(self.ptrs) else \
            ["the set of parameters and buffers changed"]
        raise WeightsMovedError(
            "the module's weights moved since its graphs were captured (model.to(...), an assigned "
            "load_state_dict, a replaced parameter): the graphs would read the old, maybe freed, memory",
            where=", ".join(moved[:4]) + (f", ... {len(moved) - 4} more" if len(moved) > 4 else ""),
            expected="the weights where they were at capture", got=f"{len(moved)} tensor(s) at another address",
            fix="call graphrt.compile again on the moved model (a new Engine over it), or move the weights "
                "before compiling; to change weights under captured graphs, copy into them in place "
                "(load_state_dict without assign)")


def _object_roots(req: Request) -> dict[str, Any]:
    """The call's argument objects (a cache, a dict's dataclass) by path: what capture must leave as found."""
    return {p: x for p, x in zip(req.paths, req.leaves)
            if not isinstance(x, (torch.Tensor,) + SCALARS)}


def _check_arguments(req: Request, key: BucketKey) -> None:
    """Argument objects the capture cannot judge alone (a transformers cache): each registered
    :class:`~graphrt.capture.state.ArgumentCheck` that applies refuses what a graph cannot replay."""
    checks = argument_checks()
    call = None
    for path, obj in _object_roots(req).items():
        for c in checks:
            if c.applies(obj):
                call = call or dict(zip(req.paths, req.leaves))
                c.check(obj, path, key.batch, call)


def _once_on_cpu_graph() -> BackendUnavailableError:
    return BackendUnavailableError(
        "inductor='once' runs compiled code inside a CUDA graph; the CPU emulation traces the function's ops "
        "instead, so nothing compiled would run", expected="backend 'cuda-graph' (or 'eager')", got="cpu-graph",
        fix="on the CPU use inductor=True (an AOTInductor package per bucket)")


def _region_name(t: torch.Tensor, names: dict[int, str]) -> str:
    base = t._base if t._base is not None else t
    return names.get(id(t)) or names.get(id(base)) or \
        f"a tensor {str(base.dtype).removeprefix('torch.')}{list(base.shape)} the function wrote"


def compile(model_or_fn: Callable, *, buckets: Buckets | None = None, backend: str = "auto",
            inductor: bool | str = False, verify: int = 0, fallback: str = "error", clone_outputs: bool = False,
            states=(), check: bool = True, progress: bool = True, cache_dir=None) -> GraphedModule:
    """Capture ``model_or_fn`` as one graph per bucket and replay it.

    - ``buckets``: a :class:`~graphrt.Buckets` spec; None keys every distinct input signature.
    - ``backend``: ``"cuda-graph"``, ``"cpu-graph"`` (CPU emulation that freezes host values as a
      CUDA graph does), ``"eager"`` (no graph), or ``"auto"`` (by the inputs' device).
    - ``inductor``: compile each bucket's trace with inductor before capture. ``True`` picks the
      fastest wrapper for the device: on the CPU an AOTInductor package per bucket ("aoti": no
      Python between kernels), on CUDA ``torch.compile`` (its kernels captured in graphrt's CUDA
      graph, inductor's own CUDA graphs off). ``"cpp-wrapper"`` and ``"python"`` pick
      ``torch.compile`` with inductor's C++ or Python wrapper (see :mod:`graphrt.capture.aot`).
      ``"max-autotune"``: ``True``'s wrapper with inductor's max-autotune options (what
      ``torch.compile(mode="max-autotune")`` sets, less its CUDA graphs: graphrt's graph captures
      the tuned kernels; :func:`graphrt.capture.aot.inductor_options`). Tuning runs in the compile,
      before the warm-up and the capture; longer first starts, kept by the caches as any compile.
      ``"once"``: no per-bucket trace: ``torch.compile`` of the whole function, once, with
      automatic dynamic shapes (buckets that differ in a size, a KV length, share one compile;
      :mod:`graphrt.replay.once`), warmed per bucket and captured in graphrt's CUDA graph: the
      CUDA default of :class:`~graphrt.pipeline.Engine`. CUDA graphs (or ``backend="eager"``) only.
    - ``cache_dir``: where compiled AOTInductor packages are kept across processes (None:
      ``$GRAPHRT_CACHE_DIR`` or ``~/.cache/graphrt``; False: nowhere). A second process that
      compiles the same buckets loads them instead (``stats.disk_hits``).
    - ``verify``: the first N replays of each bucket (after the call that captured it) also run
      eagerly from the same state and must match (bit for bit without inductor), outputs and
      every region the forward writes; raises :class:`ReplayMismatchError`. It costs memory in
      proportion to what one forward writes, not to the state (the KV pool).
    - ``fallback``: after ``prewarm()`` seals the graphs, a request no bucket serves raises
      :class:`BucketMissError` (``"error"``) or runs eagerly and is counted (``"eager"``).
    - ``clone_outputs``: return clones instead of the static outputs. Static outputs of every
      bucket share one arena: valid until the next replay of any bucket.
    - ``states``: runtime-state objects the function uses without taking them as arguments
      (caches passed as arguments are found automatically; a module's buffers are guarded too).
    - ``check``: refuse to capture a forward with host reads (see :func:`graphrt.check`).
    """
    return GraphedModule(model_or_fn, buckets=buckets, backend=backend, inductor=inductor, verify=verify,
                         fallback=fallback, clone_outputs=clone_outputs, states=states, check=check,
                         progress=progress, cache_dir=cache_dir)
