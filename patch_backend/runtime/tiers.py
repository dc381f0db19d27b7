"""Execution tiers: the eager form of a program runs while its compiled form is being built.

``config.compile_policy`` says what a call does when its program has no compiled form yet:

- ``"background"`` (the default): run the request's eager form now (the eager interpreter with
  the same patches, so the result is the same) and compile on the compile worker
  (runtime/worker.py); later calls run the compiled program once it is in the cache. A graph's
  first unpatched call likewise runs the captured graph while its plain program compiles.
  The caller may keep calling compiled code meanwhile: the worker makes that safe (torch's FX
  tracing state is process-wide; see worker.py and ``_torch_compat/threads.py``);
- ``"sync"``: compile it in the call (the first call of each structure pays);
- ``"never"``: always the eager form for patched calls.

Every compile of a patched program, in the call or in the worker, holds ``COMPILE_LOCK``:
Inductor is not known to be thread-safe. A background compile that raises is not lost: the
dispatcher warns once with the graph's uid and runs that program's calls on the eager tier
from then on.
"""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any, Callable, Dict, Hashable, Optional, Sequence, Set

import torch

from .. import config
from ..capture.index import index_for
from ..program.dynamic import ShapeGuard, SymbolicCompile
from ..stats import Stats
from . import worker
from .cache import ProgramCache
from .requests import CompileFn, GraphFacts, Request

#: Held by every compile of a patched program (see the module docstring).
COMPILE_LOCK = threading.RLock()

#: The key of a graph's plain program among its pending and failed compiles.
PLAIN = ("plain program",)


def wait_for_compiles(timeout: Optional[float] = None) -> bool:
    """Waits until no background compile is in flight; returns False if ``timeout`` seconds
    passed first. Tests and benchmarks call it to know which tier the next call runs on."""
    return worker.wait_for_compiles(timeout)


def policy() -> str:
    """``config.compile_policy``, with "background" read as "sync" where this torch cannot
    compile in a worker thread safely (warned once, ``_torch_compat/threads.py``)."""
    chosen = config.compile_policy
    if chosen == "background" and not worker.supported():
        return "sync"
    return chosen


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
        graph = self.graph
        if graph.capture.dynamic:
            key, guarded = self._key(request, args)
            program = self.programs.get(key, args if guarded else None)
        else:
            key, guarded = request.key, False
            program = self.programs.get(key)
        if program is None:
            return self._miss(request, key, guarded, args)
        if graph.compiled:
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
        chosen = policy()
        if chosen == "sync" and key not in self._failed:
            program = self._build(request, key, guarded, args)
            self.stats.compiled_calls += 1
            return request.run(program, args)
        if chosen == "background" and key not in self._failed:
            self._start_background(request, key, guarded, args)
        return self._run_eager(request, key, args)

    def _run_eager(self, request: Request, key: Hashable, args: Sequence[Any]) -> Any:
        """The eager form: while the compile is pending, after it failed, or under "never"."""
        self.stats.eager_calls += 1
        with worker.foreground(), worker.fewer_threads():
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
        self._in_background(key, lambda: self._build(request, key, guarded, args), "a patched program")

    def _in_background(self, key: Hashable, build: Callable[[], Any], what: str) -> None:
        """Submits ``build`` to the compile worker unless ``key`` is pending or failed."""
        with self._lock:
            if key in self._pending or key in self._failed:
                return
            self._pending.add(key)
        grad = torch.is_grad_enabled()

        def compile_in_worker() -> None:
            try:
                # The program is compiled as the call that asked for it would have compiled it.
                with torch.set_grad_enabled(grad):
                    build()
            except Exception as error:  # noqa: BLE001 - reported, and the program runs eagerly
                self._fail(key, error, what)
            finally:
                with self._lock:
                    self._pending.discard(key)

        worker.submit(compile_in_worker)

    # -- the plain program ------------------------------------------------------------------
    def plain_in_background(self, build: Callable[[], Any]) -> bool:
        """A graph's unpatched call before its plain program exists. Under "background" it
        submits ``build`` (compile and install the plain program) once and says True: the
        caller runs the captured graph eagerly (``graphpatch_eager``'s plain program). Otherwise
        False: the caller compiles in the call, as before."""
        if policy() != "background":
            return False

        def build_then_name() -> None:
            build()
            self._name_in_background()

        self._in_background(PLAIN, build_then_name, "the plain program")
        self.stats.plain_eager_calls += 1
        return True

    def _name_in_background(self) -> None:
        """Builds the node-name table of the graph's frame module (the model, for a model's
        own forward) on the worker, after its plain compile: else the first ``pb.patch`` of
        the model builds it in the call (a quarter of a second at 12 GPT-2 layers, most of
        that first call beyond its forward). The table refreshes itself when a later capture
        changes it, so this only saves work; it never decides a name."""
        root = self.graph.capture.frame.self_module
        if root is None:
            return
        try:
            index_for(root)
        except Exception:  # noqa: BLE001 - a warm-up: the call that needs the table reports errors
            pass

    def _fail(self, key: Hashable, error: BaseException, what: str = "a patched program") -> None:
        """A background compile raised: warn once per graph, and run the program eagerly."""
        self.stats.compile_failures += 1
        if worker.exiting():
            return  # the interpreter is shutting down under the compile: nothing to report
        with self._lock:
            self._failed[key] = f"{type(error).__name__}: {error}"
            warn = not self._warned_failure
            self._warned_failure = True
        if warn:
            warnings.warn(
                f"patch_backend: compiling {what} of graph {self.graph.capture.uid} in the background "
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
        self.graph.forget_interpreted()
