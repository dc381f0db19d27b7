"""What a front-end asks the dispatcher to run for one graph call.

Each front-end (``pb.patch`` and ``pb.prepare``'s declared sites in context.py/prepare.py,
``pb.sweep`` in sweep.py, ``context.eager_tier``) answers one question for a graph capture and
the instance it runs for: which program, and which extra inputs. The answer is a ``Request``;
the dispatcher (dispatcher.py) only looks its key up, builds on a miss, runs it, and knows
nothing about where it came from. That keeps the core free of sweep or prepare code, and a new
front-end is a new producer of requests rather than another branch in the dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Protocol, Sequence, Tuple

import torch
import torch.fx

from ..capture.capture import GraphCapture
from ..program.dynamic import Layout, SymbolicInputs, symbolic_layout
from ..program.eager import Interpreted
from ..program.spec import Lowerings
from .cache import BoundedMemo

#: ``compile_fn(gm, example_inputs) -> callable``: Inductor, or a graph's own forward.
CompileFn = Callable[[torch.fx.GraphModule, Sequence[Any]], Callable]
#: A built program: whatever object the request's ``run`` knows how to call.
Program = Any


@dataclass(eq=False, slots=True)
class Request:
    """One graph call's program and how to feed it. Made for each patched call and never
    changed (``dataclasses.replace`` makes a variant); not frozen only because a frozen
    dataclass's ``__init__`` costs twice as much, and this is on every patched call's path.

    ``key`` names the program in the dispatcher's cache: patch *structure*, never values, so
    a new value reuses the program. ``build(compile_fn, args)`` makes the program on a miss
    (with Inductor as ``compile_fn``); ``interpret(args)`` makes the same program's eager form,
    which must cost no compile: it runs while ``build`` compiles in the background, under
    ``compile_policy="never"``, and is *the* program of a ``graphpatch_eager`` graph. Both
    forms are called the same way: ``run(program, args)`` feeds the program this call's runtime
    inputs (patch values, slot tensors), delivers its side outputs (probes, records) and
    returns the graph's outputs.
    """

    key: Hashable
    build: Callable[[CompileFn, Sequence[Any]], Program]
    interpret: Callable[[Sequence[Any]], Program]
    run: Callable[[Program, Sequence[Any]], Any]
    #: RootIndexes of the patched models: the dispatcher drops their programs when the last of
    #: them is deleted (a compiled frame outlives the model it was compiled for).
    owners: Tuple[Any, ...] = ()
    #: The program depends on the patch structure only, not on the input sizes: on a graph with
    #: symbolic shapes it is compiled once with symbolic sizes (guarded, program.dynamic), and
    #: its eager form serves every size. Otherwise a dynamic graph's key includes the sizes.
    symbolic: bool = False
    #: False: run the eager form only, caching and compiling nothing (``context.eager_tier``).
    compile: bool = True
    #: Counted in ``Stats.patched_calls`` (a sweep's name-discovery call is not).
    patched: bool = True


class FrontEnd(Protocol):
    """The active context's answer to the dispatcher (``PatchState.frontend``)."""

    def request(self, state: Any, graph: "GraphFacts", instance: Any, args: Sequence[Any]) -> Optional[Request]:
        """The request for this call, or None to run the graph unpatched."""
        ...


class GraphFacts:
    """What front-ends may ask about the graph a call runs: its capture, whether the backend
    compiles, and its symbolic sizes (computed once per graph, not per call); and the memos a
    front-end keeps per patch *structure* on this graph, so that a new patch context of a
    structure seen before derives nothing again (only its values are new)."""

    __slots__ = ("capture", "compiled", "_layout", "_symbolic_inputs", "checked", "lowerings", "occurrences",
                 "_interpreted")

    #: Bound on ``checked``: emptied when it fills (a check is cheap to redo).
    MAX_CHECKED = 4096

    def __init__(self, capture: GraphCapture, compiled: bool) -> None:
        self.capture = capture
        self.compiled = compiled
        self._layout: Any = ...
        self._symbolic_inputs: Any = ...
        #: Patch signatures a front-end has already checked against this graph's shapes (a
        #: patch loop checks the first map, not each new map of the same shapes), each with
        #: what its signature refers to by ``id`` (held, so that the id stays its own).
        self.checked = BoundedMemo(self.MAX_CHECKED)
        #: Program specs by selection structure (program/spec.py).
        self.lowerings = Lowerings()
        #: pb.patch's sites and run marks per (instance, name tables, patched names).
        self.occurrences = BoundedMemo(256)
        self._interpreted: Optional[Interpreted] = None

    def interpreted(self) -> Interpreted:
        """The eager form of this graph's selections, one per graph (it keeps a plan per patch
        structure). Two threads may both make it at first: either serves."""
        found = self._interpreted
        if found is None:
            found = self._interpreted = Interpreted(self.capture.gm)
        return found

    def forget_interpreted(self) -> None:
        """Drops the eager form with the programs (the patched model was deleted)."""
        self._interpreted = None

    def remember_checked(self, signature: Hashable, holds: Any = None) -> None:
        self.checked.put(signature, holds if holds is not None else True)

    @property
    def layout(self) -> Optional[Layout]:
        """Which inputs Dynamo traced with symbolic sizes (None for a static graph)."""
        if self._layout is ...:
            self._layout = symbolic_layout(self.capture.gm) if self.capture.dynamic else None
        return self._layout

    @property
    def symbolic_inputs(self) -> Optional[SymbolicInputs]:
        """Reads a call's sizes off its arguments (None for a static graph)."""
        if self._symbolic_inputs is ...:
            layout = self.layout
            self._symbolic_inputs = SymbolicInputs(self.capture.gm, layout) if layout is not None else None
        return self._symbolic_inputs

    def shape_key(self, args: Sequence[Any]) -> Any:
        """This call's concrete input sizes on a dynamic graph (None on a static one)."""
        if not self.capture.dynamic:
            return None
        return tuple(
            tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args if not isinstance(a, torch.nn.Parameter)
        )


def uncompiled(graph: GraphFacts, patched: bool = False) -> Request:
    """The captured graph run as it is, compiling nothing (not even its plain variant)."""
    forward = graph.capture.gm.forward
    return Request(
        key=None,
        build=_never_built,
        interpret=lambda args: forward,
        run=_call_plain,
        compile=False,
        patched=patched,
    )


def _never_built(compile_fn: CompileFn, args: Sequence[Any]) -> Program:
    raise AssertionError("an uncompiled request is never built")


def _call_plain(program: Callable, args: Sequence[Any]) -> Any:
    return program(*args)
