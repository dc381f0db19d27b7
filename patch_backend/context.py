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
import weakref
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from .aliases import resolve_aliases
from .capture.capture import registry_version
from .capture.index import RootIndex, index_for
from .eager_boundaries import install_boundary_hooks
from .never_silent import PatchNotAppliedError, raise_if_unapplied, unapplied_message, watch_eager_calls
from .patches import AddPatch, CustomPatch, Patch, ReplacePatch, ZeroPatch
from .prepare import prepared_request
from .program.dynamic import check_call_shapes
from .program.eager import Interpreted
from .program.insert import build_variant
from .program.plan import Selection, SitePatches
from .program.spec import Walked, walk
from .roots import resolve_root
from .runtime.requests import FrontEnd, GraphFacts, Request, uncompiled
from .state import GraphMarks, PatchState, PendingValidation, RootKey, RootPatches, RunLog, _active, active_state
from .validation import check_name_syntax, validate_entered, validate_names

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
    if not isinstance(patch_map, collections.abc.Mapping):  # not typing's: its isinstance is slow
        raise ValueError(
            f"patch map must be a dict of node name -> Patch or list of Patches, got {type(patch_map).__name__}"
        )
    normalized: Dict[str, Tuple[Patch, ...]] = {}
    for key, value in patch_map.items():
        if not isinstance(key, str):
            if hasattr(key, "_name"):
                key = str(key)
            else:
                raise ValueError(f"patch map keys must be node names (str), got {key!r} of type {type(key).__name__}")
        check_name_syntax(key)
        patches = list(value) if isinstance(value, (list, tuple)) else [value]
        for patch in patches:
            if not isinstance(patch, Patch):
                raise ValueError(
                    f"patch map value for {key!r} must be a Patch or a list of Patches, got {type(patch).__name__}"
                )
        normalized[key] = normalized.get(key, ()) + tuple(patches)
    return normalized

def _check_reuse(roots: Sequence["RootPatches"]) -> None:
    """A patch object may stand in one place at a time, across nodes and across patched models:
    its state (``ProbePatch.activation``, a RecordPatch's list) would mix two places."""
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


@contextlib.contextmanager
def patch(model: Any, patch_map: PatchMap) -> Iterator[None]:
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
    root = resolve_root(model)
    new_names = resolve_aliases(root, normalize_map(patch_map))  # TransformerLens names (aliases.py)
    index = index_for(root)
    previous = _active.get()
    known = bool(index.names)  # the model ran: its names are checked now (else at its first call)
    roots = _entered_roots(previous, index, new_names, known)
    _check_reuse(roots)
    if known:
        validate_entered(index, new_names)  # raises before the state exists, as the roots do
    state = PatchState(tuple(roots), PATCHES)
    release = watch_eager_calls(model, root)
    # Names on module boundaries no graph covers (a forward Dynamo ran eagerly) patch through
    # hooks for this block; a model without such a forward gets none (eager_boundaries.py).
    unhook = install_boundary_hooks(index, new_names) if index.eager_sites else None
    token = _active.set(state)
    try:
        yield
        raise_if_unapplied(state.log, index, new_names)
    finally:
        _active.reset(token)
        release()
        if unhook is not None:
            unhook()
        if previous.roots:
            state.log.merge_into(previous.log)


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
        capture = graph.capture
        selection, marks = occurrence(state, graph, instance)
        marks.calls += 1  # for pb.patch's check at exit
        if not selection:
            return None
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
        owners = tuple(entry.index for entry in state.roots)
        if graph.compiled:
            request = prepared_request(state, graph, instance, selection, owners)
            if request is not None:
                return request
        return variant_request(graph, selection, owners, walked)


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
    lowered = graph.lowerings.lower(selection, walked)  # the key and this call's runtime values
    values = lowered.values
    return Request(
        key=lowered.spec,
        build=lambda compile_fn, args: build_variant(capture, selection, args, compile_fn),
        interpret=lambda args: Interpreted(capture.gm),
        run=lambda program, args: program.run_lowered(selection, values, args),
        owners=owners,
        symbolic=True,
    )


def occurrence(state: PatchState, graph: GraphFacts, instance: Optional[int]) -> Tuple[Selection, GraphMarks]:
    """The active patches that land in this graph occurrence, and the marks that count its runs
    for the never-ran check: one memo lookup per call, computed once per state and occurrence.

    What they derive from (which patched names have sites here, which models the occurrence
    belongs to and returns from) depends on the patched names, not the patches, so it is kept
    on the graph (``GraphFacts.occurrences``) and a new context of the same names reuses it.
    """
    memo = state.memo
    if not memo.get("validated"):
        memo["validated"] = validate_pending(state, (graph.capture.uid, instance))
    memo_key = (graph.capture.uid, instance, registry_version())
    found = memo.get(memo_key)
    if found is None:
        shape = _occurrence_shape(state, graph, instance)
        selection = tuple(
            SitePatches(site, entry.by_name[name]) for entry, sites in zip(state.roots, shape.sites) for name, site in sites
        )
        marks = GraphMarks(shape.roots, shape.returns, shape.applied)
        state.log.marks.append(marks)
        found = memo[memo_key] = (selection, marks)
    return found


@dataclass(frozen=True)
class OccurrenceShape:
    """What ``occurrence`` derives from the patched names of a state on one graph occurrence."""

    #: Per patched model (in ``PatchState.roots`` order), its patched names with a site here.
    sites: Tuple[Tuple[Tuple[str, Any], ...], ...]
    roots: Tuple[RootKey, ...]
    returns: Tuple[RootKey, ...]
    applied: FrozenSet[Tuple[RootKey, str]]
    #: The name tables it was read from, weakly (a model's deletion frees them): a hit whose
    #: tables are gone or others (an id reused) is rebuilt.
    indexes: Tuple["weakref.ref[RootIndex]", ...]


def _occurrence_shape(state: PatchState, graph: GraphFacts, instance: Optional[int]) -> OccurrenceShape:
    capture = graph.capture
    indexes = [entry.index.refresh() for entry in state.roots]
    key = (instance, registry_version(), tuple((id(index), tuple(entry.by_name)) for index, entry in zip(indexes, state.roots)))
    shape = graph.occurrences.get(key)
    if shape is not None and all(ref() is index for ref, index in zip(shape.indexes, indexes)):
        return shape
    sites: List[Tuple[Tuple[str, Any], ...]] = []
    roots: List[RootKey] = []
    returns: List[RootKey] = []
    applied: Set[Tuple[RootKey, str]] = set()
    for index, entry in zip(indexes, state.roots):
        found = index.sites_for(capture, instance)
        if found is None:
            sites.append(())
            continue  # a graph of another model
        sites.append(tuple((name, found[name]) for name in entry.by_name if name in found))
        root_key = id(index)
        roots.append(root_key)
        if (capture.uid, instance) in index.root_returns:
            returns.append(root_key)
        applied.update((root_key, name) for name in entry.by_name if name in found)
    shape = OccurrenceShape(
        tuple(sites), tuple(roots), tuple(returns), frozenset(applied), tuple(weakref.ref(i) for i in indexes)
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
    return done
