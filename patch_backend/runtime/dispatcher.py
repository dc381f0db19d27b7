"""The per-graph dispatcher that the backends (backend.py) return to Dynamo.

On each call it looks at the active patches: none → the plain variant (Inductor's code, or the
graph itself for ``graphpatch_eager``); some → the variant for their *structure*, built once and
fed the patch values as inputs (``rewrite.py``).
"""

from __future__ import annotations

import threading
import time
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.fx

from ..capture.capture import GraphCapture, forget
from ..context import active_state, note_graph_run
from ..program.dynamic import Layout, Specializations, SymbolicInputs, check_call_shapes, symbolic_layout
from ..program.eager import PatchingInterpreter
from ..capture.naming import Site
from ..program.plan import Selection, select, structure_key
from ..program.prepared import build_prepared, fits, site_key
from .. import config
from ..stats import Stats



class Dispatcher:
    """The callable Dynamo runs for one graph."""

    def __init__(
        self, capture: GraphCapture, compiled: bool, compile_options: Dict[str, Any], example_inputs: Sequence[Any]
    ) -> None:
        self.capture = capture
        self.compiled = compiled
        self.compile_options = compile_options
        self.stats = Stats(graphs=1)
        self.variants: "OrderedDict[Any, Callable]" = OrderedDict()
        self._lock = threading.Lock()
        self._warned_bound = False
        if compiled and not capture.dynamic:
            # Static shapes: compile the plain variant at its first unpatched call, so a graph
            # that only ever runs patched (a sweep's batched graph) never compiles it.
            self.plain = self._compile_plain_on_first_call
        else:
            # Symbolic shapes need Dynamo's tracing context, which exists only right now.
            self.plain = self._compile_plain(example_inputs)
        capture.dispatcher_ref = weakref.ref(self)
        #: Models whose patches built variants here (see ``_owned_by``).
        self._owners: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
        weakref.finalize(self, forget, capture)

    # -- building --------------------------------------------------------------------------
    def _compile_plain(self, example_inputs: Sequence[Any]) -> Callable:
        if not self.compiled:
            return self.capture.gm.forward
        start = time.perf_counter()
        plain = self._compile(self.capture.gm, example_inputs)
        self.stats.compile_seconds += time.perf_counter() - start
        return plain

    def _compile_plain_on_first_call(self, *args: Any) -> Any:
        with self._lock:
            if self.plain == self._compile_plain_on_first_call:
                self.plain = self._compile_plain(args)
        return self.plain(*args)

    def _variant(self, selection: Selection, args: Sequence[Any]) -> Callable:
        if not self.compiled:
            return self._cached(structure_key(selection), lambda: _EagerVariant(self.capture.gm))
        from ..program.insert import build_variant

        if self.capture.dynamic:
            # Compiled with symbolic shapes: one variant serves every length (dynamic.py).
            layout = self.layout
            if layout is not None:

                def build_dynamic():
                    variants = Specializations(layout, self._compile, self._build_variant, self._count_compile)
                    variants.add(selection, args)
                    return variants

                return self._cached(structure_key(selection), build_dynamic)
        build = lambda: build_variant(self.capture, selection, args, self._compile)  # noqa: E731
        return self._cached((structure_key(selection), self._shape_key(args)), build)

    @property
    def layout(self) -> Optional[Layout]:
        """Which inputs Dynamo traced with symbolic sizes (None for a static graph)."""
        if not hasattr(self, "_layout"):
            self._layout = symbolic_layout(self.capture.gm) if self.capture.dynamic else None
        return self._layout

    @property
    def symbolic_inputs(self) -> Optional[SymbolicInputs]:
        if not hasattr(self, "_symbolic_inputs"):
            layout = self.layout
            self._symbolic_inputs = SymbolicInputs(self.capture.gm, layout) if layout is not None else None
        return self._symbolic_inputs

    def _build_variant(self, selection: Selection, args: Sequence[Any], compile_fn: Callable) -> Any:
        from ..program.insert import build_variant

        return build_variant(self.capture, selection, args, compile_fn)

    def _count_compile(self, seconds: float) -> None:
        self.stats.variants_compiled += 1
        self.stats.compile_seconds += seconds

    def _cached(self, key: Any, build: Callable[[], Any]) -> Any:
        variant = self.variants.get(key)
        if variant is not None:
            self.variants.move_to_end(key)
            self.stats.variant_hits += 1
            return variant
        with self._lock:
            variant = self.variants.get(key)
            if variant is not None:
                return variant
            start = time.perf_counter()
            variant = build()
            self.stats.compile_seconds += time.perf_counter() - start
            self.stats.variants_compiled += 1
            self.variants[key] = variant
            if len(self.variants) > config.max_variants:
                self.variants.popitem(last=False)
                self.stats.evictions += 1
                if not self._warned_bound:
                    self._warned_bound = True
                    warnings.warn(
                        f"patch_backend: graph {self.capture.uid} compiled more than {config.max_variants} patched "
                        "variants (one per distinct patch structure); the least recently used are dropped and "
                        "recompiled on reuse. Declare the sites with pb.prepare(model, sites) or raise the bound "
                        "with pb.set_max_variants(n).",
                        stacklevel=3,
                    )
            return variant

    # -- calling ---------------------------------------------------------------------------
    def __call__(self, *args: Any) -> Any:
        instance = self.capture.record_call(args)
        self.stats.calls += 1
        state = active_state()
        if state.sweep is not None:
            return self._sweep_call(state.sweep, instance, args)
        if not state.roots:
            return self.plain(*args)
        selection = select(state, self.capture, instance)
        note_graph_run(state, self.capture, instance)  # for pb.patch's check at exit
        if state.eager:
            return self._eager_call(state, selection, args)
        if not selection:
            return self.plain(*args)
        check_call_shapes(self.symbolic_inputs, self.capture, selection, args, state.memo)
        self._owned_by(entry.index for entry in state.roots)
        self.stats.patched_calls += 1
        if self.compiled:
            declared = self._declared(state, instance)
            if declared and fits(selection, {site_key(site): 0 for site in declared}):
                return self._prepared(declared, args).run(selection, args)
        return self._variant(selection, args).run(selection, args)

    def _eager_call(self, state: Any, selection: Selection, args: Sequence[Any]) -> Any:
        """The eager tier (``context.eager_tier``): the captured graph, patched by the eager
        interpreter, so a one-off reference run compiles nothing."""
        if not selection:
            return self.capture.gm.forward(*args)
        check_call_shapes(self.symbolic_inputs, self.capture, selection, args, state.memo)
        self.stats.patched_calls += 1
        return _EagerVariant(self.capture.gm).run(selection, args)

    def _sweep_call(self, spec: Any, instance: Optional[int], args: Sequence[Any]) -> Any:
        from ..sweep import note_sweep_graph, slot_inputs

        found = spec.index.sites_for(self.capture, instance)
        note_sweep_graph(spec, found)
        sites = found or {}
        here = [sites[name] for name in spec.names if name in sites]
        if not here:
            if not spec.names and self.plain == self._compile_plain_on_first_call:
                # The sweep's name-discovery call: capturing is all it needs, so do not
                # compile a plain variant that the sweep itself will never run.
                return self.capture.gm.forward(*args)
            return self.plain(*args)
        self._owned_by((spec.index,))
        self.stats.patched_calls += 1
        variant = self._prepared(here, args)
        outputs, _ = variant.call(args, slot_inputs(spec, variant, sites))
        return outputs

    def _owned_by(self, indexes) -> None:
        """Ties the patched variants to the models being patched: they are dropped when one of
        them is deleted. Dynamo keeps this dispatcher for as long as the graph's code stays
        cached, which outlives the model; another model reaching this graph rebuilds them."""
        for index in indexes:
            root = index._root()
            if root is not None and root not in self._owners:
                self._owners.add(root)
                weakref.finalize(root, _drop_variants, weakref.ref(self))

    def _declared(self, state, instance) -> List[Site]:
        memo_key = ("declared", self.capture.uid, instance)
        if memo_key not in state.memo:
            declared: List[Site] = []
            for entry in state.roots:
                if entry.index.declared:
                    declared.extend(entry.index.declared_sites(self.capture, instance))
            state.memo[memo_key] = declared
        return state.memo[memo_key]

    def _prepared(self, sites: List[Site], args: Sequence[Any]):
        key = ("prepared", frozenset(site_key(site) for site in sites), self._shape_key(args))
        return self._cached(key, lambda: build_prepared(self.capture, sites, args, self._compile))

    def _shape_key(self, args: Sequence[Any]) -> Any:
        """Concrete input shapes, for graphs whose shapes are symbolic (variants are not)."""
        if not self.capture.dynamic:
            return None
        return tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args if not isinstance(a, torch.nn.Parameter))

    def _compile(self, gm: torch.fx.GraphModule, example: Sequence[Any]) -> Callable:
        if not self.compiled:
            return gm.forward
        from .._torch_compat.inductor import compile_inductor

        return compile_inductor(gm, example, self.compile_options)


def _drop_variants(dispatcher_ref: "weakref.ref[Dispatcher]") -> None:
    dispatcher = dispatcher_ref()
    if dispatcher is not None:
        dispatcher.variants.clear()


class _EagerVariant:
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm

    def run(self, selection: Selection, args: Sequence[Any]) -> Any:
        return PatchingInterpreter(self.gm, selection).run(*args)
