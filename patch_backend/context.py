"""``pb.patch``: the patch context and its front-end.

``patch()`` checks a map on entry, makes the new ``PatchState`` (state.py: outer patches first,
then inner) active for its block and restores the previous one on exit, exception or not; at
a normal exit it runs the never-ran check (never_silent.py). While the state is active, the
dispatcher asks its front-end, ``Patches``, which program each graph call runs: the sites of the
active maps in that graph occurrence, lowered to a program spec whose values are runtime inputs.

What a front-end derives from a patch *structure* (the sites of the patched names, the run
marks, the spec, the shape check) is kept per graph (``GraphFacts``), so that a loop of new
contexts of one structure, with new values, derives it once: only the values are read again.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import functools
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Hashable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from .aliases import resolve_aliases
from .capture.capture import registry_version
from .capture.index import RootIndex, index_for
from .eager_boundaries import hook_learnt_boundaries, install_boundary_hooks
from .never_silent import (
    PatchNotAppliedError,
    Watch,
    close_wrapper_calls,
    raise_if_unapplied,
    unapplied_message,
    watch_eager_calls,
)
from .patches import AddPatch, CustomPatch, Patch, ProbePatch, RecordPatch, ReplacePatch, ZeroPatch
from .prepare import prepared_request
from .program.dynamic import check_call_shapes
from .program.insert import build_variant
from .program.plan import Selection, SitePatches
from .program.spec import UNWALKED, ProgramSpec, RuntimeValues, Walked, walk, walk_slice
from .roots import resolve_root
from .runtime.requests import FrontEnd, GraphFacts, Request, uncompiled
from .state import GraphMarks, PatchState, PendingValidation, RootKey, RootPatches, RunLog, _active, active_state
from .validation import (
    check_name_syntax, entered_before, map_structure, patches_structure, validate_entered, validate_names,
)

__all__ = [
    # Re-exported: the never-ran check and the state types are part of what front-ends
    # (sweep.py) build on.
    "PatchNotAppliedError",
    "PatchState",
    "PendingValidation",
    "RunLog",
    "active_state",
    "eager_tier",
    "normalize_map",
    "patch",
    "raise_if_unapplied",
    "unapplied_message",
    "validate_names",
]

PatchMap = Mapping[Any, Any]


def normalize_map(patch_map: PatchMap) -> Dict[str, Tuple[Patch, ...]]:
    """Checks the map's shape (not its names): raises ValueError/KeyError before anything runs."""
    return read_map(patch_map)[0]


def read_map(patch_map: PatchMap) -> Tuple[Dict[str, Tuple[Patch, ...]], Optional[Hashable]]:
    """``normalize_map``, and the normalized map's ``validation.map_structure``, in one pass:
    every pb.patch entry reads its map, and a structure seen before skips the name checks."""
    # A dict first: abc's isinstance is a slower test.
    if type(patch_map) is not dict and not isinstance(patch_map, collections.abc.Mapping):
        raise ValueError(
            f"patch map must be a dict of node name -> Patch or list of Patches, got {type(patch_map).__name__}"
        )
    normalized: Dict[str, Tuple[Patch, ...]] = {}
    parts: List[Any] = []
    structured = True  # every name's patches have a structure so far
    merged = False  # two keys named one node (a str and a NodePath)
    for key, value in patch_map.items():
        if type(key) is not str and not isinstance(key, str):
            if hasattr(key, "_name"):
                key = str(key)
            else:
                raise ValueError(f"patch map keys must be node names (str), got {key!r} of type {type(key).__name__}")
        check_name_syntax(key)
        if isinstance(value, Patch):
            patches: Tuple[Patch, ...] = (value,)
        else:
            patches = tuple(value) if isinstance(value, (list, tuple)) else (value,)
            for patch in patches:
                if not isinstance(patch, Patch):
                    raise ValueError(
                        f"patch map value for {key!r} must be a Patch or a list of Patches, got {type(patch).__name__}"
                    )
        if key in normalized:
            normalized[key] += patches
            merged = True
        else:
            normalized[key] = patches
            if structured:
                kinds = patches_structure(patches)
                if kinds is None:
                    structured = False
                else:
                    parts.append((key, kinds))
    if not structured:
        return normalized, None
    return normalized, map_structure(normalized) if merged else tuple(parts)


def _check_reuse(roots: Sequence["RootPatches"]) -> None:
    """A patch object may stand in one place at a time, across nodes and across patched models:
    its state (``ProbePatch.activation``, a RecordPatch's list) would mix two places."""
    if len(roots) == 1 and len(roots[0].by_name) == 1:
        for patches in roots[0].by_name.values():
            if len(patches) == 1:
                return  # one patch: nothing to compare
    ids = [id(patch) for entry in roots for patches in entry.by_name.values() for patch in patches]
    if len(set(ids)) == len(ids):
        return  # the common case, in one pass: no object twice
    placed: Dict[int, Tuple[int, str]] = {}
    for position, entry in enumerate(roots):
        for name, patches in entry.by_name.items():
            for patch in patches:
                other = placed.setdefault(id(patch), (position, name))
                if other != (position, name):
                    where = repr(other[1]) if other[0] == position else f"{other[1]!r} of another patched model"
                    raise ValueError(
                        f"the same {type(patch).__name__} object is used at {where} and at {name!r}; "
                        "a patch object may stand in one place at a time (create one per node)"
                    )


#: ``read_known``'s answer: (key, by_name, values, checks). ``key`` is the map's whole structure
#: (names, and per patch its type, clone flag, slice form without the numbers, and its value's
#: shape, dtype, device and grad flag, or number type), ``by_name`` the normalized map,
#: ``values`` its runtime values in map order (the slot order ``spec.walk`` gives a selection of
#: these names in this order), ``checks`` what ``_intact`` compares at each call. A tuple: one
#: is made per ``pb.patch`` entry.
KnownMap = Tuple[Hashable, Dict[str, Tuple[Patch, ...]], RuntimeValues, Tuple[Any, ...]]


_SEQUENCES = (list, tuple)
_NOT_READ = object()  # a patch attribute ``_intact`` does not compare


def read_known(patch_map: PatchMap) -> Optional[KnownMap]:
    """The common map (a dict of str names to built-in patches, or lists of them) read in one
    pass: its structure key and values. None for anything else (NodePath keys, custom patches,
    list slices, index lists, numbers too large for float64, a malformed map): those maps take
    ``read_map`` and the full checks at every entry.

    Everything the entry checks derive from the map (``validation.map_structure``) and
    everything ``spec.walk`` reads of the patches is in the key, so a key seen before on a
    model's current name table passed every entry check, and its per-structure memos
    (``_Plan``) hold for it."""
    if type(patch_map) is not dict:
        return None
    if len(patch_map) == 1:  # the common map: one name, one patch without a slice
        ((name, patch),) = patch_map.items()
        kind = type(patch)
        if (kind is AddPatch or kind is ReplacePatch) and patch.slice is None and type(name) is str:
            number = patch.value
            if type(number) is _Tensor:
                clone = patch.requires_clone
                shape = (number.shape, number.dtype, number.device, number.requires_grad)
                return (
                    ((name, ((kind, clone, None, shape),)),),
                    {name: (patch,)},
                    RuntimeValues((), (), (number,)),
                    ((patch, clone, None, number, shape),),
                )
    by_name: Dict[str, Tuple[Patch, ...]] = {}
    parts: List[Any] = []
    ints: List[int] = []
    scalars: List[float] = []
    tensors: List[torch.Tensor] = []
    checks: List[Any] = []
    for name, value in patch_map.items():
        if type(name) is not str:
            return None
        patches = tuple(value) if type(value) in _SEQUENCES else (value,)
        kinds: List[Any] = []
        for patch in patches:
            kind = type(patch)
            if kind is AddPatch or kind is ReplacePatch or kind is ZeroPatch:
                tensor_slice = patch.slice
                if tensor_slice is None:
                    form: Any = None
                elif type(tensor_slice) is list:
                    return None  # its numbers could change under the context: read at each call
                else:
                    form = walk_slice(tensor_slice, ints)
                    if form is UNWALKED:
                        return None
                clone = patch.requires_clone
                if kind is ZeroPatch:
                    kinds.append((kind, clone, form, None))
                    checks.append((patch, clone, tensor_slice, _NOT_READ, None))
                    continue
                number = patch.value
                if isinstance(number, _Tensor):
                    meta: Any = (number.shape, number.dtype, number.device, number.requires_grad)
                    tensors.append(number)
                elif type(number) in _SCALARS and not (type(number) is int and abs(number) > 2**53):
                    meta = type(number)
                    scalars.append(float(number))
                else:
                    return None
                kinds.append((kind, clone, form, meta))
                checks.append((patch, clone, tensor_slice, number, meta))
            elif kind is ProbePatch or kind is RecordPatch:
                clone = patch.requires_clone
                kinds.append((kind, clone))
                checks.append((patch, clone, _NOT_READ, _NOT_READ, None))
            else:
                return None
        by_name[name] = patches
        parts.append((name, tuple(kinds)))
    return tuple(parts), by_name, RuntimeValues(tuple(ints), tuple(scalars), tuple(tensors)), tuple(checks)


_Tensor = torch.Tensor


def _intact(checks: Tuple[Any, ...]) -> bool:
    """Whether the patches of a ``read_known`` map still hold what it read at entry: a patch's
    attributes, or its value tensor's shape, dtype, device or grad flag, may change inside the
    context, and every call must run what the patches hold then (a changed map takes the full
    per-call read, ``spec.walk``)."""
    for patch, clone, tensor_slice, number, meta in checks:
        if patch.requires_clone is not clone or (tensor_slice is not _NOT_READ and patch.slice is not tensor_slice):
            return False
        if number is not _NOT_READ:
            if patch.value is not number:
                return False
            # A tuple compares its items by identity first: no tensor is compared here.
            if meta.__class__ is tuple and (number.shape, number.dtype, number.device, number.requires_grad) != meta:
                return False
    return True


class _Plan:
    """What ``pb.patch`` derives once per handle and map structure (``read_known``'s key): the
    name-table version its entry checks passed on, the occurrence shapes of its names, and per
    graph occurrence whose sites are the whole map in map order, the program spec and walk key
    of its selection (``_Known``). A context of a known structure finds all of it in one
    lookup and reads only its values; a new name-table version checks the map again."""

    __slots__ = ("version", "shapes", "programs", "watched")

    def __init__(self, version: int, shapes: Dict[Any, "OccurrenceShape"]) -> None:
        self.version = version
        self.shapes = shapes
        #: ``PatchState.watched`` of its contexts when only their model is watched (read-only;
        #: it holds the model, which the handle's wrapper holds anyway).
        self.watched: Optional[Dict[Any, int]] = None
        #: (capture uid, instance, name-table version) → _Known. Bounded, emptied when full.
        self.programs: Dict[Any, "_Known"] = {}


class _Known:
    """A plan's program on one graph occurrence: the spec its selection lowers to, the
    selection's ``spec.walk`` key, the slice numbers its shape check passed with, and what
    ``occurrence`` would derive there (sites, run marks, owners)."""

    __slots__ = ("spec", "walked", "ints", "sites", "roots", "returns", "applied", "owners")

    def __init__(
        self,
        spec: ProgramSpec,
        walked: Hashable,
        ints: Tuple[int, ...],
        sites: Tuple[Any, ...],
        marks: Tuple[Any, Any, Any],
        owners: Tuple[RootIndex, ...],
    ) -> None:
        self.spec = spec
        self.walked = walked
        self.ints = ints
        #: The selection's sites, in map order. Held: ``walked`` names them by ``id``.
        self.sites = sites
        #: What ``occurrence`` gives a state's ``GraphMarks`` here, and the programs' owners.
        self.roots, self.returns, self.applied = marks
        self.owners = owners


def patch(model: Any, patch_map: PatchMap) -> "PatchContext":
    """Activates ``patch_map`` on ``model`` for the body of the ``with`` block.

    Everything is checked on entry; for a compiled model that has not run yet, names are checked
    at its first call, still before any computation. On a normal exit, a name of this map whose
    node never ran, although the model did, raises ``PatchNotAppliedError`` (or ``KeyError``
    for a name no graph of the model holds); an exception from the body propagates unchanged.
    The previous patches are restored either way, and contexts nest (inner maps add to outer).

    Args:
        model: the module, its ``torch.compile(..., backend="graphpatch")`` result or a
            ``PatchableGraph``; names belong to the module.
        patch_map: ``{node name: Patch or [Patch, ...]}``. Names are flat names
            (``pb.nodes(model)``), ``NodePath`` objects, or TransformerLens aliases.

    Raises (each before the model computes; docs/errors.md):
        KeyError: an unknown or malformed name (rows 1, 4, 19, 20).
        ValueError: a map, key or value of the wrong type; a patch object used in two places;
            a value that does not broadcast or whose dtype the node cannot hold (rows 2, 3, 5,
            6, 7, 9, 10, 11, 14).
        IndexError: a slice out of range for the node's shape (row 8).
        PatchNotAppliedError: at exit, a patched node that never ran although the model did, or
            a model called outside its compiled graphs (rows 15, 16).

    Example::

        compiled = torch.compile(model, backend="graphpatch")
        with pb.patch(compiled, {"transformer.h_3.mlp.act.output": pb.ZeroPatch(slice=(0, 5))}):
            logits = compiled(input_ids)
    """
    return PatchContext(model, patch_map)


class PatchContext:
    """``pb.patch``'s context manager. A class, not a generator: in a loop of small patched
    forwards the host work of entering and leaving is a visible part of each call, and
    ``contextlib``'s generator machinery was a fifth of it. Single use, like that one."""

    __slots__ = ("_model", "_map", "_state", "_previous", "_token", "_watch", "_unhook", "_index", "_names")

    def __init__(self, model: Any, patch_map: PatchMap) -> None:
        self._model = model
        self._map = patch_map

    def __enter__(self) -> None:
        model = self._model
        handle = _HANDLES.get(id(model))  # ``_handle_of``'s common case, inline
        if handle is None or handle.ref() is not model or handle.index._root() is None:  # type: ignore[misc]
            handle = _handle_of(model)
        index = handle.index
        if index._version != registry_version():  # ``refresh``'s common case, inline
            index.refresh()
        previous = _active.get()
        read = read_known(self._map)
        if read is not None and not previous.roots:
            plan = handle.plans.get(read[0])
            if plan is not None and plan.version == index._version:
                # A map structure that entered this handle before, on this name table: its checks
                # passed then (``_Plan``); only its patch objects are new, and an object used
                # twice is still refused.
                by_name = read[1]
                roots: Tuple[RootPatches, ...] = (RootPatches(index, by_name, True),)
                if len(read[3]) > 1:
                    _check_reuse(roots)
                watch = handle.watch
                if watch is None or not watch.hold():  # else its hook is still registered: held
                    watch = handle.watch = watch_eager_calls(model, index.root)
                watched = previous.watched
                if watch is not None:
                    if not watched:  # the common case: this model alone is watched
                        alone = plan.watched
                        if alone is None:
                            alone = plan.watched = {index.root: id(index)}
                        watched = alone
                    elif index.root not in watched:
                        watched = {**watched, index.root: id(index)}
                state = PatchState(roots, PATCHES, {}, RunLog(), None, watched, plan.shapes, (plan, read[2], read[3]))
                self._unhook = install_boundary_hooks(index, by_name) if index.eager_sites else None
                self._state, self._previous, self._watch, self._index, self._names = state, previous, watch, index, by_name
                self._token = _active.set(state)
                return
        root = index.root
        version = index._version
        by_name, structure = read_map(self._map)
        known = bool(index.names)  # the model ran: its names are checked now (else at its first call)
        if known and structure is not None and entered_before(index, structure):
            new_names = by_name  # checked before, so free of aliases (below) and known
        else:
            new_names = resolve_aliases(root, by_name)  # TransformerLens names (aliases.py)
            if known:  # raises before the state exists, as the roots do
                validate_entered(index, new_names, structure if list(new_names) == list(by_name) else None)
        plan = None
        if previous.roots:
            roots = tuple(_entered_roots(previous, index, new_names, known))
            shapes = None
            pending = None
            for entry in roots:
                if not entry.validated:
                    pending = PendingValidation()
        else:  # the common case: one model, its shapes found by these names alone
            roots = (RootPatches(index, new_names, known),)
            shapes = handle.shapes(tuple(new_names))
            pending = None if known else PendingValidation()
            if read is not None and known and _same_map(new_names, read[1]):
                plan = handle.remember(read[0], _Plan(version, shapes))
        _check_reuse(roots)
        # Nothing raises after this: the watch is released at exit.
        watch = handle.watch = watch_eager_calls(model, root, handle.watch)
        watched = previous.watched
        if watch is not None and root not in watched:
            watched = {**watched, root: id(index)}
        bound = None if plan is None else (plan, read[2], read[3])  # type: ignore[index]
        state = PatchState(roots, PATCHES, {}, RunLog(), pending, watched, shapes, bound)
        # Names on module boundaries no graph covers (a forward Dynamo ran eagerly) patch through
        # hooks for this block; a model without such a forward gets none (eager_boundaries.py).
        self._unhook = install_boundary_hooks(index, new_names) if index.eager_sites else None
        self._state, self._previous, self._watch, self._index, self._names = state, previous, watch, index, new_names
        self._token = _active.set(state)

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        state = self._state
        try:
            if exc_type is None:
                log = state.log
                open_calls = log.open_calls
                if open_calls:  # a wrapper call in progress ran eagerly (none of its graphs)?
                    runs = log.runs
                    for key, start in open_calls.items():
                        if runs.get(key, 0) == start:
                            close_wrapper_calls(state)
                            break
                    else:
                        open_calls.clear()  # the common case: every call ran a graph
                for marks in log.marks:
                    if marks.calls and marks.complete:
                        break  # a graph holding every patched name ran: nothing to check
                else:
                    raise_if_unapplied(log, self._index, self._names)
        finally:
            _active.reset(self._token)
            if self._watch is not None:
                self._watch.release()
            if self._unhook is not None:
                self._unhook()
            if state.pending is not None:
                for unhook in state.pending.unhooks:
                    unhook()
            if self._previous.roots:
                state.log.merge_into(self._previous.log)


class _Handle:
    """What ``pb.patch`` remembers of a handle the user passes (a torch.compile result, a
    PatchableGraph or a module): its model's name table and the watch its last context held
    (never_silent.py). Unwrapping the handle and finding the table is the same work at every
    entry; kept by ``id``, with a weak reference that tells the live handle from a reused id
    and drops the entry with the handle."""

    __slots__ = ("ref", "index", "watch", "_shapes", "plans", "_lock")

    #: Bound on ``plans``: emptied when full (a plan is rebuilt by one full entry).
    MAX_PLANS = 256

    def __init__(self, ref: Optional["weakref.ref[Any]"], index: RootIndex) -> None:
        self.ref = ref
        self.index = index
        self.watch: Optional[Watch] = None
        #: Patched names → (capture uid, instance, name-table version) → OccurrenceShape.
        self._shapes: Dict[Tuple[str, ...], Dict[Any, OccurrenceShape]] = {}
        #: ``read_known`` key → what contexts of that map structure share (``_Plan``). Read
        #: without the lock (one dict lookup is atomic); writers add or clear under it.
        self.plans: Dict[Hashable, _Plan] = {}
        self._lock = threading.Lock()

    def remember(self, key: Hashable, plan: _Plan) -> _Plan:
        """Keeps ``plan`` for contexts of map structure ``key`` (replacing an older one)."""
        with self._lock:
            if len(self.plans) >= self.MAX_PLANS:
                self.plans.clear()
            self.plans[key] = plan
        return plan

    def shapes(self, names: Tuple[str, ...]) -> Dict[Any, "OccurrenceShape"]:
        """The occurrence shapes of a context of this model alone patching ``names``: the
        graph memo's, found by a shorter key (``occurrence``). Bounded; a lost entry is cheap
        to find again. Dict reads and writes are atomic, so threads may share them."""
        found = self._shapes.get(names)
        if found is None:
            if len(self._shapes) >= 256:
                self._shapes.clear()
            found = self._shapes[names] = {}
        return found


def _handle_of(model: Any) -> _Handle:
    found = _HANDLES.get(id(model))
    if found is not None and found.ref() is model and found.index._root() is not None:  # type: ignore[misc]
        return found
    index = index_for(resolve_root(model))
    try:
        ref: Optional["weakref.ref[Any]"] = weakref.ref(model, functools.partial(_forget_handle, id(model)))
    except TypeError:  # not weakly referenceable: not remembered
        return _Handle(None, index)
    handle = _Handle(ref, index)
    with _HANDLES_LOCK:
        if len(_HANDLES) >= 4096:
            _HANDLES.clear()
        _HANDLES[id(model)] = handle
    return handle


#: id(handle) → what ``_handle_of`` remembers of it.
_HANDLES: Dict[int, _Handle] = {}
_HANDLES_LOCK = threading.RLock()  # re-entrant: a weak reference callback may run under it


def _forget_handle(key: int, ref: "weakref.ref[Any]") -> None:
    with _HANDLES_LOCK:
        found = _HANDLES.get(key)
        if found is not None and found.ref is ref:
            del _HANDLES[key]


def _same_map(resolved: Dict[str, Tuple[Patch, ...]], by_name: Dict[str, Tuple[Patch, ...]]) -> bool:
    """Whether alias resolution left the map as it was: the same names, the same patches."""
    if len(resolved) != len(by_name):
        return False
    for (name, patches), (other, theirs) in zip(resolved.items(), by_name.items()):
        if name != other or len(patches) != len(theirs) or any(a is not b for a, b in zip(patches, theirs)):
            return False
    return True


def _entered_roots(
    previous: PatchState, index: RootIndex, new_names: Dict[str, Tuple[Patch, ...]], validated: bool
) -> List[RootPatches]:
    """The previous roots with ``new_names`` appended to ``index``'s map (outer patches first);
    ``index``'s entry is marked ``validated`` (its caller checks all its names before use)."""
    roots: List[RootPatches] = []
    merged = False
    for entry in previous.roots:
        if entry.index is index:
            by_name = dict(entry.by_name)
            for name, patches in new_names.items():
                by_name[name] = by_name.get(name, ()) + patches
            roots.append(RootPatches(index, by_name, validated))
            merged = True
        else:
            roots.append(entry)
    if not merged:
        roots.append(RootPatches(index, new_names, validated))
    return roots


@contextlib.contextmanager
def eager_tier() -> Iterator[None]:
    """The active patches run on the eager interpreter in this block, the plain graphs as
    captured: no Inductor compile. pb.sweep uses it to check a cell against its unbatched run
    without compiling a variant for the check."""
    state = _active.get()
    token = _active.set(dataclasses.replace(state, frontend=EagerTier(state.frontend)))
    try:
        yield
    finally:
        _active.reset(token)


# -- the front-ends' requests --------------------------------------------------------------


class Patches:
    """pb.patch's front-end: the active maps' sites in the graph occurrence that runs.

    A selection that fits the sites a model declared with ``pb.prepare`` runs its one
    prepared program (prepare.py); any other runs the variant of its patch structure, fed the
    patch values as inputs (program/insert.py).
    """

    def request(self, state: PatchState, graph: GraphFacts, instance: Any, args: Sequence[Any]) -> Optional[Request]:
        pending = state.pending
        if pending is not None and not pending.done:
            pending.done = validate_pending(state, (graph.capture.uid, instance))
        key = (graph.capture.uid, instance, registry_version())
        found = state.memo.get(key)
        if found is None:
            found = occurrence(state, graph, instance, key)
        selection, marks, owners, declared, known = found
        marks.calls += 1  # for pb.patch's check at exit
        if state.watched:  # for a watched wrapper call (never_silent.py)
            runs = state.log.runs
            for root in marks.roots:
                runs[root] = runs.get(root, 0) + 1
        if not selection:
            return None
        capture = graph.capture
        if known is not None and known is not _LEARN and not declared:
            bound = state.bound
            if _intact(bound[2]):  # type: ignore[index]
                # A planned map of a structure this occurrence ran before: its spec and shape
                # check are the plan's, its values were read at entry (``read_known``).
                values = bound[1]  # type: ignore[index]
                ints = values.ints
                if ints is not known.ints and ints != known.ints:  # other slice numbers: checked?
                    checked = (known.walked, ints)
                    if checked not in graph.checked:
                        check_call_shapes(None, capture, selection, args, state.memo)
                        graph.remember_checked(checked, known.sites)
                return Request(
                    known.spec,
                    lambda compile_fn, args: build_variant(capture, selection, args, compile_fn),
                    lambda args: graph.interpreted(),
                    lambda program, args: program.run_lowered(selection, values, args),
                    owners,
                    True,
                )
        walked = walk(selection)  # this call's structure and values, read once
        if capture.dynamic:  # sizes change from call to call: check_call_shapes memoises by them
            check_call_shapes(graph.symbolic_inputs, capture, selection, args, state.memo)
        elif walked is not None:
            # Checked once per graph and structure with these slice numbers, whichever context.
            checked = (walked.key, walked.values.ints)
            if checked not in graph.checked:
                check_call_shapes(None, capture, selection, args, state.memo)
                graph.remember_checked(checked, tuple(entry.site for entry in selection))
        elif ("checked", id(selection)) not in state.memo:
            signature = check_signature(selection)
            if signature is None or signature not in graph.checked:
                check_call_shapes(None, capture, selection, args, state.memo)
                if signature is not None:
                    graph.remember_checked(signature)
            state.memo[("checked", id(selection))] = selection  # holds it: the id stays its own
        if declared:
            request = prepared_request(state, graph, instance, selection, owners)
            if request is not None:
                return request
        request = variant_request(graph, selection, owners, walked)
        if known is _LEARN and walked is not None and _intact(state.bound[2]):  # type: ignore[index]
            # The walk read what ``read_known`` read at entry: later contexts of this plan
            # take the spec and check from it (``known_request``).
            programs = state.bound[0].programs  # type: ignore[index]
            if len(programs) >= 256:
                programs.clear()
            marks = found[1]
            programs[key] = _Known(
                request.key,  # type: ignore[arg-type]
                walked.key,
                walked.values.ints,
                tuple(entry.site for entry in selection),
                (marks.roots, marks.returns, marks.applied),
                owners,
            )
        return request


_VALUE_PATCHES = (ZeroPatch, AddPatch, ReplacePatch)
_SCALARS = (bool, int, float)


def check_signature(selection: Any) -> Optional[Tuple[Any, ...]]:
    """What ``check_call_shapes`` reads of a selection on a static graph: sites, patch kinds,
    slice numbers and value shapes, dtypes and kinds (not the values' data). Two selections
    with one signature pass or fail together, so a loop of new maps checks the first only.
    None when the selection holds something the signature cannot stand for (index lists and
    tensors, an unexpected value type): those are checked at every call."""
    parts = []
    for entry in selection:
        site = entry.site
        #: Per patch, its type (kinds whose numbers do not matter) or (type, slice, value part).
        patches: List[object] = []
        for patch in entry.patches:
            if isinstance(patch, _VALUE_PATCHES):
                index = _slice_signature(patch.slice)
                value = getattr(patch, "value", None)
                if isinstance(value, torch.Tensor):
                    value_part: Any = (tuple(value.shape), value.dtype, value.is_meta)
                elif type(value) in _SCALARS:
                    value_part = (type(value), value if type(value) is int else None)
                elif value is None and isinstance(patch, ZeroPatch):
                    value_part = None
                else:
                    return None
                if index is _UNSIGNED:
                    return None
                patches.append((type(patch), index, value_part))
            elif isinstance(patch, CustomPatch) and not callable(patch.custom_op):
                return None
            else:
                patches.append(type(patch))
        parts.append((site.name, site.node, site.rank, site.shape, site.dtype, tuple(patches)))
    return tuple(parts)


_UNSIGNED = object()


def _slice_signature(tensor_slice: Any) -> Any:
    if tensor_slice is None:
        return None
    elements = tensor_slice if isinstance(tensor_slice, (list, tuple)) else (tensor_slice,)
    out: List[Tuple[Any, ...]] = []
    for element in elements:
        if element is None or element is Ellipsis or type(element) in (int, bool):
            out.append((type(element), element))
        elif type(element) is slice:
            bounds = (element.start, element.stop, element.step)
            if not all(bound is None or type(bound) is int for bound in bounds):
                return _UNSIGNED
            out.append(bounds)
        else:
            return _UNSIGNED  # index lists and tensors: their numbers are data
    return tuple(out)


def variant_request(graph: GraphFacts, selection: Any, owners: Tuple[Any, ...], walked: Optional[Walked] = None) -> Request:
    """The variant of ``selection``'s structure: one program per structure, every size. With
    ``walked`` (this call's ``spec.walk``), a structure seen before is not lowered again."""
    capture = graph.capture
    spec = None if walked is None else graph.lowerings.spec_of(walked)
    if spec is None:
        lowered = graph.lowerings.lower(selection, walked)  # the key and this call's runtime values
        spec, values = lowered.spec, lowered.values
    else:
        values = walked.values  # type: ignore[union-attr]
    return Request(
        key=spec,
        build=lambda compile_fn, args: build_variant(capture, selection, args, compile_fn),
        interpret=lambda args: graph.interpreted(),
        run=lambda program, args: program.run_lowered(selection, values, args),
        owners=owners,
        symbolic=True,
    )


def occurrence(state: PatchState, graph: GraphFacts, instance: Optional[int], key: Hashable) -> "Occurrence":
    """The active patches that land in this graph occurrence, the marks that count its runs for
    the never-ran check, the patched models (the programs' owners) and whether any of them
    declared sites (pb.prepare): computed at the occurrence's first call under ``state`` and
    kept in its memo, so later calls cost one lookup (``Patches.request``).

    What they derive from (which patched names have sites here, which models the occurrence
    belongs to and returns from) depends on the patched names, not the patches, so it is kept
    on the graph (``GraphFacts.occurrences``) and a new context of the same names reuses it;
    a context of one model also finds it in ``state.shapes`` (its handle's, by these names),
    by ``key`` = (capture uid, instance, name-table version) alone.
    """
    roots = state.roots
    bound = state.bound
    if bound is not None:
        known = bound[0].programs.get(key)
        if known is not None:  # a planned map on an occurrence its plan ran on: all is known
            selection = tuple(map(SitePatches, known.sites, roots[0].by_name.values()))
            marks = GraphMarks(known.roots, known.returns, known.applied, 0, True)
            state.log.marks.append(marks)
            declared = graph.compiled and bool(known.owners[0].declared)
            found: Occurrence = (selection, marks, known.owners, declared, known)
            state.memo[key] = found
            return found
    shapes = state.shapes
    if shapes is not None:
        shape = shapes.get(key)
        if shape is None:
            shape = _occurrence_shape(roots, graph, instance)
            if len(shapes) >= 1024:
                shapes.clear()
            shapes[key] = shape
    else:
        shape = _occurrence_shape(roots, graph, instance)
    if len(roots) == 1:  # the common case, without the generators
        by_name = roots[0].by_name
        selection = tuple([SitePatches(site, by_name[name]) for name, site in shape.sites[0]])
        owners: Tuple[RootIndex, ...] = (roots[0].index,)
        declared = graph.compiled and bool(roots[0].index.declared)
    else:
        selection = tuple(
            SitePatches(site, entry.by_name[name]) for entry, sites in zip(roots, shape.sites) for name, site in sites
        )
        owners = tuple(entry.index for entry in roots)
        declared = graph.compiled and any(entry.index.declared for entry in roots)
    marks = GraphMarks(shape.roots, shape.returns, shape.applied, 0, shape.complete)
    state.log.marks.append(marks)
    # A planned map whose selection here is the whole map in map order (one model): its first
    # walk here teaches the plan (``Patches.request``).
    learn = _LEARN if bound is not None and shape.complete and not graph.capture.dynamic else None
    found = (selection, marks, owners, declared, learn)
    state.memo[key] = found
    return found


#: ``occurrence``'s answer: selection, run marks, owners, whether any patched model declared
#: sites, and for a planned map the plan's program here (``_Known``; ``_LEARN`` until the
#: first walk of it, None where the plan does not apply).
Occurrence = Tuple[Selection, GraphMarks, Tuple[RootIndex, ...], bool, Any]
_LEARN = object()


@dataclass(frozen=True)
class OccurrenceShape:
    """What ``occurrence`` derives from the patched names of a state on one graph occurrence."""

    #: Per patched model (in ``PatchState.roots`` order), its patched names with a site here.
    sites: Tuple[Tuple[Tuple[str, Any], ...], ...]
    roots: Tuple[RootKey, ...]
    returns: Tuple[RootKey, ...]
    applied: FrozenSet[Tuple[RootKey, str]]
    #: Every patched name of every patched model has its site here.
    complete: bool
    #: The name tables it was read from, weakly (a model's deletion frees them): a hit whose
    #: tables are gone or others (an id reused) is rebuilt.
    indexes: Tuple["weakref.ref[RootIndex]", ...]


def _occurrence_shape(roots: Tuple[RootPatches, ...], graph: GraphFacts, instance: Optional[int]) -> OccurrenceShape:
    capture = graph.capture
    if len(roots) == 1:  # the common case, without the generators
        indexes = [roots[0].index.refresh()]
        names: Tuple[Any, ...] = ((id(indexes[0]), tuple(roots[0].by_name)),)
    else:
        indexes = [entry.index.refresh() for entry in roots]
        names = tuple((id(index), tuple(entry.by_name)) for index, entry in zip(indexes, roots))
    key = (instance, registry_version(), names)
    shape = graph.occurrences.get(key)
    if shape is not None:
        for ref, index in zip(shape.indexes, indexes):
            if ref() is not index:
                break
        else:
            return shape
    sites: List[Tuple[Tuple[str, Any], ...]] = []
    keys: List[RootKey] = []
    returns: List[RootKey] = []
    applied: Set[Tuple[RootKey, str]] = set()
    for index, entry in zip(indexes, roots):
        found = index.sites_for(capture, instance)
        if found is None:
            sites.append(())
            continue  # a graph of another model
        sites.append(tuple((name, found[name]) for name in entry.by_name if name in found))
        root_key = id(index)
        keys.append(root_key)
        if (capture.uid, instance) in index.root_returns:
            returns.append(root_key)
        applied.update((root_key, name) for name in entry.by_name if name in found)
    complete = all(len(found) == len(entry.by_name) for found, entry in zip(sites, roots))
    shape = OccurrenceShape(
        tuple(sites), tuple(keys), tuple(returns), frozenset(applied), complete, tuple(weakref.ref(i) for i in indexes)
    )
    return graph.occurrences.put(key, shape)


#: The front-end of every pb.patch state (it holds no state of its own).
PATCHES = Patches()


@dataclass(frozen=True)
class EagerTier:
    """``eager_tier``'s front-end: the requests of the front-end it wraps, run on their eager
    forms, and unpatched graphs as captured: nothing is compiled for a one-off reference run."""

    inner: Optional[FrontEnd]

    def request(self, state: PatchState, graph: GraphFacts, instance: Any, args: Sequence[Any]) -> Optional[Request]:
        request = None if self.inner is None else self.inner.request(state, graph, instance, args)
        if request is None:
            return uncompiled(graph)
        return dataclasses.replace(request, compile=False)


def validate_pending(state: PatchState, occurrence: Any = None) -> bool:
    """Called by the dispatcher before a graph runs: checks maps entered before the model ran.

    In a model's very first forward, a graph break in the root's forward means later graphs are
    not captured yet, so a name still unknown is only an error once no graph can be missing:
    the graph about to run (``occurrence``) is the one returning from the root's forward
    (``RootIndex.root_returns``), or the forward started over (the graph this state ran first
    runs again). Until then names found so far are checked and patched, and this returns False
    so the next graph call checks again. (Only the graph about to run counts: a graph captured
    earlier for another instance of the class may not belong to this forward at all.)
    """
    pending = state.pending
    if pending is None:
        return True
    if pending.first_occurrence is None:
        pending.first_occurrence = occurrence
    if occurrence is not None and occurrence == pending.first_occurrence:
        pending.first_runs += 1
    restarted = pending.first_runs > 1
    done = True
    for entry in state.roots:
        if not entry.validated:
            strict = restarted or occurrence in entry.index.refresh().root_returns
            done = validate_names(entry.index, entry.by_name, defer_unknown=not strict) and done
            if entry.index.eager_sites:  # learnt with this call's first graph: patch them in it
                unhook = hook_learnt_boundaries(entry.index, entry.by_name, pending.hooked)
                if unhook is not None:
                    pending.unhooks.append(unhook)
    return done
