"""The patch context: which patches are active, per root model, in this thread/task.

State lives in a ContextVar, so threads and asyncio tasks patching the same compiled model each
see only their own patches. Every ``patch()`` builds a new immutable ``PatchState`` (outer
patches first, then inner) and restores the previous one on exit, exception or not.

Never silent: each state carries a ``RunLog`` of what ran under it (which patched names were in
a graph that ran, how many graphs and forwards of each patched model ran, and which calls of the
model ran outside its compiled graphs). On a normal exit, ``patch()`` raises
``PatchNotAppliedError`` for every name it added whose node never ran although the model did.
"""

from __future__ import annotations

import collections.abc
import contextlib
import contextvars
import dataclasses
import functools
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from ._torch_compat.frame import dynamo_wraps_top_frame
from .aliases import resolve_aliases
from .capture.capture import GraphCapture, registry_version
from .capture.index import RootIndex, index_for
from .patches import AddPatch, CustomPatch, Patch, ReplacePatch, ZeroPatch
from .prepare import prepared_request
from .program.dynamic import check_call_shapes
from .program.eager import Interpreted
from .program.insert import build_variant
from .program.plan import Selection, SitePatches
from .program.spec import Walked, walk
from .roots import resolve_root
from .runtime.requests import FrontEnd, GraphFacts, Request, uncompiled
from .validation import check_name_syntax, check_patch_kind, unknown_name_error

PatchMap = Mapping[Any, Any]
#: A patched model in a run log: ``id`` of its RootIndex (the state holds the index alive).
RootKey = int


class PatchNotAppliedError(RuntimeError):
    """A patch whose node never ran in its context's forwards (docs/errors.md, issue 9).

    Raised when a ``pb.patch`` block (or a ``pb.sweep`` chunk) exits normally; for a model
    patched through its torch.compile wrapper, also at the second call of the uncompiled model
    in a block where none of its compiled graphs ran yet (``compiled.generate``). A silently
    ignored patch would look like a patch that changed nothing.
    """


@dataclass(eq=False)
class GraphMarks:
    """One graph occurrence as a RunLog sees it, computed once per PatchState. Its runs are
    counted here, so that a graph call costs one memo lookup and one increment."""

    #: Patched models the occurrence belongs to.
    roots: Tuple[RootKey, ...]
    #: Of those, the models whose own ``forward`` this graph returns from (one per forward).
    returns: Tuple[RootKey, ...]
    #: (model, name) of every patched name whose site is in this occurrence.
    applied: FrozenSet[Tuple[RootKey, str]]
    #: Runs not yet folded into the RunLog's totals (``RunLog.settle``).
    calls: int = 0


@dataclass(eq=False)
class RunLog:
    """What ran under one PatchState: the facts the never-ran check needs.

    The totals hold what ``settle`` folded in from the marks, what inner contexts merged in, and
    what a sweep records directly; read them after ``settle()``.
    """

    marks: List[GraphMarks] = field(default_factory=list)
    applied: Set[Tuple[RootKey, str]] = field(default_factory=set)
    graph_calls: Dict[RootKey, int] = field(default_factory=dict)
    forwards: Dict[RootKey, int] = field(default_factory=dict)
    #: Calls of the model itself that ran outside torch.compile (seen by ``_root_called``).
    eager_calls: Dict[RootKey, int] = field(default_factory=dict)

    def settle(self) -> "RunLog":
        """Folds the marks' run counters into the totals (idempotent: the counters restart)."""
        for marks in self.marks:
            calls = marks.calls
            if not calls:
                continue
            marks.calls = 0
            self.applied |= marks.applied
            _add(self.graph_calls, marks.roots, calls)
            _add(self.forwards, marks.returns, calls)
        return self

    def merge_into(self, outer: "RunLog") -> None:
        """An inner context's runs are runs of the enclosing context too."""
        self.settle()
        outer.applied |= self.applied
        for mine, theirs in (
            (self.graph_calls, outer.graph_calls),
            (self.forwards, outer.forwards),
            (self.eager_calls, outer.eager_calls),
        ):
            for key, count in mine.items():
                theirs[key] = theirs.get(key, 0) + count


def _add(counts: Dict[RootKey, int], keys: Sequence[RootKey], number: int) -> None:
    for key in keys:
        counts[key] = counts.get(key, 0) + number


@dataclass(frozen=True)
class RootPatches:
    index: RootIndex
    by_name: Dict[str, Tuple[Patch, ...]]
    #: False until the names could be checked (a compiled model that has not run yet).
    validated: bool


@dataclass(frozen=True, eq=False)
class PatchState:
    roots: Tuple[RootPatches, ...] = ()
    #: Answers the dispatcher for each graph call under this state (runtime/requests.py):
    #: ``PATCHES`` for pb.patch, a sweep chunk's spec, ``EagerTier``; None runs graphs plain.
    frontend: Optional[FrontEnd] = None
    #: Per-state memo for program.plan and validation: (capture uid, instance, index version)
    #: → selection, call-shape checks, the graph marks of the never-ran check.
    memo: Dict[Any, Any] = field(default_factory=dict)
    #: What ran under this state (mutable: the state is shared by the calls it patches).
    log: RunLog = field(default_factory=RunLog)
    #: Validation of maps entered before the model ran (``validate_pending``).
    pending: "PendingValidation" = field(default_factory=lambda: PendingValidation())


@dataclass(eq=False)
class PendingValidation:
    """Where ``validate_pending`` stands for one state: the graph occurrence the state ran
    first and how often it ran (a second run means the forward started over)."""

    first_occurrence: Any = None
    first_runs: int = 0


_EMPTY = PatchState()
_active: contextvars.ContextVar[PatchState] = contextvars.ContextVar("patch_backend_patches", default=_EMPTY)


def active_state() -> PatchState:
    return _active.get()


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


def validate_names(index: RootIndex, by_name: Dict[str, Tuple[Patch, ...]], defer_unknown: bool = False) -> bool:
    """Raises KeyError for unknown names, ValueError for patches that cannot apply there whatever
    the shapes (non-tensor node, value type or dtype, custom_op not callable).

    Whether a patch fits its node (slice in range, value broadcasts, dtype) is checked per call,
    against that call's shapes, before the graph runs (``dynamic.check_call_shapes``): a name
    has one shape per captured graph (prompt lengths, prefill and decode), and the next call may
    bring a length not seen yet.

    With ``defer_unknown``, names not captured yet are skipped; returns whether all were found.
    """
    index.refresh()
    found_all = True
    for name, patches in by_name.items():
        named_sites = index.by_name.get(name)
        if not named_sites:
            if name in index.non_tensor:
                raise ValueError(
                    f"{type(patches[0]).__name__} at {name!r}: the node holds no tensor (a number, None or "
                    "size in the result, kept outside the graph); patch_backend patches tensor values only"
                )
            if defer_unknown:
                found_all = False
                continue
            raise unknown_name_error(name, index)
        for patch in patches:
            check_patch_kind(name, named_sites[0].site, patch)
    return found_all


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
    roots = _entered_roots(previous, index, new_names)
    _check_reuse(roots)
    if index.names:
        validate_names(index, new_names)
        roots = [RootPatches(r.index, r.by_name, True) if r.index is index else r for r in roots]
    state = PatchState(tuple(roots), PATCHES)
    release = _watch_eager_calls(model, root)
    token = _active.set(state)
    try:
        yield
        raise_if_unapplied(state.log, index, new_names)
    finally:
        _active.reset(token)
        release()
        if previous.roots:
            state.log.merge_into(previous.log)


def _entered_roots(
    previous: PatchState, index: RootIndex, new_names: Dict[str, Tuple[Patch, ...]]
) -> List[RootPatches]:
    """The previous roots with ``new_names`` appended to ``index``'s map (outer patches first)."""
    roots: List[RootPatches] = []
    merged = False
    for entry in previous.roots:
        if entry.index is index:
            by_name = dict(entry.by_name)
            for name, patches in new_names.items():
                by_name[name] = by_name.get(name, ()) + patches
            roots.append(RootPatches(index, by_name, entry.validated and bool(index.names)))
            merged = True
        else:
            roots.append(entry)
    if not merged:
        roots.append(RootPatches(index, new_names, False))
    return roots


# -- never silent: what ran, and the check at exit ---------------------------------------------


def raise_if_unapplied(
    log: RunLog, index: RootIndex, names: Mapping[str, Tuple[Patch, ...]], where: str = "this pb.patch context"
) -> None:
    """The exit check of one context: only its own names, only if the model ran in it."""
    log.settle()
    key = id(index)
    graphs = log.graph_calls.get(key, 0)
    if not graphs and not log.eager_calls.get(key, 0):
        return  # the model never ran in this context: nothing was expected to apply
    missing = {name: patches for name, patches in names.items() if (key, name) not in log.applied}
    if not missing:
        return
    if graphs:
        validate_names(index, missing)  # a name no graph holds is a KeyError, as on entry
    raise PatchNotAppliedError(unapplied_message(log, index, missing, where))


def _describe(patches_by_name: Mapping[str, Tuple[Patch, ...]]) -> str:
    return ", ".join(
        f"{name!r} ({', '.join(dict.fromkeys(type(patch).__name__ for patch in patches))})"
        for name, patches in patches_by_name.items()
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _model_name(index: RootIndex) -> str:
    root = index._root()
    return type(root).__name__ if root is not None else "the model"


_EAGER_HINT = (
    "The model itself was called, not its torch.compile result (e.g. `compiled.generate(...)` calls "
    "the uncompiled `forward`), or Dynamo ran the forward without compiling it. To generate, use "
    "`pb.PatchableGraph(model, example_ids).generate(...)`, or compile the forward "
    "(`model.forward = torch.compile(model.forward, backend=\"graphpatch\")`) and patch the model "
    "(docs/transformers.md); otherwise call the compiled model."
)


def unapplied_message(
    log: RunLog, index: RootIndex, missing: Mapping[str, Tuple[Patch, ...]], where: str = "this pb.patch context"
) -> str:
    """Names the nodes and patches, and says why they did not run."""
    key = id(index)
    model = _model_name(index)
    graphs = log.graph_calls.get(key, 0)
    eager = log.eager_calls.get(key, 0)
    head = f"{_describe(missing)} never ran in {where}: "
    if not graphs:
        ran = f"{model}'s forward ran {_count(eager, 'time')}, always outside its compiled graphs. "
        return head + ran + _EAGER_HINT
    forwards = log.forwards.get(key, 0)
    runs = _count(graphs, "graph call")
    if forwards:
        runs = f"{_count(forwards, 'forward')} ({runs})"
    its, was, node = ("its graph", "was", "node") if len(missing) == 1 else ("their graphs", "were", "nodes")
    message = (
        head + f"{its} {was} not entered in any of the {runs} of {model} that ran in it; the {node} {was} "
        "captured in another call (a branch, input shape or argument these forwards did not take)."
    )
    if eager:
        message += f" {_count(eager, 'call')} of {model} also ran outside its compiled graphs. " + _EAGER_HINT
    return message


# -- calls of the uncompiled model ----------------------------------------------------------

_watch_lock = threading.Lock()
#: id(module) → (hook handles, number of active contexts using them).
_watched: Dict[int, Tuple[List[Any], int]] = {}
#: ``calls``: this thread's watched wrapper calls in progress (``_wrapper_calls``).
_inside = threading.local()


def _watch_eager_calls(model: Any, root: nn.Module) -> Callable[[], None]:
    """While a context patches ``root`` through a wrapper (its torch.compile result or a
    PatchableGraph), hooks tell calls of the uncompiled ``root`` made outside the wrapper (such
    as ``compiled.generate``'s) from the wrapper's own; returns the function that stops watching.

    The wrapper's hooks count, per thread, the wrapper calls in progress; the root's pre-hook
    (hidden from Dynamo, so nothing is traced or recompiled for it) counts a call of the root
    made outside them. Not done for a plain module: it may be called inside another compiled
    function, whose trace would meet the hook (a graph break and a recompile per context), as
    would torch's own module classes compiled directly.
    """
    if model is root or not isinstance(model, nn.Module):
        return _nothing
    with _watch_lock:
        # Already watched by an enclosing or concurrent context: the check was made then.
        if id(model) not in _watched and not _hooks_run_outside_dynamo(root):
            return _nothing
        _acquire(root, lambda: [root.register_forward_pre_hook(_root_called)])
        _acquire(
            model,
            lambda: [
                model.register_forward_pre_hook(functools.partial(_enter_wrapper, root)),
                model.register_forward_hook(functools.partial(_leave_wrapper, root), always_call=True),
            ],
        )
    return functools.partial(_release, root, model)


def _hooks_run_outside_dynamo(root: nn.Module) -> bool:
    """torch.compile traces a torch.nn class's hooks (``wrap_inline``), a user class's not."""
    top_frame = dynamo_wraps_top_frame()
    return not top_frame and type(root).__module__.split(".")[0] != "torch"


def _acquire(module: nn.Module, register: Callable[[], List[Any]]) -> None:
    """Registers ``module``'s hooks for the first context using them (caller holds the lock)."""
    handles, users = _watched.get(id(module), (None, 0))
    _watched[id(module)] = (handles if handles is not None else register(), users + 1)


def _release(*modules: nn.Module) -> None:
    with _watch_lock:
        for module in modules:
            handles, users = _watched[id(module)]
            if users > 1:
                _watched[id(module)] = (handles, users - 1)
                continue
            for handle in handles:
                handle.remove()
            del _watched[id(module)]


def _nothing() -> None:
    return None


def _wrapper_calls() -> List[Optional[int]]:
    """This thread's wrapper calls in progress, innermost last: each holds the model's graph
    calls in the active context when it started (None: the model is not patched there)."""
    calls = getattr(_inside, "calls", None)
    if calls is None:
        calls = _inside.calls = []
    return calls


def _enter_wrapper(root: nn.Module, wrapper: nn.Module, args: Any) -> None:
    _wrapper_calls().append(_graph_calls_of(root))


def _leave_wrapper(root: nn.Module, wrapper: nn.Module, args: Any, output: Any) -> None:
    """Also runs when the call raised (``always_call``); pops nothing should a pre-hook
    registered before ``_enter_wrapper`` have raised.

    A wrapper call in which no graph of the model ran was a forward Dynamo ran eagerly (it gives
    up on a whole forward it cannot trace, e.g. around an ``nn.LSTM``): no patch applied in it,
    so it counts as a call outside the compiled graphs."""
    calls = _wrapper_calls()
    if calls:
        before = calls.pop()
        if before is not None and _graph_calls_of(root) == before:
            _note_eager_call(root)


def _entry_of(state: PatchState, root: nn.Module) -> Optional[RootPatches]:
    """The active context's patches on ``root``, if it is patched."""
    for entry in state.roots:
        if entry.index._root() is root:
            return entry
    return None


def _graph_calls_of(root: nn.Module) -> Optional[int]:
    """Graph calls of ``root`` so far in the active context (None when it is not patched)."""
    state = _active.get()
    entry = _entry_of(state, root)
    return None if entry is None else state.log.settle().graph_calls.get(id(entry.index), 0)


@torch.compiler.disable
def _root_called(module: nn.Module, args: Any) -> None:
    """Forward pre-hook on a watched root: a call outside every watched wrapper call ran the
    uncompiled model."""
    if _wrapper_calls():
        return None
    _note_eager_call(module)
    return None


def _note_eager_call(module: nn.Module) -> None:
    """Counts an uncompiled call of a patched model; raises at the second one if no compiled
    graph of the model ran in this context yet (``compiled.generate`` fails at its second step
    rather than after the whole generation)."""
    state = _active.get()
    entry = _entry_of(state, module)
    if entry is None:
        return
    key = id(entry.index)
    log = state.log.settle()
    if log.eager_calls.get(key, 0) and not log.graph_calls.get(key, 0):
        raise PatchNotAppliedError(
            f"{type(module).__name__} was called again outside its compiled graphs: its previous "
            f"forward in this pb.patch context ran none of them, so {_describe(entry.by_name)} did not "
            "apply there. " + _EAGER_HINT
        )
    log.eager_calls[key] = log.eager_calls.get(key, 0) + 1


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
