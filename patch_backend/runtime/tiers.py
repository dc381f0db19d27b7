"""Execution tiers: the eager form of a program runs while its compiled form is being built.

``config.compile_policy`` says what a call does when its program has no compiled form yet:

- ``"sync"`` (the default): compile it in the call (the first call of each structure pays);
- ``"background"``: run the request's eager form now (the eager interpreter with the same
  patches, so the result is the same) and compile in a worker thread; later calls run the
  compiled program once it is in the cache. torch 2.13's AOTAutograd traces with ``make_fx``,
  whose patching of ``nn.Module.__call__`` and tracing flag are process-wide: a compiled call
  in another thread during that trace raises in Dynamo, before any of our code runs, so the
  caller must not call compiled code while a compile runs (``wait_for_compiles``). That is
  why it is not the default;
- ``"never"``: always the eager form.

Every compile of a patched program, in the call or in the worker, holds ``COMPILE_LOCK``:
Inductor is not known to be thread-safe, and one worker makes background compiles queue up
rather than compete for the same cores the eager calls need. A background compile that raises
is not lost: the dispatcher warns once with the graph's uid and runs that program's calls on
the eager tier from then on.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import warnings
from typing import Any, Callable, Dict, Hashable, Optional, Sequence, Set

import torch

from .. import config
from ..program.dynamic import ShapeGuard, SymbolicCompile
from ..stats import Stats
from .cache import ProgramCache
from .requests import CompileFn, GraphFacts, Request

#: Held by every compile of a patched program (see the module docstring).
COMPILE_LOCK = threading.RLock()

_executor_lock = threading.Lock()
_executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
#: Background compiles submitted and not finished (``wait_for_compiles``).
_in_flight: Set[concurrent.futures.Future] = set()


def _submit(job: Callable[[], None]) -> concurrent.futures.Future:
    global _executor
    with _executor_lock:
        if _executor is None:
            # One worker: background compiles run one at a time, in the order they were asked.
            _executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="patch_backend-compile")
        future = _executor.submit(job)
        _in_flight.add(future)
    future.add_done_callback(_finished)
    return future


def _finished(future: concurrent.futures.Future) -> None:
    with _executor_lock:
        _in_flight.discard(future)


def wait_for_compiles(timeout: Optional[float] = None) -> bool:
    """Waits until no background compile is in flight; returns False if ``timeout`` seconds
    passed first. Tests and benchmarks call it to know which tier the next call runs on."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _executor_lock:
            pending = list(_in_flight)
        if not pending:
            return True
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        _, not_done = concurrent.futures.wait(pending, timeout=remaining)
        if not_done:
            return False


class Tiers:
    """Finds, builds and runs the programs of one dispatcher's requests."""

    def __init__(self, graph: GraphFacts, stats: Stats, compile_fn: CompileFn) -> None:
        self.graph = graph
        self.stats = stats
        self.compile_fn = compile_fn
        #: Programs built for requests: compiled programs, or for an uncompiled backend
        #: (graphpatch_eager) the eager forms, which are its programs.
        self.programs = ProgramCache(stats, graph.capture.uid)
        self._lock = threading.Lock()
        self._pending: Set[Hashable] = set()
        self._failed: Dict[Hashable, str] = {}
        self._warned_failure = False

    # -- the path of every patched call ------------------------------------------------------
    def run(self, request: Request, args: Sequence[Any]) -> Any:
        stats = self.stats
        if request.patched:
            stats.patched_calls += 1
        if not request.compile:
            if request.patched:
                stats.eager_calls += 1
            return request.run(request.interpret(args), args)
        if self.graph.capture.dynamic:
            key, guarded = self._key(request, args)
        else:
            key, guarded = request.key, False
        program = self.programs.get(key, args if guarded else None)
        if program is None:
            return self._miss(request, key, guarded, args)
        if self.graph.compiled:
            stats.compiled_calls += 1
        else:
            stats.eager_calls += 1
        return request.run(program, args)

    def _key(self, request: Request, args: Sequence[Any]):
        """(cache key, whether the entry is a Guarded set of symbolic compiles)."""
        graph = self.graph
        if not graph.capture.dynamic:
            return request.key, False
        if request.symbolic and (not graph.compiled or graph.layout is not None):
            return request.key, graph.compiled
        return (request.key, graph.shape_key(args)), False

    # -- misses -------------------------------------------------------------------------------
    def _miss(self, request: Request, key: Hashable, guarded: bool, args: Sequence[Any]) -> Any:
        if not self.graph.compiled:
            # graphpatch_eager: the eager form is the program, built once and counted like one.
            start = time.perf_counter()
            built = request.interpret(args)
            program = self.programs.put(key, built)
            if program is built:  # not a duplicate of another thread's
                self._account(time.perf_counter() - start)
            self.stats.eager_calls += 1
            return request.run(program, args)
        policy = config.compile_policy
        if policy == "sync" and key not in self._failed:
            program = self._build(request, key, guarded, args)
            self.stats.compiled_calls += 1
            return request.run(program, args)
        if policy == "background" and key not in self._failed:
            self._start_background(request, key, guarded, args)
        return self._run_eager(request, key, args)

    def _run_eager(self, request: Request, key: Hashable, args: Sequence[Any]) -> Any:
        """The eager form: while the compile is pending, after it failed, or under "never"."""
        self.stats.eager_calls += 1
        return request.run(request.interpret(args), args)

    def _build(self, request: Request, key: Hashable, guarded: bool, args: Sequence[Any]) -> Any:
        """Compiles the request's program (in the call, or in the worker) and caches it."""
        with COMPILE_LOCK:
            program = self.programs.peek(key, args)
            if program is not None:
                return program  # another thread built it while this one waited for the lock
            start = time.perf_counter()
            if guarded:
                layout = self.graph.layout
                if layout is None:
                    # _key guards only compiled graphs with a layout (symbolic capture).
                    raise RuntimeError(
                        f"patch_backend internal error: graph {self.graph.capture.uid} has no symbolic "
                        "layout, so its programs cannot be compiled with shape guards"
                    )
                symbolic = SymbolicCompile(layout, self.compile_fn)
                program = request.build(symbolic, args)
                self.programs.put_guarded(key, symbolic.guard or ShapeGuard(None), program)
            else:
                program = self.programs.put(key, request.build(self.compile_fn, args))
            self._account(time.perf_counter() - start)
            return program

    def _account(self, seconds: float) -> None:
        self.stats.variants_compiled += 1
        self.stats.compile_seconds += seconds

    def _start_background(self, request: Request, key: Hashable, guarded: bool, args: Sequence[Any]) -> None:
        with self._lock:
            if key in self._pending:
                return
            self._pending.add(key)
        grad = torch.is_grad_enabled()

        def compile_in_worker() -> None:
            try:
                # The program is compiled as the call that asked for it would have compiled it.
                with torch.set_grad_enabled(grad):
                    self._build(request, key, guarded, args)
            except Exception as error:  # noqa: BLE001 - reported, and the program runs eagerly
                self._fail(key, error)
            finally:
                with self._lock:
                    self._pending.discard(key)

        _submit(compile_in_worker)

    def _fail(self, key: Hashable, error: BaseException) -> None:
        """A background compile raised: warn once per graph, and run the program eagerly."""
        self.stats.compile_failures += 1
        with self._lock:
            self._failed[key] = f"{type(error).__name__}: {error}"
            warn = not self._warned_failure
            self._warned_failure = True
        if warn:
            warnings.warn(
                f"patch_backend: compiling a patched program of graph {self.graph.capture.uid} in the background "
                f"failed ({type(error).__name__}: {error}); its calls run on the eager interpreter instead, "
                "with the same results but without Inductor's speed. Set pb.config.compile_policy = 'sync' "
                "to see the error where the program is first called (docs/errors.md).",
                RuntimeWarning,
                stacklevel=2,
            )

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def clear(self) -> None:
        self.programs.clear()
