"""The per-graph dispatcher that the backends (backend.py) return to Dynamo.

A thin router: each call asks the active front-end (``PatchState.frontend``: ``pb.patch``,
``pb.sweep``, the eager tier) for a request (runtime/requests.py); none means the plain
program (Inductor's code, or the graph itself for ``graphpatch_eager``). A request is looked up
in the bounded program cache, built on a miss, and run (runtime/tiers.py). The dispatcher knows
no front-end: which program and which extra inputs are the front-end's answer.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Sequence

import torch
import torch.fx

from ..capture.capture import GraphCapture, forget
from .._torch_compat.inductor import compile_inductor
from ..context import active_state
from ..program import ops
from ..program.regions import compile_regional
from ..stats import Stats
from .requests import GraphFacts
from . import worker
from .tiers import COMPILE_LOCK, Tiers

logger = logging.getLogger(__name__)


class Dispatcher:
    """The callable Dynamo runs for one graph."""

    def __init__(
        self, capture: GraphCapture, compiled: bool, compile_options: Dict[str, Any], example_inputs: Sequence[Any]
    ) -> None:
        self.capture = capture
        self.compiled = compiled
        self.compile_options = compile_options
        self.stats = Stats(graphs=1)
        self.graph = GraphFacts(capture, compiled)
        # Holds no reference back to the dispatcher: Dynamo's reset must free it (and so forget
        # its capture) at once, not at the next cyclic garbage collection.
        self.compile = GraphCompiler(compiled, compile_options, self.stats)
        self.tiers = Tiers(self.graph, self.stats, self.compile)
        self._lock = threading.Lock()
        self._plain_lock = threading.Lock()
        if compiled and not capture.dynamic:
            # Static shapes: compile the plain variant at its first unpatched call, so a graph
            # that only ever runs patched (a sweep's batched graph) never compiles it.
            self.plain: Callable = self._compile_plain_on_first_call
        else:
            # Symbolic shapes need Dynamo's tracing context, which exists only right now.
            self.plain = self._compile_symbolic_plain(example_inputs)
        capture.dispatcher_ref = weakref.ref(self)
        #: Models whose patches built programs here (see ``_owned_by``).
        self._owners: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
        #: id(name table) → a weak reference to it, for the tables ``_owned_by`` has seen.
        self._owner_indexes: Dict[int, "weakref.ref[Any]"] = {}
        weakref.finalize(self, forget, capture)

    @property
    def variants(self):
        """The patched programs cached for this graph (runtime/cache.py)."""
        return self.tiers.programs

    # -- calling ---------------------------------------------------------------------------
    def __call__(self, *args: Any) -> Any:
        instance = self.capture.record_call(args)
        self.stats.calls += 1
        state = active_state()
        frontend = state.frontend
        request = None if frontend is None else frontend.request(state, self.graph, instance, args)
        if request is None:
            return self.plain(*args)
        known = self._owner_indexes
        for index in request.owners:  # tied already, mostly: one lookup (``_owned_by``)
            ref = known.get(id(index))
            if ref is None or ref() is not index:
                self._owned_by((index,))
        return self.tiers.run(request, args)

    def _owned_by(self, indexes: Iterable[Any]) -> None:
        """Ties the patched programs to the models being patched: they are dropped when one of
        them is deleted. Dynamo keeps this dispatcher for as long as the graph's code stays
        cached, which outlives the model; another model reaching this graph rebuilds them.

        Every patched call asks, so the common answer (already tied) is one dict lookup: name
        tables by ``id``, each with a weak reference that tells a live table from a reused id."""
        known = self._owner_indexes
        for index in indexes:
            ref = known.get(id(index))
            if ref is not None and ref() is index:
                continue
            root = index._root()
            if root is None:
                continue
            with self._lock:
                if len(known) >= 1024:
                    known.clear()  # ids of tables long gone, mostly: the lookups redo the rest
                known[id(index)] = weakref.ref(index)
                if root in self._owners:
                    continue
                self._owners.add(root)
            weakref.finalize(root, _drop_programs, weakref.ref(self))

    # -- building --------------------------------------------------------------------------
    def _compile_plain(self, example_inputs: Sequence[Any]) -> Callable:
        if not self.compiled:
            return self.capture.gm.forward
        start = time.perf_counter()
        plain = self.compile(self.capture.gm, example_inputs)
        self.stats.compile_seconds += time.perf_counter() - start
        return plain

    def _compile_symbolic_plain(self, example_inputs: Sequence[Any]) -> Callable:
        """The plain program of a graph with symbolic shapes, compiled now, inside Dynamo's
        compile, unless another thread holds the compile lock: that is the compile worker, whose
        next FX trace waits for this Dynamo compile to end (runtime/worker.py), so waiting for
        it here would deadlock. The graph's unpatched calls then run it uncompiled (its patched
        programs still compile, with symbolic sizes, program/dynamic.py)."""
        if not self.compiled:
            return self.capture.gm.forward
        if not COMPILE_LOCK.acquire(blocking=False):
            logger.info("graph %s: symbolic shapes captured while a compile runs; its plain program runs uncompiled",
                        self.capture.uid)
            self.stats.plain_uncompiled_graphs += 1
            return self.capture.gm.forward
        try:
            return self._compile_plain(example_inputs)
        finally:
            COMPILE_LOCK.release()

    def _compile_plain_on_first_call(self, *args: Any) -> Any:
        if self.tiers.plain_in_background(lambda: self._install_plain(args)):
            # compile_policy "background": the captured graph, run eagerly, is the same program
            # (with one intra-op thread fewer, as the eager tier runs beside a compile).
            with worker.foreground(), worker.fewer_threads():
                return self.capture.gm.forward(*args)
        return self._install_plain(args)(*args)

    def _install_plain(self, args: Sequence[Any]) -> Callable:
        """Compiles the plain program once (in the call or on the compile worker) and makes it
        the one unpatched calls run. Its own lock: ``_lock`` must not wait for a compile."""
        with self._plain_lock:
            if self.plain == self._compile_plain_on_first_call:
                self.plain = self._compile_plain(args)
            return self.plain


@dataclass(frozen=True, eq=False)
class GraphCompiler:
    """``compile(gm, example)`` for one graph's plain and patched programs: Inductor with
    torch.compile's ``mode``/``options`` (``graphpatch``), or the graph itself (``graphpatch_eager``).
    Adds each compile's seconds per region to ``stats.compile_seconds_by_region``."""

    compiled: bool
    options: Dict[str, Any]
    stats: Stats

    def __call__(self, gm: torch.fx.GraphModule, example: Sequence[Any]) -> Callable:
        if not self.compiled:
            return gm.forward
        with COMPILE_LOCK:
            program = compile_graph(gm, example, self.options)
            report = getattr(program, "report", None)
            by_region = self.stats.compile_seconds_by_region
            for label, seconds in getattr(report, "seconds_by_region", ()):
                by_region[label] = by_region.get(label, 0.0) + seconds
            return program


def compile_graph(gm: torch.fx.GraphModule, example: Sequence[Any], options: Dict[str, Any]) -> Callable:
    """Inductor, as torch.compile's ``mode``/``options`` ask, region by region where the graph
    repeats a block (program/regions.py; ``config.regional_compile``), on a copy of ``gm``
    (``compile_copy``). A test replaces it to fail."""

    def inductor(region: torch.fx.GraphModule, region_example: Sequence[Any]) -> Callable:
        return compile_inductor(region, region_example, options, cacheable=ops.cache_keys())

    return compile_regional(compile_copy(gm), example, inductor, options=options)


def compile_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with a graph and nodes of its own, for a compiler to change as it likes.

    The compilers edit the graph they are given: AOTAutograd's cache renames every placeholder
    to ``p_0``, ``p_1``… while it hashes the graph (and renames them back after), and
    Inductor's passes rewrite nodes and their metadata. The captured graph is also what naming
    and program building read, in the calling thread, while a background compile of its plain
    program runs on the worker: given the captured graph itself, a name table built meanwhile
    named GPT-2's tied ``lm_head.weight`` ``lm_head.input_1`` (the renamed placeholder was no
    longer the parameter naming knew). The node metadata dicts are copied, not their values;
    Dynamo's markers that AOTAutograd reads (placeholder sources, the module's ``meta`` and
    ``_param_name_to_source``) come along, so the copy compiles exactly as the original."""
    graph = copy.deepcopy(gm.graph)
    for original, copied in zip(gm.graph.nodes, graph.nodes):  # the copy keeps the node order
        if hasattr(original, "_dynamo_source"):
            copied._dynamo_source = original._dynamo_source
    copied_gm = torch.fx.GraphModule(gm, graph)
    copied_gm.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copied_gm._param_name_to_source = gm._param_name_to_source
    return copied_gm


def _drop_programs(dispatcher_ref: "weakref.ref[Dispatcher]") -> None:
    dispatcher = dispatcher_ref()
    if dispatcher is not None:
        dispatcher.tiers.clear()
