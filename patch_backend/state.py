"""The active patches: which maps are active, per root model, in this thread or task.

State lives in a ContextVar, so threads and asyncio tasks patching the same compiled model each
see only their own patches. Every ``pb.patch`` builds a new immutable ``PatchState`` (outer
patches first, then inner) and restores the previous one on exit (context.py). Each state
carries a ``RunLog`` of what ran under it, which the never-ran check reads (never_silent.py).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Set, Tuple

from .capture.index import RootIndex
from .patches import Patch
from .runtime.requests import FrontEnd

#: A patched model in a run log: ``id`` of its RootIndex (the state holds the index alive).
RootKey = int


@dataclass(eq=False)
class GraphMarks:
    """One graph occurrence as a RunLog sees it, one per PatchState and occurrence (its fields
    come from the graph's memo of the patched names, ``context.occurrence``). Its runs are
    counted here, so that a graph call costs one memo lookup and one increment."""

    #: Patched models the occurrence belongs to.
    roots: Tuple[RootKey, ...]
    #: Of those, the models whose own ``forward`` this graph returns from (one per forward).
    returns: Tuple[RootKey, ...]
    #: (model, name) of every patched name whose site is in this occurrence.
    applied: FrozenSet[Tuple[RootKey, str]]
    #: Runs not yet folded into the RunLog's totals (``RunLog.settle``).
    calls: int = 0
    #: Every patched name of the state has its site here: a context whose log shows a run of
    #: such marks has nothing to check at exit (context.py).
    complete: bool = False


class RunLog:
    """What ran under one PatchState: the facts the never-ran check needs.

    The totals hold what ``settle`` folded in from the marks, what inner contexts merged in, and
    what a sweep records directly; read them after ``settle()``. A plain class with slots, not
    a dataclass: one is made per ``pb.patch`` block, and a dataclass's default factories cost
    a call per field.
    """

    __slots__ = ("marks", "applied", "graph_calls", "forwards", "eager_calls", "runs", "open_calls")

    def __init__(self) -> None:
        self.marks: List[GraphMarks] = []
        self.applied: Set[Tuple[RootKey, str]] = set()
        self.graph_calls: Dict[RootKey, int] = {}
        self.forwards: Dict[RootKey, int] = {}
        #: Calls of the model itself that ran outside torch.compile (seen by ``_root_called``).
        self.eager_calls: Dict[RootKey, int] = {}
        #: Graph calls of each watched model, counted as they run (not settled), and per watched
        #: model its wrapper call in progress with that count when it started: never_silent.py
        #: checks at the model's next call, or at exit, that a graph of it ran since.
        self.runs: Dict[RootKey, int] = {}
        self.open_calls: Dict[RootKey, int] = {}

    def settle(self) -> "RunLog":
        """Folds the marks' run counters into the totals (idempotent: the counters restart)."""
        for marks in self.marks:
            calls = marks.calls
            if not calls:
                continue
            marks.calls = 0
            self.applied |= marks.applied
            graph_calls = self.graph_calls
            for key in marks.roots:
                graph_calls[key] = graph_calls.get(key, 0) + calls
            forwards = self.forwards
            for key in marks.returns:
                forwards[key] = forwards.get(key, 0) + calls
        return self

    def merge_into(self, outer: "RunLog") -> None:
        """An inner context's runs are runs of the enclosing context too."""
        self.settle()
        outer.applied |= self.applied
        for mine, theirs in (
            (self.graph_calls, outer.graph_calls),
            (self.forwards, outer.forwards),
            (self.eager_calls, outer.eager_calls),
            (self.runs, outer.runs),
        ):
            for key, count in mine.items():
                theirs[key] = theirs.get(key, 0) + count


@dataclass(eq=False, slots=True)
class RootPatches:
    """One patched model's names in a state. Never changed once made; not frozen only because
    one is made per ``pb.patch`` entry, and a frozen dataclass's ``__init__`` costs twice as
    much."""

    index: RootIndex
    by_name: Dict[str, Tuple[Patch, ...]]
    #: False until the names could be checked (a compiled model that has not run yet).
    validated: bool


@dataclass(eq=False, slots=True)
class PatchState:
    """The active patches of one ``pb.patch`` block (or sweep chunk), and what ran under them.
    Never changed once made (``dataclasses.replace`` makes a variant); not frozen only because
    a frozen dataclass's ``__init__`` costs several times more, on every ``pb.patch`` entry."""

    roots: Tuple[RootPatches, ...] = ()
    #: Answers the dispatcher for each graph call under this state (runtime/requests.py):
    #: ``PATCHES`` for pb.patch, a sweep chunk's spec, ``EagerTier``; None runs graphs plain.
    frontend: Optional[FrontEnd] = None
    #: Per-state memo: (capture uid, instance, name-table version) → the selection and graph
    #: marks of that occurrence (``context.occurrence``), and the checks of dynamic shapes.
    memo: Dict[Any, Any] = field(default_factory=dict)
    #: What ran under this state (mutable: the state is shared by the calls it patches).
    log: RunLog = field(default_factory=RunLog)
    #: Validation of maps entered before the model ran (``validate_pending``); None when every
    #: map was checked on entry.
    pending: Optional["PendingValidation"] = None
    #: The models this state and the states it extends patch through a wrapper (a
    #: torch.compile result, a PatchableGraph), each with its ``RootKey``: their calls are
    #: watched (never_silent.py).
    watched: Dict[Any, RootKey] = field(default_factory=dict)
    #: For a state patching one model: that model's occurrence shapes of these patched names
    #: (``context.occurrence``), shared by the contexts that patch them.
    shapes: Optional[Dict[Any, Any]] = None
    #: For a state of one ``pb.patch`` map of a structure its handle has a plan for
    #: (``context.read_known``): (plan, the map's values at entry, what ``_intact`` compares).
    bound: Optional[Tuple[Any, Any, Any]] = None


@dataclass(eq=False)
class PendingValidation:
    """Where ``validate_pending`` stands for one state: the graph occurrence the state ran
    first and how often it ran (a second run means the forward started over)."""

    first_occurrence: Any = None
    first_runs: int = 0
    #: Every name is checked: requests stop asking.
    done: bool = False
    #: Eager-boundary names (id(index), name) learnt after entry whose hooks this state
    #: installed, and the functions removing them at the context's exit (eager_boundaries.py).
    hooked: Set[Tuple[int, str]] = field(default_factory=set)
    unhooks: List[Any] = field(default_factory=list)


_EMPTY = PatchState()
_active: contextvars.ContextVar[PatchState] = contextvars.ContextVar("patch_backend_patches", default=_EMPTY)


def active_state() -> PatchState:
    return _active.get()
